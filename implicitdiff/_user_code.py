"""The user's side of the implicit rule: calling `forward` and `conditions`, making
the tracers they close over explicit, and errors and warnings that name the fix. The
rule itself (`_implicit_function.py`) only calls in; `_validation.py` checks what
the user's functions return."""

import functools as ft
import hashlib
import types
import weakref
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jaxtyping import Array, PyTree

from ._dependence import outputs_depending
from ._failure import (
    CallSite,
    OnFailure,
    OnFailureError,
    SiteNumber,
    apply_policy,
    tracing_site,
)
from ._misc import is_inexact_array, name_of, tracing
from ._validation import split_output

# Raised when code converts a tracer to a Python or NumPy value: the forward is NumPy
# or SciPy (or branches on its inputs in Python) and cannot run under a transform.
_TRACER_ERRORS = (
    jax.errors.TracerArrayConversionError,
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)


class UntraceableError(TypeError):
    """User code that cannot run on traced values (NumPy, or Python branches on
    array values)."""


UNTRACEABLE = (UntraceableError, *_TRACER_ERRORS)


class Precomputed(eqx.Module):
    """A forward already run on concrete inputs: returns its output. Its arrays are
    held by the forward, so they get zero derivative, as any forward's do."""

    output: object

    def __call__(self, *args, **kwargs):
        return self.output


def has_tracers(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def call_forward(forward: Callable, x, args, kwargs):
    """Calls the forward; an exception gets a note naming it, and a forward that
    cannot run on traced values gets an error that names the fix."""
    try:
        return forward(x, *args, **kwargs)
    except _TRACER_ERRORS as error:
        raise _untraceable_forward_error(forward) from error
    except Exception as error:
        error.add_note(
            f"(raised by the forward {name_of(forward)} of an "
            "implicitdiff.ImplicitFunction)"
        )
        raise


def _untraceable_forward_error(forward) -> UntraceableError:
    return UntraceableError(
        f"ImplicitFunction: the forward {name_of(forward)} cannot run on traced values "
        "(it converts its inputs to NumPy, or branches on them in Python), and its "
        "inputs are traced here (under jax.jit, jax.vmap, or a derivative with respect "
        "to them). Wrap it so that it runs on the host: "
        "forward = implicitdiff.host(forward, result_shape=...)."
    )


def hoist_closed_over_tracers(
    forward: Callable,
    conditions: Callable,
    x,
    args,
    kwargs,
    has_byproduct: bool,
) -> tuple[Callable, Callable, bool]:
    """Makes the tracers that `forward` and `conditions` close over explicit, and
    traces the forward once.

    A closure over a value being differentiated would otherwise leak a tracer into the
    custom rule. Under a transformation the forward is traced here into a `Replay`:
    what it closes over becomes its array leaves (with zero derivative: `y` depends on
    them only through `c`), and the rule's calls of the forward replay this one trace
    instead of running the user's Python again. The conditions are closure-converted
    only when they close over a tracer (also through a default argument); otherwise
    they are called as they are. Returns `(forward, conditions, replayable)`,
    `replayable` being whether the forward is a `Replay`.

    A forward that JAX cannot trace (NumPy, SciPy) is run here, on its concrete inputs,
    and replaced by its output; with traced inputs it is left to run on the concrete
    primal values inside the rule, which `call_forward` turns into an error naming the
    fix when they are not concrete either (under `jit`).
    """
    if not tracing():
        return forward, conditions, False
    try:
        forward = Replay.trace(forward, x, args, kwargs)
        output_structure = forward.out_struct
    except UNTRACEABLE:
        if has_tracers((x, args, kwargs)):
            # It may still run on the concrete primal values inside the rule (under
            # `grad` without `jit`); if not, `call_forward` names the fix. Its output
            # is unknown here: the conditions are converted for a `y` shaped like `x`.
            converted = _try_convert(conditions, x, (x, x), args, kwargs, False)
            return forward, converted, False
        forward = Precomputed(call_forward(forward, x, args, kwargs))
        output_structure = forward.output
    y_and_z = split_output(output_structure, has_byproduct)
    converted = _try_convert(conditions, x, y_and_z, args, kwargs, has_byproduct)
    return forward, converted, isinstance(forward, Replay)


def cached(fn: Callable) -> Callable:
    """`jax.jit(fn)`, whose trace a second call at the same input types reuses, also
    from inside a JVP rule. JAX keys its cache on the abstract mesh in context too,
    which is unset at the top of a trace and empty inside `jit`'s linearisation; the
    empty one is set here for both."""
    jitted = jax.jit(fn)

    def call(*args):
        with jax.sharding.use_abstract_mesh(jax.sharding.get_abstract_mesh()):
            return jitted(*args)

    return call


class Replay(eqx.Module):
    """A forward traced once, at the rule's inputs. A call replays its jaxpr through a
    `jax.jit` made for it, so that calling it again at the same inputs (the primal is
    traced twice: for itself and inside the JVP rule) hits that jit's cache. Its
    arrays are the constants and tracers the forward closes over."""

    consts: list
    replay: Callable = eqx.field(static=True)
    out_dynamic_struct: Any = eqx.field(static=True)
    out_static: Any = eqx.field(static=True)

    @classmethod
    def trace(cls, forward: Callable, x, args, kwargs) -> "Replay":
        dynamic, static = eqx.partition((x, args, kwargs), eqx.is_array)
        leaves, treedef = jax.tree.flatten(dynamic)
        out_static = []

        def flat_forward(*leaves):
            x, args, kwargs = eqx.combine(jax.tree.unflatten(treedef, leaves), static)
            out_dynamic, out_static_part = eqx.partition(
                call_forward(forward, x, args, kwargs), eqx.is_array
            )
            out_static.append(out_static_part)
            return out_dynamic

        closed, out_dynamic_struct = jax.make_jaxpr(flat_forward, return_shape=True)(
            *leaves
        )
        replay = cached(ft.partial(jax.core.eval_jaxpr, closed.jaxpr))
        return cls(list(closed.consts), replay, out_dynamic_struct, out_static[0])

    @property
    def out_struct(self):
        return eqx.combine(self.out_dynamic_struct, self.out_static)

    def __call__(self, x, *args, **kwargs):
        leaves = jax.tree.leaves(eqx.filter((x, args, kwargs), eqx.is_array))
        out_leaves = self.replay(self.consts, *leaves)
        out_treedef = jax.tree.structure(self.out_dynamic_struct)
        out_dynamic = jax.tree.unflatten(out_treedef, out_leaves)
        return eqx.combine(out_dynamic, self.out_static)


def _try_convert(conditions, x, y_and_z, args, kwargs, has_byproduct):
    """The conditions, closure-converted if they close over a tracer."""
    if not _may_close_over_tracers(conditions):
        return conditions
    y, z = y_and_z
    extra = (z,) if has_byproduct else ()
    try:
        converted = _closure_convert(conditions, x, y, *extra, *args, **kwargs)
    except Exception:  # reported with a note when the conditions are first called
        return conditions
    return converted if has_tracers(converted) else conditions


def _closure_convert(fn, *args, **kwargs):
    """`equinox.filter_closure_convert`, also for a function without a closure whose
    default arguments are traced (equinox passes closure-free functions through)."""
    return eqx.filter_closure_convert(
        lambda *args, **kwargs: fn(*args, **kwargs), *args, **kwargs
    )


def _may_close_over_tracers(fn) -> bool:
    """False for a plain function with no closure, no traced default argument and no
    tracer among the globals it reads (a dict entry set to the value being
    differentiated, say: left unconverted, it leaked into the rule)."""
    if not isinstance(fn, types.FunctionType) or fn.__closure__ is not None:
        return True
    return has_tracers((fn.__defaults__, fn.__kwdefaults__)) or _reads_tracers(fn)


def _reads_tracers(fn) -> bool:
    """Whether `fn` reads a tracer from outside its arguments (as `outside_values`
    follows them); True when that cannot be known."""
    reader = _Reader()
    try:
        reader.key(fn)
    except Exception:  # _Opaque, RecursionError, an object resisting inspection
        return True
    return reader.found_tracer


def warn_if_inputs_ignored(
    c_of_moving: Callable, moving, conditions, site: CallSite
) -> None:
    """Warns, once per call site, when differentiated inputs `moving` (a pytree
    `(conditions, x, args, kwargs)`) do not reach the conditions `c_of_moving(moving)`:
    their derivative is zero by construction."""
    leaves, treedef = jax.tree.flatten(moving)
    ignored = _unused_inputs(
        lambda *leaves: c_of_moving(jax.tree.unflatten(treedef, leaves)), leaves
    )
    if not ignored:
        return
    names = _input_names(moving)
    site.warn(
        f"implicitdiff: the conditions {name_of(conditions)} do not depend on the "
        f"differentiated input(s) {', '.join(names[i] for i in ignored)}: by the "
        "implicit function theorem their derivative is zero, whatever the forward "
        "does with them. If that is meant (an initial guess, a tolerance), pass them "
        "through jax.lax.stop_gradient or close over them in the forward; otherwise "
        "the conditions are missing a dependence.",
        UserWarning,
    )


def byproduct_moves(
    z_of_moving: Callable,
    moving,
    c_of_z: Callable,
    z,
    on_failure: OnFailure,
) -> str | None:
    """Whether a floating leaf of the byproduct `z` that the conditions `c_of_z(z)`
    read depends on the differentiated inputs `moving` in the forward
    (`z_of_moving(moving)`), found in their jaxprs at trace time. The implicit rule
    holds `z` constant: its derivative would then miss `∂c/∂z·dz/dx`. Returns the
    message naming the leaves (for `announce_moving_byproduct`) when it does, `None`
    otherwise; raises `OnFailureError` with `on_failure="raise"`."""
    z_leaves, z_def = jax.tree.flatten(z)
    floating = [i for i, leaf in enumerate(z_leaves) if is_inexact_array(leaf)]

    def c_of_floating(*values):
        leaves = list(z_leaves)
        for i, value in zip(floating, values, strict=True):
            leaves[i] = value
        return c_of_z(jax.tree.unflatten(z_def, leaves))

    unread = set(_unused_inputs(c_of_floating, [z_leaves[i] for i in floating]))
    read = [i for k, i in enumerate(floating) if k not in unread]
    if not read:
        return None
    m_leaves, m_def = jax.tree.flatten(moving)

    def z_read(*leaves):
        z = z_of_moving(jax.tree.unflatten(m_def, leaves))
        return [jax.tree.leaves(z)[i] for i in read]

    try:
        depending = outputs_depending(z_read, m_leaves, [True] * len(m_leaves))
    except UNTRACEABLE:  # a NumPy forward, run eagerly: nothing to read
        return None
    names = [
        "z" + jax.tree_util.keystr(path)
        for k, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(z)[0])
        if k in {i for i, d in zip(read, depending, strict=True) if d}
    ]
    if not names:
        return None
    message = (
        f"implicitdiff: the byproduct {', '.join(names)} is computed from the "
        "differentiated inputs and the conditions read it, but the implicit rule "
        "holds z constant: the derivative would miss ∂c/∂z·dz/dx and be wrong, so "
        "every derivative is NaN. Compute it inside the conditions from x and y "
        "instead, or, if ∂c/∂z = 0 at the solution (z only sets a step size, "
        "say), pass it through jax.lax.stop_gradient in the forward to say so."
    )
    if on_failure == "raise":
        raise OnFailureError(message)
    return message


def announce_moving_byproduct(
    message: str, on_failure: OnFailure, site: SiteNumber, tangents: PyTree[Array]
) -> PyTree[Array]:
    """`tangents` (already NaN), after telling `message` (from `byproduct_moves`):
    with `on_failure="warn"` at run time, from the program, as the failure policies
    do, so that every line that calls it is told, also when its compiled program is
    found in the cache; with `"nan"` (no callback in the program) when tracing."""
    if on_failure == "warn":
        failed = jnp.ones((), jnp.bool_)
        return apply_policy(tangents, failed, "warn", message, site, UserWarning)
    tracing_site().warn(message, UserWarning)
    return tangents


def _unused_inputs(fn: Callable, leaves: list) -> list[int]:
    """The indices of `leaves` that `fn(*leaves)` does not use at all (found in its
    jaxpr at trace time: no equation and no output reads them)."""
    jaxpr = jax.make_jaxpr(fn)(*leaves).jaxpr
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars if _is_var(v)}
    used |= {id(v) for v in jaxpr.outvars if _is_var(v)}
    return [i for i, v in enumerate(jaxpr.invars) if id(v) not in used]


def _is_var(v) -> bool:
    return isinstance(v, jex_core.Var) and not isinstance(v, jex_core.Literal)


def _input_names(diff) -> list[str]:
    """Readable names of the leaves of `diff = (conditions, x, args, kwargs)`."""
    roots = ("conditions", "x", "args", "kwargs")
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(diff)[0]:
        root, rest = roots[path[0].idx], jax.tree_util.keystr(path[1:])
        names.append(root + rest)
    return names


# What `outside_values` looks into: functions this many calls deep, at most this many
# objects in all, NumPy arrays by their bytes up to the first size and by a digest of
# them up to the second; past any of these limits the call runs eagerly.
_READ_DEPTH = 6
_OBJECTS_MAX = 2000
_CONTENT_BYTES_MAX = 1 << 16
_DIGEST_BYTES_MAX = 1 << 24
# Modules and functions of these packages read nothing of the user's that changes.
_LIBRARIES = frozenset(
    {"jax", "jaxlib", "numpy", "scipy", "equinox", "lineax", "optax", "optimistix"}
    | {"implicitdiff", "jaxtyping", "math", "cmath", "functools", "operator"}
    | {"builtins", "typing", "collections", "itertools", "numbers", "abc"}
)

# `outside_values`' answer when it cannot key what the functions read: an object
# whose state it cannot see (a class instance with slots, a file, a user module).
OPAQUE = object()


class _Opaque(Exception):
    pass


def outside_values(*objects: Any) -> Any:
    """What the user's Python code (`objects`: the forward, the conditions, and the
    non-array arguments of a call) reads from outside its arguments, as a hashable
    key, or `OPAQUE` when that cannot be known.

    A cached trace reads such values once. `ImplicitFunction`'s eager calls key
    their cache on this, so that a changed value (a loop that sets `lam` and calls
    again from the same line) is traced again and seen, as a plain eager call would
    see it, and run eagerly when it is `OPAQUE`. Followed: the closure cells and the
    module globals that functions name (and the functions among them, `_READ_DEPTH`
    calls deep), bound methods' objects, `functools.partial`s, `equinox.Module`s,
    and the attributes of plain objects, their classes' methods and attributes, the
    items of lists, tuples, dicts and sets,
    all by value; NumPy arrays by content, JAX arrays (immutable) by identity.
    Modules and functions of the libraries in `_LIBRARIES` are not looked into.
    """
    try:
        return _Reader().key(objects)
    except (_Opaque, RecursionError):
        return OPAQUE
    except Exception:  # an object that resists inspection: no cache
        return OPAQUE


class _Reader:
    def __init__(self):
        self.seen: dict[int, int] = {}  # id -> index of its key (cycles)
        self.alive: list = []  # what `seen` holds ids of: no id is reused meanwhile
        self.count = 0
        self.found_tracer = False

    def key(self, value, depth: int = _READ_DEPTH):
        self.count += 1
        if self.count > _OBJECTS_MAX:
            raise _Opaque
        if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
            return type(value).__name__, value  # 1, 1.0 and True trace differently
        if isinstance(value, (np.ndarray, np.generic)):
            return _array_key(value)
        if isinstance(value, jax.Array):
            self.found_tracer |= isinstance(value, jax.core.Tracer)
            return _Identity(value)
        if isinstance(value, type) and not _is_library(value.__module__):
            return self._class(value, depth)  # a class named as a global: `Cfg.lam`
        if id(value) in self.seen:
            return "seen", self.seen[id(value)]
        self.seen[id(value)] = len(self.seen)
        self.alive.append(value)
        if isinstance(value, types.ModuleType):
            if _is_library(value.__name__):
                return "library", _Identity(value)
            raise _Opaque  # a user's module: any of its attributes may change
        if isinstance(value, (types.BuiltinFunctionType, np.ufunc, type)):
            return "constant", _Identity(value)
        if isinstance(value, types.MethodType):
            return "method", self.key(value.__func__, depth), self.key(value.__self__)
        if isinstance(value, types.FunctionType):
            if _is_library(value.__module__) and value.__closure__ is None:
                return "library", _Identity(value)
            if depth <= 0:
                raise _Opaque
            return "function", _Identity(value), self._reads(value, depth - 1)
        if isinstance(value, ft.partial):
            parts = (value.func, value.args, value.keywords)
            return "partial", self.key(parts, depth)
        if isinstance(value, (tuple, list)):
            return type(value).__name__, tuple(self.key(v, depth) for v in value)
        if isinstance(value, (set, frozenset)):
            return "set", tuple(sorted(repr(self.key(v, depth)) for v in value))
        if isinstance(value, dict):
            items = value.items()
            return "dict", tuple((self.key(k), self.key(v, depth)) for k, v in items)
        if isinstance(value, eqx.Module):
            leaves, treedef = jax.tree.flatten(value)
            values = tuple(self.key(v, depth) for v in leaves)
            return "module", treedef, values, self._class(type(value), depth)
        if _is_library(type(value).__module__):
            if isinstance(value, np.dtype):
                return "dtype", value.str
            if not callable(value):  # a library's container or state: unseen
                raise _Opaque
            wrapped = getattr(value, "__wrapped__", None)  # jax.jit(f), ft.wraps
            return "library", _Identity(value), self.key(wrapped, depth)
        state = getattr(value, "__dict__", None)
        if not isinstance(state, dict) or hasattr(type(value), "__slots__"):
            raise _Opaque  # state we cannot see
        return "object", self._class(type(value), depth), self.key(state, depth)

    def _class(self, cls: type, depth: int):
        """What an instance's methods read (their globals and closures: `__call__`,
        and the helpers it calls through `self`) and the class attributes' values,
        for each class of `cls`' method resolution order outside the libraries."""
        if id(cls) in self.seen:
            return "seen", self.seen[id(cls)]
        self.seen[id(cls)] = len(self.seen)
        self.alive.append(cls)
        parts = [_Identity(cls)]
        for klass in cls.__mro__:
            if _is_library(klass.__module__):
                continue
            for name, attribute in vars(klass).items():
                if isinstance(attribute, (staticmethod, classmethod)):
                    attribute = attribute.__func__
                elif isinstance(attribute, property):
                    attribute = (attribute.fget, attribute.fset)
                elif not isinstance(attribute, types.FunctionType) and (
                    name.startswith("__") or name == "_abc_impl"
                ):
                    continue  # the class's own machinery: its name, doc, fields
                parts.append((name, self.key(attribute, depth)))
        return "class", tuple(parts)

    def _reads(self, fn: types.FunctionType, depth: int) -> tuple:
        cells = []
        for cell in fn.__closure__ or ():
            try:
                cells.append(self.key(cell.cell_contents, depth))
            except ValueError:  # a cell not yet filled
                cells.append(None)
        module_globals = fn.__globals__
        names = [n for n in _names(fn.__code__) if n in module_globals]
        defaults = (fn.__defaults__, fn.__kwdefaults__)
        return (
            tuple(cells),
            tuple((n, self.key(module_globals[n], depth)) for n in names),
            self.key(defaults, depth),
        )


def _is_library(module_name: str | None) -> bool:
    return (module_name or "").split(".")[0] in _LIBRARIES


def _array_key(value):
    if value.nbytes <= _CONTENT_BYTES_MAX:
        return "numpy", value.shape, value.dtype.str, value.tobytes()
    if value.nbytes <= _DIGEST_BYTES_MAX:
        digest = hashlib.blake2b(np.ascontiguousarray(value).view(np.uint8)).digest()
        return "numpy", value.shape, value.dtype.str, digest
    raise _Opaque


@ft.lru_cache(maxsize=4096)
def _names(code: types.CodeType) -> tuple[str, ...]:
    """The global names a code object reads, with those of the code nested in it
    (lambdas, comprehensions), in a fixed order."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_names(const))
    return tuple(sorted(names))


class _Identity:
    """Equal only to a key of the same live object. Unlike `id()`, which a new
    object can reuse once the first is freed, a weak reference to a dead object
    equals nothing."""

    __slots__ = ("_ref", "_hash")

    def __init__(self, obj):
        self._ref = weakref.ref(obj)
        self._hash = id(obj)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        if not isinstance(other, _Identity):
            return NotImplemented
        obj = self._ref()
        return obj is not None and obj is other._ref()
