"""CG, GMRES, BiCGStab, LeastSquares and the Jacobi preconditioner: directly against
dense NumPy solves, on their failure cases, and through ImplicitFunction against
analytic derivatives."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import (
    ridge_conditions,
    ridge_data,
    ridge_dw_dlam,
    ridge_solution,
    sqrt_conditions,
    sqrt_jacobian,
    stacked_sqrt,
    stacked_sqrt_conditions,
    stacked_sqrt_jacobian,
)

import implicitdiff as idf
from implicitdiff import _solve_log
from implicitdiff._misc import ravel, unravel
from implicitdiff._solvers import _least_squares as least_squares_module

jax.config.update("jax_enable_x64", True)

N = 6
RNG = np.random.default_rng(0)
_M = RNG.normal(size=(N, N))
# Rows of very different scales, so that Jacobi has something to do.
_SCALE = np.diag(np.logspace(0, 2, N))
SPD = _SCALE @ (_M @ _M.T + N * np.eye(N)) @ _SCALE
NONSYMMETRIC = _SCALE @ (_M + 4 * np.eye(N))
RHS = RNG.normal(size=(3, N))
# Under vmap: ordinary rows, a zero row (zeros out) and non-finite rows (NaN out).
SPECIAL_ROWS = np.array(
    [np.zeros(N), np.r_[np.nan, np.ones(N - 1)], np.full(N, np.inf)]
)
DICT_STRUCTURE = {
    "a": jax.ShapeDtypeStruct((2,), jnp.float64),
    "b": jax.ShapeDtypeStruct((2, 2), jnp.float64),
}

SOLVERS = {
    "cg": (idf.CG, SPD),
    # restart < N: convergence takes ~100 steps in ~35 restarts.
    "gmres": (
        lambda **kw: idf.GMRES(restart=3, **{"max_steps": 500, **kw}),
        NONSYMMETRIC,
    ),
    "bicgstab": (idf.BiCGStab, NONSYMMETRIC),
}


def _dict_matvec(matrix, v):
    flat = jnp.concatenate([v["a"], v["b"].ravel()])
    out = matrix @ flat
    return {"a": out[:2], "b": out[2:].reshape(2, 2)}


def operator(matrix, layout):
    """The matrix as a lineax operator: on a vector, matrix-free on a dict, or tagged
    symmetric positive semi-definite as LeastSquares receives it."""
    if layout == "matrix":
        return lx.MatrixLinearOperator(matrix)
    if layout == "normal":
        return lx.TaggedLinearOperator(
            lx.MatrixLinearOperator(matrix),
            (lx.symmetric_tag, lx.positive_semidefinite_tag),
        )
    structure = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, matrix.dtype), DICT_STRUCTURE
    )
    return lx.FunctionLinearOperator(lambda v: _dict_matvec(matrix, v), structure)


@eqx.filter_jit
def solve_rows(solver, matrix, rhs, layout):
    """Solves A x = b for every row b of `rhs`, under vmap, on flat vectors.

    The operator is built inside the jit, so that a call with the same solver, shapes
    and layout reuses the compiled solve (a lineax FunctionLinearOperator would not
    hash equal). Pass every argument positionally, always: the cache key depends on
    it.
    """
    A = operator(matrix, layout)
    state = solver.presolve(A, A.in_structure())
    solve = lambda b: ravel(solver.solve(state, unravel(b, A.out_structure())))
    return jax.vmap(solve)(rhs)


def assert_close(actual, expected, tol):
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol
    )


def assert_all_nan(x):
    assert np.all(np.isnan(np.asarray(x)))


# (preconditioner, dtype, layout): each value of each, in three runs.
CONFIGS = [
    (None, jnp.float64, "dict"),
    (idf.Jacobi(), jnp.float64, "matrix"),
    (idf.Jacobi(), jnp.float32, "dict"),
]


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize(
    "preconditioner, dtype, layout",
    CONFIGS,
    ids=["f64-dict", "f64-jacobi-matrix", "f32-jacobi-dict"],
)
@pytest.mark.full_optimisation
def test_solves_like_numpy(name, preconditioner, dtype, layout):
    make, matrix = SOLVERS[name]
    solver = make(preconditioner=preconditioner)
    rhs = jnp.asarray(np.concatenate([RHS, SPECIAL_ROWS]), dtype)
    x = solve_rows(solver, jnp.asarray(matrix, dtype), rhs, layout)
    assert x.dtype == dtype
    # The default rtol (1e-10 / 1e-5) bounds the residual; the error is within κ times.
    tol = 1e-8 if dtype == jnp.float64 else 2e-3
    expected = np.linalg.solve(matrix, RHS.T).T
    scale = np.abs(expected).max()
    assert_close(x[:3] / scale, expected / scale, tol)
    assert np.all(np.asarray(x[3]) == 0)
    assert_all_nan(x[4:])


# The failure cases reuse the compiled f64-dict solves above: same solver, same shapes.


def solve_f64_dict(solver, matrix, rhs=RHS):
    rhs = np.concatenate([rhs, SPECIAL_ROWS])
    return solve_rows(solver, jnp.asarray(matrix), jnp.asarray(rhs), "dict")


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.full_optimisation
def test_singular_matrix_gives_nan(name):
    make, matrix = SOLVERS[name]
    singular = matrix.copy()
    singular[:, 0] = 0
    singular[0, :] = 0
    # b has a component outside the range of the matrix: no solution at all.
    assert_all_nan(solve_f64_dict(make(), singular)[:3])


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.full_optimisation
def test_too_few_steps_gives_nan(name):
    # With the default max_steps the same system is solved (test_solves_like_numpy).
    make, matrix = SOLVERS[name]
    assert_all_nan(solve_f64_dict(make(max_steps=1), matrix)[:3])


@pytest.mark.full_optimisation
def test_breakdown_gives_nan_not_garbage():
    # Symmetric indefinite: pᵀAp = 0 at the first CG step for b = (1, …, 1). GMRES
    # solves the same system.
    indefinite = np.diag(np.tile([1.0, -1.0], N // 2))
    rhs = np.ones((3, N))
    assert_all_nan(solve_f64_dict(SOLVERS["cg"][0](), indefinite, rhs)[:3])
    x = solve_f64_dict(SOLVERS["gmres"][0](), indefinite, rhs)
    assert_close(x[:3], np.linalg.solve(indefinite, rhs.T).T, 1e-10)


@pytest.mark.parametrize(
    "solver, steps",
    [(idf.CG(), 2), (idf.GMRES(), 2), (idf.BiCGStab(), 2)],
    ids=["cg", "gmres", "bicgstab"],
)
def test_iteration_count_is_reported(monkeypatch, solver, steps):
    # Two distinct eigenvalues: a Krylov space of dimension 2 holds the solution,
    # reached by CG and GMRES in two steps, by BiCGStab once its BiCG polynomial
    # (one degree per step) vanishes on both eigenvalues.
    noted = []
    monkeypatch.setattr(
        _solve_log, "report_solve", lambda **report: noted.append(report["iterations"])
    )
    A = lx.MatrixLinearOperator(jnp.diag(jnp.array([1.0, 1.0, 3.0, 3.0])))
    x = solver.solve(solver.presolve(A, A.in_structure()), jnp.arange(1.0, 5.0))
    assert_close(x, jnp.arange(1.0, 5.0) / jnp.array([1.0, 1.0, 3.0, 3.0]), 1e-12)
    assert [int(n) for n in noted] == [steps]


def test_mixed_precision_pytree_uses_the_coarser_default_tolerance():
    # The float32 leaf limits the attainable residual to ~1e-7: float64's default
    # rtol (1e-10) could never pass, float32's (1e-5) does.
    matrix = jnp.asarray(SPD[:3, :3] / SPD[2, 2])
    structure = {
        "a": jax.ShapeDtypeStruct((1,), jnp.float32),
        "b": jax.ShapeDtypeStruct((2,), jnp.float64),
    }

    def matvec(v):
        out = matrix @ ravel(v)
        return {"a": out[:1].astype(jnp.float32), "b": out[1:]}

    A = lx.FunctionLinearOperator(matvec, structure)
    b = {"a": jnp.ones(1, jnp.float32), "b": jnp.array([2.0, -1.0])}
    x = idf.CG().solve(idf.CG().presolve(A, structure), b)
    assert x["a"].dtype == jnp.float32 and x["b"].dtype == jnp.float64
    expected = np.linalg.solve(np.asarray(matrix), [1.0, 2.0, -1.0])
    assert_close(ravel(x), expected, 1e-4)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: idf.CG(rtol=-1.0), "rtol"),
        (lambda: idf.CG(rtol=1.0), "rtol"),
        (lambda: idf.BiCGStab(atol=-1e-3), "atol"),
        (lambda: idf.BiCGStab(rtol=0.0, atol=0.0), "both be zero"),
        (lambda: idf.GMRES(rtol="tight"), "rtol"),
        (lambda: idf.GMRES(restart=0), "restart"),
        (lambda: idf.GMRES(restart=2.5), "restart"),
        (lambda: idf.CG(max_steps=0), "max_steps"),
        (lambda: idf.GMRES(preconditioner=lx.LU()), "preconditioner"),
        (lambda: idf.LeastSquares(method="qr"), "method"),
        (lambda: idf.LeastSquares(max_steps=True), "max_steps"),
    ],
)
def test_invalid_arguments_are_rejected(make, message):
    with pytest.raises((TypeError, ValueError), match=message):
        make()


def test_non_square_operator_is_rejected():
    A = lx.MatrixLinearOperator(jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="square"):
        idf.GMRES().presolve(A, A.in_structure())


# Through ImplicitFunction: every transform, compared with analytic derivatives
# (the closed form differentiated by JAX).

X = jnp.array([1.0, 2.0, 3.0])
X_DATA, TARGETS = ridge_data()
LAMBDA = 0.7


def implicit(forward, conditions, solver):
    return idf.ImplicitFunction(forward, conditions, solver, on_failure="nan")


def jacobians(f, x):
    """jacfwd and jacrev of f at x, compiled together."""
    return jax.jit(lambda x: (jax.jacfwd(f)(x), jax.jacrev(f)(x)))(x)


def transforms(f, reference, x):
    """jvp, hessian (jacfwd of jacrev) and vmap of grad of f, compiled together, and
    of its closed form. (Plain jacfwd and jacrev: in the tests below.)"""
    weights = jnp.arange(1.0, 1.0 + reference(x).size)
    loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x)) * weights)  # noqa: E731

    def apply(f, x):
        return {
            "jvp": jax.jvp(f, (x,), (jnp.ones_like(x),))[1],
            "hessian": jax.hessian(loss(f))(x),
            "vmap-grad": jax.vmap(jax.grad(loss(f)))(jnp.stack([x, 1.5 * x])),
        }

    return jax.jit(lambda x: apply(f, x))(x), apply(reference, x)


def ridge_in_lambda(lam):
    return ridge_solution(lam, X_DATA, TARGETS)


# CG only where ∂c/∂y is symmetric positive definite: ridge's XᵀX + λI.
TRANSFORMS = {
    # The closed form as forward: the implicit rule never differentiates it. The
    # data are constants here, only λ is differentiated.
    "cg-ridge": (
        implicit(
            ridge_in_lambda,
            lambda lam, w: ridge_conditions(lam, w, X_DATA, TARGETS),
            idf.CG(),
        ),
        ridge_in_lambda,
        jnp.asarray(LAMBDA),
    ),
    "gmres-nonsymmetric": (
        implicit(stacked_sqrt, stacked_sqrt_conditions, idf.GMRES()),
        stacked_sqrt,
        X,
    ),
    "bicgstab-nonsymmetric": (
        implicit(stacked_sqrt, stacked_sqrt_conditions, idf.BiCGStab()),
        stacked_sqrt,
        X,
    ),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transforms(name):
    f, reference, x = TRANSFORMS[name]
    actual, expected = transforms(f, reference, x)
    analytic = (
        ridge_dw_dlam(LAMBDA, X_DATA, TARGETS)
        if name.endswith("ridge")
        else stacked_sqrt_jacobian(X) @ jnp.ones(3)
    )
    assert_close(actual["jvp"], analytic, 1e-8)
    for transform in expected:
        assert_close(actual[transform], expected[transform], 1e-7)


def test_cg_sqrt_jacobians():
    # ∂c/∂y = diag(2y): symmetric positive definite.
    sqrt = implicit(jnp.sqrt, sqrt_conditions, idf.CG())
    x = jnp.array([1.0, 4.0, 9.0, 2.0])
    for jacobian in jacobians(sqrt, x):
        assert_close(jacobian, sqrt_jacobian(x), 1e-9)


@pytest.mark.parametrize(
    "name, preconditioner",
    [("cg", None), ("gmres", idf.Jacobi()), ("bicgstab", None)],
    ids=["cg", "gmres-jacobi", "bicgstab"],
)
def test_linear_conditions_jacobians(name, preconditioner):
    # Linear conditions M y = x: dy/dx = M⁻¹, with the badly scaled rows of M. (The
    # preconditioner code is shared: one solver checks it through the implicit rule,
    # where the VJP presolves it on Mᵀ.)
    make, matrix = SOLVERS[name]
    M = jnp.asarray(matrix)
    f = implicit(
        lambda x: jnp.linalg.solve(M, x),
        lambda x, y: M @ y - x,
        make(preconditioner=preconditioner),
    )
    inverse = np.linalg.inv(matrix)
    scale = np.abs(inverse).max()
    for jacobian in jacobians(f, jnp.asarray(RHS[0])):
        assert_close(jacobian / scale, inverse / scale, 1e-8)


# LeastSquares: more conditions than unknowns.

TALL = jnp.asarray(RNG.normal(size=(7, 3)))
TALL_RANK_2 = TALL.at[:, 2].set(TALL[:, 0] + TALL[:, 1])


def tall_conditions(matrix):
    # Seven consistent conditions on three unknowns: y = √x solves them all.
    return lambda x, y: matrix @ (y**2 - x)


def stacked_twice(x, y):
    return jnp.concatenate([y**2 - x, 2 * (y**2 - x)])


@pytest.mark.parametrize(
    "method, conditions",
    [
        ("cholesky", tall_conditions(TALL)),
        ("cg", tall_conditions(TALL)),
        ("auto", stacked_twice),
    ],
    ids=["cholesky-tall", "cg-tall", "auto-stacked-twice"],
)
def test_least_squares_overdetermined(method, conditions):
    f = implicit(jnp.sqrt, conditions, idf.LeastSquares(method))
    for jacobian in jacobians(f, X):
        assert_close(jacobian, sqrt_jacobian(X), 1e-8)


@pytest.mark.full_optimisation
def test_least_squares_rank_deficient_cholesky_gives_nan():
    conditions = tall_conditions(TALL_RANK_2)
    f = implicit(jnp.sqrt, conditions, idf.LeastSquares("cholesky"))
    for jacobian in jacobians(f, X):
        assert_all_nan(jacobian)


def test_least_squares_square_system_equals_direct():
    direct = implicit(stacked_sqrt, stacked_sqrt_conditions, idf.Direct())
    f = implicit(stacked_sqrt, stacked_sqrt_conditions, idf.LeastSquares("cg"))
    for actual, expected in zip(jacobians(f, X), jacobians(direct, X), strict=True):
        assert_close(actual, expected, 1e-8)


@pytest.mark.parametrize("method", ["cholesky", "cg", "auto"])
@pytest.mark.full_optimisation
def test_least_squares_directly_on_a_normal_matrix(method):
    normal = NONSYMMETRIC.T @ NONSYMMETRIC
    rhs = jnp.asarray(np.concatenate([RHS, SPECIAL_ROWS]))
    x = solve_rows(idf.LeastSquares(method), jnp.asarray(normal), rhs, "normal")
    expected = np.linalg.solve(normal, RHS.T).T
    scale = np.abs(expected).max()
    assert_close(x[:3] / scale, expected / scale, 1e-8)
    assert np.all(np.asarray(x[3]) == 0)
    assert_all_nan(x[4:])


@pytest.mark.parametrize("n, iterative", [(4, False), (5, True)])
def test_least_squares_auto_switches_to_cg_above_the_size_limit(
    monkeypatch, n, iterative
):
    # The limit (1024 unknowns) lowered to 4 to keep the test small. Only CG reports
    # an iteration count.
    monkeypatch.setattr(least_squares_module, "CHOLESKY_MAX_SIZE", 4)
    noted = []
    report = lambda **kwargs: noted.append(kwargs.get("iterations"))  # noqa: E731
    monkeypatch.setattr(_solve_log, "report_solve", report)
    diagonal = 1.0 + jnp.arange(n) % 3
    A = lx.TaggedLinearOperator(
        lx.DiagonalLinearOperator(diagonal),
        (lx.symmetric_tag, lx.positive_semidefinite_tag),
    )
    solver = idf.LeastSquares()
    x = solver.solve(solver.presolve(A, A.in_structure()), jnp.ones(n))
    assert_close(x, 1 / diagonal, 1e-10)
    assert any(n is not None for n in noted) == iterative


def _exponential_fit(noise: float, seed: int = 0):
    """A nonlinear least-squares fit `y = argmin ½‖a·exp(−k t) − x‖²` with a
    residual, and its exact derivative from the stationarity of `½‖c‖²` (second
    order included), at a minimiser found by Gauss-Newton to rounding."""
    t = jnp.linspace(0.0, 3.0, 8)
    conditions = lambda x, y: y[0] * jnp.exp(-y[1] * t) - x

    def forward(x):
        y = jnp.array([1.0, 0.5])
        for _ in range(60):  # Gauss-Newton, unrolled
            J = jax.jacobian(conditions, 1)(x, y)
            y = y - jnp.linalg.lstsq(J, conditions(x, y))[0]
        return y

    def exact(x):
        y = forward(x)
        stationary = lambda x, y: jax.grad(
            lambda y: 0.5 * jnp.sum(conditions(x, y) ** 2)
        )(y)
        H = jax.jacobian(stationary, 1)(x, y)
        return -jnp.linalg.solve(H, jax.jacobian(stationary, 0)(x, y))

    rng = np.random.default_rng(seed)
    x = 2.0 * jnp.exp(-0.7 * t) + noise * jnp.asarray(rng.normal(size=8))
    return forward, conditions, x, exact(x)


@pytest.mark.parametrize("method", ["cholesky", "cg"])
@pytest.mark.parametrize("jacobian", [jax.jacfwd, jax.jacrev])
@pytest.mark.parametrize("noise", [0.0, 0.05, 0.3])
def test_least_squares_fit_with_a_residual_differentiates_the_minimiser(
    method, jacobian, noise
):
    # With a residual, the Gauss-Newton derivative (the normal equations alone)
    # was off by about its relative size, silently: 0.6 % at 5 % noise, a factor 3
    # on min (y − x₀)² + (y² − x₁)². The residual's curvature is now included.
    forward, conditions, x, expected = _exponential_fit(noise)
    solver = idf.LeastSquares(method=method, rtol=1e-12, atol=0.0)
    f = idf.ImplicitFunction(
        forward, conditions, linear_solver=solver, check_conditions=None
    )
    np.testing.assert_allclose(jax.jit(jacobian(f))(x), expected, rtol=1e-7, atol=1e-9)


def test_least_squares_residual_curvature_of_a_scalar_fit():
    # min (y − x₀)² + (y² − x₁)² at x = (0, −1): y = 0, c = (0, 1), dy/dx₀ = 1/3 (not
    # the Gauss-Newton 1), also with the default check passing conditions scaled
    # down.
    conditions = lambda x, y: jnp.stack([y[0] - x[0], y[0] ** 2 - x[1]])
    x = jnp.array([0.0, -1.0])
    for scale, check in ((1.0, None), (1e-4, 1e-3)):
        f = idf.ImplicitFunction(
            lambda x: jnp.zeros(1),
            lambda x, y: scale * conditions(x, y),
            linear_solver=idf.LeastSquares(),
            check_conditions=check,
        )
        for jacobian in (jax.jacfwd, jax.jacrev):
            np.testing.assert_allclose(jacobian(f)(x), [[1 / 3, 0.0]], atol=1e-12)


def test_least_squares_complex_fit_with_a_residual_is_refused():
    # Not complex-differentiable (the minimiser depends on conj(ẏ)): NaN and told.
    conditions = lambda x, y: jnp.stack([y[0] - x[0], y[0] ** 2 - x[1]])
    f = idf.ImplicitFunction(
        lambda x: jnp.zeros(1, complex),
        conditions,
        linear_solver=idf.LeastSquares(),
        check_conditions=None,
    )
    x = jnp.array([0.0, -1.0], complex)
    with pytest.warns(RuntimeWarning, match="not complex-differentiable"):
        tangent = jax.jvp(f, (x,), (jnp.array([1.0, 0.0], complex),))[1]
    assert bool(jnp.all(jnp.isnan(tangent)))


@pytest.mark.parametrize("solver_type", [idf.CG, idf.GMRES, idf.BiCGStab])
def test_a_preconditioner_of_the_wrong_shape_is_named(solver_type):
    class Truncating(idf.AbstractPreconditioner):
        def presolve(self, A, y):
            return None

        def apply(self, state, r):
            return r[:-1]

    f = idf.ImplicitFunction(
        jnp.sqrt,
        lambda x, y: y**2 - x + 0 * y[::-1],
        linear_solver=solver_type(preconditioner=Truncating()),
    )
    with pytest.raises(TypeError, match="Truncating.apply returned"):
        jax.jacrev(f)(jnp.ones(4))
