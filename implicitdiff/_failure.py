"""What happens when a linear solve fails: the `on_failure` policies."""

import contextlib
import contextvars
import logging
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Literal, NamedTuple

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.interpreters import batching, mlir
from jaxtyping import Array, Bool, Int, PyTree

from ._misc import nan_where

OnFailure = Literal["nan", "warn", "raise"]
ON_FAILURE_CHOICES = ("nan", "warn", "raise")

# Frames from these packages are skipped when looking for the user's call site.
_LIBRARY_PREFIXES = ("implicitdiff", "jax", "jaxlib", "equinox", "lineax", "contextlib")


class OnFailureError(RuntimeError):
    """The error of `on_failure="raise"`: a derivative (or, with `check_conditions`,
    the forward's output) could not be computed correctly.

    Raised as such by a call outside `jit` whose forward's output fails its check.
    Otherwise (under `jit`, and from a failed solve in a derivative, which JAX runs
    as a program of its own even outside `jit`) it is raised on the host, inside the
    running program, and JAX turns it into a `jax.errors.JaxRuntimeError` whose
    message (the callback's traceback) ends with the line `OnFailureError: ` and this
    error's text: catch `(implicitdiff.OnFailureError, jax.errors.JaxRuntimeError)`.
    """


OnFailureError.__module__ = "implicitdiff"  # how tracebacks name it


class _DropOwnErrors(logging.Filter):
    """JAX logs the traceback of an exception raised in a callback before it re-raises
    it: for our own errors that is the message twice, once buried in frames."""

    def __init__(self):
        super().__init__()
        self.types: tuple[type, ...] = (OnFailureError,)

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, self.types)


_OWN_ERRORS = _DropOwnErrors()
# The loggers of `jax.debug.callback` and `jax.pure_callback`, in JAX's private
# modules; by name, not by import.
for _logger in ("jax._src.debugging", "jax._src.callback"):
    logging.getLogger(_logger).addFilter(_OWN_ERRORS)


def raise_on_every_device(host: Callable, *args: Array, error: type) -> None:
    """Stages `host(*args)`, which may raise `error`, to run on every device.

    Under sharding a `pure_callback` (or an unpartitioned debug callback) runs on one
    device: when it raised, the other devices waited for it at their next collective
    until XLA aborted the process (SIGABRT after 40 s, no Python exception). A
    partitioned debug callback returns nothing and runs on every device, so with
    arguments that every device holds whole (reduced over all of them) every device,
    in every process, stops with the error. JAX does not log the traceback of
    `error`: the message reaches the user once, at the end of JAX's error.
    (`partitioned` is not implemented on TPU, where the callback runs on one device.)
    """
    _OWN_ERRORS.types = tuple({*_OWN_ERRORS.types, error})
    partitioned = jax.default_backend() != "tpu"
    jax.debug.callback(host, *args, partitioned=partitioned)


class CallSite(NamedTuple):
    """Where the user called the implicit function: warnings point there."""

    filename: str
    lineno: int
    module: str

    @classmethod
    def of_caller(cls) -> "CallSite":
        frame = sys._getframe(1)
        while frame is not None:
            module = frame.f_globals.get("__name__", "")
            if module.split(".")[0] not in _LIBRARY_PREFIXES:
                return cls(frame.f_code.co_filename, frame.f_lineno, module)
            frame = frame.f_back
        return cls("<unknown>", 0, "__main__")

    def warn(self, message: str, category: type[Warning] = RuntimeWarning) -> None:
        module = sys.modules.get(self.module)
        registry = (
            module.__dict__.setdefault("__warningregistry__", {})
            if module is not None
            else None
        )
        warnings.warn_explicit(
            message, category, self.filename, self.lineno, self.module, registry
        )


# Every call site that has called an implicit function, numbered: a compiled program
# carries the number of the line that called it (`SiteNumber`), not the line itself.
_SITES: list[CallSite] = []
_SITE_NUMBERS: dict[CallSite, int] = {}
_SITES_LOCK = threading.Lock()
_CALLING_FROM: contextvars.ContextVar[CallSite | None] = contextvars.ContextVar(
    "implicitdiff_calling_from", default=None
)


class SiteNumber(eqx.Module):
    """A `CallSite` as a number that a compiled program takes as an input: an eager
    call's program is the same whichever line calls it (compiled once, not once per
    line: a notebook's every cell recompiled, 0.4 s for the README example), and its
    warnings at run time still name the line that called."""

    number: Int[Array | np.ndarray, ""]

    @classmethod
    def of(cls, site: CallSite) -> "SiteNumber":
        with _SITES_LOCK:
            if site not in _SITE_NUMBERS:
                _SITE_NUMBERS[site] = len(_SITES)
                _SITES.append(site)
            return cls(np.asarray(_SITE_NUMBERS[site], np.int32))


Site = CallSite | SiteNumber


@contextlib.contextmanager
def calling_from(site: CallSite) -> Iterator[None]:
    """The call site that warnings raised while tracing (inside this block) name."""
    token = _CALLING_FROM.set(site)
    try:
        yield
    finally:
        _CALLING_FROM.reset(token)


def tracing_site() -> CallSite:
    """The call site being traced: that of the innermost `calling_from`, or, for a
    rule traced outside any call (a saved jaxpr differentiated later), the caller's."""
    return _CALLING_FROM.get() or CallSite.of_caller()


def apply_policy(
    x: PyTree[Array],
    failed: Bool[Array, ""],
    policy: OnFailure,
    message: str,
    site: Site,
    category: type[Warning] = RuntimeWarning,
) -> PyTree[Array]:
    """NaN-fills `x` where `failed`, and warns (a `category`) or raises as `policy`
    says.

    Costs one `lax.cond` on an unbatched flag when nothing fails (see `announce`).
    Only the flag goes to the host, never `x`: a sharded `x` stays sharded.
    """
    flag = announce(failed, policy, message, site, category)
    if policy == "nan":
        return jax.tree.map(lambda leaf: nan_where(flag, leaf), x)
    # The callback is pure: XLA removes it when the result does not depend on its
    # output, as when constant folding finds that `x` is NaN anyway. Adding `0·flag`
    # (which XLA does not fold for floats) keeps it.
    return jax.tree.map(
        lambda leaf: nan_where(flag, leaf) + _zero_from(flag, leaf.dtype), x
    )


def announce(
    failed: Bool[Array, "*batch"],
    policy: OnFailure,
    message: str,
    site: Site,
    category: type[Warning] = RuntimeWarning,
) -> Bool[Array, "*batch"]:
    """`failed`, after warning or raising as `policy` says when it holds anywhere.

    What depends on the result keeps the warning or the error in the program (the
    callback is pure: XLA removes it otherwise). Costs one `lax.cond` on an unbatched
    flag when nothing fails: under `vmap` the flag is reduced over the batch (and, for
    sharded arrays, over every device), so that the cond is not turned into a
    `select` that would run the callback on every call.

    Without `vmap` the result is the cond's own output (`False`, or the callback's
    `True`): with `failed` read twice, by the cond and by the result, XLA:CPU gave
    every square root and division of the check before it a kernel of its own (40 ms
    more compilation for the 10-unknown √ gradient, a third of it).
    """
    if policy == "nan":
        return failed
    branch = _warn(message, site, category) if policy == "warn" else _raise(message)
    numbers = () if isinstance(site, CallSite) else (site.number,)
    any_failed = eqxi.unvmap_any(failed)
    told = lax.cond(
        any_failed,
        lambda *numbers: branch(jnp.ones((), jnp.bool_), *numbers),
        lambda *numbers: jnp.zeros((), jnp.bool_),
        *numbers,
    )
    return _within_batch(failed, told)


def _within_batch(failed: Bool[Array, "*batch"], told: Bool[Array, ""]) -> Array:
    """`told` (`any(failed)`, after the announcement), which is `failed` without
    `vmap`; `failed & told` under `vmap`, where it is each element's flag. A
    primitive: its batching rule only marks it batched, so nothing mixes a batched
    flag with an unbatched one at trace time (which fails on an explicitly sharded
    batch axis)."""
    return _within_batch_p.bind(failed, told, batched=False)


def _within_batch_impl(failed, told, *, batched):
    return failed & told if batched else told


def _within_batch_batching(args, dims, *, batched):
    failed, told = args
    failed_dim, told_dim = dims
    if told_dim is not None:  # a batched `told`: reduced over the batch
        told = jnp.any(jnp.moveaxis(told, told_dim, 0), axis=0)
    if failed_dim is None:
        return _within_batch_p.bind(failed, told, batched=batched), None
    return _within_batch_p.bind(failed, told, batched=True), failed_dim


_within_batch_p = jex_core.Primitive("implicitdiff_within_batch")
_within_batch_p.def_impl(_within_batch_impl)
_within_batch_p.def_abstract_eval(lambda failed, told, *, batched: failed)
batching.primitive_batchers[_within_batch_p] = _within_batch_batching
mlir.register_lowering(
    _within_batch_p, mlir.lower_fun(_within_batch_impl, multiple_results=False)
)


def _zero_from(flag: Bool[Array, ""], dtype) -> Array:
    return flag.astype(dtype) * jnp.zeros((), dtype)


def _warn(message: str, site: Site, category: type[Warning]):
    """A `pure_callback` whose output feeds the result (so it is not dead code): unlike
    `jax.debug.callback` it carries no effect token, whose mere presence costs ~70 µs
    per call on CPU. A `SiteNumber` goes to the host with the flag."""

    def host(flag, *number):
        (_SITES[int(number[0])] if number else site).warn(message, category)
        return flag

    return lambda flag, *numbers: jax.pure_callback(
        host, jax.ShapeDtypeStruct((), jnp.bool_), flag, *numbers
    )


def _raise(message: str):
    """Raises `OnFailureError`: with one device, from a `pure_callback` (no effect
    token: ~100 µs less per call on CPU than a debug callback); with several, on every
    device (the flag is reduced over all of them), as one raising alone would hang."""

    def host(flag):
        raise OnFailureError(f'{message} (on_failure="raise")')

    def branch(flag, *numbers):
        if jax.device_count() == 1:
            return jax.pure_callback(host, jax.ShapeDtypeStruct((), jnp.bool_), flag)
        raise_on_every_device(host, flag, error=OnFailureError)
        return flag

    return branch
