"""Test problems with analytic derivatives, reference differentiation helpers, and
running a subprocess once per test session."""

import fcntl
import os
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from jax import lax


def newton_sqrt(x):
    """√x by Newton in a while loop with a data-dependent exit: not differentiable by
    reverse-mode unrolling, so a right derivative can only come from the implicit
    rule."""

    def keep_going(state):
        y, step = state
        return (jnp.max(jnp.abs(y**2 - x)) > 1e-13 * jnp.max(x)) & (step < 100)

    def newton_step(state):
        y, step = state
        return (y - (y**2 - x) / (2 * y)), step + 1

    y, _ = lax.while_loop(keep_going, newton_step, (jnp.ones_like(x), 0))
    return y


def sqrt_conditions(x, y):
    return y**2 - x


def sqrt_jacobian(x):
    return jnp.diag(0.5 / jnp.sqrt(x))


def stacked_sqrt(x):
    """y = reverse([√(x+2), −√x]): A = ∂c/∂y non-symmetric, B = ∂c/∂x not square."""
    return jnp.flip(jnp.concatenate([jnp.sqrt(x + 2), -jnp.sqrt(x)]))


def stacked_sqrt_conditions(x, y):
    return jnp.flip(y**2) - jnp.concatenate([x + 2, x])


def stacked_sqrt_jacobian(x):
    n = x.shape[0]
    top = np.diag(0.5 / np.sqrt(np.asarray(x) + 2))
    bottom = np.diag(-0.5 / np.sqrt(np.asarray(x)))
    return jnp.asarray(np.flip(np.concatenate([top, bottom]), axis=0).reshape(2 * n, n))


def ridge_data(n_samples=12, n_features=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, n_features))
    t = X @ rng.normal(size=n_features) + 0.1 * rng.normal(size=n_samples)
    return jnp.asarray(X), jnp.asarray(t)


def ridge_solution(lam, X, t):
    n_features = X.shape[1]
    return jnp.linalg.solve(X.T @ X + lam * jnp.eye(n_features), X.T @ t)


def ridge_forward(lam, X, t):
    """Gradient descent to convergence: a forward the implicit rule never looks into."""
    step = 1.0 / (jnp.linalg.norm(X, 2) ** 2 + lam)

    def body(_, w):
        return w - step * (X.T @ (X @ w - t) + lam * w)

    return lax.fori_loop(0, 3000, body, jnp.zeros(X.shape[1]))


def ridge_conditions(lam, w, X, t):
    return X.T @ (X @ w - t) + lam * w


def ridge_dw_dlam(lam, X, t):
    """dw/dλ = −(XᵀX + λI)⁻¹ w."""
    w = ridge_solution(lam, X, t)
    return -jnp.linalg.solve(X.T @ X + lam * jnp.eye(X.shape[1]), w)


def central_difference_jacobian(f, x, eps=1e-6):
    """Jacobian of f (array → array) by central differences, column by column."""
    x = jnp.asarray(x)
    flat = x.ravel()
    columns = []
    for i in range(flat.size):
        e = jnp.zeros_like(flat).at[i].set(eps).reshape(x.shape)
        columns.append(((f(x + e) - f(x - e)) / (2 * eps)).ravel())
    return jnp.stack(columns, axis=-1)


def once_per_session(tmp_path_factory, name: str, produce: Callable[[], str]) -> str:
    """What `produce()` returns, computed once per test session and stored as `name`.

    Under pytest-xdist every worker would compute it: the first worker to get here
    does and the others read its result (the workers of one session share the parent
    of their temporary directories)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    output = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not output.exists():
            output.write_text(produce())
    return output.read_text()
