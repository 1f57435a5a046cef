"""The published figures, the runs that made them, and the pages that show them agree.

Each example's full run writes its figure and, next to it, a JSON of the numbers its
page quotes with the figure's SHA-256 (`examples/_common.py`, `save_figure`). Here:
the figure in docs/figures/ is the one that run wrote (not a quick run's, not an older
one), and the numbers in the page's text and tables are the run's.
"""

import hashlib
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NAMES = sorted(p.stem for p in (ROOT / "docs" / "figures").glob("*.png"))


def record(name: str) -> dict:
    return json.loads((ROOT / "examples" / "figures" / f"{name}.json").read_text())


def page(name: str) -> str:
    return (ROOT / "docs" / "examples" / f"{name}.md").read_text()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def quoted(text: str, pattern: str) -> list[str]:
    """Every match of `pattern`'s one group in `text`; at least one."""
    found = re.findall(pattern, text)
    assert found, f"the page no longer says {pattern!r}"
    return found


@pytest.mark.parametrize("name", NAMES)
def test_published_figure_is_a_full_run_shown_on_its_page(name):
    run = record(name)
    assert run["quick"] is False, f"{name}: published from a quick run"
    assert sha256(ROOT / "docs" / "figures" / f"{name}.png") == run["png_sha256"]
    assert sha256(ROOT / "examples" / "figures" / f"{name}.png") == run["png_sha256"]
    assert f"](../figures/{name}.png)" in page(name)


def markdown_table(text: str) -> dict[str, list[float]]:
    """`| row | a | b |` lines of a page's table: row name -> numbers."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(cells[1]) <= set("-: "):
            rows[cells[0]] = [float(cell) for cell in cells[1:]]
    return rows


def test_deep_equilibrium_table_is_the_runs():
    run = record("deep_equilibrium")
    assert markdown_table(page("deep_equilibrium")) == run["table"]
    assert quoted(page("deep_equilibrium"), r"batch (\d+)") == [str(run["batch"])]


COUNT = r"(\d+)\s+(?:informative\s+)?(?:penalties|features)"


@pytest.mark.parametrize("name", ["bilevel_hyperparameters", "constrained_bilevel"])
def test_bilevel_feature_counts_are_the_runs(name):
    run, text = record(name), page(name)
    for count in quoted(text, COUNT):
        assert int(count) in (run["features"], run["informative"]), count
    assert {str(run["features"]), str(run["informative"])} <= set(quoted(text, COUNT))


def test_pde_grid_noise_and_error_are_the_runs():
    run, text = record("pde_inverse_problem"), page("pde_inverse_problem")
    grid = run["grid"]
    assert quoted(text, r"On a (\d+) × \d+ grid") == [str(grid)]
    assert quoted(text, r"that is (\d+)\s+unknowns") == [str(grid * grid)]
    assert quoted(text, r"\((\d+)% noise\)") == [f"{run['noise']:.0%}"[:-1]]
    assert float(quoted(text, r"relative L2 error (0\.\d+)")[0]) == pytest.approx(
        run["relative_error"]
    )
