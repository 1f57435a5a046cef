"""Bilevel learning with a constrained inner problem: one regularisation strength per
feature of a non-negative ridge regression, learned on a validation loss.

Inner problem: `w*(θ) = argmin_{w ≥ 0} ½‖X w − t‖²/n + ½ Σ_j exp(θ_j) w_j²`, solved
by projected gradient descent (`optax.sgd` followed by a projection onto `w ≥ 0`) in
`implicitdiff.argmin`. Its derivative comes from the projected-gradient conditions
`w − max(w − ∇f, 0) = 0`: on the free features it is ridge's, on the features held
at zero by the constraint it is exactly zero.

Outer problem: `min_θ` of the validation loss of `w*(θ)`, by `optax.adam`, each
inner solve warm-started from the previous one (`init` gets no derivative). The
implicit gradient is checked against central finite differences first.
"""

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import matplotlib.ticker as ticker
import numpy as np
import optax
from _common import QUICK, Checks, save_figure

import implicitdiff as idf
from implicitdiff import projections

jax.config.update("jax_enable_x64", True)

N_TRAIN, N_VALID, N_FEATURES, N_INFORMATIVE = (
    (60, 60, 10, 3) if QUICK else (150, 150, 30, 6)
)
OUTER_STEPS = 15 if QUICK else 150
INNER_TOL = 1e-10


def make_data(seed=0):
    """Targets from non-negative weights on the first features, noise elsewhere."""
    rng = np.random.default_rng(seed)
    w_true = np.zeros(N_FEATURES)
    w_true[:N_INFORMATIVE] = rng.uniform(0.5, 2.0, N_INFORMATIVE)

    def sample(n):
        X = rng.normal(size=(n, N_FEATURES))
        return jnp.asarray(X), jnp.asarray(X @ w_true + 1.0 * rng.normal(size=n))

    return sample(N_TRAIN), sample(N_VALID), w_true


def training_objective(theta, w, X, t):
    fit = 0.5 * jnp.mean((X @ w - t) ** 2)
    return fit + 0.5 * jnp.sum(jnp.exp(theta) * w**2)


def make_inner(X):
    # Step 1/L with L ≥ the largest curvature for every θ below θ_max = log(10).
    lipschitz = float(jnp.linalg.norm(X, 2) ** 2 / X.shape[0]) + 10.0
    return idf.argmin(
        training_objective,
        optax.sgd(1 / lipschitz),
        tol=INNER_TOL,
        max_steps=20_000,
        projection=lambda v, *_: projections.non_negative(v),
    )


def validation_loss(w, valid):
    X, t = valid
    return 0.5 * jnp.mean((X @ w - t) ** 2)


def main():
    checks = Checks()
    train, valid, w_true = make_data()
    inner = make_inner(train[0])
    # θ ≤ log(10): the inner step size assumes it.
    clip = lambda theta: jnp.minimum(theta, jnp.log(10.0))

    def outer_loss(theta, init):
        return validation_loss(inner(clip(theta), *train, init=init), valid)

    value_and_grad = jax.jit(jax.value_and_grad(outer_loss))
    theta = jnp.full(N_FEATURES, jnp.log(0.1))
    w0 = jnp.zeros(N_FEATURES)

    # The implicit gradient against central differences along a random direction.
    _, grad = value_and_grad(theta, w0)
    direction = jnp.asarray(np.random.default_rng(1).normal(size=N_FEATURES))
    loss = jax.jit(outer_loss)
    h = 1e-5
    fd = (loss(theta + h * direction, w0) - loss(theta - h * direction, w0)) / (2 * h)
    print(f"directional derivative: implicit {grad @ direction:.10f}, FD {fd:.10f}")
    checks.error("implicit gradient vs central FD", abs(grad @ direction - fd), 1e-8)
    w = inner(theta, *train, init=w0)
    held = np.asarray(w) == 0
    checks.true(
        "the constraint is active on some features",
        held.any(),
        f"{held.sum()} of {N_FEATURES} weights held at 0",
    )
    d_held = jax.jacrev(lambda s: inner(s, *train, init=w0))(theta)[held]
    checks.error("derivative of the held weights is exactly 0", np.abs(d_held).max(), 0)

    # The outer loop: adam on θ, inner solves warm-started from the last solution.
    optimizer = optax.adam(0.1)

    @jax.jit
    def outer_step(theta, state, w):
        value, grad = jax.value_and_grad(outer_loss)(theta, w)
        updates, state = optimizer.update(grad, state)
        theta = optax.apply_updates(theta, updates)
        return theta, state, inner(clip(theta), *train, init=w), value

    state, history = optimizer.init(theta), []
    for _ in range(OUTER_STEPS):
        theta, state, w0, value = outer_step(theta, state, w0)
        history.append(float(value))
    theta = clip(theta)
    final = float(loss(theta, w0))
    print(f"validation loss: {history[0]:.4f} → {final:.4f}")
    checks.true("the outer loop lowers the validation loss", final < history[0])
    checks.true("every inner solve converged", np.all(np.isfinite(history)))
    informative = np.arange(N_FEATURES) < N_INFORMATIVE
    lam = np.exp(np.asarray(theta))
    checks.true(
        "noise features end more regularised than informative ones",
        np.median(lam[~informative]) > np.median(lam[informative]),
        f"median λ {np.median(lam[informative]):.3g} (informative) vs "
        f"{np.median(lam[~informative]):.3g} (noise)",
    )

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(history + [final], "k-")
    left.set(xlabel="outer step (adam)", ylabel="validation loss")
    for chosen, label, colour in (
        (informative, "informative", "C0"),
        (~informative, "noise", "C1"),
    ):
        right.bar(
            np.flatnonzero(chosen), lam[chosen], color=colour, label=f"{label} feature"
        )
    right.set(yscale="log", xlabel="feature j", ylabel="learned λ_j")
    right.legend()
    fig.tight_layout()
    right.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # features
    save_figure(
        fig,
        "constrained_bilevel",
        {"features": N_FEATURES, "informative": N_INFORMATIVE},
    )
    checks.finish()


if __name__ == "__main__":
    main()
