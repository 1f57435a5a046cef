"""implicitdiff: implicit differentiation in JAX."""

import importlib.metadata

from ._implicit_function import ImplicitFunction as ImplicitFunction
from ._representation import (
    AbstractRepresentation as AbstractRepresentation,
    MatrixRepresentation as MatrixRepresentation,
    OperatorRepresentation as OperatorRepresentation,
)
from ._solvers._auto import Auto as Auto
from ._solvers._base import AbstractLinearSolver as AbstractLinearSolver
from ._solvers._direct import Direct as Direct
from ._solvers._gmres import GMRES as GMRES
from ._solvers._least_squares import LeastSquares as LeastSquares
from ._solvers._lineax import Lineax as Lineax

__version__ = importlib.metadata.version("implicitdiff")
