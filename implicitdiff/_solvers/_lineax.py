import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Bool, Float, PyTree

from .._misc import (
    all_finite,
    credible,
    max_abs,
    nan_unless,
    operator_norm_lower_bound,
    probes,
    pseudo_random_probe,
    ravel,
    refuse_16_bit,
    size,
    unravel,
)
from .._solve_log import report_solve
from ._base import AbstractLinearSolver


class _LineaxState(eqx.Module):
    state: PyTree
    operator: lx.AbstractLinearOperator
    norm_bound: Float[Array, ""]
    regular: Bool[Array, ""]


class Lineax(AbstractLinearSolver):
    """Adapter for any [lineax](https://docs.kidger.site/lineax/) solver.

    `presolve` calls the lineax solver's `init` (where lineax solvers factorise), and
    `solve` its `compute`. Whatever lineax reports as unsuccessful (singular,
    max steps reached, breakdown, stagnation) becomes an all-NaN solution, as does a
    non-finite one; nothing is ever raised from inside the backward pass.

    **Certificate.** lineax's solvers accept numerically singular matrices: LU and QR
    when the factorisation shows no zero pivot, and the least-squares solvers
    (`SVD`, `LSMR`, ...) by design, returning a pseudo-inverse solution that is not a
    solution at all. So `presolve` also solves for five fixed probe vectors `q` (ones,
    alternating signs, two golden-angle waves and a pseudo-random vector; one batched
    solve) and certifies `A` only if every probe solution `x`

    - solves its system: `‖q − A x‖∞ ≤ tol·(‖A‖∞‖x‖∞ + ‖q‖∞)`, with `tol = √ε`, or
      `√n·(rtol + atol)` for an iterative lineax solver with looser tolerances; a
      singular `A` cannot reach all five. For a solver that does not assume full
      rank, `‖q − A x‖∞ ≤ tol·‖q‖∞`: a truncated SVD drops the very directions that
      would show `A` singular, and `‖A‖∞‖x‖∞` is then that of the truncated matrix.
      This limits `Lineax(lx.SVD())` to `κ(A) ≲ 1/√ε` (about `7·10⁷` in float64),
      past which its solutions' residuals grow beyond `√ε`;
    - does not prove `A` numerically singular: `‖A‖∞‖x‖∞/‖q‖∞ ≤ 1/(√n·ε)`.

    Every solution through an uncertified `A` is NaN, and
    [`certify`][implicitdiff.AbstractLinearSolver.certify] returns this flag (no further
    solve). A lineax solver that does not assume full rank
    (`solver.assume_full_rank()` is False: `SVD`, `LSMR`, `Diagonal`) could still
    return a least-squares answer for some right-hand side, so each of its solutions
    is checked the same way (one product with `A` per solve). With a lineax
    *iterative* solver the probes cost a batched solve per linearisation point: prefer
    [`implicitdiff.GMRES`][] and friends there.

    !!! Example

        ```python
        import lineax as lx
        import implicitdiff as idf

        solver = idf.Lineax(lx.QR())
        ```
    """

    solver: lx.AbstractLinearSolver
    options: dict | None = None

    def __check_init__(self):
        if not isinstance(self.solver, lx.AbstractLinearSolver):
            raise TypeError(
                "Lineax(solver) needs a lineax.AbstractLinearSolver, "
                f"got {self.solver!r}."
            )

    def presolve(self, A, y):
        refuse_16_bit(
            A,
            f"Lineax({type(self.solver).__name__})",
            "lineax's factorisations call LAPACK, which has no 16-bit types, and its "
            "iterative solvers mix dtypes",
        )
        try:
            state = self.solver.init(A, self._options)
        except ValueError as error:
            if "definite" not in str(error) and "may only be used" not in str(error):
                raise
            name = type(self.solver).__name__
            raise ValueError(
                f"implicitdiff: Lineax(lx.{name}()) needs an operator tagged with a "
                "structure (positive or negative definite, diagonal, tridiagonal, "
                "triangular), and the operator (∂c/∂y, or linear_solve's matrix) "
                "reaches it without tags: nothing tells it that structure. Use "
                "implicitdiff.CG() for a definite one (conjugate gradients without "
                "tags), implicitdiff.Auto() for a diagonal one (it recognises a "
                "diagonal ∂c/∂y from its structure), or Lineax(lx.LU()) / "
                f"implicitdiff.Direct() for a factorisation. (lineax: {error})"
            ) from None
        b_structure = A.out_structure()
        dtype = jnp.result_type(*jax.tree.leaves(b_structure))
        rhs = jnp.concatenate(
            [probes(b_structure), pseudo_random_probe(size(b_structure), dtype)[None]]
        )
        norm_bound = operator_norm_lower_bound(A)
        solves = jax.vmap(lambda q: self._checked_solve(state, A, norm_bound, q))
        xs = solves(rhs)
        regular = jnp.all(jax.vmap(lambda x, q: credible(norm_bound, x, q))(xs, rhs))
        return _LineaxState(state, A, norm_bound, regular)

    def solve(self, state, b):
        report_solve(status={"singular": ~state.regular})
        x = self._solve(state.state, b)
        if not self.solver.assume_full_rank():
            x = nan_unless(self._solves(state.operator, state.norm_bound, x, b), x)
        return nan_unless(state.regular, x)

    def certify(self, state, A):
        return state.regular

    @property
    def _options(self) -> dict:
        return {} if self.options is None else self.options

    def _solve(self, state, b):
        x, result, _ = self.solver.compute(state, b, self._options)
        ok = jnp.asarray(result == lx.RESULTS.successful) & all_finite(x)
        return nan_unless(ok, x)

    def _checked_solve(self, state, A, norm_bound, q):
        """A probe solve, flat, NaN unless it solves its system."""
        b = unravel(q, A.out_structure())
        x = self._solve(state, b)
        return ravel(nan_unless(self._solves(A, norm_bound, x, b), x))

    def _solves(self, A, norm_bound, x, b) -> Bool[Array, ""]:
        """Whether `x` solves `A x = b` to the solver's accuracy, rather than only in
        the least-squares sense: a small backward error, and for a solver that does
        not assume full rank a small residual relative to `b` alone. (A truncated SVD
        drops the directions that would show `A` singular: its `x` has a small
        backward error, `‖A‖‖x‖` being that of the truncated matrix.)"""
        residual = max_abs(jax.tree.map(jnp.subtract, b, A.mv(x)))
        scale = max_abs(b)
        if self.solver.assume_full_rank():
            scale = scale + norm_bound * max_abs(x)
        return residual <= self._tolerance(b) * scale

    def _tolerance(self, b) -> float:
        dtype = jnp.result_type(*jax.tree.leaves(b))
        direct = float(jnp.finfo(dtype).eps) ** 0.5
        rtol, atol = (getattr(self.solver, name, 0.0) for name in ("rtol", "atol"))
        return max(direct, size(b) ** 0.5 * (rtol + atol))


Lineax.__init__.__doc__ = """**Arguments:**

- `solver`: a `lineax.AbstractLinearSolver`, such as `lineax.LU()`, `lineax.QR()`,
    `lineax.GMRES(rtol=1e-8, atol=1e-8)`. Solvers that need operator tags
    (`lineax.CG`, `lineax.Cholesky`) need an operator that carries them, which the
    implicit function does not know: prefer [`implicitdiff.CG`][] for those.
- `options`: the `options` dictionary passed to the lineax solver (for example a
    preconditioner).
"""
