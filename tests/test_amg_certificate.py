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
from sparse_problems import assert_relative_error, grid_matrix

import implicitdiff as idf
from implicitdiff._misc import singular_threshold
from implicitdiff._solvers._host_certificate import m_matrix_is_credible

jax.config.update("jax_enable_x64", True)


def path(n: int, grounding: float) -> sp.csr_matrix:
    """The path graph's Laplacian with node 0 grounded by `grounding` (0: singular,
    `L 1 = 0`); its condition number grows like `n/grounding`."""
    L = sp.diags_array([-1.0, 2.0, -1.0], offsets=[-1, 0, 1], shape=(n, n)).tolil()
    L[0, 0], L[-1, -1] = 1.0 + grounding, 1.0
    return sp.csr_matrix(L)


def certify(matrix, counter=None, accel="cg"):
    """The certificate with pyamg's accelerated Ruge-Stüben cycles (CG: AMG's
    default), counting the iterates it looks at."""
    hierarchy = pyamg.ruge_stuben_solver(sp.csr_matrix(matrix))

    def run(b, callback):
        def counted(x):
            if counter is not None:
                counter.append(1)
            callback(x)

        return hierarchy.solve(b, tol=1e-10, accel=accel, maxiter=200, callback=counted)

    with warnings.catch_warnings(record=True):  # pyamg's, on singular matrices
        return m_matrix_is_credible(sp.csr_matrix(matrix), run)


@pytest.mark.parametrize("size", [12, 320])  # 144 and 102 400 unknowns
def test_dirichlet_laplacian_proven_in_a_few_cycles(size):
    matrix = grid_matrix(size) - sp.eye_array(size * size)  # κ grows like size²
    steps = []
    assert certify(matrix, steps)
    full = []
    pyamg.ruge_stuben_solver(matrix).solve(
        np.ones(size * size), tol=1e-10, accel="cg", residuals=full
    )
    assert len(steps) < len(full) / 2, (len(steps), len(full))
    # conditions written with the other sign (negative definite: not for CG)
    assert certify(-matrix, accel="gmres")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grounding_scan_never_certifies_past_the_threshold(dtype):
    """κ from about 10² to ∞ (exactly singular): each certified matrix has a true
    κ∞ (NumPy, from the explicit inverse) below the threshold, the singular one is
    never certified, and well-conditioned ones are."""
    n = 32
    for grounding in [1.0, 1e-2, 1e-4, 1e-6, 1e-8, 1e-10, 1e-13, 1e-16, 0.0]:
        matrix = path(n, grounding).astype(dtype)
        certified = certify(matrix)
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
