"""implicitdiff: implicit differentiation in JAX."""

import importlib.metadata as _metadata

from . import conditions as conditions, projections as projections, prox as prox
from ._argmin import Argmin as Argmin, argmin as argmin
from ._failure import OnFailureError as OnFailureError
from ._host import host as host
from ._implicit_function import ImplicitFunction as ImplicitFunction
from ._linear_solve import linear_solve as linear_solve
from ._representation import (
    AbstractRepresentation as AbstractRepresentation,
    MatrixRepresentation as MatrixRepresentation,
    OperatorRepresentation as OperatorRepresentation,
)
from ._solve_log import (
    SolveLog as SolveLog,
    SolveLogEntry as SolveLogEntry,
    report_solve as report_solve,
)
from ._solvers._amg import AMG as AMG
from ._solvers._auto import Auto as Auto
from ._solvers._base import AbstractLinearSolver as AbstractLinearSolver
from ._solvers._bicgstab import BiCGStab as BiCGStab
from ._solvers._cg import CG as CG
from ._solvers._direct import Direct as Direct
from ._solvers._gmres import GMRES as GMRES
from ._solvers._jacobi import Jacobi as Jacobi
from ._solvers._least_squares import LeastSquares as LeastSquares
from ._solvers._lineax import Lineax as Lineax
from ._solvers._preconditioner import AbstractPreconditioner as AbstractPreconditioner
from ._solvers._scipy import SciPy as SciPy
from ._sparse._operator import (
    SparseLinearOperator as SparseLinearOperator,
    SparsityPattern as SparsityPattern,
)
from ._sparse._representation import Sparse as Sparse

__version__ = _metadata.version("implicitdiff")

__all__ = sorted(name for name in list(globals()) if not name.startswith("_"))


def __dir__() -> list[str]:
    """Only the public names (not the private modules or helpers)."""
    return [*__all__, "__version__"]
