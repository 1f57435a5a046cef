"""No finite wrong derivative from any solver (issue 10).

Every built-in solver, in jvp, grad, jacfwd and jacrev: a numerically singular
`∂c/∂y` gives all-NaN derivatives and the warning, even when the right-hand sides lie
in its range (where any Krylov method converges); a regular one gives the inverse to
about `κ` times the solver's tolerance, or NaN. References are closed forms: the
matrices are built from their singular value decompositions, or are singular by
construction.
"""

import functools as ft
import warnings

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp
from jax.experimental import sparse as jsparse

import implicitdiff as idf
from implicitdiff._misc import credible, max_or_nan, singular_threshold, tree_norm
from implicitdiff._solvers._condition import inverse_norm1_estimates

# These problems test the linear solves: their forwards return a point chosen for the
# system (often y = 0 for a linear c), not a solution of the conditions, which the
# default condition check (tested in test_user_edge.py) would rightly refuse.
unchecked = ft.partial(idf.ImplicitFunction, check_conditions=None)

N = 6
EPS64 = float(np.finfo(np.float64).eps)


class _UserJacobi(idf.AbstractLinearSolver):
    """A user solver without a certificate of its own: the default one applies."""

    def presolve(self, A, y):
        return A.as_matrix()

    def solve(self, matrix, b):
        diagonal = jnp.diag(matrix)
        step = lambda _, x: x + (b - matrix @ x) / diagonal  # noqa: E731
        x = jax.lax.fori_loop(0, 400, step, jnp.zeros_like(b))
        converged = jnp.linalg.norm(b - matrix @ x) <= 1e-10 * jnp.linalg.norm(b)
        return jnp.where(converged, x, jnp.nan)


# name: (solver, tolerance, the power of κ(A) that is the condition number of the
# system the solver actually solves: 2 for the normal equations)
SOLVERS = {
    "Direct": (idf.Direct(), EPS64, 1),
    "Auto": (idf.Auto(), EPS64, 1),
    "GMRES": (idf.GMRES(), 1e-10, 1),
    "CG": (idf.CG(), 1e-10, 1),
    "BiCGStab": (idf.BiCGStab(), 1e-10, 1),
    "LeastSquares-cholesky": (idf.LeastSquares(method="cholesky"), EPS64, 2),
    "LeastSquares-cg": (idf.LeastSquares(method="cg"), 1e-10, 2),
    "Lineax-LU": (idf.Lineax(lx.LU()), EPS64, 1),
    "Lineax-QR": (idf.Lineax(lx.QR()), EPS64, 1),
    "Lineax-SVD": (idf.Lineax(lx.SVD()), EPS64, 1),
    "Lineax-LSMR": (idf.Lineax(lx.LSMR(rtol=1e-10, atol=1e-10)), 1e-10, 1),
    "SciPy-splu": (idf.SciPy("splu"), EPS64, 1),
    "SciPy-spsolve": (idf.SciPy("spsolve"), EPS64, 1),
    "SciPy-gmres": (idf.SciPy("gmres"), 1e-10, 1),
    "SciPy-cg": (idf.SciPy("cg"), 1e-10, 1),
    "AMG": (idf.AMG(), 1e-10, 1),
    "user": (_UserJacobi(), 1e-10, 1),
}


@ft.cache
def derivatives(name: str):
    """One compiled program per solver: `(x, A, t, w) ↦`

    - the jacfwd and jacrev of `solve(x) = A⁻¹x` (conditions `A y − x`): `A⁻¹`;
    - the jvp, grad, jacfwd and jacrev of `consistent(x) = A·y(x)` with conditions
      `A (y − x)`: every JVP system `A ẏ = A ẋ` and every VJP system `Aᵀ u = Aᵀ w`
      has its right-hand side in the range, so that even with a singular `A` every
      Krylov method converges. Its Jacobian is `A` when `A` is regular.
    """
    solver = SOLVERS[name][0]
    zero = lambda x, A: jnp.zeros_like(x)  # noqa: E731  (A is linear: y is irrelevant)
    solve = unchecked(zero, lambda x, y, A: A @ y - x, linear_solver=solver)
    implicit = unchecked(zero, lambda x, y, A: A @ (y - x), linear_solver=solver)

    def consistent(x, A):
        return A @ implicit(x, A)

    def program(x, A, t, w):
        return (jax.jacfwd(solve)(x, A), jax.jacrev(solve)(x, A)), (
            jax.jvp(lambda x: consistent(x, A), (x,), (t,))[1],
            jax.grad(lambda x: w @ consistent(x, A))(x),
            jax.jacfwd(consistent)(x, A),
            jax.jacrev(consistent)(x, A),
        )

    return jax.jit(program)


def run(name, A):
    x = jnp.ones(N)
    t, w = jnp.linspace(-1.0, 1.0, N), jnp.cos(jnp.arange(N))
    return derivatives(name)(x, jnp.asarray(A), t, w)


def rotation(seed):
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(N, N)))[0]


def with_condition(kappa, seed=0, symmetric=True):
    """`U diag(s) Vᵀ` with singular values from 1 down to `1/κ`, and its exact
    inverse `V diag(1/s) Uᵀ` (each entry to about ε: no κ in the reference)."""
    s = np.logspace(0, -np.log10(kappa), N)
    U = rotation(seed)
    V = U if symmetric else rotation(seed + 1)
    return (U * s) @ V.T, (V / s) @ U.T


def sinkhorn_jacobian(seed, m=N // 2):
    """∂c/∂(f, g) of the Sinkhorn optimality conditions `(P 1 − a, Pᵀ 1 − b)` with
    `P = exp((f ⊕ g − C)/ε)`, up to the factor `1/ε`: singular, as the potentials
    are defined up to `f + κ, g − κ` (the null vector `(1, −1)`)."""
    P = np.exp(np.random.default_rng(seed).normal(size=(m, m)))
    return np.block([[np.diag(P.sum(1)), P], [P.T, np.diag(P.sum(0))]])


def lasso_with_zero_rows():
    """Stationarity on the support {0, 1, 2}, the condition `0` elsewhere."""
    X = np.random.default_rng(3).normal(size=(10, N))
    return np.where(np.arange(N)[:, None] < 3, X.T @ X, 0.0)


def path_laplacian():
    """The Laplacian of a path graph without a grounded node: `L 1 = 0`."""
    L = 2 * np.eye(N) - np.eye(N, k=1) - np.eye(N, k=-1)
    L[0, 0] = L[-1, -1] = 1
    return L


SINGULAR = {
    "sinkhorn": sinkhorn_jacobian(0),
    "lasso-zero-rows": lasso_with_zero_rows(),
    "laplacian": path_laplacian(),
    "ones-block": scipy.linalg.block_diag(np.ones((2, 2)), np.eye(N - 2)),
}


def all_nan(tree):
    return all(bool(np.all(np.isnan(np.asarray(a)))) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", SOLVERS)
def test_singular_is_nan_and_warns(name):
    for case, A in SINGULAR.items():
        with pytest.warns(RuntimeWarning, match="did not solve"):
            out = jax.block_until_ready(run(name, A))
        assert all_nan(out), f"{name} on {case}: a finite derivative"


KAPPAS = [10.0**k for k in range(2, 19, 2)]


def systems(jacobians, references):
    """The JVPs (columns of jacfwd) and VJPs (rows of jacrev), with their references:
    each is its own solve, right or all-NaN on its own."""
    (fwd, rev), (fwd_ref, rev_ref) = jacobians, references
    return list(zip(np.asarray(fwd).T, fwd_ref.T, strict=True)) + list(
        zip(np.asarray(rev), rev_ref, strict=True)
    )


@pytest.mark.parametrize("name", SOLVERS)
def test_condition_scan_nan_or_accurate(name):
    _, tol, power = SOLVERS[name]
    for kappa in KAPPAS:
        A, inverse = with_condition(kappa)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            jacobians, consistent = run(name, A)
        system_kappa = kappa**power
        solves = systems(jacobians, (inverse, inverse))
        solves += systems(consistent[2:], (A, A))
        for got, want in solves:
            if system_kappa > 10 / EPS64:  # no digit determined: must be refused
                assert all_nan(got), f"{name}: finite at κ = {kappa:.0e}"
            elif not all_nan(got):
                error = np.max(np.abs(got - want)) / np.max(np.abs(want))
                assert error <= 100 * system_kappa * tol, (name, kappa, error)


# ------------------------------------------------------------------ point 7


def test_direct_same_decision_in_both_directions():
    """Direct factorises A for a JVP and Aᵀ for a VJP; what it refuses must not depend
    on which. Non-symmetric matrices over a κ scan around the threshold, and Sinkhorn
    draws."""
    matrices = [
        with_condition(kappa, seed, symmetric=False)[0]
        for seed in range(3)
        for kappa in np.logspace(10, 20, 11)
    ]
    for A in matrices:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            (jac_fwd, jac_rev), _ = run("Direct", A)
        assert all_nan(jac_fwd) == all_nan(jac_rev)
    for seed in range(10):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            (jac_fwd, jac_rev), _ = run("Direct", sinkhorn_jacobian(seed))
        assert all_nan(jac_fwd) and all_nan(jac_rev)


def test_direct_refuses_a_perturbation_hidden_from_hagers_vectors():
    """`I − s·u vᵀ` with `u`, `v` orthogonal to the estimator's start vectors (ones,
    the alternating vector, e₁): its inverse `I + s·u vᵀ` maps them to themselves, and
    Hager's estimate was 1 for κ₁ = 6e16 (100 times the threshold). Forward mode
    certified it and returned 52 finite columns; reverse mode refused. A fourth,
    unstructured start vector sees it: both refuse."""
    n = 60
    u, v = np.zeros(n), np.zeros(n)
    u[[1, 4, 6, 7]], u[[2, 3, 5, 8]] = 1, -1
    v[[11, 14, 16, 17]], v[[12, 13, 15, 18]] = 1, -1
    M = jnp.asarray(np.eye(n) - 1e7 * np.pi * np.outer(u, v))
    f = unchecked(
        lambda x: jnp.linalg.solve(M, x), lambda x, y: M @ y - x, idf.Direct()
    )
    x = jnp.ones(n)
    for jacobian in (jax.jacfwd, jax.jacrev):
        with pytest.warns(RuntimeWarning, match="Direct did not solve"):
            assert all_nan(jacobian(f)(x))


def test_condition_estimates_bound_the_exact_norms_from_below():
    """The certificate of `Direct` and `LeastSquares("cholesky")`: Hager's estimator
    in four solves, against the exact `‖M⁻¹‖₁` and `‖M⁻¹‖∞` of NumPy's inverse: not
    above, within a factor 3 on matrices where Hager's first column is not the
    largest (random, Kahan, prescribed κ up to 1e15, Hilbert), and a numerically
    singular matrix's estimate far past the threshold."""
    rng = np.random.default_rng(1)
    theta = 1.2
    matrices = [scipy.linalg.hilbert(10)]
    for n in (5, 30, 250):
        kahan = np.diag(np.sin(theta) ** np.arange(n)) @ (
            np.eye(n) + np.triu(-np.cos(theta) * np.ones((n, n)), 1)
        )
        matrices += [rng.normal(size=(n, n)), kahan, np.tril(rng.normal(size=(n, n)))]
        U, V = (np.linalg.qr(rng.normal(size=(n, n)))[0] for _ in range(2))
        matrices += [(U * np.logspace(0, -k, n)) @ V.T for k in (6, 15)]
    for M in matrices:
        n = len(M)
        lu = jax.scipy.linalg.lu_factor(jnp.asarray(M))
        estimates = inverse_norm1_estimates(
            lambda v: jax.scipy.linalg.lu_solve(lu, v),
            lambda v: jax.scipy.linalg.lu_solve(lu, v, trans=2),
            n,
            jnp.float64,
        )
        inverse = np.abs(np.linalg.inv(M))
        rounding = 10 * np.linalg.cond(M, 1) * EPS64  # of both inverses, relative
        for estimate, exact in zip(
            estimates, (inverse.sum(0).max(), inverse.sum(1).max()), strict=True
        ):
            assert exact / 3 <= estimate <= exact * (1 + rounding)
    G = rng.normal(size=(40, 40))
    singular = G - np.outer(G.sum(1), np.ones(40)) / 40  # rows sum to zero
    lu = jax.scipy.linalg.lu_factor(jnp.asarray(singular))
    estimate, _ = inverse_norm1_estimates(
        lambda v: jax.scipy.linalg.lu_solve(lu, v),
        lambda v: jax.scipy.linalg.lu_solve(lu, v, trans=2),
        40,
        jnp.float64,
    )
    norm = np.abs(singular).sum(0).max()
    assert not estimate * norm <= 1e3 * singular_threshold(40, jnp.float64)


@pytest.mark.parametrize("n", [5, 48, 49, 300])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.complex64])
def test_direct_matrix_norms_exact_and_nan_safe(n, dtype):
    """`Direct`'s `‖M‖₁` and `‖M‖∞` (sums up to 48 unknowns, products with ones
    above): against NumPy's, batched under `vmap`, and NaN (resp. inf) when an entry
    is."""
    from implicitdiff._solvers._direct import _norms_1_and_inf

    rng = np.random.default_rng(n)
    M = rng.normal(size=(3, n, n)) + (
        1j * rng.normal(size=(3, n, n))
        if jnp.issubdtype(dtype, jnp.complexfloating)
        else 0
    )
    M = M.astype(dtype)
    norms = np.asarray(jax.jit(jax.vmap(_norms_1_and_inf))(jnp.asarray(M)))
    exact = [[np.linalg.norm(m.astype(complex), p) for p in (1, np.inf)] for m in M]
    np.testing.assert_allclose(norms, exact, rtol=1e-5)
    for bad in (np.nan, np.inf):
        spoiled = M[0].copy()
        spoiled[n // 2, n // 3] = bad
        norms = np.asarray(jax.jit(_norms_1_and_inf)(jnp.asarray(spoiled)))
        assert (np.isnan(norms) if np.isnan(bad) else np.isposinf(norms)).all()


# ------------------------------------------------------------------ point 1


@pytest.mark.full_optimisation
@pytest.mark.parametrize("n", [10, 100_000])
@pytest.mark.parametrize("mode", ["grad", "jvp"])
def test_policy_fires_at_every_size(n, mode):
    """`∂c/∂y = 2y` is singular at x = 0: the policy fires whatever the size (XLA:CPU's
    max dropped NaN above ~4100 elements)."""
    # Jacobi-preconditioned GMRES on the sparse (diagonal) ∂c/∂y: one step when
    # regular, and few to give up when not (plain GMRES would take thousands of steps
    # at n = 10⁵); the checks under test are the same for any solver.
    f = unchecked(
        jnp.sqrt,
        lambda x, y: y**2 - x,
        linear_solver=idf.GMRES(max_steps=40, preconditioner=idf.Jacobi()),
        representation=idf.Sparse("auto"),
        on_failure="raise",
    )
    x = jnp.linspace(0.0, 1.0, n)
    if mode == "grad":
        call = jax.jit(jax.grad(lambda x: f(x).sum()))
    else:
        call = jax.jit(lambda x: jax.jvp(f, (x,), (jnp.ones_like(x),))[1])
    with pytest.raises(Exception, match="did not solve"):
        jax.block_until_ready(call(x))
    ok = jax.block_until_ready(call(x + 1.0))  # regular: no error
    reference = 0.5 / jnp.sqrt(x + 1.0)
    assert np.allclose(ok, reference, rtol=1e-8)


# ------------------------------------------------------------------ point 3


def lin(A, solver, on_failure="nan"):
    A = jnp.asarray(A)
    return unchecked(
        lambda x: jnp.zeros_like(x),
        lambda x, y: A @ y - x,
        linear_solver=solver,
        on_failure=on_failure,
    )


@pytest.mark.parametrize(
    "solver",
    [idf.Lineax(lx.SVD()), idf.Lineax(lx.SVD(rcond=1e-3)), idf.Lineax(lx.QR())],
    ids=["SVD", "SVD-rcond", "QR"],
)
def test_lineax_least_squares_answers_refused(solver):
    cases = [
        (np.ones((2, 2)), None),
        (np.diag([1.0, 1e-4]), np.diag([1.0, 1e4])),
        (scipy.linalg.hilbert(11), scipy.linalg.invhilbert(11, exact=True)),
    ]
    for A, inverse in cases:
        # Compiled as one program: Lineax's SVD op by op compiles 4 times longer.
        J = jax.jit(jax.jacfwd(lin(A, solver)))(jnp.ones(len(A)))
        if inverse is None or all_nan(J):
            assert all_nan(J)  # a finite J here is a pseudo-inverse: wrong
            continue
        inverse = np.asarray(inverse, np.float64)
        error = np.max(np.abs(J - inverse)) / np.max(np.abs(inverse))
        assert error <= 100 * np.linalg.cond(A, 1) * EPS64


# ------------------------------------------------------------------ point 4


@pytest.mark.parametrize("method", ["cholesky", "cg"])
def test_least_squares_ill_conditioned(method):
    solver = idf.LeastSquares(method=method)
    for A in (np.array([[1.0, 1.0], [1.0, 1.0 + 1e-10]]), scipy.linalg.hilbert(8)):
        J = jax.jacfwd(lin(A, solver))(jnp.ones(len(A)))
        assert all_nan(J)
    # Well conditioned, overdetermined: the least-squares derivative, pinv(A).
    A = np.random.default_rng(0).normal(size=(7, 4))
    f = unchecked(lambda x: jnp.zeros(4), lambda x, y: jnp.asarray(A) @ y - x, solver)
    x = jnp.ones(7)
    assert np.allclose(jax.jacfwd(f)(x), np.linalg.pinv(A), atol=1e-8)
    assert np.allclose(jax.jacrev(f)(x), np.linalg.pinv(A), atol=1e-8)


@pytest.mark.parametrize("method", ["cholesky", "cg"])
@pytest.mark.parametrize(
    "dtype, scales",
    [
        (jnp.float64, (1e-300, 1e-170, 1e160, 1e200, 1e300)),
        (jnp.float32, (1e-30, 1e-20, 1e20, 1e30)),
    ],
)
def test_least_squares_conditions_far_from_unit_scale(method, dtype, scales):
    """`s·(M y − x) = 0` has the derivative pinv(M) whatever `s`, and `s·M y − x = 0`
    the derivative pinv(M)/s: the normal equations (s²MᵀM) once overflowed past
    s = 1e154 (float64) and underflowed below 1e-154, and forward mode returned NaN
    without a word (the overflowed right-hand side passed for NaN input); then, with
    the right-hand side `x` of order one against `s·M`, its scaling underflowed to an
    exact zero (forward mode) and its transpose likewise (reverse mode), and the
    derivative was 0, finite and wrong. Compared relative to the largest entry."""
    M = np.random.default_rng(3).normal(size=(7, 4))
    pinv = np.linalg.pinv(M)
    x, Ms = jnp.ones(7, dtype), jnp.asarray(M, dtype)
    tolerance = 1e-8 if dtype == jnp.float64 else 2e-3
    # The scale is an argument, so each form compiles once for all scales.
    for conditions, expected in (
        (lambda x, y, s: s * (Ms @ y - x), lambda scale: pinv),
        (lambda x, y, s: s * (Ms @ y) - x, lambda scale: pinv / scale),
    ):
        f = unchecked(
            lambda x, s: jnp.zeros(4, dtype),
            conditions,
            idf.LeastSquares(method=method),
            on_failure="warn",
        )
        derivatives = jax.jit(lambda x, s: (jax.jacfwd(f)(x, s), jax.jacrev(f)(x, s)))
        for scale in scales:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                Js = derivatives(x, jnp.asarray(scale, dtype))
            for J in Js:
                assert J.dtype == dtype
                error = np.max(np.abs(np.asarray(J, np.float64) - expected(scale)))
                assert error <= tolerance * np.max(np.abs(expected(scale))), scale


@pytest.mark.parametrize("solver", ["Direct", "GMRES", "Diagonal"])
def test_overflowed_right_hand_side_is_told_nan_input_is_not(solver):
    """`−B ẋ` of conditions scaled by 1e15 overflows float32 for `ẋ` of 1e24: the
    right-hand side is inf, and the derivative NaN. It once passed for NaN input (no
    warning); a NaN tangent still does."""
    linear_solver = {
        "Direct": idf.Direct(),
        "GMRES": idf.GMRES(),
        "Diagonal": idf.Auto(),  # elementwise conditions: Auto divides
    }[solver]
    M = jnp.asarray([[2.0, 1.0], [0.0, 1.0]], jnp.float32)
    if solver == "Diagonal":
        M = jnp.diag(jnp.diag(M))
    f = unchecked(
        lambda x: jnp.linalg.solve(M, x),
        lambda x, y: 1e15 * (M @ y) - 1e15 * x,
        linear_solver=linear_solver,
        on_failure="warn",
    )
    x = jnp.ones(2, jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regular = jax.jvp(f, (x,), (jnp.ones(2, jnp.float32),))[1]
        assert np.allclose(regular, np.linalg.solve(M, np.ones(2)), atol=1e-6)
        assert all_nan(jax.jvp(f, (x,), (jnp.array([np.nan, 1.0], jnp.float32),))[1])
    with pytest.warns(RuntimeWarning, match="infinite right-hand side"):
        overflowed = jax.jvp(f, (x,), (jnp.full(2, 1e24, jnp.float32),))[1]
    assert all_nan(overflowed)


def test_least_squares_complex_uses_the_conjugate_transpose():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(6, 3)) + 1j * rng.normal(size=(6, 3))
    pinv = np.linalg.pinv(A)

    def implicit(method):
        return unchecked(
            lambda x: jnp.asarray(pinv) @ x,
            lambda x, y: jnp.asarray(A) @ y - x,
            idf.LeastSquares(method=method),
        )

    f = implicit("cholesky")
    x = jnp.asarray(rng.normal(size=6) + 1j * rng.normal(size=6))
    assert np.allclose(jax.jacfwd(f, holomorphic=True)(x), pinv, atol=1e-10)
    # The gradient of a real loss, against central differences of the closed form
    # along the real and imaginary parts (JAX's convention: ∂/∂Re − i ∂/∂Im).
    weights = np.arange(3.0) + 1
    loss = lambda y: np.sum(weights * np.abs(y) ** 2)  # noqa: E731
    h = 1e-6
    expected = [
        (loss(pinv @ (x + h * e)) - loss(pinv @ (x - h * e))) / (2 * h)
        - 1j * (loss(pinv @ (x + 1j * h * e)) - loss(pinv @ (x - 1j * h * e))) / (2 * h)
        for e in np.eye(6)
    ]
    got = jax.grad(lambda x: jnp.sum(weights * jnp.abs(f(x)) ** 2))(x)
    assert np.allclose(got, expected, atol=1e-6)
    with pytest.raises(TypeError, match="LeastSquares"):
        jax.jacfwd(implicit("cg"), holomorphic=True)(x)


def test_lasso_zero_rows_least_squares():
    A = lasso_with_zero_rows()
    for method in ("cholesky", "cg"):
        with pytest.warns(RuntimeWarning, match="did not solve"):
            J = jax.jacrev(lin(A, idf.LeastSquares(method=method), "warn"))(jnp.ones(N))
        assert all_nan(J)


# ------------------------------------------------------------------ point 5


def test_spsolve_refuses_near_singular():
    A, _ = with_condition(2e17, seed=4, symmetric=False)
    for method in ("spsolve", "splu"):
        for jac in (jax.jacfwd, jax.jacrev):
            assert all_nan(jac(lin(A, idf.SciPy(method)))(jnp.ones(N)))


# ------------------------------------------------------------------ point 6


@pytest.mark.parametrize("dtype, scale", [(jnp.float32, 1e4), (jnp.float64, 1e8)])
def test_sparse_pattern_missing_an_entry_next_to_a_large_row(dtype, scale):
    """The identity pattern misses ∂c₁/∂y₂ = 0.5, in a row `scale` times smaller than
    the first (which once hid it: the check compared against the largest row)."""

    def conditions(x, y):
        return jnp.stack([scale * (y[0] - x[0]), y[1] + 0.5 * y[2] - x[1], y[2] - x[2]])

    def implicit(pattern):
        sparse = idf.Sparse(pattern)
        return unchecked(
            lambda x: x, conditions, representation=sparse, on_failure="nan"
        )

    x = jnp.ones(3, dtype)
    assert all_nan(jax.jacfwd(implicit(sp.identity(3)))(x))
    assert all_nan(jax.jacrev(implicit(sp.identity(3)))(x))
    complete = implicit(sp.csr_matrix(np.triu(np.ones((3, 3)))))
    expected = [[1, 0, 0], [0, 1, -0.5], [0, 0, 1]]
    assert np.allclose(jax.jacfwd(complete)(x), expected, rtol=1e-5, atol=0)
    assert np.allclose(jax.jacrev(complete)(x), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype, small", [(jnp.float32, 1e-4), (jnp.float64, 5e-9)])
def test_sparse_pattern_missing_a_small_entry_of_a_sensitive_system(dtype, small):
    """∂c/∂y is I but for the block [[1, s], [1, 2s]] (κ = 2·10⁴ in float32, 4·10⁸
    in float64: each dtype solves it well), and the pattern misses the entry s. It
    once passed the check, whose tolerance was √ε of the row: the derivative dy₀/dx₀
    came back 1 for 2, finite and wrong. A pattern that is right for conditions that
    cancel large terms inside (their JVP's rounding is that of the large terms) is
    not refused."""
    n = 10  # a pattern whose rows hold under half the columns is coloured
    M = np.eye(n)
    M[0, 1], M[1, 0], M[1, 1] = small, 1.0, 2 * small
    A = jnp.asarray(M, dtype)
    missing = np.eye(n)
    missing[1, 0] = 1.0

    def implicit(conditions, pattern):
        sparse = idf.Sparse(sp.csr_matrix(pattern))
        return unchecked(lambda x: x, conditions, representation=sparse)

    x = jnp.ones(n, dtype)
    wrong = implicit(lambda x, y: A @ y - x, missing)
    for mode in (jax.jacfwd, jax.jacrev):
        with pytest.warns(RuntimeWarning, match="did not solve"):
            assert all_nan(mode(wrong)(x))
    # A well-conditioned tridiagonal system whose conditions cancel `big·y`.
    T = 4 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    big = 1e4 if dtype == jnp.float32 else 1e8
    cancelling = implicit(
        lambda x, y: (big * y + jnp.asarray(T, dtype) @ y) - big * y - x, T != 0
    )
    for mode in (jax.jacfwd, jax.jacrev):
        J = np.asarray(mode(cancelling)(x), np.float64)
        error = np.max(np.abs(J - np.linalg.inv(T)))
        assert error <= 100 * big * float(jnp.finfo(dtype).eps)


# ------------------------------------------------------------------ point 8


def laplacian_1d(y):
    padded = jnp.pad(y, 1)
    return 2 * y - padded[:-2] - padded[2:]


@pytest.mark.full_optimisation
def test_large_laplacian_solved_and_singular_refused():
    """A well-posed 1-D Laplacian with 4·10⁵ unknowns (κ ≈ 6·10¹⁰, above the old
    1/(n·ε) threshold) is solved; the same Laplacian without its boundary conditions
    (`L 1 = 0`) is refused."""
    n = 400_000
    f = unchecked(
        lambda x: jnp.zeros_like(x),
        lambda x, y: laplacian_1d(y) - x,
        linear_solver=idf.SciPy("splu"),
        representation=idf.Sparse("auto"),
        on_failure="nan",
    )
    x = jnp.zeros(n)
    t = jnp.zeros(n).at[n // 2].set(1.0)
    column = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,))[1])(x, t)
    # L⁻¹ of the Dirichlet Laplacian: G[i, j] = min(i, j)·(n + 1 − max(i, j))/(n + 1)
    i = np.arange(1, n + 1)
    j = n // 2 + 1
    expected = np.minimum(i, j) * (n + 1 - np.maximum(i, j)) / (n + 1)
    assert np.max(np.abs(column - expected)) <= 1e-4 * np.max(expected)

    def neumann(x, y):  # no boundary condition: the constants are its null space
        padded = jnp.pad(y, 1, mode="edge")
        return 2 * y - padded[:-2] - padded[2:] - x

    g = unchecked(
        lambda x: jnp.zeros_like(x),
        neumann,
        linear_solver=idf.SciPy("splu"),
        representation=idf.Sparse("auto"),
        on_failure="nan",
    )
    assert all_nan(jax.jit(lambda x, t: jax.jvp(g, (x,), (t,))[1])(x, t))


EVERY_SOLVER = {name: solver for name, (solver, _, _) in SOLVERS.items()} | {
    "BiCGStab": idf.BiCGStab(),
    "SciPy-bicgstab": idf.SciPy("bicgstab"),
    "AMG-gmres": idf.AMG(accel="gmres"),
}


# Solvers whose libraries have no 16-bit types: they refuse such systems when tracing.
SIXTEEN_BIT_REFUSED = ("Lineax-", "SciPy-", "AMG")


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("name", [name for name in EVERY_SOLVER if name != "user"])
def test_16_bit_solved_or_refused_when_tracing(name, dtype):
    """Entries of a few hundred, whose squares overflow float16 (65 504): no check
    may be blinded by that. A solver either gives A⁻¹ to 16-bit accuracy in both
    directions and NaN for a singular A, or raises a TypeError naming itself at trace
    time."""
    solver = EVERY_SOLVER[name]
    A = np.array([[2.0, 1.0], [1.0, 3.0]])
    x = jnp.asarray([300.0, 200.0], dtype)
    # A tangent and a cotangent of that size too (a Krylov norm would overflow)
    t = jnp.asarray([300.0, -150.0], dtype)
    f, singular = lin(A.astype(dtype), solver), lin(np.ones((2, 2), dtype), solver)
    if name.startswith(SIXTEEN_BIT_REFUSED):
        message = f"{type(solver).__name__}.* does not support {jnp.dtype(dtype)}"
        with pytest.raises(TypeError, match=message):
            jax.jit(jax.jacfwd(f)).trace(x)
        return

    @jax.jit
    def derivatives(x, t):  # one program: the size of the test suite is compiling
        regular = [jax.jacfwd(f)(x), jax.jacrev(f)(x)]
        regular += [jax.jvp(f, (x,), (t,))[1], jax.vjp(f, x)[1](t)[0]]
        return regular, [jax.jacfwd(singular)(x), jax.jacrev(singular)(x)]

    (J_fwd, J_rev, jvp, vjp), singular_ones = derivatives(x, t)
    expected = np.linalg.solve(A, np.asarray(t, np.float64))
    for J in (J_fwd, J_rev):
        assert J.dtype == dtype
        assert np.allclose(np.asarray(J, np.float64), np.linalg.inv(A), rtol=2e-2)
    for derivative in (jvp, vjp):
        assert np.allclose(np.asarray(derivative, np.float64), expected, rtol=2e-2)
    assert all_nan(singular_ones)


# lineax 0.1's LSMR cannot trace a float32 system when float64 is enabled (a `select`
# of float32 and float64 in lsmr.py), as these tests run.
NO_FLOAT32_WITH_X64 = ("Lineax-LSMR",)


@pytest.mark.parametrize(
    "name", [n for n in EVERY_SOLVER if n != "user" and n not in NO_FLOAT32_WITH_X64]
)
def test_tiny_and_huge_right_hand_sides_in_float32(name):
    """Tangents and cotangents of 10⁻²² and 10²² in float32, whose squares underflow
    or overflow: the Krylov methods stopped at x = 0 (‖b‖² = 0 passed their test),
    SciPy's gmres and cg returned answers off by 0.4 % and 7.5 % (their subnormal
    norms), and large ones were refused. Every solver now gives A⁻¹b to float32
    accuracy."""
    A = np.array([[4.0, -1.0, 0.0], [-1.0, 3.0, -1.0], [0.0, -1.0, 2.0]])
    f = lin(A.astype(np.float32), EVERY_SOLVER[name])
    x = jnp.ones(3, jnp.float32)
    direction = np.array([1.0, 2.0, -1.0])

    @jax.jit
    def derivatives(t):
        return jax.jvp(f, (x,), (t,))[1], jax.vjp(f, x)[1](t)[0]

    for scale in (1e-22, 1e22):
        t = jnp.asarray(direction * scale, jnp.float32)
        expected = np.linalg.solve(A, direction)  # A is symmetric: jvp = vjp
        for got in derivatives(t):
            got = np.asarray(got, np.float64) / scale
            np.testing.assert_allclose(got, expected, rtol=2e-4, err_msg=name)


@pytest.mark.full_optimisation
def test_tree_norm_neither_overflows_nor_underflows():
    """One pass, two sums: a plain sum of squares is inf from 1.8·10¹⁹ in float32,
    and XLA folds a product of two scale constants into one that underflows."""
    rng = np.random.default_rng(0)
    for n in (10, 100_000):
        v = rng.standard_normal(n)
        for dtype, scales in (
            (np.float32, (1e-15, 1.0, 1e14, 1e20, 1e35)),
            (np.float64, (1e-100, 1.0, 1e149, 1e160, 1e300)),
        ):
            for scale in scales:
                a = jnp.asarray(v * scale, dtype)
                exact = np.linalg.norm(np.asarray(a, np.float64) / scale) * scale
                got = float(jax.jit(tree_norm)(a))
                assert got == pytest.approx(exact, rel=1e-5), (dtype, n, scale)
        # both sums at once, and a norm beyond the range is inf
        mixed = jnp.asarray(np.where(np.arange(n) % 2, 1e14, 3e15) * v, np.float32)
        exact = np.linalg.norm(np.asarray(mixed, np.float64))
        assert float(jax.jit(tree_norm)(mixed)) == pytest.approx(exact, rel=1e-5)
        assert float(tree_norm(jnp.full(n, 3e38, jnp.float32))) == np.inf
        assert np.isnan(float(tree_norm(jnp.asarray(v).at[n // 2].set(np.nan) * 1e300)))


def test_zero_solution_of_a_nonzero_system_is_refused():
    """`x = 0` solves `A x = b` only for `b = 0`: a solver that stops at once (its
    norms underflowed, say) is caught, not believed."""

    class StopsAtZero(idf.AbstractLinearSolver):
        def presolve(self, A, y):
            return None

        def solve(self, state, b):
            return jax.tree.map(jnp.zeros_like, b)

    f = lin(np.eye(2), StopsAtZero(), on_failure="warn")
    with pytest.warns(RuntimeWarning, match="StopsAtZero did not solve"):
        assert all_nan(jax.jit(jax.jacfwd(f))(jnp.ones(2)))
    assert bool(credible(jnp.asarray(1.0), jnp.zeros(2), jnp.zeros(2)))


def test_credible_does_not_overflow_in_16_bit():
    """`‖A‖∞‖x‖∞ = 6·10⁶` against `threshold·‖b‖∞ ≈ 3·10⁵`: a numerically singular
    system, refused; in float16 both products overflow to inf, and inf ≤ inf."""
    x, b = jnp.asarray([60000.0], jnp.float16), jnp.asarray([300.0], jnp.float16)
    assert not bool(credible(jnp.asarray(100.0, jnp.float16), x, b))
    assert bool(credible(jnp.asarray(1.0, jnp.float16), b, b))


# A float32 leaf rounds the flattened float64 operator to float32 accuracy: the
# default float64 tolerances (Krylov rtol 1e-10, Lineax's probe residual √ε) cannot
# be met. The core flattens before the solver sees the leaves' dtypes, so the default
# "tolerance of the least precise leaf" is lost there (reported; not a solver fix).
MIXED_TOLERANCES = {
    "GMRES": idf.GMRES(rtol=1e-5),
    "CG": idf.CG(rtol=1e-5),
    "BiCGStab": idf.BiCGStab(rtol=1e-5),
    "LeastSquares-cg": idf.LeastSquares(method="cg", rtol=1e-5),
}
MIXED_GAPS = ("Lineax-LU", "Lineax-QR", "Lineax-SVD", "Lineax-LSMR")


@pytest.mark.parametrize("name", EVERY_SOLVER)
def test_empty_y(name):
    empty = unchecked(
        lambda x: x,
        lambda x, y: y - x,
        linear_solver=EVERY_SOLVER[name],
        on_failure="raise",
    )
    x0 = jnp.zeros((0,))
    assert jax.jacfwd(empty)(x0).shape == (0, 0)
    assert jax.grad(lambda x: empty(x).sum())(x0).shape == (0,)


@pytest.mark.parametrize("name", EVERY_SOLVER)
def test_mixed_dtype(name, request):
    solver = MIXED_TOLERANCES.get(name, EVERY_SOLVER[name])
    if name in MIXED_GAPS:
        reason = "mixed precision: the flat operator has float32 accuracy"
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))

    # y = (a float32 scalar, a float64 vector); ∂c/∂y SPD, so that CG and AMG apply.
    M = np.array([[4.0, 1.0], [1.0, 3.0]])

    def conditions(x, y):
        a, b = y
        first = (3 * a - x[0] + 0.5 * b[0]).astype(jnp.float32)
        return first, jnp.asarray(M) @ b - x[1:] + jnp.array([0.5, 0.0]) * a

    full = np.array([[3.0, 0.5, 0.0], [0.5, 4.0, 1.0], [0.0, 1.0, 3.0]])
    mixed = unchecked(
        lambda x: (jnp.float32(0), jnp.zeros(2)),
        conditions,
        linear_solver=solver,
        on_failure="raise",
    )
    x = jnp.ones(3)

    def flat(x):  # one call: each call traces and compiles its own solve
        a, b = mixed(x)
        return jnp.concatenate([a[None], b])

    # Both directions in one compiled program: op by op (on_failure="raise" runs
    # eagerly) every primitive of the rule would compile on its own.
    J, g = jax.jit(
        lambda x: (jax.jacfwd(flat)(x), jax.grad(lambda x: flat(x).sum())(x))
    )(x)
    assert np.allclose(J, np.linalg.inv(full), atol=1e-5)
    assert np.allclose(g, np.linalg.inv(full).sum(0), atol=1e-5)


@pytest.mark.parametrize("name", ["GMRES", "BiCGStab"])
def test_mixed_precision_krylov_defaults_follow_the_float32_leaf(name):
    """float32 and float64 leaves are solved as one float64 vector: the default
    tolerance was float64's, which the coupled float32 part cannot reach, and GMRES
    and BiCGStab failed in reverse mode only. It is the float32 leaf's now."""
    solver = {"GMRES": idf.GMRES(), "BiCGStab": idf.BiCGStab()}[name]

    def forward(x):
        a = jnp.sqrt(x.astype(jnp.float32))
        return a, jnp.sqrt(2 * x - 0.1 * a.astype(jnp.float64))

    def conditions(x, y):
        a, b = y
        return a**2 - x.astype(jnp.float32), b**2 - 2 * x + 0.1 * a.astype(x.dtype)

    f = idf.ImplicitFunction(forward, conditions, linear_solver=solver)
    x = jnp.array([4.0, 9.0])
    x64 = np.asarray(x)
    exact = np.diag(
        (2 - 0.05 / np.sqrt(x64)) / (2 * np.sqrt(2 * x64 - 0.1 * np.sqrt(x64)))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for jacobian in (jax.jacfwd, jax.jacrev):
            np.testing.assert_allclose(
                jacobian(lambda x: f(x)[1])(x), exact, rtol=1e-5, atol=1e-7
            )


def test_conj_hidden_by_a_block_of_larger_scale_is_refused():
    """The test of complex differentiability compared the gap with the largest entry
    of A·v: conditions (10⁹·z₁ − x₁, z₂ + ½·conj(z₂) − x₂) passed it (jvp 0.67i for
    the true 2i). Row by row now."""
    for dtype, big in ((jnp.complex128, 1e9), (jnp.complex64, 1e4)):

        def conditions(x, z):
            return jnp.stack([big * z[0] - x[0], z[1] + 0.5 * jnp.conj(z[1]) - x[1]])

        def forward(x):
            second = jnp.real(x[1]) / 1.5 + 1j * jnp.imag(x[1]) / 0.5
            return jnp.stack([x[0] / big, second]).astype(dtype)

        f = idf.ImplicitFunction(forward, conditions)
        x = jnp.array([1.0 + 1.0j, 1.0 + 2.0j], dtype)
        with pytest.warns(RuntimeWarning, match="not complex-differentiable"):
            tangent = jax.jvp(f, (x,), (jnp.array([0, 1j], dtype),))[1]
        assert np.isnan(tangent).all()


COMPLEX_OK = ["Direct", "Auto", "LeastSquares-cholesky", "Lineax-LU", "SciPy-splu"]


@pytest.mark.parametrize("name", EVERY_SOLVER)
def test_complex_works_or_refused_at_trace_time(name):
    solver = EVERY_SOLVER[name]
    rng = np.random.default_rng(5)
    A = rng.normal(size=(3, 3)) + 1j * rng.normal(size=(3, 3)) + 3 * np.eye(3)
    A = A @ A.conj().T  # Hermitian positive definite
    f = lin(A, solver, "raise")
    x = jnp.ones(3, jnp.complex128)
    try:
        J = jax.jacfwd(f, holomorphic=True)(x)
    except TypeError as e:
        assert name not in COMPLEX_OK
        assert type(solver).__name__ in str(e)
        return
    assert np.allclose(J, np.linalg.inv(A), atol=1e-8), name


@pytest.mark.parametrize("n", [1, 40])
@pytest.mark.parametrize(
    "name", ["Auto", "Direct", "Lineax-LU", "SciPy-splu", "LeastSquares-cholesky"]
)
def test_conditions_not_complex_differentiable_are_refused(name, n):
    """`c = y + ½·conj(y) − x` has a ∂c/∂y that is only real-linear: every solver
    that takes complex systems returned a finite wrong derivative (jvp 0.67i for the
    true 2i). It is NaN now, in real and imaginary parts, with the warning; a
    holomorphic condition on the same unknowns still works."""
    solver = EVERY_SOLVER[name]
    M = np.eye(n) + 0.1 * np.diag(np.ones(n - 1), 1)  # not diagonal from n = 2

    def forward(x):  # Re y = M⁻¹ Re x / 1.5, Im y = M⁻¹ Im x / 0.5
        inverse = jnp.linalg.inv(jnp.asarray(M))
        return inverse @ jnp.real(x) / 1.5 + 1j * (inverse @ jnp.imag(x)) / 0.5

    f = idf.ImplicitFunction(
        forward,
        lambda x, y: jnp.asarray(M) @ (y + 0.5 * jnp.conj(y)) - x,
        linear_solver=solver,
    )
    x, t = jnp.full(n, 1.0 + 2.0j), jnp.full(n, 1.0j)
    with pytest.warns(RuntimeWarning, match="not complex-differentiable"):
        tangent = jax.jvp(f, (x,), (t,))[1]
    with pytest.warns(RuntimeWarning, match="not complex-differentiable"):
        gradient = jax.grad(lambda x: jnp.sum(jnp.abs(f(x)) ** 2))(x)
    for value in (tangent, gradient):
        assert np.all(np.isnan(np.real(value)) & np.isnan(np.imag(value)))
    holomorphic = idf.ImplicitFunction(
        lambda x: jnp.linalg.solve(jnp.asarray(M, complex), x),
        lambda x, y: jnp.asarray(M) @ y - x,
        linear_solver=solver,
    )
    np.testing.assert_allclose(
        jax.jvp(holomorphic, (x,), (t,))[1], np.linalg.solve(M, t), rtol=1e-10
    )


def test_auto_delegates_its_certificate():
    A = sinkhorn_jacobian(1)
    big = np.kron(np.eye(200), A)  # 1200 unknowns: Auto picks GMRES
    f = lin(big, idf.Auto())
    t = np.zeros(len(big))
    t[:N] = A @ np.ones(N)  # a right-hand side in the range
    assert all_nan(jax.jvp(f, (jnp.zeros(len(big)),), (jnp.asarray(big @ t),))[1])


def test_threshold_constant_is_the_documented_one():
    assert singular_threshold(100, jnp.float64) == pytest.approx(1 / (10 * EPS64))


def test_linear_solve_uses_certificates():
    A = jsparse.BCOO.fromdense(jnp.asarray(path_laplacian()))
    b = A @ jnp.arange(N, dtype=jnp.float64)  # in the range
    for solver in (idf.GMRES(), idf.CG(), idf.SciPy("splu"), idf.Direct()):
        assert all_nan(idf.linear_solve(A, b, solver, on_failure="nan"))


@pytest.mark.full_optimisation
@pytest.mark.parametrize("n", [1, 10, 5000, 100_000])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_max_or_nan_against_numpy(n, dtype):
    """The reduction under every check: NumPy's NaN-propagating max at each size
    (XLA:CPU's own max drops NaN above a few thousand elements), along an axis too,
    and no derivative through it."""
    x = np.random.default_rng(n).normal(size=(3, n)).astype(dtype)
    x[1, n // 2] = np.nan
    x[2, :] = np.nan
    reduce = jax.jit(max_or_nan, static_argnames="axis")
    np.testing.assert_array_equal(reduce(x, axis=1), np.max(x, axis=1))
    np.testing.assert_array_equal(reduce(x, axis=-1), np.max(x, axis=1))
    np.testing.assert_array_equal(reduce(x[0]), np.max(x[0]))
    assert np.isnan(reduce(x))
    assert reduce(x[:, :0], axis=1).tolist() == [0, 0, 0]
    assert jax.grad(lambda v: max_or_nan(v) * 1.0)(jnp.asarray(x[0])).sum() == 0


@pytest.mark.parametrize("dtype, kappa", [(jnp.float64, 1e10), (jnp.float32, 1e3)])
@pytest.mark.parametrize("n", [6, 48])
def test_direct_small_solves_by_the_inverse_to_kappa_eps(n, dtype, kappa):
    """Up to 48 unknowns `Direct` solves by a product with the explicit inverse: in
    both directions the error stays within `100·κ·ε` of the exact inverse (built
    from its singular value decomposition), in float64 and float32."""
    rng = np.random.default_rng(n)
    U = np.linalg.qr(rng.normal(size=(n, n)))[0]
    V = np.linalg.qr(rng.normal(size=(n, n)))[0]
    s = np.logspace(0, -np.log10(kappa), n)
    A, inverse = (U * s) @ V.T, (V / s) @ U.T
    f = unchecked(
        lambda x, A: jnp.zeros_like(x),
        lambda x, y, A: A @ y - x,
        linear_solver=idf.Direct(),
    )
    x, A_ = jnp.ones(n, dtype), jnp.asarray(A, dtype)
    J_fwd, J_rev = jax.jit(lambda x, A: (jax.jacfwd(f)(x, A), jax.jacrev(f)(x, A)))(
        x, A_
    )
    eps = float(jnp.finfo(dtype).eps)
    for J in (J_fwd, J_rev):
        assert J.dtype == dtype
        error = np.max(np.abs(np.asarray(J, np.float64) - inverse)) / np.max(
            np.abs(inverse)
        )
        assert error <= 100 * kappa * eps, error
