"""Hooks through which every linear solve runs, and what they record for a `SolveLog`.

The core calls `presolve` and `solve` below for every linear solve, and solvers call
`report_solve` (in `_solve_log.py`) from inside their `solve`, which notes what they
report in the `Report` of the solve being traced. Outside a `SolveLog` the hooks are
plain pass-throughs: they add nothing to the traced program, so the default path pays
for no host callback at all.

Inside a `SolveLog` they add host callbacks to the traced program:

- four clock readings (`_solve_clock.tick_after`): when the operator is ready, when
  the presolve is done, when the solve starts, when it is done;
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

import functools
import threading
from collections.abc import Callable

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax.custom_batching import custom_vmap
from jaxtyping import Array, PyTree

from ._misc import (
    all_finite,
    any_nan,
    nan_unless,
    ravel,
    size,
    structure,
    tree_norm,
    unravel,
)
from ._solve_clock import after, elapsed, probe, tick_after

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

_slots: dict[int, list[list[dict]]] = {}  # slot -> the records of its thread's logs
_slots_lock = threading.Lock()  # the callbacks read `_slots` from XLA's threads
_thread = threading.local()  # this thread's slot and the context that set it
_tracing = threading.local()  # the `Report`s of the `solve`s being traced

# What a solver may report as the reason for a NaN solution; code = index + 1 (0: none).
REASONS = ("not converged", "breakdown", "singular", "non-finite input")


def start_recording(records: list[dict]) -> None:
    """Appends the fields of every solve this thread runs from now on to `records`,
    until `stop_recording(records)`."""
    if not hasattr(_thread, "slot"):
        _open_slot()
    with _slots_lock:
        _slots[_thread.slot].append(records)


def stop_recording(records: list[dict]) -> None:
    with _slots_lock:
        lists = _slots[_thread.slot]
        del lists[next(i for i, other in enumerate(lists) if other is records)]
    if not lists:
        _close_slot()


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


class Report(dict):
    """What `report_solve` noted during one traced `solve`: name -> traced value."""

    def reported(self) -> tuple[bool, bool]:
        """Whether iterations and a residual were reported (static, for the record)."""
        return "iterations" in self, "residual" in self


def current_report() -> Report | None:
    """The `Report` of the innermost `solve` being traced in a log, if any."""
    reports = _reports()
    return reports[-1] if reports else None


def _reports() -> list[Report]:
    if not hasattr(_tracing, "reports"):
        _tracing.reports = []
    return _tracing.reports


class _TimedState(eqx.Module):
    """The solver's state with the presolve's start and end ticks."""

    state: PyTree
    start: Array
    end: Array


def presolve(solver, operator, y_structure, direction):
    """Runs `solver.presolve`, `solver.certify` and `solver.norm_bound` (part of the
    presolve: once per linearisation point); records their time when a `SolveLog` is
    active. Returns the state for `solve`, the certificate and the bound of `‖A‖∞`."""
    if _LOGGING.value is None:
        state = solver.presolve(operator, y_structure)
        return state, *_certificate(solver, state, operator)
    operator, start = tick_after(operator)
    state = solver.presolve(operator, y_structure)
    (state, certificate), end = tick_after(
        (state, _certificate(solver, state, operator))
    )
    return _TimedState(state, start, end), *certificate


def _certificate(solver, state, operator):
    certificate = solver.certify(state, operator)
    if jnp.shape(certificate) != () or jnp.result_type(certificate) != jnp.bool_:
        raise TypeError(
            f"implicitdiff: {type(solver).__name__}.certify must return a boolean "
            f"scalar array (whether A is proven regular), got "
            f"{jnp.result_type(certificate)}{list(jnp.shape(certificate))}."
        )
    return jnp.asarray(certificate), solver.norm_bound(state, operator)


def solve(solver, state, product: Callable, b, direction, judge, operator_finite):
    """Runs `solver.solve`, then `judge(x)` (the caller's checks: a pair whose first
    element is a boolean scalar, whether `x` is accepted), and returns `x` where
    accepted, else all NaN, and the verdict; records
    the solve when a `SolveLog` is active, with the residual of `product` (`v ↦ A v`,
    the system solved). `operator_finite`: False when the point the operator was
    linearised at is not sound (a failed condition check: the derivative will be NaN
    whatever the solve does), recorded as a non-finite input."""
    if not isinstance(state, _TimedState):
        x = solver.solve(state, b)
        verdict = judge(x)
        return nan_unless(verdict[0], x), verdict
    (inner, b), start = tick_after((state.state, b))
    report = Report()
    _reports().append(report)
    try:
        x_solver = solver.solve(inner, b)
    finally:
        _reports().pop()
    verdict = judge(x_solver)
    x = nan_unless(verdict[0], x_solver)
    x, end = tick_after(x)
    batch = _systems(probe(x))
    info = (_solver_name(solver), direction.split()[0], size(b), _dtype_name(b))
    ticks = (state.start, state.end, start, end)
    done = _record_when_run(
        info, ticks, batch, report, all_finite(x_solver), product, x, b, operator_finite
    )
    return after(x, done), verdict


def _record_when_run(
    info, ticks, batch, report, solver_finite, product, x, b, point_sound
):
    """Stages the callback that appends this solve's entry to the logs of the calling
    thread's slot, with everything reduced over the `vmap` axes; returns its (opaque,
    zero) result. `solver_finite`: whether the solver's own answer was finite, before
    the library's checks."""
    x_finite = all_finite(x)
    residual, operator_finite = _residual(product, x, b, x_finite)
    bad_input = any_nan(b) | ~point_sound | (~x_finite & ~operator_finite)
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


def _residual(product, x, b, x_finite):
    """`‖b − A x‖ / ‖b‖` (NaN for a non-finite `x`), and whether `A` is finite, with
    one product by `A`: of `x` when it is finite, else of `b` (the systems solved here
    are square), whose non-finite product means a non-finite `A`, so that NaN in, NaN
    out is not blamed on the solver."""
    b_flat, x_flat = ravel(b), ravel(x)
    if b_flat.shape == x_flat.shape:
        x_flat = jnp.where(x_finite, x_flat, b_flat.astype(x_flat.dtype))
    Ax = ravel(product(unravel(x_flat, structure(x)))).astype(b_flat.dtype)
    r_norm = tree_norm(b_flat - Ax)  # overflow-safe: 10²⁰ in float32 is no inf
    b_norm = tree_norm(b_flat)
    relative = jnp.where(b_norm > 0, r_norm / jnp.where(b_norm > 0, b_norm, 1), r_norm)
    return jnp.where(x_finite, relative, jnp.nan), jnp.all(jnp.isfinite(Ax))


def _record(slot, info, reported, ticks, batch, iterations, residual, *rest):
    """The record callback, on the host: appends the solve's fields (those of a
    `SolveLogEntry`) to the records of the logs open in `slot`."""
    solver_residual, reason, bad_input, failed, rejected = rest
    solver, direction, n, dtype = info
    has_iterations, has_residual = reported
    pre_start, pre_end, start, end = ticks
    if failed:
        status = REASONS[reason - 1] if reason else None
        status = status or ("singular" if rejected else "failed")
    else:
        status = "non-finite input" if bad_input else "converged"
    fields = dict(
        solver=solver,
        direction=direction,
        size=n,
        dtype=dtype,
        batch=int(batch),
        iterations=int(iterations) if has_iterations else None,
        residual=float(residual),
        solver_residual=float(solver_residual) if has_residual else None,
        status=status,
        presolve_time=elapsed(pre_start, pre_end),
        solve_time=elapsed(start, end),
    )
    with _slots_lock:
        for records in _slots.get(slot, ()):
            records.append(fields)
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
