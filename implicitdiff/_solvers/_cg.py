import jax.numpy as jnp
import numpy as np
from jax import lax

from ._krylov import DEFAULTS_DOC, AbstractKrylovSolver, keep_unless, safe_divide
from ._preconditioner import AbstractPreconditioner


class CG(AbstractKrylovSolver):
    """Preconditioned conjugate gradients, for a symmetric positive definite `A`.

    The cheapest Krylov method: one product with `A`, one preconditioner application
    and a few vectors of memory per step. Use it when `∂c/∂y` is symmetric positive
    definite: the conditions are the gradient of a strictly convex objective
    (`c = ∇_y f(x, y)`, so `A` is the Hessian of `f`), or an SPD system such as a
    discretised diffusion. With a non-symmetric or indefinite `A`, use
    [`implicitdiff.GMRES`][] or [`implicitdiff.BiCGStab`][].

    A non-positive curvature `pᵀAp ≤ 0` (or `rᵀM⁻¹r ≤ 0`, a preconditioner that is not
    positive definite) is a breakdown: the step is discarded and the iteration
    restarts from the true residual, or gives up if it breaks down again at once. A
    solution that does not pass the residual check is all NaN. One step is one product
    with `A`.

    !!! Example

        ```python
        import implicitdiff as idf

        solver = idf.CG(rtol=1e-8, preconditioner=idf.Jacobi())
        argmin = idf.ImplicitFunction(forward, gradient_of_objective, solver)
        ```
    """

    rtol: float | None = None
    atol: float | None = None
    max_steps: int | None = None
    preconditioner: AbstractPreconditioner | None = None

    def _cycle(self, matvec, precondition, x, r, tol, steps_left):
        def unfinished(carry):
            _, r, _, _, steps, broke = carry
            return (steps < steps_left) & ~broke & (jnp.linalg.norm(r) > tol)

        def step(carry):
            x, r, p, rz, steps, _ = carry
            Ap = matvec(p)
            pAp = jnp.vdot(p, Ap)
            # `not >` also catches a NaN.
            broke = ~(pAp > 0) | ~(rz > 0)
            alpha = safe_divide(rz, pAp, ~broke)
            r_next = r - alpha * Ap
            z = precondition(r_next)
            rz_next = jnp.vdot(r_next, z)
            p_next = z + safe_divide(rz_next, rz, ~broke) * p
            new = (x + alpha * p, r_next, p_next, rz_next, steps + 1)
            return *keep_unless(broke, new, (x, r, p, rz, steps)), broke

        z = precondition(r)
        init = (x, r, z, jnp.vdot(r, z), jnp.zeros((), np.int32), jnp.array(False))
        x, _, _, _, steps, _ = lax.while_loop(unfinished, step, init)
        return x, steps


CG.__init__.__doc__ = f"""**Arguments:**

- `rtol`, `atol`: the solution is accepted when `‖b − A x‖₂ ≤ atol + rtol·‖b‖₂`, with
    `A x` computed anew after the iteration.
- `max_steps`: the most steps (products with `A`) before giving up with NaN.
- `preconditioner`: `None`, or an [`implicitdiff.AbstractPreconditioner`][] whose
    `solve` approximates `A⁻¹` by a fixed symmetric positive definite linear map, such
    as [`implicitdiff.Jacobi`][]. It is presolved on the same operator as `CG`.

Defaults: {DEFAULTS_DOC}
"""
