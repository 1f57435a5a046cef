"""Many independent small problems at once: `vmap` over 1024 ridge regressions, and
the same batch sharded over 4 host devices.

Each problem is `overhead_small`'s ridge (10 features, 20 samples, its own data and
λ), its forward by conjugate gradients rather than a dense solve (see
`ridge_forward_cg`); the batched function returns the 1024 hypergradients
d(validation loss)/dλ. The
sharded configuration needs `XLA_FLAGS=--xla_force_host_platform_device_count=4`
before JAX starts, so each configuration runs in a subprocess (`python -m
benchmarks.batched --child vmap|sharded`); the sharded one also times the unsharded
functions on one of its 4 devices for the speed-up. Ratios are against the
hand-written derivative in the same process.
"""

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import implicitdiff as idf

from . import _common as C
from ._peers import MISSING, jaxopt, optx, optx_root
from .overhead_small import (
    HAND,
    ridge_conditions,
    ridge_data,
    ridge_exact,
    ridge_forward_cg,
    ridge_hand,
    ridge_validation,
)

SUITE = "batched"
IMPLICIT = "implicitdiff (defaults)"
DEVICES = 4
ATTEMPTS = 3
WATCHDOG_S = 180  # seconds without output before a child counts as hung
# jaxlib 0.10.0 to 0.10.2 deadlock when batched LU factorisations run at once (known
# problem 1 in benchmarks/README.md), as the 4 shards' LUs in `Direct.presolve` do.
# Without XLA:CPU's concurrency-optimised scheduler they rarely do; the flag exists in
# every jaxlib from 0.7.2 on. It makes most runs finish, not all: the watchdog stays.
NO_LU_DEADLOCK = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def batch_inputs(size: int):
    datas = [ridge_data(seed) for seed in range(size)]
    data = tuple(jnp.stack(parts) for parts in zip(*datas, strict=True))
    lam = jnp.asarray(np.linspace(0.05, 2.0, size))
    exact = np.array([ridge_exact(lam[i], datas[i]) for i in range(size)])
    return (lam, data), exact


def hypergradient(solve):
    return jax.grad(lambda lam, data: ridge_validation(solve(lam, data), data))


def methods() -> dict:
    """name → (λ, data) ↦ hypergradients, vmapped over the batch."""
    found = {
        HAND: functools.partial(ridge_hand, forward=ridge_forward_cg),
        IMPLICIT: hypergradient(
            idf.ImplicitFunction(ridge_forward_cg, ridge_conditions)
        ),
        "implicitdiff on_failure='nan' (diagnostic)": hypergradient(
            idf.ImplicitFunction(ridge_forward_cg, ridge_conditions, on_failure="nan")
        ),
    }
    if jaxopt is not None:
        optimality = lambda w, lam, data: ridge_conditions(lam, w, data)  # noqa: E731
        root = jaxopt.implicit_diff.custom_root(optimality)(
            lambda init, lam, data: ridge_forward_cg(lam, data)
        )
        found["jaxopt custom_root (default solve_normal_cg)"] = hypergradient(
            lambda lam, data: root(jnp.zeros(data[0].shape[1]), lam, data)
        )
    if optx is not None:
        found["optimistix root_find ImplicitAdjoint() (default)"] = hypergradient(
            lambda lam, data: optx_root(
                lambda w, a: ridge_conditions(a[0], w, a[1]),
                lambda a: ridge_forward_cg(*a),
                jnp.zeros(data[0].shape[1]),
                (lam, data),
            )
        )
    return {name: jax.vmap(fn) for name, fn in found.items()}


def measure_rows(case, inputs, exact, repeats, **fields) -> list[dict]:
    timings = C.measure_all(methods(), *inputs, repeats=repeats)
    return C.timed_rows(SUITE, case, timings, exact, HAND, **fields)


def sizes(quick: bool) -> tuple[int, int]:
    return (64, 3) if quick else (1024, 15)


def run(quick: bool) -> list[dict]:
    """Each configuration runs in a child process with a watchdog: should a jaxlib's
    batched LAPACK kernels deadlock despite `NO_LU_DEADLOCK`, a hung XLA execution
    cannot be interrupted in-process."""
    for name, why in MISSING.items():
        print(f"  [{SUITE}] skipping {name}: {why}")
    flags = os.environ.get("XLA_FLAGS", "")
    count = f"--xla_force_host_platform_device_count={DEVICES}"
    devices = f"{flags} {NO_LU_DEADLOCK} {count}"
    rows = []
    for config, env in (("vmap", {}), ("sharded", {"XLA_FLAGS": devices})):
        args = ["--child", config] + (["--quick"] if quick else [])
        for attempt in range(1, ATTEMPTS + 1):
            child_rows, problem = C.run_subprocess(
                "benchmarks.batched", env, *args, timeout_s=WATCHDOG_S
            )
            if problem is None:
                break
            print(f"  [{SUITE}] {config}: attempt {attempt} failed ({problem})")
        rows += child_rows
        if problem is not None:
            note = f"failed {ATTEMPTS} times, last: {problem}"
            rows.append(C.row(SUITE, config, "(all methods)", note=note))
    return rows


def child(config: str, quick: bool) -> list[dict]:
    """One configuration, in its own process: `vmap` on the default device, or
    `sharded` over 4 host devices and then (unless `quick`) the same functions on
    one of them, for the speed-up."""
    size, repeats = sizes(quick)
    inputs, exact = batch_inputs(size)
    if config == "vmap":
        return measure_rows(f"vmap {size}", inputs, exact, repeats, devices=1)
    if len(jax.devices()) != DEVICES:
        raise RuntimeError(f"expected {DEVICES} host devices, got {jax.devices()}")
    mesh = jax.make_mesh((DEVICES,), ("batch",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    sharded = jax.device_put(inputs, sharding)
    rows = measure_rows(
        f"vmap {size} sharded over {DEVICES} host devices",
        sharded,
        exact,
        repeats,
        devices=DEVICES,
    )
    if quick:
        return rows
    single = measure_rows(
        f"vmap {size} on 1 of {DEVICES} host devices", inputs, exact, repeats, devices=1
    )
    one_device = {r["method"]: r.get("time_s") for r in single}
    for r in rows:
        r["speedup"] = C.ratio(one_device[r["method"]], r.get("time_s"))
        if r["speedup"] is not None:
            r["note"] = f"speed-up {r['speedup']:.2f}x vs 1 device"
    return rows + single


def goals(rows: list[dict]) -> list[dict]:
    return [
        C.goal(
            "informational: implicitdiff vs hand-written, batched",
            None,
            f"{r['case']}: {C.fmt_ratio(r.get('ratio'))} the hand-written time"
            + (f", {r['note']}" if r.get("note") else ""),
        )
        for r in rows
        if r["method"] == IMPLICIT
    ]


def plot(rows: list[dict], path) -> None:
    C.plot_bars(rows, path, title="1024 ridge hypergradients: time per batch")


if __name__ == "__main__" and "--child" in sys.argv:
    config = sys.argv[sys.argv.index("--child") + 1]
    child_rows = child(config, "--quick" in sys.argv)
    print("ROWS " + json.dumps(child_rows, default=C._json_default), flush=True)
