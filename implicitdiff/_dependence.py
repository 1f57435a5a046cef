"""Which outputs of a function depend on which inputs, read from its jaxpr at trace
time (no evaluation, no differentiation). Used to find a byproduct `z` that the
forward computes from the differentiated inputs: the implicit rule holds `z`
constant, which is wrong when the conditions read it.

Conservative: an output is reported dependent unless the jaxpr shows it is not. Loops
and branches are followed (`while`, `scan`, `cond`, nested `jit`); `stop_gradient`
cuts a dependence, which is how a user says that it does not matter."""

from collections.abc import Callable, Sequence

import jax
from jax.extend import core as jex_core


def outputs_depending(fn: Callable, leaves: Sequence, moving: Sequence[bool]):
    """For each output leaf of `fn(*leaves)`, whether it depends on a leaf marked in
    `moving`."""
    closed = jax.make_jaxpr(fn)(*leaves)
    return _propagate(closed.jaxpr, [False] * len(closed.jaxpr.constvars) + [*moving])


def _propagate(jaxpr, dependent_inputs: list[bool]) -> list[bool]:
    """Forward propagation of "depends on a moving input" through `jaxpr`, whose
    constvars and invars (in that order) are marked by `dependent_inputs`."""
    dependent = {
        id(v)
        for v, d in zip(
            [*jaxpr.constvars, *jaxpr.invars], dependent_inputs, strict=True
        )
        if d
    }

    def marked(v) -> bool:
        return not isinstance(v, jex_core.Literal) and id(v) in dependent

    for eqn in jaxpr.eqns:
        marks = [marked(v) for v in eqn.invars]
        if not any(marks):
            continue
        for v, d in zip(eqn.outvars, _equation(eqn, marks), strict=True):
            if d:
                dependent.add(id(v))
    return [marked(v) for v in jaxpr.outvars]


def _equation(eqn, marks: list[bool]) -> list[bool]:
    name, params = eqn.primitive.name, eqn.params
    everything = [True] * len(eqn.outvars)
    if name == "stop_gradient":
        return [False] * len(eqn.outvars)
    if name == "while":
        return _while(params, marks)
    if name == "scan":
        return _scan(params, marks)
    if name == "cond":
        if marks[0]:  # the branch taken depends on a moving input
            return everything
        branches = [_propagate_closed(b, marks[1:]) for b in params["branches"]]
        return [any(outs) for outs in zip(*branches, strict=True)]
    inner = params.get("jaxpr", params.get("call_jaxpr"))
    if inner is not None and len(_invars(inner)) == len(marks):
        outs = _propagate_closed(inner, marks)
        if len(outs) == len(eqn.outvars):
            return outs
    return everything


def _while(params, marks: list[bool]) -> list[bool]:
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    body_consts, carry = marks[n_cond : n_cond + n_body], marks[n_cond + n_body :]
    carry = _fixed_point(
        lambda c: _propagate_closed(params["body_jaxpr"], [*body_consts, *c]), carry
    )
    if any(_propagate_closed(params["cond_jaxpr"], [*marks[:n_cond], *carry])):
        # The trip count depends on a moving input: so does every carry the body
        # changes (only the ones it passes through unchanged do not).
        return [
            d or not _passes_through(params["body_jaxpr"], n_body, i)
            for i, d in enumerate(carry)
        ]
    return carry


def _scan(params, marks: list[bool]) -> list[bool]:
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    consts = marks[:n_consts]
    carry, xs = marks[n_consts : n_consts + n_carry], marks[n_consts + n_carry :]
    body = lambda c: _propagate_closed(params["jaxpr"], [*consts, *c, *xs])[:n_carry]
    carry = _fixed_point(body, carry)
    return _propagate_closed(params["jaxpr"], [*consts, *carry, *xs])


def _fixed_point(step: Callable, carry: list[bool]) -> list[bool]:
    """The least marking `c ⊇ carry` with `step(c) ⊆ c` (at most len(carry) rounds:
    each round adds a mark or stops)."""
    while True:
        grown = [a or b for a, b in zip(carry, step(carry), strict=True)]
        if grown == carry:
            return carry
        carry = grown


def _passes_through(closed_body, n_consts: int, i: int) -> bool:
    body = closed_body.jaxpr
    return body.outvars[i] is body.invars[n_consts + i]


def _propagate_closed(closed, marks: list[bool]) -> list[bool]:
    jaxpr = getattr(closed, "jaxpr", closed)
    return _propagate(jaxpr, [False] * len(jaxpr.constvars) + list(marks))


def _invars(closed):
    return getattr(closed, "jaxpr", closed).invars
