"""The solve mechanism under the implicit rule and `linear_solve`: operator → presolve
→ certificate → solve → credibility → failure policy, inside a transposable
`lax.custom_linear_solve`."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import lineax as lx
from jax import lax
from jaxtyping import Array, Bool, PyTree

from . import _solve_record as solve_record
from ._failure import OnFailure, Site, announce, apply_policy
from ._misc import (
    add_poison,
    binary_exponent,
    check_dtype,
    credible_maxima,
    golden_phases,
    max_abs,
    max_abs_many,
    maxima,
    operator_norm_lower_bound,
    poison_term,
    ravel,
    result_dtype,
    size,
    structure,
    unravel,
)
from ._representation import AbstractRepresentation
from ._solvers._base import AbstractLinearSolver
from ._solvers._krylov import flattened_from
from ._solvers._least_squares import LeastSquares


def solve_linearised(
    A: Callable,
    rhs: PyTree[Array],
    y: PyTree[Array],
    operator_finite: Bool[Array, ""],
    solver: AbstractLinearSolver,
    representation: AbstractRepresentation,
    on_failure: OnFailure,
    site: Site,
    complex_checked: bool = False,
    system: str = "∂c/∂y",
    curvature: Callable | None = None,
) -> PyTree[Array]:
    """Solves `A ẏ = rhs` for the linearised conditions `A` at `y`, transposably.
    `system` names `A` in the failure's message.

    With [`LeastSquares`] the system becomes the normal equations, plus, when given,
    the residual's `curvature` (`scale ↦ (H, h)`: `H` added to the scaled normal
    operator, `h` subtracted from its right-hand side). A pytree whose leaves have
    different dtypes is solved as one flat vector of the widest dtype:
    solvers (and lineax's materialisation) need one dtype throughout. An empty `y`
    has an empty derivative and no system to solve.
    """
    y_structure = structure(y)
    if size(y_structure) == 0:
        return jax.tree.map(jnp.zeros_like, y)
    complex_leaves = any(_is_complex(leaf) for leaf in jax.tree.leaves(y_structure))
    if complex_leaves and not complex_checked:  # on y's leaves, before flattening
        rhs = _nan_unless_complex_linear(
            A, rhs, y_structure, operator_finite, on_failure, site
        )
    leaves = jax.tree.leaves((y_structure, structure(rhs)))
    if len({leaf.dtype for leaf in leaves}) > 1:
        dtype = jnp.result_type(*leaves)
        flat_A = lambda v: ravel(A(unravel(v, y_structure))).astype(dtype)  # noqa: E731
        flat_y = jax.ShapeDtypeStruct((size(y_structure),), dtype)
        flat_curvature = None
        if curvature is not None:

            def flat_curvature(scale):
                H, h = curvature(scale)
                flat_H = lambda v: ravel(H(unravel(v, y_structure))).astype(dtype)  # noqa: E731
                return flat_H, ravel(h).astype(dtype)

        with flattened_from(tuple({leaf.dtype for leaf in leaves})):
            flat = solve_linearised(
                flat_A,
                ravel(rhs).astype(dtype),
                flat_y,
                operator_finite,
                solver,
                representation,
                on_failure,
                site,
                complex_checked=True,
                system=system,
                curvature=flat_curvature,
            )
        return unravel(flat, y_structure)
    matvec, tags = A, ()
    if isinstance(solver, LeastSquares):
        # Normal equations (cA)ᴴ(cA) ẏ = (cA)ᴴ(c·rhs): square and Hermitian, so
        # custom_linear_solve applies and the transpose (a VJP) is the minimum-norm
        # solve of Aᵀu = v. With complex unknowns AᵀA would be complex symmetric, not
        # positive definite. `c`, a power of two, keeps AᴴA within range: conditions
        # scaled by 1e160 (1e20 in float32) square past the largest float, and a
        # forward-mode right-hand side that overflows would pass for NaN input.
        At = jax.linear_transpose(A, y_structure)
        inner, outer = _normal_equations_scale(A, y_structure)

        def scaled(c, v):
            return jax.tree.map(lambda leaf: c.astype(leaf.real.dtype) * leaf, v)

        def cA(v):  # half of c before A, half after: no intermediate leaves range
            return scaled(outer, A(scaled(inner, v)))

        def adjoint(v, before, after):  # after·Aᴴ(before·v)
            conj = jax.tree.map(jnp.conj, scaled(before, v))
            return scaled(after, jax.tree.map(jnp.conj, At(conj)[0]))

        normal = lambda v: adjoint(cA(v), inner, outer)  # noqa: E731
        matvec = normal
        h = None
        if curvature is not None:
            H, h = curvature(inner * outer)
            if h is None:  # complex unknowns
                rhs = _nan_unless_consistent(
                    normal, H, rhs, y_structure, operator_finite, on_failure, site
                )
            else:
                matvec = lambda v: jax.tree.map(jnp.add, normal(v), H(v))  # noqa: E731
        # c²·Aᴴ rhs as c·Aᴴ(c·rhs): `rhs = −B ẋ` need not be on A's scale (with
        # B = −I and A = 10³⁰·M it is of order one), and every intermediate, in this
        # map and in its transpose (reverse mode), stays between its input's scale and
        # its output's. Scaled by c^(3/2) before Aᴴ, an order-one rhs underflowed to
        # an exact 0, whose solution 0 passed every check.
        rhs = adjoint(rhs, inner * outer, inner * outer)
        if h is not None:
            rhs = jax.tree.map(jnp.subtract, rhs, h)
        if not any(jnp.issubdtype(leaf.dtype, jnp.complexfloating) for leaf in leaves):
            tags = (lx.symmetric_tag, lx.positive_semidefinite_tag)
    operator = representation.operator(matvec, structure(rhs))
    if tags:
        operator = lx.TaggedLinearOperator(operator, tags)
    return solve_with_presolve(
        matvec,
        rhs,
        operator,
        solver,
        on_failure,
        site,
        system=system,
        operator_finite=operator_finite,
    )


def residual_curvature(c: Callable, residual, moving, y, t_moving) -> Callable:
    """For [`LeastSquares`]: `scale ↦ (v ↦ s²·Σ r̄ᵢ ∇²_yy cᵢ·v, s²·Σ r̄ᵢ ∇²_yx cᵢ·ẋ)`,
    with the residual `r = c(x, y)` held fixed. `y` minimises `½‖c‖²`; where `r` is
    not zero (a fit), the derivative of that minimiser solves
    `(AᵀA + Σ rᵢ∇²cᵢ) ẏ = −(AᵀB + Σ rᵢ∇²_yx cᵢ) ẋ`: without these terms (the
    Gauss-Newton derivative) it is off by about the residual's relative size. Both
    are zero for consistent conditions. They are the Hessians of `s²·⟨r̄, c⟩` (`s`
    the normal equations' power-of-two scale, applied to `r` and `c` each). For
    complex unknowns only the first is formed (the second is not needed: see
    `solve_linearised`)."""
    residual = jax.lax.stop_gradient(residual)
    real = not any(
        jnp.issubdtype(leaf.dtype, jnp.complexfloating) for leaf in jax.tree.leaves(y)
    )

    def gradient(scale, m, y):
        def weighted(m, y):
            pairs = zip(
                jax.tree.leaves(residual), jax.tree.leaves(c(m, y)), strict=True
            )
            return sum(jnp.sum(jnp.conj(scale * r) * (scale * ci)) for r, ci in pairs)

        return jax.grad(weighted, argnums=1, holomorphic=not real)(m, y)

    def terms(scale):
        def second(v):
            return jax.jvp(lambda y: gradient(scale, moving, y), (y,), (v,))[1]

        if not real:
            return second, None
        mixed = jax.jvp(lambda m: gradient(scale, m, y), (moving,), (t_moving,))[1]
        return second, mixed

    return terms


def solve_with_presolve(
    matvec: Callable,
    rhs: PyTree[Array],
    operator: lx.AbstractLinearOperator,
    solver: AbstractLinearSolver,
    on_failure: OnFailure,
    site: Site,
    system: str = "∂c/∂y",
    operator_finite: Bool[Array, ""] | bool = True,
) -> PyTree[Array]:
    """`lax.custom_linear_solve` whose solve and transpose solve each presolve once.

    `operator` represents `matvec` (built once per linearisation point, outside, so
    that the sparse representation detects and assembles once for both directions).
    The solve and the transpose solve each run the solver's presolve on it (on its
    transpose for the VJP), only in the direction in use and unbatched under `vmap`,
    as it does not depend on the right-hand side. The product JAX hands to each (`A`'s
    to `solve`, its transpose's to `transpose_solve`) serves only a `SolveLog`'s
    residual: unlike the operator's `mv`, it takes vectors of any sharding.

    Every solution must then pass two checks that do not trust the solver:

    - the solver's certificate that the operator is regular (`solver.certify`, once
        per presolve): a residual cannot tell a singular system whose right-hand side
        lies in its range from a regular one;
    - `credible`: the solution must not prove the system numerically singular.

    A solution that fails either is all NaN, and a failure from a right-hand side
    without NaN and a finite operator (`operator_finite`, a flag) warns or raises as
    `on_failure` says; NaN in, NaN out is no failure. An infinite right-hand side
    is one: upstream, a product overflowed (`−B ẋ` of conditions scaled by 10³⁰ in
    float32, with `ẋ` of 10⁹), and the derivative would be NaN unannounced.
    """

    builtin = _is_builtin(solver)
    own = "" if builtin else ", a solution whose residual is too large"
    # An array, never a Python bool: `~True` is -2, which is truthy.
    operator_finite = jnp.asarray(operator_finite)

    def presolve_and_solve(transpose):
        direction = "VJP (Aᵀ u = v)" if transpose else "JVP (A x = b)"
        message = (
            f"implicitdiff: {type(solver).__name__} did not solve the {direction} "
            f"linear system with A = {system} (singular or ill-conditioned, no "
            f"convergence{own}, a sparsity pattern missing entries, or an infinite "
            f"right-hand side: an overflow, from conditions far from unit scale); "
            f"the derivative is NaN."
        )

        def run(product, b):
            A = operator.transpose() if transpose else operator
            state, regular, norm_bound = solve_record.presolve(
                solver, A, structure(b), direction
            )
            if not builtin:  # its own bound, if too large, would loosen the test
                residual_norm_bound = jnp.minimum(
                    norm_bound, operator_norm_lower_bound(A)
                )

            def judge(x):  # accepted, and NaN in b (from b's maximum)
                _check_solution(solver, x, A.in_structure())
                x_max, b_max = max_abs_many(x, b)
                n, dtype = size(x), result_dtype(x)
                accepted = credible_maxima(norm_bound, x_max, b_max, n, dtype)
                if not builtin:
                    bound = residual_norm_bound * x_max + b_max
                    accepted &= _backward_error_small(product, x, b, bound)
                return regular & accepted, jnp.isnan(b_max)

            x, (accepted, nan_in) = solve_record.solve(
                solver, state, product, b, direction, judge, operator_finite
            )
            failed = ~accepted & ~nan_in & operator_finite
            return apply_policy(x, failed, on_failure, message, site)

        return run

    return lax.custom_linear_solve(
        matvec,
        rhs,
        solve=presolve_and_solve(transpose=False),
        transpose_solve=presolve_and_solve(transpose=True),
    )


def _is_builtin(solver: AbstractLinearSolver) -> bool:
    return type(solver).__module__.split(".")[0] == "implicitdiff"


def _check_solution(solver, x: PyTree[Array], expected: PyTree) -> None:
    """Raises a `TypeError` naming the solver when its solution is not shaped like
    the operator's input (JAX's own error would name neither)."""

    def signature(tree):
        leaves, treedef = jax.tree.flatten(structure(tree))
        return treedef, [(leaf.shape, jnp.dtype(leaf.dtype)) for leaf in leaves]

    if signature(x) != signature(expected):
        raise TypeError(
            f"implicitdiff: {type(solver).__name__}.solve returned {structure(x)}, "
            f"but the solution must have the structure, shapes and dtypes of the "
            f"operator's input, {expected}."
        )


def _backward_error_small(
    product: Callable, x: PyTree[Array], b: PyTree[Array], scale: Array
) -> Bool[Array, ""]:
    """Whether `‖b − A x‖∞ ≤ ε^¼·scale`, `scale = ‖A‖∞‖x‖∞ + ‖b‖∞` (from below):
    `x` solves a system within `ε^¼` (10⁻⁴ in float64, 0.02 in float32) of
    `A x = b`. Every solution of a user's solver must pass it (one product with `A`
    per solve): a solver that stops early, solves with `Aᵀ`, or returns `b` breaks
    the contract of NaN on failure, and its finite answer would be a wrong
    derivative. Loose enough for an iterative solver's usual tolerances; the built-in
    solvers certify their own."""
    residual = max_abs(jax.tree.map(lambda u, v: u - v, b, product(x)))
    eps = jnp.finfo(check_dtype(result_dtype(x))).eps
    return residual <= eps**0.25 * scale


def _nan_unless_complex_linear(
    A: Callable,
    rhs: PyTree[Array],
    y_structure: PyTree,
    operator_finite: Bool[Array, ""],
    on_failure: OnFailure,
    site: Site,
) -> PyTree[Array]:
    """`rhs`, all NaN (with the policy's warning or error) unless `A` is complex-linear:
    conditions that use `conj`, `abs`, `real` or `imag` of a complex `y` have a
    `∂c/∂y` that is only real-linear, which no complex matrix represents, and every
    solver would return a finite wrong derivative. One probe, two products:
    `A(i v) = i A(v)` for a complex-linear `A`, to rounding."""

    def probe(leaf):  # golden-angle phases on complex leaves, 0 on real ones
        if not _is_complex(leaf):
            return jnp.zeros(leaf.shape, leaf.dtype)
        k = jnp.arange(leaf.size).reshape(leaf.shape)
        return ((1 + k / leaf.size) * golden_phases(leaf)).astype(leaf.dtype)

    v = jax.tree.map(probe, y_structure)
    rotated = jax.tree.map(lambda leaf: 1j * leaf if _is_complex(leaf) else leaf, v)
    Av = ravel(A(v)).astype(complex)
    A_rotated = ravel(A(rotated)).astype(complex)
    # Row by row: a block of conditions 10⁹ larger (10⁴ in complex64) than one that
    # uses conj would hide it from a test against the largest entry of A v.
    dtype = jnp.result_type(*jax.tree.leaves(y_structure))
    eps = jnp.finfo(dtype).eps
    scale = jnp.abs(Av) + jnp.abs(A_rotated)
    excess, largest = maxima(
        jnp.abs(A_rotated - 1j * Av) - jnp.sqrt(eps) * scale, scale
    )
    not_linear = (excess > eps * largest) & jnp.isfinite(largest) & operator_finite
    message = (
        "implicitdiff: the conditions are not complex-differentiable in y (they use "
        "conj, abs, real or imag of the complex unknowns): ∂c/∂y is not a complex "
        "matrix, and the derivative is NaN. Write y as its real and imaginary parts "
        "(real arrays), and the conditions as real equations."
    )
    return _poisoned_if(not_linear, rhs, on_failure, message, site)


def _poisoned_if(
    failed: Bool[Array, ""],
    rhs: PyTree[Array],
    on_failure: OnFailure,
    message: str,
    site: Site,
) -> PyTree[Array]:
    """`rhs`, all NaN (in both modes) where `failed`, announced by `on_failure`."""
    term = poison_term(announce(failed, on_failure, message, site), rhs)
    return jax.tree.map(lambda leaf: add_poison(term, leaf), rhs)


def _nan_unless_consistent(
    normal: Callable,
    H: Callable,
    rhs: PyTree[Array],
    y_structure: PyTree,
    operator_finite: Bool[Array, ""],
    on_failure: OnFailure,
    site: Site,
) -> PyTree[Array]:
    """`rhs`, all NaN (with the policy's warning or error) unless the residual's
    curvature `H` is negligible next to the normal operator, on one probe. With
    complex unknowns and a residual that does not vanish, the minimiser of `½‖c‖²`
    depends on `conj(ẏ)`: its derivative is not complex-linear, and the normal
    equations alone (Gauss-Newton) would give a finite wrong one."""
    probe = jax.tree.map(
        lambda leaf: golden_phases(leaf).astype(leaf.dtype), y_structure
    )
    curvature, normal_size = maxima(ravel(H(probe)), ravel(normal(probe)))
    eps = jnp.finfo(result_dtype(y_structure)).eps
    inconsistent = (curvature > jnp.sqrt(eps) * normal_size) & operator_finite
    message = (
        "implicitdiff: LeastSquares with complex unknowns and conditions that do not "
        "vanish at y (a fit with a residual): the minimiser of ½‖c‖² is then not "
        "complex-differentiable, and the derivative is NaN. Write y as its real and "
        "imaginary parts (real arrays), whose derivative includes the residual's "
        "curvature."
    )
    return _poisoned_if(inconsistent, rhs, on_failure, message, site)


def _normal_equations_scale(A: Callable, y_structure: PyTree) -> tuple[Array, Array]:
    """`(inner, outer)`, powers of two with `inner·outer = c = 2⁻ᵉ` and `2ᵉ` about
    the size of `A`'s entries, from one product with a fixed probe whose entries are
    at most `2/n` (so that it cannot overflow): `c·A = outer·A(inner·v)` has entries
    of order one, and `(cA)ᴴ(cA)` neither overflows nor underflows. Both 1 when the
    product is zero or not finite (its NaN then fails the solve)."""
    n = size(y_structure)

    def probe(leaf):  # golden-angle phases: no structure a condition would cancel
        k = jnp.arange(leaf.size).reshape(leaf.shape)
        return ((1 + k / n) / n * golden_phases(leaf)).astype(leaf.dtype)

    # The whole exponent range but 3: c = 2⁻ᵉ is then a normal number (entries of
    # 10³⁰⁰ need c = 2⁻⁹⁹⁷, which the Krylov solvers' ¾ of the range cut short).
    exponent = binary_exponent(A(jax.tree.map(probe, y_structure)), headroom=3)
    one = jnp.ones((), jnp.finfo(jnp.result_type(*jax.tree.leaves(y_structure))).dtype)
    half = exponent // 2
    scales = jnp.ldexp(one, -half), jnp.ldexp(one, half - exponent)
    return lax.stop_gradient(scales)


def _is_complex(leaf) -> bool:
    return jnp.issubdtype(leaf.dtype, jnp.complexfloating)
