from typing import Literal

import jax.numpy as jnp
import jax.scipy.linalg as jsl

from .._misc import nan_unless, ravel, size, unravel
from .._solve_log import report_solve
from ._base import AbstractLinearSolver
from ._cg import CG
from ._krylov import DEFAULTS_DOC, check_tolerances

METHODS = ("auto", "cholesky", "cg")
# Cholesky of the n×n normal matrix costs n³/6 flops after n products to build it:
# cheaper than CG's hundreds of products up to about the same size as `Auto`'s LU.
CHOLESKY_MAX_SIZE = 1024


class LeastSquares(AbstractLinearSolver):
    """For conditions with more equations than unknowns (`c` larger than `y`).

    With `A = ∂c/∂y` of full column rank, the derivative solves the least-squares
    problem `min ‖A ẏ − r‖₂`, whose solution satisfies the normal equations
    `AᵀA ẏ = Aᵀ r`. The [`implicitdiff.ImplicitFunction`][] recognises this solver and
    hands it the normal operator `AᵀA` (square, symmetric positive semi-definite) with
    the right-hand side `Aᵀ r`; it is also correct, if more expensive than
    [`implicitdiff.Direct`][], for a square `A`. The normal equations square the
    condition number of `A`: keep `A` well conditioned (scale the conditions).

    Methods:

    - `"cholesky"`: materialises `AᵀA` (one product per unknown) and factorises it once
        per linearisation point. The solution is all NaN when `AᵀA` is not positive
        definite to working precision (a pivot at most `10·n·ε` times the largest):
        a rank-deficient `A` has no unique derivative.
    - `"cg"`: [`implicitdiff.CG`][] on the normal equations, matrix-free. Its tolerances
        apply to the normal equations: `‖Aᵀr − AᵀA ẏ‖₂ ≤ atol + rtol·‖Aᵀr‖₂`. For a
        rank-deficient `A` it returns one least-squares solution rather than NaN.
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
            return self._cg().presolve(A, y)
        matrix = A.as_matrix()
        factor = jnp.linalg.cholesky(matrix)
        pivots = jnp.diag(factor) ** 2
        # The last pivot of an exactly singular AᵀA comes out at a few n·ε times the
        # largest: 10·n·ε keeps it from passing for a (huge, wrong) solution.
        tolerance = 10 * matrix.shape[0] * jnp.finfo(matrix.dtype).eps * jnp.max(pivots)
        singular = ~jnp.all(jnp.isfinite(factor)) | (jnp.min(pivots) <= tolerance)
        return factor, singular, A.in_structure()

    def solve(self, state, b):
        if self._method(size(b)) == "cg":
            return self._cg().solve(state, b)
        factor, singular, x_structure = state
        report_solve(status="singular")
        x = jsl.cho_solve((factor, True), ravel(b).astype(factor.dtype))
        ok = ~singular & jnp.all(jnp.isfinite(x))
        return unravel(nan_unless(ok, x), x_structure)


LeastSquares.__init__.__doc__ = f"""**Arguments:**

- `method`: `"auto"`, `"cholesky"` or `"cg"`, see above.
- `rtol`, `atol`, `max_steps`: the tolerances and step limit of `"cg"` (unused by
    `"cholesky"`), as in [`implicitdiff.CG`][].

Defaults: {DEFAULTS_DOC}
"""
