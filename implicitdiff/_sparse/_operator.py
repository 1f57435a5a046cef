"""A sparse matrix with a static pattern, as a lineax operator."""

import functools as ft
import hashlib

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax import lax
from jax.experimental import sparse as jsparse
from jaxtyping import Array, Float, Int, PyTree

from .._misc import (
    max_or_nan,
    operator_norm_lower_bound,
    ravel,
    size,
    tracing,
    unravel,
)


class SparsityPattern:
    """The static nonzero pattern of a sparse matrix, in CSR order.

    Host-side (NumPy) and hashable, so it can sit in static fields and key caches:
    colourings and transposition permutations are computed once per pattern.

    **Arguments:**

    - `rows`, `cols`: the coordinates of the stored entries (any order; duplicates
        are removed).
    - `shape`: `(n_rows, n_cols)`.
    """

    def __init__(self, rows, cols, shape: tuple[int, int]):
        rows, cols = np.ravel(rows), np.ravel(cols)
        n_rows, n_cols = (int(s) for s in shape)
        if rows.shape != cols.shape:
            raise ValueError("SparsityPattern: rows and cols differ in length.")
        if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
            raise ValueError(f"SparsityPattern: a row index is outside {shape}.")
        if cols.size and (cols.min() < 0 or cols.max() >= n_cols):
            raise ValueError(f"SparsityPattern: a column index is outside {shape}.")
        if not _in_csr_order(rows, cols):
            flat = sorted_unique(rows.astype(np.int64) * n_cols + cols)
            rows, cols = np.divmod(flat, n_cols)
        counts = np.bincount(rows, minlength=n_rows)
        indptr = np.concatenate([[0], np.cumsum(counts)])
        self._set(rows, cols, indptr, (n_rows, n_cols))

    @classmethod
    def _from_csr(cls, indptr, indices, shape) -> "SparsityPattern":
        """From CSR arrays already sorted, without repeats (not checked)."""
        pattern = object.__new__(cls)
        rows = np.repeat(np.arange(shape[0], dtype=np.int32), np.diff(indptr))
        pattern._set(rows, indices, np.asarray(indptr), tuple(shape), copy=False)
        return pattern

    def _set(self, rows, cols, indptr, shape, copy=True):
        # Copies by default: the caller's arrays may change.
        self.rows = rows.astype(np.int32, copy=copy)
        self.cols = cols.astype(np.int32, copy=copy)
        self.indptr = indptr.astype(np.int32, copy=copy)
        self.shape = shape

    @property
    def nnz(self) -> int:
        """The number of stored entries."""
        return int(self.rows.size)

    @ft.cached_property
    def _hash(self) -> int:
        digest = hashlib.sha256(self.rows)
        digest.update(self.cols)
        return hash((self.shape, digest.digest()))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return (
            isinstance(other, SparsityPattern)
            and self.shape == other.shape
            and self._hash == other._hash
            and np.array_equal(self.rows, other.rows)
            and np.array_equal(self.cols, other.cols)
        )

    def __repr__(self):
        return f"SparsityPattern(shape={self.shape}, nnz={self.nnz})"

    @property
    def transpose_permutation(self) -> np.ndarray:
        """`data[perm]` lists the entries of the transpose in its CSR order."""
        return self._transposed[1]

    @property
    def T(self) -> "SparsityPattern":
        """The pattern of the transpose."""
        return self._transposed[0]

    @ft.cached_property
    def _transposed(self) -> tuple["SparsityPattern", np.ndarray]:
        import scipy.sparse as sp

        # SciPy's CSR-to-CSC conversion is a stable counting sort by column: carried
        # along as the values, the entry numbers come out as the permutation.
        numbers = np.arange(self.nnz, dtype=np.int32)
        csc = sp.csc_array(
            sp.csr_array((numbers, self.cols, self.indptr), shape=self.shape)
        )
        transposed = SparsityPattern._from_csr(
            csc.indptr, csc.indices, self.shape[::-1]
        )
        return transposed, csc.data

    def to_scipy(self, data):
        """A SciPy CSR matrix with this pattern and the (host) values `data`."""
        import scipy.sparse as sp

        return sp.csr_matrix(
            (np.asarray(data), self.cols, self.indptr), shape=self.shape
        )

    @classmethod
    def of(cls, matrix) -> "SparsityPattern":
        """The pattern of a BCOO/BCSR matrix, a SciPy sparse matrix or a dense array
        (values ignored; every stored entry counts, even a stored zero)."""
        if isinstance(matrix, SparsityPattern):
            return matrix
        if isinstance(matrix, jsparse.BCSR):
            matrix = matrix.to_bcoo()
        if isinstance(matrix, jsparse.BCOO):
            if matrix.n_batch or matrix.n_dense or matrix.ndim != 2:
                raise ValueError(
                    "Sparse patterns must be 2D, unbatched, no dense dims."
                )
            indices = np.asarray(matrix.indices)
            return cls(indices[:, 0], indices[:, 1], matrix.shape)
        if hasattr(matrix, "tocoo"):  # SciPy sparse matrix or array
            coo = matrix.tocoo()
            return cls(coo.row, coo.col, coo.shape)
        dense = np.asarray(matrix)
        if dense.ndim != 2:
            raise ValueError(f"A sparsity pattern must be 2D, got shape {dense.shape}.")
        rows, cols = np.nonzero(dense)
        return cls(rows, cols, dense.shape)


# XLA copies every constant into the program it compiles: about 0.2 s of compilation
# per 20 MB on CPU. Index arrays larger than this reach the program at run time.
_LARGEST_CONSTANT_BYTES = 2**21


def device_indices(indices: np.ndarray) -> Array:
    """A NumPy index array as a JAX array: a constant of the program being traced, or,
    when it is large, the output of a host callback that hands it over when the
    program runs (a copy, milliseconds, instead of seconds of compilation)."""
    if indices.nbytes <= _LARGEST_CONSTANT_BYTES or not tracing():
        return jnp.asarray(indices)
    shape = jax.ShapeDtypeStruct(indices.shape, indices.dtype)
    return jax.pure_callback(lambda: indices, shape, vmap_method="broadcast_all")


def take(values: Array, indices: Array) -> Array:
    """`values[indices]` for a vector and indices known to be in bounds: one gather,
    without the negative-index handling of NumPy-style indexing."""
    dnums = lax.GatherDimensionNumbers(
        offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,)
    )
    return lax.gather(
        values,
        jnp.expand_dims(indices, 1),
        dnums,
        slice_sizes=(1,),
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )


def _in_csr_order(rows: np.ndarray, cols: np.ndarray) -> bool:
    """Whether the coordinates are sorted by row, then column, without repeats."""
    row_steps = np.diff(rows)
    return bool(
        np.all(row_steps >= 0) and np.all((row_steps > 0) | (np.diff(cols) > 0))
    )


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """`np.unique(values)`: sorted, without repeats; much faster than NumPy 2.4's
    `np.unique` on large integer arrays (0.06 s instead of 8 s for 5·10⁶)."""
    values = np.sort(values)
    return values[np.diff(values, prepend=values[:1] - 1) != 0]


class SparseLinearOperator(lx.AbstractLinearOperator):
    """A sparse matrix as a `lineax.AbstractLinearOperator` on pytrees.

    The values `data` are traced (differentiable, jit-able); the pattern is static,
    and its row and column indices reach the device once per operator (`rows`,
    `cols`). The matrix acts on flattened pytrees: `mv(v)` ravels `v` (structure
    `in_structure()`), multiplies, and unravels into `out_structure()`.
    Solvers reach the matrix as `.bcoo`, `.bcsr`, or on the host as a SciPy CSR
    matrix through `pattern.to_scipy(data)`.

    **Arguments:**

    - `data`: the stored values, in the pattern's CSR order.
    - `pattern`: a [`implicitdiff.SparsityPattern`][].
    - `input_structure`, `output_structure`: pytrees of `jax.ShapeDtypeStruct`
        (default: vectors of the pattern's shape).
    """

    data: Float[Array, " nnz"]
    rows: Int[Array, " nnz"]
    cols: Int[Array, " nnz"]
    pattern: SparsityPattern = eqx.field(static=True)
    input_structure: PyTree[jax.ShapeDtypeStruct] = eqx.field(static=True)
    output_structure: PyTree[jax.ShapeDtypeStruct] = eqx.field(static=True)

    def __init__(
        self,
        data,
        pattern,
        input_structure=None,
        output_structure=None,
        *,
        _indices=None,
    ):
        self.data = jnp.asarray(data)
        self.pattern = SparsityPattern.of(pattern)
        n_rows, n_cols = self.pattern.shape
        dtype = self.data.dtype
        if input_structure is None:
            input_structure = jax.ShapeDtypeStruct((n_cols,), dtype)
        if output_structure is None:
            output_structure = jax.ShapeDtypeStruct((n_rows,), dtype)
        self.input_structure = input_structure
        self.output_structure = output_structure
        if _indices is None:  # the device copies of rows and cols, if already made
            _indices = (
                device_indices(self.pattern.rows),
                device_indices(self.pattern.cols),
            )
        self.rows, self.cols = _indices

    def __check_init__(self):
        if self.data.shape != (self.pattern.nnz,):
            raise ValueError(
                f"SparseLinearOperator: data has shape {self.data.shape}, the pattern "
                f"has {self.pattern.nnz} entries."
            )
        if (size(self.output_structure), size(self.input_structure)) != (
            self.pattern.shape
        ):
            raise ValueError(
                "SparseLinearOperator: the structures do not match the pattern's shape "
                f"{self.pattern.shape}."
            )

    def row_sums(self, terms: Array) -> Array:
        """Sums of `terms` (one per stored entry, in CSR order) over each row."""
        return jax.ops.segment_sum(
            terms,
            self.rows,
            num_segments=self.pattern.shape[0],
            indices_are_sorted=True,
        )

    def mv(self, vector):
        v = ravel(vector).astype(self.data.dtype)
        out = self.row_sums(self.data * take(v, self.cols))
        return unravel(out, self.output_structure)

    def as_matrix(self):
        dense = jnp.zeros(self.pattern.shape, self.data.dtype)
        return dense.at[self.rows, self.cols].set(self.data, mode="promise_in_bounds")

    def transpose(self):
        permutation = device_indices(self.pattern.transpose_permutation)
        return SparseLinearOperator(
            take(self.data, permutation),
            self.pattern.T,
            self.output_structure,
            self.input_structure,
            _indices=(take(self.cols, permutation), take(self.rows, permutation)),
        )

    def in_structure(self):
        return self.input_structure

    def out_structure(self):
        return self.output_structure

    @property
    def bcoo(self) -> jsparse.BCOO:
        """The matrix as a `jax.experimental.sparse.BCOO`."""
        indices = jnp.stack([self.rows, self.cols], axis=1)
        return jsparse.BCOO((self.data, indices), shape=self.pattern.shape)

    @property
    def bcsr(self) -> jsparse.BCSR:
        """The matrix as a `jax.experimental.sparse.BCSR`."""
        indptr = device_indices(self.pattern.indptr)
        return jsparse.BCSR((self.data, self.cols, indptr), shape=self.pattern.shape)


def _register():
    @lx.materialise.register(SparseLinearOperator)
    def _(operator):
        return operator

    @lx.diagonal.register(SparseLinearOperator)
    def _(operator):
        n = min(operator.pattern.shape)
        # Off-diagonal entries go to index n, out of bounds: dropped.
        where = jnp.where(operator.rows == operator.cols, operator.rows, n)
        diag = jnp.zeros(n, operator.data.dtype)
        return diag.at[where].set(operator.data, mode="drop")

    @operator_norm_lower_bound.register(SparseLinearOperator)
    def _(operator):
        return max_or_nan(operator.row_sums(jnp.abs(operator.data)))

    @lx.linearise.register(SparseLinearOperator)
    def _(operator):
        return operator

    @lx.conj.register(SparseLinearOperator)
    def _(operator):
        return eqx.tree_at(lambda o: o.data, operator, jnp.conj(operator.data))

    for check in (
        lx.is_symmetric,
        lx.is_diagonal,
        lx.is_tridiagonal,
        lx.has_unit_diagonal,
        lx.is_lower_triangular,
        lx.is_upper_triangular,
        lx.is_positive_semidefinite,
        lx.is_negative_semidefinite,
    ):
        # Unknown without looking at the values: lineax treats False as "no promise".
        check.register(SparseLinearOperator)(lambda operator: False)


_register()
