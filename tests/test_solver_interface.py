"""The presolve/solve interface: one presolve per linearisation point, user solvers."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import implicitdiff as idf

presolve_calls = []


class CountingDirect(idf.AbstractLinearSolver):
    """Direct, counting its presolves on the host."""

    def presolve(self, A, y):
        jax.debug.callback(lambda: presolve_calls.append(1))
        return idf.Direct().presolve(A, y)

    def solve(self, state, b):
        return idf.Direct().solve(state, b)


N_OUT = 50


def wide_problem(solver):
    # y ∈ R⁵⁰ from x ∈ R⁵⁰ through c(x, y) = M y + y³/3 − x: one linearisation point.
    M = jnp.asarray(np.random.default_rng(0).normal(size=(N_OUT, N_OUT))) / 10
    M = M + 3 * jnp.eye(N_OUT)

    def forward(x):
        def newton(_, y):
            return y - jnp.linalg.solve(M + jnp.diag(y**2), M @ y + y**3 / 3 - x)

        # A loop, not 30 unrolled steps: one LU to compile, not 30.
        return jax.lax.fori_loop(0, 30, newton, jnp.zeros_like(x))

    conditions = lambda x, y: M @ y + y**3 / 3 - x
    return idf.ImplicitFunction(forward, conditions, linear_solver=solver), M


@pytest.mark.parametrize(
    "transform",
    ["jacrev", "jacfwd", "jit-jacrev", "jit-jacfwd"],
)
def test_one_presolve_per_linearisation_point(transform):
    f, M = wide_problem(CountingDirect())
    x = jnp.linspace(-1.0, 1.0, N_OUT)
    jacobian = jax.jacrev if transform.endswith("jacrev") else jax.jacfwd
    fn = jax.jit(jacobian(f)) if transform.startswith("jit") else jacobian(f)
    presolve_calls.clear()
    result = jax.block_until_ready(fn(x))
    assert len(presolve_calls) == 1
    y = f(x)
    np.testing.assert_allclose(result, jnp.linalg.inv(M + jnp.diag(y**2)), atol=1e-10)


def test_one_presolve_per_point_under_vmap():
    f, _ = wide_problem(CountingDirect())
    xs = jnp.stack([jnp.linspace(-1.0, 1.0, N_OUT), jnp.linspace(0.0, 1.0, N_OUT)])
    presolve_calls.clear()
    jax.block_until_ready(jax.vmap(jax.jacrev(f))(xs))
    # A batched linearisation point is one batched presolve, not one per cotangent.
    assert len(presolve_calls) in (1, 2)


class Jacobi(idf.AbstractLinearSolver):
    """A user's solver, written against the public interface only."""

    steps: int = 100

    def presolve(self, A, y):
        matrix = A.as_matrix()
        return matrix, jnp.diag(matrix)

    def solve(self, state, b):
        matrix, diagonal = state
        b_flat, unflatten = jax.flatten_util.ravel_pytree(b)
        step = lambda _, x: x + (b_flat - matrix @ x) / diagonal  # noqa: E731
        x = jax.lax.fori_loop(0, self.steps, step, jnp.zeros_like(b_flat))
        residual = jnp.linalg.norm(b_flat - matrix @ x)
        converged = residual <= 1e-10 * jnp.linalg.norm(b_flat)
        return unflatten(jnp.where(converged, x, jnp.nan))


def test_user_written_solver_plugs_in():
    M = jnp.array([[4.0, 1.0, 0.0], [1.0, 5.0, 2.0], [0.0, 1.0, 3.0]])
    f = idf.ImplicitFunction(
        lambda x: jnp.linalg.solve(M, x), lambda x, y: M @ y - x, linear_solver=Jacobi()
    )
    x = jnp.array([1.0, 2.0, 3.0])
    for jacobian in (jax.jacfwd, jax.jacrev):
        np.testing.assert_allclose(
            jax.jit(jacobian(f))(x), jnp.linalg.inv(M), atol=1e-9
        )


@pytest.mark.full_optimisation
def test_user_solver_failure_becomes_nan_and_warning():
    # Not diagonally dominant: Jacobi diverges, the solver says so with NaN.
    M = jnp.array([[1.0, 3.0], [3.0, 1.0]])
    f = idf.ImplicitFunction(
        lambda x: jnp.linalg.solve(M, x), lambda x, y: M @ y - x, linear_solver=Jacobi()
    )
    with pytest.warns(RuntimeWarning, match="Jacobi did not solve"):
        result = jax.jacrev(f)(jnp.ones(2))
    assert bool(jnp.all(jnp.isnan(result)))


class PartialNaN(idf.AbstractLinearSolver):
    """A careless solver that NaNs only part of its answer."""

    def presolve(self, A, y):
        return idf.Direct().presolve(A, y)

    def solve(self, state, b):
        x = idf.Direct().solve(state, b)
        return x.at[0].set(jnp.nan)


@pytest.mark.full_optimisation
def test_partial_nan_from_a_solver_becomes_all_nan():
    f = idf.ImplicitFunction(
        jnp.sqrt, lambda x, y: y**2 - x, linear_solver=PartialNaN(), on_failure="nan"
    )
    assert bool(jnp.all(jnp.isnan(jax.jacrev(f)(jnp.ones(3)))))
