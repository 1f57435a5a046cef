"""Bilevel optimisation: learn one regularisation weight per feature.

Ridge regression with a penalty per feature, `½ Σⱼ exp(θⱼ) wⱼ²`, fitted on a training
set (the inner problem); the penalties θ are learned by gradient descent on the loss
of the fit on a validation set (the outer problem). Each outer step solves the inner
problem to convergence with conjugate gradients in a `lax.while_loop`, and the
implicit function theorem gives the gradient of the validation loss with respect to
all the θⱼ at the cost of one more linear solve.

Only 5 of the features carry signal: the learned penalties shrink the others, and
beat the best single penalty shared by all features on held-out data.
"""

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import matplotlib.ticker as ticker
import numpy as np
import optax
from _common import QUICK, Checks, save_figure
from jax import lax

import implicitdiff as idf

jax.config.update("jax_enable_x64", True)

N_SAMPLES, N_FEATURES, N_INFORMATIVE = (60, 20, 5) if QUICK else (100, 30, 5)
OUTER_STEPS = 80 if QUICK else 300


def make_data(key):
    k_w, k_train, k_valid, k_test = jax.random.split(key, 4)
    w_true = (
        jnp.zeros(N_FEATURES)
        .at[:N_INFORMATIVE]
        .set(jax.random.normal(k_w, (N_INFORMATIVE,)) + 2.0)
    )

    def sample(key):
        k_x, k_e = jax.random.split(key)
        X = jax.random.normal(k_x, (N_SAMPLES, N_FEATURES))
        return X, X @ w_true + jax.random.normal(k_e, (N_SAMPLES,))

    return sample(k_train), sample(k_valid), sample(k_test)


def inner_objective(w, theta, X, t):
    return 0.5 * jnp.mean((X @ w - t) ** 2) + 0.5 * jnp.sum(jnp.exp(theta) * w**2)


def conditions(theta, w, X, t):
    return jax.grad(inner_objective)(w, theta, X, t)


def conjugate_gradient_fit(theta, X, t):
    """Minimises the inner objective: conjugate gradients on its normal equations
    (XᵀX/n + diag(exp θ)) w = Xᵀt/n, until the residual is 1e-12 of the start."""
    matvec = lambda v: X.T @ (X @ v) / len(t) + jnp.exp(theta) * v
    b = X.T @ t / len(t)
    tolerance = 1e-12 * jnp.linalg.norm(b)

    def step(state):
        w, r, p, rr = state
        Ap = matvec(p)
        alpha = rr / (p @ Ap)
        w, r = w + alpha * p, r - alpha * Ap
        rr_new = r @ r
        return w, r, r + (rr_new / rr) * p, rr_new

    unconverged = lambda state: jnp.sqrt(state[3]) > tolerance
    w0 = jnp.zeros_like(b)
    return lax.while_loop(unconverged, step, (w0, b, b, b @ b))[0]


fit = idf.ImplicitFunction(conjugate_gradient_fit, conditions)


def mean_squared_error(w, X, t):
    return jnp.mean((X @ w - t) ** 2)


def validation_loss(theta, train, valid):
    return mean_squared_error(fit(theta, *train), *valid)


def closed_form_validation_loss(theta, train, valid):
    """The reference: the inner argmin in closed form, differentiated by JAX."""
    X, t = train
    H = X.T @ X / len(t) + jnp.diag(jnp.exp(theta))
    return mean_squared_error(jnp.linalg.solve(H, X.T @ t / len(t)), *valid)


def main():
    checks = Checks()
    train, valid, test = make_data(jax.random.key(0))

    # The best single penalty shared by all features, by grid search: the baseline.
    grid = jnp.linspace(-12.0, 2.0, 57)
    shared = jax.vmap(lambda s: validation_loss(jnp.full(N_FEATURES, s), train, valid))
    grid_losses = shared(grid)
    best_shared = grid[jnp.argmin(grid_losses)]
    print(
        f"best shared penalty exp({best_shared:.2f}): validation MSE "
        f"{grid_losses.min():.4f}"
    )

    value_and_grad = jax.jit(jax.value_and_grad(validation_loss))
    reference_grad = jax.jit(jax.grad(closed_form_validation_loss))
    theta = jnp.full(N_FEATURES, best_shared)  # start from the best shared penalty
    _, grad = value_and_grad(theta, train, valid)
    checks.error(
        "implicit gradient vs closed form, at the start",
        jnp.max(jnp.abs(grad - reference_grad(theta, train, valid))),
        1e-10,
    )

    optimizer = optax.adam(0.1)
    opt_state = optimizer.init(theta)

    @jax.jit
    def outer_step(theta, opt_state):
        loss, grad = value_and_grad(theta, train, valid)
        updates, opt_state = optimizer.update(grad, opt_state)
        return optax.apply_updates(theta, updates), opt_state, loss

    losses = []
    for _ in range(OUTER_STEPS):
        theta, opt_state, loss = outer_step(theta, opt_state)
        losses.append(float(loss))
    final = float(validation_loss(theta, train, valid))
    print(f"per-feature penalties: validation MSE {losses[0]:.4f} -> {final:.4f}")
    checks.error(
        "implicit gradient vs closed form, at the end",
        jnp.max(
            jnp.abs(
                value_and_grad(theta, train, valid)[1]
                - reference_grad(theta, train, valid)
            )
        ),
        1e-10,
    )
    checks.true(
        "per-feature penalties beat the best shared penalty on validation",
        final < 0.9 * float(grid_losses.min()),
        f"{final:.4f} < 0.9 × {grid_losses.min():.4f}",
    )
    test_shared = validation_loss(jnp.full(N_FEATURES, best_shared), train, test)
    test_learned = validation_loss(theta, train, test)
    print(
        f"held-out test MSE: shared penalty {test_shared:.4f}, "
        f"per-feature penalties {test_learned:.4f}"
    )
    checks.true(
        "the learned penalties generalise: lower test MSE than shared",
        test_learned < test_shared,
    )
    w = fit(theta, *train)
    checks.true(
        "every noise weight is smaller than every informative one",
        jnp.abs(w[N_INFORMATIVE:]).max() < jnp.abs(w[:N_INFORMATIVE]).min(),
        f"max |w| noise {jnp.abs(w[N_INFORMATIVE:]).max():.3f}, min |w| "
        f"informative {jnp.abs(w[:N_INFORMATIVE]).min():.3f}",
    )

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.6))
    ax0.plot(losses, label="per-feature penalties (implicit gradient)")
    ax0.axhline(grid_losses.min(), color="k", ls="--", label="best shared penalty")
    ax0.set(xlabel="outer step", ylabel="validation MSE", title="Outer loss")
    ax0.legend()
    colors = ["C2" if j < N_INFORMATIVE else "C7" for j in range(N_FEATURES)]
    ax1.bar(np.arange(N_FEATURES), np.asarray(theta), color=colors)
    ax1.axhline(best_shared, color="k", ls="--")
    ax1.set(
        xlabel="feature (green: informative)",
        ylabel="learned log-penalty θⱼ",
        title="Learned penalties",
    )
    ax1.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # features count
    save_figure(
        fig,
        "bilevel_hyperparameters",
        {"features": N_FEATURES, "informative": N_INFORMATIVE},
    )
    checks.finish()


if __name__ == "__main__":
    main()
