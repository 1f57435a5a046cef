"""Hooks through which every linear solve runs, and `SolveLog`, which records them.

The core calls `presolve` and `solve` below for every linear solve, and solvers call
`report_solve` from inside their `solve` (iterations, residual, why it failed).
Outside a `SolveLog` the hooks are plain pass-throughs: they add nothing to the traced
program, so the default path pays for no host callback at all.

Inside a `SolveLog` they add host callbacks to the traced program:

- four clock readings (`jax.pure_callback`): when the operator is ready, when the
  presolve is done, when the solve starts, when it is done. Each takes the first
  element of every array it waits for and hands back a zero that those arrays are
  then made to depend on: real data dependencies, which is what orders callbacks
  against the work they time under `jit` (XLA removes `lax.optimization_barrier`s
  and folds products by zero, so neither can do it);
- one record (`jax.pure_callback`) whose zero the solution depends on, so that it
  runs before anything downstream of the solution, notably before an
  `on_failure="raise"` check aborts the program;
- one no-op `jax.debug.callback`, whose only job is to give the program an effect, so
  that `jax.effects_barrier()` (called when the log is read or exited) waits for it.

Under `vmap` (and so under `jacfwd`/`jacrev`) what reaches the callbacks is reduced
over the batch first (`equinox.internal.unvmap_*`), so one batched solve is one entry,
never one per right-hand side, and an unbatched presolve stays unbatched. The
callbacks receive at most one number per system: nothing the size of the state is
gathered from sharded arrays.

**Which logs get an entry.** The callbacks run on XLA's threads, not the caller's, so
the caller's logs travel with the program: each thread with open logs holds a small
integer *slot*, the value of the `_LOGGING` user context (part of the jit cache key),
staged into the record callback, which appends to the logs open in that slot. A slot is
held while its thread has a log open and then reused, so a jitted function is traced
once per concurrently logging thread, never once per log.
"""

import dataclasses
import functools
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Literal

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax.custom_batching import custom_vmap
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree

from ._misc import all_finite, nan_unless, ravel, size, structure, unravel

# Part of every jit cache key (and of JAX's inner tracing caches): a function traced
# with no log active has no callbacks in its program, so entering a log must give a
# cache miss and a fresh trace. `jax.make_user_context` (public since JAX 0.7.2) is
# made for this; the alternative, documenting that functions must be traced inside
# the log, would silently record nothing for the common `jit` outside / call inside.
# Its value is the calling thread's slot (None: no log open), not a log: the logs of a
# slot share one trace, and the callbacks look them up when they run. Thread-local,
# as every JAX context. Created at import, never inside a trace, so that it is part of
# every key from the start.
_LOGGING = jax.make_user_context(None)

_slots: dict[int, list["SolveLog"]] = {}  # slot -> its thread's open logs
_slots_lock = threading.Lock()  # the callbacks read `_slots` from XLA's threads
_thread = threading.local()  # this thread's slot and the context that set it
_tracing = threading.local()  # what `report_solve` noted while a `solve` is traced

# Ticks are microseconds modulo 2³¹: an int32 is exact with or without x64, and
# differences modulo 2³¹ are right for any solve shorter than 35 minutes.
_TICK_MODULUS = 2**31

Status = Literal[
    "converged", "not converged", "breakdown", "singular", "non-finite input", "failed"
]
# What a solver may report as the reason for a NaN solution; code = index + 1 (0: none).
_REASONS = ("not converged", "breakdown", "singular", "non-finite input")


@dataclasses.dataclass(frozen=True)
class SolveLogEntry:
    """One linear solve recorded by a [`implicitdiff.SolveLog`][].

    A solve batched by `vmap` (as in `jax.jacfwd` and `jax.jacrev`, one right-hand side
    per column or row) is one entry: `batch` says how many systems it solved, and
    `iterations`, `residual` and `status` report the worst of them.

    **Fields:**

    - `solver`: the solver's name, such as `"Direct"` or `"Lineax(GMRES)"`.
    - `direction`: `"JVP"` (the system `A ẏ = −B ẋ`) or `"VJP"` (`Aᵀ u = v`).
    - `size`: the number of unknowns of one system.
    - `dtype`: the dtype of the right-hand side.
    - `batch`: the number of systems solved together with one presolve.
    - `iterations`: the largest step count the solver reported through
        [`implicitdiff.report_solve`][]; `None` for a solver that reports none
        (direct solvers).
    - `residual`: the largest relative residual `‖b − A x‖ / ‖b‖` (`‖b − A x‖` when
        `b = 0`), computed by the log with one extra product by `A`; NaN when the
        solution is NaN.
    - `solver_residual`: the largest final residual the solver reported through
        `report_solve`, as the solver measures it (the Krylov solvers: `‖b − A x‖/‖b‖`
        of their last iterate, also when they failed); `None` if none was reported.
    - `status`: `"converged"` when every solution is finite; `"non-finite input"` when
        a right-hand side or the operator is not finite (NaN in, NaN out is no solver
        failure). Otherwise a solution is NaN from finite input, and the status says
        why: the reason the solver reported through `report_solve`
        (`"not converged"`, `"breakdown"`, `"singular"`); else `"singular"` when the
        solver's answer was finite and the library's own checks rejected it (the
        regularity certificate `certify` failed, or the answer proves `A`
        numerically singular); else `"failed"` (the solver returned NaN and gave no
        reason).
    - `presolve_time`, `solve_time`: wall-clock seconds of the presolve (with the
        solver's regularity certificate, `certify`) and of the solve, as measured on
        the host between data-dependent callbacks. A presolve is timed in every entry
        that shares it.
    """

    solver: str
    direction: str
    size: int
    dtype: str
    batch: int
    iterations: int | None
    residual: float
    solver_residual: float | None
    status: Status
    presolve_time: float
    solve_time: float


class SolveLog:
    """Records every linear solve of an [`implicitdiff.ImplicitFunction`][] that runs
    inside it, under `jit`, `vmap` and every derivative, through host callbacks.

    Each solve becomes a [`implicitdiff.SolveLogEntry`][]: solver, direction (JVP or
    VJP), system size, iterations, final relative residual, status and the presolve
    and solve wall times. `print(log)` shows them as a table; `log.entries` is the
    list itself.

    **Cost.** Outside a log the implicit rule traces no callback at all. Inside one,
    every solve runs six host callbacks (on a few numbers: nothing the size of the
    state is gathered from sharded arrays) and one extra product by `A` (for the
    residual): fine for diagnosis, not for a hot loop.

    **Functions traced before the log was entered.** A log takes part in JAX's jit
    cache key (through `jax.make_user_context`): the first call of a jitted function
    inside a log traces and compiles it again, with the callbacks, and later calls
    inside any log reuse that version (no retrace per log); outside a log the original
    version, without callbacks, runs. So `jax.jit`, `equinox.filter_jit` and friends
    need nothing special. The exception is a program compiled ahead of time
    (`jax.jit(f).lower(...).compile()`): what was compiled runs as it was, so compile
    it inside the log to record its solves.

    **When entries appear.** The callbacks run while the program executes, which under
    JAX's asynchronous dispatch may be after the call returns. Reading `log.entries`
    (or printing the log) and leaving the `with` block wait for them
    (`jax.effects_barrier()`).

    **Threads and nesting.** A log records the solves of the thread that entered it,
    not those of other threads (each with its own logs); enter and leave it in the
    same thread. Nested logs each record every solve run while they are open, and may
    be left in any order. A jitted function is traced again (with the callbacks) once
    per thread logging at the same time, not once per log. The callbacks run on the
    first device, so in a multi-process run the entries appear in the process that
    owns it.

    **Solvers report** their iterations, final residual and the reason for a failure
    through [`implicitdiff.report_solve`][]; a user's solver can too.

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import implicitdiff as idf

        sqrt = idf.ImplicitFunction(lambda x: jnp.sqrt(x), lambda x, y: y**2 - x)
        with idf.SolveLog() as log:
            jax.jit(jax.grad(lambda x: sqrt(x).sum()))(jnp.array([4.0, 9.0]))
        print(log)  # one VJP solve, converged, with its residual and times
        ```
    """

    # Not an `equinox.Module`: a mutable recorder that lives on the host, never a
    # pytree that JAX traces.
    def __init__(self):
        self._entries: list[SolveLogEntry] = []
        self._open = False

    def __enter__(self) -> "SolveLog":
        if self._open:
            raise RuntimeError("SolveLog: this log is already active.")
        if not hasattr(_thread, "slot"):
            _open_slot()
        with _slots_lock:
            _slots[_thread.slot].append(self)
        self._open = True
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            jax.effects_barrier()
        finally:
            with _slots_lock:
                logs = _slots[_thread.slot]
                logs.remove(self)
            self._open = False
            if not logs:
                _close_slot()

    @property
    def entries(self) -> list[SolveLogEntry]:
        """The recorded solves, oldest first (a copy)."""
        if self._open:
            jax.effects_barrier()
        return list(self._entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[SolveLogEntry]:
        return iter(self.entries)

    def __getitem__(self, index: int) -> SolveLogEntry:
        return self.entries[index]

    def __str__(self) -> str:
        return _table(self.entries)

    def __repr__(self) -> str:
        return f"SolveLog({len(self)} entries)"


SolveLog.__init__.__doc__ = """**Arguments:** none. Use it as a context manager."""


def _open_slot() -> None:
    """Gives this thread the smallest free slot and makes it the `_LOGGING` value."""
    with _slots_lock:
        slot = next(i for i in range(len(_slots) + 1) if i not in _slots)
        _slots[slot] = []
    _thread.slot, _thread.context = slot, _LOGGING(slot)
    _thread.context.__enter__()


def _close_slot() -> None:
    context = _thread.context
    with _slots_lock:
        del _slots[_thread.slot]
    del _thread.slot, _thread.context
    context.__exit__(None, None, None)


def presolve(solver, operator, y_structure, direction):
    """Runs `solver.presolve` and `solver.certify` (part of the presolve: once per
    linearisation point); records their time when a `SolveLog` is active. Returns the
    state for `solve` and the certificate."""
    if _LOGGING.value is None:
        state = solver.presolve(operator, y_structure)
        return state, solver.certify(state, operator)
    operator, start = _tick_after(operator)
    state = solver.presolve(operator, y_structure)
    regular = solver.certify(state, operator)
    (state, regular), end = _tick_after((state, regular))
    return _TimedState(state, start, end), regular


def solve(solver, state, product, b, direction, accept):
    """Runs `solver.solve`, then `accept(x)` (the caller's checks, a boolean scalar),
    and returns `x` where accepted, else all NaN; records the solve when a `SolveLog`
    is active, with the residual of `product` (`v ↦ A v`, the system solved)."""
    if not isinstance(state, _TimedState):
        x = solver.solve(state, b)
        return nan_unless(accept(x), x)
    (inner, b), start = _tick_after((state.state, b))
    report = _Report()
    _reports().append(report)
    try:
        x_solver = solver.solve(inner, b)
    finally:
        _reports().pop()
    x = nan_unless(accept(x_solver), x_solver)
    x, end = _tick_after(x)
    batch = _systems(_probe(x))
    info = (_solver_name(solver), direction.split()[0], size(b), _dtype_name(b))
    ticks = (state.start, state.end, start, end)
    done = _record_when_run(
        info, ticks, batch, report, all_finite(x_solver), product, x, b
    )
    return _after(x, done)


def _record_when_run(info, ticks, batch, report, solver_finite, product, x, b):
    """Stages the callback that appends this solve's entry to the logs of the calling
    thread's slot, with everything reduced over the `vmap` axes; returns its (opaque,
    zero) result. `solver_finite`: whether the solver's own answer was finite, before
    the library's checks."""
    x_finite = all_finite(x)
    residual, operator_finite = _residual(product, x, b, x_finite)
    bad_input = ~all_finite(b) | (~x_finite & ~operator_finite)
    failed = ~x_finite & ~bad_input
    done = jax.pure_callback(
        functools.partial(_record, _LOGGING.value, info, report.reported()),
        jax.ShapeDtypeStruct((), jnp.int32),
        ticks,
        batch,
        eqxi.unvmap_max(report.get("iterations", jnp.int32(-1))),
        eqxi.unvmap_max(residual),
        eqxi.unvmap_max(report.get("residual", jnp.float32(jnp.nan))),
        eqxi.unvmap_max(report.get("reason", jnp.int32(0))),
        eqxi.unvmap_any(bad_input),
        eqxi.unvmap_any(failed),
        eqxi.unvmap_any(failed & solver_finite),
    )
    jax.debug.callback(_completed, done)
    return done


def report_solve(
    *,
    iterations: Int[ArrayLike, ""] | None = None,
    residual: Float[ArrayLike, ""] | None = None,
    status: str | Mapping[str, Bool[ArrayLike, ""]] | None = None,
) -> None:
    """Reports how a linear solve went to [`implicitdiff.SolveLog`][], from inside the
    `solve` method of any [`implicitdiff.AbstractLinearSolver`][] (the built-in ones
    and a user's), with traced values.

    Outside a `SolveLog` it does nothing and costs nothing. Inside one, the entry of
    the solve shows what was reported; each keyword keeps the last value reported
    for it. Call it in the scope of `solve` itself (after a loop, not inside its
    body or inside a `vmap` of `solve`'s own).

    **Arguments:**

    - `iterations`: an integer scalar, the number of iterations the solve took.
    - `residual`: a scalar, the final residual as the solver measures it (say
        `‖b − A x‖/‖b‖` of the last iterate), also when it failed. (The log computes
        the true residual of the returned solution itself.)
    - `status`: why a NaN solution is NaN, when it is: `"not converged"`,
        `"breakdown"`, `"singular"` or `"non-finite input"`; or a dict from these
        to boolean scalars (traced), of which the first true one applies (none
        true: no reason). Ignored when the solution is finite.

    **Returns:**

    Nothing.

    !!! Example

        ```python
        class Richardson(idf.AbstractLinearSolver):
            def presolve(self, A, y):
                return A

            def solve(self, A, b):
                def step(carry):
                    x, k = carry
                    return x + 0.5 * (b - A.mv(x)), k + 1

                def go_on(carry):
                    x, k = carry
                    return (jnp.linalg.norm(b - A.mv(x)) > 1e-10) & (k < 100)

                x, k = jax.lax.while_loop(go_on, step, (jnp.zeros_like(b), 0))
                r = jnp.linalg.norm(b - A.mv(x)) / jnp.linalg.norm(b)
                converged = r <= 1e-10
                idf.report_solve(
                    iterations=k, residual=r, status={"not converged": ~converged}
                )
                return jnp.where(converged, x, jnp.nan)
        ```
    """
    reason = None if status is None else _reason_code(status)
    reports = _reports()
    if not reports:
        return
    values = {"iterations": iterations, "residual": residual, "reason": reason}
    for name, value in values.items():
        if value is not None:
            reports[-1][name] = jnp.asarray(value)


def _reason_code(status) -> Int[Array, ""]:
    """The code of a reported failure reason (index + 1 in `_REASONS`); checks the
    names when tracing, with or without a log."""
    flags = {status: True} if isinstance(status, str) else dict(status)
    unknown = [name for name in flags if name not in _REASONS]
    if unknown:
        raise ValueError(
            f"implicitdiff.report_solve: unknown status {unknown[0]!r}; expected one "
            f"of {_REASONS}."
        )
    code = jnp.zeros((), jnp.int32)
    for name, flag in reversed(flags.items()):  # the first true flag wins
        code = jnp.where(flag, _REASONS.index(name) + 1, code)
    return code


class _Report(dict):
    """What `report_solve` noted during one traced `solve`: name -> traced value."""

    def reported(self) -> tuple[bool, bool]:
        """Whether iterations and a residual were reported (static, for the record)."""
        return "iterations" in self, "residual" in self


class _TimedState(eqx.Module):
    """The solver's state with the presolve's start and end ticks."""

    state: PyTree
    start: Array
    end: Array


def _reports() -> list[_Report]:
    if not hasattr(_tracing, "reports"):
        _tracing.reports = []
    return _tracing.reports


def _tick_after(tree):
    """Reads the clock on the host once `tree` is computed, and returns `tree` again,
    now computed only after the clock was read (so that what follows is timed from
    there), with the clock reading.

    XLA drops `optimization_barrier`s and folds products by zero, so the dependencies
    are real ones: the callback takes the first element of every leaf (reduced over
    the `vmap` axes, so that an unbatched operator or presolve state stays unbatched
    and one batched solve reads the clock once), and returns a zero that XLA cannot
    see through, subtracted from the first element of every leaf.
    """
    # JAX arrays only: NumPy leaves are trace-time constants, with nothing to wait for,
    # and a host solver may need them concrete.
    arrays, static = eqx.partition(tree, lambda leaf: isinstance(leaf, jax.Array))
    probe = eqxi.unvmap_max(_probe(arrays))
    tick, zero = jax.pure_callback(_read_clock, (_INT32, _INT32), probe)
    return eqx.combine(_after(arrays, zero), static), tick


@custom_vmap
def _systems(token):
    """The number of systems solved together: the product of the `vmap` axes along
    which `token` is batched (1 without `vmap`), known when tracing."""
    return jnp.ones((), jnp.int32)


@_systems.def_vmap
def _systems_vmap(axis_size, in_batched, token):
    (batched,) = in_batched
    # A reduction, not `token[0]`: slicing an axis that is explicitly sharded fails.
    return _systems(jnp.max(token, axis=0) if batched else token) * axis_size, False


_INT32 = jax.ShapeDtypeStruct((), jnp.int32)


def _probe(arrays):
    """A scalar that needs the first element of every leaf of `arrays`."""
    firsts = [
        jnp.real(leaf[_origin(leaf)]).astype(jnp.float32)
        for leaf in jax.tree.leaves(arrays)
        if leaf.size
    ]
    return sum(firsts, jnp.zeros((), jnp.float32))


def _after(arrays, zero):
    """`arrays`, made to depend on `zero` (the opaque result of a callback, always 0):
    `zero` is subtracted from the first element of every leaf, which changes nothing
    (`v − 0 = v`, for `v = −0` and NaN too) and costs a one-element update."""

    def depend(leaf):
        if not leaf.size or leaf.dtype == jnp.bool_:
            return leaf
        origin = _origin(leaf)
        return leaf.at[origin].set(leaf[origin] - zero.astype(leaf.dtype))

    return jax.tree.map(depend, arrays)


def _origin(leaf) -> tuple[int, ...]:
    """The index of the first element; no reshape, which could reshard."""
    return (0,) * leaf.ndim


def _read_clock(probe):
    now = (time.perf_counter_ns() // 1000) % _TICK_MODULUS
    return np.int32(now), np.zeros((), np.int32)


def _residual(product, x, b, x_finite):
    """`‖b − A x‖ / ‖b‖` (NaN for a non-finite `x`), and whether `A` is finite, with
    one product by `A`: of `x` when it is finite, else of `b` (the systems solved here
    are square), whose non-finite product means a non-finite `A`, so that NaN in, NaN
    out is not blamed on the solver."""
    b_flat, x_flat = ravel(b), ravel(x)
    if b_flat.shape == x_flat.shape:
        x_flat = jnp.where(x_finite, x_flat, b_flat.astype(x_flat.dtype))
    Ax = ravel(product(unravel(x_flat, structure(x)))).astype(b_flat.dtype)
    r_norm = jnp.linalg.norm(b_flat - Ax)
    b_norm = jnp.linalg.norm(b_flat)
    relative = jnp.where(b_norm > 0, r_norm / jnp.where(b_norm > 0, b_norm, 1), r_norm)
    return jnp.where(x_finite, relative, jnp.nan), jnp.all(jnp.isfinite(Ax))


def _record(slot, info, reported, ticks, batch, iterations, residual, *rest):
    solver_residual, reason, bad_input, failed, rejected = rest
    solver, direction, n, dtype = info
    has_iterations, has_residual = reported
    pre_start, pre_end, start, end = (int(t) for t in ticks)
    if failed:
        status = _REASONS[reason - 1] if reason else None
        status = status or ("singular" if rejected else "failed")
    else:
        status = "non-finite input" if bad_input else "converged"
    entry = SolveLogEntry(
        solver=solver,
        direction=direction,
        size=n,
        dtype=dtype,
        batch=int(batch),
        iterations=int(iterations) if has_iterations else None,
        residual=float(residual),
        solver_residual=float(solver_residual) if has_residual else None,
        status=status,
        presolve_time=((pre_end - pre_start) % _TICK_MODULUS) * 1e-6,
        solve_time=((end - start) % _TICK_MODULUS) * 1e-6,
    )
    with _slots_lock:
        for log in _slots.get(slot, ()):
            log._entries.append(entry)
    return np.zeros((), np.int32)


def _completed(done):
    """Does nothing: being an effect makes `jax.effects_barrier()` wait for it."""


def _solver_name(solver) -> str:
    """`Lineax(GMRES)` (the wrapped solver), `SciPy(splu)` (the method), `Direct`."""
    inner = getattr(solver, "solver", None)
    method = getattr(solver, "method", None)
    if isinstance(inner, lx.AbstractLinearSolver):
        return f"{type(solver).__name__}({type(inner).__name__})"
    if isinstance(method, str):
        return f"{type(solver).__name__}({method})"
    return type(solver).__name__


def _dtype_name(tree) -> str:
    return str(jnp.result_type(*jax.tree.leaves(tree)))


_COLUMNS = (
    ("#", 3),
    ("solver", 16),
    ("dir", 3),
    ("size", 6),
    ("batch", 5),
    ("iters", 5),
    ("residual", 9),
    ("status", 16),
    ("presolve", 10),
    ("solve", 10),
)


def _table(entries: list[SolveLogEntry]) -> str:
    def row(cells):
        return "  ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, _COLUMNS, strict=True))

    lines = [row([name for name, _ in _COLUMNS])]
    for i, e in enumerate(entries):
        lines.append(
            row(
                [
                    i,
                    e.solver,
                    e.direction,
                    e.size,
                    e.batch,
                    "n/a" if e.iterations is None else e.iterations,
                    f"{e.residual:.2e}",
                    e.status,
                    f"{e.presolve_time * 1e3:.3f} ms",
                    f"{e.solve_time * 1e3:.3f} ms",
                ]
            )
        )
    return "\n".join(lines) if entries else "SolveLog: no solves recorded."
