"""A PDE-constrained inverse problem: recover a conductivity field from observations.

The state u solves a nonlinear diffusion-reaction equation on the unit square,

    -∇·(exp(m) ∇u) + u³ = f   in Ω,      u = 0 on ∂Ω,

discretised by finite volumes on an n × n grid. Given noisy observations of u, we
recover the log-conductivity m by minimising the data misfit plus a smoothness
penalty with L-BFGS: the classic adjoint-state method. Here the adjoint comes for
free: u(m) is an `ImplicitFunction` whose conditions are the discrete PDE residual,
and its VJP solves the adjoint equation `(∂c/∂u)ᵀ λ = ∂J/∂u`.

The forward is Newton's method with matrix-free conjugate gradients, in JAX. The
backward uses the representation `Sparse("auto")`, which finds the 5-point pattern
of ∂c/∂u and assembles it with a handful of JVPs (graph colouring), and algebraic
multigrid (`AMG()`, pyamg on the host) to solve the adjoint system.
"""

import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import matplotlib.ticker as ticker
import numpy as np
import scipy.optimize
from _common import QUICK, Checks, save_figure
from jax import lax

import implicitdiff as idf

jax.config.update("jax_enable_x64", True)

N = 24 if QUICK else 64  # grid points per side: N² unknowns
H = 1.0 / (N + 1)
LBFGS_ITERATIONS = 40 if QUICK else 150
NOISE = 0.01  # observation noise, relative to max |u|
SMOOTHNESS = 3e-2  # weight of the penalty ½ ∫ |∇m|²

x1d = jnp.linspace(H, 1 - H, N)
X, Y = jnp.meshgrid(x1d, x1d, indexing="ij")
SOURCE = 20.0 * jnp.ones((N, N))


def residual(m, u):
    """The discrete PDE, c(m, u) = -∇·(exp(m) ∇u) + u³ - f, cell by cell."""
    U = jnp.pad(u, 1)  # u = 0 on the boundary
    K = jnp.exp(jnp.pad(m, 1, mode="edge"))
    kx = 0.5 * (K[1:, 1:-1] + K[:-1, 1:-1])  # conductivity on the vertical faces
    ky = 0.5 * (K[1:-1, 1:] + K[1:-1, :-1])  # and on the horizontal ones
    flux_x = kx * (U[1:, 1:-1] - U[:-1, 1:-1]) / H
    flux_y = ky * (U[1:-1, 1:] - U[1:-1, :-1]) / H
    divergence = (flux_x[1:] - flux_x[:-1] + flux_y[:, 1:] - flux_y[:, :-1]) / H
    return -divergence + u**3 - SOURCE


def newton_solve(m):
    """Newton's method, each step solved by conjugate gradients (∂c/∂u is SPD)."""
    tolerance = 1e-11 * jnp.linalg.norm(SOURCE)

    def step(state):
        u, _ = state
        r, jvp = jax.linearize(lambda u: residual(m, u), u)
        du, _ = jax.scipy.sparse.linalg.cg(jvp, -r, tol=1e-12, maxiter=10 * N)
        u = u + du
        return u, jnp.linalg.norm(residual(m, u))

    unsolved = lambda state: state[1] > tolerance
    u0 = jnp.zeros((N, N))
    return lax.while_loop(unsolved, step, (u0, jnp.linalg.norm(residual(m, u0))))[0]


state = idf.ImplicitFunction(
    newton_solve,
    residual,
    linear_solver=idf.AMG(),
    representation=idf.Sparse("auto"),
)


def true_log_conductivity():
    bump = lambda cx, cy, r: jnp.exp(-((X - cx) ** 2 + (Y - cy) ** 2) / (2 * r**2))
    return 1.0 * bump(0.3, 0.65, 0.12) - 0.8 * bump(0.7, 0.3, 0.1)


def objective(m, u_observed, sigma):
    misfit = 0.5 * jnp.mean((state(m) - u_observed) ** 2) / sigma**2
    gx, gy = jnp.diff(m, axis=0) / H, jnp.diff(m, axis=1) / H
    return misfit + 0.5 * SMOOTHNESS * H**2 * (jnp.sum(gx**2) + jnp.sum(gy**2))


def relative_error(m, m_true):
    return float(jnp.linalg.norm(m - m_true) / jnp.linalg.norm(m_true))


def main():
    checks = Checks()
    m_true = true_log_conductivity()
    u_true = jax.jit(newton_solve)(m_true)
    checks.error(
        "PDE residual of the forward's solution, relative to f",
        jnp.max(jnp.abs(residual(m_true, u_true))) / 20.0,
        1e-9,
    )
    sigma = NOISE * float(jnp.max(jnp.abs(u_true)))
    noise = sigma * jax.random.normal(jax.random.key(0), u_true.shape)
    u_observed = u_true + noise

    value_and_grad = jax.jit(jax.value_and_grad(objective))
    m0 = jnp.zeros((N, N))

    # The adjoint gradient against a central finite difference along a direction.
    direction = jnp.sin(3 * jnp.pi * X) * jnp.cos(2 * jnp.pi * Y)
    _, grad = value_and_grad(m0, u_observed, sigma)
    loss = jax.jit(objective)
    eps = 1e-5
    fd = (
        loss(m0 + eps * direction, u_observed, sigma)
        - loss(m0 - eps * direction, u_observed, sigma)
    ) / (2 * eps)
    directional = jnp.vdot(grad, direction)
    checks.error(
        "adjoint directional derivative vs central FD (relative)",
        abs(directional - fd) / abs(fd),
        1e-6,
    )

    # The same gradient with a sparse direct solver instead of multigrid.
    splu_state = idf.ImplicitFunction(
        newton_solve,
        residual,
        linear_solver=idf.SciPy("splu"),
        representation=idf.Sparse("auto"),
    )
    splu_grad = jax.jit(jax.grad(lambda m: jnp.vdot(splu_state(m), u_observed)))(m0)
    amg_grad = jax.jit(jax.grad(lambda m: jnp.vdot(state(m), u_observed)))(m0)
    checks.error(
        "AMG vs SciPy splu adjoint gradient (relative)",
        jnp.max(jnp.abs(amg_grad - splu_grad)) / jnp.max(jnp.abs(splu_grad)),
        1e-8,
    )

    # L-BFGS on the host, with the jitted objective and adjoint gradient.
    history = []

    def fun(m_flat):
        value, grad = value_and_grad(
            jnp.asarray(m_flat).reshape(N, N), u_observed, sigma
        )
        history.append(float(value))
        return float(value), np.asarray(grad, dtype=np.float64).ravel()

    start = time.perf_counter()
    result = scipy.optimize.minimize(
        fun,
        np.zeros(N * N),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": LBFGS_ITERATIONS},
    )
    seconds = time.perf_counter() - start
    m_recovered = jnp.asarray(result.x).reshape(N, N)
    print(
        f"L-BFGS: {result.nit} iterations, {result.nfev} objective+adjoint "
        f"evaluations in {seconds:.1f} s ({N}×{N} grid, {N * N} unknowns)"
    )
    error = relative_error(m_recovered, m_true)
    print(f"relative L2 error of the recovered m: {error:.3f} (start: 1.000)")
    checks.true(
        "the recovered field is close to the truth",
        error < 0.35,
        f"relative error {error:.3f} < 0.35",
    )
    rms_misfit = float(jnp.sqrt(jnp.mean((state(m_recovered) - u_observed) ** 2)))
    checks.true(
        "the fit explains the data down to the noise",
        rms_misfit < 1.5 * sigma,
        f"rms misfit {rms_misfit:.2e}, noise {sigma:.2e}",
    )

    with idf.SolveLog() as log:
        jax.block_until_ready(value_and_grad(m_recovered, u_observed, sigma))
    print(log)

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), layout="constrained")
    show = lambda ax, field, **kwargs: ax.imshow(
        np.asarray(field).T, origin="lower", extent=(0, 1, 0, 1), **kwargs
    )
    limits = dict(vmin=float(m_true.min()), vmax=float(m_true.max()), cmap="RdBu_r")
    show(axes[0], m_true, **limits)
    image = show(axes[1], m_recovered, **limits)
    fig.colorbar(image, ax=axes[:2], shrink=0.8)
    fig.colorbar(show(axes[2], u_observed, cmap="viridis"), ax=axes[2], shrink=0.8)
    axes[0].set_title("true log-conductivity m")
    axes[1].set_title(f"recovered m (relative error {error:.2f})")
    axes[2].set_title(f"observed u ({NOISE:.0%} noise)")
    for ax in axes[:3]:
        ax.set(xticks=[], yticks=[])
    axes[3].plot(history)
    axes[3].set(title="objective", xlabel="evaluation (forward + adjoint)")
    axes[3].xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    save_figure(
        fig,
        "pde_inverse_problem",
        {"grid": N, "noise": NOISE, "relative_error": round(error, 2)},
    )
    checks.finish()


if __name__ == "__main__":
    main()
