"""Bad input gets a clear error at construction or trace time, naming the culprit."""

import jax
import jax.numpy as jnp
import lineax as lx
import pytest

import implicitdiff as idf

sqrt_conditions = lambda x, y: y**2 - x


def test_non_callable_forward_or_conditions():
    with pytest.raises(TypeError, match="`forward` must be callable"):
        idf.ImplicitFunction(3.0, sqrt_conditions)
    with pytest.raises(TypeError, match="`conditions` must be callable"):
        idf.ImplicitFunction(jnp.sqrt, None)


def test_bad_options():
    with pytest.raises(ValueError, match="on_failure"):
        idf.ImplicitFunction(jnp.sqrt, sqrt_conditions, on_failure="ignore")
    with pytest.raises(TypeError, match="linear_solver"):
        idf.ImplicitFunction(jnp.sqrt, sqrt_conditions, linear_solver=lx.LU())
    with pytest.raises(TypeError, match="preconditioner"):
        idf.ImplicitFunction(jnp.sqrt, sqrt_conditions, linear_solver=idf.Jacobi())
    with pytest.raises(TypeError, match="preconditioner"):
        idf.CG(preconditioner=idf.Direct())
    with pytest.raises(ValueError, match="representation"):
        idf.ImplicitFunction(jnp.sqrt, sqrt_conditions, representation="dense")
    with pytest.raises(TypeError, match="check_conditions"):
        idf.ImplicitFunction(jnp.sqrt, sqrt_conditions, check_conditions=-1.0)
    with pytest.raises(TypeError, match="has_byproduct"):
        idf.ImplicitFunction(jnp.sqrt, sqrt_conditions, has_byproduct="yes")


def test_conditions_with_the_wrong_shape():
    f = idf.ImplicitFunction(jnp.sqrt, lambda x, y: jnp.sum(y**2 - x))
    with pytest.raises(ValueError, match="same pytree structure, shapes and dtypes"):
        f(jnp.ones(3))


def test_conditions_with_the_wrong_structure():
    f = idf.ImplicitFunction(
        lambda x: {"a": jnp.sqrt(x)}, lambda x, y: (y["a"] ** 2 - x,)
    )
    with pytest.raises(ValueError, match="LeastSquares"):
        jax.jit(f)(jnp.ones(3))


def test_conditions_with_the_wrong_dtype():
    f = idf.ImplicitFunction(jnp.sqrt, lambda x, y: (y**2 - x).astype(jnp.float32))
    with pytest.raises(ValueError, match="dtypes"):
        f(jnp.ones(3))


def test_byproduct_forward_must_return_a_pair():
    f = idf.ImplicitFunction(jnp.sqrt, sqrt_conditions, has_byproduct=True)
    with pytest.raises(TypeError, match=r"must return a tuple \(y, z\)"):
        f(jnp.ones(3))


def test_integer_solution_is_rejected():
    f = idf.ImplicitFunction(lambda x: x.astype(jnp.int32), sqrt_conditions)
    with pytest.raises(TypeError, match="floating-point arrays"):
        f(jnp.ones(3))


def test_python_number_solution_is_rejected_with_a_hint():
    f = idf.ImplicitFunction(lambda x: 2.0, lambda x, y: y - x)
    with pytest.raises(TypeError, match=r"not Python numbers: jnp.asarray\(y\)"):
        f(jnp.array(2.0))


def test_gradient_wrt_integer_only_x():
    f = idf.ImplicitFunction(
        lambda n: jnp.sqrt(n.astype(jnp.float64)),
        lambda n, y: y**2 - n.astype(jnp.float64),
    )
    n = jnp.arange(1, 4)
    assert f(n).shape == (3,)
    with pytest.raises(TypeError, match="int"):
        jax.grad(lambda n: jnp.sum(f(n)))(n)


def test_least_squares_with_fewer_conditions_than_unknowns():
    """No unique solution, no derivative: said at trace time, not as a NaN."""
    f = idf.ImplicitFunction(
        jnp.sqrt,
        lambda x, y: jnp.sum(y**2 - x)[None],
        linear_solver=idf.LeastSquares(),
    )
    with pytest.raises(ValueError, match="at least as many conditions as unknowns"):
        jax.jacfwd(f)(jnp.array([4.0, 9.0]))


def test_linear_solve_integer_values_and_column_right_hand_side():
    import numpy as np
    from jax.experimental import sparse

    indices = np.array([[0, 0], [1, 1], [2, 2]])
    integers = sparse.BCOO((jnp.array([1, 2, 4]), indices), shape=(3, 3))
    with pytest.raises(TypeError, match="linear_solve: A and b must hold floating"):
        idf.linear_solve(integers, jnp.array([1, 2, 3]))
    A = sparse.BCOO((jnp.array([1.0, 2.0, 4.0]), indices), shape=(3, 3))
    column = idf.linear_solve(A, jnp.ones((3, 1)))  # shaped like b, as jnp.linalg.solve
    assert column.shape == (3, 1)
    np.testing.assert_allclose(column[:, 0], [1.0, 0.5, 0.25])


@pytest.mark.parametrize(
    "solver",
    [
        lx.CG(rtol=1e-8, atol=1e-8),
        lx.Cholesky(),
        lx.Diagonal(),
        lx.Tridiagonal(),
        lx.Triangular(),
    ],
)
def test_lineax_solvers_that_need_tags_name_the_alternative(solver):
    """lineax's CG and Cholesky need an operator tagged definite, which ∂c/∂y is
    not: the error says so and names implicitdiff's own CG, at trace time."""
    f = idf.ImplicitFunction(
        jnp.sqrt, lambda x, y: y**2 - x, linear_solver=idf.Lineax(solver)
    )
    with pytest.raises(ValueError, match=r"implicitdiff\.CG\(\)"):
        jax.grad(lambda x: f(x).sum())(jnp.ones(3))
