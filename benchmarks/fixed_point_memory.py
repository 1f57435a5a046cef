"""Memory and time of the gradient of a deep equilibrium layer.

The layer is z = tanh(W z + U x + b) per example (width 256, batch 256 in float32,
‖W‖₂ = 0.9 so the iteration contracts); the forward is K fixed-point iterations,
K = 10 … 1000, and the loss is ½‖z‖². The gradient with respect to (W, U, b):

- implicitdiff: the implicit function theorem, one linear system for the whole batch
  with the default solver (`Auto`: GMRES above 1024 unknowns, so GMRES here, Direct
  in the `--quick` sizes), and per example under `vmap` with `Direct`;
- backprop through the unrolled loop (stores every iterate);
- optimistix `fixed_point` with `ImplicitAdjoint(lineax.GMRES)` on the same forward;
- jaxopt's `custom_fixed_point` with its `solve_gmres` (default tolerance, 1e-5, as
  implicitdiff's in float32) on the same forward.

Peak memory is XLA's buffer assignment of the compiled gradient (arguments, outputs
and temporaries). The error is against the exact gradient at the true fixed point
(NumPy float64), so it also shows how far K iterations are from converged.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import implicitdiff as idf

from . import _common as C
from ._peers import MISSING, jaxopt, lx, optx

SUITE = "fixed_point_memory"
IMPLICIT = "implicitdiff Auto, whole batch"
UNROLLED = "backprop through the unrolled loop"
JAXOPT = "jaxopt custom_fixed_point solve_gmres"
DTYPE = np.float32


def problem(width: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((width, width))
    w *= 0.9 / np.linalg.norm(w, 2)
    u = rng.standard_normal((width, width)) / np.sqrt(width)
    b = 0.1 * rng.standard_normal(width)
    x = rng.standard_normal((batch, width))
    return tuple(jnp.asarray(a, DTYPE) for a in (x, w, u, b))


def layer(z, x, w, u, b):
    return jnp.tanh(z @ w.T + x @ u.T + b)


def make_forward(steps: int):
    def forward(x, w, u, b):
        step = lambda _, z: layer(z, x, w, u, b)  # noqa: E731
        return lax.fori_loop(0, steps, step, jnp.zeros_like(x))

    return forward


def conditions(x, z, w, u, b):
    return z - layer(z, x, w, u, b)


def loss(z):
    return 0.5 * jnp.sum(z**2)


def gradients(solve):
    """(x, w, u, b) ↦ gradient of the loss with respect to (w, u, b)."""
    return lambda x, w, u, b: jax.grad(lambda params: loss(solve(x, *params)))(
        (w, u, b)
    )


def methods(steps: int) -> dict:
    forward = make_forward(steps)
    implicit = idf.ImplicitFunction(forward, conditions)
    per_example = idf.ImplicitFunction(
        lambda x, w, u, b: forward(x[None], w, u, b)[0],
        lambda x, z, w, u, b: conditions(x[None], z[None], w, u, b)[0],
        linear_solver=idf.Direct(),
    )
    found = {
        IMPLICIT: gradients(implicit),
        "implicitdiff vmap per example, Direct": gradients(
            jax.vmap(per_example, in_axes=(0, None, None, None))
        ),
        UNROLLED: gradients(forward),
    }
    if optx is not None:
        found["optimistix fixed_point ImplicitAdjoint(GMRES)"] = gradients(
            lambda x, w, u, b: optimistix_fixed_point(forward, x, w, u, b)
        )
    if jaxopt is not None:
        found[JAXOPT] = gradients(
            lambda x, w, u, b: jaxopt_fixed_point(forward, x, w, u, b)
        )
    return found


def jaxopt_fixed_point(forward, x, w, u, b):
    @jaxopt.implicit_diff.custom_fixed_point(
        lambda z, x, w, u, b: layer(z, x, w, u, b),
        solve=jaxopt.linear_solve.solve_gmres,
    )
    def solver(init, x, w, u, b):
        return forward(x, w, u, b)

    return solver(jnp.zeros_like(x), x, w, u, b)


def optimistix_fixed_point(forward, x, w, u, b):
    from ._peers import OneShot

    gmres = lx.GMRES(rtol=1e-6, atol=1e-6)
    return optx.fixed_point(
        lambda z, a: layer(z, *a),
        OneShot(lambda a: forward(*a)),
        jnp.zeros_like(x),
        (x, w, u, b),
        adjoint=optx.ImplicitAdjoint(linear_solver=gmres),
        max_steps=2,
    ).value


def exact_gradient(x, w, u, b):
    """The gradient at the true fixed point, by dense solves in float64."""
    x, w, u, b = (np.asarray(a, np.float64) for a in (x, w, u, b))
    z = np.zeros_like(x)
    for _ in range(1000):  # a contraction (≤ 0.9): converges to round-off
        z, previous = np.tanh(z @ w.T + x @ u.T + b), z
        if np.max(np.abs(z - previous)) <= 1e-15:
            break
    s = 1 - z**2
    # Per example: (I − diag(s) W)ᵀ u = ∂loss/∂z = z; the gradient wrt the
    # pre-activation is s ⊙ u.
    a_t = np.eye(len(w))[None] - (s[:, :, None] * w[None]).transpose(0, 2, 1)
    g_pre = s * np.linalg.solve(a_t, z[:, :, None])[:, :, 0]
    return g_pre.T @ z, g_pre.T @ x, g_pre.sum(0)


def run(quick: bool) -> list[dict]:
    width, batch = (16, 8) if quick else (256, 256)
    all_steps = (10, 100) if quick else (10, 30, 100, 300, 1000)
    repeats = 2 if quick else 3
    for name, why in MISSING.items():
        print(f"  [{SUITE}] skipping {name}: {why}")
    args = problem(width, batch)
    exact = exact_gradient(*args)
    rows = []
    for steps in all_steps:
        case = f"K={steps} (width {width}, batch {batch})"
        timings = C.measure_all(methods(steps), *args, repeats=repeats)
        rows += C.timed_rows(
            SUITE,
            case,
            timings,
            exact,
            UNROLLED,
            steps=steps,
            note="ratio: time vs unrolled backprop",
        )
    return rows


def goals(rows: list[dict]) -> list[dict]:
    results = []
    for method in dict.fromkeys(r["method"] for r in rows):
        if not method.startswith("implicitdiff"):
            continue
        mems = {r["steps"]: r["peak_mem_mb"] for r in rows if r["method"] == method}
        growth = max(mems.values()) / min(mems.values())
        unrolled = {
            r["steps"]: r["peak_mem_mb"] for r in rows if r["method"] == UNROLLED
        }
        detail = (
            f"{method}: peak {C.fmt_mem(min(mems.values()))} to "
            f"{C.fmt_mem(max(mems.values()))} over K = {min(mems)}…{max(mems)} "
            f"(x{growth:.2f}); unrolled: {C.fmt_mem(unrolled[min(unrolled)])} to "
            f"{C.fmt_mem(unrolled[max(unrolled)])}"
        )
        results.append(
            C.goal(
                "implicit backward memory flat in K (within 5%)", growth <= 1.05, detail
            )
        )
    return results + _time_goals(rows)


def _time_goals(rows: list[dict]) -> list[dict]:
    """The whole-batch gradient within 1.2× of jaxopt's on the same forward."""
    times = {(r["method"], r["steps"]): r["time_s"] for r in rows}
    results = []
    for (method, steps), peer in times.items():
        if method != JAXOPT:
            continue
        ratio = times[IMPLICIT, steps] / peer
        detail = f"K = {steps}: {ratio:.2f}x jaxopt's time"
        results.append(C.goal("within 1.2x jaxopt's time", ratio <= 1.2, detail))
    return results


def plot(rows: list[dict], path) -> None:
    C.plot_lines(
        rows,
        path,
        x="steps",
        panels=[
            ("peak_mem_mb", "peak memory of the gradient [MiB]", lambda r: True),
            ("time_s", "time per gradient [s]", lambda r: True),
            ("error", "relative error vs exact gradient", lambda r: True),
        ],
        xlabel="forward iterations K",
        title="Deep equilibrium layer: gradient memory and time",
    )
