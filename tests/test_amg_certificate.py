"""AMG's regularity certificate for M-matrices (`m_matrix_is_credible`): which
matrices it proves regular, at what cost, that it never proves a singular or
numerically singular matrix regular (against NumPy's condition numbers and closed-form
inverses), and that AMG's derivatives through it match dense references in both
directions."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pyamg
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator
from sparse_problems import assert_relative_error, grid_matrix

import implicitdiff as idf
from benchmarks.sparse_pde_vjp import coefficients, jacobian_matrix
from implicitdiff._misc import singular_threshold
from implicitdiff._solvers._host_certificate import m_matrix_is_credible, watched_cg

jax.config.update("jax_enable_x64", True)


def path(n: int, grounding: float) -> sp.csr_matrix:
    """The path graph's Laplacian with node 0 grounded by `grounding` (0: singular,
    `L 1 = 0`); its condition number grows like `n/grounding`."""
    L = sp.diags_array([-1.0, 2.0, -1.0], offsets=[-1, 0, 1], shape=(n, n)).tolil()
    L[0, 0], L[-1, -1] = 1.0 + grounding, 1.0
    return sp.csr_matrix(L)


def certify(matrix, cycles=None, accel="cg", run="amg"):
    """The certificate as `AMG` runs it (`run="amg"`; with CG: the watched CG and the
    Gauss-Seidel smoothing of nearly proving iterates) or with pyamg's own
    accelerated cycles (`run="pyamg"`), on a Ruge-Stüben hierarchy; `cycles` counts
    the multigrid cycles it pays for."""
    csr = sp.csr_matrix(matrix)
    hierarchy = pyamg.ruge_stuben_solver(csr)
    preconditioner = hierarchy.aspreconditioner

    def counting_preconditioner(cycle="V"):
        M = preconditioner(cycle=cycle)

        def counted(r):
            if cycles is not None:
                cycles.append(1)
            return M.matvec(r)

        return LinearOperator(M.shape, counted, dtype=M.dtype)

    hierarchy.aspreconditioner = counting_preconditioner

    def pyamg_run(b, callback):
        return hierarchy.solve(
            b, tol=1e-10, accel=accel, maxiter=200, callback=callback
        )

    with warnings.catch_warnings(record=True):  # pyamg's, on singular matrices
        if run == "pyamg":
            return m_matrix_is_credible(csr, pyamg_run)
        return idf.AMG(accel=accel)._m_matrix_certificate(1e-10, csr, hierarchy)


@pytest.mark.full_optimisation
@pytest.mark.parametrize("size", [12, 320])  # 144 and 102 400 unknowns
def test_dirichlet_laplacian_proven_in_a_few_cycles(size):
    matrix = grid_matrix(size) - sp.eye_array(size * size)  # κ grows like size²
    cycles = []
    assert certify(matrix, cycles)
    full = []
    pyamg.ruge_stuben_solver(matrix).solve(
        np.ones(size * size), tol=1e-10, accel="cg", residuals=full
    )
    assert len(cycles) < len(full) / 2, (len(cycles), len(full))
    # conditions written with the other sign (negative definite: not for CG)
    assert certify(-matrix, accel="gmres")


@pytest.mark.parametrize("size", [64, 256])
def test_amg_certificate_pays_fewer_cycles_than_pyamgs_run(size):
    """AMG's CG looks at each iterate before its next cycle, and smooths a nearly
    proving one: fewer cycles than the same proof through pyamg's CG, on a diffusion
    operator with a coefficient contrast of 10⁴ (where the last rows to prove are
    local spikes of the residual)."""
    # sparse_pde_vjp's diffusion operator (its Jacobian at u = 0)
    matrix = jacobian_matrix(np.zeros((size, size)), *coefficients(size))
    ours, theirs = [], []
    assert certify(matrix, ours)
    assert certify(matrix, theirs, run="pyamg")
    assert len(ours) < len(theirs), (len(ours), len(theirs))


@pytest.mark.full_optimisation
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [10, 2000])
def test_watched_cg_solves_spd_systems_and_shows_every_iterate(n, dtype):
    """Against NumPy's float64 solve, Jacobi-preconditioned; every iterate reaches
    the callback, before the preconditioner is applied for the next one."""
    rng = np.random.default_rng(1)
    G = rng.normal(size=(n, n)) / np.sqrt(n)
    A = sp.csr_matrix(G @ G.T + np.diag(rng.uniform(1, 100, n)))
    b = rng.normal(size=n)
    events = []
    inverse_diagonal = (1 / A.diagonal()).astype(dtype)

    def precondition(r):
        events.append("cycle")
        return inverse_diagonal * r

    rtol = {np.float32: 1e-6, np.float64: 1e-12}[dtype]
    x = watched_cg(
        A.astype(dtype),
        precondition,
        b.astype(dtype),
        lambda x: events.append("iterate"),
        rtol,
        400,
    )
    assert x.dtype == dtype
    exact = np.linalg.solve(A.toarray(), b)
    assert np.linalg.norm(x - exact) <= 1e3 * rtol * np.linalg.norm(exact)
    assert events[:3] == ["cycle", "iterate", "cycle"]
    # stopped at convergence, with no cycle after the last iterate
    assert events[-1] == "iterate" and events.count("iterate") < 400
    assert events.count("cycle") == events.count("iterate")


def test_watched_cg_stops_on_an_indefinite_matrix():
    A = sp.csr_matrix(np.diag([1.0, -1.0]))
    iterates = []
    x = watched_cg(A, lambda r: r, np.array([1.0, 1.0]), iterates.append, 1e-10, 50)
    assert len(iterates) == 0 and np.all(x == 0)


@pytest.mark.parametrize("run", ["amg", "pyamg"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grounding_scan_never_certifies_past_the_threshold(dtype, run):
    """κ from about 10² to ∞ (exactly singular): each certified matrix has a true
    κ∞ (NumPy, from the explicit inverse) below the threshold, the singular one is
    never certified, and well-conditioned ones are."""
    n = 32
    for grounding in [1.0, 1e-2, 1e-4, 1e-6, 1e-8, 1e-10, 1e-13, 1e-16, 0.0]:
        matrix = path(n, grounding).astype(dtype)
        certified = certify(matrix, run=run)
        if grounding == 0.0:
            assert not certified
            continue
        kappa = np.linalg.cond(matrix.toarray().astype(np.float64), np.inf)
        if certified:
            assert kappa <= singular_threshold(n, dtype), (grounding, kappa)
        if kappa < 1e-3 * singular_threshold(n, dtype):
            assert certified, (grounding, kappa)


def test_not_a_z_matrix_is_left_to_the_probe():
    matrix = grid_matrix(6).tolil()
    matrix[0, 7] = matrix[7, 0] = 0.1  # one positive coupling: regular, not Z
    assert not certify(matrix)
    mixed_sign_diagonal = sp.diags_array([1.0, -1.0])
    assert not certify(mixed_sign_diagonal)


def path_conditions(grounding):
    def conditions(x, y):
        return jnp.asarray(path(8, grounding).toarray()) @ y - x

    return conditions


@pytest.mark.parametrize("matrix", ["z", "not-z"])
def test_derivatives_through_amg_match_dense(matrix):
    """jvp, jacfwd, grad and jacrev of `y = A⁻¹x` with AMG on a Sparse operator,
    certified by the M-matrix proof (a Z-matrix) or by the probe (not one), against
    NumPy's inverse."""
    A = grid_matrix(5)
    if matrix == "not-z":
        A = A.tolil()
        A[0, 6] = A[6, 0] = 0.2
        A = sp.csr_matrix(A)
    dense = jnp.asarray(A.toarray())
    f = idf.ImplicitFunction(
        lambda x: jnp.linalg.solve(dense, x),
        lambda x, y: dense @ y - x,
        linear_solver=idf.AMG(),
        representation=idf.Sparse(A),
        on_failure="raise",
    )
    x, t = jnp.linspace(-1.0, 1.0, 25), jnp.cos(jnp.arange(25.0))

    @jax.jit  # one compilation for the four transforms
    def derivatives(x, t):
        return (
            jax.jacfwd(f)(x),
            jax.jacrev(f)(x),
            jax.jvp(f, (x,), (t,))[1],
            jax.grad(lambda x: t @ f(x))(x),
        )

    inverse = np.linalg.inv(A.toarray())
    jacfwd, jacrev, jvp, grad = derivatives(x, t)
    assert_relative_error(jacfwd, inverse, 1e-9)
    assert_relative_error(jacrev, inverse, 1e-9)
    assert_relative_error(jvp, inverse @ t, 1e-9)
    assert_relative_error(grad, inverse.T @ t, 1e-9)


@pytest.mark.parametrize("grounding", [0.0, 1e-30])
def test_singular_z_matrix_is_nan_and_warns(grounding):
    """An ungrounded Laplacian (exactly singular) and one grounded by 1e-30 (κ ≈
    10³¹): all-NaN derivatives in both directions, with the warning."""
    conditions = path_conditions(grounding)
    f = idf.ImplicitFunction(
        lambda x: jnp.zeros_like(x),
        conditions,
        linear_solver=idf.AMG(),
        representation=idf.Sparse(path(8, 1.0)),
        check_conditions=None,
    )
    x = jnp.zeros(8).at[0].set(1.0)
    for derivative in (jax.jacfwd(f), jax.jacrev(f)):
        with pytest.warns(RuntimeWarning, match="did not solve"):
            J = jax.block_until_ready(derivative(x))
        assert np.all(np.isnan(J))
