"""Differentiate through an optimizer: the gradient of a validation loss with respect
to the regularisation of a logistic regression.

The weights `w*(λ)` minimise the L2-regularised logistic loss on a training set. We
want `d/dλ` of the logistic loss of `w*(λ)` on a validation set, the gradient that
hyperparameter tuning follows. The optimizer runs in a `lax.while_loop` until the
gradient vanishes: JAX cannot differentiate that loop in reverse mode, and unrolling
it would store every iterate anyway. The implicit function theorem needs only the
optimality condition `∇_w L(w, λ) = 0`.

The same conditions serve a second forward, `scipy.optimize.minimize` on NumPy
arrays, run on the host by `implicitdiff.host` (a `jax.pure_callback`) so that it
works under `jax.jit` too: the forward is never differentiated, so it may be any code
at all.
"""

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import scipy.optimize
from _common import QUICK, Checks, save_figure
from jax import lax

import implicitdiff as idf

jax.config.update("jax_enable_x64", True)

N_TRAIN, N_VALID, N_FEATURES = (100, 100, 10) if QUICK else (400, 400, 40)
GRADIENT_TOL = 1e-11  # inner optimality: FD checks need a well-converged argmin


def make_data(key):
    """Labels ±1 from a noisy linear model: some weights matter, most do not."""
    k_w, k_train, k_valid, k_noise = jax.random.split(key, 4)
    w_true = jax.random.normal(k_w, (N_FEATURES,)) * (jnp.arange(N_FEATURES) < 5)

    def sample(key, n):
        k_x, k_e = jax.random.split(key)
        X = jax.random.normal(k_x, (n, N_FEATURES))
        return X, jnp.sign(X @ w_true + 0.5 * jax.random.normal(k_e, (n,)))

    return sample(k_train, N_TRAIN), sample(k_valid, N_VALID)


def logistic_loss(w, X, t):
    return jnp.mean(jnp.logaddexp(0.0, -t * (X @ w)))


def training_objective(w, log_lam, X, t):
    return logistic_loss(w, X, t) + 0.5 * jnp.exp(log_lam) * jnp.sum(w**2)


def conditions(log_lam, w, X, t):
    """Optimality of w: the gradient of the training objective vanishes."""
    return jax.grad(training_objective)(w, log_lam, X, t)


def optax_forward(log_lam, X, t):
    """L-BFGS from optax, iterated in a while_loop until the gradient vanishes."""
    objective = lambda w: training_objective(w, log_lam, X, t)
    optimizer = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        w, state = carry
        value, grad = value_and_grad(w, state=state)
        updates, state = optimizer.update(
            grad, state, w, value=value, grad=grad, value_fn=objective
        )
        return optax.apply_updates(w, updates), state

    def unfinished(carry):
        w, state = carry
        count = optax.tree.get(state, "count")
        grad = jax.grad(objective)(w)
        return (count == 0) | ((optax.tree.norm(grad) > GRADIENT_TOL) & (count < 500))

    w0 = jnp.zeros(X.shape[1])
    w, _ = lax.while_loop(unfinished, step, (w0, optimizer.init(w0)))
    return w


def scipy_fit(log_lam, X, t):
    """SciPy's Newton trust-region method on NumPy arrays: code JAX cannot trace."""
    lam = float(np.exp(log_lam))

    def probabilities(w):  # of the wrong label: logistic(-t Xw), without overflow
        return 0.5 * (1 - np.tanh(0.5 * t * (X @ w)))

    def value_and_grad(w):
        value = np.mean(np.logaddexp(0.0, -t * (X @ w))) + 0.5 * lam * w @ w
        return value, X.T @ (-t * probabilities(w)) / len(t) + lam * w

    def hessian(w):
        p = probabilities(w)
        return (X.T * (p * (1 - p))) @ X / len(t) + lam * np.eye(X.shape[1])

    result = scipy.optimize.minimize(
        value_and_grad,
        np.zeros(X.shape[1]),
        jac=True,
        hess=hessian,
        method="trust-exact",
        options={"gtol": GRADIENT_TOL},
    )
    return result.x


# Under jit the host function is a callback: it needs the shape of its result.
scipy_forward = idf.host(
    scipy_fit,
    result_shape=lambda log_lam, X, t: jax.ShapeDtypeStruct(X.shape[1:], X.dtype),
)


def validation_loss_fn(argmin, valid):
    return lambda log_lam, train: logistic_loss(argmin(log_lam, *train), *valid)


def central_difference(f, x, h=1e-4):
    return (f(x + h) - f(x - h)) / (2 * h)


def main():
    checks = Checks()
    train, valid = make_data(jax.random.key(0))
    log_lam = jnp.log(0.05)

    # Reverse mode through the while_loop itself is impossible.
    try:
        # eval_shape: tracing the gradient is enough to meet the error.
        jax.eval_shape(
            jax.grad(validation_loss_fn(optax_forward, valid)), log_lam, train
        )
        raised = ""
    except ValueError as error:
        raised = str(error).splitlines()[0]
    checks.true("jax.grad through lax.while_loop raises", raised, repr(raised[:70]))

    # The implicit function: same forward, differentiated by its conditions.
    argmin = idf.ImplicitFunction(optax_forward, conditions)
    loss = jax.jit(validation_loss_fn(argmin, valid))
    value_and_grad = jax.jit(jax.value_and_grad(validation_loss_fn(argmin, valid)))
    value, grad = value_and_grad(log_lam, train)
    fd = central_difference(lambda s: loss(s, train), log_lam)
    print(
        f"optax forward: validation loss {value:.6f}, d/dlog(λ) {grad:.8f}, "
        f"finite difference {fd:.8f}"
    )
    checks.error("optax + implicit gradient vs central FD", abs(grad - fd), 1e-6)

    # The data are differentiable too: d validation loss / d training features.
    grad_X = jax.jit(jax.grad(lambda X: loss(log_lam, (X, train[1]))))(train[0])
    i, j = 3, 1
    bump = jnp.zeros_like(train[0]).at[i, j].set(1.0)
    fd_X = central_difference(
        lambda s: loss(log_lam, (train[0] + s * bump, train[1])), 0
    )
    checks.error(
        "gradient w.r.t. a training feature vs FD", abs(grad_X[i, j] - fd_X), 1e-7
    )

    # The SciPy forward, differentiated through the same conditions.
    scipy_argmin = idf.ImplicitFunction(scipy_forward, conditions)
    scipy_loss = jax.jit(validation_loss_fn(scipy_argmin, valid))
    scipy_value, scipy_grad = jax.jit(jax.value_and_grad(scipy_loss))(log_lam, train)
    scipy_fd = central_difference(lambda s: scipy_loss(s, train), log_lam)
    print(
        f"scipy forward: validation loss {scipy_value:.6f}, d/dlog(λ) "
        f"{scipy_grad:.8f}, finite difference {scipy_fd:.8f}"
    )
    checks.error("scipy + implicit gradient vs FD", abs(scipy_grad - scipy_fd), 1e-6)
    checks.error("scipy and optax gradients agree", abs(scipy_grad - grad), 1e-6)

    # The validation loss over a range of λ, with the gradient as tangents.
    grid = jnp.linspace(jnp.log(1e-3), jnp.log(1.0), 9 if QUICK else 25)
    values = jax.vmap(loss, in_axes=(0, None))(grid, train)
    points = grid[:: len(grid) // 4]
    slopes = jax.vmap(value_and_grad, in_axes=(0, None))(points, train)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(np.exp(grid), values, "k-", label="validation loss")
    for s, v, g in zip(points, *slopes, strict=True):
        ds = jnp.array([-0.6, 0.6])
        ax.plot(np.exp(s + ds), v + g * ds, "C1-", lw=2)
        ax.plot(np.exp(s), v, "C1o")
    ax.plot([], [], "C1-", lw=2, label="implicit gradient (tangent)")
    ax.set(xscale="log", xlabel="regularisation λ", ylabel="validation log-loss")
    ax.legend()
    save_figure(fig, "differentiate_optimizer", {"tangents": len(points)})
    checks.finish()


if __name__ == "__main__":
    main()
