"""Certificates that host solvers compute while preparing a matrix, read back without
another solve."""

import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, Bool

from .._misc import all_finite, pseudo_random_probe, singular_threshold, size
from ._on_host import HostMethod, HostState, host_solve


def host_certify(
    method: HostMethod, state: HostState, A: lx.AbstractLinearOperator
) -> Bool[Array, ""]:
    """The regularity flag that `method.prepare` stored as the last element of its
    prepared tuple, read by one callback that solves nothing (it ships `n` zeros and
    gets zeros or NaN back). Through the same cache entry as the solves: an entry
    evicted since the presolve is prepared again, never reported as singular."""
    flag = HostMethod(method.key, method.prepare, _regularity)
    zeros = jnp.zeros(size(A.out_structure()), state.values.dtype)
    return all_finite(host_solve(flag, state, zeros))


def _regularity(csr, prepared, B):
    return np.zeros_like(B) if prepared[-1] else np.full_like(B, np.nan)


def probe_is_credible(csr, solve_rows) -> bool:
    """On the host: whether `A` (`csr`) solves the fixed pseudo-random probe (the one
    of `AbstractLinearSolver.certify`) with a solution that does not prove it
    numerically singular, `‖A‖∞‖x‖∞ ≤ ‖r‖∞/(√n·ε)`. `solve_rows` maps `(k, n)`
    right-hand sides to solutions, NaN where unsolved."""
    n = csr.shape[0]
    r = pseudo_random_probe(n, csr.dtype, np)
    x = np.asarray(solve_rows(r[None]))[0]
    if not np.all(np.isfinite(x)):
        return False
    norm = np.max(np.abs(csr).sum(axis=1)) if csr.nnz else 0.0
    bound = norm * np.max(np.abs(x), initial=0)
    return bool(bound <= singular_threshold(n, csr.dtype) * np.max(np.abs(r)))
