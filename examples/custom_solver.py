"""Write your own linear solver: Jacobi-preconditioned Richardson iteration.

Every derivative of an `ImplicitFunction` solves linear systems with `A = ∂c/∂y`
(forward mode) or `Aᵀ` (reverse mode). A solver is an `AbstractLinearSolver` with two
methods: `presolve(A, y)`, run once per linearisation point (here: extract the
diagonal of A), and `solve(state, b)`, run per right-hand side. The one rule: when
`solve` does not solve the system to satisfaction, every element of its answer is NaN.
The implicit function then applies its `on_failure` policy: NaN, a warning, or an
error.

The solver is checked against `idf.Direct()` on a nonlinear integral equation whose
Jacobian is diagonally dominant, then made to fail on a system where Jacobi's iteration
diverges.
"""

import warnings

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import lineax as lx
from _common import QUICK, Checks
from jax import lax

import implicitdiff as idf

jax.config.update("jax_enable_x64", True)

N_POINTS = 50 if QUICK else 400


class JacobiRichardson(idf.AbstractLinearSolver):
    """x ← x + ω D⁻¹ (b − A x), D the diagonal of A, until ‖b − A x‖ ≤ rtol ‖b‖."""

    rtol: float = 1e-12
    max_steps: int = 500
    omega: float = 1.0

    def presolve(self, A, y):
        # Once per linearisation point and direction: A is ∂c/∂y or its transpose.
        return A, 1 / lx.diagonal(A)

    def solve(self, state, b):
        A, inverse_diagonal = state
        b_flat, unravel = jfu.ravel_pytree(b)
        residual = lambda x: b_flat - jfu.ravel_pytree(A.mv(unravel(x)))[0]
        tolerance = self.rtol * jnp.linalg.norm(b_flat)

        def step(carry):
            x, r, k = carry
            x = x + self.omega * inverse_diagonal * r
            return x, residual(x), k + 1

        def unfinished(carry):
            _, r, k = carry
            # A NaN norm compares False: a diverged iteration stops too.
            return (jnp.linalg.norm(r) > tolerance) & (k < self.max_steps)

        x0 = jnp.zeros_like(b_flat)
        x, r, _ = lax.while_loop(unfinished, step, (x0, b_flat, 0))
        solved = jnp.linalg.norm(r) <= tolerance  # False for NaN as well
        return unravel(jnp.where(solved, x, jnp.nan))  # the NaN contract


# A Hammerstein integral equation on [0, 1]:  y(s) + ∫ K(s, t) sin(y(t)) dt = x(s).
s = jnp.linspace(0.0, 1.0, N_POINTS)
KERNEL = 0.8 * jnp.exp(-jnp.abs(s[:, None] - s[None, :])) / N_POINTS  # quadrature


def integral_conditions(x, y):
    return y + KERNEL @ jnp.sin(y) - x


def integral_forward(x):
    # y = x - K sin(y) contracts (‖K‖∞ < 1): iterate to convergence.
    step = lambda _, y: x - KERNEL @ jnp.sin(y)
    return lax.fori_loop(0, 200, step, x)


def main():
    checks = Checks()
    x = jnp.sin(3 * jnp.pi * s) + s**2

    solvers = {"Direct": idf.Direct(), "JacobiRichardson": JacobiRichardson()}
    jacobians = {}
    for name, solver in solvers.items():
        y_of_x = idf.ImplicitFunction(
            integral_forward, integral_conditions, linear_solver=solver
        )
        jacobians[name, "jacfwd"] = jax.jit(jax.jacfwd(y_of_x))(x)
        jacobians[name, "jacrev"] = jax.jit(jax.jacrev(y_of_x))(x)
    y = integral_forward(x)
    checks.error(
        "equation residual at the forward's solution",
        jnp.max(jnp.abs(integral_conditions(x, y))),
        1e-12,
    )
    for mode in ("jacfwd", "jacrev"):
        error = jnp.max(
            jnp.abs(jacobians["JacobiRichardson", mode] - jacobians["Direct", mode])
        )
        checks.error(
            f"JacobiRichardson vs Direct, {mode} ({N_POINTS}×{N_POINTS})", error, 1e-10
        )

    # A system Jacobi's iteration cannot solve: the iteration matrix -D⁻¹(A - D) has
    # spectral radius 2, so the iterates diverge. Direct solves it: det(A) = -3.
    A = jnp.array([[1.0, 2.0], [2.0, 1.0]])
    linear_forward = lambda x: jnp.linalg.solve(A, x)
    linear_conditions = lambda x, y: A @ y - x
    b = jnp.array([1.0, -1.0])
    direct = idf.ImplicitFunction(linear_forward, linear_conditions)
    checks.error(
        "Direct on the hard system: Jacobian vs inv(A)",
        jnp.max(jnp.abs(jax.jacrev(direct)(b) - jnp.linalg.inv(A))),
        1e-14,
    )

    failing = idf.ImplicitFunction(
        linear_forward,
        linear_conditions,
        linear_solver=JacobiRichardson(),
        on_failure="warn",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jacobian = jax.jit(jax.jacrev(failing))(b)
        jax.effects_barrier()  # the warning comes from a callback: wait for it
    runtime_warnings = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    checks.true(
        "a failed solve gives an all-NaN Jacobian",
        bool(jnp.all(jnp.isnan(jacobian))),
        f"{jacobian.tolist()}",
    )
    checks.true(
        'on_failure="warn" emits a RuntimeWarning',
        runtime_warnings,
        str(runtime_warnings[0].message) if runtime_warnings else "none",
    )

    raising = idf.ImplicitFunction(
        linear_forward,
        linear_conditions,
        linear_solver=JacobiRichardson(),
        on_failure="raise",
    )
    try:
        jax.block_until_ready(eqx.filter_jit(jax.grad(lambda b: raising(b).sum()))(b))
        raised = ""
    except Exception as error:  # JaxRuntimeError, its last line the OnFailureError
        raised = f"{type(error).__name__}"
    checks.true('on_failure="raise" raises', raised, raised)

    checks.finish()


if __name__ == "__main__":
    main()
