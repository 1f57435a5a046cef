import functools as ft
import inspect
from typing import Literal

import equinox as eqx
import numpy as np
import scipy.sparse.linalg as sla

from .._misc import refuse_16_bit, singular_threshold
from .._solve_log import report_solve
from ._base import AbstractLinearSolver
from ._host_certificate import host_certify
from ._host_helpers import (
    check_hashable,
    csr_nbytes,
    freeze,
    iterate_to_tolerance,
    norms_1_and_inf,
    thaw,
)
from ._krylov import check_tolerances, default_rtol
from ._on_host import HostMethod, host_presolve, host_solve

DIRECT_METHODS = ("spsolve", "splu")
ITERATIVE_METHODS = ("cg", "gmres", "bicgstab", "minres", "lgmres", "gcrotmk", "qmr")
# Set by the solver itself, or not hashable (preconditioners, callbacks).
_RESERVED = {"A", "b", "x0", "M", "M1", "M2", "callback", "callback_type", "show"}


def _accepted_options(method: str) -> set[str]:
    parameters = inspect.signature(getattr(sla, method)).parameters
    accepted = set(parameters) - _RESERVED
    if method in ITERATIVE_METHODS:
        accepted |= {"rtol", "atol"}  # minres has no atol: only our check uses it
    return accepted


class SciPy(AbstractLinearSolver):
    """A SciPy sparse solver, run on the host through `jax.pure_callback`.

    `A` reaches SciPy as a CSR matrix: the stored values of an
    [`implicitdiff.SparseLinearOperator`][] (what the [`implicitdiff.Sparse`][]
    representation builds) with its static pattern, or else the dense matrix
    `A.as_matrix()`. Works under `jax.jit` and `jax.vmap`: a batch of right-hand sides
    (`jax.jacrev`, `jax.jacfwd`, `vmap`) reaches SciPy as one call, a multi-RHS solve
    for the direct methods and a loop for the iterative ones.

    - `"splu"` factorises `A` once in `presolve` (SuperLU) and reuses the factor for
        every right-hand side. For a VJP the implicit function hands `presolve` the
        transpose `Aᵀ`, and that is what is factorised: only the direction in use is
        ever factorised, so reusing the factor of `A` with `trans="T"` would save
        nothing. The factor lives in a bounded host-side cache (least recently used
        first out, refactorised if needed), keyed by the matrix's content.
    - `"spsolve"` factorises inside every solve call (once per batch of right-hand
        sides); no state is kept beyond the matrix.
    - `"cg"`, `"minres"` (symmetric `A`; `cg` also positive definite), `"gmres"`,
        `"bicgstab"`, `"lgmres"`, `"gcrotmk"`, `"qmr"`: Krylov methods, one right-hand
        side at a time.

    **Failures give NaN**, never an exception or a hang: a singular factorisation,
    an exception inside SciPy, a non-finite result, an iterative method that reports
    no convergence (`info ≠ 0`, e.g. `maxiter` reached) or whose *true* residual
    `‖b − A x‖` exceeds `atol + rtol‖b‖` (after at most two correction solves
    `A d = b − A x`, which absorb the drift of the recurrence residual). The direct
    methods accept `x` when its normwise backward error
    `‖b − A x‖∞ / (‖A‖∞‖x‖∞ + ‖b‖∞)` is at most `√ε`, after up to two steps of
    iterative refinement where it exceeds `8ε` (an unstable factorisation, with
    pivoting turned off through the options).

    **Certificates** (that `A` is regular; every derivative through an uncertified
    `A` is NaN): `"splu"` estimates `max(κ₁(A), κ∞(A))` from its factors (Higham's
    1-norm estimator on `A⁻¹` and `A⁻ᴴ`, a few extra solves in `presolve`, kept with
    the factor) and refuses above `1/(√n·ε)`; a matrix whose one step of the power
    method on `A⁻ᴴA⁻¹` (two solves) already puts it far below that is accepted
    without them. Reading that flag back costs one callback and no solve.
    `"spsolve"`, which keeps no factor, gets the same certificate from one SuperLU
    factorisation in `presolve`, dropped afterwards. The iterative methods use the
    default certificate: one more solve per linearisation point, for a pseudo-random
    right-hand side.

    !!! Example

        ```python
        import implicitdiff as idf

        fn = idf.ImplicitFunction(
            forward, conditions,
            linear_solver=idf.SciPy("splu"),
            representation=idf.Sparse("auto"),
        )
        idf.SciPy("gmres", rtol=1e-10, restart=50, maxiter=200)
        ```
    """

    method: Literal[
        "spsolve",
        "splu",
        "cg",
        "gmres",
        "bicgstab",
        "minres",
        "lgmres",
        "gcrotmk",
        "qmr",
    ] = eqx.field(static=True)
    options: tuple = eqx.field(static=True)

    def __init__(self, method: str, **options):
        self.method = method
        self.options = freeze(options)

    def __check_init__(self):
        methods = DIRECT_METHODS + ITERATIVE_METHODS
        if self.method not in methods:
            raise ValueError(
                f"SciPy: method must be one of {methods}, got {self.method!r}."
            )
        options = thaw(self.options)
        unknown = set(options) - _accepted_options(self.method)
        if unknown:
            raise TypeError(
                f"SciPy({self.method!r}): unknown option(s) {sorted(unknown)}; "
                f"accepted: {sorted(_accepted_options(self.method))}."
            )
        check_tolerances(
            f"SciPy({self.method!r})", options.get("rtol"), options.get("atol"), None
        )
        check_hashable(f"SciPy({self.method!r})", self.options)

    def _host_method(self, A) -> HostMethod:
        options = thaw(self.options)
        if self.method in DIRECT_METHODS:
            prepare = ft.partial(_prepare_direct, self.method, options)
            solve = _solve_direct
        else:
            options.setdefault("rtol", default_rtol(A))
            options.setdefault("atol", 0.0)
            prepare = _prepare_iterative
            solve = ft.partial(_solve_iterative, self.method, options)
        return HostMethod(("SciPy", self.method, self.options), prepare, solve)

    def presolve(self, A, y):
        name = f"SciPy({self.method!r})"
        refuse_16_bit(A, name, "SciPy's sparse solvers have no 16-bit types")
        method = self._host_method(A)
        return method, host_presolve(method, A)

    def solve(self, state, b):
        method, host_state = state
        direct = self.method in DIRECT_METHODS
        report_solve(status="singular" if direct else "not converged")
        return host_solve(method, host_state, b)

    def certify(self, state, A):
        if self.method not in DIRECT_METHODS:
            return super().certify(state, A)
        method, host_state = state
        return host_certify(method, host_state, A)


SciPy.__init__.__doc__ = """**Arguments:**

- `method`: `"splu"`, `"spsolve"`, `"cg"`, `"gmres"`, `"bicgstab"`, `"minres"`,
    `"lgmres"`, `"gcrotmk"` or `"qmr"`: the function of `scipy.sparse.linalg` to use.
- `**options`: passed on to that function (checked against its signature):
    `permc_spec`, `diag_pivot_thresh`, `options`, ... for the direct methods;
    `rtol` (default `1e-10` in float64, `1e-5` in float32), `atol` (default 0),
    `maxiter`, `restart`, ... for the iterative ones. `rtol` and `atol` also set the
    true-residual test. Preconditioners (`M`) and callbacks are not accepted. The
    iterative methods compute in double precision on the host (a float32 system's
    recurrences would stagnate near `ε·κ`), with the tolerances of the system's
    dtype, and return the system's dtype.
"""


def _prepare_direct(method, options, csr):
    norms = norms_1_and_inf(csr)  # ‖A‖∞ is also the backward-error test's scale
    if method == "splu":
        lu = sla.splu(csr.tocsc(), **options)
        regular = _well_conditioned(lu, csr, norms)
        solve = lu.solve if regular else _all_nan
        return (solve, norms[1], regular), int(lu.nnz) * (csr.dtype.itemsize + 4)
    csc = csr.tocsc()  # what spsolve factorises, converted once
    # spsolve keeps no factor and estimates no condition number: one SuperLU
    # factorisation, dropped after the estimate, certifies A. (A probe solve proves
    # nothing here: at σ_min ≈ 1e-17 spsolve can return a finite solution that
    # passes every residual test.)
    regular = _well_conditioned(sla.splu(csc, **_splu_options(options)), csr, norms)
    solve = ft.partial(sla.spsolve, csc, **options) if regular else _all_nan
    return (solve, norms[1], regular), csr_nbytes(csc)


def _splu_options(spsolve_options: dict) -> dict:
    return {k: v for k, v in spsolve_options.items() if k == "permc_spec"}


def _well_conditioned(lu, csr, norms: tuple[float, float]) -> bool:
    """`max(κ₁(A), κ∞(A)) ≤ 1/(√n·ε)`, by Higham's estimates of `‖A⁻¹‖₁` and
    `‖A⁻ᴴ‖₁ = ‖A⁻¹‖∞` from a few solves with the factors: SuperLU factorises
    numerically singular matrices without complaint, and their solutions pass any
    backward-error test while carrying no correct digit. Both norms, so that the
    factor of `A` (a JVP) and that of `Aᵀ` (a VJP) refuse the same matrices.

    Those estimates take about a dozen solves, a third of the factorisation's time
    for a 2D PDE on 256² nodes; `_far_below` first tries to settle it with two.
    `norms`: `(‖A‖₁, ‖A‖∞)`, from `norms_1_and_inf`."""
    cast = lambda v: np.asarray(v, csr.dtype)  # the estimator works in float64
    threshold = singular_threshold(csr.shape[0], csr.dtype)
    if _far_below(lu, csr.dtype, max(norms), threshold):
        return True
    inverse = sla.LinearOperator(
        csr.shape,
        matvec=lambda v: lu.solve(cast(v)),
        matmat=lambda V: lu.solve(cast(V)),  # one call: SuperLU solves blocks fast
        rmatvec=lambda v: lu.solve(cast(v), trans="H"),
        dtype=csr.dtype,
    )
    condition = np.maximum(  # NaN-propagating, unlike Python's max
        sla.onenormest(inverse) * norms[0], sla.onenormest(inverse.H) * norms[1]
    )
    return bool(condition <= threshold)


# Pseudo-random Gaussian probes, tried in two stages: each probe is nearly orthogonal
# to the top singular vector (|v·x| < δ) with probability about 0.8·δ, so two probes
# all miss it (δ = 10⁻⁴) with probability below 10⁻⁸, as do four with δ = 0.01. A
# shortfall of the power step is then under n^¼/√(2δ): 71·n^¼ with two probes, 7·n^¼
# with four. Two settle `sparse_pde_vjp`'s 256² and 512² Jacobians (two solves fewer
# than four would take); its 1024² one needs the four (with two, Higham's dozen
# solves would cost 4 s more than the two extra columns).
_STAGES = ((2, 71), (4, 7))  # (probes, shortfall factor)


@ft.lru_cache(maxsize=8)
def _probes(n: int, dtype) -> np.ndarray:
    """The fixed pseudo-random Gaussian columns of the largest stage, drawn once per
    size (drawing them costs ~3 ms at n = 65 536, a tenth of the certificate)."""
    x = np.random.default_rng(0).standard_normal((n, _STAGES[-1][0])).astype(dtype)
    x.flags.writeable = False
    return x


def _far_below(lu, dtype, norm, threshold) -> bool:
    """Whether `max(κ₁, κ∞)` is surely far below `threshold`, from one step of the
    power method on `A⁻ᴴA⁻¹`: one block solve for fixed pseudo-random Gaussian
    columns `x`, one transposed solve for the column `y = A⁻¹x` that grew most, and
    `s = ‖A⁻ᴴy‖₂/‖y‖₂ ≤ ‖A⁻¹‖₂`; first with two columns, then, if that does not
    settle it, with two more.

    `s` can fall short of `‖A⁻¹‖₂` by about `n^¼/√(2|v·x|)` at most (`v` the top
    right singular vector of `A⁻¹`; the worst spectrum has its other singular values
    at `n^(-¼)` of the largest): under `71·n^¼` with two columns and `7·n^¼` with
    four, unless all their `|v·x|` are below 10⁻⁴ (resp. 0.01), which for Gaussian
    columns has probability below 10⁻⁸ (for each stage). With
    `‖A⁻¹‖₁, ‖A⁻¹‖∞ ≤ √n‖A⁻¹‖₂`, `shortfall·n^¾·s·max(‖A‖₁, ‖A‖∞) ≤ threshold`
    settles it. Otherwise (including a non-finite solve) Higham's estimates
    decide."""
    n = lu.shape[0]
    x = _probes(n, np.dtype(dtype))
    # Fortran order: a column is contiguous (SuperLU and the norms of a strided
    # column took 4× as long).
    y = np.empty(x.shape, x.dtype, order="F")
    step_of = {}  # column → its s, so that no column is solved transposed twice
    solved = 0
    for count, shortfall in _STAGES:
        y[:, solved:count] = lu.solve(x[:, solved:count])
        solved = count
        growth = np.linalg.norm(y[:, :count], axis=0) / np.linalg.norm(
            x[:, :count], axis=0
        )
        if not np.all(np.isfinite(growth)):
            return False
        best = int(np.argmax(growth))
        if best not in step_of:
            column = y[:, best]
            transposed = lu.solve(column, trans="H")
            step_of[best] = np.linalg.norm(transposed) / np.linalg.norm(column)
        if shortfall * n**0.75 * step_of[best] * norm <= threshold:
            return True
    return False


def _all_nan(B):
    return np.full_like(B, np.nan)


def _solve_direct(csr, prepared, B):
    """The solutions of the rows of `B`, each NaN unless its normwise backward error
    is at most `√ε` (a zero row's, zero, is exact). A row whose backward error
    exceeds `8ε` gets up to two steps of iterative refinement first: with SuperLU's
    default pivoting that almost never happens, but with pivoting turned off
    (`diag_pivot_thresh=0`) a well-conditioned system came back with 10⁵ times the
    error `κ·ε` allows, and passed."""
    solve, norm_A = prepared[:2]

    def solve_rows(R):
        return np.reshape(solve(np.ascontiguousarray(R.T)), R.T.shape).T

    X = np.array(solve_rows(B))
    eps = np.finfo(X.dtype).eps
    for step in range(3):
        R = B - (csr @ X.T).T
        residual = np.max(np.abs(R), axis=1)
        size = norm_A * np.max(np.abs(X), axis=1) + np.max(np.abs(B), axis=1)
        # An exact row (a zero right-hand side's zero solution: a zero column of a
        # Jacobian) has backward error 0, not the NaN of 0/0 that failed the batch.
        backward = np.divide(
            residual, size, out=np.where(residual == 0, 0.0, np.nan), where=size > 0
        )
        coarse = ~(backward <= 8 * eps)  # NaN included: refinement will not help
        if step == 2 or not np.any(coarse & np.isfinite(backward)):
            break
        X[coarse] += solve_rows(R[coarse])
    X[~(backward <= np.sqrt(eps))] = np.nan
    return X


def _prepare_iterative(csr):
    return None, 0  # nothing beyond the matrix, which the cache counts itself


def _solve_iterative(method, options, csr, _, B):
    """The solutions of the rows of `B`, computed in double precision: in single
    precision SciPy's recurrences stagnate near `ε·κ`, and BiCGStab missed float32's
    default `rtol = 10⁻⁵` on a system with `κ = 250` (a NaN on a well-posed
    problem). The tolerances stay those of `B`'s dtype; one copy of the matrix per
    call."""
    function = getattr(sla, method)
    kwargs = dict(options)
    if "atol" not in inspect.signature(function).parameters:
        del kwargs["atol"]  # minres: only the true-residual test uses it
    wide = np.promote_types(csr.dtype, np.float64)
    csr = csr.astype(wide)
    run = lambda b: function(csr, b, **kwargs)
    rtol, atol = options["rtol"], options["atol"]
    X = [iterate_to_tolerance(run, csr, b, rtol, atol) for b in B.astype(wide)]
    return np.stack(X).astype(B.dtype)
