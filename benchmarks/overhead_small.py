"""Overhead on small problems: the jitted gradient of a scalar and of a 10-dimensional
problem, against the same forward followed by its hand-written analytic derivative.

Problems (float64):

- `sqrt scalar`: y = √x by 30 Newton steps, condition y² − x = 0; dy/dx = 1/(2y).
- `sqrt 10-dim`: the same elementwise on 10 numbers; gradient of Σ y.
- `ridge 10-dim`: w(λ) = argmin ½‖X w − t‖²/m + ½λ‖w‖² (10 features, m = 20, solved
  by a dense solve of the normal equations), condition ∇f = 0; gradient of the
  validation loss ½‖X_v w − t_v‖² with respect to λ, by hand −gᵀ H⁻¹ w with
  H = XᵀX/m + λI (one more dense solve).

Every method runs the same forward. implicitdiff runs with its defaults (linear
solver `Auto` → `Direct`, `on_failure="warn"`); jaxopt's `custom_root` with its
default `solve_normal_cg`; optimistix `root_find` with its default `ImplicitAdjoint()`.
Diagnostic rows: the forward alone, implicitdiff with `on_failure="nan"` (no
callback behind the failure checks) and with `check_conditions=None` (no check of the
forward's output), to show what each default costs. Ratios are against the
hand-written derivative, times interleaved in the same run. Each sample is a
pipelined loop of calls (throughput per call, dispatch included), as a training loop
of small jitted calls runs; waiting for each call would add a thread wake-up of tens
of µs to every LAPACK call and bury the differences in noise.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import implicitdiff as idf

from . import _common as C
from ._peers import MISSING, jaxopt, optx, optx_root

SUITE = "overhead_small"
HAND = "hand-written derivative"
DEFAULT = "implicitdiff (defaults)"
NEWTON_STEPS = 30
CG_STEPS = 30


def sqrt_forward(x):
    step = lambda _, y: 0.5 * (y + x / y)  # noqa: E731
    return lax.fori_loop(0, NEWTON_STEPS, step, jnp.ones_like(x))


def sqrt_conditions(x, y):
    return y**2 - x


def sqrt_hand(x):
    return 1 / (2 * sqrt_forward(x))


def ridge_matrix(lam, x):
    m, d = x.shape
    return x.T @ x / m + lam * jnp.eye(d)


def ridge_forward(lam, data):
    """The normal equations by a dense solve."""
    x, t, _, _ = data
    return jnp.linalg.solve(ridge_matrix(lam, x), x.T @ t / x.shape[0])


def ridge_forward_cg(lam, data):
    """The normal equations by conjugate gradients, a fixed number of steps (more than
    the 10 unknowns need): a forward with no LAPACK call, for `batched` (under `vmap`,
    jaxlib 0.10.2's batched LAPACK kernels can deadlock when two run at once)."""
    x, t, _, _ = data
    h = ridge_matrix(lam, x)
    tiny = jnp.finfo(h.dtype).tiny

    def step(_, state):
        w, r, p, rr = state
        hp = h @ p
        alpha = rr / jnp.maximum(p @ hp, tiny)
        w, r = w + alpha * p, r - alpha * hp
        rr_new = r @ r
        return w, r, r + (rr_new / jnp.maximum(rr, tiny)) * p, rr_new

    b = x.T @ t / x.shape[0]
    return lax.fori_loop(0, CG_STEPS, step, (jnp.zeros_like(b), b, b, b @ b))[0]


def ridge_conditions(lam, w, data):
    x, t, _, _ = data
    return x.T @ (x @ w - t) / x.shape[0] + lam * w


def ridge_validation(w, data):
    _, _, xv, tv = data
    return 0.5 * jnp.sum((xv @ w - tv) ** 2)


def ridge_hand(lam, data, forward=ridge_forward):
    """The forward, then −gᵀ H⁻¹ w by one more dense solve."""
    x, _, xv, tv = data
    w = forward(lam, data)
    dw = -jnp.linalg.solve(ridge_matrix(lam, x), w)
    return (xv.T @ (xv @ w - tv)) @ dw


def ridge_data(seed: int = 0, features: int = 10, samples: int = 20):
    rng = np.random.default_rng(seed)
    x, xv = rng.standard_normal((2, samples, features))
    w_true = rng.standard_normal(features)
    t = x @ w_true + 0.1 * rng.standard_normal(samples)
    tv = xv @ w_true + 0.1 * rng.standard_normal(samples)
    return tuple(jnp.asarray(a) for a in (x, t, xv, tv))


def ridge_exact(lam, data):
    """The hand-written formula in NumPy float64."""
    x, t, xv, tv = (np.asarray(a, np.float64) for a in data)
    m, d = x.shape
    h = x.T @ x / m + float(lam) * np.eye(d)
    w = np.linalg.solve(h, x.T @ t / m)
    return float((xv.T @ (xv @ w - tv)) @ -np.linalg.solve(h, w))


class Problem:
    """A forward, its conditions, an outer loss of y and the hand-written gradient."""

    def __init__(self, name, forward, conditions, outer, hand, inputs, exact):
        self.name = name
        self.forward = forward
        self.conditions = conditions
        self.outer = outer
        self.hand = hand
        self.inputs = inputs  # (θ, *args): the gradient is with respect to θ
        self.exact = exact

    def grad_of(self, solve):
        return jax.grad(lambda theta, *args: self.outer(solve(theta, *args), *args))

    def methods(self) -> dict:
        found = {
            HAND: self.hand,
            DEFAULT: self.grad_of(idf.ImplicitFunction(self.forward, self.conditions)),
            "implicitdiff on_failure='nan' (diagnostic)": self.grad_of(
                idf.ImplicitFunction(self.forward, self.conditions, on_failure="nan")
            ),
            "implicitdiff check_conditions=None (diagnostic)": self.grad_of(
                idf.ImplicitFunction(
                    self.forward, self.conditions, check_conditions=None
                )
            ),
        }
        if jaxopt is not None:
            optimality = lambda y, theta, *args: self.conditions(theta, y, *args)  # noqa: E731
            root = jaxopt.implicit_diff.custom_root(optimality)(
                lambda init, theta, *args: self.forward(theta, *args)
            )
            found["jaxopt custom_root (default solve_normal_cg)"] = self.grad_of(
                lambda theta, *args: root(self.y_like(theta, *args), theta, *args)
            )
        if optx is not None:
            found["optimistix root_find ImplicitAdjoint() (default)"] = self.grad_of(
                lambda theta, *args: optx_root(
                    lambda y, a: self.conditions(a[0], y, *a[1:]),
                    lambda a: self.forward(*a),
                    self.y_like(theta, *args),
                    (theta, *args),
                )
            )
        found["forward only (diagnostic)"] = self.forward
        return found

    def y_like(self, theta, *args):
        struct = jax.eval_shape(self.forward, theta, *args)
        return jnp.zeros(struct.shape, struct.dtype)


def problems() -> list[Problem]:
    x10 = jnp.linspace(0.5, 5.0, 10)
    data = ridge_data()
    lam = jnp.asarray(0.3)
    return [
        Problem(
            "sqrt scalar",
            sqrt_forward,
            sqrt_conditions,
            lambda y: y,
            sqrt_hand,
            (jnp.asarray(2.0),),
            1 / (2 * np.sqrt(2.0)),
        ),
        Problem(
            "sqrt 10-dim",
            sqrt_forward,
            sqrt_conditions,
            jnp.sum,
            sqrt_hand,
            (x10,),
            1 / (2 * np.sqrt(np.asarray(x10))),
        ),
        Problem(
            "ridge 10-dim",
            ridge_forward,
            ridge_conditions,
            ridge_validation,
            ridge_hand,
            (lam, data),
            ridge_exact(lam, data),
        ),
    ]


def run(quick: bool) -> list[dict]:
    repeats = 3 if quick else 15
    for name, why in MISSING.items():
        print(f"  [{SUITE}] skipping {name}: {why}")
    rows = []
    for problem in problems():
        exact = problem.exact
        timings = C.measure_all(
            problem.methods(), *problem.inputs, repeats=repeats, pipelined=True
        )
        hand = timings[HAND]
        for name, timing in timings.items():
            forward_only = name.startswith("forward only")
            compile_ratio = C.ratio(timing.compile_s, hand.compile_s)
            rows.append(
                C.timed_row(
                    SUITE,
                    problem.name,
                    name,
                    timing,
                    None if forward_only else lambda out: C.rel_error(out, exact),
                    ratio=C.ratio(timing.time_s, hand.time_s),
                    compile_ratio=compile_ratio,
                    note=f"compile {compile_ratio or 0:.1f}x hand's",
                )
            )
    return rows


def goals(rows: list[dict]) -> list[dict]:
    return [
        C.goal(
            "implicitdiff (defaults) within 1.5x of the hand-written derivative",
            r.get("ratio") is not None and r["ratio"] <= 1.5,
            f"{r['case']}: {C.fmt_ratio(r.get('ratio'))} "
            f"({C.fmt_time(r.get('time_s'))}), compile "
            f"{C.fmt_ratio(r.get('compile_ratio'))} the hand-written one's",
        )
        for r in rows
        if r["method"] == DEFAULT
    ]


def plot(rows: list[dict], path) -> None:
    C.plot_bars(rows, path, title="Small problems: jitted gradient time per call")
