"""check_conditions=tol: ‖c(x, y)‖ ≤ tol·(1 + ‖y‖) at the forward's output, else the
on_failure policy. (The basic nan/warn/raise behaviour is in test_failure_policy.py.)"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicitdiff as idf

jax.config.update("jax_enable_x64", True)


def off_by(delta):
    """A forward whose output misses c(x, y) = y − x by exactly ‖c‖ = delta (in its
    first element): the check's threshold can be placed on either side of it."""
    return idf.ImplicitFunction(
        lambda x: x.at[0].add(delta),
        lambda x, y: y - x,
        check_conditions=1e-3,
        on_failure="nan",
    )


@pytest.mark.parametrize("side", [-1, 1])
def test_threshold_is_tol_times_one_plus_norm_y(side):
    x = jnp.array([3.0, 4.0])  # ‖y‖ ≈ 5
    # The threshold is 1e-3·(1 + ‖y‖); put ‖c‖ 1% below (side = −1) or above it.
    y_norm = float(np.linalg.norm(np.asarray(x)))  # ‖x + δe₀‖ to first order
    delta = 1e-3 * (1 + y_norm) * (1 + side * 0.01)
    y = jax.jit(off_by(delta))(x)
    if side < 0:
        np.testing.assert_allclose(y, x.at[0].add(delta))
    else:
        assert bool(jnp.all(jnp.isnan(y)))


def test_derivatives_are_nan_too_when_the_check_fails():
    f = off_by(1.0)  # far above the threshold
    x = jnp.array([3.0, 4.0])
    assert bool(jnp.all(jnp.isnan(jax.jit(f)(x))))
    gradient = jax.jit(jax.grad(lambda x: jnp.sum(f(x))))(x)
    assert bool(jnp.all(jnp.isnan(gradient))), gradient


def test_per_problem_under_vmap_with_pytrees_byproduct_and_args():
    # y = {"root": √(x·s), "shifted": 2·√(x·s) + x}, with s an extra argument and a
    # byproduct holding the Newton step count; the forward stops after `steps`, so
    # only the problem given too few steps fails its check.
    def forward(x, steps, s):
        def newton(_, r):
            return r - (r**2 - x * s) / (2 * r)

        r = jax.lax.fori_loop(0, steps, newton, jnp.ones_like(x))
        return {"root": r, "shifted": 2 * r + x}, steps

    def conditions(x, y, z, steps, s):  # z, the byproduct, is the step count too
        return {
            "root": y["root"] ** 2 - x * s,
            "shifted": y["shifted"] - 2 * y["root"] - x,
        }

    f = idf.ImplicitFunction(
        forward, conditions, has_byproduct=True, check_conditions=1e-10
    )
    x = jnp.array([[2.0, 3.0], [2.0, 3.0], [5.0, 7.0]])
    steps = jnp.array([40, 2, 40])  # the middle problem stops after two steps
    s = jnp.array([1.5, 1.5, 0.5])

    def loss(x, steps, s):
        y, _ = f(x, steps, s)
        return jnp.sum(y["root"]) + jnp.sum(y["shifted"])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 2))))(x, steps, s)
    assert any("does not satisfy the conditions" in str(w.message) for w in caught)
    # d/dx (3√(x s) + x) = 1.5 √(s/x) + 1, d/ds = 1.5 Σ √(x/s), for the problems
    # that passed.
    for i in (0, 2):
        expected = 1.5 * np.sqrt(s[i] / x[i]) + 1
        np.testing.assert_allclose(grads[0][i], expected, rtol=1e-10)
        np.testing.assert_allclose(
            grads[1][i], 1.5 * np.sum(np.sqrt(x[i] / s[i])), rtol=1e-10
        )
    assert bool(jnp.all(jnp.isnan(grads[0][1]))) and bool(jnp.isnan(grads[1][1]))


def test_float32_and_the_solve_log_blames_the_forward_not_the_solver():
    x = jnp.array([4.0, 9.0], jnp.float32)

    def stopped_early(x):
        return jnp.sqrt(x) * (1 + 1e-3)

    for forward, expected in (
        (jnp.sqrt, "converged"),
        (stopped_early, "non-finite input"),
    ):
        f = idf.ImplicitFunction(
            forward, lambda x, y: y**2 - x, check_conditions=1e-5, on_failure="nan"
        )
        with idf.SolveLog() as log:
            gradient = jax.jit(jax.grad(lambda x: jnp.sum(f(x))))(x)
            tangent = jax.jit(lambda x: jax.jvp(f, (x,), (x,))[1])(x)
        assert gradient.dtype == tangent.dtype == jnp.float32
        # The same status in both directions: in reverse mode the solve's input is a
        # finite cotangent, and only the recorded check tells the forward's failure.
        assert [entry.status for entry in log] == [expected, expected]
        if expected == "converged":
            np.testing.assert_allclose(gradient, 0.5 / np.sqrt(x), rtol=1e-6)
            np.testing.assert_allclose(tangent, 0.5 * np.sqrt(x), rtol=1e-6)
        else:  # a failed check: NaN in, NaN out, not a failure of the solve's own
            assert bool(jnp.all(jnp.isnan(gradient)))
            assert bool(jnp.all(jnp.isnan(tangent)))


def test_a_passed_check_leaves_every_number_as_it_is():
    """The output is poisoned by adding NaN or −0 (not by a select, which would stop
    the tangents): every number, −0 included, passes unchanged."""
    x64 = jnp.array([-0.0, 0.0, 1e-300, -3.5, 1e100])
    x32 = jnp.array([-0.0, 0.0, 1e-30, -3.5, 1e10], jnp.float32)
    z = x32 + 1j * x32[::-1]  # −0 in real and imaginary parts
    f = idf.ImplicitFunction(lambda x: x, lambda x, y: y - x)
    for x in (x64, x32, z):
        y = jax.jit(f)(x)
        assert y.dtype == x.dtype
        for part in (jnp.real, jnp.imag):
            np.testing.assert_array_equal(np.signbit(part(y)), np.signbit(part(x)))
        np.testing.assert_array_equal(y, x)


def test_a_forward_diverging_to_inf_is_caught():
    """Finite x, infinite y: ‖y‖ = inf made the tolerance inf and the test pass."""

    def newton_sqrt(x):  # from y = 1, x = −1 steps to y = 0, then to −inf
        y = jnp.ones_like(x)
        for _ in range(10):
            y = 0.5 * (y + x / y)
        return y

    f = idf.ImplicitFunction(newton_sqrt, lambda x, y: y**2 - x)
    x = jnp.array([-1.0, 4.0])
    assert not bool(jnp.all(jnp.isfinite(newton_sqrt(x))))
    with pytest.warns(RuntimeWarning, match="is not finite or does not satisfy"):
        y = f(x)
    assert bool(jnp.all(jnp.isnan(y)))
    with pytest.warns(RuntimeWarning, match="is not finite or does not satisfy"):
        assert bool(jnp.all(jnp.isnan(jax.grad(lambda x: f(x).sum())(x))))


@pytest.mark.full_optimisation
@pytest.mark.parametrize("n", [8, 100_000])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_a_wrong_forward_is_caught_where_squares_overflow(dtype, n):
    """y = 2x for c = y − x, with entries whose squares overflow float16: ‖y‖ must not
    come out inf (the tolerance with it)."""
    f = idf.ImplicitFunction(lambda x: 2 * x, lambda x, y: y - x)
    x = jnp.full(n, 300.0, dtype)
    with pytest.warns(RuntimeWarning, match="does not satisfy"):
        assert bool(jnp.all(jnp.isnan(f(x))))
    right = idf.ImplicitFunction(lambda x: x, lambda x, y: y - x)
    np.testing.assert_array_equal(right(x), x)


@pytest.mark.parametrize("n", [10, 100_000])
@pytest.mark.parametrize(
    "dtype, magnitude",
    [
        ("float16", 300.0),
        ("bfloat16", 1e4),
        ("float32", 1e15),
        ("float64", 1e100),
        ("complex128", 1e100),
    ],
)
def test_tree_norm_does_not_overflow_the_leaf_type(n, dtype, magnitude):
    """Squares beyond the leaf type's range: in float16 from 256 on."""
    from implicitdiff._misc import tree_norm

    values = np.random.default_rng(0).uniform(0.5, 1.0, n) * magnitude
    leaf = jnp.asarray(values * (1 + 1j) if dtype == "complex128" else values, dtype)
    tree = {"a": leaf, "b": leaf[:3]}
    exact = np.sqrt(
        sum(
            np.sum(np.abs(np.asarray(v, np.complex128) / magnitude) ** 2)
            for v in tree.values()
        )
    )
    assert abs(float(jax.jit(tree_norm)(tree)) / magnitude - exact) <= 1e-3 * exact
    for bad in (np.nan, np.inf):
        broken = {"a": leaf.at[n // 2].set(bad), "b": leaf[:3]}
        result = float(jax.jit(tree_norm)(broken))
        assert np.isnan(result) if np.isnan(bad) else result == np.inf


@pytest.mark.full_optimisation
def test_a_large_float32_output_is_not_refused():
    """y of 10²⁰ in float32: ‖y‖² overflowed the check's norm, which then refused a
    correct forward (NaN and a warning that blamed it)."""
    A = jnp.array([[2.0, 1.0], [1.0, 3.0]], jnp.float32)
    f = idf.ImplicitFunction(lambda x: jnp.linalg.solve(A, x), lambda x, y: A @ y - x)
    x = jnp.array([1.0, 2.0], jnp.float32) * 1e20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, jacobian = jax.jit(lambda x: (f(x), jax.jacrev(f)(x)))(x)
    inverse = np.linalg.inv(np.asarray(A, np.float64))
    np.testing.assert_allclose(y, inverse @ np.asarray(x, np.float64), rtol=1e-6)
    np.testing.assert_allclose(jacobian, inverse, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_16_bit_rounding_is_not_a_failed_check(dtype):
    """A correctly rounded bfloat16 √x misses y² = x by ~ε = 2⁻⁷, past the default
    1e-3: the check refused every bfloat16 forward. A forward 20 % off still fails."""
    x = jnp.array([2.0, 3.0, 5.0, 7.0], dtype)
    conditions = lambda x, y: y**2 - x  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = jax.jit(idf.ImplicitFunction(jnp.sqrt, conditions))(x)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.sqrt([2, 3, 5, 7]), 1e-2)
    wrong = idf.ImplicitFunction(lambda x: 1.2 * jnp.sqrt(x), conditions)
    with pytest.warns(RuntimeWarning, match="does not satisfy the conditions"):
        assert bool(jnp.all(jnp.isnan(jax.jit(wrong)(x))))
