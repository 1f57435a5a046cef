"""Hyperparameter gradients through optimisers: implicitdiff's ready-made conditions
against jaxopt's solvers with `implicit_diff=True`, end to end (forward + gradient).

- "lasso path": `d/dλ` of a validation loss of the lasso `w*(λ)` (more features than
  samples) at every λ of a grid, under `vmap`. implicitdiff: a FISTA `while_loop` as
  the forward and `conditions.proximal_gradient` with `prox.l1`; jaxopt:
  `ProximalGradient(prox_lasso, implicit_diff=True)` (FISTA too). Same tolerance.
- "ridge": the same for ridge regression: `implicitdiff.argmin` with `optax.lbfgs()`
  against jaxopt's `LBFGS(implicit_diff=True)`. Same tolerance.

Errors are relative to the exact gradients: the support-restricted closed form
`dw_S/dλ = −(X_Sᵀ X_S)⁻¹ sign(w_S)` at a lasso solution converged to round-off, and
`dw/dλ = −(XᵀX + λI)⁻¹ w` for ridge, in NumPy float64. Ratios are against
implicitdiff, timed interleaved in the same process.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import implicitdiff as idf
from implicitdiff import conditions, prox

from . import _common as C
from ._peers import MISSING, jaxopt

SUITE = "optimisers"
OURS = "implicitdiff"
TOL = 1e-10
MAX_STEPS = 100_000


def problem(n_samples: int, n_features: int, seed: int = 0):
    """Training and validation sets from a sparse linear model."""
    rng = np.random.default_rng(seed)
    w = np.zeros(n_features)
    w[: max(3, n_features // 20)] = rng.normal(size=max(3, n_features // 20))

    def sample(n):
        X = rng.normal(size=(n, n_features))
        return jnp.asarray(X), jnp.asarray(X @ w + 0.1 * rng.normal(size=n))

    return (*sample(n_samples), *sample(n_samples))


def least_squares(lam, w, X, t):
    return 0.5 * jnp.sum((X @ w - t) ** 2)


def ridge(lam, w, X, t):
    return least_squares(lam, w, X, t) + 0.5 * lam * jnp.sum(w**2)


def fista(lam, X, t, tol=TOL):
    """Accelerated proximal gradient until ‖w − prox(w − ∇f/L)‖ ≤ tol·L⁻¹ (jaxopt's
    criterion, so that both forwards stop at the same accuracy)."""
    step = 1 / jnp.linalg.norm(X, 2) ** 2
    descend = lambda z: prox.l1(z - step * X.T @ (X @ z - t), step * lam)

    def unfinished(carry):
        w, _, _, error, k = carry
        return (error > tol) & (k < MAX_STEPS)

    def body(carry):
        w, z, s, _, k = carry
        w_next = descend(z)
        s_next = 0.5 * (1 + jnp.sqrt(1 + 4 * s**2))
        z = w_next + (s - 1) / s_next * (w_next - w)
        return w_next, z, s_next, jnp.linalg.norm(w_next - w) / step, k + 1

    w0 = jnp.zeros(X.shape[1], X.dtype)
    init = (w0, w0, jnp.ones((), X.dtype), jnp.asarray(jnp.inf, X.dtype), 0)
    return lax.while_loop(unfinished, body, init)[0]


def validation(w, X_valid, t_valid):
    return 0.5 * jnp.mean((X_valid @ w - t_valid) ** 2)


def path_gradient(solve):
    """λ grid ↦ d validation / dλ at each λ."""
    loss = lambda lam, X, t, Xv, tv: validation(solve(lam, X, t), Xv, tv)
    return jax.vmap(jax.grad(loss), in_axes=(0, None, None, None, None))


def lasso_methods() -> dict:
    lasso = idf.ImplicitFunction(
        fista,
        conditions.proximal_gradient(
            least_squares, lambda v, step, lam, *_: prox.l1(v, step * lam)
        ),
    )
    found = {OURS: path_gradient(lasso)}
    if jaxopt is not None:

        def jaxopt_lasso(lam, X, t):
            # The same fixed step 1/L as the FISTA forward (jaxopt's default line
            # search does not reach the tolerance).
            step = 1 / jnp.linalg.norm(X, 2) ** 2
            solver = jaxopt.ProximalGradient(
                fun=lambda w, X, t: least_squares(None, w, X, t),
                prox=jaxopt.prox.prox_lasso,
                stepsize=lambda _: step,
                tol=TOL,
                maxiter=MAX_STEPS,
                implicit_diff=True,
            )
            return solver.run(jnp.zeros(X.shape[1]), lam, X=X, t=t).params

        found["jaxopt ProximalGradient(implicit_diff=True)"] = path_gradient(
            jaxopt_lasso
        )
    return found


def ridge_methods() -> dict:
    argmin = idf.argmin(ridge, optax.lbfgs(), tol=TOL, max_steps=1000)
    found = {
        OURS + " argmin(optax.lbfgs())": path_gradient(
            lambda lam, X, t: argmin(lam, X, t, init=jnp.zeros(X.shape[1]))
        )
    }
    if jaxopt is not None:
        solver = jaxopt.LBFGS(
            fun=lambda w, lam, X, t: ridge(lam, w, X, t),
            tol=TOL,
            maxiter=1000,
            implicit_diff=True,
        )
        found["jaxopt LBFGS(implicit_diff=True)"] = path_gradient(
            lambda lam, X, t: solver.run(jnp.zeros(X.shape[1]), lam, X, t).params
        )
    return found


def exact_lasso_gradients(lams, X, t, Xv, tv):
    grads = []
    X, Xv, tv = map(np.asarray, (X, Xv, tv))
    for lam in np.asarray(lams):
        w = np.asarray(fista(lam, jnp.asarray(X), t, tol=1e-13))
        support = np.flatnonzero(w)
        dw = np.zeros_like(w)
        XS = X[:, support]
        dw[support] = -np.linalg.solve(XS.T @ XS, np.sign(w[support]))
        grads.append((Xv.T @ (Xv @ w - tv)) / len(tv) @ dw)
    return np.array(grads)


def exact_ridge_gradients(lams, X, t, Xv, tv):
    X, t, Xv, tv = map(np.asarray, (X, t, Xv, tv))
    grads = []
    for lam in np.asarray(lams):
        K = X.T @ X + lam * np.eye(X.shape[1])
        w = np.linalg.solve(K, X.T @ t)
        grads.append((Xv.T @ (Xv @ w - tv)) / len(tv) @ -np.linalg.solve(K, w))
    return np.array(grads)


def run(quick: bool) -> list[dict]:
    for name, why in MISSING.items():
        print(f"  [{SUITE}] skipping {name}: {why}")
    sizes = [(20, 40)] if quick else [(100, 200), (400, 1000)]
    n_lams = 4 if quick else 10
    repeats = 3 if quick else 7
    rows = []
    for n_samples, n_features in sizes:
        data = problem(n_samples, n_features)
        lam_max = float(jnp.max(jnp.abs(data[0].T @ data[1])))
        cases = [
            ("lasso path", lasso_methods, exact_lasso_gradients, lam_max, OURS),
            ("ridge", ridge_methods, exact_ridge_gradients, float(n_samples), None),
        ]
        for name, methods, exact_fn, top, reference in cases:
            lams = jnp.geomspace(top / 20, top / 2, n_lams)
            case = f"{name} n={n_samples} p={n_features} {n_lams} λ"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                fns = methods()
                timings = C.measure_all(fns, lams, *data, repeats=repeats)
            exact = exact_fn(lams, *data)
            rows += C.timed_rows(
                SUITE,
                case,
                timings,
                exact,
                reference or next(iter(fns)),
                problem=name,
                n=n_features,
            )
    return rows


def goals(rows: list[dict]) -> list[dict]:
    results = []
    for r in rows:
        if not r["method"].startswith(OURS) or r.get("time_s") is None:
            continue
        peers = [
            p
            for p in rows
            if p["case"] == r["case"]
            and p["method"].startswith("jaxopt")
            and p.get("time_s")
        ]
        if not peers:
            continue
        peer = peers[0]
        speed = peer["time_s"] / r["time_s"]
        met = r["error"] <= max(peer["error"], 1e-8) and speed >= 1 / 1.5
        results.append(
            C.goal(
                "implicitdiff's gradient as accurate as jaxopt's, within 1.5x its time",
                met,
                f"{r['case']}: {speed:.2f}x jaxopt's speed, error {r['error']:.1e} "
                f"vs {peer['error']:.1e}",
            )
        )
    return results
