# TEMPORARY placeholder, to be replaced by the Krylov helper.
from ._base import AbstractLinearSolver
from ._direct import Direct


class LeastSquares(AbstractLinearSolver):
    def presolve(self, A, y):
        return Direct().presolve(A, y)

    def solve(self, state, b):
        return Direct().solve(state, b)
