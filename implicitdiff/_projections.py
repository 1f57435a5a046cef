"""Euclidean projections onto convex sets, differentiable in the point and in the
set's parameters.

Each is a plain function of `v` (a pytree, treated as one vector where the set
couples its elements) and of its parameters, usable under `jit`, `vmap` and every
derivative. The simplex's threshold is a root: it is differentiated by the implicit
rule, never through the sort that finds it.

Invalid parameters (a negative radius, crossed bounds) raise a `ValueError` when they
are Python or NumPy values, known at trace time; as JAX arrays (traced, or in a
program compiled once for every value) they make the projection NaN, and its
derivatives NaN too, where they apply.
"""

import functools as ft
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree

from ._failure import ON_FAILURE_CHOICES, CallSite, OnFailure, announce
from ._implicit_function import ImplicitFunction
from ._misc import (
    exponent_of,
    max_abs,
    max_or_nan,
    ravel,
    singular_threshold,
    structure,
    unravel,
)
from ._solvers._direct import Direct

# ---------------------------------------------------------------- inputs, shared by
# the projections and the proximal operators.


def as_arrays(tree: PyTree[ArrayLike]) -> PyTree[Array]:
    """`tree` with JAX arrays for leaves; a list or tuple of numbers (no arrays in
    it) is one array, as NumPy reads it, not a pytree of scalars."""
    leaves = jax.tree.leaves(tree)
    numbers = all(isinstance(leaf, (bool, int, float, complex)) for leaf in leaves)
    if isinstance(tree, (list, tuple)) and leaves and numbers:
        return jnp.asarray(tree)
    return jax.tree.map(jnp.asarray, tree)


def floating(leaf: Array) -> Array:
    """`leaf`, an integer or boolean one in the default float dtype: a projection
    cast back to integers would truncate it."""
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return leaf
    return leaf.astype(jax.dtypes.canonicalize_dtype(jnp.float64))


def refuse_complex(function: str, **trees: PyTree) -> None:
    """Raises a `TypeError` naming `function` and the argument when a leaf of one of
    `trees` is complex: for sets and penalties defined by an order (`u ≥ 0`), and
    for real parameters."""
    for name, tree in trees.items():
        for leaf in jax.tree.leaves(tree):
            if jnp.iscomplexobj(leaf):
                raise TypeError(
                    f"implicitdiff.{function}: `{name}` is complex "
                    f"({jnp.result_type(leaf)}): it is defined for real arrays only "
                    "(by an order, or a sign). Pass real arrays (the real and "
                    "imaginary parts as separate leaves, say)."
                )


# Parameters known at trace time (checked there), unlike JAX arrays.
_HOST_VALUES = (bool, int, float, np.ndarray, np.generic)


def check_parameter(
    function: str,
    name: str,
    value: PyTree[ArrayLike],
    requirement: str,
    is_valid: Callable[[np.ndarray], np.ndarray],
) -> None:
    """Raises a `ValueError` naming `function` and `name` when a Python or NumPy leaf
    of `value` fails `is_valid` somewhere. JAX arrays are not read (they may be traced,
    or on a device): the function makes its output NaN where they are invalid."""
    for leaf in jax.tree.leaves(value):
        if isinstance(leaf, _HOST_VALUES):
            if not np.all(is_valid(np.asarray(leaf))):
                raise ValueError(
                    f"implicitdiff.{function}: `{name}` must be {requirement}, got "
                    f"{leaf!r}. (As a JAX array, an invalid `{name}` makes the "
                    "output NaN.)"
                )


def non_negative_value(x: np.ndarray) -> np.ndarray:
    return x >= 0  # False for NaN


def where_valid(valid: Bool[Array, "*shape"], function: Callable, *inputs: PyTree):
    """`function(*inputs)` where `valid` (broadcast against every leaf of the inputs
    and of the output), NaN elsewhere, and so are its derivatives in both modes.

    A `where` on the output would give a NaN value a finite derivative. A product of
    the output with 1 or NaN makes every tangent NaN, but in reverse mode a NaN
    cotangent is dropped by any `where` inside `function` (an element not on the
    support, a bound not reached): the inputs' cotangents are multiplied by NaN too,
    after `function`, with their values untouched (`function` may replace an invalid
    parameter by a harmless one)."""
    inputs = jax.tree.map(ft.partial(_nan_derivative_unless, valid), inputs)
    return jax.tree.map(ft.partial(_nan_unless, valid), function(*inputs))


def _nan_unless(valid: Bool[Array, "*shape"], x: Array) -> Array:
    return x * _one_or_nan(valid, x.dtype)


def _one_or_nan(valid: Bool[Array, "*shape"], dtype) -> Array:
    return jnp.where(valid, 1, jnp.nan).astype(jnp.finfo(dtype).dtype)


@jax.custom_jvp
def _nan_derivative_unless(valid: Bool[Array, "*shape"], x: Array) -> Array:
    """`x`, whose tangent (and, transposed, cotangent) is NaN where not `valid`."""
    return x


@_nan_derivative_unless.defjvp
def _nan_derivative_unless_jvp(primals, tangents):
    valid, x = primals
    return x, tangents[1] * _one_or_nan(valid, x.dtype)


def broadcast_like(
    parameter: PyTree[ArrayLike], v: PyTree[Array], name: str, function: str
) -> PyTree[Array]:
    """`parameter` leaf by leaf with `v`: itself when it has `v`'s structure, else
    one array (a list of numbers is one) for every leaf, each shape checked against
    its leaf. Errors begin with `implicitdiff.{function}:`."""
    if jax.tree.structure(parameter) == jax.tree.structure(v):
        parameters = jax.tree.map(jnp.asarray, parameter)
    else:
        try:
            one = jnp.asarray(parameter)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"implicitdiff.{function}: `{name}` must be a pytree shaped like v "
                f"({jax.tree.structure(v)}) or one array, got "
                f"{jax.tree.structure(parameter)}."
            ) from error
        parameters = jax.tree.map(lambda _: one, v)
    for p, leaf in zip(jax.tree.leaves(parameters), jax.tree.leaves(v), strict=True):
        if not _broadcasts_to(p.shape, leaf.shape):
            raise ValueError(
                f"implicitdiff.{function}: `{name}` has shape {p.shape}, which does "
                "not broadcast to the "
                f"shape {leaf.shape} of v's leaf: give one value, or one per element."
            )
    return parameters


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    try:
        return np.broadcast_shapes(shape, target) == target
    except ValueError:
        return False


# ---------------------------------------------------------------- overflow-safe
# scaling by powers of two (exact, and of no derivative: the maps are homogeneous).


def power_of_two(exponent: Int[Array, "*shape"], dtype) -> Array:
    return jnp.ldexp(jnp.ones((), jnp.finfo(dtype).dtype), exponent)


def _normalised(tree: PyTree[Array]) -> tuple[PyTree[Array], Array]:
    """`(tree·2⁻ᵉ, 2⁻ᵉ)` with `max|tree·2⁻ᵉ|` in [½, 1) (unless 0): its sum of
    squares can neither overflow nor underflow (`3e19² = inf` in float32,
    `3e-200² = 0` in float64)."""
    real = jnp.finfo(jnp.result_type(*jax.tree.leaves(tree))).dtype
    unit = power_of_two(-exponent_of(max_abs(tree), headroom=2, dtype=real), real)
    # In the widest dtype: a float16 leaf next to float32 ones would overflow 2⁻ᵉ.
    return jax.tree.map(
        lambda leaf: leaf.astype(jnp.promote_types(leaf.dtype, real)) * unit, tree
    ), unit


def _sum_of_squares(tree: PyTree[Array]) -> Array:
    return sum(jnp.sum(jnp.abs(leaf) ** 2) for leaf in jax.tree.leaves(tree))


def _float_structure(tree: PyTree[Array]) -> PyTree[jax.ShapeDtypeStruct]:
    return jax.tree.map(
        lambda u: jax.ShapeDtypeStruct(u.shape, floating(u).dtype), tree
    )


# ---------------------------------------------------------------- the projections


def non_negative(v: PyTree[ArrayLike]) -> PyTree[Array]:
    """Projection onto the non-negative orthant: `max(v, 0)`.

    **Arguments:**

    - `v`: a pytree of real arrays (a list of numbers is one array).

    **Returns:**

    `max(v, 0)`, leaf by leaf.
    """
    v = as_arrays(v)
    refuse_complex("projections.non_negative", v=v)
    return jax.tree.map(lambda u: jnp.where(u > 0, u, 0).astype(u.dtype), v)


def box(
    v: PyTree[ArrayLike], lower: PyTree[ArrayLike], upper: PyTree[ArrayLike]
) -> PyTree[Array]:
    """Projection onto the box `{u: lower ≤ u ≤ upper}`: `clip(v, lower, upper)`.

    Differentiable in the bounds: an element at a bound (or beyond it) moves with it.

    **Arguments:**

    - `v`: a pytree of real arrays (a list of numbers is one array); integers are
        promoted to floats.
    - `lower`, `upper`: the bounds, `lower ≤ upper`, each a pytree shaped like `v`
        or one array broadcast against every leaf (`-jnp.inf`, `jnp.inf` for none).
        Crossed (or NaN) bounds raise a `ValueError` as Python or NumPy values and
        make those elements NaN as JAX arrays.

    **Returns:**

    `clip(v, lower, upper)`, leaf by leaf.
    """
    if lower is None or upper is None:
        raise TypeError(
            "implicitdiff.projections.box takes the bounds as two arguments, "
            "box(v, lower, upper), not jaxopt's projection_box(v, (lower, upper)); "
            "for no bound pass -jnp.inf or jnp.inf."
        )
    low, high = _numeric(lower), _numeric(upper)
    if low is not None and high is not None and _crossed(low, high):
        raise ValueError(
            "implicitdiff.projections.box: `lower` must be no greater than `upper` "
            f"(and neither NaN), got lower={lower!r}, upper={upper!r}. (As JAX "
            "arrays, crossed bounds make those elements NaN.)"
        )
    v = as_arrays(v)
    refuse_complex("projections.box", v=v, lower=lower, upper=upper)

    def clip(u, lo, hi):
        u = floating(u)
        # Each bound to u's shape: its derivative NaN only where it is crossed.
        lo, hi = (jnp.broadcast_to(bound, u.shape) for bound in (lo, hi))
        return where_valid(lo <= hi, _clip, u, lo, hi)

    lower = broadcast_like(lower, v, "lower", "projections.box")
    upper = broadcast_like(upper, v, "upper", "projections.box")
    return jax.tree.map(clip, v, lower, upper)


def _clip(u, lo, hi):
    # An element at a bound stays there (moves with the bound, not with u), as
    # `non_negative` keeps 0 at 0; equal bounds fix it (with `lo < u < hi` for the
    # free side, u = lo = hi once moved with u).
    return jnp.where(u <= lo, lo, jnp.where(u >= hi, hi, u)).astype(u.dtype)


def _numeric(x) -> np.ndarray | None:
    """`x` as a NumPy array when it is a Python number, a NumPy value or a list of
    numbers (known at trace time), else `None` (a JAX array, a pytree)."""
    if isinstance(x, _HOST_VALUES):
        return np.asarray(x)
    if isinstance(x, (list, tuple)):
        leaves = jax.tree.leaves(x)
        if leaves and all(isinstance(leaf, (bool, int, float)) for leaf in leaves):
            return np.asarray(x)
    return None


def _crossed(lower: np.ndarray, upper: np.ndarray) -> bool:
    try:
        return bool(np.any(~(lower <= upper)))  # True for NaN
    except ValueError:  # shapes that do not broadcast: reported with v's leaves
        return False


def _simplex_threshold_by_sort(u: Float[Array, " n"], scale) -> Float[Array, ""]:
    """The `τ` with `Σ max(u − τ, 0) = scale`, exactly, from a descending sort
    (Held, Wolfe and Crowder's algorithm): the forward of the implicit threshold.
    `u` is shifted to `max u = 0` (see `_simplex_units`): `τ = −scale` when the
    largest element alone is the support, without rounding."""
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


# ∂c/∂τ = −|support|: a 1×1 system, never singular, as the support is never empty for
# a finite `u` and a scale ≥ 0 (`simplex` passes no other: it NaNs an invalid scale
# itself). So no failure to report: on_failure="nan" (no host callback, which
# `jax.export` refuses), and a solve that fails anyway does so on a NaN or infinite
# `u` (or tangent), where the projection (or the tangent) is already NaN or infinite.
# No check of the conditions: the sort is exact, only rounding is left to find, and a
# check would turn a legitimate rounding error (a residual of `ε·n·scale`) into a
# NaN that nothing reports.
_simplex_threshold = ImplicitFunction(
    lambda u, scale: _simplex_threshold_by_sort(u, scale),
    lambda u, tau, scale: _simplex_conditions(tau, u, scale),
    linear_solver=Direct(),
    on_failure="nan",
    check_conditions=None,
)


def _simplex_units(
    u: Float[Array, " n"], scale: Float[Array, ""]
) -> tuple[Float[Array, " n"], Float[Array, ""], Float[Array, ""]]:
    """`((u − max u)·f, scale·f, f)`, `f` a power of two ≤ 1 (no derivative: the
    projection commutes with a common shift and a scaling of `u` and `scale`).

    Shifted, the threshold is of the size of `scale`, not of `u`: `v − τ` with
    `v = 10⁸`, `τ = 10⁸ − 1` is 0 in float32, and the projection of `[10⁸, 0, 0]` was
    0. Scaled down when the sums of the sort could overflow (`3·10³⁸` in float32)."""
    largest = lax.stop_gradient(jnp.maximum(jnp.max(jnp.abs(u)), scale))
    # |u − max u| ≤ 2·largest: the cumulative sums minus the scale stay below
    # (2n + 1)·largest, which the headroom keeps finite.
    headroom = int(np.ceil(np.log2(u.size + 1))) + 2
    exponent = exponent_of(largest, headroom=0)  # unclipped for finite values
    down = jnp.maximum(exponent + headroom - jnp.finfo(u.dtype).maxexp, 0)
    factor = power_of_two(-down, u.dtype)
    scaled = u * factor
    return scaled - lax.stop_gradient(jnp.max(scaled)), scale * factor, factor


def simplex(v: PyTree[ArrayLike], scale: ArrayLike = 1.0) -> PyTree[Array]:
    """Projection onto the simplex `{u ≥ 0: Σ u = scale}`: `max(v − τ, 0)` with
    `τ` the root of `Σ max(v − τ, 0) = scale`.

    The threshold `τ` is found by a sort and differentiated by the implicit rule
    (`dτ = (Σ_S dv − d scale)/|S|` on the support `S`), so the Jacobian in `v` is
    `diag(s) − s sᵀ/|S|` with `s` the support's indicator. Computed relative to
    `max v`: right to the rounding unit of `scale` (and of `max|v|` for the smaller
    elements), at any magnitude of `v`.

    **Arguments:**

    - `v`: a pytree of real arrays (a list of numbers is one array), projected as one
        nonempty vector (all its elements sum to `scale`); integers are promoted to
        floats. A NaN or infinite element makes the projection NaN.
    - `scale`: the simplex's sum, finite and non-negative: otherwise a `ValueError`
        as a Python or NumPy value, a NaN projection as a JAX array. At zero the
        projection is 0 and its derivatives are the one-sided ones (for
        `scale → 0⁺`): zero in `v`, and in `scale` the largest elements' indicator
        over their number.

    **Returns:**

    The projection, shaped like `v` (in floating point).
    """
    check_parameter(
        "projections.simplex",
        "scale",
        scale,
        "finite and non-negative",
        lambda s: np.isfinite(s) & (s >= 0),
    )
    v = as_arrays(v)
    refuse_complex("projections.simplex", v=v, scale=scale)
    u = floating(ravel(v))
    if u.size == 0:
        raise ValueError(
            "implicitdiff.projections.simplex: v has no elements, and the simplex in "
            "zero dimensions is empty (no vector sums to `scale`): there is no "
            "projection. Project a nonempty v."
        )
    scale = jnp.asarray(scale, u.dtype)
    projected = where_valid(_valid_scale(scale), _simplex, u, scale)
    return unravel(projected, _float_structure(v))


def _valid_scale(scale: Float[Array, ""]) -> Bool[Array, ""]:
    return jnp.isfinite(scale) & (scale >= 0)


def _simplex(u: Float[Array, " n"], scale: Float[Array, ""]) -> Float[Array, " n"]:
    # An invalid scale would leave the threshold's support empty (a singular solve):
    # replaced by 1, for `where_valid` to NaN.
    scale = jnp.where(_valid_scale(scale), scale, 1)
    w, scale_w, factor = _simplex_units(u, scale)
    tau = _simplex_threshold(w, scale_w)
    support = _on_support(w, tau)
    # At a zero scale the projection is 0 whatever v (no derivative in v, also with
    # ties at the largest element, where w − τ would have one), and it grows with
    # the scale along the largest elements, shared equally.
    at_zero = jnp.where(support, scale / jnp.sum(support), 0)
    on_support = jnp.where(support, w - tau, 0) / factor
    projected = jnp.where(scale == 0, at_zero, on_support)
    # `0·τ`: a NaN derivative of τ (a failed solve) reaches every output in forward
    # mode too, where `where` would drop it outside the support.
    return projected + 0 * tau


def l1_ball(v: PyTree[ArrayLike], radius: ArrayLike = 1.0) -> PyTree[Array]:
    """Projection onto the ℓ1 ball `{u: ‖u‖₁ ≤ radius}`: `v` inside, else
    `sign(v)·simplex(|v|, radius)` (Duchi et al., 2008).

    **Arguments:**

    - `v`: a pytree of real arrays (a list of numbers is one array), projected as one
        vector; integers are promoted to floats. Empty, it is its own projection.
    - `radius`: the ball's radius, non-negative (`jnp.inf` for no constraint):
        otherwise a `ValueError` as a Python or NumPy value, a NaN projection as a
        JAX array. At zero the projection is 0 and its derivatives are the one-sided
        ones (for `radius → 0⁺`): zero in `v`, and in `radius` the signs of the
        largest elements of `|v|` over their number.

    **Returns:**

    The projection, shaped like `v` (in floating point).
    """
    check_parameter(
        "projections.l1_ball", "radius", radius, "non-negative", non_negative_value
    )
    v = as_arrays(v)
    refuse_complex("projections.l1_ball", v=v, radius=radius)
    u = floating(ravel(v))
    if u.size == 0:
        return jax.tree.map(floating, v)
    radius = jnp.asarray(radius, u.dtype)
    projected = where_valid(radius >= 0, _l1_ball, u, radius)
    return unravel(projected, _float_structure(v))


def _l1_ball(u: Float[Array, " n"], radius: Float[Array, ""]) -> Float[Array, " n"]:
    # The simplex is not needed (its value nor its derivative) at an infinite radius,
    # where everything is inside; given a valid finite one, it has no NaN to leak.
    to_sphere = jnp.where(jnp.isfinite(radius) & (radius >= 0), radius, 1)
    on_sphere = jnp.sign(u) * _simplex(jnp.abs(u), to_sphere)
    # A zero radius has no inside: the ball is {0}, v = 0 included (whose derivative
    # in v is then 0, not the identity). An overflowing Σ|u| is inf: outside.
    inside = (jnp.sum(jnp.abs(u)) <= radius) & (radius > 0)
    return jnp.where(inside, u, on_sphere)


def l2_ball(v: PyTree[ArrayLike], radius: ArrayLike = 1.0) -> PyTree[Array]:
    """Projection onto the ℓ2 ball `{u: ‖u‖₂ ≤ radius}`: `v·min(1, radius/‖v‖₂)`.

    The norm is taken of `v` scaled by a power of two to `max|v| ≈ 1`: it neither
    overflows nor underflows (`‖[3e19, 4e19]‖` in float32, `‖[3e-200, 4e-200]‖` in
    float64).

    **Arguments:**

    - `v`: a pytree of arrays (a list of numbers is one array), projected as one
        vector (the norm over all leaves); integers are promoted to floats.
    - `radius`: the ball's radius, non-negative (`jnp.inf` for no constraint):
        otherwise a `ValueError` as a Python or NumPy value, a NaN projection as a
        JAX array.

    **Returns:**

    The projection, shaped like `v` (in floating point).
    """
    check_parameter(
        "projections.l2_ball", "radius", radius, "non-negative", non_negative_value
    )
    refuse_complex("projections.l2_ball", radius=radius)
    v = jax.tree.map(floating, as_arrays(v))
    if not jax.tree.leaves(v):
        return v
    radius = jnp.asarray(radius, jnp.finfo(jnp.result_type(*jax.tree.leaves(v))).dtype)
    return where_valid(radius >= 0, _l2_ball, v, radius)


def _l2_ball(v: PyTree[Array], radius: Float[Array, ""]) -> PyTree[Array]:
    w, unit = _normalised(v)
    squared = _sum_of_squares(w)
    # A zero radius maps everything to 0, v = 0 too (where `‖v‖ > radius` fails):
    # its derivative in v is 0 there, not the identity. `radius·2⁻ᵉ` may overflow
    # (inside) or underflow (outside, unless v = 0): both right.
    outside = (squared > (radius * unit) ** 2) | (radius == 0)
    # The norm only where it is nonzero: its derivative at v = 0 would be NaN.
    norm = jnp.sqrt(jnp.where(squared > 0, squared, 1))
    # radius·(w/‖w‖) has no overflow; the radius only where it is used, as an
    # infinite one (always inside) would make the derivative of the other branch NaN.
    to_sphere = jnp.where(outside, radius, 0) / norm

    def project(u, w_leaf):
        return jnp.where(outside, to_sphere * w_leaf, u).astype(u.dtype)

    return jax.tree.map(project, v, w)


def hyperplane(
    v: PyTree[ArrayLike], a: PyTree[ArrayLike], b: ArrayLike
) -> PyTree[Array]:
    """Projection onto the hyperplane `{u: ⟨a, u⟩ = b}`:
    `v − (⟨a, v⟩ − b)/‖a‖²·a`, with `a` scaled by a power of two to `max|a| ≈ 1`
    (no overflow or underflow of `‖a‖²`).

    **Arguments:**

    - `v`: a pytree of arrays (a list of numbers is one array); integers are
        promoted to floats.
    - `a`: the normal, shaped like `v`, nonzero (a zero one makes the projection
        NaN).
    - `b`: the offset, a scalar.

    **Returns:**

    The projection, shaped like `v` (in floating point).
    """
    v = jax.tree.map(floating, as_arrays(v))
    a = jax.tree.map(floating, as_arrays(a))
    if jax.tree.map(jnp.shape, a) != jax.tree.map(jnp.shape, v):
        raise ValueError(
            "implicitdiff.projections.hyperplane: the normal `a` must be shaped like "
            f"v: v is {structure(v)}, a is {structure(a)}."
        )
    unit_a, unit = _normalised(a)
    # ⟨a, v⟩/‖a‖²·a is homogeneous of degree 0 in a: the same with a·2⁻ᵉ and b·2⁻ᵉ.
    leaves = zip(jax.tree.leaves(unit_a), jax.tree.leaves(v), strict=True)
    inner = sum(jnp.vdot(p, q) for p, q in leaves)
    shift = (inner - b * unit) / _sum_of_squares(unit_a)
    return jax.tree.map(lambda u, n: (u - shift * n).astype(u.dtype), v, unit_a)


_RANK_DEFICIENT = (
    "implicitdiff.projections.affine: A is rank-deficient (or numerically so: its "
    "condition number past 1/(4·√n·ε)), so the projection is NaN: with dependent "
    "rows, the computed set is not {u: A u = b} (a wrong point, finite, or huge for "
    "an inconsistent b). Remove the dependent rows of A (and the same entries of b), "
    "or compute in float64."
)


def affine(
    v: Float[ArrayLike, " n"],
    A: Float[ArrayLike, "m n"],
    b: Float[ArrayLike, " m"],
    *,
    on_failure: OnFailure = "warn",
) -> Float[Array, " n"]:
    """Projection onto the affine subspace `{u: A u = b}`:
    `v − Aᴴ(A Aᴴ)⁻¹(A v − b)`, computed from a QR factorisation of `Aᴴ` (no
    normal equations: their condition number would be squared).

    A rank-deficient `A` (or one whose condition number `κ₁(R)` exceeds
    `1/(4·√n·ε)`, where the computed set has no correct digit) makes the projection
    and its derivatives NaN, and warns (`on_failure`).

    **Arguments:**

    - `v`: a vector of `n` elements (integers are promoted to floats).
    - `A`: an `m × n` matrix of full row rank, `m ≤ n` (`m = 0`: no constraint).
    - `b`: a vector of `m` elements.
    - `on_failure`: for a rank-deficient `A`: `"warn"` (a `RuntimeWarning` at run
        time), `"nan"` (silent, no host callback: for `jax.export`) or `"raise"`
        (an `OnFailureError`, see [`implicitdiff.ImplicitFunction`][]). The
        projection is NaN in every case.

    **Returns:**

    The projection, a vector of `n` elements.
    """
    if on_failure not in ON_FAILURE_CHOICES:
        raise ValueError(
            f"implicitdiff.projections.affine: on_failure must be one of "
            f"{ON_FAILURE_CHOICES}, got {on_failure!r}."
        )
    v, A, b = (floating(jnp.asarray(x)) for x in (v, A, b))
    _check_affine_shapes(v, A, b)
    dtype = jnp.result_type(v, A, b)
    v, A, b = (x.astype(dtype) for x in (v, A, b))
    if A.shape[0] == 0:  # {u: 0 = 0}: everything
        return v
    Q, R = jnp.linalg.qr(A.conj().T)  # Aᴴ = QR: A Aᴴ = Rᴴ R, Aᴴ(A Aᴴ)⁻¹ = Q R⁻ᴴ
    offset = jsl.solve_triangular(R, b, trans="C", lower=False)
    projected = v - Q @ (Q.conj().T @ v) + Q @ offset
    failed = announce(
        ~_well_conditioned(R, v.size), on_failure, _RANK_DEFICIENT, CallSite.of_caller()
    )
    return _nan_unless(~failed, projected)  # no `where` inside: no NaN dropped


def _check_affine_shapes(v: Array, A: Array, b: Array) -> None:
    prefix = "implicitdiff.projections.affine"
    if v.ndim != 1 or A.ndim != 2 or b.ndim != 1:
        raise ValueError(
            f"{prefix}: v and b must be vectors and A a matrix, got v {v.shape}, "
            f"A {A.shape}, b {b.shape} (for a batch, use jax.vmap)."
        )
    m, n = A.shape
    if n != v.size or m != b.size:
        raise ValueError(
            f"{prefix}: A must be (len(b), len(v)) = ({b.size}, {v.size}), got "
            f"{A.shape}."
        )
    if m > n:
        raise ValueError(
            f"{prefix}: A has more rows than columns ({m} > {n}): its rows are "
            "dependent, and {u: A u = b} is at most one point (empty for most b). "
            "Keep n or fewer independent rows."
        )


def _well_conditioned(R: Float[Array, "m m"], n: int) -> Bool[Array, ""]:
    """Whether `κ₁(R) = ‖R‖₁‖R⁻¹‖₁`, from the explicit inverse (`m³/3` flops, less
    than the QR's `2nm²`), is at most `1/(4·√n·ε)`; False for NaN.

    The diagonal of `R` does not show the rank (its smallest entry only bounds
    `σ_min` from above): for a 100 × 200 `A` of deficient rank its smallest ratio to
    the largest was `3·10⁻⁵` in float32, far above `ε`. `κ₁(R)` was `0.48/ε` or more
    for every one of 2·10⁵ random rank-deficient `A` (`m ≤ 5`, `n ≤ 300`, float32
    and float64, entries over six orders of magnitude): the library's
    `singular_threshold`, `1/(√n·ε)`, misses some at small `n`; a quarter of it
    catches them all with a margin of 3."""
    R = lax.stop_gradient(R)
    eye = jnp.eye(R.shape[0], dtype=R.dtype)
    inverse = jsl.solve_triangular(R, eye, lower=False)
    norm, inverse_norm = (max_or_nan(jnp.sum(jnp.abs(M), axis=0)) for M in (R, inverse))
    return norm * inverse_norm <= singular_threshold(n, R.dtype) / 4
