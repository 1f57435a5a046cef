"""Proximal operators, differentiable in the point and in the strength."""

from ._prox import (
    group_l2 as group_l2,
    l1 as l1,
    l2_squared as l2_squared,
    non_negative_l1 as non_negative_l1,
)
