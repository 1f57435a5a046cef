"""How a call of `ImplicitFunction` runs outside `jit`: compiled and cached as
`jax.jit` would, unless it cannot be."""

from collections.abc import Callable

import equinox as eqx
import jax

from ._user_code import UNTRACEABLE


def call_compiled(call: Callable, eager: bool, *args):
    """`call(*args)`, compiled and cached per `call` (a bound method of a module,
    whose static fields key the cache), non-array arguments and input shapes, as
    `jax.jit` does: outside `jit`, a call (and its derivatives) would otherwise re-trace
    the rule and run it op by op, 10× slower than jaxopt after the first call, and a
    first call 2-3× slower. Inside `jit` it is one nested call.

    It runs eagerly instead when `eager`, when the non-array parts of the call cannot
    key the cache, and when the user's code cannot be traced (a NumPy forward, say).
    """
    if eager or not _cacheable((call, args)):
        return call(*args)
    try:
        return _compiled(call, *args)
    except UNTRACEABLE:  # a NumPy forward, say: it runs eagerly, as before
        return call(*args)


@eqx.filter_jit
def _compiled(call: Callable, *args):
    return call(*args)


def _cacheable(tree) -> bool:
    """Whether `_compiled` should cache on the non-array parts of `tree`: they must
    hash (a SciPy matrix passed as an argument does not), and hold no Python float,
    which would be compiled in, once per value (a loop over `f(lam)` with Python
    floats). Otherwise the call runs eagerly, as it always could."""
    leaves, treedef = jax.tree.flatten(eqx.filter(tree, eqx.is_array, inverse=True))
    if any(isinstance(leaf, (float, complex)) for leaf in leaves):
        return False
    try:
        hash((tuple(leaves), treedef))
    except TypeError:
        return False
    return True
