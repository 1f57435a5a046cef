"""The solve of a diagonal `∂c/∂y` (elementwise conditions), which `Auto` picks."""

import jax
import jax.numpy as jnp
import lineax as lx

from .._misc import (
    max_or_nan,
    min_or_nan,
    nan_unless,
    ravel,
    singular_threshold,
    size,
    unravel,
)
from .._solve_log import report_solve
from .._sparse._detect import detect_sparsity
from ._base import AbstractLinearSolver


def is_diagonal(A: lx.AbstractLinearOperator) -> bool:
    """Whether the matrix of `A` is diagonal, by its structure (the sparsity detector
    on the jaxpr of `A.mv`, at trace time), never by its values: a probe could not
    tell a diagonal matrix from one whose off-diagonal entries cancel on it.

    Conservative: a primitive without an exact sparsity rule makes the pattern
    denser, so the answer is then `False`.
    """
    n = size(A.in_structure())
    if n != size(A.out_structure()):
        return False
    if n <= 1:
        return True
    # A fallback rule only means "not diagonal". (Not `warnings.catch_warnings`: it
    # resets the registry of warnings shown once.)
    pattern = detect_sparsity(A.mv, A.in_structure(), warn_on_fallback=False)
    rows, cols = pattern.rows, pattern.cols
    return bool(len(rows) <= n and (rows == cols).all())


class Diagonal(AbstractLinearSolver):
    """Division by the diagonal of a diagonal operator: `presolve` reads it with one
    product (`A·1`), and `κ = max|d|/min|d|` exactly. Only for an `A` that
    [`is_diagonal`] says is diagonal."""

    def presolve(self, A, y):
        diagonal = ravel(A.mv(unravel(jnp.ones(size(y), _dtype(y)), y)))
        magnitude = jnp.abs(diagonal)
        condition = max_or_nan(magnitude) / min_or_nan(magnitude)
        # NaN and inf (a zero on the diagonal) fail the comparison.
        regular = condition <= singular_threshold(diagonal.size, diagonal.dtype)
        return diagonal, regular, A.out_structure()

    def solve(self, state, b):
        diagonal, regular, x_structure = state
        report_solve(status="singular")
        return unravel(nan_unless(regular, ravel(b) / diagonal), x_structure)

    def certify(self, state, A):
        return state[1]


def _dtype(structure):
    return jnp.result_type(*jax.tree.leaves(structure))
