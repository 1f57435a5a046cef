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
