"""`SolveLog`, which shows the linear solves recorded while it is open, and
`report_solve`, through which solvers tell it how a solve went.

What a log adds to the traced program, and how the solves of a thread reach its open
logs, is in `_solve_record.py`; this module only opens and closes logs and presents
what they hold.
"""

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._solve_record import REASONS, current_report, start_recording, stop_recording

Status = Literal[
    "converged", "not converged", "breakdown", "singular", "non-finite input", "failed"
]


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
        `b = 0`), computed by the log with one extra product by `A` (by the
        linearised conditions themselves, not by an assembled matrix); NaN when the
        solution is NaN.
    - `solver_residual`: the largest final residual the solver reported through
        `report_solve`, as the solver measures it (the Krylov solvers: `‖b − A x‖/‖b‖`
        of their last iterate, also when they failed); `None` if none was reported.
    - `status`: `"converged"` when every solution is finite; `"non-finite input"` when
        a right-hand side or the operator is not finite, or the forward's output failed
        its condition check (NaN in, NaN out is no solver failure). Otherwise a
        solution is NaN from finite input, and the status says why: the reason the
        solver reported through `report_solve`
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
        self._records: list[dict] = []  # appended to by the record callbacks
        self._open = False

    def __enter__(self) -> "SolveLog":
        if self._open:
            raise RuntimeError("SolveLog: this log is already active.")
        start_recording(self._records)
        self._open = True
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            jax.effects_barrier()
        finally:
            stop_recording(self._records)
            self._open = False

    @property
    def entries(self) -> list[SolveLogEntry]:
        """The recorded solves, oldest first (a copy)."""
        if self._open:
            jax.effects_barrier()
        return [SolveLogEntry(**fields) for fields in list(self._records)]

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
    report = current_report()
    if report is None:
        return
    values = {"iterations": iterations, "residual": residual, "reason": reason}
    for name, value in values.items():
        if value is not None:
            report[name] = jnp.asarray(value)


def _reason_code(status) -> Int[Array, ""]:
    """The code of a reported failure reason (index + 1 in `REASONS`); checks the
    names when tracing, with or without a log."""
    flags = {status: True} if isinstance(status, str) else dict(status)
    unknown = [name for name in flags if name not in REASONS]
    if unknown:
        raise ValueError(
            f"implicitdiff.report_solve: unknown status {unknown[0]!r}; expected one "
            f"of {REASONS}."
        )
    code = jnp.zeros((), jnp.int32)
    for name, flag in reversed(flags.items()):  # the first true flag wins
        code = jnp.where(flag, REASONS.index(name) + 1, code)
    return code


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
