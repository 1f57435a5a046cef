"""Running NumPy/SciPy code (a forward, say) under JAX transforms."""

import functools as ft
import itertools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ._failure import raise_on_every_device


class HostFunctionError(RuntimeError):
    """A function wrapped by [`implicitdiff.host`][] raised."""


def host(
    fn: Callable,
    result_shape: PyTree[jax.ShapeDtypeStruct] | Callable | None = None,
) -> Callable:
    """Wraps a NumPy/SciPy function so that it runs under `jax.jit` and `jax.vmap`.

    The wrapped function calls `fn` on the host through `jax.pure_callback` (under
    `vmap`, once per batch element), with its array arguments as NumPy arrays, and
    returns JAX arrays of the declared shapes and dtypes. Called on concrete values
    (no `jit`), it simply calls `fn`.

    It is not differentiable by itself: use it as the `forward` of an
    [`implicitdiff.ImplicitFunction`][], which never differentiates its forward. (Out
    of `jit` a NumPy forward needs no wrapping: the implicit function then calls it
    on concrete values.)

    If `fn` raises, or returns something of the wrong shape, the call raises an error
    naming `fn` and quoting the original exception: a `HostFunctionError` out of
    `jit`, a `jax.errors.JaxRuntimeError` whose message ends with it under `jit` (the
    exception is caught on the host and re-raised from an effectful callback, never
    from inside the pure callback).

    **Arguments:**

    - `fn`: a function of arrays (pytrees of arrays) returning arrays.
    - `result_shape`: the structure of `fn`'s output: a pytree of
        `jax.ShapeDtypeStruct`, or a function taking the inputs' structures (pytrees
        of `jax.ShapeDtypeStruct`, same signature as `fn`) and returning one. Default:
        the shape and dtype of the first argument.

    **Returns:**

    The wrapped function, with the signature of `fn`.

    !!! Example

        ```python
        import numpy as np
        import scipy.optimize
        import implicitdiff as idf

        @idf.host
        def forward(theta):
            loss = lambda y: np.sum((y - theta) ** 2) + np.sum(y**4)
            return scipy.optimize.minimize(loss, np.zeros_like(theta)).x

        solve = idf.ImplicitFunction(forward, conditions)
        jax.jit(jax.grad(lambda t: solve(t).sum()))(theta)
        ```
    """
    name = getattr(fn, "__qualname__", None) or repr(fn)

    @ft.wraps(fn)
    def wrapped(*args, **kwargs):
        out_struct = _result_structure(result_shape, args, kwargs)
        inferred = result_shape is None
        leaves = jax.tree.leaves((args, kwargs))
        if not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            outputs, error = _call(fn, name, out_struct, inferred, args, kwargs)
            if error is not None:
                raise HostFunctionError(error[1]) from error[0]
            return jax.tree.map(jnp.asarray, outputs)

        def callback(*args, **kwargs):
            outputs, error = _call(fn, name, out_struct, inferred, args, kwargs)
            return outputs, np.int32(0 if error is None else _ERRORS.store(error))

        outputs, token = jax.pure_callback(
            callback,
            (out_struct, jax.ShapeDtypeStruct((), jnp.int32)),
            *args,
            vmap_method="sequential",
            **kwargs,
        )
        # One token for the batch, held by every device (see raise_on_every_device).
        token = eqxi.unvmap_max(token)
        raise_on_every_device(_ERRORS.raise_if_any, token, error=HostFunctionError)
        return outputs

    _HOST_FUNCTIONS.add(wrapped)
    return wrapped


_HOST_FUNCTIONS = weakref.WeakSet()


def is_host_function(fn) -> bool:
    """Whether `fn` was made by `host`."""
    try:
        return fn in _HOST_FUNCTIONS
    except TypeError:  # not weakly referenceable, so not ours
        return False


def _result_structure(result_shape, args, kwargs):
    if result_shape is None:
        if not args:
            raise TypeError(
                "implicitdiff.host: without result_shape, the function needs a "
                "positional argument whose shape and dtype the result takes."
            )
        return _structure(args[0])
    if callable(result_shape):
        return result_shape(*_structure(args), **_structure(kwargs))
    return result_shape


def _structure(tree):
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), tree
    )


def _call(fn, name, out_struct, inferred, args, kwargs):
    """Calls `fn` and checks its outputs; returns `(outputs, None)` or, when anything
    goes wrong, `(zeros, (exception, message))`. Never raises. `inferred`: whether
    `out_struct` was inferred from the first argument rather than declared."""
    try:
        args, kwargs = jax.tree.map(np.asarray, (args, kwargs))
        outputs = fn(*args, **kwargs)
    except Exception as e:
        message = f"implicitdiff.host: `{name}` raised {type(e).__name__}: {e}"
        return _zeros(out_struct), (e, message)
    try:
        return _conform(outputs, out_struct), None
    except Exception as e:
        origin = (
            "inferred from its first argument, as no result_shape was given: pass "
            "result_shape= (a pytree of jax.ShapeDtypeStruct, or a function of the "
            "arguments' structures) to declare its output"
            if inferred
            else "declared by result_shape"
        )
        message = f"implicitdiff.host: `{name}` {e}; the expected output was {origin}."
        return _zeros(out_struct), (e, message)


def _zeros(out_struct):
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), out_struct)


def _conform(outputs, out_struct):
    leaves, treedef = jax.tree.flatten(outputs)
    structs, expected = jax.tree.flatten(out_struct)
    if treedef != expected:
        raise TypeError(f"returned the structure {treedef}, expected {expected}")
    arrays = []
    for leaf, s in zip(leaves, structs, strict=True):
        array = np.asarray(leaf)
        if array.shape != s.shape:
            raise ValueError(f"returned shape {array.shape}, expected {s.shape}")
        arrays.append(array.astype(s.dtype))
    return jax.tree.unflatten(treedef, arrays)


class _ErrorSlots:
    """Exceptions caught on the host, held until the debug callback re-raises them."""

    def __init__(self, max_size: int = 64):
        self._errors = OrderedDict()
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._max_size = max_size

    def store(self, error) -> int:
        with self._lock:
            token = next(self._counter) % np.iinfo(np.int32).max
            self._errors[token] = error
            while len(self._errors) > self._max_size:
                self._errors.popitem(last=False)
            return token

    def raise_if_any(self, token) -> None:
        """Raises the error of `token` (0: none); every device raises the same one,
        so it stays stored (until 64 newer ones push it out)."""
        if not token:
            return
        with self._lock:
            exception, message = self._errors.get(int(token), (None, None))
        if message is None:
            message = "implicitdiff.host: the host function raised (details lost)."
        raise HostFunctionError(message) from exception


_ERRORS = _ErrorSlots()
