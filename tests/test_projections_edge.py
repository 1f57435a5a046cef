"""implicitdiff.projections and implicitdiff.prox at the edges: magnitudes near
overflow and underflow, rank-deficient affine sets, invalid parameters (an error when
known at trace time, NaN with NaN derivatives when traced), exporting the
derivatives, array-likes, integers and complex inputs."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from implicitdiff import projections, prox

MODES = [jax.jacfwd, jax.jacrev]


def simplex_jacobian(support):
    """diag(s) − s sᵀ/|S|, `s` the support's indicator."""
    s = np.asarray(support, np.float64)
    return np.diag(s) - np.outer(s, s) / s.sum()


def l2_ball_jacobian(v, radius):
    """(r/‖v‖)(I − v vᵀ/‖v‖²) outside the ball, in float64 from unit vectors (the
    squares of v itself may overflow)."""
    v = np.asarray(v, np.float64)
    scale = np.max(np.abs(v))
    unit = (v / scale) / np.linalg.norm(v / scale)
    return (
        radius
        / (scale * np.linalg.norm(v / scale))
        * (np.eye(v.size) - np.outer(unit, unit))
    )


@pytest.mark.parametrize(
    "v, support",
    [
        (np.array([1e8, 0.0, 0.0], np.float32), [1, 0, 0]),
        (np.array([3e7, 1e7, 0.0], np.float32), [1, 0, 0]),
        (np.array([1e8, 1e8, 0.0], np.float32), [1, 1, 0]),
        (np.array([1e17, 0.0, 0.0]), [1, 0, 0]),
        (np.array([1e17, 1e17, -1e17]), [1, 1, 0]),
        # Sums past float32's range (3.4e38): the sort's are scaled down first.
        (np.array([3e37, 2e38, 1e38], np.float32), [0, 1, 0]),
        (np.array([3e38, -3e38, 3e38, 0.0], np.float32), [1, 0, 1, 0]),
    ],
    ids=str,
)
def test_simplex_at_large_magnitudes(v, support):
    """The threshold `(Σ_S v − 1)/|S|` rounded to `max v` (`10⁸ − 1` is `10⁸` in
    float32), and `v − τ` was 0: the projection of `[10⁸, 0, 0]` was `[0, 0, 0]`, off
    the simplex. Now it is exact (the scale shared equally on the support), in both
    modes, and so is its Jacobian."""
    v = jnp.asarray(v)
    s = np.asarray(support)
    p = jax.jit(projections.simplex)(v, 1.0)
    assert p.dtype == v.dtype
    np.testing.assert_array_equal(p, s / s.sum())
    for mode in MODES:
        np.testing.assert_allclose(
            jax.jit(mode(projections.simplex))(v, 1.0), simplex_jacobian(s), atol=1e-7
        )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_l1_ball_at_large_magnitudes(dtype):
    """`l1_ball` projects through `simplex`: `[3e37, −3e38, 1e38]` in float32 (whose
    ‖·‖₁ overflows) went to 0. With scale 2 and two equal largest elements the
    support is shared, with signs."""
    big = 3e38 if dtype == jnp.float32 else 1e308
    v = jnp.asarray([0.1 * big, -big, big / 3], dtype)
    np.testing.assert_array_equal(jax.jit(projections.l1_ball)(v, 1.0), [0, -1, 0])
    v = jnp.asarray([1e8, -1e8, 0.0], dtype)
    np.testing.assert_array_equal(projections.l1_ball(v, 2.0), [1, -1, 0])
    signs = np.diag([1.0, -1.0, 1.0])
    expected = signs @ simplex_jacobian([1, 1, 0]) @ signs
    for mode in MODES:
        np.testing.assert_allclose(
            jax.jit(mode(projections.l1_ball))(v, 2.0), expected, atol=1e-7
        )


@pytest.mark.parametrize("n", [10, 1000])
@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_simplex_of_shifted_vectors_in_float32_against_float64(n, offset):
    """A common shift of `v` leaves its projection unchanged: in float32 the
    projection of `v + offset` matches the float64 one of `v` to the rounding unit of
    `offset + max|v|` (the input's own), and sums to 1 to float32's."""
    rng = np.random.default_rng(n)
    v = rng.normal(size=n)
    shifted = np.asarray(v + offset, np.float32)  # what float32 holds
    exact = np.asarray(projections.simplex(jnp.asarray(shifted, jnp.float64)))
    p = np.asarray(jax.jit(projections.simplex)(jnp.asarray(shifted)))
    ulp = np.spacing(np.float32(offset + np.max(np.abs(v))))
    np.testing.assert_allclose(p, exact, atol=4 * ulp + 1e-6)
    assert abs(p.sum(dtype=np.float64) - 1) <= n * 1e-7 and np.all(p >= 0)


@pytest.mark.parametrize(
    "v, radius, expected",
    [
        (np.array([3e19, 4e19], np.float32), 1.0, [0.6, 0.8]),  # ‖v‖² overflows
        (np.array([3e200, 4e200]), 1.0, [0.6, 0.8]),
        (np.array([3e-200, 4e-200]), 1e-200, [0.6e-200, 0.8e-200]),  # underflows
        (np.array([3e-25, 4e-25], np.float32), 1e-25, [0.6e-25, 0.8e-25]),
        (np.array([3e-25, 4e-25], np.float32), 1e-24, [3e-25, 4e-25]),  # inside
    ],
    ids=str,
)
def test_l2_ball_without_overflow_or_underflow(v, radius, expected):
    """`‖v‖²` overflowed (the projection was 0) or underflowed (v was returned,
    outside the ball); now v is scaled by a power of two first. The Jacobian
    `(r/‖v‖)(I − v vᵀ/‖v‖²)` too, in both modes."""
    v = jnp.asarray(v)
    p = jax.jit(projections.l2_ball)(v, radius)
    rtol = 1e-6 if v.dtype == jnp.float32 else 1e-14
    np.testing.assert_allclose(p, expected, rtol=rtol)
    inside = expected[0] == v[0]
    jacobian = np.eye(2) if inside else l2_ball_jacobian(v, radius)
    for mode in MODES:
        jac = jax.jit(mode(projections.l2_ball))(v, radius)
        np.testing.assert_allclose(jac, jacobian, rtol=10 * rtol, atol=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("magnitude", [1e19, 1e-30])
def test_hyperplane_and_group_l2_without_overflow_or_underflow(dtype, magnitude):
    """`‖a‖²` and a group's `‖v[g]‖²` overflowed or underflowed in float32 (the
    hyperplane left v unchanged, or was NaN; the group was kept whole, or zeroed).
    Against the closed forms, values and derivatives in both modes."""
    a = jnp.asarray([3.0, 4.0], dtype) * magnitude
    v = jnp.asarray([1.0, 0.0], dtype)
    tol = 1e-6 if dtype == jnp.float32 else 1e-14
    np.testing.assert_allclose(projections.hyperplane(v, a, 0.0), [0.64, -0.48], tol)
    # d/dv = I − n nᵀ with n = a/‖a‖ = (0.6, 0.8).
    normal = np.array([0.6, 0.8])
    for mode in MODES:
        jac = jax.jit(mode(projections.hyperplane))(v, a, 0.0)
        np.testing.assert_allclose(jac, np.eye(2) - np.outer(normal, normal), atol=tol)
    # Group lasso with strength 1/5 of the norm: the group shrinks to 4/5 of itself,
    # and d/ds = −g/‖g‖.
    groups = a[None]
    strength = jnp.asarray(magnitude, dtype)
    shrunk = jax.jit(prox.group_l2)(groups, strength)
    np.testing.assert_allclose(shrunk, 0.8 * np.asarray(groups), rtol=tol)
    for mode in MODES:
        d = jax.jit(mode(prox.group_l2, argnums=1))(groups, strength)
        np.testing.assert_allclose(d, -normal[None], atol=tol)


RANK_DEFICIENT = [
    ([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]], [1.0, 2.0]),  # consistent
    ([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]], [1.0, 3.0]),  # inconsistent
    ([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0 + 1e-15]], [1.0, 1.0]),  # numerically
    ([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [1.0, 0.0]),  # a zero row
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("A, b", RANK_DEFICIENT, ids=str)
def test_affine_with_a_rank_deficient_matrix_is_nan_with_a_warning(dtype, A, b):
    """The set computed from a rank-deficient `A` is not `{u: A u = b}`: a wrong
    point (`[−0.146, 0.370, 0.135]` for the consistent case, `5.8·10¹⁴` for the
    inconsistent one). Now NaN, value and derivatives in both modes, with a warning
    naming the cause; `on_failure="nan"` is silent."""
    v = jnp.asarray([0.3, 0.5, 0.2], dtype)
    A, b = jnp.asarray(A, dtype), jnp.asarray(b, dtype)
    with pytest.warns(RuntimeWarning, match="A is rank-deficient"):
        p = jax.jit(projections.affine)(v, A, b)
    assert np.all(np.isnan(p))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = jax.jit(lambda *args: projections.affine(*args, on_failure="nan"))
        assert np.all(np.isnan(quiet(v, A, b)))
        for mode in MODES:
            for argnums in (0, 1, 2):
                jac = jax.jit(mode(quiet, argnums=argnums))(v, A, b)
                assert np.all(np.isnan(jac))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("m, n", [(2, 2), (2, 3), (3, 5), (4, 40)])
def test_affine_refuses_random_rank_deficient_matrices_and_accepts_full_rank(
    dtype, m, n
):
    """Random `A` of rank `m − 1` (entries over six orders of magnitude): every one is
    refused, where the pivots of its QR alone would pass some. Full-rank ones of a
    moderate condition number are projected as the float64 pseudo-inverse says."""
    rng = np.random.default_rng(m * n)
    batch = 200
    low = rng.normal(size=(batch, m, m - 1)) @ rng.normal(size=(batch, m - 1, n))
    low = low * 10.0 ** rng.uniform(-3, 3, size=(batch, 1, n))
    project = jax.jit(
        jax.vmap(lambda v, A, b: projections.affine(v, A, b, on_failure="nan"))
    )
    v, b = rng.normal(size=(batch, n)), rng.normal(size=(batch, m))
    args = [jnp.asarray(x, dtype) for x in (v, low, b)]
    assert np.all(np.isnan(project(*args)))
    full = rng.normal(size=(batch, m, n))
    p = project(*(jnp.asarray(x, dtype) for x in (v, full, b)))
    expected = v - np.einsum(
        "kij,kj->ki", np.linalg.pinv(full), np.einsum("kij,kj->ki", full, v) - b
    )
    kappa = np.linalg.cond(full).max()
    tol = kappa * (1e-5 if dtype == jnp.float32 else 1e-13)
    np.testing.assert_allclose(p, expected, atol=tol)


def test_affine_shapes_and_complex_entries():
    """More rows than columns, or misshapen arguments, get a clear error (the first
    was a `vectorize` error about core dimensions). No constraint (`m = 0`) is the
    identity; complex `A` projects with `Aᴴ`, against the pseudo-inverse."""
    v = jnp.asarray([0.3, 0.5, 0.2])
    with pytest.raises(ValueError, match="more rows than columns"):
        projections.affine(v, jnp.ones((4, 3)) + jnp.eye(4, 3), jnp.ones(4))
    with pytest.raises(ValueError, match="must be vectors"):
        projections.affine(jnp.ones((3, 2)), jnp.ones((2, 3)), jnp.ones(2))
    with pytest.raises(ValueError, match=re.escape("(len(b), len(v))")):
        projections.affine(v, jnp.ones((2, 4)), jnp.ones(2))
    with pytest.raises(ValueError, match="on_failure"):
        projections.affine(v, jnp.ones((1, 3)), jnp.ones(1), on_failure="ignore")
    np.testing.assert_array_equal(projections.affine(v, jnp.zeros((0, 3)), []), v)
    rng = np.random.default_rng(0)
    A = rng.normal(size=(2, 4)) + 1j * rng.normal(size=(2, 4))
    b = rng.normal(size=2) + 1j * rng.normal(size=2)
    w = rng.normal(size=4) + 1j * rng.normal(size=4)
    p = jax.jit(projections.affine)(jnp.asarray(w), jnp.asarray(A), jnp.asarray(b))
    np.testing.assert_allclose(p, w - np.linalg.pinv(A) @ (A @ w - b), atol=1e-13)


def test_derivatives_of_simplex_and_l1_ball_export():
    """`jax.export` refuses host callbacks: the simplex's threshold carried one (the
    default `on_failure="warn"`), so no derivative of `simplex` or `l1_ball` could
    be exported. Exported and run, they match the ones computed directly."""
    x = jnp.asarray([0.3, 0.9, -0.2, 0.5])
    functions = [
        jax.grad(lambda x: projections.simplex(x, 1.0)[0]),
        jax.jacfwd(lambda x: projections.l1_ball(x, 1.0)),
        jax.jacrev(lambda x: projections.l1_ball(x, 1.0)),
        jax.jacrev(lambda s: projections.simplex(x, s), argnums=0),
    ]
    for f in functions:
        arg = x if f is not functions[-1] else jnp.asarray(1.0)
        exported = export.export(jax.jit(f))(arg)
        np.testing.assert_array_equal(exported.call(arg), f(arg))
    affine = jax.grad(
        lambda A: projections.affine(x, A, jnp.ones(1), on_failure="nan")[0]
    )
    A = jnp.ones((1, 4))
    np.testing.assert_allclose(export.export(jax.jit(affine))(A).call(A), affine(A))


INVALID = [
    ("scale", projections.simplex, -1.0),
    ("scale", projections.simplex, np.inf),
    ("scale", projections.simplex, np.nan),
    ("radius", projections.l1_ball, -1.0),
    ("radius", projections.l2_ball, -1.0),
    ("radius", projections.l2_ball, np.nan),
    ("lower", lambda v, p: projections.box(v, p, 0.0), 1.0),
    ("strength", prox.l1, -0.1),
    ("strength", prox.non_negative_l1, -0.1),
    ("strength", prox.l2_squared, -0.1),
    ("strength", lambda v, p: prox.group_l2(v.reshape(3, 1), p), -0.1),
]


@pytest.mark.parametrize("name, f, value", INVALID, ids=lambda x: str(x)[:12])
def test_invalid_parameters_raise_when_known_and_are_nan_when_traced(name, f, value):
    """A negative scale, radius or strength, or crossed box bounds, gave a finite
    value (simplex 0 with a misleading solver warning, l2_ball v, soft thresholding
    an expansion of v, box the upper bound). As a Python or NumPy value: a
    `ValueError` naming the parameter. As a JAX array: NaN, value and derivatives in
    v and in the parameter, in both modes (a NaN cotangent is not dropped by a
    `where` on the way), without a warning."""
    v = jnp.asarray([0.3, 0.5, 0.2])
    for known in (value, np.float64(value)):
        with pytest.raises(ValueError, match=f"`{name}` must be"):
            f(v, known)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        traced = jnp.asarray(value)
        assert np.all(np.isnan(jax.jit(f)(v, traced)))
        for mode in MODES:
            for argnums in (0, 1):
                jac = jax.jit(mode(f, argnums=argnums))(v, traced)
                assert np.all(np.isnan(jac))


def test_crossed_bounds_are_nan_only_where_crossed():
    v = jnp.asarray([0.3, 0.5, 0.2])
    upper = jnp.asarray([1.0, -1.0, 1.0])
    p = jax.jit(projections.box)(v, 0.0, upper)
    np.testing.assert_array_equal(np.isnan(p), [False, True, False])
    np.testing.assert_array_equal(p[::2], v[::2])


def test_infinite_radius_is_valid():
    """An infinite radius (no constraint) returns v, with the identity for
    derivative in v and zero in the radius, in both modes."""
    v = jnp.asarray([0.3, -0.5, 0.2])
    for project in (projections.l1_ball, projections.l2_ball):
        np.testing.assert_array_equal(project(v, jnp.inf), v)
        for mode in MODES:
            d_v, d_radius = jax.jit(mode(project, argnums=(0, 1)))(v, jnp.inf)
            np.testing.assert_array_equal(d_v, np.eye(3))
            np.testing.assert_array_equal(d_radius, np.zeros(3))


def test_integers_and_array_likes():
    """An integer v was projected in integers (`simplex([1, 2, 3], 0.5)` was
    `[0, 0, 0]`); a list of numbers was a pytree of Python floats (an
    `AttributeError`), and as a bound a raw JAX `TypeError`."""
    np.testing.assert_array_equal(
        projections.simplex(jnp.asarray([1, 2, 3]), 0.5), [0, 0, 0.5]
    )
    np.testing.assert_array_equal(projections.simplex([1.0, 2.0, 3.0]), [0, 0, 1])
    np.testing.assert_allclose(projections.l2_ball(jnp.asarray([3, 4])), [0.6, 0.8])
    np.testing.assert_allclose(projections.l1_ball([3, 4]), [0, 1])
    np.testing.assert_allclose(prox.l1(jnp.asarray([1, 2]), 0.5), [0.5, 1.5])
    np.testing.assert_allclose(prox.group_l2(jnp.asarray([[3, 4]]), 1.0), [[2.4, 3.2]])
    v = jnp.asarray([0.3, 1.5, -0.2])
    np.testing.assert_allclose(projections.box(v, [0.0, 0, 0], [1, 1, 1]), [0.3, 1, 0])
    np.testing.assert_allclose(
        projections.box(jnp.asarray([2, -1]), 0.5, 1.5), [1.5, 0.5]
    )


def test_clear_errors_for_unsupported_inputs():
    v = jnp.asarray([0.3, 0.5, 0.2])
    with pytest.raises(TypeError, match="two arguments"):
        projections.box(v, (0.0, 1.0), None)  # jaxopt's projection_box
    with pytest.raises(ValueError, match=r"^implicitdiff.projections.box: .*broadcast"):
        projections.box(v, jnp.zeros(2), 1.0)
    with pytest.raises(
        ValueError, match=r"^implicitdiff.prox.l1: .*does not broadcast"
    ):
        prox.l1(v, jnp.ones(2))
    with pytest.raises(TypeError, match=r"^implicitdiff.prox.l1: `strength` must be"):
        prox.l1({"a": v, "b": v}, [{"a": 1.0}, None])
    with pytest.raises(ValueError, match="simplex in zero dimensions is empty"):
        projections.simplex(jnp.zeros(0))
    assert projections.l1_ball(jnp.zeros(0)).shape == (0,)  # {()} is its own ball
    with pytest.raises(ValueError, match="one value per group"):
        prox.group_l2(jnp.ones((3, 2)), jnp.ones(2))
    with pytest.raises(ValueError, match="must be shaped like v"):
        projections.hyperplane(v, jnp.ones(2), 1.0)
    complex_v = jnp.asarray([1 + 1j, 0.0])
    for f in (
        projections.simplex,
        projections.l1_ball,
        projections.non_negative,
        lambda u: projections.box(u, 0.0, 1.0),
        lambda u: prox.non_negative_l1(u, 0.1),
    ):
        with pytest.raises(TypeError, match="is complex"):
            f(complex_v)
    with pytest.raises(TypeError, match="`scale` is complex"):
        projections.simplex(v, 1j)
    # Complex where the operation is defined by a modulus: soft thresholding shrinks
    # |v| and keeps the phase, the ℓ2 ball scales.
    np.testing.assert_allclose(
        prox.l1(complex_v, 0.5), [(1 + 1j) * (1 - 0.5 / 2**0.5), 0]
    )
    np.testing.assert_allclose(projections.l2_ball(complex_v), [(1 + 1j) / 2**0.5, 0])
