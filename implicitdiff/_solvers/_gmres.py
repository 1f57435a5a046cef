import equinox as eqx
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax import lax

from ._krylov import (
    DEFAULTS_DOC,
    AbstractKrylovSolver,
    check_positive_int,
    safe_divide,
)
from ._preconditioner import AbstractPreconditioner


class GMRES(AbstractKrylovSolver):
    """Restarted GMRES with right preconditioning, for a general square `A`.

    Each cycle builds an orthonormal Krylov basis of up to `restart` vectors (Arnoldi,
    classical Gram–Schmidt applied twice) and takes the `x` that minimises the
    residual `‖b − A x‖₂` over it, then restarts from the true residual. The residual
    never increases, and nothing but `A` being nonsingular is assumed: the default for
    a non-symmetric `A`. Memory is `restart + 1` vectors; a larger `restart` converges
    in fewer steps at that memory cost. For a symmetric positive definite `A`,
    [`implicitdiff.CG`][] is cheaper.

    A singular `A` with `b` outside its range shows up as a zero on the diagonal of the
    reduced least-squares problem or as a residual that stops decreasing: the solution
    is all NaN. With `b` in its range GMRES converges, to one of infinitely many
    solutions: the certificate
    ([`certify`][implicitdiff.AbstractLinearSolver.certify], one more solve per
    linearisation point, for a pseudo-random right-hand side that a singular `A`
    almost surely cannot reach) is what makes every derivative through such an `A`
    NaN. One step is one product with `A`.
    """

    rtol: float | None = None
    atol: float | None = None
    restart: int = eqx.field(default=20, static=True)
    max_steps: int | None = None
    preconditioner: AbstractPreconditioner | None = None

    def __check_init__(self):
        check_positive_int("GMRES", "restart", self.restart, allow_none=False)

    def _cycle(self, matvec, precondition, x, r, tol, steps_left):
        n = r.size
        m = max(1, min(self.restart, n))
        rows, columns = jnp.arange(m + 1), jnp.arange(m)
        beta = jnp.linalg.norm(r)
        basis = jnp.zeros((m + 1, n), r.dtype).at[0].set(r / beta)
        # R: the Hessenberg matrix made upper triangular by Givens rotations, whose
        # product is Q; βQe₁ is the rotated right-hand side, its entry k the residual.
        # Under vmap the step k is batched: one-hot masks instead of indexing by k
        # keep the loop free of scatters, gathers and inner loops.
        R = jnp.zeros((m, m), r.dtype)
        Q = jnp.eye(m + 1, dtype=r.dtype)

        def unfinished(carry):
            *_, residual, k = carry
            return (k < m) & (k < steps_left) & (residual > tol)

        def arnoldi_step(carry):
            basis, R, Q, v, _, k = carry
            at_k = (rows == k).astype(r.dtype)
            at_next = (rows == k + 1).astype(r.dtype)
            w = matvec(precondition(v))
            h = jnp.zeros(m + 1, r.dtype)
            # Rows after k are still zero. Twice is enough for orthogonality to
            # working accuracy.
            for _ in range(2):
                correction = _inner(basis, w)
                w = w - _combine(correction, basis)
                h = h + correction
            h_next = jnp.linalg.norm(w)
            v = safe_divide(w, h_next, h_next > 0)
            basis = jnp.where((rows == k + 1)[:, None], v, basis)
            # The earlier rotations act on rows ≤ k: entry k + 1 is still h_next.
            column = _inner(Q, h + h_next * at_next)
            cosine, sine, diagonal = _givens(jnp.vdot(at_k, column), h_next)
            Q, last_row = _rotate_rows(Q, cosine, sine, at_k, at_next)
            column = jnp.where(rows == k, diagonal, jnp.where(rows == k + 1, 0, column))
            R = jnp.where(columns == k, column[:m, None], R)
            return basis, R, Q, v, beta * jnp.abs(last_row[0]), k + 1

        init = (basis, R, Q, basis[0], beta, jnp.zeros((), np.int32))
        basis, R, Q, _, _, k = lax.while_loop(unfinished, arnoldi_step, init)
        # Solve the leading k×k triangle; the unused rest is made the identity.
        unused = columns >= k
        R = jnp.where(jnp.diag(unused), 1, R)
        g = jnp.where(unused, 0, beta * Q[:m, 0])
        coefficients = jsl.solve_triangular(R, g)
        return x + precondition(_combine(coefficients, basis[:m])), k


# Products with the basis as dots at full precision: on GPU a float32 dot may otherwise
# run in reduced (TF32) precision, which Gram–Schmidt cannot afford. Not as sums of
# broadcast products: XLA:CPU reduces `sum(c[:, None] * B, axis=0)` across the rows of B
# 50× slower than the dot (27 ms against 0.5 ms for 21 × 10⁵ in float64). The dots cost
# ~10 % more compile time.


def _inner(matrix, vector):
    """`matrix @ vector`."""
    return jnp.dot(matrix, vector, precision=lax.Precision.HIGHEST)


def _combine(coefficients, matrix):
    """`coefficients @ matrix`: a combination of the rows of `matrix`."""
    return jnp.dot(coefficients, matrix, precision=lax.Precision.HIGHEST)


def _givens(a, b):
    """`(cosine, sine, hypot(a, b))` of the rotation taking `(a, b)` to
    `(hypot(a, b), 0)`; the identity when both are zero (a zero column: singular,
    caught by the check)."""
    norm = jnp.hypot(a, b)
    nonzero = norm > 0
    cosine = jnp.where(nonzero, safe_divide(a, norm, nonzero), 1)
    return cosine, safe_divide(b, norm, nonzero), norm


def _rotate_rows(matrix, cosine, sine, at_k, at_next):
    """Applies the Givens rotation to rows k and k + 1 (one-hot `at_k`, `at_next`);
    returns the matrix and its new row k + 1."""
    top, bottom = _combine(at_k, matrix), _combine(at_next, matrix)
    new_top, new_bottom = cosine * top + sine * bottom, cosine * bottom - sine * top
    matrix = (
        matrix
        + jnp.outer(at_k, new_top - top)
        + jnp.outer(at_next, new_bottom - bottom)
    )
    return matrix, new_bottom


GMRES.__init__.__doc__ = f"""**Arguments:**

- `rtol`, `atol`: the solution is accepted when `‖b − A x‖₂ ≤ atol + rtol·‖b‖₂`, with
    `A x` computed anew after the iteration.
- `restart`: the size of the Krylov basis before a restart (at most the number of
    unknowns): memory `restart + 1` vectors, and `O(restart·n)` work per step.
- `max_steps`: the most steps (products with `A`, over all cycles) before giving up
    with NaN.
- `preconditioner`: `None`, or an [`implicitdiff.AbstractPreconditioner`][] whose
    `solve` approximates `A⁻¹` by a fixed linear map, such as
    [`implicitdiff.Jacobi`][] or an algebraic multigrid cycle. It is applied on the
    right, so the residual minimised and checked is that of the original system. It is
    presolved on the same operator as `GMRES`.

Defaults: {DEFAULTS_DOC}
"""
