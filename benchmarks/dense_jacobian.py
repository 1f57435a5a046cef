"""Full dense Jacobian dy/dx of c(x, y) = Q y + tanh(y) − x = 0, Q SPD.

Every method runs the same forward: a fixed-point iteration y ← Q⁻¹(x − tanh y) with
a Cholesky factor of Q passed in (a contraction, as the eigenvalues of Q are ≥ 2), so
the timings compare only the derivative machinery. The exact Jacobian is
inv(Q + diag(1 − tanh(y)²)); computing it in JAX after the same forward is the
*limit* a generic method can at best approach (it needs no materialisation of ∂c/∂y).
Errors are against that formula evaluated in NumPy float64.

Rows per n and mode (`jax.jacrev`, `jax.jacfwd`): implicitdiff `Direct` (also with
`representation="matrix"`) and `GMRES` (its defaults); jaxopt `custom_root` with
`solve_lu`, `solve_gmres` and its default `solve_normal_cg` (reverse mode only: it
is a `custom_vjp`); optimistix `root_find` with `ImplicitAdjoint(lineax.LU())`; the
limit. Ratios are against the limit, timed interleaved in the same process.
"""

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax import lax

import implicitdiff as idf

from . import _common as C
from ._peers import MISSING, jaxopt, lx, optx_root

SUITE = "dense_jacobian"
LIMIT = "limit: inv(Q + diag(sech² y))"
DIRECT = "implicitdiff Direct"
PEER_PREFIXES = ("jaxopt", "optimistix")
FORWARD_STEPS = 60  # contraction factor ≤ 1/2: 2⁻⁶⁰ is below float64 round-off


def problem(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, n))
    q = 2.0 * np.eye(n) + g @ g.T / n
    x = rng.standard_normal(n)
    return jnp.asarray(x), jnp.asarray(q), jnp.asarray(np.linalg.cholesky(q))


def forward(x, q, chol):
    step = lambda _, y: jsl.cho_solve((chol, True), x - jnp.tanh(y))  # noqa: E731
    return lax.fori_loop(0, FORWARD_STEPS, step, jnp.zeros_like(x))


def conditions(x, y, q, chol):
    return q @ y + jnp.tanh(y) - x


def limit(x, q, chol):
    y = forward(x, q, chol)
    return jnp.linalg.inv(q + jnp.diag(1 - jnp.tanh(y) ** 2))


def implicitdiff_fn(solver):
    return idf.ImplicitFunction(forward, conditions, linear_solver=solver)


def jaxopt_fn(solve):
    optimality = lambda y, x, q, chol: conditions(x, y, q, chol)  # noqa: E731
    solver = jaxopt.implicit_diff.custom_root(optimality, solve=solve)(
        lambda init, x, q, chol: forward(x, q, chol)
    )
    return lambda x, q, chol: solver(jnp.zeros_like(x), x, q, chol)


def optimistix_fn(x, q, chol):
    return optx_root(
        lambda y, a: conditions(a[0], y, a[1], a[2]),
        lambda a: forward(*a),
        jnp.zeros_like(x),
        (x, q, chol),
        linear_solver=lx.LU(),
    )


def methods() -> dict:
    """name → (x, Q, chol) ↦ y, differentiable in x; None when unavailable."""
    found = {
        DIRECT: implicitdiff_fn(idf.Direct()),
        "implicitdiff Direct representation='matrix'": idf.ImplicitFunction(
            forward, conditions, linear_solver=idf.Direct(), representation="matrix"
        ),
        "implicitdiff GMRES": implicitdiff_fn(idf.GMRES()),
    }
    if jaxopt is not None:
        linear_solve = jaxopt.linear_solve
        found["jaxopt custom_root solve_lu"] = jaxopt_fn(linear_solve.solve_lu)
        found["jaxopt custom_root solve_gmres"] = jaxopt_fn(linear_solve.solve_gmres)
        found["jaxopt custom_root solve_normal_cg (default)"] = jaxopt_fn(
            linear_solve.solve_normal_cg
        )
    if lx is not None:
        found["optimistix root_find ImplicitAdjoint(LU)"] = optimistix_fn
    return found


def run(quick: bool) -> list[dict]:
    sizes = (24,) if quick else (250, 500, 1000)
    for name, why in MISSING.items():
        print(f"  [{SUITE}] skipping {name}: {why}")
    rows = []
    for n in sizes:
        args = problem(n)
        y = np.asarray(jax.jit(forward)(*args))
        q = np.asarray(args[1])
        exact = np.linalg.inv(q + np.diag(1 - np.tanh(y) ** 2))
        for mode, jac in (("jacrev", jax.jacrev), ("jacfwd", jax.jacfwd)):
            case = f"n={n} {mode}"
            # A fresh function each time: a second `jax.jit(limit)` would hit JAX's
            # cache and report no compile time.
            fns = {LIMIT: lambda x, q, chol: limit(x, q, chol)}
            for name, fn in methods().items():
                if name.startswith("jaxopt") and mode == "jacfwd":
                    note = "unsupported: custom_vjp has no forward mode"
                    rows.append(C.row(SUITE, case, name, n=n, mode=mode, note=note))
                else:
                    fns[name] = jac(fn, argnums=0)
            repeats = 3 if quick else (7 if n < 1000 else 5)
            timings = C.measure_all(fns, *args, repeats=repeats)
            rows += C.timed_rows(SUITE, case, timings, exact, LIMIT, n=n, mode=mode)
    return rows


def _best_peer(rows, n, mode):
    peers = [
        r
        for r in rows
        if r["n"] == n
        and r["mode"] == mode
        and r["method"].startswith(PEER_PREFIXES)
        and r.get("time_s")
    ]
    return min(peers, key=lambda r: r["time_s"], default=None)


def goals(rows: list[dict]) -> list[dict]:
    results = []
    for r in rows:
        if r["method"] != DIRECT:
            continue
        peer = _best_peer(rows, r["n"], r["mode"])
        ratio_limit = r["ratio"]
        detail = f"{r['case']}: {ratio_limit:.2f}x the limit"
        met = ratio_limit <= 1.3
        if peer is not None:
            ratio_peer = r["time_s"] / peer["time_s"]
            accurate = r["error"] <= max(peer["error"], 1e-12)
            detail += (
                f", {ratio_peer:.2f}x the best peer ({peer['method']}), error "
                f"{r['error']:.1e} vs {peer['error']:.1e}"
            )
            met = met and ratio_peer <= 1.1 and accurate
        results.append(
            C.goal(
                "Direct within 1.1x of the best peer and 1.3x of the limit, "
                "equal or better accuracy",
                met,
                detail,
            )
        )
    return results


def plot(rows: list[dict], path) -> None:
    in_mode = lambda mode: lambda r: r["mode"] == mode  # noqa: E731
    C.plot_lines(
        rows,
        path,
        x="n",
        panels=[
            ("time_s", "jacrev: time per Jacobian [s]", in_mode("jacrev")),
            ("time_s", "jacfwd: time per Jacobian [s]", in_mode("jacfwd")),
            ("error", "relative error (Frobenius)", lambda r: r["mode"] == "jacrev"),
        ],
        xlabel="n",
        title="Dense Jacobian of Q y + tanh(y) = x",
    )
