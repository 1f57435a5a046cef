from .._misc import size
from ._base import AbstractLinearSolver
from ._diagonal import Diagonal, is_diagonal
from ._direct import Direct
from ._gmres import GMRES

# Dense LU costs n³/3 flops and n² memory: at n = 1024 that is ~0.4 GFlop and 8 MB in
# float64, still cheaper than a Krylov solve with a few hundred matvecs.
DIRECT_MAX_SIZE = 1024


class Auto(AbstractLinearSolver):
    """The default solver: [`implicitdiff.Direct`][] when `y` has at most 1024
    elements in all, else [`implicitdiff.GMRES`][] with its default tolerances; and
    whatever the size, a division when `∂c/∂y` is diagonal (elementwise conditions
    such as `y**2 - x`, and every scalar problem).

    The choice is made at trace time, from the flat size of the solution and from the
    structure of `∂c/∂y` (the sparsity detector of [`implicitdiff.Sparse`][] run on
    its jaxpr: diagonal by construction, whatever the values). The chosen solver's
    own certificate ([`certify`][implicitdiff.AbstractLinearSolver.certify]) applies;
    for a diagonal, every entry non-zero and finite (each `ẏᵢ = bᵢ/dᵢ` is then as
    accurate as `dᵢ`, however widely the entries differ).
    """

    def _choose(self, A, y) -> AbstractLinearSolver:
        if is_diagonal(A):
            return Diagonal()
        return Direct() if size(y) <= DIRECT_MAX_SIZE else GMRES()

    def presolve(self, A, y):
        solver = self._choose(A, y)
        return solver, solver.presolve(A, y)

    def solve(self, state, b):
        solver, solver_state = state
        return solver.solve(solver_state, b)

    def certify(self, state, A):
        solver, solver_state = state
        return solver.certify(solver_state, A)

    def norm_bound(self, state, A):
        solver, solver_state = state
        return solver.norm_bound(solver_state, A)


Auto.__init__.__doc__ = """**Arguments:** none."""
