"""What the host methods of the SciPy and pyamg solvers share, on the host: solving
to the true residual, the memory a matrix holds, and options in a hashable form."""

from collections.abc import Callable

import numpy as np


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

    The method runs on `b·2⁻ᵉ` with `max|b·2⁻ᵉ|` in [½, 1) (exact): with a `b` of
    10⁻²² in float32 the squares in its norms were subnormal, their sums lost their
    digits, and a wrong `x` passed both tests; above 10¹⁹ they overflowed.
    """
    down, up = _powers_of_two(b)
    b = b * down
    tolerance = atol * down + rtol * np.linalg.norm(b)
    x = np.zeros_like(b)
    r = b
    for _ in range(1 + refinements):
        if np.linalg.norm(r) <= tolerance:
            return x * up
        correction, info = run(r)
        if info != 0 or not np.all(np.isfinite(correction)):
            break
        x = x + correction
        r = b - csr @ x
    if np.linalg.norm(r) <= tolerance:
        return x * up
    return np.full_like(b, np.nan)


def _powers_of_two(b: np.ndarray) -> tuple[np.generic, np.generic]:
    """`(2⁻ᵉ, 2ᵉ)` in `b`'s real dtype, with `max|b| = m·2ᵉ`, `m` in [½, 1) (1 and 1
    for a zero or non-finite `b`); `e` clipped to ±¾ of the dtype's largest
    exponent, so that both are normal numbers and scaling by them is exact."""
    real = np.finfo(b.dtype).dtype
    largest = np.max(np.abs(b), initial=0.0)
    exponent = int(np.frexp(largest)[1]) if np.isfinite(largest) else 0
    limit = np.finfo(real).maxexp * 3 // 4
    exponent = min(max(exponent, -limit), limit)
    return real.type(np.ldexp(1.0, -exponent)), real.type(np.ldexp(1.0, exponent))


def norms_1_and_inf(csr) -> tuple[np.floating, np.floating]:
    """`(‖A‖₁, ‖A‖∞)`, NaN if a value is NaN; zeros for an empty matrix. From the
    stored values directly: a third of the time of SciPy's `abs(csr)` and its sums
    (0.5 against 1.6 ms at 65 536 rows)."""
    if not csr.nnz:
        return 0.0, 0.0
    magnitude = np.abs(csr.data)
    column_sums = np.bincount(csr.indices, magnitude, minlength=csr.shape[1])
    row_sums = np.bincount(row_of_each_value(csr), magnitude, minlength=csr.shape[0])
    return np.max(column_sums), np.max(row_sums)


def row_of_each_value(csr) -> np.ndarray:
    """The row index of each stored value of a CSR matrix, aligned with `indices`."""
    return np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))


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
