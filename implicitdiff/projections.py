"""Euclidean projections onto convex sets, differentiable in the point and in the
set's parameters."""

from ._projections import (
    affine as affine,
    box as box,
    hyperplane as hyperplane,
    l1_ball as l1_ball,
    l2_ball as l2_ball,
    non_negative as non_negative,
    simplex as simplex,
)
