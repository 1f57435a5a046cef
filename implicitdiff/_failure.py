"""What happens when a linear solve fails: the `on_failure` policies."""

import sys
import warnings
from typing import Literal, NamedTuple

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, PyTree

OnFailure = Literal["nan", "warn", "raise"]
ON_FAILURE_CHOICES = ("nan", "warn", "raise")

# Frames from these packages are skipped when looking for the user's call site.
_LIBRARY_PREFIXES = ("implicitdiff", "jax", "jaxlib", "equinox", "lineax", "contextlib")


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


def apply_policy(
    x: PyTree[Array],
    failed: Bool[Array, ""],
    policy: OnFailure,
    message: str,
    site: CallSite,
) -> PyTree[Array]:
    """NaN-fills `x` where `failed`, and warns or raises as `policy` says.

    Costs one `lax.cond` on an unbatched flag when nothing fails: `unvmap_any` reduces
    the flag over every `vmap` axis, so the cond is not turned into a `select` that
    would run the callback on every call. Only the flag goes to the host, never `x`:
    a sharded `x` stays sharded. The warning is a `pure_callback` whose output feeds
    the result (so it is not dead code): unlike `jax.debug.callback` it carries no
    effect token, whose mere presence costs ~70 µs per call on CPU.
    """
    if policy == "warn":

        def warn(flag):
            def host(flag):
                site.warn(message)
                return flag

            return jax.pure_callback(host, jax.ShapeDtypeStruct((), jnp.bool_), flag)

        any_failed = eqxi.unvmap_any(failed)
        failed = failed & lax.cond(any_failed, warn, lambda flag: flag, any_failed)
    elif policy == "raise":
        failed = eqx.error_if(failed, failed, message)
    return jax.tree.map(lambda leaf: jnp.where(failed, jnp.nan, leaf), x)
