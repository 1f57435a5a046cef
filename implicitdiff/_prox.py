"""Proximal operators `prox_{s·h}(v) = argmin_u ½‖u − v‖² + s·h(u)`, differentiable
in `v` and in the strength `s`.

A strength must be non-negative (`s·h` is then convex and the argmin unique): a
negative or NaN one raises a `ValueError` as a Python or NumPy value, and makes the
output (and its derivatives) NaN where it applies as a JAX array.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PyTree

from ._misc import exponent_of
from ._projections import (
    as_arrays,
    broadcast_like,
    check_parameter,
    floating,
    non_negative_value,
    power_of_two,
    refuse_complex,
    where_valid,
)


def _leafwise(function: str, shrink, v, strength, real_only: bool = False):
    """`shrink(u, s)` leaf by leaf, `u` in floating point, `s` the strength of its
    elements, NaN where `s` is invalid (negative or NaN)."""
    check_parameter(function, "strength", strength, "non-negative", non_negative_value)
    v = as_arrays(v)
    refuse_complex(function, strength=strength, **({"v": v} if real_only else {}))

    def checked(u, s):
        u = floating(u)
        # The strength to u's shape: its derivative NaN only where it is invalid.
        s = jnp.broadcast_to(s, u.shape)
        return where_valid(s >= 0, lambda u, s: shrink(u, s).astype(u.dtype), u, s)

    return jax.tree.map(checked, v, broadcast_like(strength, v, "strength", function))


def l1(v: PyTree[ArrayLike], strength: PyTree[ArrayLike]) -> PyTree[Array]:
    """The proximal operator of `strength·‖·‖₁`, soft thresholding:
    `sign(v)·max(|v| − strength, 0)` (for complex `v`, `sign(v) = v/|v|`).

    **Arguments:**

    - `v`: a pytree of arrays (a list of numbers is one array).
    - `strength`: non-negative, a pytree shaped like `v` (one strength per element)
        or one array broadcast against every leaf.

    **Returns:**

    The soft-thresholded `v`: exactly zero where `|v| ≤ strength`.
    """

    def soft_threshold(u, s):
        # At zero strength the map is the identity, also at u = 0 (where `|u| > s`
        # fails): its derivative there is 1, not the 0 of the thresholded branch.
        kept = (jnp.abs(u) > s) | (s == 0)
        return jnp.where(kept, u - jnp.sign(u) * s, 0)

    return _leafwise("prox.l1", soft_threshold, v, strength)


def non_negative_l1(v: PyTree[ArrayLike], strength: PyTree[ArrayLike]) -> PyTree[Array]:
    """The proximal operator of `strength·‖·‖₁` plus the indicator of `u ≥ 0`:
    `max(v − strength, 0)`.

    **Arguments:**

    - `v`: a pytree of real arrays.
    - `strength`: non-negative, a pytree shaped like `v` or one array.

    **Returns:**

    `max(v − strength, 0)`, leaf by leaf.
    """

    def shrink(u, s):
        return jnp.where(u > s, u - s, 0)

    return _leafwise("prox.non_negative_l1", shrink, v, strength, real_only=True)


def l2_squared(v: PyTree[ArrayLike], strength: PyTree[ArrayLike]) -> PyTree[Array]:
    """The proximal operator of `strength·½‖·‖₂²`: `v / (1 + strength)`.

    **Arguments:**

    - `v`: a pytree of arrays.
    - `strength`: non-negative, a pytree shaped like `v` or one array.

    **Returns:**

    `v / (1 + strength)`, leaf by leaf.
    """
    return _leafwise("prox.l2_squared", lambda u, s: u / (1 + s), v, strength)


def group_l2(v: PyTree[ArrayLike], strength: ArrayLike) -> PyTree[Array]:
    """The proximal operator of `strength·Σ_g ‖v[g]‖₂` (group lasso), per leaf:
    group `g` is `v[g]`, the norm is over the trailing axes, and
    `prox(v)[g] = v[g]·max(0, 1 − strength/‖v[g]‖₂)`. For a vector (no trailing
    axes) it is soft thresholding. Each norm is taken of its group scaled by a power
    of two to `max|v[g]| ≈ 1`: no overflow or underflow of the squares.

    **Arguments:**

    - `v`: a pytree of arrays, the leading axis of each indexing its groups.
    - `strength`: non-negative, a scalar or one value per group (shape `(groups,)`,
        the same number of groups in every leaf).

    **Returns:**

    The shrunk `v`: group `g` exactly zero where `‖v[g]‖₂ ≤ strength`.
    """
    check_parameter(
        "prox.group_l2", "strength", strength, "non-negative", non_negative_value
    )
    refuse_complex("prox.group_l2", strength=strength)
    v = as_arrays(v)
    strength = jnp.asarray(strength)
    for leaf in jax.tree.leaves(v):
        _check_group_strength(strength, jnp.shape(leaf))

    def shrink(u):
        u = floating(u)
        s = jnp.reshape(strength, strength.shape + (1,) * (u.ndim - 1))
        return where_valid(s >= 0, _shrink_groups, u, s)

    return jax.tree.map(shrink, v)


def _shrink_groups(u: Array, s: Array) -> Array:
    axes = tuple(range(1, u.ndim))
    largest = jax.lax.stop_gradient(
        jnp.max(jnp.abs(u), axis=axes, keepdims=True, initial=0)
    )
    unit = power_of_two(-exponent_of(largest, headroom=2), u.dtype)
    w = u * unit  # each group's largest element in [½, 1)
    squared = jnp.sum(jnp.abs(w) ** 2, axis=axes, keepdims=True)
    # At zero strength the map is the identity, also for a zero group.
    kept = (squared > (s * unit) ** 2) | (s == 0)
    # The norm only where it is nonzero: its derivative at 0 would be NaN.
    norm = jnp.sqrt(jnp.where(squared > 0, squared, 1))
    # u − s·u/‖u‖ = u − s·w/‖w‖: no overflow.
    return jnp.where(kept, u - s * (w / norm), 0).astype(u.dtype)


def _check_group_strength(strength: Array, shape: tuple[int, ...]) -> None:
    groups = shape[0] if shape else 1
    per_group = strength.ndim == 1 and strength.shape[0] in (1, groups) and shape
    if strength.ndim != 0 and not per_group:
        raise ValueError(
            "implicitdiff.prox.group_l2: `strength` must be a scalar or one value per "
            f"group, shape ({groups},), for a leaf of shape {shape} (groups on its "
            f"leading axis); got shape {strength.shape}."
        )
