"""What every example shares: the problem size switch, the checks, the figures.

Not part of the library: the examples import it as `from _common import ...`, which
works because Python puts a script's own folder on `sys.path`.
"""

import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed, and identical output everywhere

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


def save_figure(fig, name: str) -> Path:
    """Writes `fig` to examples/figures/<name>.png (examples/figures/quick/ in a quick
    run) and says where."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"figure written to {path}")
    return path
