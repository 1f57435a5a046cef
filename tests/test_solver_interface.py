"""The presolve/solve interface: one presolve per linearisation point, user solvers."""

import warnings

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


class FewSweeps(idf.AbstractLinearSolver):
    """A careless solver: three Jacobi sweeps, no convergence test."""

    def presolve(self, A, y):
        return A.as_matrix()

    def solve(self, state, b):
        x = jnp.zeros_like(b)
        for _ in range(3):
            x = x + (b - state @ x) / jnp.diag(state)
        return x


class WithTranspose(idf.AbstractLinearSolver):
    """A wrong solver: it solves with Aᵀ."""

    def presolve(self, A, y):
        return A.as_matrix()

    def solve(self, state, b):
        return jnp.linalg.solve(state.T, b)


class Exact(idf.AbstractLinearSolver):
    def presolve(self, A, y):
        return A.as_matrix()

    def solve(self, state, b):
        return jnp.linalg.solve(state, b)


class ReturnsB(idf.AbstractLinearSolver):
    def presolve(self, A, y):
        return None

    def solve(self, state, b):
        return b


class WrongShape(idf.AbstractLinearSolver):
    def presolve(self, A, y):
        return None

    def solve(self, state, b):
        return b[:-1]


class OnePercentOff(Exact):
    """A wrong solver (1 % off) that claims a far too large `‖A‖`, which loosened
    the backward-error test enough to pass it."""

    def solve(self, state, b):
        return 1.01 * jnp.linalg.solve(state, b)

    def norm_bound(self, state, A):
        return 1e3 * jnp.sum(jnp.abs(state))


class FloatCertificate(Exact):
    def certify(self, state, A):
        return jnp.ones(3)


@pytest.mark.parametrize(
    "solver", [FewSweeps(), WithTranspose(), ReturnsB(), OnePercentOff()]
)
@pytest.mark.parametrize("jacobian", [jax.jacfwd, jax.jacrev])
def test_finite_wrong_answers_of_a_user_solver_are_refused(solver, jacobian):
    """A user's solver that breaks the contract (a finite answer when it did not
    solve) gave a finite wrong derivative: each solution's backward error is checked
    now, and the derivative is NaN with the warning naming the solver."""
    M = jnp.array([[4.0, 1.0, 0.5], [0.5, 3.0, 1.0], [1.0, 0.5, 2.0]])
    f = idf.ImplicitFunction(
        lambda x: jnp.linalg.solve(M, x), lambda x, y: M @ y - x, linear_solver=solver
    )
    with pytest.warns(RuntimeWarning, match=f"{type(solver).__name__} did not solve"):
        J = jacobian(f)(jnp.ones(3))
    assert np.isnan(J).all()
    # A right solution of the same system passes (float32 too: ε^¼ of its dtype).
    for dtype in (jnp.float64, jnp.float32):
        g = idf.ImplicitFunction(
            lambda x: jnp.linalg.solve(M.astype(dtype), x),
            lambda x, y: M.astype(dtype) @ y - x,
            linear_solver=Exact(),
        )
        np.testing.assert_allclose(
            jacobian(g)(jnp.ones(3, dtype)), np.linalg.inv(M), rtol=1e-5, atol=1e-6
        )


def test_a_solution_of_the_wrong_shape_names_the_solver():
    f = idf.ImplicitFunction(
        jnp.sqrt, lambda x, y: y**2 - x + 0 * y[::-1], linear_solver=WrongShape()
    )
    with pytest.raises(TypeError, match="WrongShape.solve returned"):
        jax.jacfwd(f)(jnp.ones(3))


@pytest.mark.full_optimisation
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("n", [10, 100_000])
def test_a_user_solver_returning_b_is_refused_at_every_size(n, dtype):
    """The backward-error check of a user's solver, at a size where XLA:CPU's max
    drops NaN, in both directions and both dtypes; an exact user solver passes."""

    class Halves(idf.AbstractLinearSolver):
        def presolve(self, A, y):
            return None

        def solve(self, state, b):
            return b / 2

    x = jnp.linspace(1.0, 2.0, n, dtype=dtype)
    for solver, refused in ((ReturnsB(), True), (Halves(), False)):
        f = idf.ImplicitFunction(lambda x: x / 2, lambda x, y: 2 * y - x, solver)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grad = jax.grad(lambda x: f(x).sum())(x)
            tangent = jax.jvp(f, (x,), (jnp.ones_like(x),))[1]
        told = [w for w in caught if "did not solve" in str(w.message)]
        for value in (grad, tangent):
            if refused:
                assert np.isnan(value).all()
            else:
                np.testing.assert_allclose(value, 0.5, rtol=1e-6)
        assert len(told) == (2 if refused else 0)


def test_a_certificate_that_is_not_a_boolean_scalar_names_the_solver():
    f = idf.ImplicitFunction(
        jnp.sqrt, lambda x, y: y**2 - x + 0 * y[::-1], linear_solver=FloatCertificate()
    )
    with pytest.raises(TypeError, match="FloatCertificate.certify must return"):
        jax.jacfwd(f)(jnp.ones(3))
