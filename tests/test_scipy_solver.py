"""SciPy("splu"/"spsolve"/Krylov) on the host: against dense NumPy solves, under jit
and vmap, through ImplicitFunction against analytic derivatives, one factorisation
per linearisation point, and NaN on every kind of failure."""

import warnings

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from sparse_problems import (
    CubicProblem,
    assert_relative_error,
    check_implicit_derivatives,
    grid_matrix,
    linear_solve_loss,
    sparse_operator,
)

import implicitdiff as idf
from implicitdiff._solvers._on_host import HOST_CACHE
from implicitdiff._sparse._operator import SparseLinearOperator

jax.config.update("jax_enable_x64", True)

SPD = grid_matrix(4)
NONSYMMETRIC = grid_matrix(4, convection=0.5)
METHODS = ("spsolve", "splu", "cg", "gmres", "bicgstab", "minres", "lgmres")
METHODS += ("gcrotmk", "qmr")
SYMMETRIC_ONLY = ("cg", "minres")
RNG = np.random.default_rng(0)
RHS = RNG.normal(size=(3, 16))


def solve_with(solver, A, b):
    return solver.solve(solver.presolve(A, None), b)


def batched_solve(solver):
    """jit(vmap) over right-hand sides: one callback call for the whole batch."""
    return jax.jit(jax.vmap(lambda A, b: solve_with(solver, A, b), (None, 0)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["spd", "nonsymmetric"])
def test_matches_dense_solve(method, symmetric):
    if method in SYMMETRIC_ONLY and not symmetric:
        pytest.skip(f"{method} needs a symmetric matrix")
    matrix = SPD if symmetric else NONSYMMETRIC
    expected = np.linalg.solve(matrix.toarray(), RHS.T).T
    x = batched_solve(idf.SciPy(method))(sparse_operator(matrix), RHS)
    assert_relative_error(x, expected, 1e-8)


@pytest.mark.parametrize("method", ["splu", "gmres"])
def test_transposed_and_dense_operators(method):
    solver = idf.SciPy(method)
    transposed = sparse_operator(NONSYMMETRIC).transpose()
    expected = np.linalg.solve(NONSYMMETRIC.toarray().T, RHS[0])
    np.testing.assert_allclose(solve_with(solver, transposed, RHS[0]), expected, 1e-8)
    dense = lx.MatrixLinearOperator(jnp.asarray(NONSYMMETRIC.toarray()))
    expected = np.linalg.solve(NONSYMMETRIC.toarray(), RHS[0])
    np.testing.assert_allclose(solve_with(solver, dense, RHS[0]), expected, 1e-8)


def test_batch_of_matrices_survives_eviction(monkeypatch):
    """vmap over matrices presolves each; with a cache of one entry the solves must
    prepare the evicted ones again, not mix them up."""
    monkeypatch.setattr(HOST_CACHE, "max_entries", 1)
    base = sparse_operator(NONSYMMETRIC)
    scales = jnp.array([1.0, 2.0, 5.0])
    shifts = jnp.array([0.0, 1.0, -0.5])
    diagonal = base.pattern.rows == base.pattern.cols

    def solve(scale, shift, b):
        data = scale * base.data + shift * diagonal
        return solve_with(
            idf.SciPy("splu"), SparseLinearOperator(data, base.pattern), b
        )

    x = jax.jit(jax.vmap(solve))(scales, shifts, RHS)
    for i in range(3):
        matrix = float(scales[i]) * NONSYMMETRIC + float(shifts[i]) * np.eye(16)
        np.testing.assert_allclose(x[i], np.linalg.solve(matrix, RHS[i]), 1e-8)


@pytest.mark.parametrize("method", ["splu", "gmres"])
def test_implicit_function_derivatives(method):
    check_implicit_derivatives(idf.SciPy(method), NONSYMMETRIC, RNG)


def test_linear_solve_gradients():
    """`implicitdiff.linear_solve` with this solver: gradients w.r.t. A's values and b
    against JAX's differentiation of a dense solve."""
    sparse_loss, dense_loss, values = linear_solve_loss(idf.SciPy("splu"), NONSYMMETRIC)
    b = jnp.asarray(RHS[0])
    grads = jax.jit(jax.grad(sparse_loss, argnums=(0, 1)))(values, b)
    expected = jax.grad(dense_loss, argnums=(0, 1))(values, b)
    for grad, reference in zip(grads, expected, strict=True):
        assert_relative_error(grad, reference, 1e-8)


def test_one_factorisation_per_linearisation_point():
    problem = CubicProblem(NONSYMMETRIC)
    f = problem.implicit(idf.SciPy("splu"))
    jacrev = jax.jit(jax.jacrev(f))
    x = jnp.linspace(0.5, 1.5, 16)
    before = HOST_CACHE.preparations
    np.testing.assert_allclose(jacrev(x), problem.jacobian(x), rtol=1e-8)
    assert HOST_CACHE.preparations - before == 1  # 16 right-hand sides, one splu
    jacrev(x)  # the same point again: the factor is found in the cache
    assert HOST_CACHE.preparations - before == 1
    jacrev(2 * x)
    assert HOST_CACHE.preparations - before == 2


@pytest.mark.parametrize(
    "solver",
    [
        idf.SciPy("splu"),
        idf.SciPy("spsolve"),
        idf.SciPy("gmres"),
        idf.SciPy("gmres", maxiter=1, restart=2),  # does not converge
        idf.SciPy("splu", permc_spec="NO_SUCH_ORDERING"),  # raises in the callback
        idf.SciPy("cg", maxiter=-1),  # raises in the callback
    ],
    ids=["splu", "spsolve", "gmres", "gmres-maxiter", "bad-permc", "bad-maxiter"],
)
@pytest.mark.full_optimisation
def test_failures_give_nan(solver):
    singular = NONSYMMETRIC.tolil()
    singular[3] = 0.0  # a zero row
    nonfinite = NONSYMMETRIC.toarray()
    nonfinite[2, 2] = np.nan
    operators = [sparse_operator(SPD), sparse_operator(NONSYMMETRIC)]
    if solver.options == ():  # the healthy solvers fail on bad matrices
        operators = [
            sparse_operator(singular.tocsr()),
            lx.MatrixLinearOperator(jnp.asarray(nonfinite)),
        ]
    for operator in operators:
        x = batched_solve(solver)(operator, RHS)
        assert np.all(np.isnan(x)), x


@pytest.mark.full_optimisation
def test_failure_through_implicit_function_is_nan():
    problem = CubicProblem(NONSYMMETRIC)
    f = problem.implicit(idf.SciPy("gmres", maxiter=1, restart=2), on_failure="nan")
    assert np.all(np.isnan(jax.jacrev(f)(jnp.linspace(0.5, 1.5, 16))))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="method must be one of"):
        idf.SciPy("cholesky")
    with pytest.raises(TypeError, match="unknown option"):
        idf.SciPy("cg", restart=5)
    with pytest.raises(TypeError, match="unknown option"):
        idf.SciPy("gmres", callback=print)
    with pytest.raises(ValueError, match="rtol"):
        idf.SciPy("bicgstab", rtol=2.0)
    # a dict option is kept in a hashable, static form and handed back as a dict
    solver = idf.SciPy("splu", options={"SymmetricMode": True})
    hash(solver)
    x = solve_with(solver, sparse_operator(SPD), RHS[0])
    np.testing.assert_allclose(x, np.linalg.solve(SPD.toarray(), RHS[0]), 1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_condition_estimate_shortcut(monkeypatch, dtype):
    """A matrix far from singular is certified by two solves, without Higham's
    estimates; one near the threshold still goes through them, and is refused."""
    import scipy.sparse as sp

    from implicitdiff._misc import singular_threshold
    from implicitdiff._solvers import _scipy
    from implicitdiff._solvers._host_helpers import norms_1_and_inf

    n = 2000
    laplacian = sp.diags_array([-1.0, 2.0, -1.0], offsets=[-1, 0, 1], shape=(n, n))
    well = sp.csc_matrix(laplacian + sp.eye_array(n), dtype=dtype)
    estimates = []
    original = _scipy.sla.onenormest
    monkeypatch.setattr(
        _scipy.sla,
        "onenormest",
        lambda A, *a, **k: estimates.append(1) or original(A, *a, **k),
    )
    norms = norms_1_and_inf(well.tocsr())
    assert _scipy._well_conditioned(_scipy.sla.splu(well), well.tocsr(), norms)
    assert not estimates
    # A Neumann Laplacian (singular) plus `shift·I`: κ₂ ≈ 4/shift, 8 times the
    # threshold.
    shift = 0.5 / singular_threshold(n, dtype)
    near = sp.csc_matrix(laplacian + shift * sp.eye_array(n), dtype=np.float64)
    near[0, 0] -= 1.0
    near[-1, -1] -= 1.0
    near = near.astype(dtype)
    norms = norms_1_and_inf(near.tocsr())
    assert not _scipy._well_conditioned(_scipy.sla.splu(near), near.tocsr(), norms)
    assert estimates


class _CountingLU:
    """A SuperLU factor that counts the columns it solves, and how many of them
    transposed."""

    def __init__(self, lu):
        self.lu, self.shape, self.columns, self.transposed = lu, lu.shape, 0, 0

    def solve(self, b, trans="N"):
        self.columns += 1 if b.ndim == 1 else b.shape[1]
        self.transposed += trans != "N"
        return self.lu.solve(b, trans=trans)


def test_condition_shortcut_stages(monkeypatch):
    """The shortcut solves two probe columns and one transposed column when that
    settles it, and only then two more (the transposed solve again only for a new
    column), before Higham's estimates."""
    import scipy.sparse as sp

    from implicitdiff._misc import singular_threshold
    from implicitdiff._solvers import _scipy
    from implicitdiff._solvers._host_helpers import norms_1_and_inf

    n = 500
    matrix = sp.csc_matrix(
        sp.diags_array([-1.0, 3.0, -1.0], offsets=[-1, 0, 1], shape=(n, n))
    )
    norm = max(norms_1_and_inf(matrix.tocsr()))
    threshold = singular_threshold(n, np.float64)
    lu = _CountingLU(_scipy.sla.splu(matrix))
    assert _scipy._far_below(lu, np.float64, norm, threshold)
    assert (lu.columns, lu.transposed) == (3, 1)
    # A first stage that cannot settle it: the second one does.
    monkeypatch.setattr(_scipy, "_STAGES", ((2, 1e30), (4, 7)))
    lu = _CountingLU(_scipy.sla.splu(matrix))
    assert _scipy._far_below(lu, np.float64, norm, threshold)
    assert lu.columns - lu.transposed == 4 and lu.transposed in (1, 2)
    # Neither can (κ of this matrix is about 2): Higham's estimates decide.
    monkeypatch.setattr(_scipy, "_STAGES", ((2, 1e30), (4, 1e30)))
    assert not _scipy._far_below(lu, np.float64, norm, threshold)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_splu_without_pivoting_is_refined_to_full_accuracy(dtype):
    """SuperLU options pass through: with pivoting off (`diag_pivot_thresh=0`,
    natural order) the factorisation of a well-conditioned matrix (κ₁ = 8) with a
    tiny leading pivot is unstable, and its solution, with 10⁵ times the error κ·ε
    allows, passed the √ε backward-error test. Refined, it is as accurate as Direct."""
    eps = float(jnp.finfo(dtype).eps)
    for pivot in (1e-5, 1e-9):
        M = np.array([[pivot, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 3.0]])
        solver = idf.SciPy("splu", diag_pivot_thresh=0.0, permc_spec="NATURAL")
        Md = jnp.asarray(M, dtype)
        f = idf.ImplicitFunction(
            lambda x, Md=Md: jnp.linalg.solve(Md, x),
            lambda x, y, Md=Md: Md @ y - x,
            linear_solver=solver,
            check_conditions=None,
        )
        exact = np.linalg.inv(np.asarray(Md, np.float64))
        for jacobian in (jax.jacfwd, jax.jacrev):
            J = np.asarray(jacobian(f)(jnp.ones(3, dtype)), np.float64)
            error = np.abs(J - exact).sum(0).max() / np.abs(exact).sum(0).max()
            assert error <= 100 * np.linalg.cond(M, 1) * eps, (pivot, jacobian)


@pytest.mark.parametrize("method", ["splu", "spsolve"])
def test_zero_right_hand_sides_are_solved_not_refused(method):
    """A zero tangent or cotangent, or a zero column among `jacrev`'s (an output that
    ignores part of `y`): its backward error was 0/0, NaN, refused, and the whole
    batch came back NaN with a false warning. dy/dx of √x is diag(1/(2√x))."""
    f = idf.ImplicitFunction(
        jnp.sqrt, lambda x, y: y**2 - x, linear_solver=idf.SciPy(method)
    )
    x = jnp.array([4.0, 9.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pullback = jax.vjp(f, x)[1](jnp.zeros(2))[0]
        pushforward = jax.jvp(f, (x,), (jnp.zeros(2),))[1]
        J = jax.jacrev(lambda x: jnp.stack([f(x)[0], 0.0 * f(x)[1]]))(x)
    np.testing.assert_array_equal(pullback, np.zeros(2))
    np.testing.assert_array_equal(pushforward, np.zeros(2))
    np.testing.assert_allclose(J, [[0.25, 0.0], [0.0, 0.0]], rtol=1e-12)


@pytest.mark.parametrize("method", ["bicgstab", "gmres", "cg", "qmr", "lgmres"])
def test_float32_iterative_methods_solve_moderately_conditioned_systems(method):
    # float32 BiCGStab stagnated above the default rtol = 1e-5 on this system
    # (κ ≈ 250): NaN and a warning on a well-posed problem. Solved in double
    # precision on the host now.
    from jax.experimental import sparse

    n = 40
    dense = 2.01 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    A = sparse.BCOO.fromdense(jnp.asarray(dense, jnp.float32))
    b = jnp.asarray(np.random.default_rng(0).normal(size=n), jnp.float32)
    solver = idf.SciPy(method)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = idf.linear_solve(A, b, solver)
        grad = jax.grad(lambda b: jnp.sum(idf.linear_solve(A, b, solver) ** 2))(b)
    assert x.dtype == grad.dtype == jnp.float32
    exact = np.linalg.solve(dense, np.asarray(b, np.float64))
    np.testing.assert_allclose(x, exact, rtol=1e-3, atol=1e-4 * np.abs(exact).max())
    expected = np.linalg.solve(dense.T, 2 * exact)
    np.testing.assert_allclose(grad, expected, atol=1e-3 * np.abs(expected).max())
