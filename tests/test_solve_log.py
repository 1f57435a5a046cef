"""SolveLog: what it records (under jit, vmap and every derivative), and what it costs
when no log is active."""

import threading
import time

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import implicitdiff as idf

jax.config.update("jax_enable_x64", True)

# A non-symmetric, well-conditioned linear problem: c(x, y) = M y − x, so y = M⁻¹ x,
# a JVP solves M ẏ = ẋ and the gradient of sum(y) is the VJP solution u = M⁻ᵀ 1.
M = jnp.asarray(np.eye(4) * 3 + np.random.default_rng(0).normal(size=(4, 4)) / 2)


def linear(solver=None, on_failure="nan", counter=None):
    def forward(x):
        if counter is not None:
            counter.append(1)  # runs once per trace
        return jnp.linalg.solve(M, x)

    return idf.ImplicitFunction(
        forward,
        lambda x, y: M @ y - x,
        linear_solver=solver or idf.Direct(),
        on_failure=on_failure,
    )


def total(f):
    return lambda x: jnp.sum(f(x))


X = jnp.arange(1.0, 5.0)


def test_records_direction_size_batch_under_every_transform():
    f = linear()
    with idf.SolveLog() as log:
        jax.jit(jax.grad(total(f)))(X)
        jax.jit(jax.jacfwd(f))(X)
        jax.jit(jax.jacrev(f))(X)
        # The cotangent 2y depends on x, so three systems are batched.
        squares = lambda x: jnp.sum(f(x) ** 2)
        jax.jit(jax.vmap(jax.grad(squares)))(jnp.stack([X, 2 * X, 3 * X]))
        jax.jit(jax.hessian(total(f)))(X)
    rows = [(e.direction, e.size, e.batch, e.dtype) for e in log.entries]
    assert rows[:4] == [
        ("VJP", 4, 1, "float64"),
        ("JVP", 4, 4, "float64"),  # one batched solve per jacfwd, not one per column
        ("VJP", 4, 4, "float64"),
        ("VJP", 4, 3, "float64"),
    ]
    assert len(rows) > 4  # and the solves of the hessian, not checked in detail
    for e in log:
        assert e.solver == "Direct" and e.iterations is None
        assert e.status == "converged" and e.residual < 1e-14
        assert 0 <= e.presolve_time < 10 and 0 <= e.solve_time < 10


def test_residual_and_iterations_of_an_inexact_iterative_solve():
    # A loose GMRES that stops well before n steps: the logged residual must be the
    # true one of the solution it returned, recomputed with NumPy from the gradient
    # u = M⁻ᵀ 1.
    n = 30
    big = np.eye(n) * 3 + np.random.default_rng(1).normal(size=(n, n)) / np.sqrt(n)
    f = idf.ImplicitFunction(
        lambda x: jnp.linalg.solve(big, x),
        lambda x, y: big @ y - x,
        linear_solver=idf.GMRES(rtol=1e-3, atol=0.0),
    )
    with idf.SolveLog() as log:
        u = np.asarray(jax.jit(jax.grad(total(f)))(jnp.ones(n)))
    (entry,) = log.entries
    ones = np.ones(n)
    expected = np.linalg.norm(ones - big.T @ u) / np.linalg.norm(ones)
    assert 1e-8 < expected < 1e-3
    np.testing.assert_allclose(entry.residual, expected, rtol=1e-6)
    assert entry.solver == "GMRES" and 1 <= entry.iterations < n


def test_iterations_match_krylov_theory():
    # diag(1, 2, 3, 1, 2, 3): three distinct eigenvalues, so GMRES solves Aᵀu = 1 in
    # exactly three steps.
    d = jnp.array([1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    f = idf.ImplicitFunction(
        lambda x: x / d, lambda x, y: d * y - x, linear_solver=idf.GMRES()
    )
    with idf.SolveLog() as log:
        jax.jit(jax.grad(total(f)))(jnp.ones(6))
    assert [e.iterations for e in log] == [3]
    assert "n/a" not in str(log)


@pytest.mark.parametrize(
    "solver, status",
    [
        (idf.Direct(), "singular"),
        (idf.GMRES(max_steps=1), "not converged"),
    ],
    ids=["Direct", "GMRES"],
)
@pytest.mark.full_optimisation
def test_failed_status(solver, status):
    singular = jnp.array([[1.0, 2.0], [2.0, 4.0]])
    f = idf.ImplicitFunction(  # y = x does not solve the conditions: unchecked
        lambda x: x,
        lambda x, y: singular @ y - x,
        linear_solver=solver,
        on_failure="nan",
        check_conditions=None,
    )
    with idf.SolveLog() as log:
        g = jax.jit(jax.grad(total(f)))(jnp.ones(2))
    assert bool(jnp.all(jnp.isnan(g)))
    (entry,) = log.entries
    assert entry.status == status and np.isnan(entry.residual)


@pytest.mark.full_optimisation
def test_non_finite_input_status():
    f = linear()
    vjp = jax.jit(lambda v: jax.vjp(f, X)[1](v))
    with idf.SolveLog() as log:
        vjp(jnp.array([jnp.nan, 1.0, 1.0, 1.0]))
        vjp(jnp.ones(4))
    assert [e.status for e in log] == ["non-finite input", "converged"]


def test_entry_recorded_before_raise_policy_aborts():
    f = linear(idf.Direct(), on_failure="raise")
    singular = idf.ImplicitFunction(  # y = x does not solve 0·y = x: unchecked
        lambda x: x,
        lambda x, y: jnp.zeros((2, 2)) @ y - x,
        on_failure="raise",
        check_conditions=None,
    )
    with pytest.raises(Exception, match="did not solve"):
        with idf.SolveLog() as log:
            jax.jit(jax.grad(total(singular)))(jnp.ones(2)).block_until_ready()
    assert [e.status for e in log] == ["singular"]
    with idf.SolveLog() as log:  # the failed run left nothing stale behind
        jax.jit(jax.grad(total(f)))(X)
    assert [e.status for e in log] == ["converged"]


def test_no_callback_without_a_log_and_one_trace_per_mode():
    traces = []
    f = linear(counter=traces)
    grad = jax.jit(jax.grad(total(f)))
    expected = np.asarray(grad(X))
    traces_outside = len(traces)
    # Traced before the log: the log is part of the jit cache key, so the first call
    # inside retraces (with callbacks) and records; later logs reuse that trace.
    for _ in range(2):
        with idf.SolveLog() as log:
            np.testing.assert_allclose(grad(X), expected, rtol=1e-14)
        assert len(log) == 1
    assert len(traces) == 2 * traces_outside
    grad(X)  # outside again: the cached trace without callbacks, no retrace
    assert len(traces) == 2 * traces_outside
    assert "callback" not in str(jax.make_jaxpr(jax.grad(total(f)))(X))
    with idf.SolveLog():
        assert "pure_callback" in str(jax.make_jaxpr(jax.grad(total(f)))(X))


def test_ahead_of_time_compiled_program_records_only_if_compiled_inside():
    f = linear()
    compiled_outside = jax.jit(jax.grad(total(f))).lower(X).compile()
    with idf.SolveLog() as log:
        compiled_outside(X)
        compiled_inside = jax.jit(jax.grad(total(f))).lower(X).compile()
        compiled_inside(X)
    assert len(log) == 1


def test_nested_logs_and_entries_visible_without_blocking():
    f = linear()
    grad = jax.jit(jax.grad(total(f)))
    with idf.SolveLog() as outer:
        grad(X)
        with idf.SolveLog() as inner:
            grad(2 * X)  # not blocked on: leaving the log waits for the callbacks
        grad(3 * X)
    assert len(inner) == 1 and len(outer) == 3
    with pytest.raises(RuntimeError, match="already active"):
        with outer:
            with outer:
                pass


def test_times_follow_the_work_under_jit():
    # A solver whose presolve sleeps 0.2 s and whose solve sleeps 0.1 s on the host, in
    # callbacks that depend on the data: the log must attribute each to its phase.
    def sleep_then(seconds):
        def host(a):
            time.sleep(seconds)
            return a

        return lambda a: jax.pure_callback(
            host, jax.ShapeDtypeStruct(a.shape, a.dtype), a
        )

    class Sleepy(idf.AbstractLinearSolver):
        def presolve(self, A, y):
            return sleep_then(0.2)(A.as_matrix())

        def solve(self, state, b):
            return sleep_then(0.1)(jnp.linalg.solve(state, b))

    with idf.SolveLog() as log:
        jax.jit(jax.grad(total(linear(Sleepy()))))(X)
    (entry,) = log.entries
    # The presolve phase includes the default regularity certificate: one more solve.
    assert 0.3 <= entry.presolve_time < 0.4
    assert 0.1 <= entry.solve_time < 0.2


def test_table_and_pytree_float32_entries():
    def forward(x):
        return {"a": jnp.sqrt(x), "b": x**2}

    def conditions(x, y):
        return {"a": y["a"] ** 2 - x, "b": y["b"] - x**2}

    f = idf.ImplicitFunction(
        forward, conditions, linear_solver=idf.Lineax(lx.QR()), on_failure="nan"
    )
    x = jnp.array([1.0, 4.0, 9.0], jnp.float32)
    with idf.SolveLog() as log:
        jax.jit(
            jax.grad(lambda x: sum(jnp.sum(leaf) for leaf in jax.tree.leaves(f(x))))
        )(x)
    (entry,) = log.entries
    assert (entry.size, entry.dtype, entry.solver) == (6, "float32", "Lineax(QR)")
    lines = str(log).splitlines()
    assert lines[0].split() == [
        "#", "solver", "dir", "size", "batch", "iters", "residual", "status",
        "presolve", "solve",
    ]  # fmt: skip
    assert lines[1].split()[:6] == ["0", "Lineax(QR)", "VJP", "6", "1", "n/a"]
    assert "converged" in lines[1]
    assert str(idf.SolveLog()) == "SolveLog: no solves recorded."


def test_each_thread_records_only_its_own_solves():
    # Two threads, each with a log open at the same time, one solve in one and two in
    # the other: 1 and 2 entries (each used to get all 3). The callbacks run on XLA's
    # threads, so this also checks that the caller's logs travel with the program.
    grad = jax.jit(jax.grad(total(linear())))
    both_open = threading.Barrier(2)
    counts, sizes = {}, {}

    def work(name, calls):
        with idf.SolveLog() as log:
            both_open.wait()
            for k in range(calls):
                grad((k + 1) * X).block_until_ready()
            both_open.wait()  # both logs still open while the other thread works
        counts[name], sizes[name] = len(log), {e.size for e in log}

    threads = [
        threading.Thread(target=work, args=(n, c)) for n, c in [("a", 1), ("b", 2)]
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts == {"a": 1, "b": 2} and sizes == {"a": {4}, "b": {4}}


def test_nested_logs_left_out_of_order():
    # Leaving the outer log first must not stop the inner one, and once both are left
    # nothing is recorded and no callback is traced.
    traces = []
    f = linear(counter=traces)
    grad = jax.jit(jax.grad(total(f)))
    outer, inner = idf.SolveLog(), idf.SolveLog()
    outer.__enter__()
    inner.__enter__()
    grad(X)
    outer.__exit__(None, None, None)
    grad(2 * X)
    inner.__exit__(None, None, None)
    grad(3 * X)
    assert (len(outer), len(inner)) == (1, 2)
    assert "callback" not in str(jax.make_jaxpr(jax.grad(total(f)))(X))
    # A new log reuses the trace made inside the first ones: no retrace.
    traced = len(traces)
    with idf.SolveLog() as again:
        grad(4 * X)
    assert len(again) == 1 and len(traces) == traced


class Richardson(idf.AbstractLinearSolver):
    """x ← x + ω (b − A x): converges iff the spectral radius of I − ωA is below 1."""

    omega: float
    report: bool = True

    def presolve(self, A, y):
        return A

    def solve(self, A, b):
        def unfinished(carry):
            x, k = carry
            return (jnp.linalg.norm(b - A.mv(x)) > 1e-12) & (k < 50)

        def step(carry):
            x, k = carry
            return x + self.omega * (b - A.mv(x)), k + 1

        x, k = jax.lax.while_loop(unfinished, step, (jnp.zeros_like(b), 0))
        residual = jnp.linalg.norm(b - A.mv(x)) / jnp.linalg.norm(b)
        converged = residual <= 1e-12
        if self.report:
            idf.report_solve(
                iterations=k, residual=residual, status={"not converged": ~converged}
            )
        return jnp.where(converged, x, jnp.nan)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.full_optimisation
def test_custom_solver_reports_iterations_residual_and_reason(dtype):
    # A = diag(1, 2): Richardson with ω = 0.5 converges (I − ωA has radius 1/2), with
    # ω = 1.5 it diverges (radius 2). The gradient of Σ y is A⁻¹ 1 = (1, 1/2).
    d = jnp.array([1.0, 2.0], dtype)
    tolerance = 1e-12 if dtype == jnp.float64 else 1e-5

    def gradient(solver):
        f = idf.ImplicitFunction(
            lambda x: x / d, lambda x, y: d * y - x, solver, on_failure="nan"
        )
        return jax.jit(jax.grad(total(f)))(jnp.ones(2, dtype))

    with idf.SolveLog() as log:
        good = gradient(Richardson(0.5))
        bad = gradient(Richardson(1.5))
        silent = gradient(Richardson(1.5, report=False))
    np.testing.assert_allclose(good, [1.0, 0.5], rtol=tolerance)
    assert bool(jnp.all(jnp.isnan(bad))) and bool(jnp.all(jnp.isnan(silent)))
    converged, diverged, unreported = log.entries
    assert converged.status == "converged" and converged.solver == "Richardson"
    assert 10 <= converged.iterations < 50 and converged.solver_residual <= 1e-12
    # Diverged: 50 steps, the residual of the last iterate grew like 2⁵⁰.
    assert diverged.status == "not converged" and diverged.iterations == 50
    assert diverged.solver_residual > 1e10 and np.isnan(diverged.residual)
    # A solver that says nothing is not accused of meeting a singular matrix.
    assert unreported.status == "failed" and unreported.iterations is None
    assert unreported.solver_residual is None
    assert "not converged" in str(log) and "failed" in str(log)


@pytest.mark.full_optimisation
def test_core_rejection_is_logged_as_singular():
    # A plain dense solve of a numerically singular matrix returns a huge finite x
    # and reports nothing; the library's checks (certificate, κ bound) reject it.
    class PlainSolve(idf.AbstractLinearSolver):
        def presolve(self, A, y):
            return A.as_matrix()

        def solve(self, matrix, b):
            return jnp.linalg.solve(matrix, b)

    # Aᵀu = (1, 0) has |u| ≈ 1/ε: proof that κ(A) > 1/(√n·ε).
    eps = float(jnp.finfo(jnp.float64).eps)
    nearly = jnp.array([[1.0, 1.0], [1.0, 1.0 + eps]])
    f = idf.ImplicitFunction(  # y = x does not solve the conditions: unchecked
        lambda x: x,
        lambda x, y: nearly @ y - x,
        PlainSolve(),
        on_failure="nan",
        check_conditions=None,
    )
    with idf.SolveLog() as log:
        g = jax.jit(jax.grad(lambda x: f(x)[0]))(jnp.ones(2))
    assert bool(jnp.all(jnp.isnan(g)))
    assert [e.status for e in log] == ["singular"]


@pytest.mark.full_optimisation
def test_krylov_breakdown_is_told_from_non_convergence():
    # A = [[0, 1], [1, 0]] is regular but indefinite: for v = (1, 0), CG's first
    # curvature pᵀAp is 0, a breakdown at once; GMRES solves it (u = (0, 1)).
    swap = jnp.array([[0.0, 1.0], [1.0, 0.0]])

    def vjp(solver):
        f = idf.ImplicitFunction(
            lambda x: swap @ x, lambda x, y: swap @ y - x, solver, on_failure="nan"
        )
        return jax.jit(lambda v: jax.vjp(f, jnp.ones(2))[1](v)[0])

    with idf.SolveLog() as log:
        broken = vjp(idf.CG())(jnp.array([1.0, 0.0]))
        solved = vjp(idf.GMRES())(jnp.array([1.0, 0.0]))
    assert bool(jnp.all(jnp.isnan(broken)))
    np.testing.assert_allclose(solved, [0.0, 1.0], atol=1e-12)
    assert [(e.solver, e.status) for e in log] == [
        ("CG", "breakdown"),
        ("GMRES", "converged"),
    ]
    assert log[0].iterations == 0 and log[1].iterations >= 1


@pytest.mark.full_optimisation
def test_batched_reports_are_reduced_over_the_batch():
    # vmap over three right-hand sides of a regular system: one entry, the largest
    # step count (Richardson on diag(1, 2) with ω = 0.5 from different b).
    d = jnp.array([1.0, 2.0])
    f = idf.ImplicitFunction(
        lambda x: x / d, lambda x, y: d * y - x, Richardson(0.5), on_failure="nan"
    )
    with idf.SolveLog() as log:
        J = jax.jit(jax.jacrev(f))(jnp.ones(2))
    np.testing.assert_allclose(J, jnp.diag(1 / d), rtol=1e-12)
    (entry,) = log.entries
    assert entry.batch == 2 and entry.status == "converged" and entry.iterations > 10


def test_unknown_status_is_an_error_when_tracing():
    class Confused(Richardson):
        def solve(self, A, b):
            idf.report_solve(status="exploded")
            return b

    f = idf.ImplicitFunction(lambda x: x, lambda x, y: y - x, Confused(0.5))
    with pytest.raises(ValueError, match="unknown status 'exploded'"):
        jax.grad(total(f))(jnp.ones(2))  # with or without a log


@pytest.mark.parametrize("solver", [idf.Direct(), idf.GMRES(), idf.SciPy("splu")])
def test_linear_solve_records_converged_solves_as_converged(solver):
    # Every linear_solve entry said "non-finite input": a default flag was the
    # Python True, and `~True` is -2, which is truthy.
    from jax.experimental import sparse

    A = sparse.BCOO.fromdense(jnp.array([[4.0, 1.0], [1.0, 3.0]]))
    with idf.SolveLog() as log:
        x = idf.linear_solve(A, jnp.array([1.0, 2.0]), solver)
        grad = jax.grad(lambda b: jnp.sum(idf.linear_solve(A, b, solver)))(x)
    jax.block_until_ready(grad)
    assert len(log.entries) >= 2
    assert {entry.status for entry in log.entries} == {"converged"}
