"""implicitdiff.host: NumPy/SciPy functions under jit and vmap, clear errors, and
NumPy forwards of an ImplicitFunction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import implicitdiff as idf

jax.config.update("jax_enable_x64", True)

WEIGHTS = np.array([1.0, 2.0, 3.0])


def minimise(x):
    """argmin_y Σ w (y − x)² + Σ y⁴/4 with SciPy, on host arrays."""
    assert isinstance(x, np.ndarray)  # the wrapper hands NumPy arrays to fn
    result = scipy.optimize.minimize(
        lambda y: np.sum(WEIGHTS * (y - x) ** 2) + np.sum(y**4) / 4,
        np.zeros_like(x),
        jac=lambda y: 2 * WEIGHTS * (y - x) + y**3,
        method="BFGS",
        tol=1e-14,
    )
    return result.x


def stationarity(x, y):
    return 2 * WEIGHTS * (y - x) + y**3


def analytic_jacobian(x, y):
    """dy/dx = (2W + 3 diag(y²))⁻¹ 2W, diagonal."""
    return np.diag(2 * WEIGHTS / (2 * WEIGHTS + 3 * np.asarray(y) ** 2))


X = jnp.array([0.5, 1.0, -0.3])
XS = jnp.stack([X, 2 * X])


def test_runs_under_jit_and_vmap():
    wrapped = idf.host(minimise)
    expected = np.stack([minimise(np.asarray(x)) for x in XS])
    np.testing.assert_allclose(wrapped(X), expected[0], rtol=1e-12)
    np.testing.assert_allclose(jax.jit(jax.vmap(wrapped))(XS), expected, rtol=1e-12)


def test_result_shape_pytree_or_function():
    def moments(x, power):
        return {"mean": np.mean(x**power), "parts": np.stack([x, -x])}

    declared = {
        "mean": jax.ShapeDtypeStruct((), jnp.float64),
        "parts": jax.ShapeDtypeStruct((2, 3), jnp.float64),
    }
    by_shapes = lambda x, power: {  # noqa: E731
        "mean": jax.ShapeDtypeStruct((), x.dtype),
        "parts": jax.ShapeDtypeStruct((2,) + x.shape, x.dtype),
    }
    for result_shape in (declared, by_shapes):
        out = jax.jit(idf.host(moments, result_shape))(X, 2.0)
        assert out["mean"] == pytest.approx(np.mean(np.asarray(X) ** 2))
        np.testing.assert_array_equal(out["parts"], np.stack([X, -X]))


def raising(x):
    raise ValueError("the solver diverged")


@pytest.mark.parametrize("transform", ["eager", "jit", "jit-vmap"])
def test_exception_names_the_function(transform):
    wrapped = idf.host(raising)
    call = {
        "eager": lambda: wrapped(X),
        "jit": lambda: jax.jit(wrapped)(X),
        "jit-vmap": lambda: jax.jit(jax.vmap(wrapped))(XS),
    }[transform]
    error = idf._host.HostFunctionError if transform == "eager" else Exception
    with pytest.raises(error) as info:
        jax.block_until_ready(call())
    message = str(info.value)
    assert "`raising` raised ValueError: the solver diverged" in message
    if transform == "eager":
        assert isinstance(info.value.__cause__, ValueError)


def test_wrong_output_shape_is_an_error():
    declared = idf.host(lambda x: x[:2], jax.ShapeDtypeStruct((3,), jnp.float64))
    with pytest.raises(idf._host.HostFunctionError) as info:
        declared(X)
    assert str(info.value).endswith(
        "returned shape (2,), expected (3,); the expected output was declared by "
        "result_shape."
    )
    with pytest.raises(Exception, match=r"returned shape \(2,\), expected \(3,\)"):
        jax.block_until_ready(jax.jit(declared)(X))


@pytest.mark.parametrize("transform", ["eager", "jit", "jit-vmap"])
def test_inferred_result_shape_says_so_and_names_the_fix(transform, capfd):
    # Nothing declared: the message must not say "declared", but where the expected
    # shape came from and how to declare it. Under jit it is the last line of JAX's
    # error, and JAX does not print its traceback as well.
    wrapped = idf.host(lambda x: np.ones(4))
    call = {
        "eager": lambda: wrapped(3.0),
        "jit": lambda: jax.jit(wrapped)(3.0),
        "jit-vmap": lambda: jax.jit(jax.vmap(wrapped))(jnp.ones(2)),
    }[transform]
    with pytest.raises(Exception) as info:
        jax.block_until_ready(call())
    last = str(info.value).splitlines()[-1]
    assert "returned shape (4,), expected ()" in last
    assert "inferred from its first argument, as no result_shape was given" in last
    assert "pass result_shape=" in last and "declared ()" not in last
    assert "Traceback" not in capfd.readouterr().err


def test_host_forward_of_implicit_function():
    f = idf.ImplicitFunction(idf.host(minimise), stationarity)
    jacobian = jax.jit(jax.jacrev(f))(X)
    np.testing.assert_allclose(jacobian, analytic_jacobian(X, f(X)), rtol=1e-10)
    np.testing.assert_allclose(jax.jacrev(f)(X), jacobian, rtol=1e-12)
    grads = jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(f(x)))))(XS)
    for grad, x in zip(grads, XS, strict=True):
        expected = np.diag(analytic_jacobian(x, f(x)))
        np.testing.assert_allclose(grad, expected, rtol=1e-10)


def test_plain_numpy_forward_works_eagerly():
    """Out of jit the implicit function calls its forward on concrete values, so a
    NumPy forward needs no wrapping for grad and jacrev."""
    f = idf.ImplicitFunction(lambda x: minimise(np.asarray(x)), stationarity)
    y = f(X)
    np.testing.assert_allclose(jax.jacrev(f)(X), analytic_jacobian(X, y), rtol=1e-10)
    grad = jax.grad(lambda x: jnp.sum(f(x)))(X)
    np.testing.assert_allclose(grad, np.diag(analytic_jacobian(X, y)), rtol=1e-10)
