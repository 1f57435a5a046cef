"""`argmin`: an optax optimiser as the forward, its optimality as the conditions."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, PyTree

from ._conditions import projected_gradient, stationary
from ._implicit_function import ImplicitFunction
from ._misc import is_inexact_array, tree_norm


def _optax():
    try:
        import optax
    except ImportError as error:
        raise ImportError(
            "implicitdiff.argmin runs an optax optimiser: pip install optax"
        ) from error
    return optax


def _no_forward(*args, **kwargs):
    raise AssertionError("Argmin replaces this forward on every call")


class Argmin(eqx.Module):
    """`x ↦ argmin_y f(x, y)` (over `y ∈ C(x)` with a projection): an optax
    optimiser as the forward, differentiated by the implicit function theorem.

    Made by [`implicitdiff.argmin`][]; call it as `solve(x, *args, init=y0)`.
    """

    f: Callable
    optimizer: Any
    projection: Callable | None
    implicit: ImplicitFunction
    tol: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)

    def __call__(self, x: PyTree, *args: Any, init: PyTree, **kwargs: Any) -> PyTree:
        """Minimises `y ↦ f(x, y, *args, **kwargs)` from `init`.

        **Arguments:**

        - `x`, `*args`, `**kwargs`: the inputs of `f` besides `y`; their floating
            arrays are differentiable.
        - `init`: the starting point, which fixes the structure, shapes and dtypes
            of `y` (a warm start between outer steps, say). It gets no derivative.

        **Returns:**

        The minimiser `y`, or NaN (and the `on_failure` policy) when the optimiser
        stopped after `max_steps` short of the tolerance.
        """
        init = jax.tree.map(jnp.asarray, init)
        if not all(is_inexact_array(leaf) for leaf in jax.tree.leaves(init)):
            raise TypeError(
                "argmin: `init` must be floating-point arrays (it fixes the "
                "structure, shapes and dtypes of y): jnp.zeros(n), not integers; got "
                f"{jax.tree.map(lambda leaf: leaf.dtype, init)}."
            )
        forward = _OptaxLoop(self, init)
        implicit = eqx.tree_at(lambda i: i.forward, self.implicit, forward)
        y, _ = implicit(x, *args, **kwargs)
        return y


class _OptaxLoop(eqx.Module):
    """The forward: optax steps in a `lax.while_loop` until the conditions' residual
    (the gradient, or the projected-gradient step) is at most `tol` in 2-norm, or
    `max_steps` steps. `init` is held here, not passed: it gets no derivative.
    Returns `(y, converged)`: whether the last residual is within the check's
    tolerance, by the loop's own test (see `_UnlessStoppedShort`)."""

    argmin: Argmin
    init: PyTree[Array]

    def __call__(self, x, *args, **kwargs):
        return _minimise(self.argmin, self.init, x, *args, **kwargs)

    def implicitdiff_failure_message(self) -> str:
        """The message of a failed check."""
        return (
            f"implicitdiff.argmin: the optimiser stopped after at most "
            f"max_steps={self.argmin.max_steps} steps with the residual's 2-norm "
            f"above check_conditions={self.argmin.implicit.check_conditions:g}, or "
            "at a non-finite y; every output and every derivative is NaN. Raise "
            "max_steps, take a faster optimiser or step size, or loosen the check "
            "(check_conditions=tol, or None to turn it off)."
        )


def _minimise(argmin: Argmin, init, x, *args, **kwargs):
    optax = _optax()
    optimizer = optax.with_extra_args_support(argmin.optimizer)
    objective = lambda y: argmin.f(x, y, *args, **kwargs)
    conditions = argmin.implicit.conditions.conditions
    project = lambda y: _project(argmin.projection, y, x, *args, **kwargs)

    def value_and_grad(y, state):
        # L-BFGS's line search leaves the value and gradient at its new point in the
        # state; a projection moves the point, so then they are recomputed.
        stored = argmin.projection is None and all(
            optax.tree.get(state, key) is not None for key in ("value", "grad")
        )
        if stored:
            return optax.value_and_grad_from_state(objective)(y, state=state)
        return jax.value_and_grad(objective)(y)

    def residual(y, grad):
        if argmin.projection is None:
            return grad
        return conditions.residual(x, y, grad, *args, **kwargs)

    def within(tolerance, y, grad):
        return tree_norm(residual(y, grad)) <= tolerance  # False for NaN

    def unfinished(carry):
        y, _, _, grad, steps = carry
        return ~within(argmin.tol, y, grad) & (steps < argmin.max_steps)

    def step(carry):
        y, state, value, grad, steps = carry
        updates, state = optimizer.update(
            grad, state, y, value=value, grad=grad, value_fn=objective
        )
        y = optax.apply_updates(y, updates)
        if argmin.projection is not None:
            y = project(y)
        value, grad = value_and_grad(y, state)
        return y, state, value, grad, steps + 1

    init = jax.tree.map(jnp.asarray, init)
    if argmin.projection is not None:
        init = project(init)
    state = optimizer.init(init)
    value, grad = value_and_grad(init, state)
    y, _, _, grad, _ = lax.while_loop(unfinished, step, (init, state, value, grad, 0))
    tolerance = argmin.implicit.check_conditions
    return y, jnp.asarray(True if tolerance is None else within(tolerance, y, grad))


def _project(projection: Callable, y, x, *args, **kwargs):
    try:
        return projection(y, x, *args, **kwargs)
    except TypeError as error:
        error.add_note(
            "implicitdiff.argmin calls projection(v, x, *args, **kwargs): wrap a "
            "projection of implicitdiff.projections in a function that picks its "
            "parameters, e.g. projection=lambda v, x: projections.box(v, 0.0, x)."
        )
        raise


class _UnlessStoppedShort(eqx.Module):
    """The conditions, all NaN when the optimiser did not converge. The check of
    `ImplicitFunction` is relative (`‖c‖ ≤ tol·(1 + ‖y‖)`), looser than the loop's
    `‖c‖ ≤ tol` for a large `y`: a run cut by `max_steps` could pass it. The loop's
    own verdict, a constant to the derivatives, makes it fail exactly when the loop
    did not reach the tolerance."""

    conditions: Callable

    def __call__(self, x, y, converged, *args, **kwargs):
        c = self.conditions(x, y, *args, **kwargs)
        gap = jnp.where(converged, 0.0, jnp.nan)
        return jax.tree.map(lambda leaf: leaf + gap.astype(leaf.dtype), c)


def argmin(
    f: Callable,
    optimizer: Any,
    *,
    tol: float,
    max_steps: int,
    projection: Callable | None = None,
    **implicit_options: Any,
) -> Argmin:
    """Differentiate an optimiser in one line: `x ↦ argmin_y f(x, y)`, minimised by
    any optax optimiser, differentiated by the implicit function theorem.

    The forward runs `optimizer` on `y ↦ f(x, y, *args)` in a `lax.while_loop`
    until the gradient's 2-norm is at most `tol` (with a projection: the
    projected-gradient residual `‖y − P(y − ∇f)‖₂`), or `max_steps` steps. The
    conditions are [`implicitdiff.conditions.stationary`][]`(f)`, or
    [`implicitdiff.conditions.projected_gradient`][]`(f, projection)` with a
    projection, whose steps are then projected: `y ← P(y + update)`.

    A run stopped by `max_steps` short of `tol` is not returned as converged: `y`
    and its derivatives are NaN and `on_failure` applies (a warning by default).
    `check_conditions` (default `tol`) is here the loop's own test, absolute: the
    residual's 2-norm at most `check_conditions`, whatever the size of `y`. The
    conditions are first-order: a run that ends at a saddle point or a maximum (from
    a start where the gradient vanishes, say `init = 0` for `y⁴ − y² − x·y`) is a
    stationary point, returned with that point's derivative; start elsewhere, or
    check the curvature, when `f` is not convex.

    !!! Example

        ```python
        import optax
        import implicitdiff as idf

        def f(lam, w, X, t):  # ridge regression
            return 0.5 * jnp.sum((X @ w - t) ** 2) + 0.5 * lam * jnp.sum(w**2)

        ridge = idf.argmin(f, optax.lbfgs(), tol=1e-10, max_steps=100)
        w = ridge(lam, X, t, init=jnp.zeros(X.shape[1]))
        jax.grad(lambda lam: validation_loss(ridge(lam, X, t, init=w0)))(lam)
        ```

    **Arguments:**

    - `f`: the objective `f(x, y, *args, **kwargs) -> scalar`, twice differentiable
        in `y` (a pytree) and differentiable in the inputs.
    - `optimizer`: an `optax.GradientTransformation`. `optax.lbfgs()` and other
        line searches get the `value`, `grad` and `value_fn` they need.
    - `tol`: the stopping tolerance on the residual's 2-norm.
    - `max_steps`: the most optimiser steps.
    - `projection`: `projection(v, x, *args, **kwargs)`, the Euclidean projection
        onto the feasible set (one of [`implicitdiff.projections`][]
        in a lambda that picks its parameters), or `None` (unconstrained). It suits
        first-order optimisers (`optax.sgd`, `optax.adam`); a line search does not
        know about it.
    - `**implicit_options`: any option of [`implicitdiff.ImplicitFunction`][]:
        `linear_solver`, `representation`, `on_failure`, `check_conditions`
        (default: `tol`; a larger value accepts a run stopped short of `tol`,
        `None` turns the check off).

    **Returns:**

    An [`implicitdiff.Argmin`][], called as `solve(x, *args, init=y0, **kwargs)`.
    """
    if not (
        callable(getattr(optimizer, "init", None))
        and callable(getattr(optimizer, "update", None))
    ):
        hint = " (call the factory: optax.sgd(0.1))" if callable(optimizer) else ""
        raise TypeError(
            "argmin: `optimizer` must be an optax GradientTransformation such as "
            f"optax.lbfgs() or optax.sgd(0.1){hint}; got {optimizer!r}."
        )
    if projection is None:
        conditions = stationary(f)
    else:
        conditions = projected_gradient(f, projection)
    implicit_options.setdefault("check_conditions", tol)
    if "has_byproduct" in implicit_options:
        raise TypeError("argmin: has_byproduct is not an option (y has none)")
    implicit = ImplicitFunction(
        _no_forward,
        _UnlessStoppedShort(conditions),
        has_byproduct=True,
        **implicit_options,
    )
    return Argmin(f, optimizer, projection, implicit, tol, max_steps)
