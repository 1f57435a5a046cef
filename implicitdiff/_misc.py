"""Small pytree helpers shared by the implicit rule and the solvers."""

import functools as ft
from collections.abc import Sequence

import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jaxtyping import Array, Bool, Float, Int, PyTree

# Radians: cos(k·angle) never repeats or vanishes, and a fixed vector of such phases
# shares no structure a matrix is likely to have (rows summing to zero, alternating
# signs, a few unit vectors).
GOLDEN_ANGLE = 2.399963229728653


def golden_phases(leaf) -> Array:
    """`e^{iθk}` for the `k`-th element of a complex leaf (an array or a
    `ShapeDtypeStruct`), `cos(θk)` for a real one, shaped like it; `θ` the golden
    angle. Fixed probes for the checks."""
    k = jnp.arange(leaf.size).reshape(leaf.shape)
    if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
        return jnp.exp(1j * GOLDEN_ANGLE * k)
    return jnp.cos(GOLDEN_ANGLE * k)


def structure(tree: PyTree) -> PyTree[jax.ShapeDtypeStruct]:
    """The shapes and dtypes of a pytree of arrays (or of `ShapeDtypeStruct`s)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def name_of(fn) -> str:
    """The name of a user's function, for messages."""
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def ravel(tree: PyTree[Array]) -> Array:
    """Concatenates every leaf of `tree` into one vector."""
    return jfu.ravel_pytree(tree)[0]


def unravel(flat: Array, like: PyTree[jax.ShapeDtypeStruct]) -> PyTree[Array]:
    """Splits the vector `flat` into a pytree with the structure of `like`."""
    leaves, treedef = jax.tree.flatten(like)
    sizes = [int(np.prod(leaf.shape)) for leaf in leaves]
    if len(leaves) == 1:
        pieces = [flat]
    else:
        pieces = jnp.split(flat, np.cumsum(sizes)[:-1]) if leaves else []
    return jax.tree.unflatten(
        treedef,
        [
            _cast(p.reshape(leaf.shape), leaf.dtype)
            for p, leaf in zip(pieces, leaves, strict=True)
        ],
    )


def _cast(x: Array, dtype) -> Array:
    """`x` as `dtype`; a real leaf of a pytree solved as one complex vector takes the
    real part (casting complex to real is deprecated in JAX)."""
    if jnp.iscomplexobj(x) and not jnp.issubdtype(dtype, jnp.complexfloating):
        x = jnp.real(x)
    return x.astype(dtype)


# The trace JAX runs under when no transformation is active, found at import (public
# API: `jax.extend.core`; the equivalent `trace_state_clean` is in `jax._src`).
_EAGER_TRACE = type(jex_core.find_top_trace(()))


def tracing() -> bool:
    """Whether a JAX transformation (`jit`, `grad`, `vmap`, ...) is being traced."""
    return not isinstance(jex_core.find_top_trace(()), _EAGER_TRACE)


def result_dtype(tree: PyTree) -> jnp.dtype:
    """The dtype that every leaf of a pytree of arrays (or `ShapeDtypeStruct`s)
    promotes to."""
    return jnp.result_type(*jax.tree.leaves(tree))


def size(tree: PyTree) -> int:
    """The number of elements in a pytree of arrays or `ShapeDtypeStruct`s."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def tree_norm(tree: PyTree[Array]) -> Float[Array, ""]:
    """The 2-norm over every element of every leaf: NaN if any is NaN, inf if any is
    inf or if the norm itself exceeds the dtype's range. In at least float32: in
    float16 the squares of numbers above 256 are already inf, and a check comparing
    with such a norm would pass. See `tree_norms`."""
    return tree_norms(tree)[0]


def tree_norms(*trees: PyTree[Array]) -> tuple[Float[Array, ""], ...]:
    """The 2-norms of several trees (each over every element of every leaf), as
    scalars of their widest dtype (at least float32).

    One pass per leaf, safe from overflow (as LAPACK's `xNRM2`, with Blue's idea):
    elements above `2^((e − 32)/2)` (`e` the dtype's largest exponent: about 10¹⁴ in
    float32, 10¹⁴⁹ in float64) are squared after scaling by a power of two, exactly,
    into a second sum. A plain sum of squares overflows from 1.8·10¹⁹ in float32, and
    a check of a forward whose output is that large refused it, NaN and warning.
    Squares that underflow (below about 10⁻¹⁹ in float32) count as 0: every check
    compares with `1 + ‖y‖` or with a norm that is not that small.

    Small leaves of the same shape in every tree (`c` and `y` of a square system, up
    to `STACK_UP_TO` elements) are stacked and reduced together, and the norms are
    finished with scalar operations that XLA fuses into one kernel:
    XLA:CPU compiles every reduction, and every operation that feeds two others, into
    a kernel of its own, at ~5 ms of compilation each, and the check of the
    forward's output is in every program."""
    leaves = [jax.tree.leaves(tree) for tree in trees]
    if not any(leaves):
        return (jnp.zeros(()),) * len(trees)
    dtype = check_dtype(jnp.result_type(*(leaf for group in leaves for leaf in group)))
    largest_exponent = jnp.finfo(dtype).maxexp
    threshold = 2.0 ** ((largest_exponent - 32) // 2)
    scale = 2.0 ** -((largest_exponent + 32) // 2)  # (max·scale)²·2³¹ stays finite
    zero = jnp.zeros((), dtype)
    sums = [[zero, zero] for _ in trees]  # per tree: Σ small², Σ (large·scale)²
    shapes = [[jnp.shape(leaf) for leaf in group] for group in leaves]
    small_leaves = all(size(leaf) <= STACK_UP_TO for leaf in leaves[0])
    if small_leaves and all(group == shapes[0] for group in shapes):
        batches = [(here, range(len(trees))) for here in zip(*leaves, strict=True)]
    else:
        batches = [((leaf,), (k,)) for k, group in enumerate(leaves) for leaf in group]
    for leaves_here, owners in batches:
        if not leaves_here[0].size:
            continue
        magnitudes = jnp.stack(
            batched_alike([jnp.abs(leaf).astype(dtype) for leaf in leaves_here])
        )
        operands = _split_squares(magnitudes, threshold, scale)
        dimensions = tuple(range(1, magnitudes.ndim))
        small, large = lax.reduce(tuple(operands), (zero, zero), _add_all, dimensions)
        for k, i in enumerate(owners):
            sums[i][0] = sums[i][0] + small[k]
            sums[i][1] = sums[i][1] + large[k]
    return tuple(_finish_norm(small, large, scale) for small, large in sums)


# Up to this many elements, arrays reduced together are stacked (one kernel, where
# launching kernels is what costs); above, each is reduced where it lies.
STACK_UP_TO = 4096


def batched_alike(arrays: Sequence[Array]) -> list[Array]:
    """`arrays`, each plus a zero that depends on every one of them: under `vmap`
    they are then all batched if one is. Stacking a batched array with an unbatched
    one (a solution and a constant cotangent) fails on an explicitly sharded batch
    axis. The zero is `select(p, 0, 0)` of each array's first element: data-dependent
    when tracing, folded away by XLA."""
    if len(arrays) == 1:
        return list(arrays)
    zero = jnp.zeros((), arrays[0].dtype)
    tie = sum(lax.select(jnp.isnan(jnp.ravel(a)[0]), zero, zero) for a in arrays)
    return [a + tie.astype(a.dtype) for a in arrays]


def _split_squares(magnitude: Array, threshold: float, scale: float) -> list[Array]:
    """`[small², (large·scale)²]`: a leaf's magnitudes, split at `threshold` and
    squared without overflow."""
    is_large = magnitude > threshold  # False for NaN: counted in the small sum
    zeros = lax.full_like(magnitude, 0)
    small = lax.select(is_large, zeros, magnitude)
    large = lax.select(is_large, magnitude * scale, zeros)
    return [small * small, large * large]


def _add_all(a, b):
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _finish_norm(small: Array, large: Array, scale: float) -> Array:
    """`√(small + large/scale²)`, as a hypot without its `jit`: not
    `√(large + small·scale²)/scale`, as XLA folds `(small·scale)·scale` into
    `small·scale²`, and `scale²` underflows float32."""
    root_small, root_large = lax.sqrt(small), lax.sqrt(large) / scale
    bigger = lax.max(root_small, root_large)
    ratio = lax.min(root_small, root_large) / bigger
    return lax.select(large > 0, bigger * lax.sqrt(1 + ratio * ratio), root_small)


def all_finite(tree: PyTree[Array]) -> Bool[Array, ""]:
    """Whether every element of every leaf is finite."""
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
    if len(flags) == 1:
        return flags[0]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def any_nan(tree: PyTree[Array]) -> Bool[Array, ""]:
    """Whether any element of any leaf is NaN (a boolean reduction: NaN-safe at every
    size, unlike a `max`)."""
    flags = [jnp.any(jnp.isnan(leaf)) for leaf in jax.tree.leaves(tree)]
    if len(flags) == 1:
        return flags[0]
    return jnp.any(jnp.stack(flags)) if flags else jnp.array(False)


def nan_unless(ok: Bool[Array, ""], tree: PyTree[Array]) -> PyTree[Array]:
    """`tree` where `ok`, else the same structure filled with NaN."""
    return jax.tree.map(lambda leaf: nan_where(~ok, leaf), tree)


def poison_term(bad: Bool[Array, ""], linear: PyTree[Array]) -> Float[Array, ""]:
    """A real scalar, linear in the tree `linear` (tangents, right-hand sides): `0`
    when not `bad`, else `NaN·Σ(real and imaginary parts)`. Added to a derivative
    with `add_poison`, it makes every derivative NaN when `bad`, in forward mode and,
    by transposition, in reverse mode, in real and imaginary parts alike, also with
    respect to inputs whose cotangent would otherwise be an exact zero."""
    parts = [jnp.sum(jnp.real(leaf)) for leaf in jax.tree.leaves(linear)]
    parts += [
        jnp.sum(jnp.imag(leaf))
        for leaf in jax.tree.leaves(linear)
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating)
    ]
    return jnp.where(bad, jnp.nan, 0.0) * sum(parts)


def add_poison(term: Float[Array, ""], leaf: Array) -> Array:
    """`leaf + term`, with `term` in the real and the imaginary part of a complex
    leaf (so that both are NaN when it is); integer leaves as they are."""
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
        return leaf
    part = term.astype(jnp.finfo(leaf.dtype).dtype)
    if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
        return leaf + lax.complex(part, part)
    return leaf + part


def nan_where(flag: Bool[Array, "*shape"], x: Array) -> Array:
    """NaN where `flag` (a scalar or `x`'s shape), else `x`. `jnp.where` without the
    `jit` that JAX wraps it in: every check of every solve uses this, and each `jit`
    is one more call in the jaxpr of a derivative, in its lowered module and in the
    jaxpr that `jax.jacobian` prints, eagerly, on every call."""
    x = jnp.asarray(x)
    flag = jnp.broadcast_to(flag, x.shape)
    nan = (
        jnp.nan * (1 + 1j) if jnp.issubdtype(x.dtype, jnp.complexfloating) else jnp.nan
    )
    return lax.select(flag, lax.full_like(x, nan), x)


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


def max_or_nan(x: Array, axis: int | None = None) -> Array:
    """`jnp.max(x, axis)` (`0` for an empty reduction) that is NaN wherever a reduced
    element is NaN, for the library's checks (no derivative flows through it).

    XLA:CPU's `max` drops NaN above a few thousand elements
    (`jnp.max(jnp.full(5000, nan))` is `-inf`), which would let a NaN solution pass a
    check. So the largest element and whether any is NaN (a boolean `or`, which has
    no such problem) come from one variadic reduction: one pass over `x`, one kernel
    (two reductions cost twice the compile time on small systems and 2–4× the time on
    10⁶ elements)."""
    x = lax.stop_gradient(jnp.asarray(x))
    if x.size == 0:
        return jnp.max(x, axis=axis, initial=0)
    dimensions = tuple(range(x.ndim)) if axis is None else (axis % x.ndim,)
    initial = (jnp.array(-jnp.inf, x.dtype), jnp.array(False))
    largest, any_nan = lax.reduce((x, jnp.isnan(x)), initial, _max_and_or, dimensions)
    return nan_where(any_nan, largest)


def _max_and_or(a, b):
    return lax.max(a[0], b[0]), a[1] | b[1]


def pseudo_random_probe(n: int, dtype, xp=jnp) -> Float[Array, " n"]:
    """A fixed direction with pseudo-random entries in (−1, 1), none zero: an integer
    hash of the index (`jax.random` takes 20 ms for 10⁶ entries on CPU, this 1). It
    has no structure a matrix could annihilate by accident (a Laplacian annihilates
    ones, a checkerboard alternating signs). `xp=numpy` computes the same vector on
    the host, inside a callback."""
    h = xp.arange(n, dtype=xp.uint32) * xp.uint32(0x9E3779B1)
    h = (h ^ (h >> 15)) * xp.uint32(0x85EBCA77)
    odd = 2 * ((h ^ (h >> 13)) >> 9) + 1  # < 2²⁴: exact in float32, never 2²³
    real_dtype = xp.finfo(dtype).dtype
    return (odd.astype(xp.float32) / 2**23 - 1).astype(real_dtype).astype(dtype)


def singular_threshold(n: int, dtype) -> float:
    """The condition number above which a system of `n` unknowns in `dtype` counts as
    numerically singular: `1/(√n·ε)`.

    A backward-stable solve has a relative error of about `κ·ε` times a growth factor
    that, for rounding errors adding up like a random walk, grows like `√n`: past this
    threshold the solution has no correct digit. `1/(n·ε)` would be the worst case,
    but it refuses well-posed large systems (a 1-D Laplacian of 4·10⁵ unknowns has
    `κ ≈ 6·10¹⁰ > 1/(n·ε) = 10¹⁰` in float64, yet a sparse LU solves it to about
    five digits, `κ·ε ≈ 10⁻⁵`).
    Exactly singular matrices do not depend on it: a direct solver sees a pivot of
    rounding size, and an iterative one cannot solve the certificate's system.
    """
    eps = float(jnp.finfo(dtype).eps)
    return 1.0 / (max(n, 1) ** 0.5 * eps)


@ft.singledispatch
def operator_norm_lower_bound(operator) -> Float[Array, ""]:
    """A lower bound of `‖A‖∞`: for a matrix-free operator the largest `‖A p‖∞` over
    the `probes`, in one batched product; exact (the largest absolute row sum) for an
    operator that stores its matrix, which registers its own rule."""
    in_structure = operator.in_structure()
    products = jax.vmap(lambda p: ravel(operator.mv(unravel(p, in_structure))))(
        probes(in_structure)
    )
    return max_or_nan(jnp.abs(products))


def max_abs(tree: PyTree[Array]) -> Float[Array, ""]:
    """`max |element|` over all leaves: NaN if any element is NaN, 0 if empty. In at
    least float32, so that the checks' products with it cannot overflow a 16-bit
    type (float16 ends at 65 504)."""
    return max_abs_many(tree)[0]


def max_abs_many(*trees: PyTree[Array]) -> tuple[Float[Array, ""], ...]:
    """`max_abs` of each tree. Small leaves of the same shape in every tree (a
    solution and its right-hand side) are reduced together (see `maxima`): one
    kernel, where XLA:CPU compiles every reduction into a kernel of its own."""
    leaves = [jax.tree.leaves(tree) for tree in trees]
    if not any(leaves):
        return (jnp.zeros(()),) * len(trees)
    dtype = check_dtype(jnp.result_type(*(leaf for group in leaves for leaf in group)))
    shapes = [[jnp.shape(leaf) for leaf in group] for group in leaves]
    if all(group == shapes[0] for group in shapes):
        per_position = [
            maxima(*(jnp.abs(leaf).astype(dtype) for leaf in position))
            for position in zip(*leaves, strict=True)
        ]
        per_tree = list(zip(*per_position, strict=True))
    else:
        per_tree = [
            [maxima(jnp.abs(leaf).astype(dtype))[0] for leaf in group]
            for group in leaves
        ]
    return tuple(
        ft.reduce(_max_or_nan_pair, group) if group else jnp.zeros((), dtype)
        for group in per_tree
    )


def maxima(*xs: Array) -> tuple[Array, ...]:
    """`max_or_nan` of each of several arrays of one shape (over all their elements):
    up to `STACK_UP_TO` elements each, one reduction of them stacked, along one axis
    (a variadic reduction of more than two operands, the obvious alternative, runs
    slower on XLA:CPU: 6.2 µs against 4.6 µs for two vectors of ten); above, one
    reduction each, as the stack would copy them."""
    if len(xs) == 1 or not 0 < xs[0].size <= STACK_UP_TO:  # max_or_nan: 0 if empty
        return tuple(max_or_nan(x) for x in xs)
    stacked = jnp.stack([jnp.ravel(x) for x in batched_alike(xs)])
    largest = max_or_nan(stacked, axis=1)
    return tuple(largest[k] for k in range(len(xs)))


def _max_or_nan_pair(a: Array, b: Array) -> Array:
    return nan_where(jnp.isnan(a) | jnp.isnan(b), lax.max(a, b))


def binary_exponent(tree: PyTree[Array], headroom: int | None = None) -> Int[Array, ""]:
    """`e` with `max|element| = m·2ᵉ` over the leaves, `m` in [½, 1); 0 for zeros
    or non-finite elements (whose NaN or inf the caller's check then rejects).
    Clipped to ±(largest exponent − `headroom`), by default ±¾ of the dtype's largest
    exponent, so that `2^±e` itself is a normal number: scaling by it is exact."""
    return exponent_of(max_abs(tree), headroom)


def exponent_of(
    largest: Array, headroom: int | None = None, dtype=None
) -> Int[Array, "*shape"]:
    """`binary_exponent`, elementwise, of values already reduced (`largest`); the
    clipping range is that of `dtype` (default `largest`'s)."""
    _, exponent = jnp.frexp(jnp.where(jnp.isfinite(largest), largest, 0))
    largest_exponent = jnp.finfo(dtype or largest.dtype).maxexp
    if headroom is None:
        headroom = largest_exponent // 4
    limit = largest_exponent - headroom
    return jnp.clip(exponent, -limit, limit)


def at_least_32_bit(dtype) -> np.dtype:
    """`dtype`, or float32 for a 16-bit float: where LAPACK has no 16-bit kernels and
    16-bit norms overflow from entries of ~256 on."""
    return jnp.promote_types(dtype, jnp.float32)


def check_dtype(dtype) -> np.dtype:
    """The real dtype in which the library's checks measure arrays of `dtype`: its
    real counterpart, at least float32."""
    return at_least_32_bit(jnp.finfo(dtype).dtype)


def refuse_16_bit(A: lx.AbstractLinearOperator, name: str, reason: str) -> None:
    """Raises a `TypeError` at trace time, naming the solver `name`, when an input or
    output leaf of `A` is a 16-bit float."""
    for leaf in jax.tree.leaves((A.in_structure(), A.out_structure())):
        dtype = jnp.dtype(leaf.dtype)
        if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2:
            raise TypeError(
                f"{name} does not support {dtype} systems: {reason}. "
                "implicitdiff.Direct, GMRES, CG, BiCGStab and LeastSquares solve "
                "16-bit systems; or compute y in float32."
            )


def credible(
    norm_bound: Float[Array, ""], x: PyTree[Array], b: PyTree[Array]
) -> Bool[Array, ""]:
    """Whether `x` can be the solution of `A x = b`, given `norm_bound ≤ ‖A‖∞`:
    `x` and `b` finite, and `x` not proving `κ∞(A)` above `singular_threshold`.

    `‖x‖ ≤ ‖A⁻¹‖ ‖b‖`, so `κ∞(A) = ‖A‖∞ ‖A⁻¹‖∞ ≥ norm_bound·‖x‖∞ / ‖b‖∞`. Past
    the threshold the system is numerically singular and `x` carries no correct digit:
    LU with partial pivoting can return such an `x`, finite and with a small
    residual, from a singular matrix that had no small pivot. `norm_bound = inf`
    accepts only `x = 0`. And `x = 0` solves only `b = 0`: a solver whose norms
    underflow (a Krylov method on a right-hand side of 10⁻²⁰ in float32, with
    `‖b‖² = 0`) may stop at once at `x = 0`. `x` and `b` are reduced together when
    small (see `max_abs_many`): NaN and inf propagate through the maxima and fail the
    comparison.
    """
    x_max, b_max = max_abs_many(x, b)
    return credible_maxima(norm_bound, x_max, b_max, size(x), result_dtype(x))


def credible_maxima(
    norm_bound: Float[Array, ""],
    x_max: Float[Array, ""],
    b_max: Float[Array, ""],
    n: int,
    dtype,
) -> Bool[Array, ""]:
    """`credible` from `max_abs` of `x` and of `b`, for `n` unknowns of `dtype`."""
    threshold = singular_threshold(n, dtype)
    bounded = (norm_bound * x_max <= threshold * b_max) | (x_max == 0)
    zero_for_zero = (x_max > 0) | (b_max == 0)
    return jnp.isfinite(b_max) & jnp.isfinite(x_max) & bounded & zero_for_zero


@operator_norm_lower_bound.register(lx.MatrixLinearOperator)
def _(operator) -> Float[Array, ""]:
    return max_or_nan(jnp.sum(jnp.abs(operator.matrix), axis=1))


@operator_norm_lower_bound.register(lx.TaggedLinearOperator)
def _(operator) -> Float[Array, ""]:
    return operator_norm_lower_bound(operator.operator)
