"""Condition number estimates from a factorisation, for the solvers' certificates."""

from collections.abc import Callable

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

# Hager's iteration usually settles in two or three steps; LAPACK's xLACN2 allows five.
_ESTIMATOR_STEPS = 3


def norm1_estimate(
    apply: Callable[[Array], Array],
    apply_adjoint: Callable[[Array], Array],
    n: int,
    dtype,
) -> Float[Array, ""]:
    """A lower bound of `‖B‖₁`, usually within a factor of 3 and often exact (Hager's
    estimator with Higham's extra vector, as in LAPACK's `xLACN2`), for an `n × n`
    matrix `B` given by its products on flat vectors of `dtype`: `apply(v) = B v`,
    `apply_adjoint(v) = Bᴴ v`.

    Every candidate is `‖B v‖₁` for some `‖v‖₁ = 1`, so the result never exceeds
    `‖B‖₁`; NaN in a product makes it NaN (`jnp.maximum` propagates NaN, where a `max`
    reduction on XLA:CPU may not). It costs `2·_ESTIMATOR_STEPS + 3` products, each
    two triangular solves when `B` is the inverse of a factorised matrix: `O(n²)`
    work next to the factorisation's `O(n³)`.
    """
    index = jnp.arange(n)

    def towards_maximum(y):
        # The unit vector e_j at the largest |(Bᴴ sign(y))_j|: where ‖B x‖₁ grows most.
        z = apply_adjoint(jnp.where(y == 0, 1, y / jnp.where(y == 0, 1, jnp.abs(y))))
        return (index == jnp.argmax(jnp.abs(z))).astype(dtype)

    def step(_, carry):
        x, estimate = carry
        y = apply(x)
        return towards_maximum(y), jnp.maximum(estimate, _norm1(y))

    y = apply(jnp.full(n, 1 / n, dtype))
    _, estimate = lax.fori_loop(
        0, _ESTIMATOR_STEPS, step, (towards_maximum(y), _norm1(y))
    )
    # Higham's vector, alternating with growing magnitude, catches the matrices for
    # which Hager's iteration stops at a poor local maximum.
    alternating = ((-1.0) ** index * (1 + index / max(n - 1, 1))).astype(dtype)
    return jnp.maximum(estimate, 2 * _norm1(apply(alternating)) / (3 * n))


def _norm1(v: Array) -> Float[Array, ""]:
    return jnp.sum(jnp.abs(v))
