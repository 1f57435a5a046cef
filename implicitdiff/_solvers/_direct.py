import jax.numpy as jnp
import jax.scipy.linalg as jsl

from .._misc import nan_unless, ravel, unravel
from ._base import AbstractLinearSolver


class Direct(AbstractLinearSolver):
    """Dense LU factorisation with partial pivoting of the materialised operator.

    `presolve` materialises `A` (one batched JVP per column, unless the representation
    already did) and factorises it once; every `solve`, forward or transposed, is then
    two triangular solves. The right choice up to a few thousand unknowns.

    The system counts as singular, and the solution is all NaN, when a pivot is at most
    `n·ε` times the largest one (ε the machine precision of the dtype), or when the
    matrix or the solution is not finite.
    """

    def presolve(self, A, y):
        matrix = A.as_matrix()
        lu, pivots = jsl.lu_factor(matrix)
        pivot_size = jnp.abs(jnp.diag(lu))
        tolerance = matrix.shape[0] * jnp.finfo(matrix.dtype).eps * jnp.max(pivot_size)
        singular = ~jnp.all(jnp.isfinite(lu)) | (jnp.min(pivot_size) <= tolerance)
        return lu, pivots, singular, A.in_structure()

    def solve(self, state, b):
        lu, pivots, singular, x_structure = state
        x = jsl.lu_solve((lu, pivots), ravel(b).astype(lu.dtype))
        ok = ~singular & jnp.all(jnp.isfinite(x))
        return unravel(nan_unless(ok, x), x_structure)


Direct.__init__.__doc__ = """**Arguments:** none."""
