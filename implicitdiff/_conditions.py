"""Ready-made conditions: fixed points, argmins, constrained argmins (projected and
proximal gradient, KKT).

Each builder returns an `equinox.Module` whose `__call__(x, y, *args, **kwargs)` is
the conditions of an [`implicitdiff.ImplicitFunction`][]. The user's functions it
holds receive `(x, *args, **kwargs)` after their own leading arguments, so parameters
living anywhere in the inputs are differentiated; being a Module, the conditions'
own floating arrays (those of an `f` that is a Module) are differentiated too.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree


def _tree_sub(a: PyTree[Array], b: PyTree[Array]) -> PyTree[Array]:
    return jax.tree.map(jnp.subtract, a, b)


def _tree_axpy(alpha, a: PyTree[Array], b: PyTree[Array]) -> PyTree[Array]:
    """`alpha·a + b`, leaf by leaf, in the dtype of `b`."""
    return jax.tree.map(lambda u, v: (alpha * u + v).astype(v.dtype), a, b)


def _tree_vdot(a: PyTree[Array], b: PyTree[Array]) -> Array:
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return sum((jnp.vdot(u, v) for u, v in leaves), jnp.zeros(()))


class _FixedPoint(eqx.Module):
    T: Callable

    def __call__(self, x, y, *args, **kwargs):
        return _tree_sub(self.T(x, y, *args, **kwargs), y)


class _Stationary(eqx.Module):
    f: Callable

    def __call__(self, x, y, *args, **kwargs):
        return _gradient(self.f, x, y, args, kwargs)


def _gradient(f, x, y, args, kwargs):
    """`∇_y f(x, y, *args, **kwargs)`."""
    return jax.grad(f, argnums=1)(x, y, *args, **kwargs)


def _gradient_step(f, step, x, y, args, kwargs):
    """`y − step·∇_y f(x, y, …)`: the point a projection or a prox is applied to."""
    return _tree_axpy(-step, _gradient(f, x, y, args, kwargs), y)


class _ProjectedGradient(eqx.Module):
    f: Callable
    projection: Callable
    step: float | Array

    def __call__(self, x, y, *args, **kwargs):
        grad = _gradient(self.f, x, y, args, kwargs)
        return self.residual(x, y, grad, *args, **kwargs)

    def residual(self, x, y, grad, *args, **kwargs):
        """`y − P(y − step·grad)` for a gradient computed elsewhere (by the forward
        of [`implicitdiff.argmin`][], which has it at hand)."""
        z = _tree_axpy(-self.step, grad, y)
        return _tree_sub(y, self.projection(z, x, *args, **kwargs))


class _ProximalGradient(eqx.Module):
    f: Callable
    prox: Callable
    step: float | Array

    def __call__(self, x, y, *args, **kwargs):
        z = _gradient_step(self.f, self.step, x, y, args, kwargs)
        return _tree_sub(y, self.prox(z, self.step, x, *args, **kwargs))


class _KKT(eqx.Module):
    f: Callable
    equality: Callable | None
    inequality: Callable | None

    def __call__(self, x, y, *args, **kwargs):
        p, nu, lam = y

        def lagrangian(p):
            value = self.f(x, p, *args, **kwargs)
            if self.equality is not None:
                value = value + _tree_vdot(nu, self.equality(x, p, *args, **kwargs))
            if self.inequality is not None:
                value = value + _tree_vdot(lam, self.inequality(x, p, *args, **kwargs))
            return value

        stationarity = jax.grad(lagrangian)(p)
        primal = None
        if self.equality is not None:
            primal = self.equality(x, p, *args, **kwargs)
        complementarity = None
        if self.inequality is not None:
            g = self.inequality(x, p, *args, **kwargs)
            complementarity = jax.tree.map(jnp.multiply, lam, g)
        return stationarity, primal, complementarity


def fixed_point(T: Callable) -> Callable:
    """The conditions of a fixed point `y = T(x, y)`: `c = T(x, y, *args) − y`.

    `∂c/∂y = ∂T/∂y − I` is regular unless `T` has an eigenvalue 1 at the fixed
    point; a contraction never does.

    **Arguments:**

    - `T`: `T(x, y, *args, **kwargs) -> y`, same structure, shapes and dtypes as `y`.

    **Returns:**

    `conditions(x, y, *args, **kwargs)`, an `equinox.Module`.
    """
    return _FixedPoint(T)


def stationary(f: Callable) -> Callable:
    """The conditions of an unconstrained argmin `y = argmin_y f(x, y)`:
    `c = ∇_y f(x, y, *args)`.

    `∂c/∂y` is the Hessian `∇²_y f`: regular at a strict local minimum.

    **Arguments:**

    - `f`: `f(x, y, *args, **kwargs) -> scalar`, twice differentiable in `y` (a
        pytree) and differentiable in `x`, `args`.

    **Returns:**

    `conditions(x, y, *args, **kwargs)`, an `equinox.Module`.
    """
    return _Stationary(f)


def projected_gradient(
    f: Callable, projection: Callable, step: float = 1.0
) -> Callable:
    """The conditions of a constrained argmin `y = argmin_{y ∈ C(x)} f(x, y)` over a
    convex set `C`: `c = y − P(y − step·∇_y f(x, y, *args), x, *args)`, with `P` the
    Euclidean projection onto `C`; `c = 0` exactly at the constrained minimum.

    **Arguments:**

    - `f`: `f(x, y, *args, **kwargs) -> scalar`, twice differentiable in `y`.
    - `projection`: `projection(v, x, *args, **kwargs) -> P(v)`, for instance
        `lambda v, x, *args: projections.box(v, 0.0, x)` for a bound that is a
        parameter; one of [`implicitdiff.projections`][]
        or the user's own, differentiable in `v` and its parameters.
    - `step`: a positive step length. The derivative does not depend on it; it
        changes only the scale of `c`.

    **Returns:**

    `conditions(x, y, *args, **kwargs)`, an `equinox.Module`.
    """
    return _ProjectedGradient(f, projection, step)


def proximal_gradient(f: Callable, prox: Callable, step: float = 1.0) -> Callable:
    """The conditions of a composite argmin `y = argmin_y f(x, y) + h(x, y)`:
    `c = y − prox(y − step·∇_y f(x, y, *args), step, x, *args)`, with `prox` the
    proximal operator of `step·h`; `c = 0` exactly at the minimum.

    **Arguments:**

    - `f`: the smooth part, `f(x, y, *args, **kwargs) -> scalar`.
    - `prox`: `prox(v, step, x, *args, **kwargs) -> argmin_u ½‖u − v‖² + step·h(u)`,
        for instance `lambda v, step, lam, *args: prox.l1(v, step * lam)` for the
        lasso with strength `x = lam`; see
        [`implicitdiff.prox`][].
    - `step`: a positive step length. The derivative does not depend on it.

    **Returns:**

    `conditions(x, y, *args, **kwargs)`, an `equinox.Module`.
    """
    return _ProximalGradient(f, prox, step)


def kkt(
    f: Callable, equality: Callable | None = None, inequality: Callable | None = None
) -> Callable:
    """The KKT conditions of `min_p f(x, p) s.t. equality(x, p) = 0,
    inequality(x, p) ≤ 0`, in the variables `y = (p, ν, λ)`:

        c = (∇_p [f + ⟨ν, equality⟩ + ⟨λ, inequality⟩],  equality,  λ ∘ inequality)

    The complementarity `λ ∘ g = 0` (rather than `min(λ, −g)`) makes `∂c/∂y`
    regular at a strictly complementary solution satisfying the linear independence
    of the active constraints' gradients and the second-order sufficient condition.

    **Arguments:**

    - `f`: `f(x, p, *args, **kwargs) -> scalar`.
    - `equality`: `equality(x, p, *args, **kwargs) -> h` (a pytree), or `None`.
    - `inequality`: `inequality(x, p, *args, **kwargs) -> g` (a pytree), or `None`.

    **Returns:**

    `conditions(x, (p, ν, λ), *args, **kwargs) -> c`, an `equinox.Module`, for a
    forward that returns `(p, ν, λ)`: `ν` shaped like `h`, `λ ≥ 0` shaped like `g`,
    `None` in place of the dual of an absent constraint.
    """
    return _KKT(f, equality, inequality)
