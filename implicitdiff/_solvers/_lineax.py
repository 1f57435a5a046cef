import jax.numpy as jnp
import lineax as lx

from .._misc import all_finite, nan_unless
from ._base import AbstractLinearSolver


class Lineax(AbstractLinearSolver):
    """Adapter for any [lineax](https://docs.kidger.site/lineax/) solver.

    `presolve` calls the lineax solver's `init` (where lineax solvers factorise), and
    `solve` its `compute`. Whatever lineax reports as unsuccessful (singular,
    max steps reached, breakdown, stagnation) becomes an all-NaN solution, as does a
    non-finite one; nothing is ever raised from inside the backward pass.

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
        options = {} if self.options is None else self.options
        return self.solver.init(A, options)

    def solve(self, state, b):
        options = {} if self.options is None else self.options
        x, result, _ = self.solver.compute(state, b, options)
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
