import os

# jaxlib 0.10.0-0.10.2 can deadlock in batched LU (a `vmap` of `Direct`); XLA's older
# CPU scheduler avoids it (benchmarks/README.md, "Known problems"). Set before JAX
# starts its backend; subprocesses inherit it.
_NO_LU_DEADLOCK = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if _NO_LU_DEADLOCK not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_NO_LU_DEADLOCK}"

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_enable_x64", True)
