"""The first impression: the first eager call, a later eager call, and the jitted
gradient's compile time and per-call time, each library in a fresh process.

Problems (float64), the same forward for every library:

- `README √ (n = 3)`: the README's example, 30 unrolled Newton steps for √x,
    conditions y² − x; `jax.jacobian` (the README's call).
- `sqrt 10-dim`, `ridge 10-dim`: the problems of `overhead_small` (Newton in a
    `fori_loop`; ridge regression by a dense solve), gradient of an outer loss
    (`jax.grad`).

Methods: implicitdiff with its defaults; jaxopt `custom_root` with `solve_lu`;
optimistix `root_find` with `ImplicitAdjoint(lx.LU())` (through `_peers.OneShot`, the
same forward); plain JAX (for √ n = 3, differentiating through the unrolled loop; for
the others, the hand-written derivative).

Each measurement is one fresh `python -m benchmarks.first_call --worker` process that
imports JAX and the library, builds the function, and times: the first eager call
(`first_eager_s`, what a user pasting the example waits for after the imports), the
median of 5 later eager calls (`time_s` in the eager rows), `jax.jit(...).lower().
compile()` (`compile_s`), and the jitted per-call time (a pipelined loop, as in
`overhead_small`; the goal's figure) and, in the note, the jitted per-call time when
every call is waited for (`jit_blocked_s`: a notebook, or a loop that reads each
result). Processes of the different methods alternate, round after round
(3 rounds; `--quick`: one round of the README case, implicitdiff and jaxopt only);
medians over rounds. Ratios are to jaxopt's figure of the
same run, and for the jitted per-call time also to plain JAX's (the hand-written
derivative).
"""

import json
import statistics
import sys
import time

SUITE = "first_call"
METHODS = ("implicitdiff", "jaxopt", "optimistix", "plain JAX")
CASES = ("README √ (n = 3)", "sqrt 10-dim", "ridge 10-dim")
EAGER_REPEATS = 5


def _build(method: str, case: str):
    """`(fn, inputs)`: the function whose derivative is taken, in the worker."""
    import jax
    import jax.numpy as jnp

    from . import overhead_small as small

    if case == CASES[0]:

        def forward(x):
            y = jnp.ones_like(x)
            for _ in range(30):
                y = y - (y**2 - x) / (2 * y)
            return y

        problem = small.Problem(
            case, forward, small.sqrt_conditions, None, None, (), None
        )
        inputs = (jnp.array([1.0, 4.0, 9.0]),)
        derivative = jax.jacobian
        reference = forward
    else:
        problem = {p.name: p for p in small.problems()}[case]
        inputs = problem.inputs
        derivative = problem.grad_of
        reference = None
    if method == "plain JAX":
        return (derivative(reference) if reference else problem.hand), inputs
    solve = _implicit(method, problem)
    return derivative(solve), inputs


def _implicit(method: str, problem):
    """`(θ, *args) ↦ y` through `method`'s implicit differentiation."""
    if method == "implicitdiff":
        import implicitdiff as idf

        return idf.ImplicitFunction(problem.forward, problem.conditions)
    if method == "jaxopt":
        from ._peers import jaxopt

        root = jaxopt.implicit_diff.custom_root(
            lambda y, theta, *args: problem.conditions(theta, y, *args),
            solve=jaxopt.linear_solve.solve_lu,
        )(lambda init, theta, *args: problem.forward(theta, *args))
        return lambda theta, *args: root(None, theta, *args)
    from ._peers import lx, optx_root

    return lambda theta, *args: optx_root(
        lambda y, a: problem.conditions(a[0], y, *a[1:]),
        lambda a: problem.forward(*a),
        problem.y_like(theta, *args),
        (theta, *args),
        linear_solver=lx.LU(),
    )


def _worker(method: str, case: str) -> dict:
    start = time.perf_counter()
    import jax

    jax.config.update("jax_enable_x64", True)
    from . import _common as C

    fn, inputs = _build(method, case)
    built = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    first = time.perf_counter()
    later = []
    for _ in range(EAGER_REPEATS):
        t = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        later.append(time.perf_counter() - t)
    jitted = C.measure_all({method: fn}, *inputs, repeats=5, pipelined=True)[method]
    blocked = C.measure_all({method: fn}, *inputs, repeats=5)[method]
    return {
        "setup_s": built - start,
        "first_eager_s": first - built,
        "eager_s": statistics.median(later),
        "compile_s": jitted.compile_s,
        "jit_call_s": jitted.time_s,
        "jit_blocked_s": blocked.time_s,
    }


def run(quick: bool) -> list[dict]:
    from . import _common as C
    from ._peers import MISSING

    peers = {"jaxopt": "jaxopt", "optimistix": "optimistix"}
    methods = [m for m in METHODS if peers.get(m) not in MISSING]
    for name, why in MISSING.items():
        print(f"  [{SUITE}] skipping {name}: {why}")
    rounds = 1 if quick else 3
    cases = CASES[:1] if quick else CASES
    if quick:  # checks that each side runs: the peers' adapters are in overhead_small
        methods = [m for m in methods if m in ("implicitdiff", "jaxopt")]
    samples = {(c, m): [] for c in cases for m in methods}
    for _ in range(rounds):
        for case in cases:
            for method in methods:
                rows, problem = C.run_subprocess(
                    "benchmarks.first_call",
                    {},
                    "--worker",
                    method,
                    case,
                    timeout_s=300,
                )
                if problem is None and rows:
                    samples[case, method].append(rows[0])
                else:
                    print(f"  [{SUITE}] {method} on {case}: {problem}")
    return _rows(samples, cases, methods)


def _rows(samples, cases, methods) -> list[dict]:
    from . import _common as C

    def median(case, method, key):
        values = [s[key] for s in samples.get((case, method), [])]
        return statistics.median(values) if values else None

    rows = []
    for case in cases:
        for method in methods:
            figures = {
                key: median(case, method, key)
                for key in (
                    "first_eager_s",
                    "eager_s",
                    "compile_s",
                    "jit_call_s",
                    "jit_blocked_s",
                )
            }
            jaxopt_figures = {k: median(case, "jaxopt", k) for k in figures}
            plain_call = median(case, "plain JAX", "jit_call_s")
            for mode, key in (("eager", "eager_s"), ("jit", "jit_call_s")):
                rows.append(
                    C.row(
                        SUITE,
                        case,
                        f"{method} ({mode})",
                        time_s=figures[key],
                        compile_s=figures["compile_s"] if mode == "jit" else None,
                        first_eager_s=figures["first_eager_s"],
                        ratio=C.ratio(figures[key], jaxopt_figures[key]),
                        ratio_first=C.ratio(
                            figures["first_eager_s"], jaxopt_figures["first_eager_s"]
                        ),
                        ratio_compile=C.ratio(
                            figures["compile_s"], jaxopt_figures["compile_s"]
                        ),
                        ratio_plain=C.ratio(figures["jit_call_s"], plain_call),
                        note=_note(mode, figures, jaxopt_figures, plain_call),
                        rounds=len(samples[case, method]),
                    )
                )
    return rows


def _note(mode, figures, jaxopt_figures, plain_call) -> str:
    from . import _common as C

    if mode == "eager":
        first = C.ratio(figures["first_eager_s"], jaxopt_figures["first_eager_s"])
        return (
            f"first eager call {C.fmt_time(figures['first_eager_s'])} "
            f"({C.fmt_ratio(first)} jaxopt's)"
        )
    plain = C.ratio(figures["jit_call_s"], plain_call)
    blocked = C.ratio(figures["jit_blocked_s"], jaxopt_figures["jit_blocked_s"])
    return (
        f"ratio: vs jaxopt; jitted call {C.fmt_ratio(plain)} plain JAX's; waiting "
        f"for each call {C.fmt_time(figures['jit_blocked_s'])} "
        f"({C.fmt_ratio(blocked)} jaxopt's)"
    )


def goals(rows: list[dict]) -> list[dict]:
    from . import _common as C

    ours = [r for r in rows if r["method"].startswith("implicitdiff")]
    jaxopt_plain = {
        r["case"]: r.get("ratio_plain") for r in rows if r["method"] == "jaxopt (jit)"
    }
    found = []
    for r in ours:
        case = r["case"]
        if r["method"].endswith("(eager)"):
            found.append(_ratio_goal("first eager call", case, r.get("ratio_first")))
            found.append(_ratio_goal("later eager call", case, r.get("ratio")))
            continue
        found.append(_ratio_goal("compile time", case, r.get("ratio_compile")))
        plain, peer = r.get("ratio_plain"), jaxopt_plain.get(case)
        met = plain is not None and plain <= 1.5 and (peer is None or plain <= peer)
        found.append(
            C.goal(
                "jitted call ≤ 1.5x plain JAX and ≤ jaxopt's ratio",
                met if plain is not None else None,
                f"{case}: {C.fmt_ratio(plain)} (jaxopt {C.fmt_ratio(peer)})",
            )
        )
    return found


def _ratio_goal(what: str, case: str, ratio) -> dict:
    from . import _common as C

    return C.goal(
        f"{what} ≤ 1.0x jaxopt's",
        None if ratio is None else ratio <= 1.0,
        f"{case}: {C.fmt_ratio(ratio)}",
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print("ROWS " + json.dumps([_worker(sys.argv[2], sys.argv[3])]), flush=True)
