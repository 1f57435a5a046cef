"""A sparse matrix with a static pattern, as a lineax operator."""

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax.experimental import sparse as jsparse
from jaxtyping import Array, Float, PyTree

from .._misc import ravel, size, unravel


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
        rows = np.asarray(rows, dtype=np.int64).ravel()
        cols = np.asarray(cols, dtype=np.int64).ravel()
        n_rows, n_cols = (int(s) for s in shape)
        if rows.shape != cols.shape:
            raise ValueError("SparsityPattern: rows and cols differ in length.")
        if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
            raise ValueError(f"SparsityPattern: a row index is outside {shape}.")
        if cols.size and (cols.min() < 0 or cols.max() >= n_cols):
            raise ValueError(f"SparsityPattern: a column index is outside {shape}.")
        flat = rows * n_cols + cols
        if np.any(flat[1:] <= flat[:-1]):  # not already in CSR order without repeats
            flat = sorted_unique(flat)
        self.rows = (flat // n_cols).astype(np.int32)
        self.cols = (flat % n_cols).astype(np.int32)
        self.shape = (n_rows, n_cols)
        counts = np.bincount(self.rows, minlength=n_rows)
        self.indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        self._hash = hash((self.shape, flat.tobytes()))

    @property
    def nnz(self) -> int:
        """The number of stored entries."""
        return int(self.rows.size)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return (
            isinstance(other, SparsityPattern)
            and self._hash == other._hash
            and self.shape == other.shape
            and np.array_equal(self.rows, other.rows)
            and np.array_equal(self.cols, other.cols)
        )

    def __repr__(self):
        return f"SparsityPattern(shape={self.shape}, nnz={self.nnz})"

    @ft.cached_property
    def transpose_permutation(self) -> np.ndarray:
        """`data[perm]` lists the entries of the transpose in its CSR order."""
        return np.lexsort((self.rows, self.cols)).astype(np.int32)

    @ft.cached_property
    def T(self) -> "SparsityPattern":
        """The pattern of the transpose."""
        perm = self.transpose_permutation  # lists it in CSR order already
        return SparsityPattern(self.cols[perm], self.rows[perm], self.shape[::-1])

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


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """`np.unique(values)`: sorted, without repeats; much faster than NumPy 2.4's
    `np.unique` on large integer arrays (0.06 s instead of 8 s for 5·10⁶)."""
    values = np.sort(values)
    return values[np.diff(values, prepend=values[:1] - 1) != 0]


class SparseLinearOperator(lx.AbstractLinearOperator):
    """A sparse matrix as a `lineax.AbstractLinearOperator` on pytrees.

    The values `data` are traced (differentiable, jit-able); the pattern is static.
    The matrix acts on flattened pytrees: `mv(v)` ravels `v` (structure
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
    pattern: SparsityPattern = eqx.field(static=True)
    input_structure: PyTree[jax.ShapeDtypeStruct] = eqx.field(static=True)
    output_structure: PyTree[jax.ShapeDtypeStruct] = eqx.field(static=True)

    def __init__(self, data, pattern, input_structure=None, output_structure=None):
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

    def mv(self, vector):
        v = ravel(vector).astype(self.data.dtype)
        products = self.data * v[self.pattern.cols]
        out = jax.ops.segment_sum(
            products,
            self.pattern.rows,
            num_segments=self.pattern.shape[0],
            indices_are_sorted=True,
        )
        return unravel(out, self.output_structure)

    def as_matrix(self):
        dense = jnp.zeros(self.pattern.shape, self.data.dtype)
        return dense.at[self.pattern.rows, self.pattern.cols].set(self.data)

    def transpose(self):
        return SparseLinearOperator(
            self.data[self.pattern.transpose_permutation],
            self.pattern.T,
            self.output_structure,
            self.input_structure,
        )

    def in_structure(self):
        return self.input_structure

    def out_structure(self):
        return self.output_structure

    @property
    def bcoo(self) -> jsparse.BCOO:
        """The matrix as a `jax.experimental.sparse.BCOO`."""
        indices = np.stack([self.pattern.rows, self.pattern.cols], axis=1)
        return jsparse.BCOO((self.data, jnp.asarray(indices)), shape=self.pattern.shape)

    @property
    def bcsr(self) -> jsparse.BCSR:
        """The matrix as a `jax.experimental.sparse.BCSR`."""
        return jsparse.BCSR(
            (
                self.data,
                jnp.asarray(self.pattern.cols),
                jnp.asarray(self.pattern.indptr),
            ),
            shape=self.pattern.shape,
        )


def _register():
    @lx.materialise.register(SparseLinearOperator)
    def _(operator):
        return operator

    @lx.diagonal.register(SparseLinearOperator)
    def _(operator):
        p = operator.pattern
        on_diagonal = p.rows == p.cols
        diag = jnp.zeros(min(p.shape), operator.data.dtype)
        return diag.at[p.rows[on_diagonal]].set(operator.data[on_diagonal])

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
