"""implicitdiff.Sparse (colouring, assembly, verification) and linear_solve, against
dense references."""

import functools as ft
import time

import jax
import jax.numpy as jnp
import numpy as np
import pyamg
import pytest
import scipy.sparse as sp
from jax import lax
from jax.experimental import sparse as jsparse

import implicitdiff as idf
from implicitdiff import _representation as _representation_module
from implicitdiff._sparse import _colouring, _operator, _representation

jax.config.update("jax_enable_x64", True)

N = 5  # grid side: 25 unknowns


def laplacian_matrix(n):
    """The 5-point Laplacian with zero boundary values, built without JAX."""
    one_d = sp.diags_array([-1.0, 2.0, -1.0], offsets=[-1, 0, 1], shape=(n, n))
    eye = sp.eye_array(n)
    return sp.csr_array(sp.kron(one_d, eye) + sp.kron(eye, one_d))


LAPLACIAN = laplacian_matrix(N)
LAPLACIAN_DENSE = jnp.asarray(LAPLACIAN.toarray())


def conditions(x, y):
    """-Δy + y³ = x on an N×N grid (stencil written with pad and slices)."""
    p = jnp.pad(y, 1)
    return 4 * y - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:] + y**3 - x


def jacobian_y(y):
    """∂c/∂y = L + 3 diag(y²), analytically."""
    return LAPLACIAN_DENSE + 3 * jnp.diag(jnp.ravel(y) ** 2)


@jax.jit
def forward(x):
    def newton(_, y):
        step = jnp.linalg.solve(
            jacobian_y(y).astype(y.dtype), jnp.ravel(conditions(x, y))
        )
        return y - step.reshape(y.shape)

    return lax.fori_loop(0, 30, newton, jnp.zeros_like(x))


def reference_jacobian(x):
    """dy/dx = (∂c/∂y)⁻¹ since ∂c/∂x = −I; shaped like jax.jacobian's output."""
    inverse = jnp.linalg.inv(jacobian_y(forward(x)))
    return inverse.reshape(N, N, N, N)


X = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, (N, N)))
PATTERN = jsparse.BCOO.fromdense(LAPLACIAN.toarray() != 0)
# A SciPy pattern with more entries than ∂c/∂y has: they come out as zeros.
SUPERSET = sp.csr_matrix(LAPLACIAN + sp.eye(N * N, k=7))


DIRECT = idf.Direct()


def implicit(representation, solver=DIRECT, on_failure="raise"):
    return idf.ImplicitFunction(
        forward,
        conditions,
        linear_solver=solver,
        representation=representation,
        on_failure=on_failure,
    )


@ft.cache
def operator_jacobians():
    f = implicit("operator")
    return jax.jit(jax.jacfwd(f))(X), jax.jit(jax.jacrev(f))(X)


# Patterns -----------------------------------------------------------------------


def test_pattern_sorts_deduplicates_and_transposes():
    """Coordinates in any order, with repeats, give the CSR pattern of their set; the
    transpose and its permutation agree with a NumPy lexsort."""
    rng = np.random.default_rng(3)
    rows, cols = rng.integers(0, 40, 500), rng.integers(0, 30, 500)
    pattern = idf.SparsityPattern(rows, cols, (40, 30))
    expected = np.unique(rows * 30 + cols)
    np.testing.assert_array_equal(pattern.rows, expected // 30)
    np.testing.assert_array_equal(pattern.cols, expected % 30)
    np.testing.assert_array_equal(
        pattern.indptr,
        sp.csr_array(
            (np.ones(expected.size), (expected // 30, expected % 30)), shape=(40, 30)
        ).indptr,
    )
    permutation = np.lexsort((pattern.rows, pattern.cols))
    np.testing.assert_array_equal(pattern.transpose_permutation, permutation)
    assert pattern.T.shape == (30, 40)
    np.testing.assert_array_equal(pattern.T.rows, pattern.cols[permutation])
    np.testing.assert_array_equal(pattern.T.cols, pattern.rows[permutation])
    assert pattern.T.T == pattern and hash(pattern.T.T) == hash(pattern)
    same = idf.SparsityPattern(pattern.rows, pattern.cols, (40, 30))  # sorted input
    assert same == pattern and hash(same) == hash(pattern)
    assert pattern != idf.SparsityPattern(pattern.rows, pattern.cols, (41, 30))
    with pytest.raises(ValueError, match="outside"):
        idf.SparsityPattern([0, 40], [0, 0], (40, 30))


# Colouring ----------------------------------------------------------------------


def _assert_structurally_orthogonal(pattern, colours):
    """No row holds two columns of the same colour."""
    keys = pattern.rows.astype(np.int64) * (colours.max() + 1) + colours[pattern.cols]
    assert np.unique(keys).size == keys.size


@pytest.mark.parametrize("n", [4, 10, 33])
def test_five_point_stencil_needs_at_most_seven_colours(n):
    pattern = idf.SparsityPattern.of(laplacian_matrix(n))
    colouring = _colouring.column_colouring(pattern)
    assert colouring.n_colours <= 7
    _assert_structurally_orthogonal(pattern, colouring.colours)


@pytest.mark.parametrize(
    "matrix, most",
    [
        (sp.diags([1.0] * 3, [-1, 0, 1], shape=(5000, 5000)), 3),  # tridiagonal
        (sp.diags([1.0] * 11, range(-5, 6), shape=(5000, 5000)), 11),  # bandwidth 5
        (sp.block_diag([np.ones((20, 20))] * 50), 20),
        (pyamg.gallery.stencil_grid(np.ones((3, 3)), (30, 30)), 9),  # 9-point
        (pyamg.gallery.poisson((12, 12, 12)), 13),  # 3D 7-point
        (sp.random(2000, 2000, density=0.002, random_state=0), None),
    ],
)
def test_colouring_is_valid_and_small(matrix, most):
    """Valid on every pattern, and as few colours as the sequential sweeps of
    structured patterns give (optimal for the bands and the blocks)."""
    pattern = idf.SparsityPattern.of(matrix)
    colouring = _colouring.column_colouring(pattern)
    _assert_structurally_orthogonal(pattern, colouring.colours)
    if most is not None:
        assert colouring.n_colours <= most


def test_colouring_of_irregular_patterns_is_valid():
    matrix = sp.random(300, 200, density=0.02, random_state=1) + sp.eye(300, 200)
    pattern = idf.SparsityPattern.of(matrix)
    colouring = _colouring.column_colouring(pattern)
    _assert_structurally_orthogonal(pattern, colouring.colours)
    dense = idf.SparsityPattern.of(np.ones((7, 5)))
    assert _colouring.column_colouring(dense).n_colours == 5


def test_one_colouring_per_pattern(monkeypatch):
    calls = []
    original = _colouring._mis_colouring
    monkeypatch.setattr(
        _colouring, "_mis_colouring", lambda g: calls.append(1) or original(g)
    )
    _colouring.column_colouring.cache_clear()

    @ft.partial(jax.jit, static_argnums=1)
    def assemble(y, representation):
        _, linear = jax.linearize(lambda y: conditions(X, y), y)
        return representation.operator(linear, jax.eval_shape(lambda: y)).data

    given = assemble(X, idf.Sparse(PATTERN))
    assemble(X + 0.1, idf.Sparse(PATTERN))  # no retrace
    detected = assemble(X, idf.Sparse("auto"))  # a new trace, an equal pattern
    assert len(calls) == 1
    np.testing.assert_allclose(given, detected)
    # The values, in CSR order, are those of ∂c/∂y.
    pattern = idf.SparsityPattern.of(PATTERN)
    expected = jacobian_y(X)[pattern.rows, pattern.cols]
    np.testing.assert_allclose(given, expected, rtol=1e-12)


# The implicit function with a sparse representation ------------------------------


@pytest.mark.parametrize(
    "representation, solver",
    [
        (idf.Sparse("auto"), idf.Direct()),
        (idf.Sparse(SUPERSET), idf.GMRES(rtol=1e-12, atol=1e-12)),
    ],
    ids=["auto-Direct", "scipy_superset-GMRES"],
)
def test_jacobians_match_operator_and_analytic(representation, solver):
    f = implicit(representation, solver)
    forward_mode, reverse_mode = jax.jit(jax.jacfwd(f))(X), jax.jit(jax.jacrev(f))(X)
    expected = reference_jacobian(X)
    for result, with_operator in zip(
        (forward_mode, reverse_mode), operator_jacobians(), strict=True
    ):
        np.testing.assert_allclose(result, expected, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(result, with_operator, rtol=1e-8, atol=1e-10)


def test_assembly_batched_over_colours(monkeypatch):
    """Past `_MOST_UNBATCHED_COLOURS` the JVPs of the colours run as one vmap."""
    monkeypatch.setattr(_representation, "_MOST_UNBATCHED_COLOURS", 0)
    f = implicit(idf.Sparse("auto"))
    np.testing.assert_allclose(
        jax.jit(jax.jacrev(f))(X), reference_jacobian(X), rtol=1e-8, atol=1e-10
    )


def test_grad_under_vmap():
    f = implicit(idf.Sparse("auto"))
    loss = lambda x: jnp.sum(jnp.sin(f(x)))
    xs = X[None] * jnp.array([0.8, 1.0, 1.2])[:, None, None]
    grads = jax.jit(jax.vmap(jax.grad(loss)))(xs)
    for x, g in zip(xs, grads, strict=True):
        expected = jnp.einsum("ij,ijkl->kl", jnp.cos(forward(x)), reference_jacobian(x))
        np.testing.assert_allclose(g, expected, rtol=1e-8, atol=1e-12)


def _callbacks(jaxpr, in_loop=False):
    """`(primitive inside a loop?)` for every pure_callback in a jaxpr, recursively."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pure_callback":
            found.append(in_loop)
        loop = in_loop or eqn.primitive.name in ("while", "scan")
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    found += _callbacks(sub, loop)
    return found


@pytest.mark.parametrize("solver", [idf.Direct(), idf.CG(rtol=1e-12, atol=1e-12)])
def test_large_index_arrays_reach_the_program_at_run_time(monkeypatch, solver):
    """Above a size, the pattern's index arrays come from a host callback when the
    program runs, not as compiled-in constants (seconds of XLA compilation at 10⁶
    entries); once per operator, never inside the Krylov loop."""
    monkeypatch.setattr(_operator, "_LARGEST_CONSTANT_BYTES", 0)
    f = implicit(idf.Sparse("auto"), solver)
    expected = reference_jacobian(X)
    for jacobian in (jax.jacfwd, jax.jacrev):
        traced = jax.jit(jacobian(f)).trace(X)
        callbacks = _callbacks(traced.jaxpr.jaxpr)
        assert callbacks and not any(callbacks)
        large = [c for c in traced.jaxpr.consts if np.size(c) >= LAPLACIAN.nnz]
        assert not large
        np.testing.assert_allclose(
            jax.jit(jacobian(f))(X), expected, rtol=1e-8, atol=1e-10
        )
    loss = lambda x: jnp.sum(jnp.sin(f(x)))
    xs = X[None] * jnp.array([0.9, 1.1])[:, None, None]
    for x, g in zip(xs, jax.jit(jax.vmap(jax.grad(loss)))(xs), strict=True):
        expected = jnp.einsum("ij,ijkl->kl", jnp.cos(forward(x)), reference_jacobian(x))
        np.testing.assert_allclose(g, expected, rtol=1e-8, atol=1e-12)
    hessian = jax.jit(jax.hessian(loss))(X)
    monkeypatch.undo()  # the same Hessian with the indices compiled in
    expected = jax.jit(
        jax.hessian(lambda x: jnp.sum(jnp.sin(implicit(idf.Sparse("auto"), solver)(x))))
    )(X)
    np.testing.assert_allclose(hessian, expected, rtol=1e-8, atol=1e-10)


def test_float32_passes_the_check():
    x = X.astype(jnp.float32)
    f = implicit(idf.Sparse("auto"))
    jac = jax.jit(jax.jacrev(f))(x)
    assert jac.dtype == jnp.float32
    np.testing.assert_allclose(jac, reference_jacobian(X), rtol=1e-4, atol=1e-5)


@pytest.mark.full_optimisation
def test_wrong_pattern_gives_nan_not_a_wrong_derivative():
    dense = LAPLACIAN.toarray() != 0
    dense[7, 8] = False  # drop one true entry
    f = implicit(idf.Sparse(sp.csr_matrix(dense)), on_failure="nan")
    assert jnp.all(jnp.isnan(jax.jit(jax.jacrev(f))(X)))


def test_pattern_of_the_wrong_shape_raises():
    with pytest.raises(ValueError, match="pattern has shape"):
        jax.eval_shape(jax.jacfwd(implicit(idf.Sparse(sp.eye(24)))), X)
    with pytest.raises(ValueError, match="'auto' or a pattern"):
        idf.Sparse("dense")


# linear_solve ---------------------------------------------------------------------

RNG = np.random.default_rng(1)
SIZE = 12
_rows = np.concatenate([np.arange(SIZE), RNG.integers(0, SIZE, 30)])
_cols = np.concatenate([np.arange(SIZE), RNG.integers(0, SIZE, 30)])
_order = RNG.permutation(_rows.size)  # unsorted, with duplicates
INDICES = np.stack([_rows[_order], _cols[_order]], axis=1)
VALUES = jnp.asarray(np.where(_rows == _cols, 8.0, 1.0)[_order] + RNG.normal(size=42))
B = jnp.asarray(RNG.normal(size=SIZE))


def as_bcoo(values):
    return jsparse.BCOO((values, INDICES), shape=(SIZE, SIZE))


def dense_solve(values, b):
    dense = jnp.zeros((SIZE, SIZE)).at[INDICES[:, 0], INDICES[:, 1]].add(values)
    return jnp.linalg.solve(dense, b)


def sparse_loss(values, b, solver=DIRECT):
    return jnp.sum(jnp.sin(idf.linear_solve(as_bcoo(values), b, solver)))


def dense_loss(values, b):
    return jnp.sum(jnp.sin(dense_solve(values, b)))


@pytest.mark.parametrize(
    "solver",
    [
        idf.Direct(),
        idf.GMRES(1e-12, 1e-12),
        idf.LeastSquares("cholesky"),
        idf.LeastSquares("cg", rtol=1e-13),
    ],
    ids=["Direct", "GMRES", "LeastSquares-cholesky", "LeastSquares-cg"],
)
def test_linear_solve_gradients(solver):
    """Against a dense solve, for a non-symmetric matrix (LeastSquares solved A itself
    as if it were its normal matrix AᴴA, by Cholesky of its lower triangle: a finite
    wrong x)."""
    np.testing.assert_allclose(
        idf.linear_solve(as_bcoo(VALUES), B, solver),
        dense_solve(VALUES, B),
        rtol=1e-9,
    )
    grads = jax.jit(jax.grad(sparse_loss, argnums=(0, 1)), static_argnums=2)
    values_bar, b_bar = grads(VALUES, B, solver)
    expected_values_bar, expected_b_bar = jax.grad(dense_loss, argnums=(0, 1))(
        VALUES, B
    )
    np.testing.assert_allclose(values_bar, expected_values_bar, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b_bar, expected_b_bar, rtol=1e-9, atol=1e-12)


def test_linear_solve_jacobians_and_vmap():
    solve = lambda values, b: idf.linear_solve(as_bcoo(values), b)
    scales = jnp.array([1.0, 2.0, 3.0])[:, None]

    @jax.jit
    def transformed(values, b):
        batched = jax.vmap(solve)(values * scales, b * scales)
        return jax.jacfwd(solve)(values, b), jax.jacrev(solve)(values, b), batched

    forward_mode, reverse_mode, batched = transformed(VALUES, B)
    expected = jax.jacfwd(dense_solve)(VALUES, B)
    np.testing.assert_allclose(forward_mode, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(reverse_mode, expected, rtol=1e-9, atol=1e-12)
    for values, b, x in zip(VALUES * scales, B * scales, batched, strict=True):
        np.testing.assert_allclose(x, dense_solve(values, b), rtol=1e-10)


def test_linear_solve_takes_bcsr_and_operators():
    matrix = as_bcoo(VALUES).sum_duplicates()
    rows, cols = np.asarray(matrix.indices).T
    bcsr = jsparse.BCSR.from_bcoo(matrix)
    indices, indptr = np.asarray(bcsr.indices), np.asarray(bcsr.indptr)

    @jax.jit
    def solve_both(data):
        by_bcsr = idf.linear_solve(
            jsparse.BCSR((data, indices, indptr), shape=bcsr.shape), B
        )
        # An operator on pytrees: b and x are 3×4 arrays.
        structure = jax.ShapeDtypeStruct((3, 4), data.dtype)
        operator = idf.SparseLinearOperator(data, matrix, structure, structure)
        by_operator = idf.linear_solve(operator, B.reshape(3, 4))
        return by_bcsr, by_operator.ravel()

    x = dense_solve(VALUES, B)
    for result in solve_both(bcsr.data):
        np.testing.assert_allclose(result, x, rtol=1e-10)
    # The cotangent of the values is −u[row]·x[col] on the stored entries.
    u = jnp.linalg.solve(jnp.asarray(matrix.todense()).T, jnp.ones(SIZE))
    grad = jax.jit(jax.grad(lambda data: jnp.sum(solve_both(data)[0])))(bcsr.data)
    np.testing.assert_allclose(grad, -u[rows] * x[cols], rtol=1e-10)


def test_cotangent_of_a_bcoo_is_a_bcoo():
    grad = jax.grad(lambda A: jnp.sum(jnp.sin(idf.linear_solve(A, B))), allow_int=True)(
        as_bcoo(VALUES)
    )
    assert isinstance(grad, jsparse.BCOO)
    np.testing.assert_allclose(
        grad.data, jax.grad(dense_loss)(VALUES, B), rtol=1e-9, atol=1e-12
    )


@pytest.mark.full_optimisation
def test_linear_solve_singular_gives_nan_and_warns():
    singular = VALUES.at[np.flatnonzero(INDICES[:, 0] == 3)].set(0.0)
    with pytest.warns(RuntimeWarning, match="did not solve"):
        x = idf.linear_solve(as_bcoo(singular), B)
    assert jnp.all(jnp.isnan(x))
    with pytest.warns(RuntimeWarning, match="did not solve"):
        g = jax.grad(sparse_loss)(singular, B)
    assert jnp.all(jnp.isnan(g))


# A dense pattern: assembled as a dense Jacobian, not coloured ---------------------


def _running_sums(y):
    """`y + 0.01·cumsum(y)` through a `scan`, which detection takes as dense."""
    _, sums = lax.scan(lambda total, v: (total + v, total + v), 0.0, y)
    return y + 0.01 * sums


def _assembly(representation, fn, n, dtype=jnp.float64):
    """The compiled assembly of ∂fn/∂y (sparse values, or the dense matrix)."""
    structure = jax.ShapeDtypeStruct((n,), dtype)

    def assemble(y):
        _, linear = jax.linearize(fn, y)
        operator = representation.operator(linear, structure)
        return (
            operator.data
            if isinstance(representation, idf.Sparse)
            else (operator.as_matrix())
        )

    return jax.jit(assemble)


@pytest.mark.filterwarnings("ignore:implicitdiff.Sparse:RuntimeWarning")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.full_optimisation
def test_dense_pattern_is_assembled_densely(monkeypatch, dtype):
    """Half the columns or more in a row: no colouring; the values are those of
    the Jacobian, and an entry outside a given pattern still gives NaN."""
    monkeypatch.setattr(_representation, "column_colouring", None)  # never called
    y = jnp.linspace(0.5, 1.5, 12, dtype=dtype)
    expected = np.tril(np.full((12, 12), 0.01)) + np.eye(12)
    data = _assembly(idf.Sparse("auto"), _running_sums, 12, dtype)(y)
    np.testing.assert_allclose(data.reshape(12, 12), expected, rtol=1e-6)
    lower = idf.Sparse(sp.csr_matrix(np.tril(np.ones((12, 12)))))
    np.testing.assert_allclose(
        _assembly(lower, _running_sums, 12, dtype)(y),
        expected[np.tril_indices(12)],
        rtol=1e-6,
    )
    missing = np.tril(np.ones((12, 12)))
    missing[5, 2] = 0
    wrong = idf.Sparse(sp.csr_matrix(missing))
    assert jnp.all(jnp.isnan(_assembly(wrong, _running_sums, 12, dtype)(y)))


@pytest.mark.filterwarnings("ignore:implicitdiff.Sparse:RuntimeWarning")
def test_dense_fallback_costs_about_what_a_dense_matrix_does():
    """4096 unknowns whose detection falls back to a dense pattern: trace, compile
    and assembly within a small factor of `representation="matrix"` (colouring
    such a pattern took minutes). Each takes the best of two interleaved rounds,
    and the factor leaves room for a machine shared with other tests (idle: 0.65–0.9
    s against 0.42 s)."""
    representations = {
        "matrix": _representation_module.MatrixRepresentation(),
        "sparse": idf.Sparse("auto"),
    }
    seconds = {name: float("inf") for name in representations}
    for n in (64, 4096, 4096):  # the first round warms up
        y = jnp.linspace(0.5, 1.5, n, dtype=jnp.float32)
        for name, representation in representations.items():
            start = time.perf_counter()
            assembly = _assembly(representation, _running_sums, n, jnp.float32)
            jax.block_until_ready(assembly(y))
            if n > 64:
                seconds[name] = min(seconds[name], time.perf_counter() - start)
    assert seconds["sparse"] < 5 * seconds["matrix"] + 0.5, seconds


@pytest.mark.parametrize("solver", [idf.Direct(), idf.GMRES(), idf.SciPy("splu")])
def test_linear_solve_returns_the_dtype_of_a_and_b_together(solver):
    # x came back in b's dtype: an integer b truncated it ([0, 6] for [0.91, 6.36]),
    # a real b dropped a complex A's imaginary part, silently.
    dense = np.array([[4.0, 1.0], [1.0, 3.0]])
    A = jsparse.BCOO.fromdense(jnp.asarray(dense))
    x = idf.linear_solve(A, jnp.array([10, 20]), solver)
    assert x.dtype == jnp.float64
    np.testing.assert_allclose(x, np.linalg.solve(dense, [10.0, 20.0]), rtol=1e-10)
    x32 = idf.linear_solve(A, jnp.array([1.0, 2.0], jnp.float32), solver)
    assert x32.dtype == jnp.float64
    if isinstance(solver, idf.GMRES):  # real systems only
        return
    complex_dense = dense + 1j * np.diag([1.0, 2.0])
    Ac = jsparse.BCOO.fromdense(jnp.asarray(complex_dense))
    b = jnp.array([1.0, 2.0])
    x = idf.linear_solve(Ac, b, solver)
    assert x.dtype == jnp.complex128
    np.testing.assert_allclose(x, np.linalg.solve(complex_dense, b), rtol=1e-10)
    # The gradient in the real b of a real loss of the complex x, against a dense
    # solve differentiated by JAX.
    loss = lambda solve: lambda b: jnp.sum(jnp.abs(solve(b)) ** 2)
    grad = jax.grad(loss(lambda b: idf.linear_solve(Ac, b, solver)))(b)
    dense_grad = jax.grad(loss(lambda b: jnp.linalg.solve(complex_dense, b)))(b)
    np.testing.assert_allclose(grad, dense_grad, rtol=1e-8, atol=1e-14)
