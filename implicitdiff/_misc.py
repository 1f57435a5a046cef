"""Small pytree helpers shared by the implicit rule and the solvers."""

import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, PyTree


def structure(tree: PyTree) -> PyTree[jax.ShapeDtypeStruct]:
    """The shapes and dtypes of a pytree of arrays (or of `ShapeDtypeStruct`s)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def ravel(tree: PyTree[Array]) -> Array:
    """Concatenates every leaf of `tree` into one vector."""
    return jfu.ravel_pytree(tree)[0]


def unravel(flat: Array, like: PyTree[jax.ShapeDtypeStruct]) -> PyTree[Array]:
    """Splits the vector `flat` into a pytree with the structure of `like`."""
    leaves, treedef = jax.tree.flatten(like)
    sizes = [int(np.prod(leaf.shape)) for leaf in leaves]
    pieces = jnp.split(flat, np.cumsum(sizes)[:-1]) if leaves else []
    return jax.tree.unflatten(
        treedef,
        [
            p.reshape(leaf.shape).astype(leaf.dtype)
            for p, leaf in zip(pieces, leaves, strict=True)
        ],
    )


def size(tree: PyTree) -> int:
    """The number of elements in a pytree of arrays or `ShapeDtypeStruct`s."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def all_finite(tree: PyTree[Array]) -> Bool[Array, ""]:
    """Whether every element of every leaf is finite."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def nan_unless(ok: Bool[Array, ""], tree: PyTree[Array]) -> PyTree[Array]:
    """`tree` where `ok`, else the same structure filled with NaN."""
    return jax.tree.map(lambda leaf: jnp.where(ok, leaf, jnp.nan), tree)


def is_inexact_array(leaf) -> bool:
    """Whether `leaf` is a floating or complex JAX/NumPy array."""
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic)) and jnp.issubdtype(
        leaf.dtype, jnp.inexact
    )
