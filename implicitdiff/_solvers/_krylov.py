"""What the Krylov solvers share: defaults, validation, the flattened operator and
preconditioner, the restart loop and the true-residual acceptance check.

Each solver ([`implicitdiff.CG`][], [`implicitdiff.GMRES`][],
[`implicitdiff.BiCGStab`][]) only writes one *cycle*: iterate from a given `x` and its
true residual until its own residual estimate is below the tolerance, it breaks down,
or it runs out of steps. The loop here restarts cycles from the true residual
`b − A x` until that residual passes, so a residual estimate that drifted from the
truth (rounding, a breakdown) costs a restart, never a wrong answer.
"""

import abc
import contextlib
import contextvars
import numbers
from collections.abc import Callable, Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int, PyTree

from .. import _solve_log as solve_log
from .._misc import (
    at_least_32_bit,
    binary_exponent,
    nan_unless,
    ravel,
    size,
    unravel,
)
from ._base import AbstractLinearSolver
from ._preconditioner import AbstractPreconditioner

# Relative tolerance by the width of the floating-point type, about ε^(2/3): tight
# enough for derivatives, loose enough to be reached by a problem with a condition
# number of ~10⁵ (float64) or ~10² (float32), whose attainable residual is ~ε·κ·‖b‖.
_DEFAULT_RTOL = {64: 1e-10, 32: 1e-5, 16: 1e-2}

# Without convergence a solve costs max_steps iterations: 10·n allows for rounding
# on small problems, the cap keeps a hopeless large one from running for hours.
MAX_STEPS_PER_UNKNOWN = 10
MAX_STEPS_CAP = 10_000

DEFAULTS_DOC = """`rtol=None` means `1e-10` in float64, `1e-5` in float32 (`1e-2` in
16-bit floats, whose iterations run in float32). A `y` mixing precisions is solved as
one vector of the widest dtype, only as accurate as its least precise leaf: give that
leaf's `rtol` explicitly.
`atol=None` means `0`: a positive `atol` accepts `x = 0` for every right-hand side with
`‖b‖ ≤ atol`, which for the arbitrary scale of a tangent or cotangent would be a
silently wrong derivative. `max_steps=None` means `min(10·n, 10 000)` for `n`
unknowns."""

FlatFn = Callable[[Float[Array, " n"]], Float[Array, " n"]]


def default_rtol(A: lx.AbstractLinearOperator) -> float:
    """The relative tolerance used when `rtol=None`: that of the least precise leaf of
    A's structures, which bounds the attainable residual of a mixed-precision pytree,
    or of the unknowns a flattened system came from (`flattened_from`)."""
    leaves = jax.tree.leaves((A.in_structure(), A.out_structure()))
    dtypes = [leaf.dtype for leaf in leaves] + list(_FLATTENED_FROM.get())
    return max(_DEFAULT_RTOL[jnp.finfo(dtype).bits] for dtype in dtypes)


_FLATTENED_FROM: contextvars.ContextVar[tuple] = contextvars.ContextVar(
    "implicitdiff_flattened_from", default=()
)


@contextlib.contextmanager
def flattened_from(dtypes: tuple) -> Iterator[None]:
    """While tracing a system flattened to one dtype from leaves of `dtypes` (float32
    and float64 leaves solved as one float64 vector), the default tolerances are
    those of the least precise of them: the float32 part of the operator cannot
    reach a float64 residual, and GMRES failed in reverse mode only."""
    token = _FLATTENED_FROM.set(tuple(dtypes))
    try:
        yield
    finally:
        _FLATTENED_FROM.reset(token)


def default_max_steps(n: int) -> int:
    """The step limit used when `max_steps=None`, for `n` unknowns."""
    return max(1, min(MAX_STEPS_PER_UNKNOWN * n, MAX_STEPS_CAP))


def check_tolerances(name: str, rtol, atol, max_steps) -> None:
    """Raises a clear error for a tolerance or step limit that cannot be meant."""
    for label, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, numbers.Real)
        ):
            raise TypeError(
                f"{name}: `{label}` must be a float or None, got {value!r}."
            )
    if rtol is not None and not 0 <= rtol < 1:
        raise ValueError(
            f"{name}: `rtol` must be in [0, 1), got {rtol!r} (with rtol ≥ 1, x = 0 "
            "would pass the convergence check)."
        )
    if atol is not None and not atol >= 0:
        raise ValueError(f"{name}: `atol` must be ≥ 0, got {atol!r}.")
    if rtol == 0 and (atol is None or atol == 0):
        raise ValueError(f"{name}: `rtol` and `atol` cannot both be zero.")
    check_positive_int(name, "max_steps", max_steps, allow_none=True)


def check_positive_int(name: str, label: str, value, allow_none: bool) -> None:
    """Raises unless `value` is an integer ≥ 1 (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: `{label}` must be an int, got {value!r}.")
    if value < 1:
        raise ValueError(f"{name}: `{label}` must be ≥ 1, got {value!r}.")


def flat_dtype(A: lx.AbstractLinearOperator, name: str):
    """The dtype of the flattened iteration: that of every leaf of A's structures, at
    least float32 (the norms of 16-bit vectors overflow from entries of ~256 on: a
    tangent of that size would fail to solve). Raises, naming the solver `name`, for
    anything but real floating point."""
    leaves = jax.tree.leaves((A.in_structure(), A.out_structure()))
    dtype = jnp.result_type(*(leaf.dtype for leaf in leaves))
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name} supports real floating-point systems only, got {dtype}: its "
            "inner products are not conjugated. For complex unknowns use "
            "implicitdiff.Direct or implicitdiff.SciPy('splu')."
        )
    return at_least_32_bit(dtype)


def flat_operator(A: lx.AbstractLinearOperator, dtype) -> FlatFn:
    """`v ↦ A v` on flat vectors."""
    in_structure = A.in_structure()
    return lambda v: ravel(A.mv(unravel(v, in_structure))).astype(dtype)


def flat_preconditioner(
    preconditioner: AbstractPreconditioner | None, state, A, dtype
) -> FlatFn:
    """`v ↦ M⁻¹ v` on flat vectors: the identity without a preconditioner."""
    if preconditioner is None:
        return lambda v: v
    out_structure, in_structure = A.out_structure(), A.in_structure()

    def apply(v):
        z = preconditioner.apply(state, unravel(v, out_structure))
        if jax.tree.structure(z) != jax.tree.structure(in_structure) or jax.tree.map(
            jnp.shape, z
        ) != jax.tree.map(jnp.shape, in_structure):
            raise TypeError(
                f"implicitdiff: {type(preconditioner).__name__}.apply returned "
                f"{jax.tree.map(jnp.shape, z)}, but M⁻¹r must have the structure "
                f"and shapes of A's input, {jax.tree.map(jnp.shape, in_structure)}."
            )
        return ravel(z).astype(dtype)

    return apply


def safe_divide(numerator: Array, denominator: Array, ok: Bool[Array, ""]) -> Array:
    """`numerator / denominator` where `ok`, else 0, without an inf or NaN on either
    branch (a NaN on the discarded branch would still poison gradients and tests)."""
    return jnp.where(ok, numerator / jnp.where(ok, denominator, 1), 0)


def keep_unless(broke: Bool[Array, ""], new: PyTree[Array], old: PyTree[Array]):
    """`old` where the step `broke` down (so that it changes nothing), else `new`."""
    return jax.tree.map(lambda n, o: jnp.where(broke, o, n), new, old)


class AbstractKrylovSolver(AbstractLinearSolver):
    """A matrix-free iterative solver with the shared restart loop and acceptance check.

    Subclasses implement `_cycle`. `presolve` sets up the preconditioner on `A`;
    `solve` runs cycles from `x = 0`, each from the true residual of the previous one,
    and accepts `x` only if `‖b − A x‖₂ ≤ atol + rtol·‖b‖₂` with that product computed
    explicitly; otherwise (no convergence within `max_steps`, a breakdown, a non-finite
    value) the solution is all NaN. A zero right-hand side gives zeros.
    """

    rtol: eqx.AbstractVar[float | None]
    atol: eqx.AbstractVar[float | None]
    max_steps: eqx.AbstractVar[int | None]
    preconditioner: eqx.AbstractVar[AbstractPreconditioner | None]

    def __check_init__(self):
        name = type(self).__name__
        check_tolerances(name, self.rtol, self.atol, self.max_steps)
        if self.preconditioner is not None and not isinstance(
            self.preconditioner, AbstractPreconditioner
        ):
            raise TypeError(
                f"{name}: `preconditioner` must be None or an "
                "implicitdiff.AbstractPreconditioner, such as implicitdiff.Jacobi() or "
                "implicitdiff.AMG().as_preconditioner(); got "
                f"{self.preconditioner!r}. A linear solver is not a "
                "preconditioner: use it as the linear_solver itself, or write an "
                "AbstractPreconditioner."
            )

    @abc.abstractmethod
    def _cycle(
        self,
        matvec: FlatFn,
        precondition: FlatFn,
        x: Float[Array, " n"],
        r: Float[Array, " n"],
        tol: Float[Array, ""],
        steps_left: Int[Array, ""],
    ) -> tuple[Float[Array, " n"], Int[Array, ""]]:
        """Iterates from `x`, whose true residual is `r` (with `‖r‖ > tol`), for at
        most `steps_left` steps; stops early when the method's residual estimate is
        at most `tol` or it breaks down. Returns the new `x` and the number of steps
        that changed it: 0 means restarting cannot help (a breakdown at once).
        """

    def presolve(self, A, y):
        if size(A.in_structure()) != size(A.out_structure()):
            raise ValueError(
                f"{type(self).__name__} needs a square operator; got "
                f"{size(A.out_structure())} equations for {size(A.in_structure())} "
                "unknowns. Use implicitdiff.LeastSquares for more conditions than "
                "unknowns."
            )
        flat_dtype(A, type(self).__name__)  # fails at trace time if unsupported
        if self.preconditioner is None:
            return A, None
        return A, self.preconditioner.presolve(A, y)

    def solve(self, state, b):
        A, preconditioner_state = state
        dtype = flat_dtype(A, type(self).__name__)
        x = self._solve_flat(
            default_rtol(A) if self.rtol is None else self.rtol,
            flat_operator(A, dtype),
            flat_preconditioner(self.preconditioner, preconditioner_state, A, dtype),
            ravel(b).astype(dtype),
        )
        return unravel(x, A.in_structure())

    def _solve_flat(
        self,
        rtol: float,
        matvec: FlatFn,
        precondition: FlatFn,
        b: Float[Array, " n"],
    ) -> Float[Array, " n"]:
        atol = 0.0 if self.atol is None else self.atol
        max_steps = (
            default_max_steps(b.size) if self.max_steps is None else self.max_steps
        )
        # Iterate on b·2⁻ᵉ, with max|b·2⁻ᵉ| in [½, 1): exact, and the squares in the
        # norms and inner products can neither overflow (|b| above 10¹⁹ in float32)
        # nor underflow to 0 (below 10⁻¹⁹, where ‖b‖ = 0 would stop the loop at once,
        # at x = 0).
        exponent = binary_exponent(b)
        b = jnp.ldexp(b, -exponent)
        b_norm = jnp.linalg.norm(b)
        tol = jnp.ldexp(jnp.asarray(atol, b_norm.dtype), -exponent) + rtol * b_norm

        # `r_norm > tol` is False for a NaN or inf norm (and for a non-finite b, whose
        # tol is NaN or inf): the loop stops and the check below rejects.
        def unfinished(carry):
            _, _, r_norm, steps, stuck = carry
            return (r_norm > tol) & (steps < max_steps) & ~stuck

        def restart(carry):
            x, r, _, steps, _ = carry
            x, taken = self._cycle(matvec, precondition, x, r, tol, max_steps - steps)
            r = b - matvec(x)
            return x, r, jnp.linalg.norm(r), steps + taken, taken == 0

        zero_steps = jnp.zeros((), np.int32)
        init = (jnp.zeros_like(b), b, b_norm, zero_steps, jnp.array(False))
        x, _, r_norm, steps, stuck = lax.while_loop(unfinished, restart, init)
        converged = jnp.isfinite(r_norm) & (r_norm <= tol) & jnp.all(jnp.isfinite(x))
        broke = stuck | ~jnp.isfinite(r_norm)
        solve_log.report_solve(
            iterations=steps,
            residual=r_norm / jnp.where(b_norm > 0, b_norm, 1),
            status={"breakdown": broke, "not converged": ~converged},
        )
        return nan_unless(converged, jnp.ldexp(x, exponent))
