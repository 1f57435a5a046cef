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
        """Builds the operator of the linear function `linear_fn`.

        **Arguments:**

        - `linear_fn`: a linear function of a pytree with structure `in_structure`:
            `v ↦ A v` for JVPs, `u ↦ Aᵀ u` for VJPs.
        - `in_structure`: a pytree of `jax.ShapeDtypeStruct`.

        **Returns:**

        A `lineax.AbstractLinearOperator`.
        """


class OperatorRepresentation(AbstractRepresentation):
    """Matrix-free: the solver receives a `lineax.FunctionLinearOperator` whose `mv` is
    a JVP (or VJP) of the conditions. `representation="operator"` (the default) is this.

    Cheapest when the solver only needs products (`GMRES`, `CG`, ...); a solver that
    needs the matrix (`Direct`) materialises it itself.
    """

    def operator(self, linear_fn, in_structure):
        return lx.FunctionLinearOperator(linear_fn, in_structure)


class MatrixRepresentation(AbstractRepresentation):
    """Dense: the Jacobian is materialised once per linearisation point (one batched
    JVP per column, or VJP per row for the transpose) and handed over as a
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
