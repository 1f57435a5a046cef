"""Euclidean projections onto convex sets, differentiable in the point and in the
set's parameters.

Each is a plain function of `v` (a pytree, treated as one vector where the set
couples its elements) and of its parameters, usable under `jit`, `vmap` and every
derivative. The simplex's threshold is a root: it is differentiated by the implicit
rule, never through the sort that finds it.
"""

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jaxtyping import Array, ArrayLike, Float, PyTree

from ._implicit_function import ImplicitFunction
from ._misc import ravel, structure, unravel
from ._solvers._direct import Direct


def broadcast_like(parameter, v):
    """`parameter` leaf by leaf with `v`: itself when it has `v`'s structure, else
    one array broadcast against every leaf."""
    if jax.tree.structure(parameter) == jax.tree.structure(v):
        return parameter
    return jax.tree.map(lambda _: parameter, v)


def _sum_of_squares(tree: PyTree[Array]) -> Array:
    return sum(jnp.sum(jnp.abs(leaf) ** 2) for leaf in jax.tree.leaves(tree))


def non_negative(v: PyTree[ArrayLike]) -> PyTree[Array]:
    """Projection onto the non-negative orthant: `max(v, 0)`.

    **Arguments:**

    - `v`: a pytree of arrays.

    **Returns:**

    `max(v, 0)`, leaf by leaf.
    """
    return jax.tree.map(lambda u: jnp.where(u > 0, u, 0).astype(u.dtype), v)


def box(
    v: PyTree[ArrayLike], lower: PyTree[ArrayLike], upper: PyTree[ArrayLike]
) -> PyTree[Array]:
    """Projection onto the box `{u: lower ≤ u ≤ upper}`: `clip(v, lower, upper)`.

    Differentiable in the bounds: an element at a bound (or beyond it) moves with it.

    **Arguments:**

    - `v`: a pytree of arrays.
    - `lower`, `upper`: the bounds, each a pytree shaped like `v` or one array
        broadcast against every leaf (`-jnp.inf`, `jnp.inf` for none).

    **Returns:**

    `clip(v, lower, upper)`, leaf by leaf.
    """

    def clip(u, lo, hi):
        # An element at a bound stays there (moves with the bound, not with u), as
        # `non_negative` keeps 0 at 0; equal bounds fix it (with `lo < u < hi` for
        # the free side, u = lo = hi once moved with u).
        return jnp.where(u <= lo, lo, jnp.where(u >= hi, hi, u)).astype(u.dtype)

    return jax.tree.map(clip, v, broadcast_like(lower, v), broadcast_like(upper, v))


def _simplex_threshold_by_sort(u: Float[Array, " n"], scale) -> Float[Array, ""]:
    """The `τ` with `Σ max(u − τ, 0) = scale`, exactly, from a descending sort
    (Held, Wolfe and Crowder's algorithm): the forward of the implicit threshold."""
    s = jnp.sort(u)[::-1]
    candidates = (jnp.cumsum(s) - scale) / jnp.arange(1, u.size + 1, dtype=u.dtype)
    # The largest element always qualifies, but `s[0] > s[0] − scale` fails when
    # `scale` is below the rounding unit of `s[0]`: then `candidates[-1]` (the last
    # one, a wrong threshold) would be taken, not the first.
    support = jnp.maximum(jnp.sum(s > candidates), 1)
    return candidates[support - 1]


def _on_support(u, tau):
    """The support `u ≥ τ`, elements at the threshold included: at a zero scale
    `τ = max(u)`, and the support is the largest elements, not empty."""
    return u >= tau


def _simplex_conditions(tau, u, scale):
    return jnp.sum(jnp.where(_on_support(u, tau), u - tau, 0)) - scale


# ∂c/∂τ = −|support|: a 1×1 system, never singular (the support is never empty).
_simplex_threshold = ImplicitFunction(
    lambda u, scale: _simplex_threshold_by_sort(u, scale),
    lambda u, tau, scale: _simplex_conditions(tau, u, scale),
    linear_solver=Direct(),
    check_conditions=None,  # the sort is exact: only rounding is left to find
)


def simplex(v: PyTree[ArrayLike], scale: ArrayLike = 1.0) -> PyTree[Array]:
    """Projection onto the simplex `{u ≥ 0: Σ u = scale}`: `max(v − τ, 0)` with
    `τ` the root of `Σ max(v − τ, 0) = scale`.

    The threshold `τ` is found by a sort and differentiated by the implicit rule
    (`dτ = (Σ_S dv − d scale)/|S|` on the support `S`), so the Jacobian in `v` is
    `diag(s) − s sᵀ/|S|` with `s` the support's indicator.

    **Arguments:**

    - `v`: a pytree of arrays, projected as one vector (all its elements sum to
        `scale`).
    - `scale`: the simplex's sum, non-negative. At zero the projection is 0 and its
        derivatives are the one-sided ones (for `scale → 0⁺`): zero in `v`, and in
        `scale` the largest elements' indicator over their number.

    **Returns:**

    The projection, shaped like `v`.
    """
    u = ravel(v)
    scale = jnp.asarray(scale, u.dtype)
    tau = _simplex_threshold(u, scale)
    support = _on_support(u, tau)
    # At a zero scale the projection is 0 whatever v (no derivative in v, also with
    # ties at the largest element, where u − τ would have one), and it grows with
    # the scale along the largest elements, shared equally.
    at_zero = jnp.where(support, scale / jnp.sum(support), 0)
    projected = jnp.where(scale == 0, at_zero, jnp.where(support, u - tau, 0))
    # `0·τ`: a NaN derivative of τ (a failed solve) reaches every output in forward
    # mode too, where `where` would drop it outside the support.
    return unravel(projected + 0 * tau, structure(v))


def l1_ball(v: PyTree[ArrayLike], radius: ArrayLike = 1.0) -> PyTree[Array]:
    """Projection onto the ℓ1 ball `{u: ‖u‖₁ ≤ radius}`: `v` inside, else
    `sign(v)·simplex(|v|, radius)` (Duchi et al., 2008).

    **Arguments:**

    - `v`: a pytree of arrays, projected as one vector.
    - `radius`: the ball's radius, non-negative. At zero the projection is 0 and its
        derivatives are the one-sided ones (for `radius → 0⁺`): zero in `v`, and in
        `radius` the signs of the largest elements of `|v|` over their number.

    **Returns:**

    The projection, shaped like `v`.
    """
    u = ravel(v)
    radius = jnp.asarray(radius, u.dtype)
    on_sphere = jnp.sign(u) * ravel(simplex(jnp.abs(u), radius))
    # A zero radius has no inside: the ball is {0}, v = 0 included (whose derivative
    # in v is then 0, not the identity).
    inside = (jnp.sum(jnp.abs(u)) <= radius) & (radius > 0)
    return unravel(jnp.where(inside, u, on_sphere), structure(v))


def l2_ball(v: PyTree[ArrayLike], radius: ArrayLike = 1.0) -> PyTree[Array]:
    """Projection onto the ℓ2 ball `{u: ‖u‖₂ ≤ radius}`: `v·min(1, radius/‖v‖₂)`.

    **Arguments:**

    - `v`: a pytree of arrays, projected as one vector (the norm over all leaves).
    - `radius`: the ball's radius, non-negative.

    **Returns:**

    The projection, shaped like `v`.
    """
    squared = _sum_of_squares(v)
    # A zero radius maps everything to 0, v = 0 too (where `‖v‖ > radius` fails):
    # its derivative in v is 0 there, not the identity.
    outside = (squared > radius**2) | (radius == 0)
    # The norm only where it is nonzero: its derivative at v = 0 would be NaN.
    norm = jnp.sqrt(jnp.where(squared > 0, squared, 1))
    factor = jnp.where(outside, radius / norm, 1)
    return jax.tree.map(lambda u: (factor * u).astype(u.dtype), v)


def hyperplane(
    v: PyTree[ArrayLike], a: PyTree[ArrayLike], b: ArrayLike
) -> PyTree[Array]:
    """Projection onto the hyperplane `{u: ⟨a, u⟩ = b}`:
    `v − (⟨a, v⟩ − b)/‖a‖²·a`.

    **Arguments:**

    - `v`: a pytree of arrays.
    - `a`: the normal, shaped like `v`, nonzero.
    - `b`: the offset, a scalar.

    **Returns:**

    The projection, shaped like `v`.
    """
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(v), strict=True)
    inner = sum(jnp.vdot(p, q) for p, q in leaves)
    shift = (inner - b) / _sum_of_squares(a)
    return jax.tree.map(lambda u, n: (u - shift * n).astype(u.dtype), v, a)


def affine(
    v: Float[ArrayLike, " n"], A: Float[ArrayLike, "m n"], b: Float[ArrayLike, " m"]
) -> Float[Array, " n"]:
    """Projection onto the affine subspace `{u: A u = b}`:
    `v − Aᵀ(A Aᵀ)⁻¹(A v − b)`, computed from a QR factorisation of `Aᵀ` (no
    normal equations: their condition number would be squared).

    **Arguments:**

    - `v`: a vector of `n` elements.
    - `A`: an `m × n` matrix of full row rank, `m ≤ n`.
    - `b`: a vector of `m` elements.

    **Returns:**

    The projection, a vector of `n` elements.
    """
    v, A, b = jnp.asarray(v), jnp.asarray(A), jnp.asarray(b)
    Q, R = jnp.linalg.qr(A.T)  # Aᵀ = QR, so A Aᵀ = Rᵀ R and Aᵀ(A Aᵀ)⁻¹ = Q R⁻ᵀ
    offset = jsl.solve_triangular(R, b, trans="T", lower=False)
    return v - Q @ (Q.T @ v) + Q @ offset
