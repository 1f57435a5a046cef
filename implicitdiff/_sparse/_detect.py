"""Sparsity detection: the nonzero pattern of a linear map, read off its jaxpr.

Every variable of the jaxpr gets the index sets of its elements: which inputs each
element depends on, one set per element in C order. Elementwise primitives take
unions; primitives that move elements around (slices, pads, gathers, ...) gather
sets; reductions and products with a constant combine them (`G @ deps` with a 0/1
matrix `G`). Index sets are never enumerated in Python: narrow ones are an integer
table (one row per element), wide ones a SciPy CSR matrix, and every rule is a few
NumPy or SciPy operations. A 5-point stencil on a 1024² grid takes 0.3 to 0.6 s.

Structural primitives are not re-implemented: each is evaluated on integer arrays
whose entries are the element ids of its operands, and the ids that come out say
where every output element comes from. What it needs besides (gather indices, slice
starts) must be a constant: see `concrete_value`.
"""

import contextlib
import functools as ft
import warnings
from collections.abc import Callable
from typing import NamedTuple, Union

import jax
import numpy as np
import scipy.sparse as sp
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal
from jaxtyping import PyTree

from ._operator import SparsityPattern, sorted_unique

Deps = Union["_Table", sp.csr_array, None]  # None: depends on no input (a constant)


class _NotConstant(Exception):
    """A value a rule needs (gather indices, ...) is not known at trace time."""


def detect_sparsity(
    linear_fn: Callable,
    in_structure: PyTree[jax.ShapeDtypeStruct],
    warn_on_fallback: bool = True,
    stop_on_fallback: bool = False,
) -> SparsityPattern | None:
    """The pattern of the matrix of `linear_fn`, rows and columns in `ravel` order.

    **Arguments:**

    - `linear_fn`: a linear function of a pytree shaped like `in_structure`.
    - `in_structure`: a pytree of `jax.ShapeDtypeStruct`.
    - `warn_on_fallback`: whether a primitive without an exact rule warns.
    - `stop_on_fallback`: whether such a primitive stops the detection (the result
        is then `None`, and nothing dense is built).

    **Returns:**

    A [`implicitdiff.SparsityPattern`][] that contains the true pattern: exactly it
    when every primitive has a rule (see [`implicitdiff.Sparse`][]), more (every
    output element of the primitive depending on every one of its inputs) otherwise,
    with a warning naming the primitive.
    """
    closed = jax.make_jaxpr(linear_fn)(in_structure)
    sizes = [int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(in_structure)]
    n_in = sum(sizes)
    starts = np.cumsum([0] + sizes[:-1])
    in_deps = [
        _identity_rows(start, n, n_in) for start, n in zip(starts, sizes, strict=True)
    ]
    fallbacks = _Stopping() if stop_on_fallback else set()
    try:
        out_deps = _propagate(closed.jaxpr, closed.consts, in_deps, {}, fallbacks)
    except _Stopped:
        return None
    if fallbacks and warn_on_fallback:
        warnings.warn(
            "implicitdiff.Sparse('auto'): no exact sparsity rule for "
            f"{', '.join(sorted(fallbacks))}; every output element of it is taken to "
            "depend on every one of its inputs, so the pattern (and the number of "
            "colours) may be larger than needed. Pass the pattern explicitly to "
            "avoid this.",
            RuntimeWarning,
            stacklevel=2,
        )
    avals = [a.aval for a in closed.jaxpr.outvars]
    out_deps = [
        _empty(_size(aval), n_in) if d is None else d
        for d, aval in zip(out_deps, avals, strict=True)
    ]
    matrix = _as_csr(_stack(out_deps, avals))
    return SparsityPattern._from_csr(matrix.indptr, matrix.indices, matrix.shape)


class _Stopped(Exception):
    """A primitive without an exact rule, with `stop_on_fallback`."""


class _Stopping(set):
    """The set of fallback primitives that stops at the first: `_apply` adds to it
    outside its `try`, so that the exception is not taken for a failed rule."""

    def add(self, name):
        raise _Stopped(name)


def _propagate(jaxpr: Jaxpr, consts, in_deps, in_sources, fallbacks) -> list[Deps]:
    """Runs the rules through `jaxpr`; `in_sources` give invars' constant values."""
    sources = {
        var: ft.partial(concrete_value, const)
        for var, const in zip(jaxpr.constvars, consts, strict=True)
    }
    scope = _Scope(jaxpr, {**sources, **in_sources})
    deps = dict(zip(jaxpr.invars, in_deps, strict=True))

    def read(atom):
        return None if isinstance(atom, Literal) else deps.get(atom)

    for eqn in jaxpr.eqns:
        ins = [read(atom) for atom in eqn.invars]
        if all(d is None for d in ins) or not eqn.outvars:
            continue
        deps.update(zip(eqn.outvars, _apply(eqn, ins, scope, fallbacks), strict=True))
    return [read(atom) for atom in jaxpr.outvars]


def _apply(eqn, ins, scope, fallbacks) -> list[Deps]:
    name = eqn.primitive.name
    try:
        if name in _CALLS:
            return _call(eqn, ins, scope, fallbacks)
        if name in _RULES:
            return _RULES[name](eqn, ins, scope)
    except Exception:  # a value that is not constant, or a case no rule covers
        pass
    fallbacks.add(name)
    return _conservative(eqn, ins)


class _Scope:
    """The constant values of a jaxpr's variables, computed on demand."""

    def __init__(self, jaxpr: Jaxpr, sources: dict):
        self.eqns = jaxpr.eqns
        self.sources = sources
        self.values = {}

    def value(self, atom) -> np.ndarray:
        if isinstance(atom, Literal):
            return np.asarray(atom.val)
        if atom not in self.values:
            self.values[atom] = _fold(atom, self.eqns, self._source)
        if self.values[atom] is None:
            raise _NotConstant
        return self.values[atom]

    def _source(self, var):
        get = self.sources.get(var)
        return None if get is None else get()


def _fold(var, eqns, source) -> np.ndarray | None:
    """Evaluates `var` from `eqns` if it depends only on sources with known values."""
    values = _fold_all([var], eqns, source)
    return None if values is None else np.asarray(values[0])


def _fold_all(targets, eqns, source) -> list | None:
    """The values of `targets` (atoms of `eqns`), or None if one is not known.

    Only what they need is evaluated: a call (`jit`, ...) whose other outputs depend
    on unknowns, as the primal half of `jnp.take` or `jnp.convolve` that computes the
    gather indices (a residual of the linearisation) next to the gathered values, is
    sliced to the outputs needed, and evaluated equation by equation inside.
    """
    sliced = _slice(targets, eqns)
    if sliced is None:
        return None
    chain, needed = sliced
    env = {}
    for v in needed:
        env[v] = source(v)
        if env[v] is None:
            return None
    read = lambda a: a.val if isinstance(a, Literal) else env[a]  # noqa: E731
    for eqn, wanted in chain:
        if eqn.primitive.name in _CALLS:
            jaxpr, consts = _inner(eqn)
            inner_env = dict(zip(jaxpr.constvars, consts, strict=True))
            for inner, outer in zip(jaxpr.invars, eqn.invars, strict=True):
                if isinstance(outer, Literal) or outer in env:
                    inner_env[inner] = read(outer)
            outs = [jaxpr.outvars[i] for i in wanted]
            values = _fold_all(outs, jaxpr.eqns, inner_env.get)
            if values is None:
                return None
            env.update(zip([eqn.outvars[i] for i in wanted], values, strict=True))
        else:
            args = [read(a) for a in eqn.invars]
            env.update(zip(eqn.outvars, _evaluate(eqn, args), strict=True))
    return [read(a) for a in targets]


def _slice(targets, eqns) -> tuple[list, set] | None:
    """The equations that `targets` depend on, in order, each with the indices of
    its outputs needed, and the variables they read that no equation computes; None
    if an equation needed has effects."""
    needed = {a for a in targets if not isinstance(a, Literal)}
    chain = []
    for eqn in reversed(eqns):
        wanted = [i for i, v in enumerate(eqn.outvars) if v in needed]
        if not wanted:
            continue
        if eqn.effects:
            return None
        inputs = _needed_inputs(eqn, wanted)
        if inputs is None:
            return None
        chain.append((eqn, wanted))
        needed.difference_update(eqn.outvars)
        needed.update(a for a in inputs if not isinstance(a, Literal))
    return chain[::-1], needed


def _needed_inputs(eqn, wanted) -> list | None:
    """The inputs of `eqn` that its outputs `wanted` depend on: all of them, except
    for a call, whose body says."""
    if eqn.primitive.name not in _CALLS:
        return list(eqn.invars)
    jaxpr, _ = _inner(eqn)
    sliced = _slice([jaxpr.outvars[i] for i in wanted], jaxpr.eqns)
    if sliced is None:
        return None
    needed = sliced[1]
    return [
        outer
        for inner, outer in zip(jaxpr.invars, eqn.invars, strict=True)
        if inner in needed
    ]


def concrete_value(x) -> np.ndarray | None:
    """The value of a constant of the jaxpr, or None if it is not known.

    Under `jit` (or inside `custom_linear_solve`) the constants of the linearised
    conditions are tracers of the enclosing trace, even an index array that came from
    NumPy: its conversion was staged out. The enclosing trace still holds how it was
    computed, so it is folded here from the trace's own constants. This reads JAX
    internals (`DynamicJaxprTracer._trace.frame`); any failure means "not known",
    and the rule that needed the value falls back to a conservative pattern.
    """
    if not isinstance(x, jax.core.Tracer):
        return np.asarray(x)
    try:
        if getattr(x, "batch_dim", 0) is None:  # unbatched under vmap
            return concrete_value(x.val)
        if hasattr(x, "primal"):
            # Under differentiation only integer values are safe to read: a float
            # constant's zeros could carry a nonzero tangent.
            is_int = not np.issubdtype(np.dtype(x.dtype), np.inexact)
            return concrete_value(x.primal) if is_int else None
        frame = x._trace.frame
        const = x.get_const()
        if const is not None:
            return concrete_value(const)

        def source(var):
            const = frame.constvar_to_val.get(var)
            return None if const is None else concrete_value(const)

        return _fold(x.val, frame.get_eqns(), source)
    except Exception:
        return None


def _evaluate(eqn, args, **param_updates) -> list:
    """Runs one equation on concrete arguments, even while tracing."""
    params = eqn.primitive.get_bind_params({**eqn.params, **param_updates})
    # Older JAX returns (subfuns, params), newer JAX only params.
    subfuns, params = params if isinstance(params, tuple) else ((), params)
    with jax.ensure_compile_time_eval():
        out = eqn.primitive.bind(*subfuns, *args, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


# Index sets -------------------------------------------------------------------------

# Narrow index sets are a table: one column per element, listing the inputs it
# depends on, padded with -1, repeats allowed. Gathering columns and taking unions
# (stacking tables) are then single NumPy operations on small integer arrays; with
# the elements along the last axis, a union copies whole rows. A table is cleaned
# (sorted, repeats dropped) when it grows wider than this, and index sets that stay
# wider, or that a reduction mixes, are SciPy CSR matrices of booleans.
_WIDEST_TABLE = 32


class _Table(NamedTuple):
    cols: np.ndarray  # (width, number of elements), -1 for nothing
    n_in: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.cols.shape[1], self.n_in)


def _index_dtype(n_in: int):
    return np.int32 if n_in < 2**31 else np.int64


def _empty(n_rows: int, n_in: int) -> _Table:
    return _Table(np.empty((0, n_rows), _index_dtype(n_in)), n_in)


def _identity_rows(start: int, n_rows: int, n_in: int) -> _Table:
    cols = np.arange(start, start + n_rows, dtype=_index_dtype(n_in))
    return _Table(cols[None, :], n_in)


def _as_csr(deps: Deps) -> sp.csr_array:
    """The index sets as a boolean CSR matrix with sorted indices."""
    if isinstance(deps, sp.csr_array):
        return deps
    cols = np.sort(deps.cols.T, axis=1)
    cols[:, 1:][cols[:, 1:] == cols[:, :-1]] = -1  # repeats
    kept = cols >= 0
    indptr = np.concatenate([[0], np.cumsum(np.count_nonzero(kept, axis=1))])
    matrix = sp.csr_array(
        (np.ones(indptr[-1], bool), cols[kept], indptr), shape=deps.shape
    )
    matrix.has_sorted_indices = True
    return matrix


def _narrowed(matrix: sp.csr_array) -> Deps:
    """A table again, if no row of `matrix` has more than `_WIDEST_TABLE` entries."""
    lengths = np.diff(matrix.indptr)
    if lengths.max(initial=0) > _WIDEST_TABLE:
        return matrix
    rows = np.repeat(np.arange(matrix.shape[0]), lengths)
    cols = np.full((lengths.max(initial=0), matrix.shape[0]), -1)
    cols[np.arange(rows.size) - matrix.indptr[rows], rows] = matrix.indices
    return _Table(cols.astype(_index_dtype(matrix.shape[1])), matrix.shape[1])


def _union(a: Deps, b: Deps) -> Deps:
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, _Table) and isinstance(b, _Table):
        union = _Table(np.concatenate([a.cols, b.cols]), a.n_in)
        return (
            union if union.cols.shape[0] <= _WIDEST_TABLE else _narrowed(_as_csr(union))
        )
    return _narrowed(_as_csr(a).maximum(_as_csr(b)))  # SciPy's fastest boolean union


def _combine(deps: Deps, out_rows, in_rows, n_out: int) -> Deps:
    """Row `i` of the result is the union of the rows `in_rows[out_rows == i]`."""
    out_rows, in_rows = np.ravel(out_rows), np.ravel(in_rows)
    mixing = sp.csr_array(
        (np.ones(out_rows.size, bool), (out_rows, in_rows)),
        shape=(n_out, deps.shape[0]),
    )
    combined = mixing @ _as_csr(deps)
    combined.sort_indices()
    return _narrowed(combined)


def _select(deps: Deps, src) -> Deps:
    """Row `k` of the result is row `src[k]` of `deps`, or empty where `src[k] < 0`."""
    src = np.ravel(src)
    taken = np.maximum(src, 0)
    if isinstance(deps, _Table):
        cols = np.take(deps.cols, taken, axis=1)  # C order, unlike `cols[:, taken]`
        cols[:, src < 0] = -1
        return _Table(cols, deps.n_in)
    lengths = np.where(src >= 0, np.diff(deps.indptr)[taken], 0)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    # Position in `deps.indices` of each output entry: its row's start there, plus
    # its rank within the row.
    shift = np.repeat(deps.indptr[taken] - indptr[:-1], lengths)
    positions = shift + np.arange(indptr[-1])
    result = sp.csr_array(
        (deps.data[positions], deps.indices[positions], indptr),
        shape=(src.size, deps.shape[1]),
    )
    result.has_sorted_indices = True
    return result


def _stack(ins, avals) -> Deps:
    n_in = next(d for d in ins if d is not None).shape[1]
    parts = [
        _empty(_size(a), n_in) if d is None else d
        for d, a in zip(ins, avals, strict=True)
    ]
    if not all(isinstance(p, _Table) for p in parts):
        return sp.vstack([_as_csr(p) for p in parts], format="csr")
    width = max(p.cols.shape[0] for p in parts)
    padded = [
        np.pad(p.cols, ((0, width - p.cols.shape[0]), (0, 0)), constant_values=-1)
        for p in parts
    ]
    return _Table(np.concatenate(padded, axis=1), n_in)


def _size(aval) -> int:
    return int(np.prod(aval.shape))


def _ids(start: int, shape, total: int | None = None) -> np.ndarray:
    """Consecutive element ids from `start`, in the smallest integer dtype JAX takes."""
    n = int(np.prod(shape))
    dtype = np.int32 if (total or n) + start < 2**31 - 1 else np.int64
    return np.arange(start, start + n, dtype=dtype).reshape(shape)


def _avals(atoms):
    return [a.aval for a in atoms]


# Rules --------------------------------------------------------------------------


def _conservative(eqn, ins) -> list[Deps]:
    """Every output element depends on every input element of every operand."""
    n_in = next(d for d in ins if d is not None).shape[1]
    every = sorted_unique(
        np.concatenate([_as_csr(d).indices for d in ins if d is not None])
    ).astype(_index_dtype(n_in))
    return [_repeated(every, _size(v.aval), n_in) for v in eqn.outvars]


def _repeated(index_set: np.ndarray, n_rows: int, n_in: int) -> Deps:
    """`n_rows` copies of one sorted index set."""
    if index_set.size <= _WIDEST_TABLE:
        return _Table(np.repeat(index_set[:, None], n_rows, axis=1), n_in)
    nnz = n_rows * index_set.size
    # One index dtype for both arrays, or SciPy converts the larger one to int64.
    indptr = np.arange(0, nnz + 1, max(index_set.size, 1), dtype=_index_dtype(nnz))
    index_set = index_set.astype(indptr.dtype)
    matrix = sp.csr_array(
        (np.ones(nnz, bool), np.tile(index_set, n_rows), indptr),
        shape=(n_rows, n_in),
    )
    matrix.has_sorted_indices = True
    return matrix


def _elementwise(eqn, ins, scope) -> list[Deps]:
    shape = eqn.outvars[0].aval.shape
    result = None
    for d, atom in zip(ins, eqn.invars, strict=True):
        if d is not None and atom.aval.shape != shape:  # broadcast (size-1 axes)
            own = np.arange(d.shape[0]).reshape(atom.aval.shape)
            d = _select(d, np.broadcast_to(own, shape))
        result = _union(result, d)
    return [result] * len(eqn.outvars)


def _same(eqn, ins, scope) -> list[Deps]:
    """Primitives that keep the elements in place (a reshape, a dtype change)."""
    return [ins[0]]


def _moves(*copied: int, numpy: Callable | None = None) -> Callable:
    """A rule for a primitive whose outputs are copies of elements of the operands at
    positions `copied` (all when none are given) or of nothing; its other operands
    must be constants.

    The primitive runs on element ids (1-based, 0 for "nothing"), so its own
    semantics (strides, negative padding, clamped starts, out-of-bound modes) decide;
    `numpy(eqn, *args)`, when given, does the same in NumPy, without compiling.
    """

    def rule(eqn, ins, scope):
        avals = _avals(eqn.invars)
        moved = [i for i in copied if i < len(avals)] or list(range(len(avals)))
        sizes = [_size(avals[i]) for i in moved]
        starts = np.cumsum([1] + sizes[:-1])
        args = [None] * len(avals)
        for i, start in zip(moved, starts, strict=True):
            args[i] = _ids(start, avals[i].shape, total=sum(sizes))
        for i, atom in enumerate(eqn.invars):
            if args[i] is None:
                args[i] = scope.value(atom)
        updates = {}
        if eqn.params.get("mode") == lax.GatherScatterMode.FILL_OR_DROP:
            updates["fill_value"] = 0
        ids = [numpy(eqn, *args)] if numpy else _evaluate(eqn, args, **updates)
        stacked = _stack([ins[i] for i in moved], [avals[i] for i in moved])
        return [_select(stacked, np.asarray(out) - 1) for out in ids]

    return rule


def _np_slice(eqn, x):
    strides = eqn.params["strides"] or (1,) * x.ndim
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    return x[tuple(map(slice, starts, limits, strides))]


def _np_broadcast_in_dim(eqn, x):
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    kept = [x.shape[dims.index(d)] if d in dims else 1 for d in range(len(shape))]
    return np.broadcast_to(x.reshape(kept), shape)


def _select_n(eqn, ins, scope) -> list[Deps]:
    try:
        scope.value(eqn.invars[0])
    except _NotConstant:  # the predicate is only known at run time: any case
        return _elementwise(eqn, ins, scope)
    return _moves(*range(1, len(ins)))(eqn, ins, scope)


def _scatter(eqn, ins, scope) -> list[Deps]:
    """`operand.at[indices].add(updates)` and friends: each output element depends on
    the operand's element there and on the updates scattered to it.

    (For `.set`, the overwritten operand elements are kept: conservative.)
    """
    operand, indices, updates = eqn.invars[:3]
    dnums = eqn.params["dimension_numbers"]
    shape = operand.aval.shape
    window = iter(dnums.update_window_dims)
    slice_sizes = [
        1
        if d in dnums.inserted_window_dims or d in dnums.operand_batching_dims
        else updates.aval.shape[next(window)]
        for d in range(len(shape))
    ]
    # The transpose of scattering is gathering: it sends every update to its target.
    gather_dnums = lax.GatherDimensionNumbers(
        offset_dims=dnums.update_window_dims,
        collapsed_slice_dims=dnums.inserted_window_dims,
        start_index_map=dnums.scatter_dims_to_operand_dims,
        operand_batching_dims=dnums.operand_batching_dims,
        start_indices_batching_dims=dnums.scatter_indices_batching_dims,
    )
    ids = _ids(1, shape)
    with jax.ensure_compile_time_eval():
        target = lax.gather(
            ids,
            scope.value(indices),
            gather_dnums,
            tuple(slice_sizes),
            mode=eqn.params["mode"],
            fill_value=0,
        )
    result = ins[0]
    if ins[2] is not None:
        target = np.ravel(np.asarray(target)) - 1
        hit = np.flatnonzero(target >= 0)
        result = _union(result, _combine(ins[2], target[hit], hit, ids.size))
    return [result]


def _reduce(eqn, ins, scope) -> list[Deps]:
    shape = eqn.invars[0].aval.shape
    axes = eqn.params["axes"]
    kept = tuple(1 if d in axes else n for d, n in enumerate(shape))
    out_of = np.broadcast_to(np.arange(int(np.prod(kept))).reshape(kept), shape)
    return [_combine(ins[0], out_of, np.arange(out_of.size), int(np.prod(kept)))]


def _cumulative(eqn, ins, scope) -> list[Deps]:
    shape = eqn.invars[0].aval.shape
    axis = eqn.params["axis"]
    ids = np.moveaxis(np.arange(int(np.prod(shape))).reshape(shape), axis, -1)
    ids = ids.reshape(-1, shape[axis])
    later, earlier = np.tril_indices(shape[axis])
    if eqn.params["reverse"]:
        later, earlier = earlier, later
    return [_combine(ins[0], ids[:, later], ids[:, earlier], ids.size)]


def _dot_general(eqn, ins, scope) -> list[Deps]:
    """Each output element mixes the elements of one operand that meet a structural
    nonzero of the other (all of them when the other is not a known constant)."""
    (contract, batch) = eqn.params["dimension_numbers"]
    n_out = _size(eqn.outvars[0].aval)
    result = None
    for side in (0, 1):
        if ins[side] is None:
            continue
        other = eqn.invars[1 - side]
        try:
            if ins[1 - side] is not None:
                raise _NotConstant
            nonzero = scope.value(other) != 0
        except _NotConstant:
            nonzero = np.ones(other.aval.shape, bool)
        pairs = _dot_pairs(eqn.invars[side].aval.shape, nonzero, contract, batch, side)
        result = _union(result, _combine(ins[side], *pairs, n_out))
    return [result]


def _dot_pairs(shape, nonzero, contract, batch, side):
    """(output element, element of operand `side`) pairs that a dot_general links."""
    own_c, other_c = contract[side], contract[1 - side]
    own_b, other_b = batch[side], batch[1 - side]
    own_free = [d for d in range(len(shape)) if d not in own_c + own_b]
    other_free = [d for d in range(nonzero.ndim) if d not in other_c + other_b]
    ids = np.arange(int(np.prod(shape))).reshape(shape)
    ids = ids.transpose(list(own_b) + own_free + list(own_c))
    n_b, n_own, n_c = (
        int(np.prod(ids.shape[: len(own_b)])),
        int(np.prod([shape[d] for d in own_free])),
        int(np.prod([shape[d] for d in own_c])),
    )
    ids = ids.reshape(n_b, n_own, n_c)
    mask = nonzero.transpose(list(other_b) + list(other_c) + other_free)
    mask = mask.reshape(n_b, n_c, -1)
    n_other = mask.shape[2]
    b, c, o = (i[:, None] for i in np.nonzero(mask))
    t = np.arange(n_own)[None, :]
    # Output order: batch, then lhs free, then rhs free.
    out = (b * n_own + t) * n_other + o if side == 0 else (b * n_other + o) * n_own + t
    return out, ids[b, t, c]


def _conv(eqn, ins, scope) -> list[Deps]:
    """`conv_general_dilated` (any number of spatial dimensions, strides, padding,
    dilations, feature groups): each output element mixes the input elements under
    the structural nonzeros of its window of the other operand (all of its entries
    when that is not a known constant), as in `_dot_general`."""
    if eqn.params["batch_group_count"] != 1:
        raise NotImplementedError  # met only in the transposes of grouped convs
    specs = eqn.params["dimension_numbers"]
    # Element ids in canonical layouts: lhs (N, C, *S), rhs (O, I, *K), out (N, O, *P).
    lhs, rhs, out = (
        np.arange(_size(atom.aval)).reshape(atom.aval.shape).transpose(spec)
        for atom, spec in zip(
            (*eqn.invars, eqn.outvars[0]),
            (specs.lhs_spec, specs.rhs_spec, specs.out_spec),
            strict=True,
        )
    )
    source = _window_sources(eqn.params, lhs.shape[2:], rhs.shape[2:], out.shape[2:])
    lhs, rhs, out = (ids.reshape(ids.shape[:2] + (-1,)) for ids in (lhs, rhs, out))
    per_group = rhs.shape[0] // eqn.params["feature_group_count"]
    result = None
    for side in (0, 1):
        if ins[side] is None:
            continue
        masks = [np.ones(lhs.shape, bool), np.ones(rhs.shape, bool)]
        if ins[1 - side] is None:
            with contextlib.suppress(_NotConstant):
                spec = (specs.lhs_spec, specs.rhs_spec)[1 - side]
                nonzero = scope.value(eqn.invars[1 - side]) != 0
                masks[1 - side] = nonzero.transpose(spec).reshape(masks[1 - side].shape)
        # One term per stored kernel entry (output feature o, input feature i,
        # window offset k), batch element n and output position p whose window
        # offset k reads an element s of input feature c.
        o, i, k = np.nonzero(masks[1])
        c = o // per_group * rhs.shape[1] + i
        reads = source[:, k].T >= 0
        n, t, p = np.nonzero(np.broadcast_to(reads, (len(lhs),) + reads.shape))
        o, i, k, c = o[t], i[t], k[t], c[t]
        s = source[p, k]
        kept = masks[0][n, c, s]
        operand = lhs[n, c, s] if side == 0 else rhs[o, i, k]
        pairs = out[n, o, p][kept], operand[kept]
        result = _union(result, _combine(ins[side], *pairs, _size(eqn.outvars[0].aval)))
    return [result]


def _window_sources(params, spatial, window, out) -> np.ndarray:
    """`sources[p, k]`: the flat spatial index of the input element that window offset
    `k` of output position `p` reads, or −1 where it reads padding or a hole of the
    input dilation."""
    sources = np.zeros((1, 1), np.int64)
    for axis, (n, m, p) in enumerate(zip(spatial, window, out, strict=True)):
        dilation = params["lhs_dilation"][axis]
        at = (
            np.arange(p)[:, None] * params["window_strides"][axis]
            + np.arange(m)[None, :] * params["rhs_dilation"][axis]
            - params["padding"][axis][0]
        )
        inside = (at >= 0) & (at % dilation == 0) & (at // dilation < n)
        along = np.where(inside, at // dilation, -1)[None, :, None, :]
        before = sources[:, None, :, None]
        sources = np.where(
            (before >= 0) & (along >= 0), before * n + along, -1
        ).reshape(sources.shape[0] * p, sources.shape[1] * m)
    return sources


def _call(eqn, ins, scope, fallbacks) -> list[Deps]:
    jaxpr, consts = _inner(eqn)
    sources = {
        var: ft.partial(_value_or_none, scope, atom)
        for var, atom in zip(jaxpr.invars, eqn.invars, strict=True)
    }
    return _propagate(jaxpr, consts, ins, sources, fallbacks)


def _inner(eqn) -> tuple[Jaxpr, list]:
    """The body of a call and its constants."""
    inner = next(
        eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in eqn.params
    )
    if isinstance(inner, ClosedJaxpr):
        return inner.jaxpr, inner.consts
    return inner, []


def _value_or_none(scope, atom):
    try:
        return scope.value(atom)
    except _NotConstant:
        return None


_CALLS = frozenset(
    {
        "jit",
        "pjit",
        "closed_call",
        "core_call",
        "remat",
        "remat2",
        "checkpoint",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
    }
)

_ELEMENTWISE = (
    "abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp "
    "complex conj cos cosh div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag "
    "integer_pow is_finite le log log1p logistic lt max min mul ne neg nextafter not "
    "or pow real reduce_precision rem round rsqrt sign sin sinh sqrt square sub tan "
    "tanh xor"
).split()

_RULES: dict[str, Callable] = {
    **{name: _elementwise for name in _ELEMENTWISE},
    "convert_element_type": _same,
    "copy": _same,
    "copy_p": _same,
    "squeeze": _same,
    "reshape": lambda eqn, ins, scope: (
        _same(eqn, ins, scope)
        if eqn.params.get("dimensions") is None
        else _moves(0)(eqn, ins, scope)
    ),
    "broadcast_in_dim": _moves(0, numpy=_np_broadcast_in_dim),
    "transpose": _moves(0, numpy=lambda eqn, x: x.transpose(eqn.params["permutation"])),
    "rev": _moves(0, numpy=lambda eqn, x: np.flip(x, eqn.params["dimensions"])),
    "tile": _moves(0, numpy=lambda eqn, x: np.tile(x, eqn.params["reps"])),
    "slice": _moves(0, numpy=_np_slice),
    "concatenate": _moves(
        numpy=lambda eqn, *xs: np.concatenate(xs, eqn.params["dimension"])
    ),
    **{name: _moves(0) for name in ("split", "dynamic_slice", "gather")},
    "pad": _moves(0, 1),
    "dynamic_update_slice": _moves(0, 1),
    "select_n": _select_n,
    "scatter-add": _scatter,
    "scatter_add": _scatter,
    "scatter-sub": _scatter,
    "scatter_sub": _scatter,
    "scatter": _scatter,
    **{name: _reduce for name in ("reduce_sum", "reduce_max", "reduce_min")},
    **{
        name: _cumulative
        for name in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")
    },
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
}
