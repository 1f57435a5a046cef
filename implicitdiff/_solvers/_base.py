"""The plug-in interface every linear solver implements."""

import abc
from typing import Any

import equinox as eqx
import jax
import lineax as lx
import numpy as np
from jaxtyping import Array, Bool, Float, PyTree

from .._misc import (
    all_finite,
    credible_maxima,
    max_abs,
    operator_norm_lower_bound,
    pseudo_random_probe,
    result_dtype,
    size,
    unravel,
)

SolverState = Any


class AbstractLinearSolver(eqx.Module):
    """A linear solver for the systems of the implicit function theorem.

    Every derivative of an [`implicitdiff.ImplicitFunction`][] solves linear systems
    with one operator per linearisation point: `A = ∂c/∂y` for forward mode (JVPs)
    and `Aᵀ` for reverse mode (VJPs). A solver splits that work in two:

    - [`presolve`][implicitdiff.AbstractLinearSolver.presolve] runs once per
      linearisation point and direction: factorise, build a preconditioner or a
      multigrid hierarchy, and so on.
    - [`solve`][implicitdiff.AbstractLinearSolver.solve] runs once per right-hand side
      (or once for a batch of them, under `jax.vmap`), reusing that state.

    **The NaN-on-failure contract.** `solve` must return a solution with *every* element
    NaN when it has not solved the system to satisfaction: singular matrix, no
    convergence, breakdown, or non-finite input. It must never return a finite wrong
    answer. The [`implicitdiff.ImplicitFunction`][] then applies its `on_failure`
    policy (silent NaN, a warning, or an error). As a safeguard, every solution of a
    solver defined outside implicitdiff is also checked: its backward error
    `‖b − A x‖∞ / (‖A‖∞‖x‖∞ + ‖b‖∞)` must be at most `ε^¼` (10⁻⁴ in float64, 0.02
    in float32; one product with `A` per solve), or the solution counts as failed.

    **Regularity.** A residual check cannot tell a regular system from a singular one
    whose right-hand side happens to lie in its range: any Krylov method converges
    there, to one of infinitely many solutions. So once per linearisation point the
    implicit rule also asks [`certify`][implicitdiff.AbstractLinearSolver.certify]
    whether `A` is numerically regular, and every derivative through an uncertified
    `A` is NaN. The default certificate costs one extra `solve`; a solver that knows
    better (a factorisation's pivots) overrides it.

    Both methods are traced by JAX (under `jit`, `vmap` and differentiation), so they
    must be written in JAX, or call the host through `jax.pure_callback`.

    !!! Example

        A Jacobi iteration in a few lines:

        ```python
        import jax
        import jax.flatten_util
        import jax.numpy as jnp
        import implicitdiff as idf

        class Jacobi(idf.AbstractLinearSolver):
            steps: int = 200

            def presolve(self, A, y):
                return A.as_matrix()

            def solve(self, state, b):
                matrix = state
                diagonal = jnp.diag(matrix)
                b_flat, unflatten = jax.flatten_util.ravel_pytree(b)
                x = jnp.zeros_like(b_flat)
                for _ in range(self.steps):
                    x = x + (b_flat - matrix @ x) / diagonal
                residual = jnp.linalg.norm(b_flat - matrix @ x)
                converged = residual <= 1e-8 * jnp.linalg.norm(b_flat)
                return unflatten(jnp.where(converged, x, jnp.nan))
        ```
    """

    @abc.abstractmethod
    def presolve(
        self, A: lx.AbstractLinearOperator, y: PyTree[jax.ShapeDtypeStruct]
    ) -> SolverState:
        """Prepares to solve linear systems with the operator `A`.

        **Arguments:**

        - `A`: the operator, a `lineax.AbstractLinearOperator`: `∂c/∂y` for JVPs and
            its transpose for VJPs. `A.mv(v)` applies it, `A.as_matrix()` materialises
            it as a dense 2D matrix, `A.transpose()` transposes it. With the
            [`implicitdiff.Sparse`][] representation it is an
            [`implicitdiff.SparseLinearOperator`][] that also holds the sparse matrix.
        - `y`: the structure of the solution (a pytree of `jax.ShapeDtypeStruct`).

        **Returns:**

        Any pytree: the state handed to every later call of `solve`.
        """

    @abc.abstractmethod
    def solve(self, state: SolverState, b: PyTree[jax.Array]) -> PyTree[jax.Array]:
        """Solves `A x = b` with the state from `presolve`.

        **Arguments:**

        - `state`: what `presolve` returned.
        - `b`: the right-hand side, a pytree shaped like `A`'s output.

        **Returns:**

        The solution `x`, a pytree shaped like `A`'s input, with every element NaN if
        the system was not solved to satisfaction.
        """

    def certify(
        self, state: SolverState, A: lx.AbstractLinearOperator
    ) -> Bool[Array, ""]:
        """Whether `A` is numerically regular, so that the solutions of `solve` are
        the unique solutions of their systems. Called once per linearisation point and
        direction, after `presolve`.

        The default solves once more, for a fixed pseudo-random right-hand side `r`:
        a singular `A` has almost surely no solution for it, so the solve fails (NaN);
        a numerically singular one gives a huge `x`, which proves
        `κ∞(A) ≥ ‖A‖∞‖x‖∞/‖r‖∞` above `1/(√n·ε)`. A solver that certifies
        regularity in its own `presolve` (a factorisation with a pivot test and a
        condition estimate) overrides this to return that flag for free. An override
        is trusted: return `True` only with a proof (a pivot test, a condition
        estimate). On an exactly singular `A`, an LU factorisation's rounding leaves
        pivots of about `ε‖A‖`, and its solutions have small residuals and moderate
        sizes: only a certificate tells them from solutions.

        **Arguments:**

        - `state`: what `presolve` returned.
        - `A`: the operator `presolve` was given.

        **Returns:**

        A boolean scalar array: `True` when `A` is regular to working precision.
        """
        b_structure = A.out_structure()
        n, dtype = size(b_structure), result_dtype(b_structure)
        r = unravel(pseudo_random_probe(n, dtype), b_structure)
        # max|r| on the host, at trace time: XLA folds the reduction of a constant
        # on the device while compiling, 4.5 s at 10⁶ unknowns.
        r_max = np.max(np.abs(pseudo_random_probe(n, dtype, np)), initial=0.0)
        x = self.solve(state, r)
        norm_bound = self.norm_bound(state, A)
        accepted = credible_maxima(norm_bound, max_abs(x), float(r_max), n, dtype)
        return all_finite(x) & accepted

    def norm_bound(
        self, state: SolverState, A: lx.AbstractLinearOperator
    ) -> Float[Array, ""]:
        """A lower bound of `‖A‖∞`, for the check that every solution `x` of `A x = b`
        does not prove `A` numerically singular (`‖A‖∞‖x‖∞/‖b‖∞` above the
        threshold). Called once per linearisation point and direction, after
        `presolve`.

        The default is exact for an operator that stores its matrix (the largest
        absolute row sum) and otherwise the largest `‖A p‖∞` over four fixed probe
        vectors `p`, one batched product. A solver that has the matrix after its
        `presolve` overrides this to return the exact norm for free.

        **Arguments:**

        - `state`: what `presolve` returned.
        - `A`: the operator `presolve` was given.

        **Returns:**

        A non-negative scalar array (NaN or inf when `A` is not finite).
        """
        return operator_norm_lower_bound(A)
