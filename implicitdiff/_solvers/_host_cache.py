"""Where host solvers keep what they prepared (a sparse LU, an AMG hierarchy, ...):
a bounded LRU cache, and the one thread on which those objects live.

**Lifetime.** The prepared objects are keyed by content (method, pattern and a digest
of the values), so a duplicated callback never prepares twice. The cache holds at
most `HOST_CACHE.max_entries` objects and about `HOST_CACHE.max_bytes` bytes; the
oldest go first.

**One host thread.** XLA runs callbacks on threads of its own choosing, and SciPy's
SuperLU frees a factor's memory only from the thread that allocated it (its allocator
keeps a per-thread registry): a factor created in one callback and evicted in another
leaked its memory, ~3 MiB per gradient at 2304 unknowns. So every preparation, solve
and release of a prepared object runs on one dedicated thread (`HOST_THREAD`); the
callbacks hand their work to it and wait. Host work was serialised anyway (see
`quiet`), so this costs one thread hand-off per callback (tens of µs).
"""

import concurrent.futures
import contextlib
import itertools
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np


class _Failed:
    """A preparation that raised or met non-finite values."""


FAILED = _Failed()


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

    def put(self, key: Hashable, csr, prepare: Callable) -> int:
        """Prepares `csr` with `prepare(csr) -> (prepared, nbytes)` unless an entry
        with the same key exists; returns its handle. Never raises."""
        with self._lock:
            handle = self._handles.get(key)
            if handle is not None:
                self._entries.move_to_end(handle)
                return handle
        prepared, nbytes = _prepare(csr, prepare)
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
def quiet():
    """Silences SciPy's and pyamg's warnings (a failure is reported as NaN). The
    warning filters are process-wide and XLA may run callbacks on several threads at
    once, so host work is serialised while they are changed. The warnings are
    recorded and dropped rather than filtered: pyamg's Krylov methods put an "always"
    filter for themselves ahead of any "ignore" on every call."""
    with _QUIET_LOCK, warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        yield


def _prepare(csr, prepare: Callable):
    if csr is None:
        return FAILED, 0
    try:
        with quiet():
            return prepare(csr)
    except Exception:
        return FAILED, 0
