"""A user's mistakes and habits: the default condition check, inputs the conditions
ignore, closures, keyword arguments, and errors that name the fix."""

import functools as ft
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import newton_sqrt, ridge_data, ridge_dw_dlam, ridge_solution

import implicitdiff as idf

X = jnp.array([1.0, 4.0, 9.0])
SQRT_JACOBIAN = np.diag(0.5 / np.sqrt(np.asarray(X)))


def caught(fn, *args):
    """`fn(*args)` and the texts of the warnings it emitted."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = fn(*args)
    return result, [str(w.message) for w in record]


# The default condition check.


def test_default_check_catches_swapped_arguments():
    # conditions(y, x) instead of conditions(x, y): without the check the gradient
    # would be the finite, wrong [2, 8, 18].
    swapped = idf.ImplicitFunction(newton_sqrt, lambda y, x: y**2 - x)
    grad, messages = caught(jax.grad(lambda x: swapped(x).sum()), X)
    assert bool(jnp.all(jnp.isnan(grad)))
    assert any("does not satisfy the conditions" in m for m in messages)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_default_check_is_quiet_on_converged_forwards(dtype):
    sqrt = idf.ImplicitFunction(newton_sqrt, lambda x, y: y**2 - x)
    jacobian, messages = caught(jax.jacrev(sqrt), X.astype(dtype))
    assert messages == []
    rtol = 1e-5 if dtype == jnp.float32 else 1e-12
    np.testing.assert_allclose(jacobian, SQRT_JACOBIAN, rtol=rtol)


def test_default_check_catches_an_optimiser_stopped_early():
    optax = pytest.importorskip("optax")
    A, t = ridge_data()

    def forward(lam, steps):
        optimiser = optax.sgd(1e-3)

        def step(_, carry):
            w, state = carry
            updates, state = optimiser.update(conditions(lam, w), state)
            return optax.apply_updates(w, updates), state

        w = jnp.zeros(A.shape[1])
        return jax.lax.fori_loop(0, steps, step, (w, optimiser.init(w)))[0]

    def conditions(lam, w):
        return A.T @ (A @ w - t) + lam * w

    stopped = idf.ImplicitFunction(lambda lam: forward(lam, 5), conditions)
    value, messages = caught(jax.grad(lambda lam: stopped(lam).sum()), 1.0)
    assert bool(jnp.isnan(value)) and messages
    converged = idf.ImplicitFunction(lambda lam: forward(lam, 20_000), conditions)
    value, messages = caught(jax.grad(lambda lam: converged(lam).sum()), 1.0)
    np.testing.assert_allclose(value, ridge_dw_dlam(1.0, A, t).sum(), rtol=1e-6)
    assert messages == []


@pytest.mark.filterwarnings("ignore:implicitdiff. the conditions:UserWarning")
@pytest.mark.parametrize("direction", ["jacfwd", "grad"])
def test_failed_check_makes_every_output_and_derivative_nan(direction):
    # `scale` reaches the forward and the byproduct, not the conditions: its derivative
    # would be an exact 0 (or a finite byproduct) without the poisoning.
    def forward(x, scale):
        return x + 1.0, scale * x  # misses c = y − x by 1

    f = idf.ImplicitFunction(
        forward, lambda x, y, z, scale: y - x, has_byproduct=True, on_failure="nan"
    )
    y, z = f(X, 2.0)
    assert bool(jnp.all(jnp.isnan(y))) and bool(jnp.all(jnp.isnan(z)))

    def total(x, scale):
        y, z = f(x, scale)
        return y.sum() + z.sum()

    if direction == "grad":
        derivatives = jax.grad(total, argnums=(0, 1))(X, 2.0)
    else:
        derivatives = jax.jacfwd(total, argnums=(0, 1))(X, 2.0)
    for leaf in jax.tree.leaves(derivatives):
        assert bool(jnp.all(jnp.isnan(leaf)))


@pytest.mark.parametrize("bad", [True, "1e-3", 0.0, -1.0, float("inf"), [1e-3]])
def test_check_conditions_must_be_a_positive_number_or_none(bad):
    with pytest.raises(TypeError, match="check_conditions.*positive number"):
        idf.ImplicitFunction(jnp.sqrt, lambda x, y: y**2 - x, check_conditions=bad)


def test_check_conditions_none_turns_it_off():
    swapped = idf.ImplicitFunction(
        newton_sqrt, lambda y, x: y**2 - x, check_conditions=None
    )
    grad, messages = caught(jax.grad(lambda x: swapped(x).sum()), X)
    assert bool(jnp.all(jnp.isfinite(grad))) and messages == []


# Inputs the conditions ignore.


def guess_forward(x, guess):
    return newton_sqrt(x) + 0.0 * guess


def test_warns_once_per_call_site_for_an_input_the_conditions_ignore():
    f = idf.ImplicitFunction(guess_forward, lambda x, y, guess: y**2 - x)
    grad = jax.grad(lambda x, g: f(x, g).sum(), argnums=(0, 1))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        for _ in range(3):
            (dx, dguess) = grad(X, jnp.ones(3))
    messages = [str(w.message) for w in record if w.category is UserWarning]
    assert len(messages) == 1 and "args[0]" in messages[0]
    assert "stop_gradient" in messages[0]
    np.testing.assert_allclose(dx, np.diag(SQRT_JACOBIAN), rtol=1e-12)
    np.testing.assert_array_equal(dguess, 0.0)


def test_no_warning_for_inputs_that_are_not_differentiated_or_are_stopped():
    f = idf.ImplicitFunction(guess_forward, lambda x, y, guess: y**2 - x)
    _, messages = caught(jax.grad(lambda x: f(x, jnp.ones(3)).sum()), X)
    assert messages == []
    stopped = jax.grad(
        lambda x, g: f(x, jax.lax.stop_gradient(g)).sum(), argnums=(0, 1)
    )
    _, messages = caught(stopped, X, jnp.ones(3))
    assert messages == []


def test_warning_names_a_keyword_argument():
    f = idf.ImplicitFunction(
        lambda x, guess: guess_forward(x, guess), lambda x, y, guess: y**2 - x
    )
    _, messages = caught(jax.jacfwd(lambda g: f(X, guess=g)), jnp.ones(3))
    assert any("kwargs['guess']" in m for m in messages)


# Closures.


def test_numpy_forward_with_conditions_closing_over_the_differentiated_value():
    x = jnp.array([2.0, 3.0])

    def total(b):
        forward = lambda x: np.sqrt(np.asarray(x) * 2.0)  # noqa: E731  (b = 2 here)
        return idf.ImplicitFunction(forward, lambda x, y: y**2 - x * b)(x).sum()

    # y = √(x b): dy/db = x / (2 √(x b)).
    expected = np.sum(np.asarray(x) / (2 * np.sqrt(np.asarray(x) * 2.0)))
    np.testing.assert_allclose(jax.grad(total)(2.0), expected, rtol=1e-12)


def test_conditions_capturing_a_tracer_through_a_default_argument():
    x = jnp.array([2.0, 3.0])

    def total(a):
        return idf.ImplicitFunction(
            lambda x: jnp.sqrt(x * a), lambda x, y, a=a: y**2 - x * a
        )(x).sum()

    expected = np.sum(np.asarray(x) / (2 * np.sqrt(np.asarray(x) * 2.0)))
    np.testing.assert_allclose(jax.grad(total)(2.0), expected, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(jax.grad(total))(2.0), expected, rtol=1e-12)


# Keyword arguments.


def ridge(**options):
    def forward(X, *, lam, t):
        return ridge_solution(lam, X, t)

    def conditions(X, w, *, lam, t):
        return X.T @ (X @ w - t) + lam * w

    return idf.ImplicitFunction(forward, conditions, **options)


@pytest.mark.parametrize(
    "transform", ["jvp", "jacfwd", "grad", "jacrev", "jit-grad", "vmap-grad"]
)
def test_keyword_arguments_are_differentiable(transform):
    A, t = ridge_data()
    f = ridge()
    total = lambda lam: f(A, lam=lam, t=t).sum()  # noqa: E731
    expected = float(ridge_dw_dlam(0.5, A, t).sum())
    if transform == "jvp":
        value = jax.jvp(total, (0.5,), (1.0,))[1]
    elif transform == "jacfwd":
        value = jax.jacfwd(lambda lam: f(A, lam=lam, t=t))(0.5).sum()
    elif transform == "jacrev":
        value = jax.jacrev(lambda lam: f(A, lam=lam, t=t))(0.5).sum()
    elif transform == "grad":
        value = jax.grad(total)(0.5)
    elif transform == "jit-grad":
        value = jax.jit(jax.grad(total))(0.5)
    else:
        value = jax.vmap(jax.grad(total))(jnp.array([0.5, 0.5]))[1]
    np.testing.assert_allclose(value, expected, rtol=1e-10)


def test_jaxopt_style_call_with_keywords_only():
    A, t = ridge_data()
    f = idf.ImplicitFunction(
        lambda _, X, lam, t: ridge_solution(lam, X, t),
        lambda _, w, X, lam, t: X.T @ (X @ w - t) + lam * w,
    )
    grad = jax.grad(lambda lam: f(None, X=A, lam=lam, t=t).sum())(0.5)
    np.testing.assert_allclose(grad, ridge_dw_dlam(0.5, A, t).sum(), rtol=1e-10)


# Errors that name the fix.


def test_numpy_forward_under_jit_names_host():
    f = idf.ImplicitFunction(lambda x: np.sqrt(np.asarray(x)), lambda x, y: y**2 - x)
    with pytest.raises(TypeError, match=r"implicitdiff\.host\(forward"):
        jax.jit(f)(X)


@pytest.mark.parametrize("byproduct", [lambda x: 1.0 * x, lambda x: jnp.sum(x)])
def test_forgotten_has_byproduct_is_named(byproduct):
    forward = lambda x: (jnp.sqrt(x), byproduct(x))  # noqa: E731
    for conditions in (lambda x, y, z: y**2 - x, lambda x, y: y**2 - x):
        with pytest.raises(Exception) as info:
            idf.ImplicitFunction(forward, conditions)(X)
        text = str(info.value) + " ".join(getattr(info.value, "__notes__", []))
        assert "has_byproduct=True" in text


# A custom_vjp inside the conditions: reverse mode works through its rule.


@jax.custom_vjp
def scaled_square(a, y):
    return a * y**2


def _scaled_square_bwd(residuals, g):
    a, y = residuals
    return jnp.sum(g * y**2), 2 * a * y * g


scaled_square.defvjp(lambda a, y: (a * y**2, (a, y)), _scaled_square_bwd)


@pytest.mark.parametrize("solver", [idf.Direct(), idf.GMRES()], ids=["Direct", "GMRES"])
def test_custom_vjp_in_the_conditions(solver):
    # a·y² = x: y = √(x/a), dy/dx = 1/(2√(a x)), dy/da = −√x / (2 a^{3/2}).
    f = idf.ImplicitFunction(
        lambda x, a: jnp.sqrt(x / a),
        lambda x, y, a: scaled_square(a, y) - x,
        linear_solver=solver,
    )
    a = 2.0
    dx, da = jax.jit(jax.grad(lambda x, a: f(x, a).sum(), argnums=(0, 1)))(X, a)
    np.testing.assert_allclose(dx, 1 / (2 * np.sqrt(a * np.asarray(X))), rtol=1e-10)
    expected_da = np.sum(-np.sqrt(np.asarray(X)) / (2 * a**1.5))
    np.testing.assert_allclose(da, expected_da, rtol=1e-10)
    np.testing.assert_allclose(
        jax.jacrev(f)(X, a), np.diag(1 / (2 * np.sqrt(a * np.asarray(X)))), rtol=1e-10
    )


def test_dir_lists_only_public_names():
    names = dir(idf)
    assert "importlib" not in names and not any(
        name.startswith("_") and name != "__version__" for name in names
    )
    assert {"ImplicitFunction", "Direct", "SolveLog", "linear_solve"} <= set(names)
    assert all(hasattr(idf, name) for name in idf.__all__)


def test_eager_calls_compile_once_and_untraceable_forwards_still_run_eagerly():
    """Outside `jit` the rule is compiled and cached, like `jax.jit`: a later eager
    derivative neither re-traces the conditions nor runs them op by op. A forward that
    cannot be traced (Python control flow on values, NumPy) still runs eagerly."""
    traced = []
    record = traced.append  # a builtin method: keyed by identity, not by the list

    def conditions(x, y):
        record(1)
        return y**2 - x

    f = idf.ImplicitFunction(jnp.sqrt, conditions)
    x = jnp.array([1.0, 4.0, 9.0])
    expected = np.diag(0.5 / np.sqrt(np.asarray(x)))
    counts = []
    for _ in range(4):  # one call site: compiled per call site, for its warnings
        np.testing.assert_allclose(jax.jacobian(f)(x), expected, rtol=1e-12)
        counts.append(len(traced))
    assert counts[0] > 0 and counts == counts[:1] * 4

    def branching_forward(x):  # Python control flow on the values
        y = np.sqrt(np.asarray(x))
        return jnp.asarray(y if float(y.sum()) > 0 else -y)

    g = idf.ImplicitFunction(branching_forward, lambda x, y: y**2 - x)
    np.testing.assert_allclose(jax.jacobian(g)(x), expected, rtol=1e-12)
    np.testing.assert_allclose(
        jax.grad(lambda x: g(x).sum())(x), np.diag(expected), rtol=1e-12
    )


def test_jax_export_needs_the_nan_policy():
    """`jax.export` cannot serialise a host callback: with `on_failure="nan"` (no
    callback) the exported gradient runs and is right; with the default the export
    fails when lowering (JAX's error; docs/common_errors.md names the fix, as no
    public JAX API tells a trace that it is being exported)."""
    from jax import export

    def grad_of(policy):
        f = idf.ImplicitFunction(jnp.sqrt, lambda x, y: y**2 - x, on_failure=policy)
        return jax.jit(jax.grad(lambda x: f(x).sum()))

    x = jnp.array([1.0, 4.0])
    exported = export.export(grad_of("nan"))(x)  # (serialising needs flatbuffers)
    np.testing.assert_allclose(exported.call(x), 0.5 / np.sqrt(x), rtol=1e-12)
    with pytest.raises(Exception, match="(?i)callback"):
        export.export(grad_of("warn"))(x)


def test_shape_polymorphic_export_is_refused_with_a_clear_error():
    """Symbolic dimensions crashed deep in the checks (`InconclusiveDimensionOperation`
    in `_misc.size`): now a `TypeError` naming the input, when tracing."""
    from jax import export

    f = idf.ImplicitFunction(jnp.sqrt, lambda x, y, s: y**2 - x, on_failure="nan")
    n = export.symbolic_shape("n")
    struct = jax.ShapeDtypeStruct(n, jnp.float64)
    with pytest.raises(TypeError, match=r"the input x has the symbolic shape"):
        export.export(jax.jit(f))(struct, jnp.ones(2))
    with pytest.raises(TypeError, match=r"the input args\[0\] has the symbolic"):
        export.export(jax.jit(lambda s: f(jnp.ones(2), s)))(struct)
    with pytest.raises(TypeError, match="symbolic shape"):
        export.export(jax.jit(jax.grad(lambda x: f(x, 1.0).sum())))(struct)


def test_unhashable_static_argument_runs_eagerly():
    """A SciPy matrix passed as an argument cannot key the compiled call's cache:
    the call runs eagerly, as before, and its derivative is right."""
    import scipy.sparse as sp
    import scipy.sparse.linalg as sla

    S = sp.identity(3, format="csr") * 2.0

    def forward(x, S):
        return jnp.asarray(sla.spsolve(S.tocsc(), np.asarray(x)))

    f = idf.ImplicitFunction(forward, lambda x, y, S: jnp.asarray(S.toarray()) @ y - x)
    x = jnp.ones(3)
    np.testing.assert_allclose(f(x, S), 0.5 * np.ones(3), rtol=1e-12)
    np.testing.assert_allclose(jax.jacobian(f)(x, S), 0.5 * np.eye(3), rtol=1e-12)


def test_python_float_arguments_are_not_compiled_in():
    """Python floats would be compiled into the cached call, once per value: such
    calls run eagerly, and each value gives its own right answer."""
    traced = []

    def conditions(x, y, s):
        traced.append(s)
        return y**2 - x * s

    f = idf.ImplicitFunction(lambda x, s: jnp.sqrt(x * s), conditions)
    x = jnp.array([1.0, 4.0])
    for s in (1.0, 2.0, 3.0):
        np.testing.assert_allclose(
            jax.jacobian(f)(x, s), np.diag(0.5 * s / np.sqrt(x * s)), rtol=1e-12
        )
    assert {1.0, 2.0, 3.0} <= set(traced)


def test_python_floats_in_the_configuration_keep_the_cache():
    """A solver's tolerance is a Python float of the module, fixed per module: an
    eager call is compiled and cached as with the defaults, so a second call of a
    derivative traces nothing, and both are right."""
    traces = []
    record = traces.append  # a builtin method: keyed by identity, not by the list

    def conditions(x, y):
        record(None)
        return y**2 - x

    f = idf.ImplicitFunction(
        jnp.sqrt, conditions, linear_solver=idf.GMRES(rtol=1e-11, atol=1e-13)
    )
    x = jnp.array([1.0, 4.0])
    expected = np.diag(0.5 / np.sqrt(x))
    counts = []
    for scale in (1.0, 1.0):  # one call site: warnings are once per site
        np.testing.assert_allclose(jax.jacobian(f)(x * scale), expected, rtol=1e-9)
        counts.append(len(traces))
    assert counts[0] > 0 and counts[1] == counts[0]


def test_forward_traced_once_keeps_effects_keys_and_static_byproducts():
    """Under a transformation the forward is traced once and replayed: an ordered
    host callback inside it still runs, random keys pass as arguments, a byproduct's
    non-array leaves come back as they were, and the derivatives are right."""
    from jax.experimental import io_callback

    seen = []

    def forward(x, key):
        io_callback(lambda v: seen.append(float(v)), None, x[0], ordered=True)
        noise = 1e-30 * jax.random.normal(key, x.shape)
        return jnp.sqrt(x) + noise, {"iterations": jnp.int32(7), "method": "newton"}

    f = idf.ImplicitFunction(forward, lambda x, y, z, key: y**2 - x, has_byproduct=True)
    x = jnp.array([4.0, 9.0])
    expected = 0.5 / np.sqrt(np.asarray(x))
    for key in (jax.random.key(0), jax.random.PRNGKey(0)):
        grad = jax.jit(jax.grad(lambda x, key: f(x, key)[0].sum()))(x, key)
        np.testing.assert_allclose(grad, expected, rtol=1e-12)
    J = jax.jacfwd(lambda x: f(x, jax.random.key(1))[0])(x)
    np.testing.assert_allclose(J, np.diag(expected), rtol=1e-12)
    y, z = f(x, jax.random.key(2))
    assert z["method"] == "newton" and int(z["iterations"]) == 7
    assert len(seen) >= 3 and set(seen) == {4.0}


def test_implicit_functions_nested_in_forward_and_conditions():
    """An implicit function inside another's forward (replayed from its trace) and
    inside another's conditions: Jacobians in both modes, under jit and vmap, and a
    Hessian, against the closed forms of x^(1/6)."""
    x = jnp.array([2.0, 5.0])
    inner = idf.ImplicitFunction(jnp.sqrt, lambda x, y: y**2 - x)
    through_forward = idf.ImplicitFunction(
        lambda x: jnp.cbrt(inner(x)), lambda x, z: z**6 - x
    )
    through_conditions = idf.ImplicitFunction(
        lambda x: jnp.cbrt(jnp.sqrt(x)), lambda x, z: z**3 - inner(x)
    )
    xs = np.asarray(x)
    first = np.diag(xs ** (-5 / 6) / 6)
    second = np.diag(-5 / 36 * xs ** (-11 / 6))
    for f in (through_forward, through_conditions):
        np.testing.assert_allclose(jax.jacfwd(f)(x), first, rtol=1e-10)
        np.testing.assert_allclose(jax.jit(jax.jacrev(f))(x), first, rtol=1e-10)
        grads = jax.vmap(jax.grad(lambda v: f(v).sum()))(jnp.stack([x, x]))
        np.testing.assert_allclose(grads[1], np.diag(first), rtol=1e-10)
        hessian = jax.hessian(lambda v: f(v).sum())(x)
        np.testing.assert_allclose(hessian, second, rtol=1e-8)


# Values the user's functions read from outside their arguments, changed between
# eager calls from one call site: each call must see the current value, as a plain
# eager call would, although the call is compiled and cached.

SCALE = 2.0
SMALL_TABLE = np.array([2.0])
TRACES = []
# A builtin method: what reads the list's contents keys the cache on them, this not
_RECORD_TRACE = TRACES.append


def _scaled_sqrt(x):
    _RECORD_TRACE(1)  # runs once per trace
    return jnp.sqrt(x) * _current_scale()


def _current_scale():  # read one call deeper
    return SCALE * SMALL_TABLE[0] / 2.0


def _scaled_conditions(x, y):
    return (y / _current_scale()) ** 2 - x


def test_a_changed_global_is_seen_by_the_next_eager_call():
    global SCALE, SMALL_TABLE
    f = idf.ImplicitFunction(_scaled_sqrt, _scaled_conditions)
    gradient = lambda x: jax.grad(lambda x: f(x).sum())(x)  # noqa: E731
    TRACES.clear()
    for scale, table in [(2.0, 2.0), (2.0, 2.0), (3.0, 2.0), (3.0, 5.0)]:
        SCALE = scale
        SMALL_TABLE[0] = table  # changed in place: seen by content
        expected = scale * table / 2.0
        np.testing.assert_allclose(f(X), expected * np.sqrt(X), rtol=1e-6)
        np.testing.assert_allclose(gradient(X), expected * 0.5 / np.sqrt(X), rtol=1e-6)
    # One trace per value (the call and its gradient share the compiled call, from
    # any line) for three values, none again for the repeated one.
    assert len(TRACES) == 3
    SMALL_TABLE = np.array([4.0])  # rebound
    np.testing.assert_allclose(f(X), 6.0 * np.sqrt(X), rtol=1e-6)
    SCALE, SMALL_TABLE = 2.0, np.array([2.0])


class _Scaled:
    """A plain object whose attribute the forward and the conditions read."""

    def __init__(self, scale):
        self.scale = scale

    def forward(self, x):
        return jnp.sqrt(x) * self.scale

    def conditions(self, x, y):
        return (y / self.scale) ** 2 - x


class _CallableConditions:
    def __init__(self, table):
        self.table = table  # a dict, changed in place

    def __call__(self, x, y):
        return (y / self.table["scale"]) ** 2 - x


def _three_deep():
    return _two_deep()


def _two_deep():
    return _one_deep()


def _one_deep():
    return SCALE


LARGE_TABLE = np.ones(20_000)  # 160 kB: keyed by a digest of its bytes


class _ReadsAGlobal(eqx.Module):
    """No fields: its methods read the global `SCALE`, `__call__` through a helper
    called on `self`."""

    def __call__(self, x, y):
        return (y / self._scale()) ** 2 - x

    def forward(self, x):
        return jnp.sqrt(x) * self._scale()

    def _scale(self):
        return SCALE


class _ClassScale:
    """A class attribute, changed on the class."""

    scale = 2.0

    def forward(self, x):
        return jnp.sqrt(x) * type(self).scale


def test_values_read_through_objects_dicts_partials_and_arguments_are_seen():
    """Each way a forward reads a value that a loop changes, from the same line:
    every eager call (value and gradient) must see the current one, as an
    uncompiled call would. An attribute of an object, a dict changed in place, a
    `functools.partial`, a callable object, a global read three calls deep, a
    function passed as an argument, a large NumPy array changed in place, a global
    read by the methods of an `equinox.Module` without fields, a class attribute."""
    global SCALE
    problem = _Scaled(2.0)
    table = {"scale": 2.0}

    def by_partial(x, scale_of):
        return jnp.sqrt(x) * scale_of()

    def with_argument(x, scale_of):
        return jnp.sqrt(x) * scale_of()

    def with_argument_conditions(x, y, scale_of):
        return (y / scale_of()) ** 2 - x

    cases = {
        "attribute": (
            idf.ImplicitFunction(problem.forward, problem.conditions),
            lambda v: setattr(problem, "scale", v),
            (),
        ),
        "callable object, dict": (
            idf.ImplicitFunction(
                lambda x: jnp.sqrt(x) * table["scale"], _CallableConditions(table)
            ),
            lambda v: table.__setitem__("scale", v),
            (),
        ),
        "partial, three deep": (
            idf.ImplicitFunction(
                ft.partial(by_partial, scale_of=_three_deep),
                ft.partial(with_argument_conditions, scale_of=_three_deep),
            ),
            lambda v: globals().__setitem__("SCALE", v),
            (),
        ),
        "argument": (
            idf.ImplicitFunction(with_argument, with_argument_conditions),
            lambda v: globals().__setitem__("SCALE", v),
            (_three_deep,),
        ),
        "large array in place": (
            idf.ImplicitFunction(
                lambda x: jnp.sqrt(x) * LARGE_TABLE[7],
                lambda x, y: (y / LARGE_TABLE[7]) ** 2 - x,
            ),
            lambda v: LARGE_TABLE.__setitem__(7, v),
            (),
        ),
        "module methods": (
            idf.ImplicitFunction(_ReadsAGlobal().forward, _ReadsAGlobal()),
            lambda v: globals().__setitem__("SCALE", v),
            (),
        ),
        "class attribute": (
            idf.ImplicitFunction(
                _ClassScale().forward, lambda x, y: (y / _ClassScale.scale) ** 2 - x
            ),
            lambda v: setattr(_ClassScale, "scale", v),
            (),
        ),
        "class attribute by the class's name": (
            idf.ImplicitFunction(
                lambda x: jnp.sqrt(x) * _ClassScale.scale,
                lambda x, y: (y / _ClassScale.scale) ** 2 - x,
            ),
            lambda v: setattr(_ClassScale, "scale", v),
            (),
        ),
    }
    try:
        for name, (f, set_scale, args) in cases.items():
            gradient = jax.grad(lambda x: f(x, *args).sum())  # noqa: B023
            for scale in (2.0, 3.0, 5.0):
                set_scale(scale)
                np.testing.assert_allclose(
                    f(X, *args), scale * np.sqrt(X), rtol=1e-6, err_msg=name
                )
                np.testing.assert_allclose(
                    gradient(X), scale * 0.5 / np.sqrt(X), rtol=1e-6, err_msg=name
                )
    finally:
        SCALE, LARGE_TABLE[7], _ClassScale.scale = 2.0, 1.0, 2.0


def test_state_that_cannot_be_seen_runs_eagerly():
    """An object whose state is in slots: its calls run eagerly, and stay right."""
    from implicitdiff._user_code import OPAQUE, outside_values

    class Slotted:
        __slots__ = ("scale",)

        def __init__(self):
            self.scale = 2.0

        def forward(self, x):
            return jnp.sqrt(x) * self.scale

        def conditions(self, x, y):
            return (y / self.scale) ** 2 - x

    problem = Slotted()
    assert outside_values(problem.forward, problem.conditions) is OPAQUE
    f = idf.ImplicitFunction(problem.forward, problem.conditions)
    for scale in (2.0, 3.0):
        problem.scale = scale
        np.testing.assert_allclose(f(X), scale * np.sqrt(X), rtol=1e-6)


def test_a_rebound_jax_array_is_seen_and_a_dead_one_matches_nothing():
    import gc

    from implicitdiff._user_code import _Identity, outside_values

    def forward(x):
        return jnp.sqrt(x) * weights

    def conditions(x, y):
        return (y / weights) ** 2 - x

    f = idf.ImplicitFunction(forward, conditions)
    for value in (2.0, 3.0):
        weights = jnp.asarray(value)  # a closure cell, rebound
        np.testing.assert_allclose(f(X), value * np.sqrt(X), rtol=1e-6)
    key = outside_values(forward, conditions)
    assert key == outside_values(forward, conditions)
    weights = jnp.asarray(3.0)  # an equal value, another array
    assert key != outside_values(forward, conditions)
    # Identity by weak reference: `id()` can be reused once an object is freed.
    array = np.zeros(10**5)
    identity = _Identity(array)
    assert identity == _Identity(array)
    del array
    gc.collect()
    assert identity != identity


def test_values_that_change_at_every_call_run_eagerly_after_a_few():
    """An eager loop that rebinds what the forward reads (parameters, say) would
    compile once per step: after a few values the call site runs eagerly, right at
    every step, and says so once."""
    traces = []

    def forward(x):
        traces.append(1)
        return jnp.sqrt(x) * weights

    def conditions(x, y):
        return (y / weights) ** 2 - x

    f = idf.ImplicitFunction(forward, conditions)
    messages = []
    for step in range(10):
        weights = jnp.asarray(1.0 + step)
        y, caught_now = caught(f, X)  # one call site for every step
        messages += caught_now
        np.testing.assert_allclose(y, (1.0 + step) * np.sqrt(X), rtol=1e-6)
    assert sum("run eagerly" in m for m in messages) == 1
    # Four compiled values (one trace each), then eager calls (one run each).
    assert len(traces) == 10


def test_one_line_calling_many_implicit_functions_keeps_compiling_each():
    """A helper line that calls several functions, each with its own constant
    outside values, is no loop of changing values: nothing runs eagerly."""

    def scaled(scale):  # each function closes over its own constant `scale`
        return idf.ImplicitFunction(
            lambda x: jnp.sqrt(x) * scale, lambda x, y: (y / scale) ** 2 - x
        )

    functions = [scaled(scale) for scale in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)]

    def evaluate(f):
        return caught(f, X)

    for _ in range(2):
        for scale, f in zip((1.0, 2.0, 3.0, 4.0, 5.0, 6.0), functions, strict=True):
            y, messages = evaluate(f)
            np.testing.assert_allclose(y, scale * np.sqrt(X), rtol=1e-6)
            assert not any("run eagerly" in m for m in messages)


def _byproduct_cases():
    """(forward, conditions, x): forwards returning (y, z) with z computed from x."""
    sqrt3 = (
        lambda x: (jnp.sqrt(3 * x), 2 * x),
        lambda x, y, z: y**2 - z - x,
        jnp.array([4.0, 9.0]),
    )

    def cholesky_forward(x):  # a factorisation of A(x), reused by the conditions
        L = jnp.linalg.cholesky(jnp.diag(x) + 1.0)
        return jax.scipy.linalg.cho_solve((L, True), jnp.ones(2)), L

    cholesky = (
        cholesky_forward,
        lambda x, y, L: L @ (L.T @ y) - jnp.ones(2) + 0 * x,
        jnp.array([2.0, 3.0]),
    )

    def loop_forward(x):  # z changes in a loop whose trip count depends on x
        def body(carry):
            y, z = carry
            return 0.5 * (y + x / y), z + 1.0

        def unfinished(carry):
            return jnp.max(jnp.abs(carry[0] ** 2 - x)) > 1e-12

        return jax.lax.while_loop(unfinished, body, (jnp.ones_like(x), 0.0))

    loop = (loop_forward, lambda x, y, z: (1 + z) * (y**2 - x), jnp.array([4.0, 9.0]))
    return {"sqrt3": sqrt3, "cholesky": cholesky, "loop": loop}


@pytest.mark.parametrize("case", ["sqrt3", "cholesky", "loop"])
@pytest.mark.parametrize("mode", [jax.jacfwd, jax.jacrev])
def test_a_byproduct_computed_from_x_and_read_by_the_conditions_is_refused(case, mode):
    # Held constant, such a z gave finite wrong derivatives: 0.144 for the true 0.433
    # (sqrt3), [0, 0] for [-0.125, -0.083] (cholesky). The loop's z (an iteration
    # count as a float) is a true dependence too, through the trip count.
    forward, conditions, x = _byproduct_cases()[case]
    f = idf.ImplicitFunction(forward, conditions, has_byproduct=True)
    with pytest.warns(UserWarning, match=r"the byproduct z is computed from"):
        jac = jax.jit(mode(lambda x: f(x)[0]))(x)
    assert bool(jnp.all(jnp.isnan(jac)))
    loud = idf.ImplicitFunction(
        forward, conditions, has_byproduct=True, on_failure="raise"
    )
    with pytest.raises(idf.OnFailureError, match="byproduct"):
        mode(lambda x: loud(x)[0])(x)


@pytest.mark.parametrize("x_moves", [False, True])
def test_a_byproduct_from_a_value_the_forward_closes_over_is_refused(x_moves):
    # The forward closes over `a` (differentiated) and returns z = a, read by the
    # conditions: the rule, which does not differentiate the forward, gave 0.0 for the
    # true 5.0 (x fixed), silently, in every mode.
    x = jnp.array([1.0, 4.0])

    def outer(a, x=x):
        f = idf.ImplicitFunction(
            lambda x: (x * a, a * 1.0), lambda x, y, z: y - x * z, has_byproduct=True
        )
        return jnp.sum(f(x * a if x_moves else x)[0])

    derivatives = {
        "grad": lambda: jax.grad(outer)(3.0),
        "jit grad": lambda: jax.jit(jax.grad(outer))(3.0),
        "jvp": lambda: jax.jvp(outer, (3.0,), (1.0,))[1],
        "vmap grad": lambda: jax.vmap(jax.grad(outer))(jnp.array([2.0, 3.0])),
    }
    for mode, derivative in derivatives.items():
        with pytest.warns(UserWarning, match=r"the byproduct z is computed from"):
            value = derivative()
        assert bool(jnp.all(jnp.isnan(value))), mode


def test_a_moving_byproduct_is_told_at_every_line_that_calls():
    # Told when tracing only, a second line that found the compiled program in the
    # cache got the NaN derivative without a word.
    f = idf.ImplicitFunction(
        lambda x: (2 * x, 2 * x), lambda x, y, z: y - z + 0 * x, has_byproduct=True
    )
    x = jnp.array([1.0, 4.0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = jax.jacrev(lambda x: f(x)[0])(x)
        second = jax.jacrev(lambda x: f(x)[0])(x + 1)
    lines = {w.lineno for w in caught if "the byproduct z" in str(w.message)}
    assert len(lines) == 2 and all(issubclass(w.category, UserWarning) for w in caught)
    assert bool(jnp.all(jnp.isnan(first)) & jnp.all(jnp.isnan(second)))
    quiet = idf.ImplicitFunction(
        lambda x: (2 * x, 2 * x),
        lambda x, y, z: y - z + 0 * x,
        has_byproduct=True,
        on_failure="nan",
    )
    with pytest.warns(UserWarning, match="the byproduct z"):  # when tracing
        assert bool(jnp.all(jnp.isnan(jax.jacfwd(lambda x: quiet(x)[0])(x))))


def test_a_value_the_forward_closes_over_moves_y_only_through_the_conditions():
    # Closed over by the forward only (a starting point, a step size): by the implicit
    # function theorem y does not depend on it; an unread or stopped byproduct from it
    # changes nothing. No warning, derivative zero (and exact in x).
    x = jnp.array([4.0, 9.0])

    def through(a, byproduct, conditions):
        def forward(x):
            y = a * jnp.ones_like(x)
            for _ in range(40):
                y = 0.5 * (y + x / y)
            return y, byproduct(a)

        f = idf.ImplicitFunction(forward, conditions, has_byproduct=True)
        return jnp.sum(f(x)[0])

    cases = [
        (lambda a: 2 * a, lambda x, y, z: y**2 - x),  # unread
        (lambda a: jax.lax.stop_gradient(a), lambda x, y, z: z / z * (y**2 - x)),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for byproduct, conditions in cases:
            for derivative in (jax.grad, lambda f: jax.jit(jax.grad(f))):
                grad = derivative(lambda a: through(a, byproduct, conditions))(3.0)
                assert float(grad) == 0.0


def test_a_byproduct_that_is_constant_unread_or_stopped_is_accepted():
    x = jnp.array([4.0, 9.0])
    exact = jnp.diag(1 / (2 * jnp.sqrt(x)))

    def loop_forward(x):  # z passes through the loop unchanged
        def body(carry):
            y, z = carry
            return 0.5 * (y + x / y), z

        def unfinished(carry):
            return jnp.max(jnp.abs(carry[0] ** 2 - x)) > 1e-12

        return jax.lax.while_loop(unfinished, body, (jnp.ones_like(x), 2.0))

    cases = [
        # z from constants only, through a loop that depends on x
        (loop_forward, lambda x, y, z: z * (y**2 - x)),
        # z from x but not read by the conditions
        (lambda x: (jnp.sqrt(x), 2 * x), lambda x, y, z: y**2 - x),
        # z from x, read, but declared constant by the user
        (
            lambda x: (jnp.sqrt(x), jax.lax.stop_gradient(x + 1)),
            lambda x, y, z: (z / (x + 1)) * (y**2 - x),
        ),
        # an integer z (an iteration count)
        (lambda x: (jnp.sqrt(x), jnp.int32(3)), lambda x, y, z: z * (y**2 - x)),
    ]
    for forward, conditions in cases:
        f = idf.ImplicitFunction(forward, conditions, has_byproduct=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for mode in (jax.jacfwd, jax.jacrev):
                jac = jax.jit(mode(lambda x: f(x)[0]))(x)
                np.testing.assert_allclose(jac, exact, rtol=1e-6)


def test_byproduct_of_a_forward_that_cannot_be_traced():
    # A NumPy forward runs eagerly and cannot be read: not examined (no crash); one
    # wrapped by implicitdiff.host is a callback, taken to depend on its inputs.
    def forward(x):
        x = np.asarray(x)
        return np.sqrt(3 * x), 2 * x

    conditions = lambda x, y, z: y**2 - z - x
    x = jnp.array([4.0, 9.0])
    eager = idf.ImplicitFunction(forward, conditions, has_byproduct=True)
    assert bool(jnp.all(jnp.isfinite(jax.jacfwd(lambda x: eager(x)[0])(x))))
    shapes = lambda x: (jax.ShapeDtypeStruct(x.shape, x.dtype),) * 2
    hosted = idf.ImplicitFunction(
        idf.host(forward, shapes), conditions, has_byproduct=True
    )
    with pytest.warns(UserWarning, match="the byproduct z is computed from"):
        jac = jax.jit(jax.jacrev(lambda x: hosted(x)[0]))(x)
    assert bool(jnp.all(jnp.isnan(jac)))
