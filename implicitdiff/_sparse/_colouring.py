"""Column colouring: which columns of a sparse matrix one JVP recovers together.

Columns that share no row are structurally orthogonal: seeding all of them at once
in one JVP gives each of their entries, unmixed, in its own row. A distance-2
colouring of the columns (a colouring of the column intersection graph `SᵀS`)
groups them; its number of colours is the number of JVPs.
"""

import functools as ft
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from ._operator import SparsityPattern, sorted_unique

# Greedy in index order is exact but takes one vectorised round per level of its
# dependency graph: ~3·n_x levels on a 2D grid, but n on a tridiagonal pattern. Past
# this many rounds the rest is coloured in a blocked order with fewer levels.
_MAX_ROUNDS = 8192
_BLOCK = 4096


class ColumnColouring(NamedTuple):
    """`colours[j]` is the colour of column `j`, in `range(n_colours)`."""

    colours: np.ndarray
    n_colours: int


@ft.lru_cache(maxsize=8)
def column_colouring(pattern: SparsityPattern) -> ColumnColouring:
    """A distance-2 colouring of the columns of `pattern`, computed once per pattern.

    Greedy, in the order of the column indices: for discretised PDEs this follows the
    grid, and gives the periodic colourings of a sequential sweep (7 colours for the
    5-point stencil, 9 for the 9-point one, 13 for the 3D 7-point one; largest-first
    gives the same on regular grids, where all degrees tie). Vectorised in NumPy
    (Jones–Plassmann rounds over the index order), about a second for 10⁶ columns.

    **Arguments:**

    - `pattern`: an [`implicitdiff.SparsityPattern`][].

    **Returns:**

    A `ColumnColouring(colours, n_colours)`.
    """
    colours = _greedy_colouring(pattern)
    return ColumnColouring(colours.astype(np.int32), int(colours.max(initial=-1)) + 1)


def _greedy_colouring(pattern: SparsityPattern) -> np.ndarray:
    graph = _column_intersection_graph(pattern)
    n = graph.shape[0]
    colours = np.full(n, -1, np.int64)
    _colour_in_order(graph, colours, np.arange(n), _MAX_ROUNDS)
    rest = np.flatnonzero(colours < 0)
    if rest.size:
        _colour_in_order(graph, colours, _blocked_order(graph, rest), None)
    return colours


def _column_intersection_graph(pattern: SparsityPattern) -> sp.csr_array:
    """Columns `j ≠ k` are adjacent when some row holds both."""
    ones = np.ones(pattern.nnz, bool)
    matrix = sp.csr_array((ones, pattern.cols, pattern.indptr), shape=pattern.shape)
    graph = sp.csr_array(matrix.T @ matrix)
    graph.setdiag(False)
    graph.eliminate_zeros()
    return graph


def _colour_in_order(graph, colours, priority, max_rounds) -> None:
    """Greedy colouring of the uncoloured vertices in increasing `priority`.

    Each round colours every vertex whose higher-priority neighbours are all coloured
    (they are never adjacent to one another) with the smallest colour its neighbours
    lack: exactly the sequential greedy result, one vectorised round per level.
    """
    indptr, indices = graph.indptr, graph.indices
    rows = np.repeat(np.arange(graph.shape[0]), np.diff(indptr))
    waiting = (colours[rows] < 0) & (colours[indices] < 0)
    waiting &= priority[indices] < priority[rows]
    blockers = np.bincount(rows[waiting], minlength=graph.shape[0])
    ready = np.flatnonzero((blockers == 0) & (colours < 0))
    rounds = 0
    while ready.size and (max_rounds is None or rounds < max_rounds):
        rounds += 1
        neighbours, lengths = _neighbours(indptr, indices, ready)
        colours[ready] = _smallest_absent(colours[neighbours], lengths)
        owner_priority = np.repeat(priority[ready], lengths)
        unblocked = neighbours[
            (colours[neighbours] < 0) & (priority[neighbours] > owner_priority)
        ]
        np.subtract.at(blockers, unblocked, 1)
        ready = sorted_unique(unblocked[blockers[unblocked] == 0])


def _neighbours(indptr, indices, vertices):
    """The neighbours of `vertices`, listed one vertex after the other."""
    starts = indptr[vertices]
    lengths = indptr[vertices + 1] - starts
    offsets = np.cumsum(lengths) - lengths
    positions = np.repeat(starts - offsets, lengths) + np.arange(lengths.sum())
    return indices[positions], lengths


def _smallest_absent(neighbour_colours, lengths) -> np.ndarray:
    """Per vertex, the smallest colour `≥ 0` missing from its neighbours' colours
    (listed `lengths[i]` per vertex; `-1` = uncoloured)."""
    owner = np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)
    coloured = neighbour_colours >= 0
    bound = int(neighbour_colours.max(initial=0)) + 2
    key = sorted_unique(owner[coloured] * bound + neighbour_colours[coloured])
    owner, colour = key // bound, key % bound
    first = np.searchsorted(owner, np.arange(lengths.size))
    rank = np.arange(key.size) - first[owner]
    # Sorted and distinct, a vertex's colours equal their ranks up to the first gap.
    result = np.bincount(owner, minlength=lengths.size)
    gap = colour != rank
    np.minimum.at(result, owner[gap], rank[gap])
    return result


def _blocked_order(graph, vertices) -> np.ndarray:
    """A priority with few levels: `vertices` cut into blocks of consecutive indices,
    swept in lockstep (the t-th vertex of every block, then the (t+1)-th, ...).

    The block length avoids index offsets at which the graph has edges, so that
    vertices of the same step are rarely adjacent.
    """
    n = vertices.size
    position = np.full(graph.shape[0], -1)
    position[vertices] = np.arange(n)
    rows = np.repeat(np.arange(graph.shape[0]), np.diff(graph.indptr))
    a, b = position[rows], position[graph.indices]
    offsets = np.zeros(n + 1, bool)
    offsets[np.abs(a - b)[(a >= 0) & (b >= 0)]] = True
    block = max(_BLOCK, -(-n // 256))
    if block < n:
        block = min(
            range(block, block + 64),
            key=lambda length: offsets[np.arange(length, n, length)].sum(),
        )
    priority = np.zeros(graph.shape[0], np.int64)
    p = np.arange(n)
    priority[vertices] = (p % block) * (n // block + 1) + p // block
    return priority
