"""`Auto` on a diagonal `∂c/∂y` (elementwise conditions): found by structure, solved
by division; the promise holds (NaN and a warning on a zero or non-finite entry, the
exact derivative however widely the entries differ), and a non-diagonal Jacobian never
takes this path."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicitdiff as idf
from implicitdiff._solvers._diagonal import is_diagonal


def sqrt_fn():
    return idf.ImplicitFunction(
        lambda x: jnp.sqrt(x), lambda x, y: y**2 - x, check_conditions=None
    )


@pytest.mark.full_optimisation
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("n", [1, 10, 100_000])
def test_elementwise_derivatives_match_the_closed_form(dtype, n):
    x = jnp.linspace(0.5, 4.0, n, dtype=dtype)
    f = sqrt_fn()
    expected = 0.5 / np.sqrt(np.asarray(x, np.float64))
    rtol = 1e-5 if dtype == jnp.float32 else 1e-12
    grad = jax.jit(jax.grad(lambda x: f(x).sum()))(x)
    _, tangent = jax.jvp(f, (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(grad, expected, rtol=rtol)
    np.testing.assert_allclose(tangent, expected, rtol=rtol)
    assert grad.dtype == dtype
    if n == 10:
        np.testing.assert_allclose(jax.jacfwd(f)(x), np.diag(expected), rtol=rtol)
        np.testing.assert_allclose(jax.jacrev(f)(x), np.diag(expected), rtol=rtol)


def test_pytree_complex_and_vmap():
    def conditions(x, y):
        return {"a": y["a"] * 3.0 - x["a"], "b": (2.0 + 1j) * y["b"] - x["b"]}

    def forward(x):
        return {"a": x["a"] / 3.0, "b": x["b"] / (2.0 + 1j)}

    f = idf.ImplicitFunction(forward, conditions)
    x = {"a": jnp.arange(1.0, 4.0), "b": jnp.ones(2, jnp.complex128)}
    _, tangent = jax.jvp(f, (x,), (x,))
    np.testing.assert_allclose(tangent["a"], x["a"] / 3.0, rtol=1e-12)
    np.testing.assert_allclose(tangent["b"], x["b"] / (2.0 + 1j), rtol=1e-12)
    batched = jax.vmap(jax.grad(lambda s: sqrt_fn()(s * jnp.ones(3)).sum()))
    s = jnp.array([1.0, 4.0, 9.0])
    np.testing.assert_allclose(batched(s), 3 * 0.5 / np.sqrt(s), rtol=1e-12)


@pytest.mark.full_optimisation
@pytest.mark.parametrize("n", [10, 100_000])
@pytest.mark.parametrize("bad", [0.0, np.inf])
def test_singular_diagonal_is_nan_and_warns_in_both_directions(n, bad):
    d = jnp.ones(n).at[n // 2].set(bad)
    f = idf.ImplicitFunction(
        lambda x: x, lambda x, y: d * y - d * x, check_conditions=None
    )
    x = jnp.ones(n)
    with pytest.warns(RuntimeWarning, match="did not solve"):
        grad = jax.grad(lambda x: f(x).sum())(x)
    with pytest.warns(RuntimeWarning, match="did not solve"):
        _, tangent = jax.jvp(f, (x,), (x,))
    assert np.isnan(grad).all() and np.isnan(tangent).all()


@pytest.mark.full_optimisation
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("n", [100, 100_000])
def test_diagonal_entries_of_any_spread_are_solved_exactly(n, dtype):
    """Each ẏᵢ = bᵢ/dᵢ is as accurate as dᵢ: a spread of the entries far past a general
    matrix's threshold (κ = 10¹² for √ on 10⁻⁶…10⁶; 10¹⁷ for an entry of 10⁻¹⁷ among
    ones) refuses nothing, in both directions."""
    x = jnp.logspace(-6, 6, n, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad = jax.grad(lambda x: sqrt_fn()(x).sum())(x)
        _, tangent = jax.jvp(sqrt_fn(), (x,), (jnp.ones_like(x),))
    exact = 0.5 / np.sqrt(np.asarray(x, np.float64))
    rtol = 1e-6 if dtype == jnp.float32 else 1e-14
    np.testing.assert_allclose(grad, exact, rtol=rtol)
    np.testing.assert_allclose(tangent, exact, rtol=rtol)
    d = jnp.ones(n, dtype).at[n // 2].set(1e-17 if dtype == jnp.float64 else 1e-30)
    f = idf.ImplicitFunction(lambda x: x, lambda x, y: d * y - d * x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad = jax.grad(lambda x: f(x).sum())(jnp.ones(n, dtype))
        _, tangent = jax.jvp(f, (jnp.ones(n, dtype),), (jnp.ones(n, dtype),))
    np.testing.assert_allclose(grad, np.ones(n), rtol=rtol)
    np.testing.assert_allclose(tangent, np.ones(n), rtol=rtol)


def test_structure_decides_never_values():
    """A coupled Jacobian stays with `Direct`, even where the coupling is zero at this
    point or cancels on a probe of ones; a diagonal one is found under jit and vmap."""

    def coupled(x, y):  # ∂c/∂y = [[1, a], [a, 1]]: diagonal only when a = 0
        return y + x[0] * jnp.flip(y) - x

    f = idf.ImplicitFunction(
        lambda x: jnp.linalg.solve(jnp.eye(2) + x[0] * jnp.flip(jnp.eye(2), 0), x),
        coupled,
    )
    x = jnp.array([0.0, 1.0])
    reference = jax.jacfwd(
        lambda x: jnp.linalg.solve(jnp.eye(2) + x[0] * jnp.flip(jnp.eye(2), 0), x)
    )(x)
    np.testing.assert_allclose(jax.jacrev(f)(x), reference, atol=1e-12)
    x = jnp.array([0.5, 1.0])
    reference = jax.jacfwd(
        lambda x: jnp.linalg.solve(jnp.eye(2) + x[0] * jnp.flip(jnp.eye(2), 0), x)
    )(x)
    np.testing.assert_allclose(jax.jacfwd(f)(x), reference, atol=1e-12)


def test_is_diagonal_by_structure():
    import lineax as lx

    s = jax.ShapeDtypeStruct((4,), jnp.float64)
    d = jnp.array([1.0, 0.0, 2.0, 3.0])
    assert is_diagonal(lx.FunctionLinearOperator(lambda v: d * v, s))
    assert not is_diagonal(lx.FunctionLinearOperator(lambda v: v + 2.0 * v[0], s))
    assert not is_diagonal(lx.FunctionLinearOperator(lambda v: jnp.cumsum(v), s))
    # A constant matrix's zeros are structural; a traced one's values are unknown.
    assert is_diagonal(lx.MatrixLinearOperator(jnp.diag(d)))
    found = []

    def traced(m):
        found.append(is_diagonal(lx.MatrixLinearOperator(m)))
        return m

    jax.jit(traced)(jnp.diag(d))
    assert found == [False]


@pytest.mark.full_optimisation
def test_large_operators_through_a_product_are_not_examined():
    """Above 1024 unknowns a product or reduction of the unknowns means "not
    diagonal" without running the detector (whose cost grows with the pattern);
    elementwise operators are still found at any size."""
    import lineax as lx

    n = 4096
    s = jax.ShapeDtypeStruct((n,), jnp.float64)
    blocks = jnp.ones((n // 64, 64, 64))
    mixing = lx.FunctionLinearOperator(
        lambda v: v + jnp.einsum("bij,bj->bi", blocks, v.reshape(-1, 64)).ravel(), s
    )
    assert not is_diagonal(mixing)
    assert is_diagonal(lx.FunctionLinearOperator(lambda v: 3.0 * v + jnp.sin(1.0), s))


def test_a_coupling_without_an_exact_rule_is_not_examined_densely(monkeypatch):
    # Auto's diagonal test ran the detector through a `lax.scan` coupling, whose
    # fallback built the dense n × n pattern: 37 s and 11 GB at n = 2·10⁴, a
    # MemoryError (75 GiB) at 10⁵. It now stops at the first fallback.
    import implicitdiff._sparse._detect as detect

    def dense_pattern_built(*args):
        raise AssertionError("the dense fallback pattern was built")

    monkeypatch.setattr(detect, "_repeated", dense_pattern_built)

    def smooth(y):  # an IIR filter: each output depends on every earlier input
        step = lambda carry, yi: (0.5 * carry + yi, 0.5 * carry + yi)
        return jax.lax.scan(step, jnp.zeros((), y.dtype), y)[1]

    def forward(x):
        y = x / 3
        for _ in range(60):
            y = (x - 0.1 * jnp.tanh(smooth(y))) / 3
        return y

    conditions = lambda x, y: 3 * y + 0.1 * jnp.tanh(smooth(y)) - x
    x = jnp.asarray(np.random.default_rng(0).normal(size=20_000))
    loss = lambda solver: (
        lambda x: jnp.sum(
            idf.ImplicitFunction(forward, conditions, linear_solver=solver)(x) ** 2
        )
    )
    grad = jax.jit(jax.grad(loss(idf.Auto())))(x)
    reference = jax.jit(jax.grad(loss(idf.GMRES(rtol=1e-12))))(x)
    np.testing.assert_allclose(grad, reference, rtol=1e-8, atol=1e-10)


def test_a_sparse_operator_is_judged_by_its_pattern():
    import scipy.sparse as sp

    for dense, diagonal in (
        (np.diag(np.arange(1.0, 6.0)), True),
        (np.eye(5) + np.eye(5, k=1), False),
    ):
        matrix = sp.csr_array(dense)
        operator = idf.SparseLinearOperator(jnp.asarray(matrix.data), matrix)
        assert is_diagonal(operator) is diagonal
        assert is_diagonal(operator.transpose()) is diagonal
