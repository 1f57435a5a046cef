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

import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jaxtyping import PyTree

from ._calling import call_compiled
from ._failure import CallSite, OnFailure, SiteNumber, calling_from, tracing_site
from ._host import is_host_function
from ._misc import (
    add_poison,
    all_finite,
    is_inexact_array,
    nan_where,
    poison_term,
    ravel,
    structure,
    unravel,
)
from ._representation import AbstractRepresentation, as_representation
from ._solve import residual_curvature, solve_linearised
from ._solvers._auto import Auto
from ._solvers._base import AbstractLinearSolver
from ._solvers._least_squares import LeastSquares
from ._user_code import (
    OPAQUE,
    announce_moving_byproduct,
    byproduct_moves,
    cached,
    call_forward,
    hoist_closed_over_tracers,
    outside_values,
    warn_if_inputs_ignored,
)
from ._validation import (
    announce_failed_conditions,
    check_callables,
    check_concrete_shapes,
    check_conditions_output,
    check_linear_solver,
    check_options,
    conditions_failed,
    is_pair,
    split_output,
)


class ImplicitFunction(eqx.Module):
    """A function `x ↦ y` defined by conditions `c(x, y) = 0`, differentiated by the
    implicit function theorem.

    Calling it runs `forward`. Outside `jax.jit` it compiles itself as `jax.jit`
    would (cached per function and input shapes, whichever line calls it, and per
    the values that `forward`, `conditions` and the non-array arguments read from
    globals, closures, objects and containers, so that a changed one is seen; a call
    reading what cannot be seen into runs eagerly): a later call, or derivative,
    costs what a jitted one does. A forward that cannot be traced (NumPy, Python
    branches on values), one made by [`implicitdiff.host`][], and
    `on_failure="raise"` run eagerly instead, so that their errors come out as
    themselves; so do calls with Python floats or unhashable non-array arguments
    (they cannot key the cache). Differentiating it never differentiates `forward`:
    with `A = ∂c/∂y` and `B = ∂c/∂x` at the forward's output, a JVP solves
    `A ẏ = −B ẋ` and a VJP solves `Aᵀ u = v` and returns `−Bᵀ u`, both with
    `linear_solver`. Every JAX transform works and composes: `jax.jvp`, `jax.jacfwd`,
    `jax.grad`, `jax.vjp`, `jax.jacrev`, `jax.hessian` (any nesting), `jax.jit`,
    `jax.vmap`.

    **What is differentiated.** Every floating-point array leaf of `x` and of `args`,
    and of `conditions` when it is a pytree (an `equinox.Module` holding parameters,
    say). Integer and boolean arrays get no derivative; non-array leaves are static.
    The byproduct `z` is a constant: its derivative is zero; when the conditions
    read a floating `z` that the forward computes from what is differentiated, every
    derivative is NaN with a warning (the rule would miss `∂c/∂z·dz/dx`; put such a
    quantity in `y`, or `stop_gradient` it in the forward when `∂c/∂z = 0` at the
    solution). Arrays held by `forward`
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
    # By default ‖c(x, y)‖ ≤ tol·(1 + ‖y‖) with tol = 1e-3 at the forward's output.
    check_conditions: float | None = eqx.field(default=1e-3, static=True)

    def __check_init__(self):
        check_callables(forward=self.forward, conditions=self.conditions)
        check_linear_solver(self.linear_solver)
        check_options(self.on_failure, self.check_conditions, self.has_byproduct)

    def __call__(self, x: PyTree, *args: Any, **kwargs: Any) -> PyTree:
        """Runs the forward.

        **Arguments:**

        - `x`: a pytree; its floating-point arrays are differentiable.
        - `*args`, `**kwargs`: more inputs passed to `forward` and `conditions`,
            differentiable like `x`.

        **Returns:**

        `y`, or `(y, z)` when `has_byproduct=True`.
        """
        site = CallSite.of_caller()
        # Eagerly, the errors of on_failure="raise" and of a host forward come out as
        # themselves, not inside a JaxRuntimeError; a host forward runs eagerly anyway.
        eager = self.on_failure == "raise" or is_host_function(self.forward)
        reads = ()
        if not eager:
            static_inputs = eqx.filter((x, args, kwargs), eqx.is_array, inverse=True)
            reads = outside_values(self.forward, self.conditions, static_inputs)
            eager = reads is OPAQUE  # what they read cannot key a cache
        with calling_from(site):
            return call_compiled(
                self._call,
                eager,
                SiteNumber.of(site),
                x,
                args,
                kwargs,
                reads=reads,
                site=site,
            )

    def _call(self, site: SiteNumber, x, args, kwargs):
        check_concrete_shapes((x, args, kwargs))
        forward, conditions, replayable = hoist_closed_over_tracers(
            self.forward, self.conditions, x, args, kwargs, self.has_byproduct
        )
        arrays, static_inputs = eqx.partition(
            (conditions, x, args, kwargs), eqx.is_array
        )
        diff, nondiff = eqx.partition(arrays, is_inexact_array)
        # The site's number is an input of the rule: a custom_jvp closes over no tracer.
        held, static_self = eqx.partition(
            (forward, self.linear_solver, self.representation, site), eqx.is_array
        )
        output_static = []  # filled by the primal: the forward's non-array outputs

        def unpack(diff, nondiff, held):
            inputs = eqx.combine(diff, nondiff, static_inputs)
            return inputs, eqx.combine(held, static_self)

        def primal(diff, nondiff, held):
            inputs, (forward, _, _, site) = unpack(diff, nondiff, held)
            conditions, x, args, kwargs = inputs
            output = call_forward(forward, x, args, kwargs)
            y, z = split_output(output, self.has_byproduct)
            y = jax.tree.map(jnp.asarray, y)
            c = ft.partial(self._conditions, conditions, x, y, z, args, kwargs)
            check_conditions_output(
                c,
                y,
                least_squares=isinstance(self.linear_solver, LeastSquares),
                output_was_pair=not self.has_byproduct and is_pair(output),
            )
            failed = False
            if self.check_conditions is not None:
                tolerance, policy = self.check_conditions, self.on_failure
                failed = announce_failed_conditions(
                    conditions_failed(c(), y, tolerance),
                    tolerance,
                    policy,
                    self.forward,
                    site,
                )
                # NaN-filled here, y's one reader: with the check, the output and
                # the rule each reading the forward's output, XLA split an unrolled
                # forward (the README's 30 Newton steps) into 30 fusions (3× the
                # compile time). The rule's factorisation then waits for the check.
                y, z = jax.tree.map(
                    lambda leaf: (
                        nan_where(failed, leaf) if is_inexact_array(leaf) else leaf
                    ),
                    (y, z),
                )
            out_arrays, out_static = eqx.partition((y, z), eqx.is_array)
            output_static[:] = [out_static]
            return out_arrays, jnp.asarray(failed)

        # The JVP rule calls the primal again at the same inputs: with a traced
        # forward, a jit makes that a cache hit rather than a second trace.
        implicit = jax.custom_jvp(cached(primal) if replayable else primal)

        @ft.partial(implicit.defjvp, symbolic_zeros=True)
        def implicit_jvp(primals, tangents):
            diff, nondiff, held = primals
            out_arrays, failed = outputs = implicit(diff, nondiff, held)
            y, z = eqx.combine(out_arrays, output_static[0])
            # Only the inputs being differentiated: the others' tangents are symbolic
            # zeros, and linearising in them would be wasted work.
            moving, still = eqx.partition(diff, _moving(tangents[0]))
            t_moving = eqx.filter(tangents[0], _moving(tangents[0]))
            _, (_, solver, representation, site) = unpack(diff, nondiff, held)

            def c(moving, y, z=z):
                inputs, _ = unpack(eqx.combine(moving, still), nondiff, held)
                conditions, x, args, kwargs = inputs
                return self._conditions(conditions, x, y, z, args, kwargs)

            # Values the forward closes over and that are differentiated (hoisted
            # into `held`): the rule does not differentiate the forward, so they move
            # y only through a byproduct the conditions read.
            held_moving, held_still = eqx.partition(held, _moving(tangents[2]))
            t_held = eqx.filter(tangents[2], _moving(tangents[2]))
            if not self.has_byproduct:
                held_moving = t_held = None

            def z_of(movers):
                moving, held_moving = movers
                inputs, (forward, *_) = unpack(
                    eqx.combine(moving, still),
                    nondiff,
                    eqx.combine(held_moving, held_still),
                )
                _, x, args, kwargs = inputs
                output = call_forward(forward, x, args, kwargs)
                return split_output(output, self.has_byproduct)[1]

            if not jax.tree.leaves((moving, held_moving)):
                return outputs, jax.tree.map(_zero_tangent, outputs)
            # A byproduct the conditions read but the forward computes from what
            # moves: held constant, it would make every derivative wrong.
            z_moved = (  # the message, or None
                byproduct_moves(
                    z_of,
                    (moving, held_moving),
                    lambda z: c(moving, y, z),
                    z,
                    self.on_failure,
                )
                if self.has_byproduct
                else None
            )
            z_moves = z_moved is not None
            if not jax.tree.leaves(moving):  # only the forward's closed-over values
                zeros = jax.tree.map(_zero_tangent, outputs)
                if not z_moves:
                    return outputs, zeros
                nan = _poison_unless(jnp.asarray(False), t_held, *zeros[0])
                nan = announce_moving_byproduct(z_moved, self.on_failure, site, nan)
                return outputs, (nan, zeros[1])
            warn_if_inputs_ignored(
                lambda m: c(m, y), moving, self.conditions, tracing_site()
            )
            residual, A = _linearise(lambda y: c(moving, y), y)
            _, B = jax.linearize(lambda m: c(m, y), moving)
            B_t = B(t_moving)
            # Through ravel, every leaf of the rhs is linear in the tangents, even a
            # condition that does not involve x (which JAX could not transpose).
            rhs = unravel(-ravel(B_t), structure(B_t))
            # A failed check or a non-finite y: NaN in, NaN out, not a failed solve.
            # (The check fails on a non-finite y: no second pass over y then.)
            sound = ~failed if self.check_conditions is not None else all_finite(y)
            if z_moves:
                sound = jnp.zeros_like(sound)
            curvature = None
            if isinstance(solver, LeastSquares):
                curvature = residual_curvature(c, residual, moving, y, t_moving)
            y_dot = solve_linearised(
                A,
                rhs,
                y,
                sound,
                solver,
                representation,
                self.on_failure,
                site,
                curvature=curvature,
            )
            z_dot = jax.tree.map(_zero_tangent, out_arrays[1])
            if self.check_conditions is not None or z_moves:
                y_dot, z_dot = _poison_unless(sound, (t_moving, t_held), y_dot, z_dot)
            if z_moves:
                y_dot, z_dot = announce_moving_byproduct(
                    z_moved, self.on_failure, site, (y_dot, z_dot)
                )
            return outputs, ((y_dot, z_dot), _zero_tangent(failed))

        out_arrays, _ = implicit(diff, nondiff, held)
        y, z = eqx.combine(out_arrays, output_static[0])
        return (y, z) if self.has_byproduct else y

    def _conditions(self, conditions, x, y, z, args, kwargs):
        if self.has_byproduct:
            return conditions(x, y, z, *args, **kwargs)
        return conditions(x, y, *args, **kwargs)


def _linearise(fn: Callable, y) -> tuple[PyTree, Callable]:
    """`(fn(y), v ↦ ∂fn/∂y·v)`, the map batchable. The linearisation of a
    `jax.custom_vjp` inside `fn` can only be transposed, not evaluated under `vmap`
    (solvers materialise and probe the operator that way), so then it is the
    transpose of `fn`'s VJP, which calls the custom rule."""
    c, A = jax.linearize(fn, y)
    try:
        jax.eval_shape(jax.vmap(A), jax.tree.map(lambda leaf: leaf[None], y))
        return c, A
    except TypeError as error:
        if "custom_vjp" not in str(error):
            raise
    _, vjp = jax.vjp(fn, y)
    A_transposed = jax.linear_transpose(lambda u: vjp(u)[0], structure(c))
    return c, lambda v: A_transposed(v)[0]


def _moving(tangents):
    """A filter spec: True for the leaves whose tangent is not a symbolic zero."""
    return jax.tree.map(lambda t: not isinstance(t, SymbolicZero), tangents)


def _poison_unless(sound, tangents, y_dot, z_dot):
    """`y_dot` and `z_dot` plus `poison_term`: all NaN unless `sound` (the check
    passed and `y` is finite), in both modes, also with respect to inputs the
    conditions ignore."""
    term = poison_term(~sound, tangents)
    y_dot = jax.tree.map(lambda leaf: add_poison(term, leaf), y_dot)
    return y_dot, jax.tree.map(lambda leaf: add_poison(term, leaf), z_dot)


def _zero_tangent(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, jax.dtypes.float0)


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
    [`implicitdiff.OnFailureError`][] (as itself from an eager call whose forward
    fails its check; under `jit`, and from a failed solve in a derivative, as the
    last line of JAX's `JaxRuntimeError`; on every device of a sharded program). A
    program exported with
    `jax.export` needs `"nan"`: JAX cannot serialise the host callback of the others.
    When nothing fails the check is one
    branch on a flag (about 1 µs per call); `"warn"` and `"raise"` put a host
    callback in that branch. `jax.jit` keeps its fast C++ dispatch with it, but on
    CPU a program holding a host callback runs on the calling thread: a loop that
    only dispatches calls loses the overlap of the next dispatch with the current
    run (15 µs per call on a 10-unknown dense problem), a loop that reads each
    result loses nothing. In JAX 0.10 an ahead-of-time compiled function
    (`jax.jit(f).lower(x).compile()`) holding a host callback also loses the fast
    dispatch: about 50 µs more per call of that object. For microsecond functions
    called in such loops, use `"nan"`.
- `check_conditions`: a tolerance (default `1e-3`), or `None` to turn the check off.
    The forward's output is checked on every call: if `‖c(x, y)‖ > tol·(1 + ‖y‖)`
    (2-norms over all leaves) the forward did not solve the conditions (it stopped
    early, or the conditions do not match it, say with `x` and `y` swapped): every
    output and every derivative is NaN, and `on_failure` applies. Costs one
    evaluation of the conditions per call. Conditions on a scale far from that of
    `y` (`c = 10⁸·(y − x)`, say) may need their own tolerance. With a 16-bit `y`
    the tolerance is at least 8ε of its dtype (0.0078 in float16, 0.0625 in
    bfloat16), which rounding alone reaches.

Inputs that are differentiated (floating arrays of `x`, `args` and `kwargs` that a
derivative is taken with respect to) but that the conditions do not use get a
`UserWarning` at trace time: their derivative is zero by construction. Pass such an
input (an initial guess, a tolerance) through `jax.lax.stop_gradient`, or close over
it in the forward.
"""
