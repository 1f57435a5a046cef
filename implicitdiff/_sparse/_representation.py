"""The sparse representation: A = ∂c/∂y assembled by column colouring."""

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from .._misc import max_or_nan, nan_unless, pseudo_random_probe, ravel, size, unravel
from .._representation import AbstractRepresentation
from ._colouring import column_colouring
from ._detect import detect_sparsity
from ._operator import SparseLinearOperator, SparsityPattern, device_indices, take


def _as_sparsity(sparsity) -> SparsityPattern | Literal["auto"]:
    if isinstance(sparsity, str):
        if sparsity != "auto":
            raise ValueError(
                f"Sparse: `sparsity` must be 'auto' or a pattern, got {sparsity!r}."
            )
        return sparsity
    try:
        return SparsityPattern.of(sparsity)
    except jax.errors.TracerArrayConversionError:
        raise ValueError(
            "Sparse: the sparsity pattern must be known when tracing (indices from "
            "NumPy, not traced arrays): build it outside `jit`, or use 'auto'."
        ) from None


class Sparse(AbstractRepresentation):
    """Sparse: `A = ∂c/∂y` is assembled into an [`implicitdiff.SparseLinearOperator`][]
    with a handful of JVPs, however large it is.

    Columns that share no row are grouped by a distance-2 colouring (pyamg's, once per
    pattern, then cached); one JVP per colour gives all the entries of the columns of
    that colour (separate JVPs up to 32 colours, one batched with `jax.vmap` past
    that). A 2D 5-point stencil needs 7 JVPs, a 3D
    7-point one 12 or 13. Solvers receive the operator and reach the matrix as `A.bcoo`,
    `A.bcsr` or, on the host, `A.pattern.to_scipy(values)`.

    **Sparsity detection.** With `sparsity="auto"`, the pattern is read off the jaxpr of
    the linearised conditions, once per trace (once per compilation under `jit`): each
    intermediate element carries the set of unknowns it depends on. It is exact for
    elementwise arithmetic (with broadcasting; a product with a constant keeps the set,
    even a constant zero), `convert_element_type`, `copy`, `reshape`, `squeeze`,
    `broadcast_in_dim`, `transpose`, `rev`, `tile`, `slice`, `split`, `pad`,
    `concatenate`, `select_n`, `dynamic_slice`, `dynamic_update_slice`, `gather` and
    `scatter-add` (`x[idx]`, `jnp.take`, `x.at[idx].add(...)`; `.at[].set` keeps the
    overwritten elements) with constant indices, `dot_general` and
    `conv_general_dilated` (`jnp.convolve`; strides, padding, dilations, feature groups)
    with a constant operand (its structural nonzeros, or all of its entries when it is
    not a constant), `reduce_sum`/`max`/`min`, `cumsum` and friends, and inside `jit`,
    `closed_call`, `custom_jvp_call`, `custom_vjp_call` and `checkpoint`. Index arrays
    computed from NumPy constants count as constants, also under `jit`. Anything else
    (`scan`, `while`, `cond`, `sort`, ...) is conservative, every output element of it
    depending on every one of its inputs, with a warning: correct, with more colours. A
    pattern with a row holding half the columns or more is not coloured (every colouring
    would have that many colours): it is assembled as `representation="matrix"` does,
    one JVP per column.

    **Verification.** Each assembled matrix is checked at run time against one more
    JVP, in a fixed pseudo-random direction `r`: unless every row `i` agrees,
    `|(A r)ᵢ − ((∂c/∂y) r)ᵢ| ≤ √ε · (|A| |r|)ᵢ + ε·‖|A| |r|‖∞` (ε the precision of the
    dtype, so `√ε` is about 1e-8 in float64 and 3e-4 in float32), every stored value
    is NaN, so that the
    linear solve, and the derivative, is NaN rather than silently wrong. This catches
    a user pattern that misses entries. The check costs one more JVP. (A dense
    assembly knows the entries outside the pattern: they must be zero.)

    **Cost.** The pattern is detected once per trace, the operator assembled once
    per linearisation point for both the JVP and the VJP direction. At 10⁶ unknowns (a
    5-point stencil on a 1024² grid, 5·10⁶ entries) detection takes 0.3 to 0.6 s and
    colouring 0.2 s, both at trace time; assembly takes about 0.1 s per call. The
    pattern's index arrays are not compiled into the program when they are large
    (over 2 MiB each, about 5·10⁵ entries): XLA would spend about 0.2 s per 20 MB
    copying them into it. They reach the program through a host callback when it
    runs instead (milliseconds), which `jax.export` cannot serialise.

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import implicitdiff as idf

        def laplacian(y):  # 5-point stencil, zero boundary values
            p = jnp.pad(y, 1)
            return 4 * y - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]

        def conditions(x, y):  # −Δy + y + y³ = x
            return laplacian(y) + y + y**3 - x

        def forward(x):  # a few Newton–CG steps
            y = jnp.zeros_like(x)
            for _ in range(8):
                jvp = lambda v: laplacian(v) + (1 + 3 * y**2) * v
                step, _ = jax.scipy.sparse.linalg.cg(jvp, conditions(x, y), tol=1e-12)
                y = y - step
            return y

        solve = idf.ImplicitFunction(
            forward, conditions, representation=idf.Sparse("auto")
        )
        jax.grad(lambda x: jnp.sum(solve(x) ** 2))(jnp.ones((64, 64)))
        ```
    """

    sparsity: SparsityPattern | Literal["auto"] = eqx.field(
        static=True, converter=_as_sparsity
    )

    def operator(
        self, linear_fn: Callable, in_structure: PyTree[jax.ShapeDtypeStruct]
    ) -> SparseLinearOperator:
        out_structure = jax.eval_shape(linear_fn, in_structure)
        if self.sparsity == "auto":
            pattern = detect_sparsity(linear_fn, in_structure)
        else:
            pattern = self.sparsity
        if pattern.shape != (size(out_structure), size(in_structure)):
            raise ValueError(
                f"Sparse: the pattern has shape {pattern.shape}, but ∂c/∂y is "
                f"{size(out_structure)} × {size(in_structure)}."
            )
        return _assemble(linear_fn, in_structure, out_structure, pattern)


Sparse.__init__.__doc__ = """**Arguments:**

- `sparsity`: the pattern of `∂c/∂y` (rows: the conditions, columns: the unknowns,
    both flattened as `jax.flatten_util.ravel_pytree` does): a
    `jax.experimental.sparse.BCOO` or `BCSR` matrix or a SciPy sparse matrix (its
    values are ignored; its indices must be concrete, so build it outside `jit`), an
    [`implicitdiff.SparsityPattern`][], or `"auto"` to detect it.
"""


# Separate JVPs run twice as fast as one batched over the colours with XLA on CPU
# (their intermediates stay in cache), but each is a copy of the conditions' code in
# the program: past this many colours, one batched JVP compiles faster.
_MOST_UNBATCHED_COLOURS = 32


def _assemble(linear_fn, in_structure, out_structure, pattern) -> SparseLinearOperator:
    """The stored values of `∂c/∂y`, checked (NaN unless right)."""
    flat_in = jax.eval_shape(ravel, in_structure)

    def flat_fn(v):
        return ravel(linear_fn(unravel(v, in_structure)))

    assemble = _assemble_dense if _dense(pattern) else _assemble_coloured
    rows, cols = device_indices(pattern.rows), device_indices(pattern.cols)
    data, ok = assemble(flat_fn, flat_in, pattern, rows, cols)
    return SparseLinearOperator(
        nan_unless(ok, data),
        pattern,
        in_structure,
        out_structure,
        _indices=(rows, cols),
    )


def _dense(pattern: SparsityPattern) -> bool:
    """Whether a row holds half the columns or more: then every colouring has at
    least half as many colours as columns, and one JVP per column, as a dense
    Jacobian takes, costs less than forming the column intersection graph to colour
    (about n³/8 operations for n columns)."""
    longest = np.max(np.diff(pattern.indptr), initial=0)
    return 2 * longest >= pattern.shape[1] > 0


def _assemble_dense(flat_fn, flat_in, pattern, rows, cols):
    """One JVP per column (a batched `jacfwd`), as `representation="matrix"` does.
    The entries outside the pattern are known: the check is that they are zero."""
    n_rows, n_cols = pattern.shape
    matrix = jax.vmap(flat_fn, out_axes=1)(jnp.eye(n_cols, dtype=flat_in.dtype))
    if pattern.nnz == n_rows * n_cols:  # CSR order of a full pattern is C order
        return matrix.reshape(-1), jnp.array(True)
    data = matrix.at[rows, cols].get(mode="promise_in_bounds")
    outside = matrix.at[rows, cols].set(0, mode="promise_in_bounds")
    return data, jnp.all(outside == 0)


def _assemble_coloured(flat_fn, flat_in, pattern, rows, cols):
    """One JVP per colour, plus one in a pseudo-random direction that checks it."""
    colouring = column_colouring(pattern)
    colours = device_indices(colouring.colours)
    dtype = flat_in.dtype

    def seeded(c):  # one JVP per colour, seeding every column of that colour
        return flat_fn((colours == c).astype(dtype))

    if colouring.n_colours <= _MOST_UNBATCHED_COLOURS:
        products = jnp.stack([seeded(c) for c in range(colouring.n_colours)])
    else:
        products = jax.vmap(seeded)(jnp.arange(colouring.n_colours))
    # Entries of magnitude in (1, 2): a missing entry of row i then shifts row i of
    # the product by at least its own size (an entry of (−1, 1) near 0 could hide
    # one of any size). The JVP at 3·probe, minus three times that at probe, is the
    # JVP's own rounding, at the scale of what the conditions compute inside.
    signed = pseudo_random_probe(flat_in.shape[0], dtype)
    probe = jnp.sign(signed) + signed
    expected, tripled = jax.vmap(flat_fn)(jnp.stack([probe, 3 * probe]))
    # Entry (i, j) is row i of the product for j's colour: no other column of that
    # colour has an entry in row i.
    n_rows = pattern.shape[0]
    index_dtype = jnp.int32 if colouring.n_colours * n_rows < 2**31 else jnp.int64
    where = take(colours, cols).astype(index_dtype) * n_rows + rows
    data = take(products.reshape(-1), where)
    operator = SparseLinearOperator(data, pattern, _indices=(rows, cols))
    return data, _agrees(operator, probe, expected, jnp.abs(tripled - 3 * expected))


def _agrees(operator: SparseLinearOperator, probe, expected, noise) -> jax.Array:
    """Whether the sparse matrix reproduces the JVP in the direction `probe` (entries
    of magnitude in (1, 2)), row by row, to rounding: each row's error against that
    row's own scale (a row a million times larger than another cannot hide a missing
    entry there). A missing entry moves a derivative by `κ` times its relative size:
    one above `8(k + 1)ε` of its row's absolute sum (`k` the row's entries) is seen.
    (With `√ε` instead, one of 10⁻⁴ in float32 passed, at κ = 2·10⁴, and the
    derivative was off by half.) Conditions that cancel large terms inside round at
    the scale of those terms: `noise`, the JVP's measured rounding per row, relative
    to the row's scale and at its largest over the rows (one sample per row can
    come out small by chance), widens every row's tolerance by as much. The floor,
    `ε` times the largest row scale, absorbs the rounding of rows that cancel to
    zero."""
    terms = operator.data * take(probe, operator.cols)
    product = operator.row_sums(terms)
    scale = operator.row_sums(jnp.abs(terms))
    entries = operator.row_sums(jnp.ones_like(terms))
    eps = jnp.finfo(terms.dtype).eps
    cancellation = max_or_nan(jnp.where(scale > 0, noise / scale, 0))
    floor = eps * max_or_nan(scale)
    tolerance = (8 * (entries + 1) * eps + 16 * cancellation) * scale + floor
    # NaN anywhere fails the comparison; `all` is a boolean reduction, NaN-safe.
    return jnp.all(jnp.abs(product - expected) <= tolerance)
