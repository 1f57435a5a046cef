"""How a call of `ImplicitFunction` runs outside `jit`: compiled and cached as
`jax.jit` would, unless it cannot be."""

from collections.abc import Callable, Hashable

import equinox as eqx
import jax

from ._user_code import UNTRACEABLE


def call_compiled(call: Callable, eager: bool, *args, reads: Hashable = ()):
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
    keys the cache too, so that a changed global is traced again.
    """
    if eager or not _hashable((call, args)) or _holds_python_floats(args):
        return call(*args)
    try:
        return _compiled(call, reads, *args)
    except UNTRACEABLE:  # a NumPy forward, say: it runs eagerly, as before
        return call(*args)


@eqx.filter_jit
def _compiled(call: Callable, reads: Hashable, *args):
    del reads  # only a key of the cache
    return call(*args)


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
