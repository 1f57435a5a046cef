"""How the operator A = ∂c/∂y (or its transpose) is handed to the linear solver."""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import lineax as lx
from jaxtyping import PyTree


class AbstractRepresentation(eqx.Module):
    """Turns the linearised conditions into the operator a solver receives.

    An [`implicitdiff.ImplicitFunction`][] linearises its conditions once per
    linearisation point; the representation decides what the linear solver's
    `presolve` sees: a matrix-free operator, a dense matrix, or a sparse matrix.
    """

    @abc.abstractmethod
    def operator(
        self, linear_fn: Callable, in_structure: PyTree[jax.ShapeDtypeStruct]
    ) -> lx.AbstractLinearOperator:
        """Builds the operator `A = ∂c/∂y` from its product `v ↦ A v`.

        Called once per linearisation point and direction in use; for VJPs the
        implicit function transposes the result with `.transpose()`.

        **Arguments:**

        - `linear_fn`: the linear function `v ↦ A v` (a JVP of the conditions).
        - `in_structure`: the structure of `v`, a pytree of `jax.ShapeDtypeStruct`.

        **Returns:**

        A `lineax.AbstractLinearOperator`.
        """


class OperatorRepresentation(AbstractRepresentation):
    """Matrix-free: the solver receives a `lineax.FunctionLinearOperator` whose `mv` is
    a JVP of the conditions (a VJP for the transpose). `representation="operator"`
    (the default) is this.

    Cheapest when the solver only needs products (`GMRES`, `CG`, ...); a solver that
    needs the matrix (`Direct`) materialises it itself.
    """

    def operator(self, linear_fn, in_structure):
        return lx.FunctionLinearOperator(linear_fn, in_structure)


class MatrixRepresentation(AbstractRepresentation):
    """Dense: the Jacobian is materialised once per linearisation point (one batched
    JVP per column) and handed over as a
    `lineax.PyTreeLinearOperator`. `representation="matrix"` is this.
    """

    def operator(self, linear_fn, in_structure):
        return lx.materialise(lx.FunctionLinearOperator(linear_fn, in_structure))


_BY_NAME = {"operator": OperatorRepresentation, "matrix": MatrixRepresentation}


def as_representation(representation) -> AbstractRepresentation:
    """Accepts `"operator"`, `"matrix"` or an `AbstractRepresentation`."""
    if isinstance(representation, AbstractRepresentation):
        return representation
    if isinstance(representation, str) and representation in _BY_NAME:
        return _BY_NAME[representation]()
    raise ValueError(
        f"representation must be 'operator', 'matrix' or an "
        f"implicitdiff.AbstractRepresentation (such as implicitdiff.Sparse(...)), "
        f"got {representation!r}."
    )


OperatorRepresentation.__init__.__doc__ = """**Arguments:** none."""
MatrixRepresentation.__init__.__doc__ = """**Arguments:** none."""
