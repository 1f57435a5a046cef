"""How a call of `ImplicitFunction` runs outside `jit`: compiled and cached as
`jax.jit` would, unless it cannot be."""

import threading
from collections.abc import Callable, Hashable

import equinox as eqx
import jax

from ._failure import CallSite, OnFailureError
from ._user_code import UNTRACEABLE

# A call site whose outside values change at every call would compile once per value
# (an eager training loop that rebinds the parameters its forward reads): after this
# many distinct values it runs eagerly instead, and says so once.
_VALUES_PER_SITE = 4
# (call site, the function's identity) -> the `reads` compiled for them; a helper
# line that calls many implicit functions counts each apart. Bounded: a loop that
# builds a new function at every step adds an entry per step.
_SEEN_VALUES: dict[tuple[CallSite, int], set] = {}
_SEEN_MAX = 4096
_WARNED: set[CallSite] = set()
_SEEN_LOCK = threading.Lock()


def call_compiled(
    call: Callable,
    eager: bool,
    *args,
    reads: Hashable = (),
    site: CallSite | None = None,
):
    """`call(*args)`, compiled and cached per `call` (a bound method of a module,
    whose static fields key the cache), non-array arguments and input shapes, as
    `jax.jit` does: outside `jit`, a call (and its derivatives) would otherwise re-trace
    the rule and run it op by op, 10× slower than jaxopt after the first call, and a
    first call 2-3× slower. Inside `jit` it is one nested call.

    It runs eagerly instead when `eager`, when the non-array parts of the call cannot
    key the cache, and when the user's code cannot be traced (a NumPy forward, say).
    Python floats in `call`'s module (a solver's tolerance) are its configuration,
    fixed per module: they key the cache like any other static part. `reads`: what
    the user's functions read from outside their arguments (`outside_values`), which
    keys the cache too, so that a changed global is traced again; `call`'s module
    called from `site` with `reads` that keep changing runs eagerly after
    `_VALUES_PER_SITE` of them.
    """
    if eager or not _hashable((call, args)) or _holds_python_floats(args):
        return _reraising_own_error(call, *args)
    if site is not None and _keeps_changing(site, id(call.__self__), reads):
        return _reraising_own_error(call, *args)
    try:
        return _compiled(call, reads, *args)
    except UNTRACEABLE:  # a NumPy forward, say: it runs eagerly, as before
        return _reraising_own_error(call, *args)


def _reraising_own_error(call: Callable, *args):
    """`call(*args)`, run eagerly: an `OnFailureError` that its host callback raised
    comes out as itself, not inside JAX's `JaxRuntimeError`."""
    try:
        return call(*args)
    except jax.errors.JaxRuntimeError as error:
        marker = "OnFailureError: "
        text = str(error)
        if marker not in text:
            raise
        message = text[text.rindex(marker) + len(marker) :].strip()
        raise OnFailureError(message) from None


@eqx.filter_jit
def _compiled(call: Callable, reads: Hashable, *args):
    del reads  # only a key of the cache
    return call(*args)


def _keeps_changing(site: CallSite, function: int, reads: Hashable) -> bool:
    """Whether `function` (an identity) called from `site` has seen
    `_VALUES_PER_SITE` other `reads` before these (then warns, once per site)."""
    if not reads:
        return False
    with _SEEN_LOCK:
        if len(_SEEN_VALUES) > _SEEN_MAX:
            _SEEN_VALUES.clear()
        seen = _SEEN_VALUES.setdefault((site, function), set())
        if reads in seen or len(seen) < _VALUES_PER_SITE:
            seen.add(reads)
            return False
        first = site not in _WARNED
        _WARNED.add(site)
    if first:
        site.warn(
            "implicitdiff: the values that `forward` and `conditions` read from "
            f"globals or closures were different in {_VALUES_PER_SITE + 1} calls "
            "from this line; rather than compiling once per value, its calls now "
            "run eagerly (slower). Pass the values that change as arguments: they "
            "are then compiled once, and get derivatives.",
            UserWarning,
        )
    return True


def _static_parts(tree):
    return jax.tree.flatten(eqx.filter(tree, eqx.is_array, inverse=True))


def _hashable(tree) -> bool:
    """Whether the non-array parts of `tree` can key `_compiled`'s cache (a SciPy
    matrix passed as an argument cannot)."""
    leaves, treedef = _static_parts(tree)
    try:
        hash((tuple(leaves), treedef))
    except TypeError:
        return False
    return True


def _holds_python_floats(arguments) -> bool:
    """Python floats among the call's arguments would be compiled in, once per value
    (a loop over `f(lam)` with Python floats): such a call runs eagerly, as it always
    could."""
    leaves, _ = _static_parts(arguments)
    return any(isinstance(leaf, (float, complex)) for leaf in leaves)
