"""Linear solvers that run on the host (SciPy, pyamg) through `jax.pure_callback`.

Two callbacks do all the work, and every host solver plugs a `HostMethod` into them:

- `host_presolve` ships `A` to the host (the stored values of a
  `SparseLinearOperator`, else the dense matrix), prepares it there (a sparse LU, an
  AMG hierarchy, ...) into a bounded LRU cache and returns a small integer handle;
- `host_solve` looks the handle up and solves every right-hand side of a `vmap`
  batch in ONE callback call (`vmap_method="expand_dims"`), grouped by handle.

**Lifetime.** The prepared objects are keyed by content (method, pattern and a digest
of the values), so a duplicated callback never prepares twice. The cache holds at
most `HOST_CACHE.max_entries` objects and about `HOST_CACHE.max_bytes` bytes; the
oldest go first. The solve callback also receives the values, so an evicted entry
(say, after a `vmap` of the presolve over more matrices than the cache holds) is
prepared again rather than lost: eviction costs time, never correctness. (A
preconditioner, applied once per Krylov step, ships large matrices' values only
once: evicted, it falls back to the identity.)

**One host thread.** XLA runs callbacks on threads of its own choosing, and SciPy's
SuperLU frees a factor's memory only from the thread that allocated it (its allocator
keeps a per-thread registry): a factor created in one callback and evicted in another
leaked its memory, ~3 MiB per gradient at 2304 unknowns. So every preparation, solve
and release of a prepared object runs on one dedicated thread (`HOST_THREAD`); the
callbacks hand their work to it and wait. Host work was serialised anyway (see
`_quiet`), so this costs one thread hand-off per callback (tens of µs).

**Failures.** Nothing raises inside a callback and nothing calls JAX there: a
preparation that raises, or non-finite values, marks the entry as failed; a solve that
raises, fails its own test, or returns non-finite values gives NaN for that
right-hand side (or the method's `fallback`).
"""

import concurrent.futures
import contextlib
import hashlib
import itertools
import math
import threading
import warnings
from collections import OrderedDict
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


class _Failed:
    """A preparation that raised or met non-finite values."""


_FAILED = _Failed()


class _HostThread:
    """The one thread on which prepared objects are created, used and released."""

    def __init__(self):
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="implicitdiff-host"
        )
        self._thread_id = self._executor.submit(threading.get_ident).result()

    def run(self, fn: Callable, *args):
        """`fn(*args)`, run on the host thread (at once when already on it)."""
        if threading.get_ident() == self._thread_id:
            return fn(*args)
        return self._executor.submit(fn, *args).result()


HOST_THREAD = _HostThread()


class HostCache:
    """A thread-safe LRU of prepared matrices, by handle and by content key. Entries
    are dropped on the host thread, where SuperLU can free them (see the module)."""

    def __init__(self, max_entries: int = 32, max_bytes: int = 2**31):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries = OrderedDict()  # handle -> (key, csr, prepared, nbytes)
        self._handles = {}  # key -> handle
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self.preparations = 0  # how many times `prepare` ran (tests count it)

    def __len__(self):
        return len(self._entries)

    def clear(self) -> None:
        HOST_THREAD.run(self._clear)

    def _clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._handles.clear()

    def get(self, handle: int):
        with self._lock:
            entry = self._entries.get(handle)
            if entry is not None:
                self._entries.move_to_end(handle)
            return entry

    def put(self, key: Hashable, csr, method: HostMethod) -> int:
        """Prepares `csr` unless an entry with the same key exists; returns its
        handle. Never raises."""
        with self._lock:
            handle = self._handles.get(key)
            if handle is not None:
                self._entries.move_to_end(handle)
                return handle
        prepared, nbytes = _prepare(csr, method)
        with self._lock:
            self.preparations += 1
            handle = next(self._counter) % np.iinfo(np.int32).max or 1
            nbytes += 0 if csr is None else csr.data.nbytes
            self._entries[handle] = (key, csr, prepared, nbytes)
            self._handles[key] = handle
            self._evict()
        return handle

    def _evict(self):
        total = sum(entry[3] for entry in self._entries.values())
        while len(self._entries) > 1 and (
            len(self._entries) > self.max_entries or total > self.max_bytes
        ):
            _, (key, _, _, nbytes) = self._entries.popitem(last=False)
            del self._handles[key]
            total -= nbytes


HOST_CACHE = HostCache()


_QUIET_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet():
    """Silences SciPy's and pyamg's warnings (a failure is reported as NaN). The
    warning filters are process-wide and XLA may run callbacks on several threads at
    once, so host work is serialised while they are changed. The warnings are
    recorded and dropped rather than filtered: pyamg's Krylov methods put an "always"
    filter for themselves ahead of any "ignore" on every call."""
    with _QUIET_LOCK, warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        yield


def _prepare(csr, method):
    if csr is None:
        return _FAILED, 0
    try:
        with _quiet():
            return method.prepare(csr)
    except Exception:
        return _FAILED, 0


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
        return HOST_CACHE.put(key, _csr(values, pattern), method)
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
        return HOST_THREAD.run(prepare, values)

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
        return HOST_THREAD.run(solve, handle, values, b)

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
        if prepared is _FAILED:
            return method.fallback(B)
        with _quiet():
            X = np.array(method.solve(csr, prepared, B), B.dtype).reshape(B.shape)
    except Exception:
        return method.fallback(B)
    bad = ~np.all(np.isfinite(X), axis=1)
    X[bad] = method.fallback(B[bad])
    return X


def iterate_to_tolerance(
    run: Callable, csr, b: np.ndarray, rtol: float, atol: float, refinements: int = 2
) -> np.ndarray:
    """Runs an iterative method `run(b) -> (x, info)` (from a zero initial guess) and
    accepts `x` only when the TRUE residual meets `‖b − A x‖ ≤ atol + rtol‖b‖` (the
    test of the JAX Krylov solvers).

    What a method tests (a recurrence residual, or a preconditioned one, as pyamg's
    Krylov methods do) can be below its tolerance while the true residual is not.
    Rather than widen the tolerance, a solve that missed it is refined: `run` solves
    `A d = r` for the true residual `r`, whose relative tolerance is then relative to
    `‖r‖` (at most `refinements` times). A method that reports no convergence
    (`info ≠ 0`) fails at once, so its `maxiter` is a real cap. Returns NaN when not
    accepted.
    """
    tolerance = atol + rtol * np.linalg.norm(b)
    x = np.zeros_like(b)
    r = b
    for _ in range(1 + refinements):
        if np.linalg.norm(r) <= tolerance:
            return x
        correction, info = run(r)
        if info != 0 or not np.all(np.isfinite(correction)):
            break
        x = x + correction
        r = b - csr @ x
    if np.linalg.norm(r) <= tolerance:
        return x
    return np.full_like(b, np.nan)


def csr_nbytes(matrix) -> int:
    """The memory held by a SciPy CSR/CSC matrix."""
    return int(matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes)


class _FrozenDict(tuple):
    """A dict option in a hashable form (solver options are static under jit)."""


class _FrozenList(tuple):
    """A list option in a hashable form, given back as a list."""


def freeze(options: dict) -> tuple:
    """Keyword options as a hashable tuple; nested dicts and lists are frozen too
    (`splu(options={...})`, pyamg's `("name", {...})` and per-level lists)."""

    def frozen(value):
        if isinstance(value, dict):
            return _FrozenDict(sorted((k, frozen(v)) for k, v in value.items()))
        if isinstance(value, list):
            return _FrozenList(frozen(v) for v in value)
        if isinstance(value, tuple):
            return type(value)(frozen(v) for v in value)
        return value

    return frozen(dict(options))


def thaw(options: tuple) -> dict:
    """The keyword options `freeze` froze."""

    def thawed(value):
        if isinstance(value, _FrozenDict):
            return {k: thawed(v) for k, v in value}
        if isinstance(value, _FrozenList):
            return [thawed(v) for v in value]
        if isinstance(value, tuple):
            return tuple(thawed(v) for v in value)
        return value

    return thawed(options)


def check_hashable(name: str, options: tuple) -> None:
    try:
        hash(options)
    except TypeError as e:
        raise TypeError(
            f"{name}: options must be hashable (they are static under jit); got "
            f"{thaw(options)!r}."
        ) from e
