import functools as ft
from typing import Literal

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._misc import refuse_16_bit, result_dtype
from .._solve_log import report_solve
from ._base import AbstractLinearSolver
from ._host_certificate import (
    host_certify,
    m_matrix_is_credible,
    probe_is_credible,
    watched_cg,
)
from ._host_helpers import (
    check_hashable,
    csr_nbytes,
    freeze,
    iterate_to_tolerance,
    thaw,
)
from ._krylov import check_tolerances, default_rtol
from ._on_host import HostMethod, host_presolve, host_solve, nan_like
from ._preconditioner import AbstractPreconditioner

_SETUPS = ("ruge_stuben", "smoothed_aggregation")
_ACCELS = ("cg", "gmres", "bicgstab", None)
_CYCLES = ("V", "W", "F")
# A preconditioner ships A's values with every application only below this size, so
# that it can rebuild an evicted hierarchy; above it the copy would cost about as
# much as the cycle itself.
_REBUILD_MAX_VALUES = 2**18


class AMG(AbstractLinearSolver):
    """Algebraic multigrid with [pyamg](https://pyamg.readthedocs.io), on the host.

    `presolve` builds the multigrid hierarchy of `A` once per linearisation point
    (`pyamg.ruge_stuben_solver` or `pyamg.smoothed_aggregation_solver`); every
    `solve` reuses it, running pyamg's cycles, accelerated by a Krylov method, until
    the *true* residual meets `‖b − A x‖ ≤ atol + rtol‖b‖`; otherwise the
    solution is all NaN. `A` reaches pyamg as a CSR matrix: the stored values of an
    [`implicitdiff.SparseLinearOperator`][] (use the [`implicitdiff.Sparse`][]
    representation) or else the dense matrix.

    **Why on the host.** Both the setup and the cycles run in pyamg, through
    `jax.pure_callback` (one callback per batch of right-hand sides, the hierarchy
    kept in a bounded host-side cache keyed by the matrix's content, like
    [`implicitdiff.SciPy`][]`("splu")`). A jitted V-cycle in JAX would keep the Krylov
    loop on the device, but the hierarchy's shapes (coarse sizes and nonzeros) are
    only known once the values are: under `jit` they would have to be padded to
    guessed bounds or recompiled per matrix. On CPU pyamg's compiled Gauss-Seidel
    cycles are also faster than the Jacobi-smoothed cycles a JAX port can express, so
    this costs about as much as calling pyamg directly (on a GPU, add copying `A` and
    the right-hand sides to the host and back).

    **Regularity.** A Krylov method converges on a singular system whose right-hand
    side is in its range, so a converged solve proves nothing. `presolve` certifies
    `A` once per matrix, with the setup: a Z-matrix (positive diagonal, no positive
    entry off it, as the discrete diffusion operators of elliptic PDEs; or minus one)
    is proven a nonsingular M-matrix with `κ∞(A)` below the threshold by the first
    iterate `x ≥ 0` of a solve of `A x = 1` with `A x > 0` in every row, a few cycles
    (`‖A⁻¹‖∞ ≤ ‖x‖∞ / min(A x)`, deterministic; with `accel="cg"` each iterate is
    looked at before the next cycle is paid for, and one that nearly proves it is
    smoothed by a Gauss-Seidel sweep first); any other matrix by a solve for a
    fixed pseudo-random right-hand side that a singular `A` almost surely cannot
    reach. An uncertified `A` gives NaN.

    Ruge-Stüben is the default: on 2D/3D diffusion, including strong coefficient
    jumps, its setup is several times cheaper than smoothed aggregation's for a
    similar number of cycles. With the default `accel="cg"`, `A` must be symmetric
    positive definite (as `∂c/∂y` is for the stationarity conditions of a convex
    problem or an elliptic PDE); otherwise use `"gmres"` or `"bicgstab"` (and, for
    smoothed aggregation, `symmetry="nonsymmetric"`). A `∂c/∂y` whose diagonal is
    negative everywhere (conditions written as `Δy + f = 0`, negative definite) is
    set up and solved as `−A x = −b`.

    !!! Example

        ```python
        import implicitdiff as idf

        fn = idf.ImplicitFunction(
            forward, conditions,
            linear_solver=idf.AMG(),
            representation=idf.Sparse("auto"),
        )
        pcg = idf.CG(preconditioner=idf.AMG().as_preconditioner())
        ```
    """

    method: Literal["ruge_stuben", "smoothed_aggregation"] = eqx.field(static=True)
    accel: Literal["cg", "gmres", "bicgstab", None] = eqx.field(static=True)
    rtol: float | None = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    cycle: Literal["V", "W", "F"] = eqx.field(static=True)
    setup_options: tuple = eqx.field(static=True)

    def __init__(
        self,
        method: Literal["ruge_stuben", "smoothed_aggregation"] = "ruge_stuben",
        accel: Literal["cg", "gmres", "bicgstab", None] = "cg",
        rtol: float | None = None,
        atol: float = 0.0,
        max_steps: int = 200,
        cycle: Literal["V", "W", "F"] = "V",
        **setup_options,
    ):
        self.method = method
        self.accel = accel
        self.rtol = rtol
        self.atol = atol
        self.max_steps = max_steps
        self.cycle = cycle
        self.setup_options = freeze(setup_options)

    def __check_init__(self):
        for name, value, choices in (
            ("method", self.method, _SETUPS),
            ("accel", self.accel, _ACCELS),
            ("cycle", self.cycle, _CYCLES),
        ):
            if value not in choices:
                raise ValueError(
                    f"AMG: {name} must be one of {choices}, got {value!r}."
                )
        check_tolerances("AMG", self.rtol, self.atol, self.max_steps)
        check_hashable("AMG", self.setup_options)

    def _host_method(self, solve, fallback=nan_like) -> HostMethod:
        """The hierarchy alone: what the preconditioner needs."""
        prepare = ft.partial(_build_hierarchy, self.method, thaw(self.setup_options))
        key = ("AMG", self.method, self.setup_options)
        return HostMethod(key, prepare, solve, fallback)

    def _certified_method(self, rtol: float) -> HostMethod:
        """The hierarchy and its certificate, which depends on the solve's settings."""
        key = ("AMG", self.method, self.setup_options, self.accel, self.cycle, rtol)
        key += (self.atol, self.max_steps)
        prepare = ft.partial(self._prepare_certified, rtol)
        return HostMethod(key, prepare, ft.partial(self._solve_certified, rtol))

    def presolve(self, A, y):
        _check_real(A, "AMG")
        rtol = default_rtol(A) if self.rtol is None else self.rtol
        method = self._certified_method(rtol)
        return method, host_presolve(method, A)

    def solve(self, state, b):
        method, host_state = state
        report_solve(status="not converged")
        return host_solve(method, host_state, b)

    def certify(self, state, A):
        method, host_state = state
        return host_certify(method, host_state, A)

    def _prepare_certified(self, rtol, csr):
        # The certificate runs here, with the setup: it is cached with the hierarchy,
        # so a matrix seen before costs neither again. An M-matrix is proven regular
        # by a few cycles; any other matrix by the probe, a solve to full tolerance.
        # A matrix with a negative diagonal (conditions written as Δy + f = 0) is
        # solved as −A x = −b: CG and Ruge-Stüben need a positive definite A.
        sign = _diagonal_sign(csr)
        if sign < 0:
            csr = -csr
        hierarchy, nbytes = _build_hierarchy(self.method, thaw(self.setup_options), csr)
        solve_rows = ft.partial(self._solve_rows, rtol, csr, hierarchy)
        regular = self._m_matrix_certificate(rtol, csr, hierarchy)
        regular = regular or probe_is_credible(csr, solve_rows)
        return (hierarchy, regular, sign), nbytes

    def _solve_certified(self, rtol, csr, prepared, B):
        hierarchy, regular, sign = prepared
        if not regular:
            return nan_like(B)
        if sign < 0:
            return self._solve_rows(rtol, -csr, hierarchy, -B)
        return self._solve_rows(rtol, csr, hierarchy, B)

    def _solve_rows(self, rtol, csr, hierarchy, B):
        run = ft.partial(self._run_watched, rtol, hierarchy, return_info=True)
        return np.stack([iterate_to_tolerance(run, csr, b, rtol, self.atol) for b in B])

    def _m_matrix_certificate(self, rtol, csr, hierarchy) -> bool:
        """Whether `A` is proven a regular M-matrix (`m_matrix_is_credible`), its
        iterates smoothed by Gauss-Seidel when nearly proving."""
        run = ft.partial(self._run_certificate, rtol, csr, hierarchy)
        smooth = ft.partial(_gauss_seidel_sweep, csr)
        return m_matrix_is_credible(csr, run, smooth)

    def _run_certificate(self, rtol, csr, hierarchy, b, callback):
        """The M-matrix certificate's run: with `accel="cg"` (SPD `A`) a CG that looks
        at each iterate before its next cycle, one cycle fewer than pyamg's CG."""
        if self.accel != "cg":
            return self._run_watched(rtol, hierarchy, b, callback)
        precondition = hierarchy.aspreconditioner(cycle=self.cycle).matvec
        return watched_cg(csr, precondition, b, callback, rtol, self.max_steps)

    def _run_watched(self, rtol, hierarchy, b, callback=None, return_info=False):
        """pyamg's accelerated cycles from zero, calling `callback` on each iterate."""
        max_steps = self.max_steps
        if self.accel == "gmres":  # unrestarted: at most n steps, pyamg warns past
            max_steps = min(max_steps, b.shape[0])
        return hierarchy.solve(
            b,
            tol=rtol,
            maxiter=max_steps,
            cycle=self.cycle,
            accel=self.accel,
            callback=callback,
            return_info=return_info,
        )

    def as_preconditioner(self) -> "AMGPreconditioner":
        """One multigrid cycle of this hierarchy as an approximate inverse, for the
        `preconditioner=` of [`implicitdiff.CG`][], [`implicitdiff.GMRES`][] or
        [`implicitdiff.BiCGStab`][].

        **Returns:**

        An [`implicitdiff.AbstractPreconditioner`][] whose `apply` runs one
        `cycle` (no tolerance, never NaN).
        """
        return AMGPreconditioner(self)


AMG.__init__.__doc__ = """**Arguments:**

- `method`: `"ruge_stuben"` (classical AMG, the default) or `"smoothed_aggregation"`.
- `accel`: the Krylov method around the cycles: `"cg"` (symmetric positive definite
    `A`), `"gmres"`, `"bicgstab"`, or `None` for plain cycling.
- `rtol`, `atol`: the solve is accepted when `‖b − A x‖ ≤ atol + rtol‖b‖`;
    `rtol` defaults to `1e-10` in float64, `1e-5` in float32.
- `max_steps`: the most Krylov iterations (or cycles, with `accel=None`) per solve;
    more means no convergence, hence NaN.
- `cycle`: `"V"`, `"W"` or `"F"`.
- `**setup_options`: passed to the pyamg setup function (`strength`, `max_coarse`,
    `presmoother`, `symmetry`, ...); hashable values only.
"""


class AMGPreconditioner(AbstractPreconditioner):
    """One cycle of an [`implicitdiff.AMG`][] hierarchy: an approximate inverse for
    Krylov solvers. Build it with `AMG(...).as_preconditioner()`.

    `presolve` builds (or finds in the cache) the same hierarchy as `AMG.presolve`;
    `apply(state, r)` runs one cycle from a zero initial guess
    (`pyamg.MultilevelSolver.aspreconditioner`). It never returns NaN: should the
    setup or a cycle fail, it returns `r` unchanged (no preconditioning), and the
    Krylov solver's own convergence test decides; so it does for a large matrix
    (over 2¹⁸ stored values) whose hierarchy was evicted from the host-side cache
    between the presolve and a step. With the default symmetric Gauss-Seidel
    smoothing the cycle is symmetric positive definite for SPD `A`, as preconditioned
    CG needs. Each application is one host callback (a copy of `r` there and back):
    cheap next to a cycle on CPU, a device-host round trip per step on a GPU.
    """

    amg: AMG

    def _host_method(self):
        return self.amg._host_method(self._cycle, fallback=lambda B: np.array(B))

    def presolve(self, A, y):
        _check_real(A, "AMG(...).as_preconditioner()")
        method = self._host_method()
        return method, host_presolve(method, A)

    def apply(self, state, r):
        method, host_state = state
        rebuild = host_state.values.size <= _REBUILD_MAX_VALUES
        return host_solve(method, host_state, r, rebuild)

    def _cycle(self, csr, hierarchy, B):
        M = hierarchy.aspreconditioner(cycle=self.amg.cycle)
        return np.stack([M.matvec(b) for b in B])


AMGPreconditioner.__init__.__doc__ = """**Arguments:**

- `amg`: the [`implicitdiff.AMG`][] whose setup and `cycle` to use.
"""


def _check_real(A, name: str) -> None:
    refuse_16_bit(A, name, "pyamg has no 16-bit types")
    dtype = result_dtype(A.in_structure())
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name} supports real floating-point systems only, got {dtype}: pyamg's "
            "Ruge-Stüben setup and CG acceleration assume a real matrix. For complex "
            "unknowns use implicitdiff.Direct or implicitdiff.SciPy('splu')."
        )


def _diagonal_sign(csr) -> int:
    """-1 when every diagonal entry of `A` is negative, else 1."""
    diagonal = csr.diagonal()
    return -1 if diagonal.size and np.all(diagonal < 0) else 1


def _gauss_seidel_sweep(csr, x, b):
    """A copy of `x` after one symmetric Gauss-Seidel sweep on `A x = b`."""
    from pyamg.relaxation.relaxation import gauss_seidel

    x = np.array(x)
    gauss_seidel(csr, x, b, iterations=1, sweep="symmetric")
    return x


def _build_hierarchy(method, setup_options, csr):
    import pyamg

    builder = getattr(pyamg, f"{method}_solver")
    hierarchy = builder(csr, **setup_options)
    nbytes = sum(
        csr_nbytes(getattr(level, name))
        for level in hierarchy.levels
        for name in ("A", "P", "R")
        if hasattr(level, name)
    )
    return hierarchy, nbytes
