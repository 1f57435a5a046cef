"""`linear_solve`: a differentiable sparse solve with any implicitdiff solver."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse
from jaxtyping import Array, PyTree

from ._failure import ON_FAILURE_CHOICES, CallSite, OnFailure
from ._misc import ravel, size, structure, unravel
from ._representation import as_representation
from ._solve import solve_linearised, solve_with_presolve
from ._solvers._auto import Auto
from ._solvers._base import AbstractLinearSolver
from ._solvers._least_squares import LeastSquares
from ._sparse._detect import concrete_value
from ._sparse._operator import SparseLinearOperator, SparsityPattern

_AUTO = Auto()


def linear_solve(
    A: jsparse.BCOO | jsparse.BCSR | SparseLinearOperator,
    b: PyTree[Array],
    solver: AbstractLinearSolver = _AUTO,
    *,
    on_failure: OnFailure = "warn",
) -> PyTree[Array]:
    """Solves `A x = b` for a sparse `A`, differentiably in `b` and in `A`'s values.

    `solver.presolve` runs once (on `A` for the solve and JVPs, on `Aᵀ` for VJPs) and
    `solver.solve` once per right-hand side. Derivatives go through
    `lax.custom_linear_solve`: a JVP solves with `A` again, a VJP solves `Aᵀ u = v`;
    the cotangent of `A`'s values is `−u[row]·x[col]` on `A`'s own stored entries,
    never a dense matrix. Works under `jax.jit`, `jax.vmap`, `jax.jvp`, `jax.grad`,
    `jax.jacfwd` and `jax.jacrev`. When the solver fails, `x` (or the derivative) is
    all NaN, and `on_failure` applies as in [`implicitdiff.ImplicitFunction`][].

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.experimental import sparse
        import implicitdiff as idf

        indices = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])

        def loss(values, b):
            A = sparse.BCOO((values, indices), shape=(2, 2))
            return jnp.sum(idf.linear_solve(A, b) ** 2)

        jax.grad(loss)(jnp.array([4.0, 1.0, 1.0, 3.0]), jnp.array([1.0, 2.0]))
        ```

    **Arguments:**

    - `A`: a square `jax.experimental.sparse.BCOO` or `BCSR` matrix (2D, unbatched;
        duplicate entries are summed, out-of-range padding entries ignored) or an
        [`implicitdiff.SparseLinearOperator`][]. Its indices must be known when
        tracing: NumPy arrays, or arrays computed from them, but not traced inputs.
    - `b`: the right-hand side: a vector for a matrix, a pytree shaped like the
        operator's output for an operator.
    - `solver`: an [`implicitdiff.AbstractLinearSolver`][] (default
        [`implicitdiff.Auto`][]).
    - `on_failure`: `"nan"`, `"warn"` (default) or `"raise"`.

    **Returns:**

    `x`, a vector (a pytree shaped like the operator's input) in the dtype of `A`
    and `b` together (complex for a complex `A` and a real `b`, floating for an
    integer `b`), all NaN on failure.
    """
    operator = _as_operator(A)
    if operator.pattern.shape[0] != operator.pattern.shape[1]:
        raise ValueError(
            f"linear_solve: A must be square, got shape {operator.pattern.shape}."
        )
    if size(b) != operator.pattern.shape[0]:
        raise ValueError(
            f"linear_solve: b has {size(b)} elements, A has shape "
            f"{operator.pattern.shape}."
        )
    b_flat = ravel(b)
    dtype = jnp.result_type(operator.data, b_flat)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"linear_solve: A and b must hold floating-point or complex numbers, got "
            f"{operator.data.dtype} and {b_flat.dtype}: convert them first "
            f"(`A.astype(float)`, `jnp.asarray(b, float)`)."
        )
    flat = SparseLinearOperator(operator.data.astype(dtype), operator.pattern)
    if on_failure not in ON_FAILURE_CHOICES:
        raise ValueError(
            f"linear_solve: `on_failure` must be one of {ON_FAILURE_CHOICES}, "
            f"got {on_failure!r}."
        )
    site, system = CallSite.of_caller(), "the matrix of linear_solve"
    if isinstance(solver, LeastSquares):  # it solves the normal equations AᴴA x = Aᴴb
        x = solve_linearised(
            flat.mv,
            b_flat.astype(dtype),
            jax.ShapeDtypeStruct(b_flat.shape, dtype),
            jnp.ones((), bool),
            solver,
            as_representation("operator"),
            on_failure,
            site,
            complex_checked=True,
            system=system,
        )
    else:
        x = solve_with_presolve(
            flat.mv, b_flat.astype(dtype), flat, solver, on_failure, site, system=system
        )
    # For a matrix, x comes back shaped like b (a column (n, 1) stays one, as in
    # `jnp.linalg.solve`); for an operator, like its input. Either way in the dtype
    # of A and b together: b's would truncate an integer b's solution, or drop the
    # imaginary part of a complex A's.
    is_matrix = not isinstance(A, SparseLinearOperator)
    shapes = structure(b) if is_matrix else operator.in_structure()
    return unravel(
        x, jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)
    )


def _as_operator(A) -> SparseLinearOperator:
    if isinstance(A, SparseLinearOperator):
        return A
    if not isinstance(A, (jsparse.BCOO, jsparse.BCSR)):
        raise TypeError(
            "linear_solve: A must be a jax.experimental.sparse.BCOO or BCSR matrix or "
            f"an implicitdiff.SparseLinearOperator, got {type(A).__name__}."
        )
    if A.n_batch or A.n_dense or A.ndim != 2:
        raise ValueError(
            "linear_solve: A must be a 2D sparse matrix without batch or dense "
            "dimensions (vmap over a function that builds A instead)."
        )
    rows, cols = _coordinates(A)
    n_rows, n_cols = A.shape
    inside = (rows < n_rows) & (cols < n_cols)
    rows, cols = rows[inside], cols[inside]
    pattern = SparsityPattern(rows, cols, A.shape)
    flat = rows * n_cols + cols
    position = np.searchsorted(
        pattern.rows.astype(np.int64) * n_cols + pattern.cols, flat
    )
    data = A.data[np.flatnonzero(inside)] if not inside.all() else A.data
    if not np.array_equal(position, np.arange(pattern.nnz)):
        # Reordered, or with duplicates (which add up, as in BCOO).
        data = jnp.zeros(pattern.nnz, data.dtype).at[position].add(data)
    return SparseLinearOperator(data, pattern)


def _coordinates(A) -> tuple[np.ndarray, np.ndarray]:
    """The host row and column indices of A's stored entries."""
    arrays = (A.indices,) if isinstance(A, jsparse.BCOO) else (A.indices, A.indptr)
    values = [concrete_value(a) for a in arrays]
    if any(v is None for v in values):
        raise ValueError(
            "linear_solve: the indices of A must be known when tracing (NumPy "
            "arrays, or computed from them), not traced inputs; build A inside the "
            "transformed function from its values."
        )
    if isinstance(A, jsparse.BCOO):
        (indices,) = values
        return indices[:, 0].astype(np.int64), indices[:, 1].astype(np.int64)
    indices, indptr = values
    rows = np.repeat(np.arange(A.shape[0]), np.diff(indptr))
    return rows, indices.astype(np.int64)
