"""implicitdiff.argmin: optax optimisers as the forward, against closed forms and
central differences; the failure policy when max_steps stops the optimiser short."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ridge_data, ridge_dw_dlam, ridge_solution

import implicitdiff as idf
from implicitdiff import projections

optax = pytest.importorskip("optax")


def ridge(lam, w, X, t):
    return 0.5 * jnp.sum((X @ w - t) ** 2) + 0.5 * lam * jnp.sum(w**2)


@pytest.mark.parametrize(
    "optimizer, tol, max_steps",
    [(optax.lbfgs(), 1e-10, 100), (optax.adam(0.05), 1e-9, 20_000)],
    ids=["lbfgs", "adam"],
)
def test_ridge_every_transform(optimizer, tol, max_steps):
    X, t = ridge_data()
    solve = idf.argmin(ridge, optimizer, tol=tol, max_steps=max_steps)
    init = jnp.zeros(X.shape[1])
    lam = 0.7
    w_of = lambda lam: solve(lam, X, t, init=init)
    np.testing.assert_allclose(jax.jit(w_of)(lam), ridge_solution(lam, X, t), atol=1e-8)
    expected = ridge_dw_dlam(lam, X, t)
    for mode in (jax.jacfwd, jax.jacrev):
        np.testing.assert_allclose(jax.jit(mode(w_of))(lam), expected, atol=1e-8)
    # vmap over λ: the while loop runs until every element has converged.
    lams = jnp.asarray([0.1, 1.0])
    grads = jax.jit(jax.vmap(jax.grad(lambda lam: jnp.sum(w_of(lam)))))(lams)
    np.testing.assert_allclose(
        grads, [jnp.sum(ridge_dw_dlam(lam, X, t)) for lam in lams], atol=1e-8
    )


def logistic(log_lam, params, X, t):
    """An L2-regularised logistic regression with a bias: y = {"w": ..., "b": ...}."""
    margins = t * (X @ params["w"] + params["b"])
    penalty = 0.5 * jnp.exp(log_lam) * jnp.sum(params["w"] ** 2)
    return jnp.mean(jnp.logaddexp(0.0, -margins)) + penalty


def test_logistic_regression_pytree_gradient_vs_finite_differences():
    X, scores = ridge_data(n_samples=40, n_features=3, seed=1)
    t = jnp.sign(scores)
    solve = idf.argmin(logistic, optax.lbfgs(), tol=1e-12, max_steps=200)
    init = {"w": jnp.zeros(3), "b": jnp.zeros(())}

    def valid(log_lam):
        params = solve(log_lam, X, t, init=init)
        return jnp.sum(params["w"]) + params["b"]

    log_lam, h = jnp.log(0.1), 1e-4
    value = jax.jit(valid)
    fd = (value(log_lam + h) - value(log_lam - h)) / (2 * h)
    np.testing.assert_allclose(jax.jit(jax.grad(valid))(log_lam), fd, rtol=1e-6)


def test_float32_and_options_are_honoured():
    X, t = ridge_data()
    X, t = X.astype(jnp.float32), t.astype(jnp.float32)
    solve = idf.argmin(
        ridge,
        optax.lbfgs(),
        tol=1e-4,
        max_steps=100,
        linear_solver=idf.CG(),
        representation="matrix",
    )
    assert solve.implicit.check_conditions == 1e-4
    assert isinstance(solve.implicit.linear_solver, idf.CG)
    lam = jnp.float32(0.7)
    w_of = lambda lam: solve(lam, X, t, init=jnp.zeros(4, jnp.float32))
    w, jac = jax.jit(lambda lam: (w_of(lam), jax.jacrev(w_of)(lam)))(lam)
    assert w.dtype == jac.dtype == jnp.float32
    np.testing.assert_allclose(jac, ridge_dw_dlam(0.7, *ridge_data()), rtol=1e-3)


def test_init_gets_no_derivative_even_when_it_depends_on_x():
    X, t = ridge_data()
    solve = idf.argmin(ridge, optax.lbfgs(), tol=1e-10, max_steps=100)
    # A warm start computed from λ itself: it must not contribute to dw/dλ.
    w_of = lambda lam: solve(lam, X, t, init=lam * jnp.ones(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jac = jax.jit(jax.jacrev(w_of))(0.7)
    np.testing.assert_allclose(jac, ridge_dw_dlam(0.7, X, t), atol=1e-8)


@pytest.mark.full_optimisation
def test_stopped_by_max_steps_is_caught_not_returned():
    X, t = ridge_data()
    short = dict(tol=1e-10, max_steps=3)
    with pytest.warns(RuntimeWarning, match="stopped after at most max_steps=3"):
        w = idf.argmin(ridge, optax.adam(0.01), **short)(0.7, X, t, init=jnp.zeros(4))
    assert bool(jnp.all(jnp.isnan(w)))
    silent = idf.argmin(ridge, optax.adam(0.01), on_failure="nan", **short)
    grad = jax.grad(lambda lam: jnp.sum(silent(lam, X, t, init=jnp.zeros(4))))(0.7)
    assert bool(jnp.isnan(grad))
    with pytest.raises(Exception, match="stopped after at most max_steps=3"):
        loud = idf.argmin(ridge, optax.adam(0.01), on_failure="raise", **short)
        jax.block_until_ready(jax.jit(loud)(0.7, X, t, init=jnp.zeros(4)))
    # A looser check, passed explicitly, accepts the same early stop.
    loose = idf.argmin(ridge, optax.adam(0.01), check_conditions=1e3, **short)
    assert bool(jnp.all(jnp.isfinite(loose(0.7, X, t, init=jnp.zeros(4)))))


def test_projected_optimiser_non_negative_least_squares():
    X, t = ridge_data(n_samples=20, n_features=6, seed=1)
    t = t - 2.0
    least_squares = lambda x, w, X, t: 0.5 * jnp.sum((X @ w - t) ** 2)
    step = float(1 / jnp.linalg.norm(X, 2) ** 2)
    solve = idf.argmin(
        least_squares,
        optax.sgd(step),
        tol=1e-11,
        max_steps=5000,
        projection=lambda v, *_: projections.non_negative(v),
    )
    w = solve(0.0, X, t, init=jnp.zeros(6))
    free = np.asarray(w) > 0
    assert 0 < free.sum() < 6
    w_free = np.linalg.lstsq(np.asarray(X)[:, free], np.asarray(t), rcond=None)[0]
    np.testing.assert_allclose(np.asarray(w)[free], w_free, atol=1e-9)
    expected = np.zeros((6, 20))
    expected[free] = np.linalg.pinv(np.asarray(X)[:, free])
    jac = jax.jit(jax.jacrev(lambda t: solve(0.0, X, t, init=jnp.zeros(6))))(t)
    np.testing.assert_allclose(jac, expected, atol=1e-9)


def test_argmin_is_a_module_and_rejects_bad_options():
    solve = idf.argmin(ridge, optax.lbfgs(), tol=1e-8, max_steps=10)
    assert isinstance(solve, idf.Argmin)
    with pytest.raises(ValueError, match="on_failure"):
        idf.argmin(ridge, optax.lbfgs(), tol=1e-8, max_steps=10, on_failure="loud")


def test_stopped_short_with_a_large_solution_is_caught():
    # The check of ImplicitFunction is relative, ‖c‖ ≤ tol·(1 + ‖y‖): at y ≈ 100 a run
    # cut after 3 steps with ‖∇f‖ ≈ 0.09 passed it (gradient 6 % off, no warning).
    # argmin's check is the loop's own test, ‖∇f‖ ≤ tol, whatever the size of y.
    f = lambda x, y: 1e-6 * jnp.sum(y**4 / 4 - x * y)  # y = x^(1/3)
    x, init = jnp.array(1e6), jnp.array(103.0)
    short = idf.argmin(f, optax.sgd(1e-2), tol=1e-3, max_steps=3)
    for mode in (jax.grad, jax.jacfwd):
        with pytest.warns(RuntimeWarning, match="max_steps=3"):
            assert bool(jnp.isnan(jax.jit(mode(lambda x: short(x, init=init)))(x)))
    # Under vmap the stopped element alone is NaN.
    xs = jnp.array([1e6, 1.0])
    with pytest.warns(RuntimeWarning, match="max_steps=3"):
        ys = jax.vmap(lambda x, i: short(x, init=i))(xs, jnp.array([103.0, 1.0]))
    assert bool(jnp.isnan(ys[0])) and float(ys[1]) == 1.0
    # Converged, the same large solution is accepted and its derivative right.
    full = idf.argmin(f, optax.lbfgs(), tol=1e-9, max_steps=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad = jax.grad(lambda x: full(x, init=init))(x)
    np.testing.assert_allclose(grad, 1 / (3 * 1e6 ** (2 / 3)), rtol=1e-6)


def test_mistakes_get_errors_that_name_the_fix():
    f = lambda x, y: jnp.sum((y - x) ** 2)
    with pytest.raises(TypeError, match=r"call the factory: optax.sgd\(0.1\)"):
        idf.argmin(f, optax.sgd, tol=1e-8, max_steps=10)
    solve = idf.argmin(f, optax.sgd(0.1), tol=1e-8, max_steps=500)
    with pytest.raises(TypeError, match="`init` must be floating-point"):
        solve(jnp.ones(2), init=jnp.zeros(2, int))
    boxed = idf.argmin(
        f, optax.sgd(0.1), tol=1e-8, max_steps=500, projection=projections.box
    )
    with pytest.raises(TypeError) as caught:
        boxed(jnp.ones(2), init=jnp.zeros(2))
    assert "lambda v, x: projections.box" in "\n".join(caught.value.__notes__)
