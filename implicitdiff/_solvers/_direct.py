import jax.numpy as jnp
import jax.scipy.linalg as jsl

from .._misc import max_or_nan, nan_unless, ravel, singular_threshold, unravel
from ._base import AbstractLinearSolver
from ._condition import norm1_estimate

# LAPACK (and so jax.scipy.linalg.lu_factor) has no 16-bit floating-point LU.
_FACTOR_DTYPE = {
    jnp.dtype(jnp.float16): jnp.dtype(jnp.float32),
    jnp.dtype(jnp.bfloat16): jnp.dtype(jnp.float32),
}


class Direct(AbstractLinearSolver):
    """Dense LU factorisation with partial pivoting of the materialised operator.

    `presolve` materialises `A` (one batched JVP per column, unless the representation
    already did) and factorises it once; every `solve`, forward or transposed, is then
    two triangular solves. The right choice up to a few thousand unknowns.

    **Certificate.** `presolve` also estimates `κ = max(κ₁(A), κ∞(A))` from the
    factors (Hager's estimator with Higham's extra vector for `‖A⁻¹‖₁` and
    `‖A⁻¹‖∞`, a few triangular solves each, `O(n²)` next to the `O(n³)`
    factorisation; the exact `‖A‖₁` and `‖A‖∞`). When `κ > 1/(√n·ε)` (ε the machine
    precision of the dtype), a pivot is zero, or anything is not finite, the system
    is numerically singular: `certify` says so at no extra cost, and every solution
    is all NaN. The estimate is the same for `A` and `Aᵀ` up to rounding, so forward
    mode (which factorises `A`) and reverse mode (`Aᵀ`) refuse the same systems;
    pivot sizes, which differ between the two factorisations, decide nothing.

    16-bit floats (`float16`, `bfloat16`) are factorised and solved in float32 and
    the solution rounded back; the threshold is that of the 16-bit type. Complex
    matrices are supported.
    """

    def presolve(self, A, y):
        matrix = A.as_matrix()
        n = matrix.shape[0]
        dtype = _FACTOR_DTYPE.get(jnp.dtype(matrix.dtype), matrix.dtype)
        matrix = matrix.astype(dtype)
        lu, pivots = jsl.lu_factor(matrix)
        # trans=1 solves with Mᵀ; the estimator needs Mᴴ, trans=2 for complex M.
        adjoint = 2 if jnp.issubdtype(dtype, jnp.complexfloating) else 1
        solve = lambda v: jsl.lu_solve((lu, pivots), v)  # noqa: E731
        solve_adjoint = lambda v: jsl.lu_solve((lu, pivots), v, trans=adjoint)  # noqa: E731
        inverse_1 = norm1_estimate(solve, solve_adjoint, n, dtype)
        inverse_inf = norm1_estimate(solve_adjoint, solve, n, dtype)  # ‖M⁻ᴴ‖₁
        magnitudes = jnp.abs(matrix)
        condition = jnp.maximum(
            max_or_nan(jnp.sum(magnitudes, axis=0)) * inverse_1,
            max_or_nan(jnp.sum(magnitudes, axis=1)) * inverse_inf,
        )
        # NaN (a failed solve) and inf (a zero pivot) fail the comparison.
        regular = condition <= singular_threshold(n, A.as_matrix().dtype)
        return lu, pivots, regular, A.in_structure()

    def solve(self, state, b):
        lu, pivots, regular, x_structure = state
        x = jsl.lu_solve((lu, pivots), ravel(b).astype(lu.dtype))
        return unravel(nan_unless(regular, x), x_structure)

    def certify(self, state, A):
        return state[2]


Direct.__init__.__doc__ = """**Arguments:** none."""
