"""implicitdiff.projections and implicitdiff.prox: values against closed forms and
jaxopt, Jacobians against closed forms and central differences, in both modes,
under jit and vmap, float32 and float64, pytrees."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from implicitdiff import projections, prox


def jaxopt_module(name):
    jaxopt = pytest.importorskip("jaxopt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return getattr(jaxopt, name)


def tolerance(dtype):
    return 1e-5 if dtype == jnp.float32 else 1e-12


def central_difference(f, x, direction, h=1e-6):
    return (f(x + h * direction) - f(x - h * direction)) / (2 * h)


def random_vector(n, dtype, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=n), dtype)


def simplex_reference(v, scale):
    """The simplex projection by bisection on τ in NumPy float64: no sort."""
    v = np.asarray(v, np.float64)
    lo, hi = v.min() - scale, v.max()
    for _ in range(200):
        tau = 0.5 * (lo + hi)
        lo, hi = (tau, hi) if np.maximum(v - tau, 0).sum() > scale else (lo, tau)
    return np.maximum(v - 0.5 * (lo + hi), 0)


def simplex_jacobian(p):
    """diag(s) − s sᵀ/|S| on the support S of the projection p."""
    s = (np.asarray(p) > 0).astype(np.float64)
    return np.diag(s) - np.outer(s, s) / s.sum()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_non_negative_and_box_on_a_pytree(dtype):
    v = {"a": random_vector(6, dtype), "b": random_vector((2, 3), dtype, seed=1)}
    lower = {"a": -0.5 * jnp.ones(6, dtype), "b": jnp.zeros((2, 3), dtype)}
    upper = jnp.asarray(0.7, dtype)  # one array broadcast against every leaf
    out = jax.jit(projections.box)(v, lower, upper)
    for key in v:
        np.testing.assert_array_equal(
            out[key], np.clip(np.asarray(v[key]), np.asarray(lower[key]), 0.7)
        )
        assert out[key].dtype == dtype
    nonneg = jax.jit(projections.non_negative)(v)
    np.testing.assert_array_equal(nonneg["a"], np.maximum(np.asarray(v["a"]), 0))
    # d/dv: the indicator of the free elements; d/dupper: of those at the bound.
    a = v["a"]
    jac_v = jax.jit(jax.jacfwd(lambda u: projections.box(u, lower["a"], upper)))(a)
    inside = (np.asarray(a) > -0.5) & (np.asarray(a) < 0.7)
    np.testing.assert_array_equal(jac_v, np.diag(inside.astype(float)))
    grad_upper = jax.jit(
        jax.grad(lambda u: jnp.sum(projections.box(a, lower["a"], u)))
    )(upper)
    assert grad_upper == np.sum(np.asarray(a) > 0.7)
    grad_lower = jax.jit(
        jax.grad(lambda lo: jnp.sum(projections.box(v, lo, upper)["a"]))
    )(lower)
    np.testing.assert_array_equal(grad_lower["a"], np.asarray(a) < -0.5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize(
    "n", [10, pytest.param(100_000, marks=pytest.mark.full_optimisation)]
)
def test_simplex_value_and_derivatives(dtype, n):
    v = random_vector(n, dtype)
    scale = jnp.asarray(2.0, dtype)
    p = jax.jit(projections.simplex)(v, scale)
    assert p.dtype == dtype
    np.testing.assert_allclose(p, simplex_reference(v, 2.0), atol=10 * tolerance(dtype))
    s = (np.asarray(p) > 0).astype(np.float64)
    # A JVP and a VJP against the closed-form Jacobian, without forming it for 10⁵.
    # (Arrays passed as arguments: as closed-over constants XLA would fold the sort.)
    direction = random_vector(n, dtype, seed=2)

    @jax.jit
    def derivatives(v, direction, scale):
        simplex = projections.simplex
        _, jvp = jax.jvp(lambda u: simplex(u, scale), (v,), (direction,))
        vjp = jax.grad(lambda u: jnp.vdot(direction, simplex(u, scale)))(v)
        dscale = jax.jacfwd(lambda c: simplex(v, c))(scale)
        return jvp, vjp, dscale

    jvp, vjp, dscale = derivatives(v, direction, scale)
    d = np.asarray(direction, np.float64)
    expected = s * d - s * (s @ d) / s.sum()
    np.testing.assert_allclose(jvp, expected, atol=tolerance(dtype))
    np.testing.assert_allclose(vjp, expected, atol=tolerance(dtype))
    np.testing.assert_allclose(dscale, s / s.sum(), atol=tolerance(dtype))  # dp/dscale


def test_simplex_jacobian_matches_closed_form_and_jaxopt_under_vmap():
    projection_simplex = jaxopt_module("projection").projection_simplex
    vs = jnp.stack([random_vector(7, jnp.float64, seed=k) for k in range(3)])
    ps = jax.vmap(projections.simplex)(vs)
    np.testing.assert_allclose(ps, jax.vmap(projection_simplex)(vs), atol=1e-12)
    for mode in (jax.jacfwd, jax.jacrev):
        jacs = jax.jit(jax.vmap(mode(projections.simplex)))(vs)
        for jac, p in zip(jacs, ps, strict=True):
            np.testing.assert_allclose(jac, simplex_jacobian(p), atol=1e-12)
    # Treated as one vector: a pytree sums to the scale over all its leaves.
    tree = {"a": vs[0, :3], "b": vs[0, 3:]}
    out = jax.jit(projections.simplex)(tree)
    np.testing.assert_allclose(jnp.concatenate([out["a"], out["b"]]), ps[0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_l1_ball(dtype):
    projection_l1_ball = jaxopt_module("projection").projection_l1_ball
    v = 0.4 * random_vector(8, dtype)
    radius = jnp.asarray(1.0, dtype)
    assert float(jnp.sum(jnp.abs(v))) > 1.0  # outside: projected onto the sphere
    p = jax.jit(projections.l1_ball)(v, radius)
    np.testing.assert_allclose(p, projection_l1_ball(v, 1.0), atol=tolerance(dtype))
    # sign(v)·simplex(|v|): Jacobian D (diag(s) − s sᵀ/|S|) D, D = diag(sign v).
    signs = np.diag(np.sign(np.asarray(v, np.float64)))
    expected = signs @ simplex_jacobian(np.abs(np.asarray(p))) @ signs
    for mode in (jax.jacfwd, jax.jacrev):
        jac = jax.jit(mode(projections.l1_ball))(v, radius)
        np.testing.assert_allclose(jac, expected, atol=tolerance(dtype))
    # Inside the ball: the identity.
    small = v / 10
    np.testing.assert_array_equal(jax.jit(projections.l1_ball)(small, radius), small)
    np.testing.assert_allclose(
        jax.jit(jax.jacrev(projections.l1_ball))(small, radius), np.eye(8), atol=0
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_l2_ball_on_a_pytree(dtype):
    v = {"w": random_vector(5, dtype), "b": random_vector((), dtype, seed=1)}
    flat = np.concatenate([np.asarray(v["w"]), [float(v["b"])]]).astype(np.float64)
    norm = np.linalg.norm(flat)
    radius = 0.5 * norm
    out = jax.jit(projections.l2_ball)(v, radius)
    np.testing.assert_allclose(out["w"], 0.5 * np.asarray(v["w"]), rtol=1e-6)
    # (r/‖v‖)(I − v vᵀ/‖v‖²) outside the ball.
    expected = 0.5 * (np.eye(6) - np.outer(flat, flat) / norm**2)

    def f(u):
        out = projections.l2_ball({"w": u[:5], "b": u[5]}, radius)
        return jnp.concatenate([out["w"], out["b"][None]])

    for mode in (jax.jacfwd, jax.jacrev):
        np.testing.assert_allclose(
            jax.jit(mode(f))(jnp.asarray(flat, dtype)), expected, atol=tolerance(dtype)
        )
    # d/dradius = v/‖v‖; at v = 0 the derivative is finite (the identity).
    d_radius = jax.jit(jax.grad(lambda r: jnp.sum(projections.l2_ball(v, r)["w"])))(
        radius
    )
    np.testing.assert_allclose(d_radius, flat[:5].sum() / norm, rtol=1e-5)
    zero_jac = jax.jit(jax.jacrev(projections.l2_ball))(jnp.zeros(3, dtype), 1.0)
    np.testing.assert_array_equal(zero_jac, np.eye(3))


def test_hyperplane_and_affine_against_jaxopt_and_finite_differences():
    projection = jaxopt_module("projection")
    rng = np.random.default_rng(3)
    v, a = jnp.asarray(rng.normal(size=6)), jnp.asarray(rng.normal(size=6))
    A, b = jnp.asarray(rng.normal(size=(2, 6))), jnp.asarray(rng.normal(size=2))
    np.testing.assert_allclose(
        projections.hyperplane(v, a, 0.3),
        projection.projection_hyperplane(v, (a, 0.3)),
        atol=1e-12,
    )
    p = jax.jit(projections.affine)(v, A, b)
    np.testing.assert_allclose(
        p, projection.projection_affine_set(v, (A, b)), atol=1e-12
    )
    np.testing.assert_allclose(A @ p, b, atol=1e-12)
    # Derivatives in every parameter, both modes, against central differences.
    dA = jnp.asarray(rng.normal(size=(2, 6)))
    fd = central_difference(lambda M: projections.affine(v, M, b), A, dA)
    _, jvp = jax.jit(
        lambda d: jax.jvp(lambda M: projections.affine(v, M, b), (A,), (d,))
    )(dA)
    np.testing.assert_allclose(jvp, fd, atol=1e-8)
    jac_b = jax.jit(jax.jacrev(projections.affine, argnums=2))(v, A, b)
    np.testing.assert_allclose(jac_b, np.linalg.pinv(np.asarray(A)), atol=1e-12)
    da = jnp.asarray(rng.normal(size=6))
    fd = central_difference(lambda n: projections.hyperplane(v, n, 0.3), a, da)
    jac_a = jax.jit(jax.jacrev(projections.hyperplane, argnums=1))(v, a, 0.3)
    np.testing.assert_allclose(jac_a @ da, fd, atol=1e-8)
    # A pytree v, with a normal of the same structure.
    tree = projections.hyperplane(
        {"x": v[:2], "y": v[2:]}, {"x": a[:2], "y": a[2:]}, 1.0
    )
    flat = jnp.concatenate([tree["x"], tree["y"]])
    np.testing.assert_allclose(flat, projections.hyperplane(v, a, 1.0), atol=1e-14)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_prox_operators_against_jaxopt_and_their_strength_derivative(dtype):
    jprox = jaxopt_module("prox")
    v = random_vector(9, dtype)
    s = jnp.asarray(0.4, dtype)
    tol = tolerance(dtype)
    np.testing.assert_allclose(prox.l1(v, s), jprox.prox_lasso(v, 0.4), atol=tol)
    np.testing.assert_allclose(
        prox.non_negative_l1(v, s), jprox.prox_non_negative_lasso(v, 0.4), atol=tol
    )
    np.testing.assert_allclose(
        prox.l2_squared(v, s), jprox.prox_ridge(v, 0.4), atol=tol
    )
    groups = v.reshape(3, 3)
    expected = jax.vmap(lambda g: jprox.prox_group_lasso(g, 0.4 * 3))(groups)
    np.testing.assert_allclose(prox.group_l2(groups, 1.2), expected, atol=tol)
    # d/dstrength: −sign(v) on the support of soft thresholding, 0 off it.
    support = np.abs(np.asarray(v)) > 0.4
    for mode in (jax.jacfwd, jax.jacrev):
        d = jax.jit(mode(prox.l1, argnums=1))(v, s)
        np.testing.assert_array_equal(d, -np.sign(np.asarray(v)) * support)
    d = jax.jit(jax.jacrev(prox.l2_squared, argnums=1))(v, s)
    np.testing.assert_allclose(d, -np.asarray(v) / 1.4**2, rtol=1e-5)
    # group: d/ds of g·(1 − s/‖g‖) is −g/‖g‖ for a kept group, 0 for a zeroed one.
    norms = np.linalg.norm(np.asarray(groups, np.float64), axis=1)
    strength = 0.5 * (np.sort(norms)[0] + np.sort(norms)[1])  # zeroes one group
    d = jax.jit(jax.jacfwd(prox.group_l2, argnums=1))(
        groups, jnp.asarray(strength, dtype)
    )
    kept = (norms > strength)[:, None]
    np.testing.assert_allclose(
        d, -kept.astype(float) * np.asarray(groups) / norms[:, None], atol=tol
    )
    assert not kept.all() and kept.any()


def test_prox_per_element_strength_on_a_pytree_under_vmap():
    v = {"w": random_vector(4, jnp.float64), "b": random_vector(3, jnp.float64, 1)}
    strength = {"w": jnp.full(4, 0.3), "b": jnp.full(3, 0.1)}
    out = prox.l1(v, strength)
    for key in v:
        u = np.asarray(v[key])
        expected = np.sign(u) * np.maximum(np.abs(u) - np.asarray(strength[key]), 0)
        np.testing.assert_allclose(out[key], expected, atol=1e-15)
    batch = jnp.stack([v["w"], -v["w"]])
    out = jax.vmap(prox.non_negative_l1, in_axes=(0, None))(batch, 0.2)
    np.testing.assert_allclose(out, np.maximum(np.asarray(batch) - 0.2, 0))


@pytest.mark.full_optimisation
def test_simplex_with_a_scale_below_the_rounding_unit_of_v():
    """`s[0] − scale` rounds to `s[0]` and no element qualified for the support: the
    threshold was taken from the last candidate (P(v) = [0.1667, 0.0667, 0] for a
    scale of 1e-30, off the simplex). Now the projection is right to the rounding
    unit of `max v`, and inside the ball for `l1_ball`."""
    for v, scale in (
        (jnp.array([3e7, 1.0, 0.0], jnp.float32), 1.0),
        (jnp.array([0.3, 0.2, -0.1]), 1e-30),
        (jnp.array([1e17, 5e16, 0.0]), 1.0),
    ):
        p = np.asarray(jax.jit(projections.simplex)(v, scale))
        ulp = float(np.spacing(np.max(np.abs(np.asarray(v)))))
        assert np.all(p >= 0) and abs(p.sum() - scale) <= ulp
        assert np.all(p[1:] == 0)
    ball = projections.l1_ball(jnp.array([0.3, 0.2, -0.1]), 1e-30)
    assert float(jnp.sum(jnp.abs(ball))) <= 1e-30 + np.spacing(0.3)


@pytest.mark.parametrize("project", [projections.simplex, projections.l1_ball])
@pytest.mark.parametrize(
    "v", [[0.3, 1.2, -0.5], [1.2, 1.2, -0.5], [0.0, 0.0, 0.0]], ids=str
)
def test_zero_scale_derivatives_are_the_one_sided_ones(project, v):
    """At a zero scale (radius) the projection is 0 whatever v: its derivative in v
    is 0, and in the scale that of `scale → 0⁺` (a forward difference from the
    right), in both modes and without a warning. The threshold's support once came
    out empty there: NaN in forward mode, finite in reverse (direction-dependent),
    and the ℓ1 ball at v = 0 returned the identity for 0."""
    v = jnp.asarray(v)
    h = 1e-7  # below every gap between the elements of |v|: the support holds
    d_scale_right = (np.asarray(project(v, h)) - np.asarray(project(v, 0.0))) / h
    for jacobian in (jax.jacfwd, jax.jacrev):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            d_v, d_scale = jacobian(project, argnums=(0, 1))(v, 0.0)
        np.testing.assert_array_equal(d_v, np.zeros((3, 3)))
        np.testing.assert_allclose(d_scale, d_scale_right, atol=1e-8)
        # A positive scale is unaffected: on the support {1.2, 0.3} (simplex) or
        # {1.2, −0.5} (ℓ1 ball) of the first v, the scale is shared equally.
        _, d_scale = jacobian(project, argnums=(0, 1))(jnp.array([0.3, 1.2, -0.5]), 1.0)
        expected = [0.5, 0.5, 0.0] if project is projections.simplex else [0, 0.5, -0.5]
        np.testing.assert_allclose(d_scale, expected)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("jacobian", [jax.jacfwd, jax.jacrev])
def test_degenerate_parameters_that_leave_a_smooth_map(dtype, jacobian):
    """A zero strength makes soft thresholding and group shrinkage the identity, a
    zero radius makes the ℓ2 ball's projection 0, equal bounds fix a box element at
    them: smooth maps, whose derivative at v = 0 (or v at the bound) the strict
    comparisons once took from the wrong branch (0 for I, I for 0), finite and
    wrong, also through conditions built on them."""
    zero = jnp.zeros(3, dtype)
    eye = np.eye(3)
    cases = [
        (lambda v: prox.l1(v, 0.0), eye),
        (lambda v: prox.group_l2(v[None], 0.0)[0], eye),
        (lambda v: projections.l2_ball(v, 0.0), 0 * eye),
        (lambda v: projections.box(v, 0.0, 0.0), 0 * eye),
    ]
    for project, expected in cases:
        np.testing.assert_array_equal(project(zero), zero)
        np.testing.assert_allclose(jacobian(project)(zero), expected)
    # An element fixed by equal bounds moves with them: d/dc box(c, c, c) = (0, 1).
    moved = jacobian(lambda vc: projections.box(vc[0], vc[1], vc[1]))
    np.testing.assert_allclose(moved(jnp.ones(2, dtype)), [0.0, 1.0])
    # At a bound an element stays there, as `non_negative` keeps 0 at 0 (box once
    # followed v at v = lower: the two disagreed).
    on_bounds = jnp.asarray([0.0, 0.5, 1.0], dtype)
    at_bounds = jacobian(lambda v: projections.box(v, 0.0, 1.0))(on_bounds)
    np.testing.assert_allclose(at_bounds, np.diag([0.0, 1.0, 0.0]))
    np.testing.assert_allclose(jacobian(projections.non_negative)(zero), 0 * eye)
    # Zero strength: d/ds of soft thresholding is −sign(v), 0 at v = 0.
    v = jnp.asarray([-1.0, 0.0, 2.0], dtype)
    d_strength = jacobian(lambda s: prox.l1(v, s))(jnp.asarray(0.0, dtype))
    np.testing.assert_allclose(d_strength, [1.0, 0.0, -1.0])
