import os

# Most of the suite's time is XLA compiling programs that then run for microseconds.
# By default the tests compile with XLA:CPU's older fusion emitters and, except where
# marked `full_optimisation`, without its backend (LLVM) optimisations: about half
# the compile time, and neither changes what a program computes (XLA's NaN-dropping
# max reduction, the one codegen behaviour the library works around, is the same
# either way). The marked tests are where code generation could matter (large sizes,
# NaN in reductions, memory); `make test-as-users` (CI runs it after `make test`)
# runs them again compiled exactly as users compile, with
# IMPLICITDIFF_TEST_AS_USERS=1, which also turns both off for a whole run.
AS_USERS = os.environ.get("IMPLICITDIFF_TEST_AS_USERS") == "1"
_FLAGS = [
    # jaxlib 0.10.0-0.10.2 can deadlock in batched LU (a `vmap` of `Direct`); XLA's
    # older CPU scheduler avoids it (benchmarks/README.md, "Known problems").
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    *([] if AS_USERS else ["--xla_cpu_use_fusion_emitters=false"]),
]
# Set before JAX starts its backend; the subprocess suites inherit them, and compile
# without backend optimisations too unless AS_USERS.
for _flag in _FLAGS:
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}"
if not AS_USERS:
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_enable_x64", True)

# The files that take longest (pytest --durations=0 under xdist), started first: with
# `--dist loadfile` each file runs on one worker, and a long one left for the end
# would run on one core while the other waits.
_SLOWEST_FIRST = [
    "test_trust.py",
    "test_implicit_function.py",
    "test_user_edge.py",
    "test_krylov_solvers.py",
    "test_sparse_representation.py",
    "test_sharding.py",
    "test_distributed.py",
    "test_solve_log.py",
    "test_conditions.py",
    "test_properties.py",
]


def _fewer_optimisations(item) -> bool:
    return not AS_USERS and item.get_closest_marker("full_optimisation") is None


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
