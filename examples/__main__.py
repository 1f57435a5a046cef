"""Runs every example, each in its own process, and summarises.

    python -m examples                 # default sizes (each under a minute on 2 cores)
    python -m examples --quick         # reduced sizes (IMPLICITDIFF_QUICK=1): seconds
    python -m examples deep_equilibrium custom_solver    # only these
    python -m examples --update-docs-figures             # then copy PNGs into docs/

Exits non-zero if any example fails.
"""

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [
    "quickstart",
    "differentiate_optimizer",
    "deep_equilibrium",
    "bilevel_hyperparameters",
    "custom_solver",
    "pde_inverse_problem",
    "constrained_bilevel",
]


def _children_cpu_seconds() -> float:
    """User + system CPU time of the finished subprocesses: unlike wall time, it does
    not count waiting for the cores on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m examples", description=__doc__)
    parser.add_argument("names", nargs="*", help="examples to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="reduced problem sizes")
    parser.add_argument(
        "--update-docs-figures",
        action="store_true",
        help="copy examples/figures/*.png into docs/figures/ after a clean run",
    )
    args = parser.parse_args()
    if args.update_docs_figures and args.quick:
        parser.error("--update-docs-figures publishes full runs only, not --quick")
    unknown = sorted(set(args.names) - set(ORDER))
    if unknown:
        parser.error(f"unknown example(s) {unknown}; choose from {ORDER}")
    env = dict(os.environ)
    if args.quick:
        env["IMPLICITDIFF_QUICK"] = "1"

    results = []
    for name in args.names or ORDER:
        print(f"=== {name} " + "=" * (70 - len(name)), flush=True)
        start, cpu_start = time.perf_counter(), _children_cpu_seconds()
        code = subprocess.call([sys.executable, str(HERE / f"{name}.py")], env=env)
        wall, cpu = time.perf_counter() - start, _children_cpu_seconds() - cpu_start
        results.append((name, code, wall, cpu))

    size = "quick" if env.get("IMPLICITDIFF_QUICK") == "1" else "default"
    print(f"=== summary ({size} sizes) " + "=" * 49)
    print(f"{'example':<28} {'status':<18} {'wall':>8} {'CPU':>8}")
    for name, code, wall, cpu in results:
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"{name:<28} {status:<18} {wall:7.1f}s {cpu:7.1f}s")
    failed = [name for name, code, *_ in results if code != 0]
    if args.update_docs_figures and not failed:
        target = HERE.parent / "docs" / "figures"
        target.mkdir(exist_ok=True)
        for png in sorted((HERE / "figures").glob("*.png")):
            shutil.copy2(png, target / png.name)
            print(f"copied {png.name} to {target}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
