import jax.numpy as jnp
import jax.scipy.linalg as jsl

from .._misc import nan_unless, proves_singular, ravel, unravel
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
        eps = jnp.finfo(matrix.dtype).eps
        lu, pivots = jsl.lu_factor(matrix)
        pivot_size = jnp.abs(jnp.diag(lu))
        singular = ~jnp.all(jnp.isfinite(lu)) | (
            jnp.min(pivot_size) <= n * eps * jnp.max(pivot_size)
        )
        norm = jnp.max(jnp.sum(jnp.abs(matrix), axis=1))  # ‖A‖∞, exactly
        return lu, pivots, singular, norm, A.in_structure()

    def solve(self, state, b):
        lu, pivots, singular, norm, x_structure = state
        b_flat = ravel(b).astype(lu.dtype)
        x = jsl.lu_solve((lu, pivots), b_flat)
        ok = ~singular & jnp.all(jnp.isfinite(x)) & ~proves_singular(norm, x, b_flat)
        return unravel(nan_unless(ok, x), x_structure)


Direct.__init__.__doc__ = """**Arguments:** none."""
