"""Small sparse test problems, shared by the tests of the host-side sparse solvers."""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax.experimental import sparse as jsparse

import implicitdiff as idf
from implicitdiff._sparse._operator import SparseLinearOperator, SparsityPattern


def grid_matrix(n: int, convection: float = 0.0) -> sp.csr_matrix:
    """The 5-point Laplacian on an n×n grid plus the identity: SPD when `convection`
    is 0, non-symmetric otherwise (an upwind-like first-order term)."""
    one_d = sp.diags_array([-1.0, 2.0, -1.0], offsets=[-1, 0, 1], shape=(n, n))
    drift = sp.diags_array([-convection, convection], offsets=[-1, 0], shape=(n, n))
    eye = sp.eye_array(n)
    matrix = sp.kron(one_d + drift, eye) + sp.kron(eye, one_d) + sp.eye_array(n * n)
    return sp.csr_matrix(matrix)


def sparse_operator(matrix: sp.csr_matrix) -> SparseLinearOperator:
    pattern = SparsityPattern.of(matrix)
    data = np.asarray(matrix[pattern.rows, pattern.cols]).ravel()
    return SparseLinearOperator(jnp.asarray(data), pattern)


class CubicProblem:
    """y(x) solving K y + y³/10 = x for a sparse K; dy/dx = (K + 0.3 diag(y²))⁻¹."""

    def __init__(self, matrix: sp.csr_matrix):
        self.matrix = matrix
        self.dense = jnp.asarray(matrix.toarray())
        self.representation = idf.Sparse(matrix)

    def conditions(self, x, y):
        return self.dense @ y + 0.1 * y**3 - x

    def forward(self, x):
        return _newton(self.dense, x)

    def jacobian(self, x):
        y = self.forward(x)
        return jnp.linalg.inv(self.dense + 0.3 * jnp.diag(y**2))

    def implicit(self, solver, **kwargs):
        return idf.ImplicitFunction(
            self.forward,
            self.conditions,
            solver,
            representation=self.representation,
            **kwargs,
        )


def assert_relative_error(actual, expected, tol):
    """Norm-wise relative error, the measure an iterative solver's tolerance bounds
    (entry-wise comparison would hold tiny entries to a tolerance meant for ‖x‖)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert not np.any(np.isnan(actual)), "NaN in the result"
    error = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert error <= tol, f"relative error {error:.2e} > {tol:.0e}"


@jax.jit
def _newton(dense, x):
    def step(_, y):  # from 0, converges to round-off for |x| ≲ 10
        residual = dense @ y + 0.1 * y**3 - x
        return y - jnp.linalg.solve(dense + 0.3 * jnp.diag(y**2), residual)

    return jax.lax.fori_loop(0, 25, step, jnp.zeros_like(x))


def linear_solve_loss(solver, matrix):
    """`(values, b) ↦ Σ sin(A⁻¹ b)` through `implicitdiff.linear_solve` with A a BCOO
    of `matrix`'s pattern, and the same loss with a dense JAX solve (the reference,
    differentiated by JAX)."""
    coo = matrix.tocoo()
    indices = np.stack([coo.row, coo.col], axis=1)

    def sparse_loss(values, b):
        A = jsparse.BCOO((values, indices), shape=matrix.shape)
        return jnp.sum(jnp.sin(idf.linear_solve(A, b, solver)))

    def dense_loss(values, b):
        A = jnp.zeros(matrix.shape).at[coo.row, coo.col].add(values)
        return jnp.sum(jnp.sin(jnp.linalg.solve(A, b)))

    return sparse_loss, dense_loss, jnp.asarray(coo.data)


def check_implicit_derivatives(solver, matrix, rng):
    """jacrev, jacfwd and vmap(grad) of the cubic problem with `solver`, under one jit,
    against the analytic Jacobian."""
    problem = CubicProblem(matrix)
    f = problem.implicit(solver, on_failure="raise")
    x = jnp.linspace(-2.0, 3.0, 16)
    xs = jnp.stack([x, 0.5 * x])
    weights = jnp.asarray(rng.normal(size=16))
    grad = jax.grad(lambda x: weights @ f(x))

    @jax.jit  # one compilation for the three transforms
    def derivatives(x, xs):
        return jax.jacrev(f)(x), jax.jacfwd(f)(x), jax.vmap(grad)(xs)

    jacrev, jacfwd, grads = derivatives(x, xs)
    assert_relative_error(jacrev, problem.jacobian(x), 1e-8)
    assert_relative_error(jacfwd, problem.jacobian(x), 1e-8)
    for grad_i, x_i in zip(grads, xs, strict=True):
        assert_relative_error(grad_i, weights @ problem.jacobian(x_i), 1e-8)
