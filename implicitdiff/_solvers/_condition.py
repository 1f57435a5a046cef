"""Condition number estimates from a factorisation, for the solvers' certificates."""

from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array, Float

from .._misc import GOLDEN_ANGLE, max_or_nan

Solve = Callable[[Array], Array]


def inverse_norm1_estimates(
    solve: Solve, solve_adjoint: Solve, n: int, dtype
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Lower bounds of `‖M⁻¹‖₁` and `‖M⁻ᴴ‖₁ = ‖M⁻¹‖∞`, each usually within a factor
    of 3 and often exact, for an `n × n` matrix `M` given by its solves:
    `solve(V) = M⁻¹V` and `solve_adjoint(V) = M⁻ᴴV` on the columns of an `(n, k)`
    matrix of `dtype`.

    Hager's estimator with Higham's extra vector, as LAPACK's `xLACN2` runs it when
    the first column it tries is the largest (the usual case): `y = B x₀`
    (`x₀ = 1/n`), `z = Bᴴ sign(y)`, `y = B e_j` at the largest `|z_j|`, and `B` on
    Higham's alternating vector, and `B` on one more fixed vector without structure.
    It is run for `B = M⁻¹` (solves with `M`, then `Mᴴ`) and for `B = M⁻ᴴ` (the same
    solves in the other order) in lock step, half a step apart: four calls, each
    solving with `M` or with `Mᴴ` for both estimates at once (one to four right-hand
    sides). Each call is a dependent solve of a few vectors, whose cost is mostly
    fixed: the two further steps LAPACK may take cost ~0.2 ms at n = 250 on a 2-core
    CPU (3 % of a `jax.jacrev` of 250 unknowns), measured apart. The gradient `z`
    gives a bound for free: `‖Bᴴ s‖∞ ≤ ‖B‖₁` for `‖s‖∞ = 1`.

    The estimate decides only whether `M` is numerically singular (far beyond the
    threshold, where any vector meets the near-null direction) or so ill-conditioned
    that no solution is trusted: a factor of 3 there moves the threshold, not the
    promise. Every candidate is `‖B v‖` of some unit `v`, so neither result exceeds
    its norm; NaN in a solve makes it NaN (`jnp.maximum` and `max_or_nan` propagate
    NaN, where a `max` reduction on XLA:CPU may not).
    """
    index = jnp.arange(n)
    start = jnp.full(n, 1 / n, dtype)
    # Alternating with growing magnitude: catches the matrices for which Hager's
    # iteration stops at a poor local maximum.
    alternating = ((-1.0) ** index * (1 + index / max(n - 1, 1))).astype(dtype)
    # Golden-angle phases, no structure a matrix is likely to share: a rank-one
    # perturbation `I − s·u vᵀ` with u and v orthogonal to the three vectors above
    # (and to e₁, where Hager's step lands when they tie) fooled the estimate by 10⁸.
    probe = jnp.cos(GOLDEN_ANGLE * index).astype(dtype)

    def sign(y):
        return jnp.where(y == 0, 1, y / jnp.where(y == 0, 1, jnp.abs(y)))

    def towards_maximum(z):  # the unit vector e_j at the largest |z_j|
        return (index == jnp.argmax(jnp.abs(z))).astype(dtype)

    def columns(*vectors):
        return jnp.stack(vectors, axis=1)

    # a: the estimate of ‖M⁻¹‖₁; b: that of ‖M⁻ᴴ‖₁, each step of b riding along with
    # the next step of a, which solves with the same matrix.
    probe_norm = _norm1(probe)
    Y = solve(columns(start, alternating, probe))
    y_a, extra_a = Y[:, 0], _extra(Y[:, 1], n)
    extra_a = jnp.maximum(extra_a, _norm1(Y[:, 2]) / probe_norm)
    Z = solve_adjoint(columns(sign(y_a), start, alternating, probe))
    z_a, y_b, extra_b = Z[:, 0], Z[:, 1], _extra(Z[:, 2], n)
    extra_b = jnp.maximum(extra_b, _norm1(Z[:, 3]) / probe_norm)
    W = solve(columns(towards_maximum(z_a), sign(y_b)))
    column_a, z_b = W[:, 0], W[:, 1]
    column_b = solve_adjoint(towards_maximum(z_b)[:, None])[:, 0]
    estimate_a = max_or_nan(
        jnp.stack([_norm1(y_a), _norm_inf(z_a), _norm1(column_a), extra_a])
    )
    estimate_b = max_or_nan(
        jnp.stack([_norm1(y_b), _norm_inf(z_b), _norm1(column_b), extra_b])
    )
    return estimate_a, estimate_b


def _norm1(v: Array) -> Float[Array, ""]:
    return jnp.sum(jnp.abs(v))


def _norm_inf(v: Array) -> Float[Array, ""]:
    return max_or_nan(jnp.abs(v))


def _extra(y: Array, n: int) -> Float[Array, ""]:
    """Higham's bound from the alternating vector, whose 1-norm is about 3n/2."""
    return 2 * _norm1(y) / (3 * n)
