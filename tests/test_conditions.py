"""implicitdiff.conditions: each builder's derivatives against closed forms, finite
differences of an exact solver, or jaxopt; both modes, jit, vmap, pytrees."""

import warnings
from itertools import combinations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import implicitdiff as idf
from implicitdiff import conditions, projections, prox


def least_squares(x, w, X, t):
    return 0.5 * jnp.sum((X @ w - t) ** 2)


def data(n_samples, n_features, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, n_features))
    t = X @ rng.normal(size=n_features) + 0.1 * rng.normal(size=n_samples)
    return jnp.asarray(X), jnp.asarray(t)


def iterate(step, init, n_steps):
    return lax.fori_loop(0, n_steps, lambda _, y: step(y), init)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_fixed_point_on_a_pytree(dtype):
    # y = ½ tanh(y) + x, leaf by leaf: dy/dx = diag(1 / (1 − ½ sech² y)).
    T = lambda x, y: jax.tree.map(lambda a, b: 0.5 * jnp.tanh(b) + a, x, y)
    forward = lambda x: iterate(lambda y: T(x, y), x, 80)
    solve = idf.ImplicitFunction(forward, conditions.fixed_point(T))
    x = {"a": jnp.asarray([0.3, -1.0], dtype), "b": jnp.asarray(2.0, dtype)}
    y = solve(x)
    expected = jax.tree.map(lambda v: 1 / (1 - 0.5 / jnp.cosh(v) ** 2), y)
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    for mode in (jax.jacfwd, jax.jacrev):
        jac = jax.jit(mode(solve))(x)
        np.testing.assert_allclose(jnp.diag(jac["a"]["a"]), expected["a"], rtol=tol)
        np.testing.assert_allclose(jac["b"]["b"], expected["b"], rtol=tol)
        np.testing.assert_array_equal(jac["a"]["b"], 0)


def ridge_tree(lam, params, X, t):
    """Ridge regression with an unregularised bias: y = {"w": weights, "b": bias}."""
    residual = X @ params["w"] + params["b"] - t
    return 0.5 * jnp.sum(residual**2) + 0.5 * lam * jnp.sum(params["w"] ** 2)


def ridge_tree_exact(lam, X, t):
    """The closed form from the normal equations of [X 1]."""
    Z = jnp.concatenate([X, jnp.ones((X.shape[0], 1))], axis=1)
    penalty = jnp.diag(jnp.append(jnp.full(X.shape[1], lam), 0.0))
    theta = jnp.linalg.solve(Z.T @ Z + penalty, Z.T @ t)
    return {"w": theta[:-1], "b": theta[-1]}


def test_stationary_pytree_every_transform():
    X, t = data(12, 4)
    stationary = conditions.stationary(ridge_tree)
    # The closed form is the forward here; the derivatives come from the conditions.
    solve = idf.ImplicitFunction(ridge_tree_exact, stationary)
    lam = 0.7
    c = stationary(lam, solve(lam, X, t), X, t)
    np.testing.assert_allclose(jnp.append(c["w"], c["b"]), 0, atol=1e-12)

    def loss(solve):
        return lambda lam: jnp.sum(solve(lam, X, t)["w"] ** 2) + solve(lam, X, t)["b"]

    for transform in (jax.grad, jax.hessian):
        np.testing.assert_allclose(
            jax.jit(transform(loss(solve)))(lam),
            jax.jit(transform(loss(ridge_tree_exact)))(lam),
            rtol=1e-10,
        )


def nnls_forward(x, X, t):
    """Projected gradient descent to convergence (never differentiated)."""
    step = 1 / jnp.linalg.norm(X, 2) ** 2
    descend = lambda w: projections.non_negative(w - step * X.T @ (X @ w - t))
    return iterate(descend, jnp.zeros(X.shape[1]), 3000)


def test_non_negative_least_squares_derivative_in_the_data():
    X, t = data(20, 6, seed=1)
    t = t - 2.0  # some weights at the bound 0
    pg = conditions.projected_gradient(
        least_squares, lambda v, *_: projections.non_negative(v)
    )
    solve = idf.ImplicitFunction(nnls_forward, pg)
    w = solve(0.0, X, t)
    free = np.asarray(w) > 0
    assert 0 < free.sum() < 6
    # On the free set F: w_F = (X_Fᵀ X_F)⁻¹ X_Fᵀ t, so dw_F/dt = X_F⁺; 0 elsewhere.
    expected = np.zeros((6, 20))
    expected[free] = np.linalg.pinv(np.asarray(X)[:, free])
    for mode in (jax.jacfwd, jax.jacrev):
        jac = jax.jit(mode(solve, argnums=2))(0.0, X, t)
        np.testing.assert_allclose(jac, expected, atol=1e-10)
    # w.r.t. X: central differences of the same (converged) forward.
    direction = jnp.asarray(np.random.default_rng(2).normal(size=X.shape))
    _, jvp = jax.jit(lambda X, d: jax.jvp(lambda M: solve(0.0, M, t), (X,), (d,)))(
        X, direction
    )
    h = 1e-6
    fd = (
        nnls_forward(0.0, X + h * direction, t)
        - nnls_forward(0.0, X - h * direction, t)
    ) / (2 * h)
    np.testing.assert_allclose(jvp, fd, atol=1e-7)


def test_box_constrained_fit_derivative_in_the_bounds():
    X, t = data(20, 5, seed=3)
    box = lambda v, bounds, *_: projections.box(v, bounds[0], bounds[1])
    pg = conditions.projected_gradient(least_squares, box, step=0.5)

    def forward(bounds, X, t):
        step = 1 / jnp.linalg.norm(X, 2) ** 2
        descend = lambda w: box(w - step * X.T @ (X @ w - t), bounds)
        return iterate(descend, jnp.zeros(X.shape[1]), 4000)

    solve = idf.ImplicitFunction(forward, pg)
    w_ls = np.linalg.lstsq(np.asarray(X), np.asarray(t), rcond=None)[0]
    lower = jnp.full(5, -10.0)
    upper = jnp.asarray(np.where(np.arange(5) < 2, np.abs(w_ls) / 2, 10.0))
    w = solve((lower, upper), X, t)
    at_upper = np.isclose(np.asarray(w), np.asarray(upper))
    assert at_upper.sum() >= 1
    # Free set F: w_F = X_F⁺ (t − X_U u_U): dw_F/du_U = −X_F⁺ X_U; dw_U/du_U = I.
    Xn = np.asarray(X)
    free = ~at_upper
    expected = np.zeros((5, 5))
    expected[np.ix_(at_upper, at_upper)] = np.eye(at_upper.sum())
    expected[np.ix_(free, at_upper)] = -np.linalg.pinv(Xn[:, free]) @ Xn[:, at_upper]
    for mode in (jax.jacfwd, jax.jacrev):
        jac = jax.jit(mode(lambda u, X, t: solve((lower, u), X, t)))(upper, X, t)
        np.testing.assert_allclose(jac, expected, atol=1e-10)


def lasso_problem(n_samples=15, n_features=30, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, n_features))
    w = np.zeros(n_features)
    w[:4] = [2.0, -1.5, 1.0, 0.8]
    t = X @ w + 0.1 * rng.normal(size=n_samples)
    return jnp.asarray(X), jnp.asarray(t)


def lasso_forward(lam, X, t):
    step = 1 / jnp.linalg.norm(X, 2) ** 2
    descend = lambda w: prox.l1(w - step * X.T @ (X @ w - t), step * lam)
    return iterate(descend, jnp.zeros(X.shape[1]), 20_000)


lasso_conditions = conditions.proximal_gradient(
    least_squares, lambda v, step, lam, *_: prox.l1(v, step * lam), step=0.02
)


def test_lasso_more_features_than_samples():
    X, t = lasso_problem()
    lasso = idf.ImplicitFunction(lasso_forward, lasso_conditions)
    lams = jnp.asarray([2.0, 3.0])
    ws = jax.jit(jax.vmap(lasso, (0, None, None)))(lams, X, t)
    jacs = {
        mode: jax.jit(jax.vmap(mode(lasso), (0, None, None)))(lams, X, t)
        for mode in (jax.jacfwd, jax.jacrev)
    }
    for k, w in enumerate(ws):
        support = np.flatnonzero(np.asarray(w))
        assert 0 < support.size < X.shape[0]
        # On the support S: X_Sᵀ(X_S w_S − t) + λ sign(w_S) = 0.
        XS = np.asarray(X)[:, support]
        expected = np.zeros(X.shape[1])
        expected[support] = -np.linalg.solve(XS.T @ XS, np.sign(np.asarray(w)[support]))
        for jac in jacs.values():
            np.testing.assert_allclose(jac[k], expected, atol=1e-12)
            off = np.setdiff1d(np.arange(X.shape[1]), support)
            np.testing.assert_array_equal(jac[k][off], 0)  # exactly


def test_lasso_hyperparameter_gradient_matches_jaxopt():
    jaxopt = pytest.importorskip("jaxopt")
    X, t = lasso_problem()
    lasso = idf.ImplicitFunction(lasso_forward, lasso_conditions)
    X_valid, t_valid = lasso_problem(seed=1)
    valid = lambda w: 0.5 * jnp.sum((X_valid @ w - t_valid) ** 2)
    ours = jax.jit(jax.grad(lambda lam: valid(lasso(lam, X, t))))(2.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        solver = jaxopt.ProximalGradient(
            fun=lambda w, X, t: 0.5 * jnp.sum((X @ w - t) ** 2),
            prox=jaxopt.prox.prox_lasso,
            tol=1e-12,
            maxiter=20_000,
            implicit_diff=True,
        )
        theirs = jax.jit(
            jax.grad(lambda lam: valid(solver.run(jnp.zeros(30), lam, X=X, t=t).params))
        )(2.5)
    # jaxopt's default linear solver (normal CG, tol 1e-5) limits the agreement.
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def qp(x, data):
    """min ½pᵀQp + qᵀp s.t. E p = e, G p ≤ h, with x = (q, h) differentiable."""
    Q, E, e, G = data
    return Q, x[0], E, e, G, x[1]


def qp_active_set(Q, q, E, e, G, h):
    """The exact solution, duals included, by enumerating active sets (NumPy)."""
    n, m = Q.shape[0], E.shape[0]
    for size in range(G.shape[0] + 1):
        for active in map(list, combinations(range(G.shape[0]), size)):
            C = np.concatenate([E, G[active]])
            K = np.block([[Q, C.T], [C, np.zeros((len(C), len(C)))]])
            sol = np.linalg.solve(K, np.concatenate([-q, e, h[active]]))
            p, nu, lam_active = sol[:n], sol[n : n + m], sol[n + m :]
            if np.all(lam_active >= 0) and np.all(G @ p <= h + 1e-12):
                lam = np.zeros(G.shape[0])
                lam[active] = lam_active
                return p, nu, lam
    raise ValueError("infeasible")


def qp_problem():
    rng = np.random.default_rng(4)
    M = rng.normal(size=(4, 4))
    Q, q = M @ M.T + np.eye(4), rng.normal(size=4)
    E, e = rng.normal(size=(1, 4)), rng.normal(size=1)
    G = rng.normal(size=(3, 4))
    p_free = qp_active_set(Q, q, E, e, G, np.full(3, 1e3))[0]
    h = G @ p_free + np.array([-0.5, 0.7, -0.3])  # two active, one not
    return tuple(map(jnp.asarray, (Q, q, E, e, G, h)))


def test_kkt_quadratic_program_solved_on_the_host():
    Q, q, E, e, G, h = qp_problem()
    data = (Q, E, e, G)
    kkt = conditions.kkt(
        lambda x, p, data: 0.5 * p @ qp(x, data)[0] @ p + qp(x, data)[1] @ p,
        equality=lambda x, p, data: data[1] @ p - data[2],
        inequality=lambda x, p, data: data[3] @ p - x[1],
    )
    forward = idf.host(
        lambda x, data: qp_active_set(*map(np.asarray, qp(x, data))),
        result_shape=lambda x, data: tuple(
            jax.ShapeDtypeStruct((k,), jnp.float64) for k in (4, 1, 3)
        ),
    )
    solve = idf.ImplicitFunction(forward, kkt)
    p, nu, lam = solve((q, h), data)
    assert np.sum(np.asarray(lam) > 0) == 2  # strictly complementary
    flat = lambda x: jnp.concatenate(solve(x, data))
    numpy_flat = lambda x: np.concatenate(qp_active_set(*map(np.asarray, qp(x, data))))
    rng = np.random.default_rng(5)
    for mode in (jax.jacfwd, jax.jacrev):
        jac = jax.jit(mode(flat))((q, h))
        for k, x_k in enumerate((q, h)):
            direction = rng.normal(size=x_k.shape)
            bump = lambda s: tuple(
                np.asarray(v) + (s * direction if i == k else 0)
                for i, v in enumerate((q, h))
            )
            fd = (numpy_flat(bump(1e-6)) - numpy_flat(bump(-1e-6))) / 2e-6
            np.testing.assert_allclose(jac[k] @ direction, fd, atol=1e-8)


def test_kkt_with_equalities_only_has_a_none_dual():
    Q, q, E, e, _, _ = qp_problem()
    kkt = conditions.kkt(
        lambda q, p: 0.5 * p @ Q @ p + q @ p, equality=lambda q, p: E @ p - e
    )

    def forward(q):  # no inequality: its dual is None
        K = jnp.block([[Q, E.T], [E, jnp.zeros((1, 1))]])
        solution = jnp.linalg.solve(K, jnp.concatenate([-q, e]))
        return solution[:4], solution[4:], None

    solve = idf.ImplicitFunction(forward, kkt)
    assert solve(q)[2] is None and kkt(q, solve(q))[2] is None
    # On {E p = e}: dp/dq = −Z (Zᵀ Q Z)⁻¹ Zᵀ, Z a basis of the null space of E.
    Z = np.linalg.svd(np.asarray(E))[2][1:].T
    expected = -Z @ np.linalg.solve(Z.T @ np.asarray(Q) @ Z, Z.T)
    for mode in (jax.jacfwd, jax.jacrev):
        jac = jax.jit(mode(lambda q: solve(q)[0]))(q)
        np.testing.assert_allclose(jac, expected, atol=1e-12)


def test_keyword_arguments_reach_the_user_functions_and_are_differentiated():
    # Ridge, argmin_w ½‖Xw − t‖² + ½λ‖w‖², with the data and λ as keyword arguments:
    # dw/dλ = −(XᵀX + λI)⁻¹ w.
    rng = np.random.default_rng(3)
    X, t = jnp.asarray(rng.normal(size=(8, 3))), jnp.asarray(rng.normal(size=8))

    def f(_, w, *, X, t, lam):
        return 0.5 * jnp.sum((X @ w - t) ** 2) + 0.5 * lam * jnp.sum(w**2)

    def forward(_, *, X, t, lam):
        return jnp.linalg.solve(X.T @ X + lam * jnp.eye(3), X.T @ t)

    ridge = idf.ImplicitFunction(forward, conditions.stationary(f))
    lam = 0.7
    w = forward(None, X=X, t=t, lam=lam)
    expected = -jnp.linalg.solve(X.T @ X + lam * jnp.eye(3), w)
    dw = jax.jacfwd(lambda lam: ridge(None, X=X, t=t, lam=lam))(lam)
    np.testing.assert_allclose(dw, expected, rtol=1e-10)
    dsum = jax.grad(lambda lam: ridge(None, X=X, t=t, lam=lam).sum())(lam)
    np.testing.assert_allclose(dsum, expected.sum(), rtol=1e-10)
    optax = pytest.importorskip("optax")
    solve = idf.argmin(f, optax.lbfgs(), tol=1e-10, max_steps=200)
    dsum = jax.grad(
        lambda lam: solve(None, X=X, t=t, lam=lam, init=jnp.zeros(3)).sum()
    )(lam)
    np.testing.assert_allclose(dsum, expected.sum(), rtol=1e-7)


def test_a_variable_fixed_by_equal_bounds_moves_with_them():
    """Bounds `x ≤ y ≤ x` fix y = x whatever the objective: dy/dx = I. Where the
    unconstrained minimiser `a` sits on the bounds (x₀ = a₀), the box projection once
    followed its argument at `v = lower = upper`, and dy₀/dx₀ was 0, finite and
    wrong."""
    a = jnp.array([2.0, 3.0, -1.0])
    objective = lambda x, y: 0.5 * jnp.sum((y - a) ** 2)  # noqa: E731
    fixed = lambda v, x: projections.box(v, x, x)  # noqa: E731
    f = idf.ImplicitFunction(
        lambda x: x, conditions.projected_gradient(objective, fixed, step=0.5)
    )
    x = jnp.array([2.0, 1.0, 0.0])
    for mode in (jax.jacfwd, jax.jacrev):
        np.testing.assert_allclose(mode(f)(x), np.eye(3))
