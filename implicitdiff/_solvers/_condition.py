"""Condition number estimates from a factorisation, for the solvers' certificates."""

from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array, Float

# Hager's iteration usually settles in two steps (LAPACK's xLACN2 allows five); each
# step reads the factors twice, which at a few hundred unknowns is what it costs.
_ESTIMATOR_STEPS = 2

Solve = Callable[[Array], Array]


def inverse_norm1_estimates(
    solve: Solve, solve_adjoint: Solve, n: int, dtype
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Lower bounds of `‖M⁻¹‖₁` and `‖M⁻ᴴ‖₁ = ‖M⁻¹‖∞`, each usually within a factor
    of 3 and often exact, for an `n × n` matrix `M` given by its solves:
    `solve(V) = M⁻¹V` and `solve_adjoint(V) = M⁻ᴴV` on the columns of an `(n, k)`
    matrix of `dtype`.

    Hager's estimator with Higham's extra vector (as LAPACK's `xLACN2`), run for `M⁻¹`
    (solves with `M`, then `Mᴴ`) and for `M⁻ᴴ` (the same solves in the other order)
    in lock step, half a step apart: every call solves with `M` or with `Mᴴ` for both
    estimates at once (two or three right-hand sides), `2·_ESTIMATOR_STEPS + 2` calls
    in all. Every candidate is `‖B v‖₁` for some `‖v‖₁ = 1`, so neither result
    exceeds its norm; NaN in a solve makes it NaN (`jnp.maximum` propagates NaN, where
    a `max` reduction on XLA:CPU may not).
    """
    index = jnp.arange(n)
    start = jnp.full(n, 1 / n, dtype)
    # Alternating with growing magnitude: catches the matrices for which Hager's
    # iteration stops at a poor local maximum.
    alternating = ((-1.0) ** index * (1 + index / max(n - 1, 1))).astype(dtype)

    def sign(y):
        return jnp.where(y == 0, 1, y / jnp.where(y == 0, 1, jnp.abs(y)))

    def towards_maximum(z):  # the unit vector e_j at the largest |z_j|
        return (index == jnp.argmax(jnp.abs(z))).astype(dtype)

    def columns(*vectors):
        return jnp.stack(vectors, axis=1)

    # a: the estimate of ‖M⁻¹‖₁; b: that of ‖M⁻ᴴ‖₁, whose first product rides along
    # with a's first product by M⁻ᴴ.
    Y = solve(columns(start, alternating))
    y_a, extra_a = Y[:, 0], _extra(Y[:, 1], n)
    Z = solve_adjoint(columns(sign(y_a), start, alternating))
    x_a, y_b, extra_b = towards_maximum(Z[:, 0]), Z[:, 1], _extra(Z[:, 2], n)
    estimate_a, estimate_b = _norm1(y_a), _norm1(y_b)
    for _ in range(_ESTIMATOR_STEPS):
        W = solve(columns(x_a, sign(y_b)))
        y_a, x_b = W[:, 0], towards_maximum(W[:, 1])
        Z = solve_adjoint(columns(sign(y_a), x_b))
        x_a, y_b = towards_maximum(Z[:, 0]), Z[:, 1]
        estimate_a = jnp.maximum(estimate_a, _norm1(y_a))
        estimate_b = jnp.maximum(estimate_b, _norm1(y_b))
    return jnp.maximum(estimate_a, extra_a), jnp.maximum(estimate_b, extra_b)


def _norm1(v: Array) -> Float[Array, ""]:
    return jnp.sum(jnp.abs(v))


def _extra(y: Array, n: int) -> Float[Array, ""]:
    """Higham's bound from the alternating vector, whose 1-norm is about 3n/2."""
    return 2 * _norm1(y) / (3 * n)
