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
    "test_sharding.py",
    "test_krylov_solvers.py",
    "test_properties.py",
    "test_distributed.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
