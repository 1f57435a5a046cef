"""The solve of a diagonal `∂c/∂y` (elementwise conditions), which `Auto` picks."""

import jax
import jax.numpy as jnp
import lineax as lx
from jax.extend import core as jex_core

from .._misc import (
    nan_unless,
    ravel,
    result_dtype,
    size,
    unravel,
)
from .._solve_log import report_solve
from .._sparse._detect import detect_sparsity
from .._sparse._operator import SparseLinearOperator
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
    if isinstance(A, SparseLinearOperator):  # its pattern is at hand
        return bool((A.pattern.rows == A.pattern.cols).all())
    # The detector's cost grows with the pattern it finds: a block-dense pattern of
    # 65536 unknowns took seconds of tracing. A product or reduction that the
    # unknowns go through almost always mixes them, so large operators with one are
    # not examined (small ones are, cheaply: a constant diagonal matrix is found).
    if n > _EXAMINE_MIXING_UP_TO:
        jaxpr = jax.make_jaxpr(A.mv)(A.in_structure()).jaxpr
        if _primitive_names(jaxpr) & _MIXING:
            return False
    # A fallback rule only means "not diagonal": the detection stops there, before
    # building the dense pattern it stands for (n² entries: 75 GiB at n = 10⁵).
    pattern = detect_sparsity(A.mv, A.in_structure(), stop_on_fallback=True)
    if pattern is None:
        return False
    rows, cols = pattern.rows, pattern.cols
    return bool(len(rows) <= n and (rows == cols).all())


_EXAMINE_MIXING_UP_TO = 1024
_MIXING = {
    "dot_general",
    "conv_general_dilated",
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "cumsum",
    "cumprod",
    "cummax",
    "cummin",
    "fft",
    "sort",
    "triangular_solve",
    "custom_linear_solve",
}


def _primitive_names(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jex_core.jaxprs_in_params(eqn.params):
            names |= _primitive_names(sub)
    return names


class Diagonal(AbstractLinearSolver):
    """Division by the diagonal of a diagonal operator: `presolve` reads it with one
    product (`A·1`). Only for an `A` that [`is_diagonal`] says is diagonal.

    Each `xᵢ = bᵢ/dᵢ` is as accurate as `dᵢ` (one rounding), however widely the
    `dᵢ` differ: `√x` for `x` from 10⁻⁶ to 10⁶ has `κ = 10⁶`, past float32's
    threshold for a general matrix, and its derivative is exact. So the system is
    singular only when an entry is zero or not finite, and a solution is refused only
    when it is not finite (an overflow) or zero for a non-zero `b`."""

    def presolve(self, A, y):
        ones = unravel(jnp.ones(size(y), result_dtype(y)), y)
        diagonal = ravel(A.mv(ones))
        # A boolean reduction: NaN-safe at every size, unlike a max.
        regular = jnp.all(jnp.isfinite(diagonal) & (diagonal != 0))
        return diagonal, regular, A.in_structure()

    def solve(self, state, b):
        diagonal, regular, x_structure = state
        report_solve(status="singular")
        return unravel(nan_unless(regular, ravel(b) / diagonal), x_structure)

    def certify(self, state, A):
        return state[1]

    def norm_bound(self, state, A):
        # 0, a lower bound of ‖A‖∞ that makes the credibility test (which refuses a
        # spread of the dᵢ past 1/(√n·ε)) check only finiteness and zero for zero.
        return jnp.zeros((), jnp.finfo(state[0].dtype).dtype)
