"""Host solvers under jit keep their memory bounded: SuperLU frees a factor only from
the thread that allocated it, and XLA runs callbacks on threads of its choosing."""

import os
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg as sla
from sparse_problems import grid_matrix, linear_solve_loss

import implicitdiff as idf
from implicitdiff._solvers._on_host import HOST_CACHE, HOST_THREAD

jax.config.update("jax_enable_x64", True)

STATM = Path("/proc/self/statm")
pytestmark = [
    pytest.mark.skipif(not STATM.exists(), reason="needs /proc (Linux)"),
    pytest.mark.full_optimisation,
]


def resident_mib() -> float:
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_memory_stays_flat_over_2000_jitted_splu_gradients():
    # Every call has new matrix values: a new factor, and (past the cache's 32
    # entries) an eviction. Before, each evicted factor leaked (~18 KiB per gradient
    # here, 36 MiB over the run, well above the bound; ~3 MiB per gradient at 2304
    # unknowns).
    loss, _, values = linear_solve_loss(idf.SciPy("splu"), grid_matrix(6, 0.3))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    b = jnp.linspace(-1.0, 1.0, 36)
    dense = grid_matrix(6, 0.3).toarray()

    def call(i):
        return grad(values * (1 + 1e-6 * i), b)

    for i in range(2 * HOST_CACHE.max_entries):  # fills the cache: warm-up
        jax.block_until_ready(call(i))
    before = resident_mib()
    for i in range(2000):
        g_values, g_b = call(i)
    g_b.block_until_ready()
    growth = resident_mib() - before
    assert growth < 10, f"resident memory grew by {growth:.1f} MiB"
    # And the gradients are still right: ∂/∂b Σ sin(A⁻¹b) = A⁻ᵀ cos(A⁻¹b).
    matrix = dense * (1 + 1e-6 * 1999)
    x = np.linalg.solve(matrix, np.asarray(b))
    expected = np.linalg.solve(matrix.T, np.cos(x))
    np.testing.assert_allclose(g_b, expected, rtol=1e-10)


def test_factors_live_and_die_on_the_host_thread():
    # What the bound above relies on: preparations and releases happen on one thread.
    threads = set()
    original = sla.splu

    def recording_splu(*args, **kwargs):
        threads.add(threading.get_ident())
        return original(*args, **kwargs)

    loss, _, values = linear_solve_loss(idf.SciPy("splu"), grid_matrix(3))
    grad = jax.jit(jax.grad(loss))
    sla.splu = recording_splu
    try:
        for i in range(3):
            grad(values * (1 + i), jnp.ones(9)).block_until_ready()
    finally:
        sla.splu = original
    assert threads == {HOST_THREAD.run(threading.get_ident)}
