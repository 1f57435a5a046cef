"""Sharded runs of implicit functions, for tests/test_sharding.py.

Run in a subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=4` and
`JAX_PLATFORMS=cpu` (the device count is fixed when JAX starts, hence the subprocess).
Prints one JSON object: for each case, the largest differences to the same program on
one device and to an independent reference, whether the outputs keep the input's
sharding, and every collective in the compiled program with its size.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import implicitdiff as idf

jax.config.update("jax_enable_x64", True)

POLICIES = ("nan", "warn", "raise")
DEVICES = 4

# --- A batch of small problems, sharded over the batch axis --------------------------
# c(x, y) = M y + 0.1 tanh(y) − x, so dy/dx = (M + 0.1 diag(1 − tanh²y))⁻¹.
M = np.eye(3) * 2 + np.random.default_rng(0).normal(size=(3, 3)) / 3


def batch_conditions(x, y):
    return M @ y + 0.1 * jnp.tanh(y) - x


def batch_forward(x):
    def newton(_, y):
        jacobian = M + 0.1 * jnp.diag(1 - jnp.tanh(y) ** 2)
        return y - jnp.linalg.solve(jacobian, batch_conditions(x, y))

    return jax.lax.fori_loop(0, 20, newton, jnp.zeros_like(x))


def batch_reference(X, Y):
    """dy/dx for every problem of the batch, and its product with x, with NumPy."""
    jacobians = np.stack(
        [np.linalg.inv(M + 0.1 * np.diag(1 - np.tanh(y) ** 2)) for y in Y]
    )
    return jacobians, np.einsum("bij,bj->bi", jacobians, X)


# --- One large matrix-free problem whose vectors are sharded --------------------------
# c(x, y) = T y + 0.1 tanh(y) − x with T = tridiag(−1, 4, −1): A = T + 0.1 diag(sech²y)
# is symmetric positive definite, so CG applies as well as GMRES. The stencil uses
# `jnp.pad` (a halo exchange once sharded): XLA all-gathers a `jnp.concatenate` with
# zeros inside a loop.
N = 4096


def stencil(y):
    return 4 * y - jnp.pad(y[:-1], (1, 0)) - jnp.pad(y[1:], (0, 1))


def field_conditions(x, y):
    return stencil(y) + 0.1 * jnp.tanh(y) - x


def field_forward(x):
    # Damped fixed-point iteration: a contraction, converged to rounding in 200 steps.
    return jax.lax.fori_loop(
        0, 200, lambda _, y: y - field_conditions(x, y) / 4.5, jnp.zeros_like(x)
    )


def field_reference(y, v):
    """Aᵀ⁻¹ v with a banded solve: the gradient of Σ v·y, as A = Aᵀ and B = −I."""
    bands = np.zeros((3, N))
    bands[0, 1:] = -1
    bands[1] = 4 + 0.1 * (1 - np.tanh(y) ** 2)
    bands[2, :-1] = -1
    return scipy.linalg.solve_banded((1, 1), bands, v)


def collectives(compiled) -> list[tuple[str, int]]:
    """Every collective of a compiled program, with the elements of its result."""
    ops = "all-gather|all-reduce|all-to-all|collective-permute"
    pattern = rf"= \S+?\[([\d,]*)\]\S* ({ops})\("
    return [
        (op, int(np.prod([int(d) for d in dims.split(",") if d])))
        for dims, op in re.findall(pattern, compiled.as_text())
    ]


def run_sharded(fn, *args):
    """Compiles `fn` for the sharded `args` once: its outputs, and its collectives."""
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled(*args), collectives(compiled)


def keeps(sharding, *arrays) -> list[bool]:
    return [array.sharding.is_equivalent_to(sharding, array.ndim) for array in arrays]


def largest(*pairs) -> float:
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs)


def logged(fn, reference, sharding, *args):
    """`fn` compiled and run inside a SolveLog: same result, still sharded?"""
    with idf.SolveLog() as log:
        out, found = run_sharded(fn, *args)
    return {
        "sharded": keeps(sharding, out),
        "collectives": found,
        "vs_unlogged": largest((out, reference)),
        "entries": len(log),
        "statuses": sorted({entry.status for entry in log}),
        "batches": [entry.batch for entry in log],
        "residual": max(entry.residual for entry in log),
    }


def batch_case(policy, X, X_sharded, sharding):
    f = idf.ImplicitFunction(batch_forward, batch_conditions, on_failure=policy)
    jacobian = jax.vmap(jax.jacrev(f))
    J, found = run_sharded(jacobian, X_sharded)
    result = {"sharded": keeps(sharding, J), "collectives": found}
    if policy != "nan":
        return result  # the same computation: only where its data lives differs
    value = jax.vmap(f)
    jvp = jax.vmap(lambda x, v: jax.jvp(f, (x,), (v,))[1])
    y, found_y = run_sharded(value, X_sharded)
    t, found_t = run_sharded(jvp, X_sharded, X_sharded)
    y_one, J_one, t_one = jax.jit(value)(X), jax.jit(jacobian)(X), jax.jit(jvp)(X, X)
    J_ref, t_ref = batch_reference(np.asarray(X), np.asarray(y_one))
    result["vs_one_device"] = largest((y, y_one), (J, J_one), (t, t_one))
    result["vs_reference"] = largest((J, J_ref), (t, t_ref))
    result["sharded"] += keeps(sharding, y, t)
    result["collectives"] += found_y + found_t
    result["logged"] = logged(jacobian, J, sharding, X_sharded)
    return result


def explicit_case(X):
    """The batch on a mesh whose axis is `Explicit` (types carry the sharding), as in
    tests/distributed_script.py, with and without a SolveLog, for both derivative
    directions and both dense representations."""
    mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(AxisType.Explicit,))
    sharding = NamedSharding(mesh, P("batch"))
    X_sharded = jax.device_put(X, sharding)
    results = {}
    for representation in ("operator", "matrix"):
        f = idf.ImplicitFunction(
            batch_forward, batch_conditions, representation=representation
        )
        for name, jacobian in [("jacrev", jax.jacrev(f)), ("jacfwd", jax.jacfwd(f))]:
            batched = jax.vmap(jacobian)
            J, _ = run_sharded(batched, X_sharded)
            results[f"{representation}-{name}"] = {
                "vs_one_device": largest((J, jax.jit(batched)(X))),
                "logged": logged(batched, J, sharding, X_sharded),
            }
    return results


def field_case(solver, policy, with_log, x, x_sharded, sharding, reference):
    f = idf.ImplicitFunction(
        field_forward, field_conditions, linear_solver=solver, on_failure=policy
    )
    w = jnp.cos(jnp.arange(N) / 10.0)
    grad = jax.grad(lambda x: jnp.sum(w * jnp.sin(f(x))))
    g, found = run_sharded(grad, x_sharded)
    result = {"sharded": keeps(sharding, g), "collectives": found}
    if policy == "nan":
        result["vs_one_device"] = largest((g, jax.jit(grad)(x)))
        scale = float(np.max(np.abs(reference)))
        result["vs_reference"] = largest((g, reference)) / scale
    if with_log:
        result["logged"] = logged(grad, g, sharding, x_sharded)
    return result


def main():
    assert jax.device_count() == DEVICES, jax.devices()
    one_device = jax.devices()[0]

    batch_mesh = Mesh(np.array(jax.devices()), ("batch",))
    batch_sharding = NamedSharding(batch_mesh, P("batch"))
    X = jnp.asarray(np.random.default_rng(1).normal(size=(8, 3)))
    X_one, X_sharded = jax.device_put(X, one_device), jax.device_put(X, batch_sharding)

    field_mesh = Mesh(np.array(jax.devices()), ("space",))
    field_sharding = NamedSharding(field_mesh, P("space"))
    x = jnp.sin(jnp.arange(N) / 7.0)
    x_one, x_sharded = jax.device_put(x, one_device), jax.device_put(x, field_sharding)
    y = np.asarray(jax.jit(field_forward)(x_one))
    reference = field_reference(y, np.cos(np.arange(N) / 10.0) * np.cos(y))

    results = {
        "batch": {
            policy: batch_case(policy, X_one, X_sharded, batch_sharding)
            for policy in POLICIES
        },
        "explicit": explicit_case(X_one),
        "field": {
            f"{type(solver).__name__}-{policy}": field_case(
                solver, policy, with_log, x_one, x_sharded, field_sharding, reference
            )
            for solver, policy, with_log in [
                (idf.GMRES(), "nan", False),
                (idf.CG(), "nan", True),
                (idf.CG(), "warn", False),
            ]
        },
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
