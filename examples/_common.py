"""What every example shares: the problem size switch, the checks, the figures.

Not part of the library: the examples import it as `from _common import ...`, which
works because Python puts a script's own folder on `sys.path`.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed, and identical output everywhere

# jaxlib 0.10.0-0.10.2 can deadlock in batched LU (a `vmap` of `Direct`, as in
# deep_equilibrium: its full run hung); XLA's older CPU scheduler avoids it
# (docs/scaling.md). JAX reads the flags when it first computes, after this import.
_NO_LU_DEADLOCK = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if _NO_LU_DEADLOCK not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_NO_LU_DEADLOCK}"

QUICK = os.environ.get("IMPLICITDIFF_QUICK") == "1"
# Quick runs write their figures apart (untracked): the published ones come from full
# runs, and a reduced run must never overwrite them.
FIGURES = Path(__file__).resolve().parent / "figures" / ("quick" if QUICK else "")


class Checks:
    """Prints one line per check and exits non-zero at the end if any failed."""

    def __init__(self):
        self.failed = []

    def error(self, name: str, error: float, tolerance: float) -> None:
        """A check that `error` (a max error) is at most `tolerance`."""
        ok = bool(error <= tolerance)  # False for NaN too
        print(
            f"[{'ok' if ok else 'FAIL'}] {name}: max error {error:.2e} "
            f"(tolerance {tolerance:.0e})"
        )
        if not ok:
            self.failed.append(name)

    def true(self, name: str, condition: bool, detail: str = "") -> None:
        """A check of a yes/no property."""
        ok = bool(condition)
        print(f"[{'ok' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""))
        if not ok:
            self.failed.append(name)

    def finish(self) -> None:
        if self.failed:
            print(f"{len(self.failed)} check(s) failed: {', '.join(self.failed)}")
            sys.exit(1)
        print("all checks passed")


def save_figure(fig, name: str, numbers: dict) -> Path:
    """Writes `fig` to examples/figures/<name>.png (examples/figures/quick/ in a quick
    run), and next to it <name>.json: the `numbers` that its page quotes, whether the
    run was quick, and the figure's SHA-256, so that tests/test_published_figures.py
    can tell a page, its figure and the run that made it apart."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    record = {
        "quick": QUICK,
        "png_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        **numbers,
    }
    path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"figure written to {path}, its numbers to {path.with_suffix('.json')}")
    return path
