from typing import Literal

import jax.numpy as jnp
import jax.scipy.linalg as jsl

from .._misc import (
    at_least_32_bit,
    max_or_nan,
    nan_unless,
    ravel,
    singular_threshold,
    size,
    unravel,
)
from .._solve_log import report_solve
from ._base import AbstractLinearSolver
from ._cg import CG
from ._condition import inverse_norm1_estimates
from ._krylov import DEFAULTS_DOC, check_tolerances, flat_dtype

METHODS = ("auto", "cholesky", "cg")
# Cholesky of the n×n normal matrix costs n³/6 flops after n products to build it:
# cheaper than CG's hundreds of products up to about the same size as `Auto`'s LU.
CHOLESKY_MAX_SIZE = 1024


class LeastSquares(AbstractLinearSolver):
    """For conditions with more equations than unknowns (`c` larger than `y`).

    With `A = ∂c/∂y` of full column rank, the derivative solves the least-squares
    problem `min ‖A ẏ − r‖₂`, whose solution satisfies the normal equations
    `AᴴA ẏ = Aᴴ r` (`AᵀA` for real `A`). The [`implicitdiff.ImplicitFunction`][]
    recognises this solver and hands it the normal operator `AᴴA` (square, Hermitian
    positive semi-definite) with the right-hand side `Aᴴ r`; it is also correct, if
    more expensive than [`implicitdiff.Direct`][], for a square `A`.

    **Fits with a residual.** When the conditions do not vanish at `y` (a nonlinear
    least-squares fit, `y = argmin ½‖c(x, y)‖²`, with `r = c(x, y) ≠ 0`), the
    derivative is that of the minimiser: the normal operator gains the residual's
    curvature `Σ rᵢ∇²_yy cᵢ` and the right-hand side `Σ rᵢ∇²_yx cᵢ·ẋ` (second
    derivatives of the conditions, two more products per operator product; zero for
    consistent conditions). Without them (Gauss-Newton) the derivative would be off
    by about the residual's relative size. The default check of the conditions
    (`‖c‖ ≤ 10⁻³·(1 + ‖y‖)`) refuses a larger residual: for such a fit pass
    `check_conditions=None`, or a tolerance the fit meets. With complex unknowns the
    minimiser of a fit with a residual is not complex-differentiable (it depends on
    `conj(ẏ)`): its derivative is NaN, with the `on_failure` policy's warning;
    write `y` as real and imaginary parts instead.

    **Rank and conditioning.** A rank-deficient `A` has no unique derivative: every
    derivative is then all NaN, never one of the least-squares solutions. The normal
    equations square the condition number, `κ(AᴴA) = κ₂(A)²`, and `AᴴA` counts as
    numerically singular past `1/(√n·ε)`: derivatives are NaN once `κ₂(A)` exceeds
    about `(√n·ε)^(−1/2)`, that is `~10⁸/n^(1/4)` in float64 and `~3·10³/n^(1/4)` in
    float32 (a square `A` up to `~10¹⁵` is [`implicitdiff.Direct`][]'s). Keep `A`
    well conditioned: scale the conditions.

    Methods:

    - `"cholesky"`: materialises `AᴴA` (one product per unknown), factorises it once
        per linearisation point and estimates its condition number from the factor
        (a few `O(n²)` solves, see [`implicitdiff.Direct`][]); past the threshold, or
        with a non-finite factor (a pivot that came out negative), every solution is
        all NaN. Real or complex unknowns; 16-bit ones are factorised in float32,
        with the threshold of their own type.
    - `"cg"`: [`implicitdiff.CG`][] on the normal equations, matrix-free, real
        unknowns only (complex ones are refused when tracing). Its tolerances apply to
        the normal equations: `‖Aᵀr − AᵀA ẏ‖₂ ≤ atol + rtol·‖Aᵀr‖₂`. Regularity is
        certified like CG's, by one more solve with a pseudo-random right-hand side
        per linearisation point: a singular `AᵀA` cannot solve it (NaN), a numerically
        singular one gives a solution that proves it.
    - `"auto"`: `"cholesky"` up to 1024 unknowns, else `"cg"` (chosen at trace time).

    !!! Example

        ```python
        import jax.numpy as jnp
        import implicitdiff as idf

        # Two conditions for one unknown: y = √x, stated twice.
        conditions = lambda x, y: jnp.concatenate([y**2 - x, 2 * (y**2 - x)])
        sqrt = idf.ImplicitFunction(jnp.sqrt, conditions, idf.LeastSquares())
        ```
    """

    method: Literal["auto", "cholesky", "cg"] = "auto"
    rtol: float | None = None
    atol: float | None = None
    max_steps: int | None = None

    def __check_init__(self):
        if self.method not in METHODS:
            raise ValueError(
                f"LeastSquares: `method` must be one of {METHODS}, got {self.method!r}."
            )
        check_tolerances("LeastSquares", self.rtol, self.atol, self.max_steps)

    def _method(self, n: int) -> str:
        if self.method == "auto":
            return "cholesky" if n <= CHOLESKY_MAX_SIZE else "cg"
        return self.method

    def _cg(self) -> CG:
        return CG(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps)

    def presolve(self, A, y):
        if self._method(size(y)) == "cg":
            flat_dtype(A, "LeastSquares(method='cg')")  # real only, at trace time
            return self._cg().presolve(A, y)
        matrix = A.as_matrix()
        n = matrix.shape[0]
        # LAPACK has no 16-bit Cholesky: those factorise in float32, with the
        # threshold of their own type.
        factor_matrix = matrix.astype(at_least_32_bit(matrix.dtype))
        factor = jnp.linalg.cholesky(factor_matrix)
        solve = lambda v: jsl.cho_solve((factor, True), v)  # noqa: E731
        # AᴴA is Hermitian: ‖M⁻¹‖₁ = ‖M⁻¹‖∞, one estimate and one solve serve.
        inverse, _ = inverse_norm1_estimates(solve, solve, n, factor.dtype)
        condition = max_or_nan(jnp.sum(jnp.abs(factor_matrix), axis=0)) * inverse
        # NaN (a negative pivot, a failed solve) fails the comparison.
        regular = condition <= singular_threshold(n, matrix.dtype)
        return factor, regular, A.in_structure()

    def solve(self, state, b):
        if self._method(size(b)) == "cg":
            return self._cg().solve(state, b)
        factor, regular, x_structure = state
        report_solve(status="singular")
        x = jsl.cho_solve((factor, True), ravel(b).astype(factor.dtype))
        return unravel(nan_unless(regular, x), x_structure)

    def certify(self, state, A):
        if self._method(size(A.in_structure())) == "cg":
            return super().certify(state, A)
        return state[1]


LeastSquares.__init__.__doc__ = f"""**Arguments:**

- `method`: `"auto"`, `"cholesky"` or `"cg"`, see above.
- `rtol`, `atol`, `max_steps`: the tolerances and step limit of `"cg"` (unused by
    `"cholesky"`), as in [`implicitdiff.CG`][].

Defaults: {DEFAULTS_DOC}
"""
