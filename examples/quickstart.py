"""Quickstart: derivatives of the solution of Kepler's equation.

The eccentric anomaly E of an orbit solves Kepler's equation E - e sin(E) = M for the
mean anomaly M and the eccentricity e. There is no closed form: E comes from Newton's
method in a `lax.while_loop`, which JAX cannot differentiate in reverse mode. The
implicit function theorem gives the derivatives from the equation alone:

    dE/dM = 1 / (1 - e cos E),    dE/de = sin E / (1 - e cos E).
"""

import sys

import jax
import jax.numpy as jnp
from jax import lax

import implicitdiff as idf

jax.config.update("jax_enable_x64", True)


def forward(M, e):  # Newton's method: run, never differentiated
    def residual(E):
        return E - e * jnp.sin(E) - M

    def newton_step(E):
        return E - residual(E) / (1 - e * jnp.cos(E))

    unsolved = lambda E: jnp.max(jnp.abs(residual(E))) > 1e-13
    return lax.while_loop(unsolved, newton_step, M)


def conditions(M, E, e):  # c(x, y, *args) = 0 at the solution
    return E - e * jnp.sin(E) - M


kepler = idf.ImplicitFunction(forward, conditions)

M, e = jnp.linspace(0.5, 3.0, 4), 0.6
E = kepler(M, e)
dE_dM, dE_de = jax.jacobian(kepler, argnums=(0, 1))(M, e)
d2E_dM2 = jax.vmap(jax.grad(jax.grad(kepler)), in_axes=(0, None))(M, e)

# Analytic values, from the implicit function theorem by hand.
denominator = 1 - e * jnp.cos(E)
errors = {
    "dE/dM": jnp.max(jnp.abs(jnp.diag(dE_dM) - 1 / denominator)),
    "dE/de": jnp.max(jnp.abs(dE_de - jnp.sin(E) / denominator)),
    "d2E/dM2": jnp.max(jnp.abs(d2E_dM2 + e * jnp.sin(E) / denominator**3)),
}
print("E      =", E)
print("dE/dM  =", jnp.diag(dE_dM))
print("dE/de  =", dE_de)
for name, error in errors.items():
    print(f"{name}: max error vs analytic {error:.1e}")
sys.exit(0 if all(error < 1e-10 for error in errors.values()) else 1)
