"""Shared helpers: timing, memory, errors, tables, JSON and plots.

Every suite module `benchmarks/<suite>.py` defines `run(quick: bool) -> list[dict]`
and may define `goals(rows) -> list[dict]` and `plot(rows, path)`. A row is a dict
with "suite", "case", "method", "time_s", "compile_s", "error" (or "rel_error") and
optionally "peak_mem_mb", "ratio", "note"; extra keys (sizes, modes) are kept in the
JSON and used by the plots.
"""

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

# Errors are compared down to float64 round-off, so every suite runs in float64.
jax.config.update("jax_enable_x64", True)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class Timing:
    """What `measure` found: the compiled function, its output and the figures, or
    the error that stopped it (`failure`, with everything else None)."""

    def __init__(
        self,
        compiled,
        output,
        time_s,
        compile_s,
        peak_mem_mb,
        failure=None,
        first_s=None,
    ):
        self.compiled = compiled
        self.output = output
        self.time_s = time_s
        self.compile_s = compile_s
        self.first_s = first_s  # the first call after compiling (the warm-up)
        self.peak_mem_mb = peak_mem_mb
        self.failure = failure

    @classmethod
    def failed(cls, error: Exception) -> "Timing":
        message = str(error).strip().splitlines()
        first = message[0] if message else ""
        return cls(None, None, None, None, None, f"{type(error).__name__}: {first}")


def compile_fn(fn: Callable, *args) -> tuple[Any, float]:
    """`jax.jit(fn).lower(*args).compile()` and the seconds it took (trace, lower,
    compile)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def peak_memory_mb(compiled) -> float | None:
    """Peak device memory of a compiled function from XLA's buffer assignment:
    arguments + outputs + temporaries − aliased buffers. (On CPU the reported
    `peak_memory_in_bytes` leaves out the temporaries, so it is not used.)"""
    try:
        stats = compiled.memory_analysis()
    except Exception:
        return None
    if stats is None:
        return None
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return total / 2**20


def _run(compiled, args, number: int, pipelined: bool) -> None:
    if pipelined:
        for _ in range(number):
            out = compiled(*args)
        jax.block_until_ready(out)
    else:
        for _ in range(number):
            jax.block_until_ready(compiled(*args))


def _calls_per_sample(compiled, args, min_sample_s: float, pipelined: bool) -> int:
    """How many calls make one timing sample of at least `min_sample_s` (1 when it is
    0 or a single call is that slow).

    Fast calls are timed in batches (as `timeit` does), so that neither the clock's
    resolution nor a single preemption by another process decides a sample; the
    per-call time then includes JAX's dispatch, which is what a user of a small
    jitted function pays. The estimate is the fastest of a few short probes.
    """
    if min_sample_s <= 0:
        return 1
    fastest = math.inf
    for _ in range(3):
        number, elapsed = 1, 0.0
        while elapsed < min_sample_s / 4 and number <= 10_000:
            start = time.perf_counter()
            _run(compiled, args, number, pipelined)
            elapsed = time.perf_counter() - start
            per_call = elapsed / number
            number *= 4
        if per_call >= min_sample_s:
            return 1
        fastest = min(fastest, per_call)
    return math.ceil(min_sample_s / fastest)


def _sample(compiled, args, number: int, pipelined: bool) -> float:
    start = time.perf_counter()
    _run(compiled, args, number, pipelined)
    return (time.perf_counter() - start) / number


def measure_all(
    fns: dict[str, Callable],
    *args,
    repeats: int = 5,
    min_sample_s: float = 0.02,
    pipelined: bool = False,
) -> dict[str, Timing]:
    """Compiles every function of `fns` for `args` and times them *interleaved*.

    For each function: the compile seconds (`jax.jit(fn).lower(*args).compile()`),
    a timed warm-up call (`first_s`), the peak memory from XLA's memory analysis.
    Then `repeats` rounds that each time every function once in turn, and the median
    seconds per call.
    Interleaving keeps the ratios between functions robust to a load that changes
    during the run (a shared machine): every function sees the same conditions.

    By default each call is waited for before the next (latency): one execution in
    flight at a time, as several in flight were seen to deadlock jaxlib 0.10.2's
    batched LAPACK kernels (they wait for sub-tasks on XLA's intra-op thread pool).
    `pipelined=True` dispatches a sample's calls back to back and waits once
    (throughput, as a loop of small jitted calls runs): for microsecond functions,
    where waking the waiting thread after every call would dominate and add noise.

    The timed calls go through `jax.jit(fn)`, as a user's do, not through the
    ahead-of-time `compiled` object: in JAX 0.10 a compiled object whose program
    holds a host callback has no C++ fast path (about 50 µs more per call), where
    `jax.jit` keeps it.
    """
    compiled, outputs, numbers, compile_s, samples = {}, {}, {}, {}, {}
    failures, first_s, jitted = {}, {}, {}
    for name, fn in fns.items():
        try:
            compiled[name], compile_s[name] = compile_fn(fn, *args)
            start = time.perf_counter()
            outputs[name] = jax.block_until_ready(compiled[name](*args))
            first_s[name] = time.perf_counter() - start
            jitted[name] = jax.jit(fn)
            jax.block_until_ready(jitted[name](*args))  # compiles it again, untimed
        except Exception as error:  # a peer that cannot run this case: report it
            failures[name] = Timing.failed(error)
            continue
        numbers[name] = _calls_per_sample(jitted[name], args, min_sample_s, pipelined)
        samples[name] = []
    for _ in range(repeats):
        for name in samples:
            samples[name].append(_sample(jitted[name], args, numbers[name], pipelined))
    return {
        name: failures[name]
        if name in failures
        else Timing(
            compiled[name],
            outputs[name],
            statistics.median(samples[name]),
            compile_s[name],
            peak_memory_mb(compiled[name]),
            first_s=first_s[name],
        )
        for name in fns
    }


def measure(fn: Callable, *args, repeats: int = 5) -> Timing:
    """`measure_all` for one function."""
    return measure_all({"fn": fn}, *args, repeats=repeats)["fn"]


def rel_error(value, exact) -> float:
    """Relative error ‖value − exact‖ / ‖exact‖ over every leaf (Frobenius norms)."""
    value = np.concatenate([np.ravel(v) for v in jax.tree.leaves(value)])
    exact = np.concatenate([np.ravel(v) for v in jax.tree.leaves(exact)])
    scale = np.linalg.norm(exact)
    diff = np.linalg.norm(value.astype(np.float64) - exact)
    return float(diff / scale) if scale > 0 else float(diff)


def row(suite: str, case: str, method: str, **fields) -> dict:
    """A result row, printed as a progress line when it is made."""
    result = {"suite": suite, "case": case, "method": method}
    result.update(fields)
    progress(result)
    return result


def timed_row(suite, case, method, timing: Timing, error, **fields) -> dict:
    """A row from a `Timing` and the error of its output (`error` may be a function
    of the output, not called when the measurement failed)."""
    if timing.failure is not None:
        fields = {k: v for k, v in fields.items() if k not in ("ratio", "note")}
        return row(suite, case, method, note=f"failed: {timing.failure}", **fields)
    if callable(error):
        error = error(timing.output)
    return row(
        suite,
        case,
        method,
        time_s=timing.time_s,
        compile_s=timing.compile_s,
        peak_mem_mb=timing.peak_mem_mb,
        error=error,
        **fields,
    )


def timed_rows(suite, case, timings: dict, exact, reference: str, **fields):
    """`timed_row` for every method of `timings`: its relative error against `exact`
    and its time as a ratio of the `reference` method's."""
    reference_time = timings[reference].time_s
    return [
        timed_row(
            suite,
            case,
            name,
            timing,
            lambda out: rel_error(out, exact),
            ratio=ratio(timing.time_s, reference_time),
            **fields,
        )
        for name, timing in timings.items()
    ]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """`numerator / denominator`, None when either is missing (a failed run)."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def progress(r: dict) -> None:
    parts = [f"  [{r['suite']}] {r['case']:<28} {r['method']:<34}"]
    if r.get("time_s") is not None:
        parts.append(f"time {fmt_time(r['time_s']):>9}")
    if r.get("compile_s") is not None:
        parts.append(f"compile {fmt_time(r['compile_s']):>9}")
    if r.get("peak_mem_mb") is not None:
        parts.append(f"mem {fmt_mem(r['peak_mem_mb']):>9}")
    err = r.get("error", r.get("rel_error"))
    if err is not None:
        parts.append(f"err {fmt_err(err)}")
    if r.get("note"):
        parts.append(f"({r['note']})")
    print("  ".join(parts), flush=True)


def fmt_time(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_mem(mb) -> str:
    if mb is None:
        return "-"
    return f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:.1f} MiB"


def fmt_err(err) -> str:
    if err is None:
        return "-"
    if isinstance(err, float) and math.isnan(err):
        return "nan"
    return f"{err:.1e}"


def fmt_ratio(ratio) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


COLUMNS = (
    ("case", "case", str),
    ("method", "method", str),
    ("time", "time_s", fmt_time),
    ("compile", "compile_s", fmt_time),
    ("peak mem", "peak_mem_mb", fmt_mem),
    ("error", "error", fmt_err),
    ("ratio", "ratio", fmt_ratio),
    ("note", "note", lambda note: note if len(note) <= 72 else note[:71] + "…"),
)


def table(rows: Sequence[dict], markdown: bool = False) -> str:
    """The rows as a text table (or a Markdown table)."""
    header = [name for name, _, _ in COLUMNS]
    body = []
    for r in rows:
        cells = []
        for _, key, fmt in COLUMNS:
            value = r.get(key)
            if key == "error" and value is None:
                value = r.get("rel_error")
            cells.append("" if value is None and key == "note" else fmt(value))
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += [
            "| " + " | ".join(c.replace("|", "\\|") for c in b) + " |" for b in body
        ]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(
        c.ljust(w) for c, w in zip(cells, widths, strict=True)
    )  # noqa: E731
    return "\n".join(
        [line(header), line(["-" * w for w in widths])] + [line(b) for b in body]
    )


def machine() -> dict:
    """What ran the benchmarks: CPU model, core count, versions."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "nproc": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = [ln for ln in lscpu.splitlines() if ln.startswith("Model name")]
        info["cpu"] = model[0].split(":", 1)[1].strip() if model else None
    except OSError:
        info["cpu"] = platform.processor()
    for package in ("implicitdiff", "jaxopt", "optimistix", "lineax", "equinox"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:
            info[package] = None
    return info


def results_dir(quick: bool) -> Path:
    """`benchmarks/results/`, or its `quick/` folder for `--quick` runs, so that a
    quick check never overwrites the figures of a full run."""
    return RESULTS_DIR / "quick" if quick else RESULTS_DIR


def write_json(suite: str, rows: list[dict], goals: list[dict], quick: bool) -> Path:
    """Writes `<suite>.json` (rows, goals, machine, date) to `results_dir(quick)`."""
    directory = results_dir(quick)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{suite}.json"
    payload = {
        "suite": suite,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": quick,
        "machine": machine(),
        "goals": goals,
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def markdown_report(suites: Sequence[str], quick: bool = False) -> str:
    """The stored results of `suites` as Markdown: per suite its run's date, whether
    it was quick, its table and its goals."""
    parts = []
    for suite in suites:
        path = results_dir(quick) / f"{suite}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        info = result["machine"]
        parts.append(
            f"### `{suite}`\n\nRun {result['date']}"
            + (" (--quick)" if result["quick"] else "")
            + f", load average {info['loadavg'][0]:.1f} at the start.\n\n"
            + table(result["rows"], markdown=True)
        )
        verdicts = {True: "met", False: "**missed**", None: "n/a"}
        goals = [
            f"- goal {verdicts[g['met']]}: {g['goal']}. {g['detail']}"
            for g in result["goals"]
        ]
        if goals:
            parts.append("\n".join(goals))
    return "\n\n".join(parts)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def goal(text: str, met: bool | None, detail: str = "") -> dict:
    """A goal and whether the measurements met it (None: not measurable)."""
    return {"goal": text, "met": met, "detail": detail}


def pyplot():
    """matplotlib's pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lines(
    rows: Sequence[dict],
    path: Path,
    x: str,
    panels: Sequence[tuple[str, str, Callable[[dict], bool]]],
    xlabel: str,
    title: str,
) -> None:
    """One panel per `(y_key, ylabel, selector)`, one line per method, log-log."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    axes = np.atleast_1d(axes)
    for ax, (y, ylabel, select) in zip(axes, panels, strict=True):
        chosen = [r for r in rows if select(r) and r.get(y) is not None]
        for method in dict.fromkeys(r["method"] for r in chosen):
            points = sorted((r[x], r[y]) for r in chosen if r["method"] == method)
            ax.plot(*zip(*points, strict=True), marker="o", label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(rows: Sequence[dict], path: Path, title: str = "") -> None:
    """Time per (case, method), log scale: the fallback plot for any suite."""
    plt = pyplot()
    timed = [r for r in rows if r.get("time_s")]
    if not timed:
        return
    cases = list(dict.fromkeys(r["case"] for r in timed))
    methods = list(dict.fromkeys(r["method"] for r in timed))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(
        figsize=(max(6, 1.4 * len(cases) * len(methods) ** 0.5), 4.5)
    )
    for j, method in enumerate(methods):
        heights = [
            next(
                (
                    r["time_s"]
                    for r in timed
                    if r["case"] == c and r["method"] == method
                ),
                0,
            )
            for c in cases
        ]
        ax.bar(np.arange(len(cases)) + j * width, heights, width, label=method)
    ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2)
    ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("time per call [s]")
    ax.set_title(title or rows[0]["suite"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_subprocess(
    module: str, env: dict[str, str], *args: str, timeout_s: float = 900
) -> tuple[list[dict], str | None]:
    """Runs `python -m module *args` in a fresh process with `env` added, streaming its
    progress lines; the child prints its rows as one JSON line starting `ROWS `.

    Returns the rows and None, or the rows so far and why the child failed: a non-zero
    exit, or no output for `timeout_s` seconds (then it is killed: a hung XLA
    execution cannot be interrupted from inside the process). XLA's "[SPMD]
    Involuntary full rematerialization" warnings are counted, not echoed.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    stderr_lines, rows, last_output = [], [], [time.monotonic()]

    def drain_stderr():
        stderr_lines.extend(proc.stderr)

    def drain_stdout():
        for line in proc.stdout:
            last_output[0] = time.monotonic()
            if line.startswith("ROWS "):
                rows.extend(json.loads(line[5:]))
            else:
                print(line, end="", flush=True)

    readers = [
        threading.Thread(target=f, daemon=True) for f in (drain_stderr, drain_stdout)
    ]
    for reader in readers:
        reader.start()
    problem = None
    while proc.poll() is None:
        if time.monotonic() - last_output[0] > timeout_s:
            proc.kill()
            problem = f"no progress for {timeout_s:.0f} s: killed (hung)"
        time.sleep(0.5)
    for reader in readers:
        reader.join()
    spmd = [ln for ln in stderr_lines if "Involuntary full rematerialization" in ln]
    rest = [ln for ln in stderr_lines if ln not in spmd]
    print("".join(rest[-30:]), end="", file=sys.stderr, flush=True)
    if spmd:
        print(f"  ({len(spmd)} XLA SPMD 'involuntary full rematerialization' warnings)")
    if problem is None and proc.returncode != 0:
        problem = f"exit code {proc.returncode}"
    return rows, problem
