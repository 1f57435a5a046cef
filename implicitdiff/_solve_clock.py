"""Clock readings inside a traced program, for a `SolveLog`: read on the host by a
`jax.pure_callback` once the data they wait for is computed, and ordered against the
work they time by real data dependencies."""

import time

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PyTree

# Ticks are microseconds modulo 2³¹: an int32 is exact with or without x64, and
# differences modulo 2³¹ are right for any solve shorter than 35 minutes.
_TICK_MODULUS = 2**31
_INT32 = jax.ShapeDtypeStruct((), jnp.int32)


def tick_after(tree: PyTree) -> tuple[PyTree, Int[Array, ""]]:
    """Reads the clock on the host once `tree` is computed, and returns `tree` again,
    now computed only after the clock was read (so that what follows is timed from
    there), with the clock reading.

    XLA drops `optimization_barrier`s and folds products by zero, so the dependencies
    are real ones: the callback takes the first element of every leaf (reduced over
    the `vmap` axes, so that an unbatched operator or presolve state stays unbatched
    and one batched solve reads the clock once), and returns a zero that XLA cannot
    see through, subtracted from the first element of every leaf.
    """
    # JAX arrays only: NumPy leaves are trace-time constants, with nothing to wait for,
    # and a host solver may need them concrete.
    arrays, static = eqx.partition(tree, lambda leaf: isinstance(leaf, jax.Array))
    token = eqxi.unvmap_max(probe(arrays))
    tick, zero = jax.pure_callback(_read_clock, (_INT32, _INT32), token)
    return eqx.combine(after(arrays, zero), static), tick


def elapsed(start, end) -> float:
    """The seconds between two clock readings, on the host."""
    return ((int(end) - int(start)) % _TICK_MODULUS) * 1e-6


def probe(arrays: PyTree[Array]) -> Float[Array, ""]:
    """A scalar that needs the first element of every leaf of `arrays`."""
    firsts = [
        jnp.real(leaf[_origin(leaf)]).astype(jnp.float32)
        for leaf in jax.tree.leaves(arrays)
        if leaf.size
    ]
    return sum(firsts, jnp.zeros((), jnp.float32))


def after(arrays: PyTree[Array], zero: Int[Array, ""]) -> PyTree[Array]:
    """`arrays`, made to depend on `zero` (the opaque result of a callback, always 0):
    `zero` is subtracted from the first element of every leaf, which changes nothing
    (`v − 0 = v`, for `v = −0` and NaN too) and costs a one-element update."""

    def depend(leaf):
        if not leaf.size or leaf.dtype == jnp.bool_:
            return leaf
        origin = _origin(leaf)
        return leaf.at[origin].set(leaf[origin] - zero.astype(leaf.dtype))

    return jax.tree.map(depend, arrays)


def _origin(leaf) -> tuple[int, ...]:
    """The index of the first element; no reshape, which could reshard."""
    return (0,) * leaf.ndim


def _read_clock(token):
    now = (time.perf_counter_ns() // 1000) % _TICK_MODULUS
    return np.int32(now), np.zeros((), np.int32)
