"""Small pytree helpers shared by the implicit rule and the solvers."""

import functools as ft

import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, Bool, Float, PyTree


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


def probes(structure: PyTree[jax.ShapeDtypeStruct]) -> Float[Array, "4 n"]:
    """Four fixed flat vectors of ∞-norm 1 shaped like `structure`: ones, alternating
    signs, and cosine and sine of golden-angle steps. A matrix that annihilates one of
    them (`L·1 = 0` for a Laplacian) rarely annihilates them all."""
    n = size(structure)
    dtype = jnp.result_type(*(leaf.dtype for leaf in jax.tree.leaves(structure)))
    k = jnp.arange(n, dtype=dtype)
    return jnp.stack(
        [jnp.ones_like(k), (-1.0) ** k, jnp.cos(2.39996 * k), jnp.sin(2.39996 * k)]
    )


@ft.singledispatch
def operator_norm_lower_bound(operator) -> Float[Array, ""]:
    """A lower bound of `‖A‖∞`: for a matrix-free operator the largest `‖A p‖∞` over
    the `probes`, in one batched product; exact (the largest absolute row sum) for an
    operator that stores its matrix, which registers its own rule."""
    in_structure = operator.in_structure()
    products = jax.vmap(lambda p: ravel(operator.mv(unravel(p, in_structure))))(
        probes(in_structure)
    )
    return jnp.max(jnp.abs(products))


def max_abs(tree: PyTree[Array]) -> Float[Array, ""]:
    """`max |element|` over all leaves: NaN if any element is NaN, 0 if empty."""
    return jnp.max(jnp.abs(ravel(tree)), initial=0)


def credible(
    norm_bound: Float[Array, ""], x: PyTree[Array], b: PyTree[Array]
) -> Bool[Array, ""]:
    """Whether `x` can be the solution of `A x = b`, given `norm_bound ≤ ‖A‖∞`:
    `x` and `b` finite, and `x` not proving `κ∞(A) > 1/(n·ε)`.

    `‖x‖ ≤ ‖A⁻¹‖ ‖b‖`, so `κ∞(A) = ‖A‖∞ ‖A⁻¹‖∞ ≥ norm_bound·‖x‖∞ / ‖b‖∞`. Past
    `1/(n·ε)` the system is numerically singular and `x` carries no correct digit:
    LU with partial pivoting can return such an `x`, finite and with a small
    residual, from a singular matrix that had no small pivot. `norm_bound = inf`
    accepts only `x = 0`. One reduction over `x` and one over `b`: NaN and inf
    propagate through `max_abs` and fail the comparison.
    """
    x_max, b_max = max_abs(x), max_abs(b)
    n = size(x)
    eps = jnp.finfo(jnp.result_type(*jax.tree.leaves(x))).eps
    bounded = (norm_bound * (n * eps) * x_max <= b_max) | (x_max == 0)
    return jnp.isfinite(b_max) & bounded


@operator_norm_lower_bound.register(lx.MatrixLinearOperator)
def _(operator) -> Float[Array, ""]:
    return jnp.max(jnp.sum(jnp.abs(operator.matrix), axis=1), initial=0)


@operator_norm_lower_bound.register(lx.TaggedLinearOperator)
def _(operator) -> Float[Array, ""]:
    return operator_norm_lower_bound(operator.operator)
