"""Robustness: no retracing, no memory growth, and clear errors from user code."""

import inspect
import os
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicitdiff as idf

jax.config.update("jax_enable_x64", True)

TRACES = []


def counted_forward(x):
    TRACES.append("forward")  # a Python side effect: runs once per trace
    return jnp.sqrt(x)


def counted_conditions(x, y):
    TRACES.append("conditions")
    return y**2 - x


def sqrt_fn(**kwargs):
    return idf.ImplicitFunction(counted_forward, counted_conditions, **kwargs)


def inputs(count, n=3):
    return [jnp.arange(1.0, n + 1) + 0.5 * i for i in range(count)]


def test_no_retrace_with_same_shapes_under_jit():
    f = sqrt_fn(check_conditions=1e-8)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(f(x) ** 3)))
    jacobian = jax.jit(jax.vmap(jax.jacrev(f)))
    TRACES.clear()
    grad(inputs(1)[0])
    jacobian(jnp.stack(inputs(2)))
    first = len(TRACES)
    assert first > 0
    for x in inputs(5):
        # d(Σ y³)/dx = 3y² · 1/(2y) = 1.5 √x: values change, traces do not.
        np.testing.assert_allclose(grad(x), 1.5 * np.sqrt(x), rtol=1e-12)
        jacobian(jnp.stack([x, x + 1]))
    assert len(TRACES) == first


def test_no_retrace_when_the_implicit_function_is_rebuilt_each_step():
    # The common training-loop pattern: a fresh ImplicitFunction (same functions, same
    # settings) passed to one filter_jit'ed step. Equal static parts: one trace.
    @eqx.filter_jit
    def step(f, x):
        return jax.grad(lambda x: jnp.sum(f(x)))(x)

    TRACES.clear()
    step(sqrt_fn(linear_solver=idf.GMRES(rtol=1e-10)), inputs(1)[0])
    first = len(TRACES)
    for x in inputs(4):
        g = step(sqrt_fn(linear_solver=idf.GMRES(rtol=1e-10)), x)
        np.testing.assert_allclose(g, 0.5 / np.sqrt(x), rtol=1e-8)
    assert len(TRACES) == first


# A builtin method: the eager cache keys on what the user's code reads (TRACES's
# contents, through `TRACES.append`), but not on this.
_RECORD_TRACE = TRACES.append


def test_eager_calls_from_other_lines_reuse_the_program_and_warn_at_their_line():
    """An eager call's compiled program once keyed on the calling line: each new line
    (a notebook's every cell) traced and compiled again, 0.4 s for the README example.
    The line is now a number the program takes: no new trace, and each run-time
    warning (a singular ∂c/∂y at x = 0) still names the line that called."""

    def forward(x):
        _RECORD_TRACE("forward")
        return jnp.sqrt(x)

    f = idf.ImplicitFunction(forward, lambda x, y: y**2 - x)
    x = jnp.zeros(3)
    gradients, lines = [], []
    TRACES.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            gradients.append(jax.grad(lambda x: f(x).sum())(x))
            lines.append(inspect.currentframe().f_lineno - 1)
        gradients.append(jax.grad(lambda x: f(x).sum())(x))
        lines.append(inspect.currentframe().f_lineno - 1)
    assert TRACES == ["forward"]
    assert all(bool(jnp.all(jnp.isnan(g))) for g in gradients)
    failures = [w for w in caught if "did not solve" in str(w.message)]
    assert [w.lineno for w in failures] == lines
    assert all(w.filename == __file__ for w in failures)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.full_optimisation
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="Linux only")
@pytest.mark.parametrize("on_failure", ["warn", "raise"])
def test_no_memory_growth_over_1000_jitted_gradients(on_failure):
    # A 10-dimensional problem, as in the project's speed target; "warn" and "raise"
    # each add a host-side path (a cond with a callback, an error check).
    n = 10
    M = jnp.eye(n) * 3 + jnp.asarray(np.random.default_rng(0).normal(size=(n, n))) / n
    f = idf.ImplicitFunction(
        lambda x: jnp.linalg.solve(M, x),
        lambda x, y: M @ y - x,
        on_failure=on_failure,
        check_conditions=1e-8,
    )
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(f(x)))))
    xs = jnp.asarray(np.random.default_rng(1).normal(size=(1000, n)))
    for x in xs[:100]:  # warm up: compilation, allocator pools
        grad(x).block_until_ready()
    before = _rss_bytes()
    for x in xs:
        g = grad(x)
    g.block_until_ready()
    growth = _rss_bytes() - before
    # Reference: the gradient cos(y)ᵀ M⁻¹ of the last call.
    y = np.linalg.solve(np.asarray(M), np.asarray(xs[-1]))
    expected = np.linalg.solve(np.asarray(M).T, np.cos(y))
    np.testing.assert_allclose(g, expected, rtol=1e-10)
    # Measured: ≤ 1.2 MiB in the first 1000 calls after warm-up, then 0. A leak of
    # 8 kB per call (one 1000-element float64 buffer) would cross the bound.
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"


def raising_forward(x):
    raise ValueError("forward exploded")


def raising_conditions(x, y):
    raise ValueError("conditions exploded")


@pytest.mark.parametrize(
    "transform", [lambda f: f, jax.jit, lambda f: jax.jit(jax.jacrev(f))]
)
@pytest.mark.parametrize(
    "forward, conditions, message, name",
    [
        (raising_forward, counted_conditions, "forward exploded", "raising_forward"),
        (jnp.sqrt, raising_conditions, "conditions exploded", "raising_conditions"),
    ],
)
def test_exception_in_user_function_is_the_users_exception(
    transform, forward, conditions, message, name
):
    # Raised while JAX traces (or, eagerly, calls) the function: the user's own
    # exception comes out, unchanged, with the user's function in its traceback.
    f = idf.ImplicitFunction(forward, conditions)
    with pytest.raises(ValueError, match=message) as info:
        transform(f)(jnp.ones(2))
    assert any(entry.name == name for entry in info.traceback)


def test_exception_in_host_forward_names_the_function():
    def scipy_forward(x):
        raise ValueError("scipy exploded")

    f = idf.ImplicitFunction(idf.host(scipy_forward), lambda x, y: y**2 - x)
    with pytest.raises(RuntimeError, match="scipy_forward` raised ValueError") as info:
        f(jnp.ones(2))
    assert type(info.value).__name__ == "HostFunctionError"
    # Under jit the callback runs inside XLA: a runtime error (no hang) whose message
    # names the function and quotes the exception.
    with pytest.raises(jax.errors.JaxRuntimeError) as info:
        jax.jit(jax.grad(lambda x: jnp.sum(f(x))))(jnp.ones(2)).block_until_ready()
    assert "scipy_forward` raised ValueError: scipy exploded" in str(info.value)


def test_exception_in_raw_pure_callback_is_reported_with_its_traceback():
    def host_step(x):
        raise ValueError("raw callback exploded")

    def forward(x):
        return jax.pure_callback(host_step, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    f = idf.ImplicitFunction(forward, lambda x, y: y**2 - x)
    with pytest.raises(jax.errors.JaxRuntimeError) as info:
        jax.jit(jax.grad(lambda x: jnp.sum(f(x))))(jnp.ones(2)).block_until_ready()
    assert "host_step" in str(info.value)
    assert "ValueError: raw callback exploded" in str(info.value)


def test_reverse_mode_with_a_condition_that_does_not_involve_x():
    # y = {"root": √x, "double": 2√x}: the second condition, y₂ − 2y₁ = 0, has no x.
    f = idf.ImplicitFunction(
        lambda x: {"root": jnp.sqrt(x), "double": 2 * jnp.sqrt(x)},
        lambda x, y: {
            "root": y["root"] ** 2 - x,
            "double": y["double"] - 2 * y["root"],
        },
    )
    x = jnp.array([4.0, 9.0])
    gradient = jax.grad(lambda x: jnp.sum(f(x)["double"]))(x)
    np.testing.assert_allclose(gradient, 1 / np.sqrt(x))  # d(2√x)/dx
