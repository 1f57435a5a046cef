"""Checks on what the user hands to `ImplicitFunction` and on what their functions
return: the module's fields, the forward's output `y` (and byproduct `z`), the
structure of the conditions' output `c`, and whether `y` solves the conditions. Each
error names the fix. The rule (`_implicit_function.py`) only calls in."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, PyTree

from ._failure import ON_FAILURE_CHOICES, OnFailure, Site, announce
from ._misc import name_of, size, structure, tree_norms
from ._solvers._base import AbstractLinearSolver
from ._solvers._preconditioner import AbstractPreconditioner


def check_callables(**functions) -> None:
    """Raises when one of `functions` (by name) is not callable."""
    for name, fn in functions.items():
        if not callable(fn):
            raise TypeError(f"ImplicitFunction: `{name}` must be callable, got {fn!r}.")


def check_concrete_shapes(inputs: tuple[PyTree, tuple, dict]) -> None:
    """Raises a `TypeError` when an array of the inputs `(x, args, kwargs)` has a
    symbolic dimension (`jax.export` with `symbolic_shape`): the library's checks and
    solver choices depend on the number of unknowns, which must be known when
    tracing."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(inputs)[0]:
        shape = getattr(leaf, "shape", ())
        if not all(isinstance(d, (int, np.integer)) for d in shape):
            name = ("x", "args", "kwargs")[path[0].idx] + jax.tree_util.keystr(path[1:])
            raise TypeError(
                f"implicitdiff.ImplicitFunction: the input {name} "
                f"has the symbolic shape {tuple(shape)}: shape-polymorphic export is "
                "not supported (the singularity thresholds, the checks and Auto's "
                "choice of solver depend on the number of unknowns). Export one "
                "program per size."
            )


def check_linear_solver(linear_solver) -> None:
    """Raises for a preconditioner or a lineax solver, naming the fix."""
    if isinstance(linear_solver, AbstractPreconditioner):
        raise TypeError(
            f"ImplicitFunction: {type(linear_solver).__name__} is a "
            "preconditioner, an approximate inverse: as the `linear_solver` its "
            "derivatives would be wrong. Pass it as the `preconditioner` of a "
            "Krylov solver, e.g. GMRES(preconditioner=...)."
        )
    if not isinstance(linear_solver, AbstractLinearSolver):
        raise TypeError(
            "ImplicitFunction: `linear_solver` must be an "
            f"implicitdiff.AbstractLinearSolver, got {linear_solver!r}. "
            "Wrap a lineax solver as implicitdiff.Lineax(solver)."
        )


def check_options(on_failure, check_conditions, has_byproduct) -> None:
    """Raises for an unknown policy, a tolerance that is not positive, or a
    `has_byproduct` that is not a bool."""
    if on_failure not in ON_FAILURE_CHOICES:
        raise ValueError(
            f"ImplicitFunction: `on_failure` must be one of {ON_FAILURE_CHOICES}, "
            f"got {on_failure!r}."
        )
    if check_conditions is not None and not _is_positive(check_conditions):
        raise TypeError(
            "ImplicitFunction: `check_conditions` must be a positive number (the "
            f"tolerance) or None (no check), got {check_conditions!r}."
        )
    if not isinstance(has_byproduct, bool):
        raise TypeError(
            f"ImplicitFunction: `has_byproduct` must be a bool, got {has_byproduct!r}."
        )


def split_output(output, has_byproduct: bool) -> tuple[PyTree, PyTree]:
    """The forward's output as `(y, z)` (`z = None` without a byproduct); raises
    when `y` is not a non-empty pytree of floating-point arrays (or structures)."""
    if not has_byproduct:
        y, z = output, None
    elif is_pair(output):
        y, z = output
    else:
        raise TypeError(
            "ImplicitFunction: with has_byproduct=True, `forward` must return a "
            f"tuple (y, z); it returned {type(output).__name__}."
        )
    leaves = jax.tree.leaves(y)
    if not leaves or not all(_is_inexact(leaf) for leaf in leaves):
        hint = (
            " It returned a tuple of two: if the second element is a byproduct, "
            "pass has_byproduct=True."
            if not has_byproduct and is_pair(output)
            else ""
        )
        if any(isinstance(leaf, (float, complex)) for leaf in leaves):
            hint += " Return arrays, not Python numbers: jnp.asarray(y)."

        raise TypeError(
            "ImplicitFunction: `forward` must return y as a non-empty pytree of "
            f"floating-point arrays; got {_structure_or_repr(y)}." + hint
        )
    return y, z


def is_pair(output) -> bool:
    return isinstance(output, tuple) and len(output) == 2


def check_conditions_output(
    conditions_fn: Callable, y, least_squares: bool, output_was_pair: bool
) -> None:
    """Raises at trace time when `c` cannot pair with `y`, and adds a hint to an
    exception raised by the conditions themselves."""
    try:
        c_struct = jax.eval_shape(conditions_fn)
    except Exception as error:
        if output_was_pair:
            error.add_note(
                "(implicitdiff: the forward returned a tuple of two: if the second "
                "element is a byproduct, pass has_byproduct=True to ImplicitFunction, "
                "so that y is the first and the conditions receive (x, y, z, *args))"
            )
        raise
    y_struct = structure(y)
    c_leaves, y_leaves = jax.tree.leaves(c_struct), jax.tree.leaves(y_struct)
    if least_squares:
        same = all(jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in c_leaves)
        if same and size(c_struct) < size(y_struct):
            raise ValueError(
                f"ImplicitFunction: LeastSquares needs at least as many conditions as "
                f"unknowns, got {size(c_struct)} conditions for {size(y_struct)} "
                f"unknowns: the solution of fewer equations is not unique, and it has "
                f"no derivative. Add conditions that fix it (a regulariser's "
                f"gradient, say)."
            )
    else:
        same = jax.tree.structure(c_struct) == jax.tree.structure(y_struct) and all(
            a.shape == b.shape and a.dtype == b.dtype
            for a, b in zip(c_leaves, y_leaves, strict=True)
        )
    if not same:
        hint = (
            " The forward returned a tuple of two: if the second element is a "
            "byproduct, pass has_byproduct=True."
            if output_was_pair
            else ""
        )
        raise ValueError(
            "ImplicitFunction: `conditions` must return c with the same pytree "
            "structure, shapes and dtypes as y (a square system); "
            f"y is {y_struct} but c is {c_struct}. "
            "For more conditions than unknowns use linear_solver=LeastSquares()." + hint
        )


def conditions_failed(c: PyTree, y: PyTree, tolerance: float) -> Bool[Array, ""]:
    """Whether ‖c(x, y)‖ > tol·(1 + ‖y‖): a forward that stopped early must not yield
    outputs or derivatives that look fine. A non-finite `y` fails too: with
    `‖y‖ = inf` the test itself would pass. `tol` is at least 8ε of the least
    precise floating dtype of `y`: rounding alone puts a bfloat16 `y` (ε = 2⁻⁷) past
    the default 1e-3."""
    epsilons = [jnp.finfo(leaf.dtype).eps for leaf in jax.tree.leaves(y)]
    tolerance = max([tolerance] + [8 * float(eps) for eps in epsilons])
    norm_c, norm_y = tree_norms(c, y)
    satisfied = norm_c <= tolerance * (1 + norm_y)
    return ~(satisfied & jnp.isfinite(norm_y))


def announce_failed_conditions(
    failed: Bool[Array, ""],
    tolerance: float,
    on_failure: OnFailure,
    forward: Callable,
    site: Site,
) -> Bool[Array, ""]:
    """`failed` (from `conditions_failed`), after warning or raising as
    `on_failure` says when it holds."""
    # A forward of the library (argmin's optimiser loop) says what failed itself.
    describe = getattr(forward, "implicitdiff_failure_message", None)
    if callable(describe):
        return announce(failed, on_failure, describe(), site)
    message = (
        f"implicitdiff: the output of the forward {name_of(forward)} is not finite "
        f"or does not satisfy the conditions: ‖c(x, y)‖ > {tolerance:g}·(1 + ‖y‖); "
        "every output and every derivative is NaN. Make the forward converge "
        "further, or loosen the check (check_conditions=tol, or None to turn it "
        "off)."
    )
    return announce(failed, on_failure, message, site)


def _is_positive(value) -> bool:
    return (
        isinstance(value, (int, float, np.floating, np.integer))
        and not isinstance(value, bool)
        and 0 < value < float("inf")
    )


def _is_inexact(leaf) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _structure_or_repr(tree):
    try:
        return structure(tree)
    except Exception:
        return repr(tree)
