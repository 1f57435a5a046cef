"""AMG (pyamg on the host) and its preconditioner: against dense NumPy solves, through
ImplicitFunction against analytic derivatives, one hierarchy per linearisation
point, NaN when not converged, and preconditioning of implicitdiff.CG."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from sparse_problems import (
    CubicProblem,
    assert_relative_error,
    check_implicit_derivatives,
    grid_matrix,
    linear_solve_loss,
    sparse_operator,
)

import implicitdiff as idf
from implicitdiff._solvers import _amg as amg_module
from implicitdiff._solvers._on_host import HOST_CACHE

jax.config.update("jax_enable_x64", True)

SPD = grid_matrix(12)
NONSYMMETRIC = grid_matrix(12, convection=0.5)
RNG = np.random.default_rng(1)
RHS = RNG.normal(size=(2, 144))


def solve_with(solver, A, b):
    return solver.solve(solver.presolve(A, None), b)


def batched_solve(solver):
    return jax.jit(jax.vmap(lambda A, b: solve_with(solver, A, b), (None, 0)))


@pytest.mark.parametrize(
    "solver, matrix",
    [
        (idf.AMG(), SPD),
        (idf.AMG("smoothed_aggregation"), SPD),
        (idf.AMG(accel=None, cycle="W"), SPD),
        (idf.AMG(accel="gmres"), NONSYMMETRIC),
        (idf.AMG(accel="bicgstab"), NONSYMMETRIC),
        (
            idf.AMG("smoothed_aggregation", accel="gmres", symmetry="nonsymmetric"),
            NONSYMMETRIC,
        ),
    ],
    ids=["rs-cg", "sa-cg", "rs-W", "rs-gmres", "rs-bicgstab", "sa-gmres"],
)
def test_matches_dense_solve(solver, matrix):
    expected = np.linalg.solve(matrix.toarray(), RHS.T).T
    x = batched_solve(solver)(sparse_operator(matrix), RHS)
    assert_relative_error(x, expected, 1e-9)
    transposed = sparse_operator(matrix).transpose()
    expected = np.linalg.solve(matrix.toarray().T, RHS[0])
    assert_relative_error(solve_with(solver, transposed, RHS[0]), expected, 1e-9)


@pytest.mark.parametrize(
    "solver, matrix",
    [(idf.AMG(), grid_matrix(4)), (idf.AMG(accel="gmres"), grid_matrix(4, 0.5))],
    ids=["spd", "nonsymmetric"],
)
def test_implicit_function_derivatives(solver, matrix):
    check_implicit_derivatives(solver, matrix, RNG)


def test_negative_definite_matrix_is_solved_as_its_negative():
    """Conditions written as `Δy + f = 0` have a negative definite `∂c/∂y`, on which
    CG and Ruge-Stüben fail: it gave NaN (with a warning) where splu solved it. The
    setup and the solves now use `−A`."""
    negative = -SPD
    expected = np.linalg.solve(negative.toarray(), RHS.T).T
    x = batched_solve(idf.AMG())(sparse_operator(negative), RHS)
    assert_relative_error(x, expected, 1e-9)
    check_implicit_derivatives(idf.AMG(), -grid_matrix(4), RNG)


def test_linear_solve_gradients():
    """`implicitdiff.linear_solve` with this solver: gradients w.r.t. A's values and b
    against JAX's differentiation of a dense solve."""
    sparse_loss, dense_loss, values = linear_solve_loss(idf.AMG(), SPD)
    b = jnp.asarray(RHS[0])
    grads = jax.jit(jax.grad(sparse_loss, argnums=(0, 1)))(values, b)
    expected = jax.grad(dense_loss, argnums=(0, 1))(values, b)
    for grad, reference in zip(grads, expected, strict=True):
        assert_relative_error(grad, reference, 1e-8)


def test_one_hierarchy_per_linearisation_point():
    problem = CubicProblem(grid_matrix(4))
    jacrev = jax.jit(jax.jacrev(problem.implicit(idf.AMG())))
    x = jnp.linspace(0.5, 1.5, 16)
    before = HOST_CACHE.preparations
    assert_relative_error(jacrev(x), problem.jacobian(x), 1e-8)
    assert HOST_CACHE.preparations - before == 1  # 16 right-hand sides, one setup
    jacrev(3 * x)
    assert HOST_CACHE.preparations - before == 2


@pytest.mark.full_optimisation
def test_failures_give_nan():
    too_few_cycles = idf.AMG(accel=None, max_steps=2)
    assert np.all(np.isnan(batched_solve(too_few_cycles)(sparse_operator(SPD), RHS)))
    broken = SPD.toarray()
    broken[5, 5] = np.inf
    broken = lx.MatrixLinearOperator(jnp.asarray(broken))
    assert np.all(np.isnan(batched_solve(idf.AMG())(broken, RHS)))
    # pyamg raises on an unknown smoother: an exception inside the callback
    unknown_smoother = idf.AMG(presmoother="no_such_smoother")
    x = batched_solve(unknown_smoother)(sparse_operator(SPD), RHS)
    assert np.all(np.isnan(x))


@pytest.mark.full_optimisation
def test_preconditioner_for_krylov_solvers():
    matrix = grid_matrix(24)
    operator = sparse_operator(matrix)
    b = RNG.normal(size=matrix.shape[0])
    expected = np.linalg.solve(matrix.toarray(), b)
    amg = idf.AMG().as_preconditioner()
    # 10 steps are far too few for plain CG on this grid, enough with one V-cycle
    # per step as the preconditioner.
    assert np.all(np.isnan(solve_with(idf.CG(max_steps=10), operator, b)))
    pcg = idf.CG(max_steps=10, preconditioner=amg)
    assert_relative_error(solve_with(pcg, operator, b), expected, 1e-9)


@pytest.mark.full_optimisation
def test_preconditioner_never_nans(monkeypatch):
    """A failed setup, or a hierarchy evicted from the cache, leaves the Krylov solver
    unpreconditioned, not poisoned."""
    preconditioner = idf.AMG().as_preconditioner()
    broken = SPD.toarray()
    broken[5, 5] = np.nan
    broken = lx.MatrixLinearOperator(jnp.asarray(broken))
    r = jnp.asarray(RHS[0])
    state = preconditioner.presolve(broken, None)
    np.testing.assert_array_equal(preconditioner.apply(state, r), r)
    monkeypatch.setattr(amg_module, "_REBUILD_MAX_VALUES", 0)  # ship no values
    state = preconditioner.presolve(sparse_operator(SPD), None)
    assert not np.array_equal(preconditioner.apply(state, r), r)
    HOST_CACHE.clear()
    np.testing.assert_array_equal(preconditioner.apply(state, r), r)


def test_preconditioner_inside_implicit_function():
    problem = CubicProblem(grid_matrix(4))
    solver = idf.CG(preconditioner=idf.AMG().as_preconditioner())
    f = problem.implicit(solver, on_failure="raise")
    x = jnp.linspace(-1.0, 2.0, 16)
    assert_relative_error(jax.jit(jax.jacrev(f))(x), problem.jacobian(x), 1e-8)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="method"):
        idf.AMG("geometric")
    with pytest.raises(ValueError, match="accel"):
        idf.AMG(accel="lsqr")
    with pytest.raises(ValueError, match="rtol"):
        idf.AMG(rtol=-1.0)
    with pytest.raises(ValueError, match="max_steps"):
        idf.AMG(max_steps=0)
