"""The implicit rule: every transform, on problems with analytic derivatives."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import (
    central_difference_jacobian,
    newton_sqrt,
    ridge_conditions,
    ridge_data,
    ridge_dw_dlam,
    ridge_forward,
    ridge_solution,
    sqrt_conditions,
    sqrt_jacobian,
    stacked_sqrt,
    stacked_sqrt_conditions,
    stacked_sqrt_jacobian,
)
from jax import lax

import implicitdiff as idf

SOLVERS = {
    "direct": dict(linear_solver=idf.Direct()),
    "direct-matrix": dict(linear_solver=idf.Direct(), representation="matrix"),
    "auto": dict(),
    "lineax-lu": dict(linear_solver=idf.Lineax(lx.LU())),
    "gmres": dict(linear_solver=idf.GMRES(rtol=1e-12, atol=1e-12)),
}

X = jnp.array([1.0, 2.0, 3.0])


def assert_close(actual, expected, tol=1e-8):
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol
    )


@pytest.fixture(params=list(SOLVERS), scope="module")
def stacked(request):
    """The non-symmetric problem with a non-square B, with each solver."""
    return idf.ImplicitFunction(
        stacked_sqrt, stacked_sqrt_conditions, **SOLVERS[request.param]
    )


def test_value(stacked):
    assert_close(stacked(X), stacked_sqrt(X))


def test_jvp(stacked):
    tangent = jnp.array([0.3, -1.0, 2.0])
    _, y_dot = jax.jvp(stacked, (X,), (tangent,))
    assert_close(y_dot, stacked_sqrt_jacobian(X) @ tangent)


def test_vjp(stacked):
    cotangent = jnp.arange(6.0)
    _, pullback = jax.vjp(stacked, X)
    assert_close(pullback(cotangent)[0], stacked_sqrt_jacobian(X).T @ cotangent)


@pytest.mark.parametrize("jacobian", [jax.jacfwd, jax.jacrev], ids=["jacfwd", "jacrev"])
def test_jacobian_jit(stacked, jacobian):
    assert_close(jacobian(stacked)(X), stacked_sqrt_jacobian(X))
    assert_close(jax.jit(jacobian(stacked))(X), stacked_sqrt_jacobian(X))


def test_grad_vmap(stacked):
    loss = lambda x: jnp.sum(stacked(x) ** 3)
    reference = lambda x: jnp.sum(stacked_sqrt(x) ** 3)
    xs = jnp.stack([X, X + 1.0, 2.0 * X])
    assert_close(
        jax.jit(jax.vmap(jax.grad(loss)))(xs), jax.vmap(jax.grad(reference))(xs)
    )


@pytest.mark.parametrize("outer", [jax.jacfwd, jax.jacrev], ids=["fwd", "rev"])
@pytest.mark.parametrize("inner", [jax.jacfwd, jax.jacrev], ids=["fwd", "rev"])
def test_hessian_all_orders_of_modes(stacked, outer, inner):
    # The reference differentiates the closed form; the implicit function must match
    # it at second order, which needs y itself to carry the rule inside the JVP rule.
    loss = lambda x: jnp.sum(jnp.sin(stacked(x)) * jnp.arange(1.0, 7.0))
    reference = lambda x: jnp.sum(jnp.sin(stacked_sqrt(x)) * jnp.arange(1.0, 7.0))
    hessian = outer(inner(loss))
    # jax.hessian's composition op by op; the others traced the same way but compiled
    # as one program (GMRES op by op: 2-3 times the compilation).
    if (outer, inner) != (jax.jacfwd, jax.jacrev):
        hessian = jax.jit(hessian)
    assert_close(hessian(X), jax.hessian(reference)(X), tol=1e-7)


def test_newton_while_loop_all_transforms():
    sqrt = idf.ImplicitFunction(newton_sqrt, sqrt_conditions)
    x = jnp.array([1.0, 4.0, 9.0, 2.0])
    assert_close(sqrt(x), jnp.sqrt(x))
    assert_close(jax.jacfwd(sqrt)(x), sqrt_jacobian(x))
    assert_close(jax.jit(jax.jacrev(sqrt))(x), sqrt_jacobian(x))
    third = jax.jacfwd(jax.jacrev(jax.grad(lambda x: jnp.sum(sqrt(x)))))(x)
    expected = jax.jacfwd(jax.jacrev(jax.grad(lambda x: jnp.sum(jnp.sqrt(x)))))(x)
    assert_close(third, expected, tol=1e-7)
    # Unrolling the same forward cannot give reverse-mode derivatives at all.
    with pytest.raises(ValueError, match="while_loop"):
        jax.grad(lambda x: jnp.sum(newton_sqrt(x)))(x)


def test_ridge_argmin_wrt_regularisation():
    X_data, t = ridge_data()
    ridge = idf.ImplicitFunction(ridge_forward, ridge_conditions)
    lam = 0.7
    assert_close(ridge(lam, X_data, t), ridge_solution(lam, X_data, t), tol=1e-7)
    expected = ridge_dw_dlam(lam, X_data, t)
    assert_close(jax.jacfwd(ridge)(lam, X_data, t), expected, tol=1e-7)
    assert_close(jax.jacrev(ridge)(lam, X_data, t), expected, tol=1e-7)
    # The data are args, differentiable too: check against the closed form.
    dw_dt = jax.jacrev(ridge, argnums=2)(lam, X_data, t)
    assert_close(dw_dt, jax.jacrev(ridge_solution, argnums=2)(lam, X_data, t), tol=1e-7)


def test_fixed_point_of_cosine():
    def forward(theta):
        return lax.fori_loop(
            0, 200, lambda _, y: jnp.cos(y) + theta, jnp.zeros_like(theta)
        )

    fixed_point = idf.ImplicitFunction(forward, lambda theta, y: jnp.cos(y) + theta - y)
    theta = jnp.array([0.0, 0.5, -0.3])
    y = fixed_point(theta)
    assert_close(jnp.cos(y) + theta, y, tol=1e-12)
    assert_close(jax.jacrev(fixed_point)(theta), jnp.diag(1 / (1 + jnp.sin(y))))


def test_box_constrained_argmin_by_projected_gradient():
    # min Σ (y² − x)² on [0, 1]ⁿ: y = √x inside the box, y = 1 where x > 1.
    eta = 0.1
    project = lambda p: jnp.clip(p, 0.0, 1.0)

    def forward(x):
        step = lambda _, y: project(y - eta * 4 * (y**2 - x) * y)
        return lax.fori_loop(0, 2000, step, jnp.full_like(x, 0.5))

    def conditions(x, y):
        return y - project(y - eta * 4 * (y**2 - x) * y)

    argmin = idf.ImplicitFunction(forward, conditions)
    x = jnp.array([0.3, 1.4])
    assert_close(argmin(x), jnp.array([jnp.sqrt(0.3), 1.0]), tol=1e-10)
    expected = jnp.diag(jnp.array([0.5 / jnp.sqrt(0.3), 0.0]))
    assert_close(jax.jacfwd(argmin)(x), expected)
    assert_close(jax.jacrev(argmin)(x), expected)


def test_byproduct_is_constant_and_returned():
    def forward(x, scale):
        power = jnp.array(2, dtype=jnp.int32)
        return x ** (1 / power), (power, "note", jnp.array(7.0))

    def conditions(x, y, z, scale):
        power, _, _ = z
        return scale * (y**power - x)

    f = idf.ImplicitFunction(forward, conditions, has_byproduct=True)
    y, (power, note, extra) = f(X, 3.0)
    assert note == "note" and int(power) == 2 and float(extra) == 7.0
    assert_close(jax.jacrev(lambda x: f(x, 3.0)[0])(X), sqrt_jacobian(X))
    # The byproduct's floating part has zero derivative, without error.
    assert_close(jax.grad(lambda x: f(x, 3.0)[1][2])(X), jnp.zeros(3))
    # The extra arg is differentiable: c = s (y² − x) has ∂y/∂s = 0.
    assert_close(jax.grad(lambda s: jnp.sum(f(X, s)[0]))(3.0), 0.0)


def test_pytree_x_y_and_args():
    # y = {"d": m √a, "e": √b}, x = {"a", "b"}, m an extra argument.
    def forward(x, m):
        return {"d": m * jnp.sqrt(x["a"]), "e": jnp.sqrt(x["b"])}

    def conditions(x, y, m):
        return {"d": (y["d"] / m) ** 2 - x["a"], "e": y["e"] ** 2 - x["b"]}

    f = idf.ImplicitFunction(forward, conditions)
    x = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[3.0, 4.0], [5.0, 6.0]])}
    m = 6.0
    for jacobian in (jax.jacfwd, jax.jacrev):
        implicit = jacobian(f, argnums=(0, 1))(x, m)
        closed = jacobian(forward, argnums=(0, 1))(x, m)
        jax.tree.map(assert_close, implicit, closed)


def test_conditions_module_parameters_are_differentiated():
    class Conditions(eqx.Module):
        scale: jax.Array

        def __call__(self, x, y):
            return y**2 - self.scale * x

    def loss(scale):
        f = idf.ImplicitFunction(lambda x: jnp.sqrt(scale * x), Conditions(scale))
        return jnp.sum(f(X))

    expected = jnp.sum(jnp.sqrt(X)) / (2 * jnp.sqrt(2.0))
    assert_close(jax.grad(loss)(2.0), expected)
    assert_close(jax.jacfwd(loss)(2.0), expected)


def test_closures_over_differentiated_values():
    # Both functions close over `scale`: the conditions' closure is differentiated,
    # the forward's is not needed (y depends on `scale` only through c).
    def loss(scale):
        f = idf.ImplicitFunction(
            lambda x: jnp.sqrt(scale * x), lambda x, y: y**2 - scale * x
        )
        return jnp.sum(f(X))

    expected = jnp.sum(jnp.sqrt(X)) / (2 * jnp.sqrt(2.0))
    assert_close(jax.grad(loss)(2.0), expected)
    assert_close(jax.jit(jax.grad(loss))(2.0), expected)
    assert_close(jax.hessian(loss)(2.0), -jnp.sum(jnp.sqrt(X)) / (4 * 2.0**1.5))


_GLOBALS = {}


def _conditions_reading_a_global(x, y):
    return y**2 - _GLOBALS["scale"] * x


def _conditions_through_a_helper(x, y):
    return y**2 - _scale_from_a_global() * x


def _scale_from_a_global():
    return _GLOBALS["scale"]


@pytest.mark.parametrize(
    "conditions", [_conditions_reading_a_global, _conditions_through_a_helper]
)
def test_conditions_reading_a_differentiated_value_from_a_global(conditions):
    # A plain function without a closure, reading the value being differentiated from
    # a module-level dict (directly or through a helper): it was not converted, and
    # the tracer leaked ("No constant handler for type: LinearizeTracer").
    def loss(scale):
        _GLOBALS["scale"] = scale
        f = idf.ImplicitFunction(lambda x: jnp.sqrt(scale * x), conditions)
        return jnp.sum(f(X))

    expected = jnp.sum(jnp.sqrt(X)) / (2 * jnp.sqrt(2.0))
    try:
        assert_close(jax.grad(loss)(2.0), expected)
        assert_close(jax.jit(jax.grad(loss))(2.0), expected)
        assert_close(jax.jacfwd(loss)(2.0), expected)
    finally:
        _GLOBALS.clear()


def test_integer_args_and_static_args_pass_through():
    def forward(x, power, mode):
        assert mode == "static"
        return x ** (1.0 / power)

    def conditions(x, y, power, mode):
        return y**power - x

    f = idf.ImplicitFunction(forward, conditions)
    power = jnp.array(3, dtype=jnp.int32)
    jacobian = jax.jit(jax.jacrev(f), static_argnums=2)(X, power, "static")
    assert_close(jacobian, jnp.diag(X ** (-2 / 3) / 3))


def test_float32_stays_float32():
    sqrt = idf.ImplicitFunction(newton_sqrt, sqrt_conditions)
    x = jnp.array([1.0, 4.0, 9.0], dtype=jnp.float32)
    for jacobian in (jax.jacfwd, jax.jacrev):
        result = jacobian(sqrt)(x)
        assert result.dtype == jnp.float32
        np.testing.assert_allclose(result, sqrt_jacobian(x), rtol=1e-5)


def test_matches_finite_differences_on_a_coupled_system():
    # c(x, y) = Q y + tanh(y) − x: dense coupled A, checked by central differences.
    Q = jnp.asarray(np.random.default_rng(1).normal(size=(4, 4)))
    Q = Q @ Q.T + 4 * jnp.eye(4)

    def forward(x):
        return lax.fori_loop(
            0,
            100,
            lambda _, y: (
                y
                - jnp.linalg.solve(
                    Q + jnp.diag(1 - jnp.tanh(y) ** 2), Q @ y + jnp.tanh(y) - x
                )
            ),
            jnp.zeros_like(x),
        )

    f = idf.ImplicitFunction(forward, lambda x, y: Q @ y + jnp.tanh(y) - x)
    x = jnp.array([0.5, -1.0, 2.0, 0.1])
    assert_close(jax.jacrev(f)(x), central_difference_jacobian(forward, x), tol=1e-7)
