"""The Krylov solvers at 10⁵ unknowns, matrix-free, against SciPy's sparse LU in
float64: a step's cost there is what small tests cannot show (XLA:CPU reduced a
GMRES basis across its rows 50× slower than a dot), and its accuracy in float32 and
float64, one right-hand side and two under `vmap`."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla

import implicitdiff as idf

# Large sizes: compiled as users compile them (conftest.py).
pytestmark = pytest.mark.full_optimisation

jax.config.update("jax_enable_x64", True)

N = 100_000
SHIFT = 0.3  # κ₂ = (4 + SHIFT)/SHIFT ≈ 14: a few dozen steps
RHS = np.random.default_rng(0).normal(size=(2, N))


def periodic_laplacian(v):
    return (2 + SHIFT) * v - jnp.roll(v, 1) - jnp.roll(v, -1)


def reference(b):
    off = -np.ones(N - 1)
    matrix = sp.diags([off, np.full(N, 2 + SHIFT), off], [-1, 0, 1], format="lil")
    matrix[0, N - 1] = matrix[N - 1, 0] = -1
    return sla.spsolve(matrix.tocsc(), b)


# GMRES, whose basis products changed for speed at this size, in both dtypes; CG and
# BiCGStab once each.
@pytest.mark.parametrize(
    "solver, dtype, rtol",
    [
        (idf.GMRES(), jnp.float64, 1e-10),
        (idf.GMRES(), jnp.float32, 1e-5),
        (idf.CG(), jnp.float32, 1e-5),
        (idf.BiCGStab(), jnp.float64, 1e-10),
    ],
    ids=["gmres-float64", "gmres-float32", "cg-float32", "bicgstab-float64"],
)
def test_large_matrix_free_solve_against_scipy(solver, dtype, rtol):
    A = lx.FunctionLinearOperator(periodic_laplacian, jax.ShapeDtypeStruct((N,), dtype))

    @jax.jit
    def solve(rhs):
        state = solver.presolve(A, A.in_structure())
        return solver.solve(state, rhs[0]), jax.vmap(lambda b: solver.solve(state, b))(
            rhs
        )

    one, both = solve(jnp.asarray(RHS, dtype))
    expected = np.stack([reference(b) for b in RHS])
    # The residual is below rtol·‖b‖, so the error is below κ₂·rtol relative.
    tol = 20 * rtol * np.linalg.norm(expected[0])
    assert np.linalg.norm(np.asarray(one, np.float64) - expected[0]) <= tol
    for actual, wanted in zip(np.asarray(both, np.float64), expected, strict=True):
        assert np.linalg.norm(actual - wanted) <= tol
