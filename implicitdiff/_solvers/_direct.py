import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jax import lax
from jaxtyping import Array, Float, Inexact

from .._misc import (
    at_least_32_bit,
    max_or_nan,
    nan_unless,
    ravel,
    singular_threshold,
    unravel,
)
from .._solve_log import report_solve
from ._base import AbstractLinearSolver
from ._condition import inverse_norm1_estimates

# Up to this size the explicit inverse gives κ exactly and costs less than the
# estimator: 28 µs against 72 µs for a jitted gradient at n = 16, 57 against 80 at 32,
# 204 against 179 at 64 (2-core CPU, float64).
_EXPLICIT_INVERSE_MAX = 48


class Direct(AbstractLinearSolver):
    """Dense LU factorisation with partial pivoting of the materialised operator.

    `presolve` materialises `A` (one batched JVP per column, unless the representation
    already did) and factorises it once; every `solve`, forward or transposed, is then
    two triangular solves, or, up to 48 unknowns, one product with the explicit
    inverse that the certificate computes anyway (as accurate: about `κ·ε` relative,
    and a smaller program). The right choice up to a few thousand unknowns.

    **Certificate.** `presolve` also computes `κ = max(κ₁(A), κ∞(A))` from the
    factors: exactly, from the explicit inverse, up to 48 unknowns (one solve with
    `n` right-hand sides costs less there than four dependent small solves); above,
    estimated from below (Hager's estimator with Higham's extra vector for `‖A⁻¹‖₁`
    and `‖A⁻¹‖∞` together: four triangular solve pairs of one to four vectors,
    `O(n²)` next to the `O(n³)` factorisation; the exact `‖A‖₁` and `‖A‖∞`). When
    `κ > 1/(√n·ε)` (ε the machine precision of the dtype), a pivot is zero, or
    anything is not finite, the system is numerically singular:
    [`certify`][implicitdiff.AbstractLinearSolver.certify] says so at no extra cost,
    and every solution is all NaN. The estimate is the same for `A` and `Aᵀ` up to
    rounding, so forward mode (which factorises `A`) and reverse mode (`Aᵀ`) refuse
    the same systems; pivot sizes, which differ between the two factorisations,
    decide nothing.

    16-bit floats (`float16`, `bfloat16`) are factorised and solved in float32 (LAPACK
    has no 16-bit LU) and the solution rounded back; the threshold is that of the
    16-bit type. Complex matrices are supported.
    """

    def presolve(self, A, y):
        matrix = A.as_matrix()
        factor_matrix = matrix.astype(at_least_32_bit(matrix.dtype))
        lu_and_pivots = jsl.lu_factor(factor_matrix)
        if matrix.shape[0] <= _EXPLICIT_INVERSE_MAX:
            factors, condition, norm_inf = _explicit_inverse(
                factor_matrix, lu_and_pivots
            )
        else:
            factors = lu_and_pivots
            condition, norm_inf = _condition_estimate(factor_matrix, lu_and_pivots)
        # NaN (a failed solve) and inf (a zero pivot) fail the comparison.
        regular = condition <= singular_threshold(matrix.shape[0], matrix.dtype)
        return factors, regular, A.in_structure(), norm_inf

    def solve(self, state, b):
        factors, regular, x_structure, _ = state
        report_solve(status="singular")
        if isinstance(factors, tuple):
            rhs = ravel(b).astype(factors[0].dtype)
            x = jsl.lu_solve(factors, _batched_like_factors(rhs, factors))
        else:
            rhs = ravel(b).astype(factors.dtype)
            x = jnp.matmul(factors, rhs, precision=lax.Precision.HIGHEST)
        return unravel(nan_unless(regular, x), x_structure)

    def certify(self, state, A):
        return state[1]

    def norm_bound(self, state, A):
        return state[3]


def _explicit_inverse(
    matrix: Inexact[Array, "n n"], lu_and_pivots
) -> tuple[Inexact[Array, "n n"], Float[Array, ""], Float[Array, ""]]:
    """`(M⁻¹, max(κ₁, κ∞), ‖M‖∞)`, exact, for small matrices. Every solve is then
    one product with `M⁻¹` instead of one more pair of triangular solves, with an
    error of about `κ·ε` relative, as theirs. NaN or inf when the matrix or its
    factors are not finite."""
    eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
    inverse = jsl.lu_solve(lu_and_pivots, _batched_like_factors(eye, lu_and_pivots))
    norms, inverse_norms = _norms_1_and_inf(jnp.stack([matrix, inverse]))
    return inverse, _condition(norms, inverse_norms), norms[1]


def _condition_estimate(
    matrix: Inexact[Array, "n n"], lu_and_pivots
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """`max(κ₁, κ∞)` estimated from below: invariant under transposition (κ∞(M) is
    κ₁(Mᵀ)). NaN or inf when the matrix or its factors are not finite. Also `‖M‖∞`,
    exact."""
    n, dtype = matrix.shape[0], matrix.dtype

    def solve(trans):  # trans=2: with Mᴴ (Mᵀ for a real M); ‖M⁻¹‖∞ = ‖M⁻ᴴ‖₁
        return lambda v: jsl.lu_solve(
            lu_and_pivots, _batched_like_factors(v, lu_and_pivots), trans=trans
        )

    inverse_norms = inverse_norm1_estimates(solve(0), solve(2), n, dtype)
    norms = _norms_1_and_inf(matrix)
    return _condition(norms, inverse_norms), norms[1]


def _condition(norms, inverse_norms) -> Float[Array, ""]:
    """`max(κ₁, κ∞)` from `(‖M‖₁, ‖M‖∞)` and `(‖M⁻¹‖₁, ‖M⁻¹‖∞)`."""
    return jnp.maximum(norms[0] * inverse_norms[0], norms[1] * inverse_norms[1])


def _norms_1_and_inf(matrices: Inexact[Array, "*k n n"]) -> Float[Array, "*k 2"]:
    """`(‖M‖₁, ‖M‖∞)` of each matrix, NaN-safe (a NaN or inf propagates through the
    sums and products)."""
    magnitude = jnp.abs(matrices)
    if matrices.shape[-1] <= _EXPLICIT_INVERSE_MAX:  # sums fuse into one kernel
        column_sums, row_sums = jnp.sum(magnitude, -2), jnp.sum(magnitude, -1)
    else:  # XLA:CPU splits a sum along an axis into windows of 32 and runs it 5–10×
        # slower than a product with ones (at n = 250: 146 µs against about 20)
        ones = jnp.ones(magnitude.shape[-1], magnitude.dtype)
        column_sums = jnp.matmul(ones, magnitude, precision=lax.Precision.HIGHEST)
        row_sums = jnp.matmul(magnitude, ones, precision=lax.Precision.HIGHEST)
    return max_or_nan(jnp.stack([column_sums, row_sums], -2), axis=-1)


def _batched_like_factors(v: Inexact[Array, "n ..."], lu_and_pivots) -> Array:
    """`v`, made to depend on the factors so that under `vmap` it is batched and
    sharded like them. With explicitly sharded batches, `lu_solve`'s row permutation
    (a gather by batched pivots) of a right-hand side that is not batched (the
    estimator's constant vectors, `jacrev`'s basis vectors) has no sharding JAX can
    infer, and tracing fails. (`zeros_like` would not do: it is not batched. A
    non-finite factor makes the result NaN; such a matrix is refused anyway.)"""
    zeros = 0 * lu_and_pivots[0][:, 0]
    return v + zeros.reshape(zeros.shape + (1,) * (v.ndim - 1))


Direct.__init__.__doc__ = """**Arguments:** none."""
