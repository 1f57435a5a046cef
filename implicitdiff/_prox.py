"""Proximal operators `prox_{s·h}(v) = argmin_u ½‖u − v‖² + s·h(u)`, differentiable
in `v` and in the strength `s`."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PyTree

from ._projections import broadcast_like


def l1(v: PyTree[ArrayLike], strength: PyTree[ArrayLike]) -> PyTree[Array]:
    """The proximal operator of `strength·‖·‖₁`, soft thresholding:
    `sign(v)·max(|v| − strength, 0)`.

    **Arguments:**

    - `v`: a pytree of arrays.
    - `strength`: non-negative, a pytree shaped like `v` (one strength per element)
        or one array broadcast against every leaf.

    **Returns:**

    The soft-thresholded `v`: exactly zero where `|v| ≤ strength`.
    """

    def soft_threshold(u, s):
        # At zero strength the map is the identity, also at u = 0 (where `|u| > s`
        # fails): its derivative there is 1, not the 0 of the thresholded branch.
        kept = (jnp.abs(u) > s) | (s == 0)
        return jnp.where(kept, u - jnp.sign(u) * s, 0).astype(u.dtype)

    return jax.tree.map(soft_threshold, v, broadcast_like(strength, v))


def non_negative_l1(v: PyTree[ArrayLike], strength: PyTree[ArrayLike]) -> PyTree[Array]:
    """The proximal operator of `strength·‖·‖₁` plus the indicator of `u ≥ 0`:
    `max(v − strength, 0)`.

    **Arguments:**

    - `v`: a pytree of arrays.
    - `strength`: non-negative, a pytree shaped like `v` or one array.

    **Returns:**

    `max(v − strength, 0)`, leaf by leaf.
    """

    def shrink(u, s):
        return jnp.where(u > s, u - s, 0).astype(u.dtype)

    return jax.tree.map(shrink, v, broadcast_like(strength, v))


def l2_squared(v: PyTree[ArrayLike], strength: PyTree[ArrayLike]) -> PyTree[Array]:
    """The proximal operator of `strength·½‖·‖₂²`: `v / (1 + strength)`.

    **Arguments:**

    - `v`: a pytree of arrays.
    - `strength`: non-negative, a pytree shaped like `v` or one array.

    **Returns:**

    `v / (1 + strength)`, leaf by leaf.
    """
    return jax.tree.map(
        lambda u, s: (u / (1 + s)).astype(u.dtype), v, broadcast_like(strength, v)
    )


def group_l2(v: PyTree[ArrayLike], strength: ArrayLike) -> PyTree[Array]:
    """The proximal operator of `strength·Σ_g ‖v[g]‖₂` (group lasso), per leaf:
    group `g` is `v[g]`, the norm is over the trailing axes, and
    `prox(v)[g] = v[g]·max(0, 1 − strength/‖v[g]‖₂)`. For a vector (no trailing
    axes) it is soft thresholding.

    **Arguments:**

    - `v`: a pytree of arrays, the leading axis of each indexing its groups.
    - `strength`: non-negative, a scalar or one value per group (shape `(groups,)`).

    **Returns:**

    The shrunk `v`: group `g` exactly zero where `‖v[g]‖₂ ≤ strength`.
    """

    def shrink(u):
        axes = tuple(range(1, u.ndim))
        squared = jnp.sum(jnp.abs(u) ** 2, axis=axes, keepdims=True)
        s = jnp.reshape(strength, jnp.shape(strength) + (1,) * (u.ndim - 1))
        # At zero strength the map is the identity, also for a zero group.
        kept = (squared > s**2) | (s == 0)
        # The norm only where it is nonzero: its derivative at 0 would be NaN.
        norm = jnp.sqrt(jnp.where(squared > 0, squared, 1))
        return jnp.where(kept, u * (1 - s / norm), 0).astype(u.dtype)

    return jax.tree.map(shrink, v)
