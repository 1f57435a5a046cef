"""The worked PDE: −div(κ∇u) + u³ = θ on a 64×64 grid, κ with a contrast of 10⁴.

The forward is Newton's method in NumPy/SciPy on the host (`implicitdiff.host`);
the gradient of a loss w.r.t. θ goes through the sparse ∂c/∂u and `AMG()`, and must
equal the `SciPy("splu")` gradient, itself checked against an adjoint solve in SciPy
alone. ∂c/∂u is detected and assembled by `implicitdiff.Sparse("auto")`.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg as sla

import implicitdiff as idf

# The problem lives with its benchmark, at the repository root.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.sparse_pde_vjp import (  # noqa: E402
    conditions,
    jacobian_matrix,
    newton,
    problem,
)

jax.config.update("jax_enable_x64", True)

N = 64


@pytest.fixture(scope="module")
def pde():
    theta, u, w, kx, ky = problem(N)
    contrast = max(kx.max(), ky.max()) / min(kx.min(), ky.min())
    assert contrast == pytest.approx(1e4)
    return theta, u, w, kx, ky


def gradient(solver, kx, ky):
    forward = idf.host(lambda theta: newton(theta, kx, ky))
    kx_, ky_ = jnp.asarray(kx), jnp.asarray(ky)
    f = idf.ImplicitFunction(
        forward,
        lambda theta, u: conditions(theta, u, kx_, ky_),
        solver,
        representation=idf.Sparse("auto"),
        on_failure="raise",
    )
    return jax.jit(jax.grad(lambda theta, w: jnp.vdot(w, f(theta))))


def test_amg_gradient_equals_splu_gradient(pde):
    theta, u, w, kx, ky = pde
    reference = gradient(idf.SciPy("splu"), kx, ky)(theta, w)
    # the adjoint Aᵀλ = w solved in SciPy alone: ∇_θ ⟨w, u⟩ = λ since ∂c/∂θ = −I
    adjoint = sla.spsolve(jacobian_matrix(u, kx, ky).T.tocsc(), w.ravel())
    np.testing.assert_allclose(np.ravel(reference), adjoint, rtol=1e-10, atol=1e-14)
    amg = gradient(idf.AMG(), kx, ky)(theta, w)
    error = np.linalg.norm(amg - reference) / np.linalg.norm(reference)
    assert error <= 1e-8
