"""`python -m benchmarks [suite ...] [--quick]`: runs the suites, prints a table per
suite and whether its goals were met, and writes `benchmarks/results/<suite>.json`
and `.png`."""

import argparse
import importlib
import importlib.util
import os
import sys
import time
import traceback

# Before NumPy/JAX load OpenBLAS (which jaxlib's LAPACK kernels use too): its worker
# threads busy-wait, and on a machine with more runnable threads than cores an LU of
# n = 250 then takes 100× longer, at random. One BLAS thread keeps the timings
# stable; XLA's own kernels still use every core. Set the variable to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# jaxlib 0.10.0-0.10.2 can deadlock in batched LU (a `vmap` of `Direct`, as in
# `fixed_point_memory`): the full run hung there. XLA's older CPU scheduler avoids it
# (see "Known problems" in benchmarks/README.md).
_NO_LU_DEADLOCK = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if _NO_LU_DEADLOCK not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_NO_LU_DEADLOCK}"

SUITES = (
    "dense_jacobian",
    "sparse_pde_vjp",
    "fixed_point_memory",
    "overhead_small",
    "batched",
    "optimisers",
    "first_call",
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "suites", nargs="*", metavar="suite", help=f"any of {', '.join(SUITES)}"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, few repeats (< 2 minutes)"
    )
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="run nothing: print the stored results/<suite>.json as Markdown "
        "(with --quick: results/quick/)",
    )
    options = parser.parse_args(argv)
    unknown = [s for s in options.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    suites = options.suites or list(SUITES)

    from . import _common

    if options.markdown:
        print(_common.markdown_report(suites, options.quick))
        return 0

    info = _common.machine()
    print(
        f"implicitdiff benchmarks ({'quick' if options.quick else 'full'}): "
        f"jax {info['jax']} on {info['backend']} ({info.get('cpu')}, "
        f"{info['nproc']} cores, OPENBLAS_NUM_THREADS="
        f"{os.environ['OPENBLAS_NUM_THREADS']}, load average {info['loadavg'][0]:.1f})",
        flush=True,
    )
    failed = []
    start_all = time.perf_counter()
    for i, suite in enumerate(suites, 1):
        print(f"\n=== [{i}/{len(suites)}] {suite} ===", flush=True)
        if importlib.util.find_spec(f"benchmarks.{suite}") is None:
            print(f"  skipped: benchmarks/{suite}.py does not exist yet", flush=True)
            continue
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{suite}")
            rows = module.run(options.quick)
            goals = module.goals(rows) if hasattr(module, "goals") else []
        except Exception:
            traceback.print_exc()
            failed.append(suite)
            continue
        print(f"\n{suite}: {len(rows)} rows in {time.perf_counter() - start:.1f} s")
        print(_common.table(rows))
        for g in goals:
            verdict = {True: "MET", False: "MISSED", None: "N/A"}[g["met"]]
            print(f"  goal {verdict}: {g['goal']}  {g['detail']}")
        path = _common.write_json(suite, rows, goals, options.quick)
        png = path.with_suffix(".png")
        try:
            if hasattr(module, "plot"):
                module.plot(rows, png)
            else:
                _common.plot_bars(rows, png)
        except Exception:
            traceback.print_exc()
            failed.append(f"{suite} (plot)")
        print(f"  wrote {path.name} and {png.name} in {path.parent}", flush=True)
    print(f"\nall done in {time.perf_counter() - start_all:.1f} s", flush=True)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
