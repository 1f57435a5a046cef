"""Ready-made conditions for [`implicitdiff.ImplicitFunction`][]: fixed points,
argmins, constrained argmins and KKT systems."""

from ._conditions import (
    fixed_point as fixed_point,
    kkt as kkt,
    projected_gradient as projected_gradient,
    proximal_gradient as proximal_gradient,
    stationary as stationary,
)
