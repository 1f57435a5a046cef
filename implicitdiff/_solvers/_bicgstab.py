import jax.numpy as jnp
import numpy as np
from jax import lax

from .._misc import GOLDEN_ANGLE
from ._krylov import DEFAULTS_DOC, AbstractKrylovSolver, keep_unless, safe_divide
from ._preconditioner import AbstractPreconditioner

OMEGA_MIN_COSINE = 0.7


class BiCGStab(AbstractKrylovSolver):
    """Preconditioned BiCGStab (van der Vorst), for a general square `A`.

    Short recurrences: two products with `A`, two preconditioner applications and
    seven vectors of memory per step, however many steps. Use it instead of
    [`implicitdiff.GMRES`][] for a non-symmetric `A` when GMRES would need a large
    `restart` (memory) or stagnates when restarted; GMRES is the more robust of the
    two, as BiCGStab's residual is not monotone and it can break down.

    The stabilising step `ω` is limited as proposed by Sleijpen and van der Vorst, so
    that a skew-symmetric part of `A` does not stall it, and the shadow residual `r̂`
    is a fixed vector, `cos(2.39996·k)`, not `r₀`, which breaks down at once on
    permutation-like systems. A breakdown (`r̂ᵀr ≈ 0` or `r̂ᵀv ≈ 0` relative to machine
    precision, or `A ŝ = 0`) discards the step and restarts from the true residual; a
    breakdown right after a restart gives up. A solution that does not pass the
    residual check is all NaN. One step is two products with `A`.
    """

    rtol: float | None = None
    atol: float | None = None
    max_steps: int | None = None
    preconditioner: AbstractPreconditioner | None = None

    def _cycle(self, matvec, precondition, x, r, tol, steps_left):
        # Not r̂ = r, which breaks down at once on structured systems (r̂ᵀAr = 0 for a
        # permutation-like A and a unit-vector right-hand side, as every column of a
        # jacrev meets), but a fixed vector with no zero entry and no structure.
        r_shadow = jnp.cos(GOLDEN_ANGLE * jnp.arange(r.size, dtype=r.dtype))
        eps = jnp.finfo(r.dtype).eps
        shadow_norm = jnp.linalg.norm(r_shadow)

        def nonzero(product, vector):
            return jnp.abs(product) > eps * shadow_norm * jnp.linalg.norm(vector)

        def unfinished(carry):
            _, r, *_, steps, broke = carry
            return (steps < steps_left) & ~broke & (jnp.linalg.norm(r) > tol)

        def step(carry):
            x, r, p, v, rho, alpha, omega, steps, _ = carry
            rho_next = jnp.vdot(r_shadow, r)
            ok = nonzero(rho_next, r) & (omega != 0)
            beta = safe_divide(rho_next, rho, ok) * safe_divide(alpha, omega, ok)
            p = r + beta * (p - omega * v)
            p_hat = precondition(p)
            v = matvec(p_hat)
            rv = jnp.vdot(r_shadow, v)
            ok = ok & nonzero(rv, v)
            alpha = safe_divide(rho_next, rv, ok)
            s = r - alpha * v
            s_hat = precondition(s)
            t = matvec(s_hat)
            omega = _omega(s, t, jnp.linalg.norm(s) > tol)
            new = (
                x + alpha * p_hat + omega * s_hat,
                s - omega * t,
                p,
                v,
                rho_next,
                alpha,
                omega,
                steps + 1,
            )
            return *keep_unless(~ok, new, carry[:-1]), ~ok

        one = jnp.ones((), r.dtype)
        zeros = jnp.zeros_like(r)
        init = (x, r, zeros, zeros, one, one, one, jnp.zeros((), np.int32))
        x, *_, steps, _ = lax.while_loop(unfinished, step, (*init, jnp.array(False)))
        return x, steps


def _omega(s, t, needed):
    """The stabilising step `ω` of `r = s − ω t`, with the limiter of Sleijpen and
    van der Vorst (1995): the minimising `ω = tᵀs / tᵀt` is enlarged to
    `±0.7·‖s‖/‖t‖` when `t` and `s` are nearly orthogonal (cosine below 0.7), as for a
    skew-symmetric `A`, where it would be ~0 at every step and BiCGStab would stall.
    0 when not `needed` (`s` already small) or when `t = 0`."""
    s_norm, t_norm = jnp.linalg.norm(s), jnp.linalg.norm(t)
    ts = jnp.vdot(t, s)
    ok = needed & (t_norm > 0)
    cosine = safe_divide(ts, t_norm * s_norm, ok)
    magnitude = jnp.maximum(jnp.abs(cosine), OMEGA_MIN_COSINE) * safe_divide(
        s_norm, t_norm, ok
    )
    return jnp.where(ts < 0, -magnitude, magnitude)


BiCGStab.__init__.__doc__ = f"""**Arguments:**

- `rtol`, `atol`: the solution is accepted when `‖b − A x‖₂ ≤ atol + rtol·‖b‖₂`, with
    `A x` computed anew after the iteration.
- `max_steps`: the most steps (each two products with `A`) before giving up with NaN.
- `preconditioner`: `None`, or an [`implicitdiff.AbstractPreconditioner`][] whose
    `solve` approximates `A⁻¹` by a fixed linear map, such as
    [`implicitdiff.Jacobi`][] (applied on the right: the residual checked is that of
    the original system). It is presolved on the same operator as `BiCGStab`.

Defaults: {DEFAULTS_DOC}
"""
