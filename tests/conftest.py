import os

# jaxlib 0.10.0-0.10.2 can deadlock in batched LU (a `vmap` of `Direct`); XLA's older
# CPU scheduler avoids it (benchmarks/README.md, "Known problems"). Set before JAX
# starts its backend; subprocesses inherit it.
_NO_LU_DEADLOCK = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if _NO_LU_DEADLOCK not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_NO_LU_DEADLOCK}"

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_enable_x64", True)

# The files that take longest (pytest --durations=0 under xdist), started first: with
# `--dist loadfile` each file runs on one worker, and a long one left for the end
# would run on one core while the other waits.
_SLOWEST_FIRST = [
    "test_trust.py",
    "test_implicit_function.py",
    "test_sparse_representation.py",
    "test_krylov_solvers.py",
    "test_sharding.py",
    "test_properties.py",
    "test_solve_log.py",
    "test_conditions.py",
    "test_diagonal.py",
    "test_user_edge.py",
    "test_distributed.py",
]

# Most of the suite's time is XLA compiling programs that then run for microseconds.
# In these files XLA's optimisations cannot change what is tested (derivatives of
# small problems against references), so they compile with most of them off (about
# 20 % less time). Everything else runs as users run it, at full optimisation: past
# bugs lived there (XLA:CPU's max reduction dropped NaN above ~4100 elements), so the
# files about refusing wrong derivatives (test_trust, test_user_edge, test_robustness,
# test_failure_policy, test_properties, test_diagonal…), the subprocess suites whose
# compiled programs are inspected, and, inside these files, every test marked
# `full_optimisation` (NaN results, reductions, large sizes) keep them.
_FEWER_OPTIMISATIONS = {
    "test_amg.py",
    "test_argmin.py",
    "test_conditions.py",
    "test_host.py",
    "test_implicit_function.py",
    "test_krylov_solvers.py",
    "test_pde.py",
    "test_projections.py",
    "test_scipy_solver.py",
    "test_solve_log.py",
    "test_solver_interface.py",
    "test_sparse_detection.py",
    "test_sparse_representation.py",
}


def _fewer_optimisations(item) -> bool:
    return (
        item.path.name in _FEWER_OPTIMISATIONS
        and item.get_closest_marker("full_optimisation") is None
    )


def pytest_collection_modifyitems(items):
    # Within a file, the fully optimised tests first: one switch per file at most.
    rank = {name: i for i, name in enumerate(_SLOWEST_FIRST)}
    items.sort(
        key=lambda item: (
            rank.get(item.path.name, len(rank)),
            str(item.path),
            _fewer_optimisations(item),
        )
    )


def pytest_runtest_setup(item):
    wanted = _fewer_optimisations(item)
    if jax.config.read("jax_disable_most_optimizations") != wanted:
        # The setting is not part of JAX's cache keys: a program compiled with fewer
        # optimisations would be reused at full optimisation (the other way round is
        # harmless).
        if not wanted:
            jax.clear_caches()
        jax.config.update("jax_disable_most_optimizations", wanted)
