"""Singular systems: all-NaN derivatives, and the nan / warn / raise policies."""

import sys
import warnings

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import implicitdiff as idf

SOLVERS = [idf.Direct(), idf.Lineax(lx.LU()), idf.Auto()]


def singular_sqrt(linear_solver, on_failure, **kwargs):
    # At x = 0, y = 0 and A = ∂(y² − x)/∂y = 2y = 0: the derivative does not exist.
    return idf.ImplicitFunction(
        jnp.sqrt,
        lambda x, y: y**2 - x,
        linear_solver=linear_solver,
        on_failure=on_failure,
        **kwargs,
    )


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("jacobian", [jax.jacfwd, jax.jacrev], ids=["jacfwd", "jacrev"])
def test_nan_policy_gives_all_nan_silently(solver, jacobian):
    f = singular_sqrt(solver, "nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = jax.jit(jacobian(f))(jnp.zeros(3))
    assert result.shape == (3, 3) and bool(jnp.all(jnp.isnan(result)))


def test_nan_policy_keeps_float32():
    f = singular_sqrt(idf.Direct(), "nan")
    result = jax.jacrev(f)(jnp.zeros(2, dtype=jnp.float32))
    assert result.dtype == jnp.float32 and bool(jnp.all(jnp.isnan(result)))


def test_singular_without_exact_zero_pivot_is_nan():
    # A = [[1, 1], [1, 1 + 1e-17]] is singular in float64 without a zero pivot after
    # rounding; a finite answer would be wrong by orders of magnitude.
    def conditions(x, y):
        return jnp.array([[1.0, 1.0], [1.0, 1.0 + 1e-17]]) @ y - x

    f = idf.ImplicitFunction(lambda x: x, conditions, on_failure="nan")
    assert bool(jnp.all(jnp.isnan(jax.jacrev(f)(jnp.ones(2)))))


def _clear_warning_registry():
    sys.modules[__name__].__dict__.pop("__warningregistry__", None)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_warn_policy_warns_once_per_call_site_under_jit(solver):
    f = singular_sqrt(solver, "warn")
    gradient = jax.jit(jax.grad(lambda x: jnp.sum(f(x))))
    _clear_warning_registry()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            result = gradient(jnp.zeros(2))
    assert bool(jnp.all(jnp.isnan(result)))
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1
    message = str(runtime[0].message)
    assert type(solver).__name__ in message and "VJP" in message
    assert runtime[0].filename == __file__  # points at the user's call of f


def test_warn_policy_names_the_direction_in_forward_mode():
    f = singular_sqrt(idf.Direct(), "warn")
    with pytest.warns(RuntimeWarning, match="JVP"):
        result = jax.jacfwd(f)(jnp.zeros(2))
    assert bool(jnp.all(jnp.isnan(result)))


def test_no_warning_when_the_solve_succeeds_or_the_input_is_nan():
    f = singular_sqrt(idf.Direct(), "warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(f(x)))(jnp.ones(2)), 0.5)
        # NaN in, NaN out: the cotangent was already NaN, no solver failed.
        _, pullback = jax.vjp(f, jnp.ones(2))
        assert bool(jnp.all(jnp.isnan(pullback(jnp.full(2, jnp.nan))[0])))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize(
    "transform, direction",
    [("grad", "VJP"), ("jacfwd", "JVP"), ("vmap-grad", "VJP"), ("eager", "VJP")],
)
def test_raise_policy_raises_our_error_with_its_message_last(
    transform, direction, dtype, capfd
):
    # Under jit JAX wraps an exception raised on the host in a JaxRuntimeError whose
    # text is its traceback: our error must be its last line, printed once (no second
    # traceback logged on stderr, no advice to use equinox.filter_jit).
    f = singular_sqrt(idf.Direct(), "raise")
    loss = lambda x: jnp.sum(f(x))
    fn = {
        "grad": jax.jit(jax.grad(loss)),
        "jacfwd": jax.jit(jax.jacfwd(f)),
        "vmap-grad": jax.jit(jax.vmap(jax.grad(loss))),
        "eager": jax.grad(loss),
    }[transform]
    x = jnp.zeros((2, 2) if transform == "vmap-grad" else 2, dtype)
    with pytest.raises(jax.errors.JaxRuntimeError) as info:
        jax.block_until_ready(fn(x))
    lines = str(info.value).splitlines()
    assert lines[0].startswith("INTERNAL: CpuCallback error")  # JAX's first line
    assert lines[-1] == (
        f"OnFailureError: implicitdiff: Direct did not solve the {direction} "
        f"{'(Aᵀ u = v)' if direction == 'VJP' else '(A x = b)'} linear system with "
        "A = ∂c/∂y (singular or ill-conditioned, no convergence, a sparsity pattern "
        "missing entries, or an infinite right-hand side: an overflow, from "
        'conditions far from unit scale); the derivative is NaN. (on_failure="raise")'
    )
    assert "filter_jit" not in str(info.value)
    assert "Traceback" not in capfd.readouterr().err


def test_raise_policy_is_silent_when_nothing_fails():
    f = singular_sqrt(idf.Direct(), "raise")
    np.testing.assert_allclose(
        jax.jit(jax.jacrev(f))(jnp.full(2, 4.0)), 0.25 * jnp.eye(2)
    )


def test_vmap_only_the_failing_element_is_nan():
    f = singular_sqrt(idf.Direct(), "nan")
    grads = jax.vmap(jax.grad(lambda x: jnp.sum(f(x))))(
        jnp.array([[4.0, 1.0], [0.0, 1.0]])
    )
    np.testing.assert_allclose(grads[0], [0.25, 0.5])
    assert bool(jnp.all(jnp.isnan(grads[1])))


@pytest.mark.parametrize("policy", ["nan", "warn", "raise"])
def test_check_conditions_catches_a_forward_stopped_early(policy):
    def stopped_early(x):  # three Newton steps from 1 are not enough for √100
        y = jnp.ones_like(x)
        for _ in range(3):
            y = y - (y**2 - x) / (2 * y)
        return y

    f = idf.ImplicitFunction(
        stopped_early, lambda x, y: y**2 - x, on_failure=policy, check_conditions=1e-8
    )
    x = jnp.array([100.0, 1.0])
    if policy == "raise":
        with pytest.raises(Exception, match="does not satisfy the conditions"):
            jax.block_until_ready(jax.jit(f)(x))
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = jax.jit(f)(x)
        gradient = jax.grad(lambda x: jnp.sum(f(x)))(x)
    assert bool(jnp.all(jnp.isnan(y))) and bool(jnp.all(jnp.isnan(gradient)))
    messages = [str(w.message) for w in caught]
    assert any("does not satisfy" in m for m in messages) == (policy == "warn")
    # A converged forward passes the same check.
    good = idf.ImplicitFunction(jnp.sqrt, lambda x, y: y**2 - x, check_conditions=1e-8)
    np.testing.assert_allclose(
        jax.grad(lambda x: jnp.sum(good(x)))(x), 0.5 / jnp.sqrt(x)
    )


def test_raise_outside_jit_is_our_error_for_a_failed_check():
    """An eager call whose forward fails its check raises `OnFailureError` itself
    (it came out as JAX's `JaxRuntimeError`, which `except OnFailureError` missed);
    a failed solve inside an eager derivative still reaches the user as JAX's error,
    whose last line is ours."""
    stalled = idf.ImplicitFunction(
        lambda x: jnp.zeros(2), lambda x, y: y - x, on_failure="raise"
    )
    with pytest.raises(idf.OnFailureError, match="does not satisfy the conditions"):
        stalled(jnp.ones(2))
    singular = idf.ImplicitFunction(
        lambda x: jnp.array([0.5, 0.5]),
        lambda x, y: jnp.array([y[0] + y[1], y[0] + y[1]]) - x,
        on_failure="raise",
        check_conditions=None,
    )
    with pytest.raises(jax.errors.JaxRuntimeError, match="OnFailureError: "):
        jax.grad(lambda x: singular(x).sum())(jnp.ones(2))
