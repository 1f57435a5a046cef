"""Linear solvers that run on the host (SciPy, pyamg) through `jax.pure_callback`.

Two callbacks do all the work, and every host solver plugs a `HostMethod` into them:

- `host_presolve` ships `A` to the host (the stored values of a
  `SparseLinearOperator`, else the dense matrix), prepares it there (a sparse LU, an
  AMG hierarchy, ...) into a bounded LRU cache and returns a small integer handle;
- `host_solve` looks the handle up and solves every right-hand side of a `vmap`
  batch in ONE callback call (`vmap_method="expand_dims"`), grouped by handle.

**Lifetime.** What is prepared lives in `HOST_CACHE`, on `HOST_THREAD` (see
`_host_cache.py`). The solve callback also receives the values, so an evicted entry
(say, after a `vmap` of the presolve over more matrices than the cache holds) is
prepared again rather than lost: eviction costs time, never correctness. (A
preconditioner, applied once per Krylov step, ships large matrices' values only
once: evicted, it falls back to the identity.)

**Failures.** Nothing raises inside a callback and nothing calls JAX there: a
preparation that raises, or non-finite values, marks the entry as failed; a solve that
raises, fails its own test, or returns non-finite values gives NaN for that
right-hand side (or the method's `fallback`).
"""

import hashlib
import math
from collections.abc import Callable, Hashable

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import scipy.sparse as sp
from jaxtyping import Array, PyTree

from .._misc import ravel, unravel
from .._sparse._operator import SparseLinearOperator, SparsityPattern
from ._host_cache import FAILED, HOST_CACHE, HOST_THREAD, quiet


def nan_like(B: np.ndarray) -> np.ndarray:
    return np.full_like(B, np.nan)


class HostMethod(eqx.Module):
    """What a host solver does on the host.

    - `key`: hashable; identifies the preparation (method and options).
    - `prepare(csr) -> (prepared, nbytes)`: may raise (the entry is then failed).
    - `solve(csr, prepared, B) -> X`: `B` and `X` are `(k, n)`, one row per
        right-hand side; a row that is not a solution must be NaN. May raise.
    - `fallback(B) -> X`: what a failed preparation or solve gives (NaN by default;
        a preconditioner returns `B`, the identity).
    """

    key: Hashable = eqx.field(static=True)
    prepare: Callable = eqx.field(static=True)
    solve: Callable = eqx.field(static=True)
    fallback: Callable = eqx.field(static=True, default=nan_like)


class HostState(eqx.Module):
    """The state of a host solver: the handle of the prepared matrix, and the values
    to prepare it again from should it have been evicted."""

    handle: Array  # int32, one per matrix
    values: Array
    pattern: SparsityPattern | None = eqx.field(static=True)
    x_structure: PyTree[jax.ShapeDtypeStruct] = eqx.field(static=True)


def _csr(values: np.ndarray, pattern: SparsityPattern | None):
    """The host matrix, or None when its values are not finite."""
    if not np.all(np.isfinite(values)):
        return None
    if pattern is None:
        return sp.csr_matrix(values)
    return pattern.to_scipy(values)


def _content_key(method, values, pattern):
    # SHA-256: collision-resistant, and the fastest in hashlib on x86 (SHA-NI).
    digest = hashlib.sha256(np.ascontiguousarray(values).data)
    return (method.key, pattern, values.shape, values.dtype.str, digest.digest())


def _prepare_one(method, values, pattern) -> int:
    """The handle of `values` prepared by `method`; 0 (no entry) if even building
    the key fails. Never raises."""
    try:
        key = _content_key(method, values, pattern)
        return HOST_CACHE.put(key, _csr(values, pattern), method.prepare)
    except Exception:
        return 0


def host_matrix(A: lx.AbstractLinearOperator) -> tuple[Array, SparsityPattern | None]:
    """The values to ship to the host: the stored entries of a sparse operator (with
    its static pattern), else the dense matrix."""
    while isinstance(A, lx.TaggedLinearOperator):
        A = A.operator
    if isinstance(A, SparseLinearOperator):
        return A.data, A.pattern
    return A.as_matrix(), None


def host_presolve(method: HostMethod, A: lx.AbstractLinearOperator) -> HostState:
    """Prepares `A` on the host, once per distinct matrix (also under `vmap`)."""
    values, pattern = host_matrix(A)
    core_ndim = 1 if pattern is not None else 2

    def prepare(values):
        batch = values.shape[: values.ndim - core_ndim]
        flat = values.reshape((math.prod(batch),) + values.shape[len(batch) :])
        handles = [_prepare_one(method, v, pattern) for v in flat]
        return np.asarray(handles, np.int32).reshape(batch)

    def callback(values):
        return HOST_THREAD.run(prepare, *_numpy(values))

    handle = jax.pure_callback(
        callback,
        jax.ShapeDtypeStruct((), jnp.int32),
        values,
        vmap_method="expand_dims",
    )
    return HostState(handle, values, pattern, A.in_structure())


def host_solve(
    method: HostMethod, state: HostState, b: PyTree[Array], rebuild: bool = True
) -> PyTree[Array]:
    """Solves with the prepared matrix; a `vmap` batch is one callback call.

    With `rebuild=False` the values are not shipped to the host (a copy that costs
    about as much as one multigrid cycle at 10⁶ unknowns), and a matrix evicted from
    the cache gives the method's `fallback`.
    """
    b_flat = ravel(b)
    dtype = jnp.result_type(state.values.dtype, b_flat.dtype)
    n = b_flat.shape[0]
    pattern = state.pattern

    def solve(handle, values, b):
        batch = np.broadcast_shapes(handle.shape, b.shape[: handle.ndim])
        rhs = np.broadcast_to(b, batch + (n,)).reshape(-1, n).astype(dtype)
        try:
            out = _solve_batch(method, pattern, handle, values, rhs, batch)
        except Exception:  # a bug of ours, not of SciPy's: still never raise
            out = np.full_like(rhs, np.nan)
        return out.reshape(batch + (n,))

    def callback(handle, values, b):
        return HOST_THREAD.run(solve, *_numpy(handle, values, b))

    values = state.values if rebuild else jnp.zeros((0,), state.values.dtype)
    x = jax.pure_callback(
        callback,
        jax.ShapeDtypeStruct((n,), dtype),
        state.handle,
        values,
        b_flat.astype(dtype),
        vmap_method="expand_dims",
    )
    return unravel(x, state.x_structure)


def _numpy(*arrays) -> list[np.ndarray]:
    """The callback's arguments as NumPy arrays (views on CPU). JAX passes
    `jax.Array`s, on which every reshape, slice or iteration is a JAX dispatch:
    ~6 ms per gradient on `sparse_pde_vjp`'s 256² Jacobian."""
    return [np.asarray(array) for array in arrays]


def _solve_batch(method, pattern, handle, values, rhs, batch):
    """Solves the rows of `rhs` (one per element of the `vmap` batch), grouped by
    matrix: one `method.solve` call per distinct handle."""
    handles = np.broadcast_to(handle, batch).ravel()
    core = values.shape[handle.ndim :]
    values = np.broadcast_to(values, batch + core).reshape((len(handles),) + core)
    out = np.empty_like(rhs)
    for h in np.unique(handles):
        rows = np.flatnonzero(handles == h)
        out[rows] = _solve_group(method, int(h), values[rows[0]], pattern, rhs[rows])
    return out


def _solve_group(method, handle, values, pattern, B):
    """Solves the rows of `B` with one prepared matrix. Never raises."""
    try:
        entry = HOST_CACHE.get(handle)
        if entry is None and values.size:  # evicted since the presolve: again
            entry = HOST_CACHE.get(_prepare_one(method, values, pattern))
        if entry is None:
            return method.fallback(B)
        _, csr, prepared, _ = entry
        if prepared is FAILED:
            return method.fallback(B)
        with quiet():
            X = np.array(method.solve(csr, prepared, B), B.dtype).reshape(B.shape)
    except Exception:
        return method.fallback(B)
    bad = ~np.all(np.isfinite(X), axis=1)
    X[bad] = method.fallback(B[bad])
    return X
