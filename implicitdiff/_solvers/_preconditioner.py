import abc
from typing import Any

import equinox as eqx
import jax
import lineax as lx
from jaxtyping import PyTree


class AbstractPreconditioner(eqx.Module):
    """An approximate inverse `M⁻¹ ≈ A⁻¹`, for the `preconditioner` of
    [`implicitdiff.CG`][], [`implicitdiff.GMRES`][] and [`implicitdiff.BiCGStab`][].

    Not a linear solver: its answer is only approximate and carries no NaN-on-failure
    contract, so an [`implicitdiff.ImplicitFunction`][] refuses it as its
    `linear_solver` (the derivatives would be silently wrong). The Krylov solver that
    uses it decides convergence with the true residual.

    Built in: [`implicitdiff.Jacobi`][] and `implicitdiff.AMG(...).as_preconditioner()`.
    """

    @abc.abstractmethod
    def presolve(
        self, A: lx.AbstractLinearOperator, y: PyTree[jax.ShapeDtypeStruct]
    ) -> Any:
        """Sets up `M⁻¹` for the operator `A` (`Aᵀ` in the VJP direction: the Krylov
        solver calls this from its own `presolve`).

        **Arguments:**

        - `A`: a `lineax.AbstractLinearOperator`.
        - `y`: the structure of the solution (a pytree of `jax.ShapeDtypeStruct`).

        **Returns:**

        The state handed to `apply`.
        """

    @abc.abstractmethod
    def apply(self, state: Any, r: PyTree[jax.Array]) -> PyTree[jax.Array]:
        """Applies `M⁻¹` to a residual `r` (shaped like `A`'s output).

        **Arguments:**

        - `state`: what `presolve` returned.
        - `r`: the vector to precondition.

        **Returns:**

        `M⁻¹ r`, shaped like `A`'s input. Must stay finite for finite `r`.
        """
