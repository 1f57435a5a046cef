"""Certificates that host solvers compute while preparing a matrix, read back without
another solve."""

from collections.abc import Callable

import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, Bool

from .._misc import all_finite, pseudo_random_probe, singular_threshold, size
from ._host_helpers import norms_1_and_inf, row_of_each_value
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
    bound = norms_1_and_inf(csr)[1] * np.max(np.abs(x), initial=0)
    return bool(bound <= singular_threshold(n, csr.dtype) * np.max(np.abs(r)))


def m_matrix_is_credible(csr, run: Callable, smooth: Callable | None = None) -> bool:
    """On the host: whether `A` (`csr`) is proven regular as an M-matrix (up to sign),
    with `κ∞(A)` below `singular_threshold`; False when this cannot tell, and the
    caller then certifies another way.

    A Z-matrix (positive diagonal, no positive entry off it: the discrete diffusion
    operators of elliptic PDEs) that maps some `x ≥ 0` to `A x ≥ m > 0` is a
    nonsingular M-matrix, so `A⁻¹ ≥ 0` and `A⁻¹·1 ≤ x/m`, i.e. `‖A⁻¹‖∞ ≤ ‖x‖∞/m`.
    Any such `x` proves it, however inexact: `run(b, callback)` solves `A x = b` for
    `b = 1` and calls `callback(x)` on every iterate, and the first iterate that
    proves the bound stops it. A residual below 1 in every row is enough, a few
    cycles where a solve to working precision takes about three times as many; and
    unlike a probe's residual, which is tested against a tolerance a singular matrix
    cannot reach, this proof needs no randomness. `m` is reduced by a bound on the
    rounding of `A x`.

    `smooth(x, b)`, if given, returns a smoothed copy of `x` (a Gauss-Seidel sweep):
    it is tried on an iterate whose residual is below 2 in every row, where the last
    rows above 1 are usually local spikes that a sweep removes, a cycle earlier
    than the next iterate would.
    """
    sign = _z_matrix_sign(csr)
    if sign == 0:
        return False
    n = csr.shape[0]
    b = np.full(n, sign, csr.dtype)
    threshold = singular_threshold(n, csr.dtype) / norms_1_and_inf(csr)[1]
    lower = _lower_bound_matrix(csr, sign)

    def lowest_row(x):
        """A lower bound of `min(A x)` (times the sign), NaN unless `x` is finite
        and `≥ 0`."""
        if not (np.all(np.isfinite(x)) and np.all(x >= 0)):
            return np.nan
        return np.min(lower @ x)

    def proves_bound(x, margin) -> bool:
        return bool(margin > 0 and np.max(x) <= threshold * margin)

    def stop_once_proven(x):
        margin = lowest_row(x)
        if proves_bound(x, margin):
            raise _Proven
        if smooth is not None and margin > -1:
            smoothed = smooth(x, b)
            if proves_bound(smoothed, lowest_row(smoothed)):
                raise _Proven

    try:
        x = np.asarray(run(b, stop_once_proven))
    except _Proven:
        return True
    return proves_bound(x, lowest_row(x))


def watched_cg(csr, precondition: Callable, b, callback, rtol: float, max_steps: int):
    """Preconditioned conjugate gradients on `A x = b` (`csr`) from zero, on the host,
    calling `callback(x)` on every iterate *before* paying for the preconditioner
    application that the next one needs (pyamg's own CG calls it after, so a callback
    that ends the run wastes one cycle). For certificates only: it returns the last
    iterate once its recurrence residual is below `rtol·‖b‖` or after `max_steps`,
    and the caller proves whatever it gets. A curvature that is not positive (an `A`
    or a preconditioner that is not SPD) ends it early."""
    x = np.zeros_like(b)
    r = b.copy()
    tolerance = rtol * np.linalg.norm(b)
    z = precondition(r)
    p, rz = z.copy(), np.vdot(r, z)
    for _ in range(max_steps):
        Ap = csr @ p
        curvature = np.vdot(p, Ap)
        if not (curvature > 0 and rz > 0):
            break
        alpha = rz / curvature
        x += alpha * p
        r -= alpha * Ap
        callback(x)
        if np.linalg.norm(r) <= tolerance:
            break
        z = precondition(r)
        rz, rz_old = np.vdot(r, z), rz
        p = z + (rz / rz_old) * p
    return x


class _Proven(Exception):
    """Ends an iterative solve at the first iterate that certifies the matrix."""


def _lower_bound_matrix(csr, sign: int):
    """`C = sign·A − ρ|A|`, with `ρ = 2(k + 1)ε` (`k` the most values in a row): for
    `x ≥ 0`, `C x` computed in floating point is at most the exact `sign·A x`, as its
    rounding (and that of `C`'s values) is below `(k + 1)ε|A|x`. One product per
    iterate instead of two (`A x` and `|A| x`)."""
    row_terms = np.max(np.diff(csr.indptr))
    rounding = 2.0 * (row_terms + 1) * np.finfo(csr.dtype).eps
    lower = csr.copy()
    lower.data = sign * csr.data - rounding * np.abs(csr.data)
    return lower


def _z_matrix_sign(csr) -> int:
    """`1` if `A` is a Z-matrix with a positive diagonal, `-1` if `-A` is, else `0`."""
    if csr.shape[0] == 0 or not np.issubdtype(csr.dtype, np.floating):
        return 0
    off_diagonal = csr.data[row_of_each_value(csr) != csr.indices]
    diagonal = csr.diagonal()
    for sign in (1, -1):
        if np.all(sign * diagonal > 0) and np.all(sign * off_diagonal <= 0):
            return sign
    return 0
