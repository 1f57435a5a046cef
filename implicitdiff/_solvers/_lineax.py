import jax
import jax.numpy as jnp
import lineax as lx

from .._misc import (
    all_finite,
    nan_unless,
    operator_norm_lower_bound,
    probes,
    ravel,
    size,
    unravel,
)
from .._solve_log import report_solve
from ._base import AbstractLinearSolver


class Lineax(AbstractLinearSolver):
    """Adapter for any [lineax](https://docs.kidger.site/lineax/) solver.

    `presolve` calls the lineax solver's `init` (where lineax solvers factorise), and
    `solve` its `compute`. Whatever lineax reports as unsuccessful (singular,
    max steps reached, breakdown, stagnation) becomes an all-NaN solution, as does a
    non-finite one; nothing is ever raised from inside the backward pass.

    lineax's direct solvers accept numerically singular matrices whose factorisation
    shows no zero pivot, and return a finite, wrong answer. So `presolve` also solves
    for four fixed probe vectors (one batched solve) and bounds the condition number
    from below, `κ∞(A) ≥ ‖A p‖∞ ‖A⁻¹ q‖∞`; above `1/(n·ε)` every solution is NaN.
    With a lineax *iterative* solver that costs a batched solve per linearisation
    point: prefer [`implicitdiff.GMRES`][] and friends there.

    !!! Example

        ```python
        import lineax as lx
        import implicitdiff as idf

        solver = idf.Lineax(lx.QR())
        ```
    """

    solver: lx.AbstractLinearSolver
    options: dict | None = None

    def __check_init__(self):
        if not isinstance(self.solver, lx.AbstractLinearSolver):
            raise TypeError(
                "Lineax(solver) needs a lineax.AbstractLinearSolver, "
                f"got {self.solver!r}."
            )

    def presolve(self, A, y):
        state = self.solver.init(A, self._options)
        # κ∞(A) ≥ ‖A p‖∞ ‖A⁻¹ q‖∞ for probes of ∞-norm 1: one batched solve that
        # catches the numerically singular matrices lineax's solvers accept.
        b_structure = A.out_structure()
        inverse_products = jax.vmap(
            lambda q: ravel(self._solve(state, unravel(q, b_structure)))
        )(probes(b_structure))
        inverse_norm = jnp.max(jnp.abs(inverse_products))
        condition = operator_norm_lower_bound(A) * inverse_norm
        eps = jnp.finfo(inverse_products.dtype).eps
        singular = ~(condition * size(y) * eps <= 1)  # NaN counts as singular
        return state, singular

    def solve(self, state, b):
        state, singular = state
        report_solve(status={"singular": singular})
        x = self._solve(state, b)
        return nan_unless(~singular & all_finite(x), x)

    @property
    def _options(self) -> dict:
        return {} if self.options is None else self.options

    def _solve(self, state, b):
        x, result, _ = self.solver.compute(state, b, self._options)
        ok = jnp.asarray(result == lx.RESULTS.successful) & all_finite(x)
        return nan_unless(ok, x)


Lineax.__init__.__doc__ = """**Arguments:**

- `solver`: a `lineax.AbstractLinearSolver`, such as `lineax.LU()`, `lineax.QR()`,
    `lineax.GMRES(rtol=1e-8, atol=1e-8)`. Solvers that need operator tags
    (`lineax.CG`, `lineax.Cholesky`) need an operator that carries them, which the
    implicit function does not know: prefer [`implicitdiff.CG`][] for those.
- `options`: the `options` dictionary passed to the lineax solver (for example a
    preconditioner).
"""
