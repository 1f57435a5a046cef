"""The peer libraries (jaxopt, optimistix: the `bench` extra), imported if present,
and the adapters that let them share a forward with implicitdiff.

Every comparison gives each library the *same* forward computation, so that the
figures measure the differentiation machinery and not different root finders.
jaxopt's `custom_root` already wraps any forward. optimistix's `root_find` and
`fixed_point` take one of its solvers, so `OneShot` is a root finder whose single
step calls the shared forward: `root_find(fn, OneShot(forward), y0, args,
adjoint=ImplicitAdjoint(...))` then runs exactly that forward, and optimistix's own
implicit adjoint differentiates `fn(y, args) = 0` at its output.
"""

import warnings
from collections.abc import Callable

import jax.numpy as jnp

with warnings.catch_warnings():
    # jaxopt warns on import that it is no longer maintained.
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import jaxopt
    except ImportError:
        jaxopt = None

try:
    import lineax as lx
    import optimistix as optx
except ImportError:
    lx = optx = None

MISSING = {
    name: f"{name} not installed (pip install -e '.[bench]')"
    for name, module in (("jaxopt", jaxopt), ("optimistix", optx))
    if module is None
}

if optx is not None:

    class OneShot(optx.AbstractRootFinder):
        """A root finder whose one step is `y = forward(args)`."""

        forward: Callable
        rtol: float = 0.0
        atol: float = 0.0
        norm: Callable = optx.max_norm

        def init(self, fn, y, args, options, f_struct, aux_struct, tags):
            return jnp.array(False)

        def step(self, fn, y, args, options, state, tags):
            new_y = self.forward(args)
            _, aux = fn(new_y, args)
            return new_y, jnp.array(True), aux

        def terminate(self, fn, y, args, options, state, tags):
            return state, optx.RESULTS.successful

        def postprocess(self, fn, y, aux, args, options, state, tags, result):
            return y, aux, {}

    def optx_root(
        fn: Callable, forward: Callable, y0, args, linear_solver=None
    ) -> Callable:
        """`optimistix.root_find` of `fn(y, args) = 0` whose forward is `forward(args)`,
        differentiated by `ImplicitAdjoint(linear_solver)` (its default when None)."""
        adjoint = (
            optx.ImplicitAdjoint()
            if linear_solver is None
            else optx.ImplicitAdjoint(linear_solver=linear_solver)
        )
        return optx.root_find(
            fn, OneShot(forward), y0, args, adjoint=adjoint, max_steps=2
        ).value
