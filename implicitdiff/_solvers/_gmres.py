# TEMPORARY placeholder, to be replaced by the Krylov helper.
import lineax as lx

from ._base import AbstractLinearSolver
from ._lineax import Lineax


class GMRES(AbstractLinearSolver):
    rtol: float = 1e-10
    atol: float = 1e-10

    def presolve(self, A, y):
        return Lineax(lx.GMRES(rtol=self.rtol, atol=self.atol)).presolve(A, y)

    def solve(self, state, b):
        return Lineax(lx.GMRES(rtol=self.rtol, atol=self.atol)).solve(state, b)
