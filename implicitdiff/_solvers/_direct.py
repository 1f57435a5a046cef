import jax.numpy as jnp
import jax.scipy.linalg as jsl

from .._misc import credible, nan_unless, ravel, unravel
from .._solve_log import report_solve
from ._base import AbstractLinearSolver


class Direct(AbstractLinearSolver):
    """Dense LU factorisation with partial pivoting of the materialised operator.

    `presolve` materialises `A` (one batched JVP per column, unless the representation
    already did) and factorises it once; every `solve`, forward or transposed, is then
    two triangular solves. The right choice up to a few thousand unknowns.

    The system counts as numerically singular, and the solution is all NaN, when

    - a pivot is at most `n·ε` times the largest one (ε the machine precision of the
        dtype), or the matrix or the solution is not finite; or
    - the solution itself proves the condition number `κ∞(A)` above `1/(n·ε)`: since
        `‖x‖ ≤ ‖A⁻¹‖ ‖b‖`, `κ∞(A) ≥ ‖A‖∞ ‖x‖∞ / ‖b‖∞`. LU with partial pivoting
        can miss a singular matrix (no small pivot) and return a finite `x` of
        enormous norm whose residual looks fine; this cheap per-solve bound, with
        the exact `‖A‖∞`, catches those.
    """

    def presolve(self, A, y):
        matrix = A.as_matrix()
        n = matrix.shape[0]
        lu, pivots = jsl.lu_factor(matrix)
        pivot_size = jnp.abs(jnp.diag(lu))
        eps = jnp.finfo(matrix.dtype).eps
        singular = jnp.min(pivot_size) <= n * eps * jnp.max(pivot_size)
        # ‖A‖∞ exactly; infinite for a singular matrix, so that only x = 0 passes.
        norm = jnp.where(singular, jnp.inf, jnp.max(jnp.sum(jnp.abs(matrix), axis=1)))
        return lu, pivots, norm, A.in_structure()

    def solve(self, state, b):
        lu, pivots, norm, x_structure = state
        b_flat = ravel(b).astype(lu.dtype)
        x = jsl.lu_solve((lu, pivots), b_flat)  # NaN in lu or b makes x NaN
        report_solve(status="singular")
        return unravel(nan_unless(credible(norm, x, b_flat), x), x_structure)


Direct.__init__.__doc__ = """**Arguments:** none."""
