"""The implicit rule: x → forward → y → conditions → operator → presolve → solve.

Read top to bottom. `ImplicitFunction.__call__` splits the inputs into what is
differentiated and what is not, and calls `_implicit`, a `jax.custom_jvp`:

- its primal runs the forward, never traced for differentiation;
- its JVP rule recomputes `y` through `_implicit` itself (so that a derivative of the
  rule, at any order, again meets the implicit rule), linearises the conditions at
  `(x, y)`, and solves `A ẏ = −B ẋ` with `lax.custom_linear_solve`.

Reverse mode is not written here: JAX transposes the JVP rule. The transpose of
`custom_linear_solve` calls its `transpose_solve`, so a VJP solves `Aᵀ u = v` and
returns `−Bᵀ u`. The solver's `presolve` runs inside `solve`/`transpose_solve`: it
depends only on `A`, so `vmap` over right-hand sides (`jacfwd`, `jacrev`) leaves it
unbatched and it runs once per linearisation point, in the one direction in use.
"""

import types
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax._src import core as jax_core
from jaxtyping import PyTree

from ._failure import ON_FAILURE_CHOICES, CallSite, OnFailure, apply_policy
from ._misc import all_finite, is_inexact_array, ravel, structure, unravel
from ._representation import AbstractRepresentation, as_representation
from ._solve import solve_linearised
from ._solvers._auto import Auto
from ._solvers._base import AbstractLinearSolver
from ._solvers._least_squares import LeastSquares
from ._solvers._preconditioner import AbstractPreconditioner


class ImplicitFunction(eqx.Module):
    """A function `x ↦ y` defined by conditions `c(x, y) = 0`, differentiated by the
    implicit function theorem.

    Calling it runs `forward`. Differentiating it never differentiates `forward`:
    with `A = ∂c/∂y` and `B = ∂c/∂x` at the forward's output, a JVP solves
    `A ẏ = −B ẋ` and a VJP solves `Aᵀ u = v` and returns `−Bᵀ u`, both with
    `linear_solver`. Every JAX transform works and composes: `jax.jvp`, `jax.jacfwd`,
    `jax.grad`, `jax.vjp`, `jax.jacrev`, `jax.hessian` (any nesting), `jax.jit`,
    `jax.vmap`.

    **What is differentiated.** Every floating-point array leaf of `x` and of `args`,
    and of `conditions` when it is a pytree (an `equinox.Module` holding parameters,
    say). Integer and boolean arrays get no derivative; non-array leaves are static.
    The byproduct `z` is a constant: its derivative is zero. Arrays held by `forward`
    get zero derivative too, which is right: `y` depends on them only through the
    conditions.

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import implicitdiff as idf

        def forward(x):  # Newton's method: not differentiated
            y = jnp.ones_like(x)
            for _ in range(30):
                y = y - (y**2 - x) / (2 * y)
            return y

        def conditions(x, y):
            return y**2 - x

        sqrt = idf.ImplicitFunction(forward, conditions)
        jax.jacobian(sqrt)(jnp.array([4.0, 9.0]))  # diag(1 / (2 sqrt(x)))
        ```
    """

    forward: Callable
    conditions: Callable
    linear_solver: AbstractLinearSolver = Auto()
    representation: AbstractRepresentation = eqx.field(
        default="operator", converter=as_representation
    )
    has_byproduct: bool = eqx.field(default=False, static=True)
    on_failure: OnFailure = eqx.field(default="warn", static=True)
    check_conditions: float | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        for name in ("forward", "conditions"):
            if not callable(getattr(self, name)):
                raise TypeError(
                    f"ImplicitFunction: `{name}` must be callable, "
                    f"got {getattr(self, name)!r}."
                )
        if isinstance(self.linear_solver, AbstractPreconditioner):
            raise TypeError(
                f"ImplicitFunction: {type(self.linear_solver).__name__} is a "
                "preconditioner, an approximate inverse: as the `linear_solver` its "
                "derivatives would be wrong. Pass it as the `preconditioner` of a "
                "Krylov solver, e.g. GMRES(preconditioner=...)."
            )
        if not isinstance(self.linear_solver, AbstractLinearSolver):
            raise TypeError(
                "ImplicitFunction: `linear_solver` must be an "
                f"implicitdiff.AbstractLinearSolver, got {self.linear_solver!r}. "
                "Wrap a lineax solver as implicitdiff.Lineax(solver)."
            )
        if self.on_failure not in ON_FAILURE_CHOICES:
            raise ValueError(
                f"ImplicitFunction: `on_failure` must be one of {ON_FAILURE_CHOICES}, "
                f"got {self.on_failure!r}."
            )
        if self.check_conditions is not None and not self.check_conditions > 0:
            raise ValueError(
                "ImplicitFunction: `check_conditions` must be a positive tolerance or "
                f"None, got {self.check_conditions!r}."
            )
        if not isinstance(self.has_byproduct, bool):
            raise TypeError(
                f"ImplicitFunction: `has_byproduct` must be a bool, "
                f"got {self.has_byproduct!r}."
            )

    def __call__(self, x: PyTree, *args: Any) -> PyTree:
        """Runs the forward.

        **Arguments:**

        - `x`: a pytree; its floating-point arrays are differentiable.
        - `*args`: more inputs passed to `forward` and `conditions`, differentiable
            like `x`.

        **Returns:**

        `y`, or `(y, z)` when `has_byproduct=True`.
        """
        site = CallSite.of_caller()
        forward, conditions = self._hoist_closed_over_tracers(x, args)
        inputs = (conditions, x, args)
        arrays, static_inputs = eqx.partition(inputs, eqx.is_array)
        diff, nondiff = eqx.partition(arrays, is_inexact_array)
        held, static_self = eqx.partition(
            (forward, self.linear_solver, self.representation), eqx.is_array
        )
        output_static = []  # filled by the primal: the forward's non-array outputs

        def unpack(diff, nondiff, held):
            conditions, x, args = eqx.combine(diff, nondiff, static_inputs)
            forward, solver, representation = eqx.combine(held, static_self)
            return conditions, x, args, forward, solver, representation

        @jax.custom_jvp
        def implicit(diff, nondiff, held):
            conditions, x, args, forward, _, _ = unpack(diff, nondiff, held)
            y, z = self._split_output(_call_forward(forward, x, args))
            y = jax.tree.map(jnp.asarray, y)
            self._check_conditions_output(conditions, x, y, z, args)
            if self.check_conditions is not None:
                y = self._verify_solution(conditions, x, y, z, args, site)
            out_arrays, out_static = eqx.partition((y, z), eqx.is_array)
            output_static[:] = [out_static]
            return out_arrays

        @implicit.defjvp
        def implicit_jvp(primals, tangents):
            diff, nondiff, held = primals
            t_diff = tangents[0]
            out_arrays = implicit(diff, nondiff, held)
            y, z = eqx.combine(out_arrays, output_static[0])
            _, _, _, _, solver, representation = unpack(diff, nondiff, held)

            def c(diff, y):
                conditions, x, args, _, _, _ = unpack(diff, nondiff, held)
                return self._conditions(conditions, x, y, z, args)

            _, A = jax.linearize(lambda y: c(diff, y), y)
            _, B_t = jax.jvp(lambda d: c(d, y), (diff,), (t_diff,))
            # Through ravel, every leaf of the rhs is linear in the tangents, even a
            # condition that does not involve x (which JAX could not transpose).
            rhs = unravel(-ravel(B_t), structure(B_t))
            y_finite = all_finite(y)  # NaN y (a failed check): NaN in, not a failure
            y_dot = solve_linearised(
                A, rhs, y, y_finite, solver, representation, self.on_failure, site
            )
            if self.check_conditions is not None:
                # A product, not a `where`: its transpose keeps the NaN in reverse mode.
                y_dot = jax.tree.map(
                    lambda t: t * jnp.where(y_finite, 1, jnp.nan).astype(t.dtype), y_dot
                )
            z_dot = jax.tree.map(_zero_tangent, out_arrays[1])
            return out_arrays, (y_dot, z_dot)

        out_arrays = implicit(diff, nondiff, held)
        y, z = eqx.combine(out_arrays, output_static[0])
        return (y, z) if self.has_byproduct else y

    def _hoist_closed_over_tracers(self, x, args):
        """Makes the tracers that `forward` and `conditions` close over explicit.

        A closure over a value being differentiated would otherwise leak a tracer into
        the custom rule. Closure conversion turns those values into array leaves of the
        functions: the conditions' floating ones are then differentiated like `x`, the
        forward's get zero derivative (`y` depends on them only through `c`). Only
        under a transformation, and only when a tracer is actually closed over: the
        user's functions are otherwise called as they are.
        """
        forward, conditions = self.forward, self.conditions
        if jax_core.trace_state_clean():
            return forward, conditions
        try:
            converted = eqx.filter_closure_convert(forward, x, *args)
            if _closes_over_tracers(converted):
                forward = converted
            if _is_plain_function(conditions):  # nothing it could close over
                return forward, conditions
            y, z = self._split_output(eqx.filter_eval_shape(converted, x, *args))
        except Exception:
            # JAX cannot trace this forward (NumPy, SciPy): it can close over no tracer,
            # and a malformed output is reported when the forward runs.
            return self.forward, conditions
        extra = (z,) if self.has_byproduct else ()
        converted = eqx.filter_closure_convert(conditions, x, y, *extra, *args)
        if _closes_over_tracers(converted):
            conditions = converted
        return forward, conditions

    def _split_output(self, output):
        if not self.has_byproduct:
            y, z = output, None
        elif isinstance(output, tuple) and len(output) == 2:
            y, z = output
        else:
            raise TypeError(
                "ImplicitFunction: with has_byproduct=True, `forward` must return a "
                f"tuple (y, z); it returned {type(output).__name__}."
            )
        leaves = jax.tree.leaves(y)
        if not leaves or not all(_is_inexact(leaf) for leaf in leaves):
            raise TypeError(
                "ImplicitFunction: `forward` must return y as a non-empty pytree of "
                f"floating-point arrays; got {_structure_or_repr(y)}."
            )
        return y, z

    def _conditions(self, conditions, x, y, z, args):
        if self.has_byproduct:
            return conditions(x, y, z, *args)
        return conditions(x, y, *args)

    def _verify_solution(self, conditions, x, y, z, args, site):
        """Applies `on_failure` when ‖c(x, y)‖ > tol·(1 + ‖y‖): a forward that stopped
        early must not yield derivatives that look fine."""
        residual = _norm(self._conditions(conditions, x, y, z, args))
        failed = ~(residual <= self.check_conditions * (1 + _norm(y)))
        message = (
            f"implicitdiff: the output of the forward {_name(self.forward)} does not "
            f"satisfy the conditions: ‖c(x, y)‖ > {self.check_conditions:g}·(1 + ‖y‖); "
            f"y and its derivatives are NaN."
        )
        return apply_policy(y, failed, self.on_failure, message, site)

    def _check_conditions_output(self, conditions, x, y, z, args):
        """Raises at trace time when c cannot pair with y."""
        c_struct = jax.eval_shape(lambda: self._conditions(conditions, x, y, z, args))
        y_struct = structure(y)
        if isinstance(self.linear_solver, LeastSquares):
            same = all(
                jnp.issubdtype(leaf.dtype, jnp.inexact)
                for leaf in jax.tree.leaves(c_struct)
            )
        else:
            same = jax.tree.structure(c_struct) == jax.tree.structure(y_struct) and all(
                a.shape == b.shape and a.dtype == b.dtype
                for a, b in zip(
                    jax.tree.leaves(c_struct), jax.tree.leaves(y_struct), strict=True
                )
            )
        if not same:
            raise ValueError(
                "ImplicitFunction: `conditions` must return c with the same pytree "
                "structure, shapes and dtypes as y (a square system); "
                f"y is {y_struct} but c is {c_struct}. "
                "For more conditions than unknowns use linear_solver=LeastSquares()."
            )


def _call_forward(forward, x, args):
    try:
        return forward(x, *args)
    except Exception as error:
        if hasattr(error, "add_note"):  # Python ≥ 3.11
            error.add_note(
                f"(raised by the forward {_name(forward)} of an "
                "implicitdiff.ImplicitFunction)"
            )
        raise


def _is_inexact(leaf) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _is_plain_function(fn) -> bool:
    return isinstance(fn, types.FunctionType) and fn.__closure__ is None


def _closes_over_tracers(converted) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(converted))


def _norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.abs(leaf) ** 2) for leaf in jax.tree.leaves(tree)))


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _zero_tangent(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, jax.dtypes.float0)


def _structure_or_repr(tree):
    try:
        return structure(tree)
    except Exception:
        return repr(tree)


ImplicitFunction.__init__.__doc__ = """**Arguments:**

- `forward`: `forward(x, *args) -> y`, or `-> (y, z)` when `has_byproduct=True`. Any
    code: a Newton loop, an optax training run, a `lax.while_loop` with an early exit,
    SciPy on the host (eagerly, or under `jit` through [`implicitdiff.host`][]). It is
    never differentiated. `y` is a pytree of floating-point arrays.
- `conditions`: `conditions(x, y, *args) -> c`, or `conditions(x, y, z, *args) -> c`
    with a byproduct, written in JAX, with `c = 0` at the forward's output. `c` has
    the structure, shapes and dtypes of `y` (a square system), except with
    [`implicitdiff.LeastSquares`][], where it may have more elements. An
    `equinox.Module` works too: its floating-point arrays are differentiated.
- `linear_solver`: an [`implicitdiff.AbstractLinearSolver`][]. Default
    [`implicitdiff.Auto`][]: dense LU up to 1024 unknowns, GMRES above.
- `representation`: how `A = ∂c/∂y` reaches the solver: `"operator"` (matrix-free,
    the default), `"matrix"` (dense, materialised once per linearisation point), or an
    [`implicitdiff.AbstractRepresentation`][] such as [`implicitdiff.Sparse`][].
- `has_byproduct`: whether `forward` returns `(y, z)`; `z` is passed to the
    conditions and returned, with zero derivative.
- `on_failure`: what a failed linear solve does. Its derivative is always all-NaN;
    `"nan"` says nothing more, `"warn"` (default) also emits a `RuntimeWarning` naming
    the solver, once per call site (under `jit` too), `"raise"` raises an
    [`implicitdiff.OnFailureError`][] (under `jit` too, as the last line of JAX's
    `JaxRuntimeError`; on every device of a sharded program). A program exported with
    `jax.export` needs `"nan"`: JAX cannot serialise the host callback of the others.
    When nothing fails the check is one
    branch on a flag, but `"warn"` and `"raise"` put a host callback in the compiled
    program, and JAX (0.10) then skips its fast C++ dispatch: about 20 µs more per
    call of the outermost `jit`. Negligible for a training step. For a jitted function
    that runs in microseconds on CPU, time `"nan"` too: it keeps the fast dispatch,
    but XLA then runs any program it estimates above 1000 flops on a worker thread (a
    thread switch per call), and which costs more depends on the machine.
- `check_conditions`: a tolerance, or `None` (default: no check). When set, the
    forward's output is checked: if `‖c(x, y)‖ > tol·(1 + ‖y‖)` (2-norms over all
    leaves) the forward did not solve the conditions, `y` becomes NaN and `on_failure`
    applies. Costs one evaluation of the conditions per call.
"""
