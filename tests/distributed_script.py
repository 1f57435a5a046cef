"""One process of a multi-process run through `jax.distributed`, for
tests/test_distributed.py and docs/scaling.md.

Started once per process (tests/distributed_launch.sh starts two on this machine):

    python tests/distributed_script.py --coordinator HOST:PORT --processes 2
        --process-id I --out FOLDER

Each process has 2 CPU devices; together they form one global mesh of 4. Two
implicit functions run on it: a batch of small problems sharded over the batch axis,
and one 2D stencil problem of 102 400 unknowns whose rows are sharded across the
processes, differentiated through `GMRES` and `CG`. Each process writes to FOLDER
what it holds of every output (`process-I.npz`: its shards and their places in the
global array) and `process-I.json`: the shardings of the outputs and every collective
of the compiled programs, with its size. The calling test puts the shards together
and compares them with the same programs run in one process.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
import scipy.sparse.linalg
from sharding_script import M, batch_conditions, batch_forward  # tests/ is on the path

import implicitdiff as idf

jax.config.update("jax_enable_x64", True)

DEVICES_PER_PROCESS = 2
CANNOT_START = 77  # the exit status when this platform cannot run the processes

# --- A batch of small problems, sharded over the batch axis --------------------------
# The problem of the single-process sharding tests: c(x, y) = M y + 0.1 tanh(y) − x.
BATCH = 16


def batch_program(X, V):
    """Values, Jacobians and JVPs of the whole batch."""
    f = idf.ImplicitFunction(batch_forward, batch_conditions)
    Y, T = jax.vmap(lambda x, v: jax.jvp(f, (x,), (v,)))(X, V)
    return {"y": Y, "jacobian": jax.vmap(jax.jacrev(f))(X), "jvp": T}


def batch_reference(X, V) -> dict[str, np.ndarray]:
    """`batch_program`'s outputs, with NumPy."""
    Y = np.zeros_like(X)
    for _ in range(20):
        jacobians = M + 0.1 * np.stack([np.diag(1 - np.tanh(y) ** 2) for y in Y])
        residuals = Y @ M.T + 0.1 * np.tanh(Y) - X
        Y = Y - np.linalg.solve(jacobians, residuals[..., None])[..., 0]
    J = np.linalg.inv(M + 0.1 * np.stack([np.diag(1 - np.tanh(y) ** 2) for y in Y]))
    return {"y": Y, "jacobian": J, "jvp": np.einsum("bij,bj->bi", J, V)}


# --- One large matrix-free problem whose vectors are sharded --------------------------
# c(x, y) = (I + 0.1 L) y + 0.1 tanh(y) − x on a SIDE × SIDE grid, L the 5-point
# Laplacian with zero boundary values: A = I + 0.1 L + 0.1 diag(sech²y) is symmetric
# with eigenvalues in [1, 1.9], so CG and GMRES need a dozen steps or so.
SIDE = 320  # 102 400 unknowns
# Solved to near rounding, the derivatives can be compared with an exact reference.
RTOL = 1e-14


def laplacian(y):
    # `jnp.pad` of a shifted grid: a halo exchange of one row once rows are sharded.
    return (
        4 * y
        - jnp.pad(y[1:], ((0, 1), (0, 0)))
        - jnp.pad(y[:-1], ((1, 0), (0, 0)))
        - jnp.pad(y[:, 1:], ((0, 0), (0, 1)))
        - jnp.pad(y[:, :-1], ((0, 0), (1, 0)))
    )


def field_conditions(x, y):
    return y + 0.1 * laplacian(y) + 0.1 * jnp.tanh(y) - x


def field_forward(x):
    # Richardson iteration, contracting by 0.31 a step: converged to rounding in 40.
    step = lambda _, y: y - field_conditions(x, y) / 1.45
    return jax.lax.fori_loop(0, 40, step, jnp.zeros_like(x))


def field_program(solver):
    """Value, gradient (a VJP: Aᵀ solves) and JVP (A solves) through `solver`."""
    f = idf.ImplicitFunction(field_forward, field_conditions, linear_solver=solver)
    weights = jnp.asarray(field_weights())

    def program(x, v):
        y, t = jax.jvp(f, (x,), (v,))
        gradient = jax.grad(lambda x: jnp.sum(weights * jnp.sin(f(x))))(x)
        return {"y": y, "grad": gradient, "jvp": t}

    return program


def field_weights():
    rows, columns = np.mgrid[0:SIDE, 0:SIDE]
    return np.cos(rows / 10.0) * np.sin(columns / 13.0)


def field_reference(x, v) -> dict[str, np.ndarray]:
    """`field_program`'s outputs, with NumPy and a SciPy sparse matrix."""
    path = scipy.sparse.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(SIDE, SIDE))
    eye = scipy.sparse.identity(SIDE)
    L = (scipy.sparse.kron(path, eye) + scipy.sparse.kron(eye, path)).tocsr()
    x = x.ravel()
    y = np.zeros_like(x)
    for _ in range(60):
        y = y - (y + 0.1 * (L @ y) + 0.1 * np.tanh(y) - x) / 1.45
    sech2 = scipy.sparse.diags(1 - np.tanh(y) ** 2)
    A = (scipy.sparse.identity(SIDE**2) + 0.1 * L + 0.1 * sech2).tocsr()

    def solve(b):  # A is symmetric: also the solve with Aᵀ of the gradient
        solution, info = scipy.sparse.linalg.cg(A, b.ravel(), rtol=1e-15, atol=0)
        assert info == 0, info
        return solution.reshape(SIDE, SIDE)

    # B = ∂c/∂x = −I, so dy/dx = A⁻¹.
    gradient = solve(field_weights().ravel() * np.cos(y))
    return {"y": y.reshape(SIDE, SIDE), "grad": gradient, "jvp": solve(v)}


# --- Inputs and programs, the same in every process and in the reference --------------


def inputs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Program name → its (point, tangent), as NumPy arrays."""
    rng = np.random.default_rng(1)
    batch = rng.normal(size=(BATCH, 3)), rng.normal(size=(BATCH, 3))
    rows, columns = np.mgrid[0:SIDE, 0:SIDE]
    field = np.sin(rows / 7.0) * np.cos(columns / 5.0), np.cos(rows / 3.0 + columns)
    return {"batch": batch, "GMRES": field, "CG": field}


def programs() -> dict:
    """Program name → (program, the type of its mesh axis). The batch runs on the
    default mesh of `jax.make_mesh`, explicitly sharded; the stencil's slices of a
    sharded axis are not implemented in explicit mode (jax 0.10), so the grid's mesh
    leaves the sharding of intermediates to XLA (`AxisType.Auto`)."""
    auto = jax.sharding.AxisType.Auto
    return {
        "batch": (batch_program, jax.sharding.AxisType.Explicit),
        "GMRES": (field_program(idf.GMRES(rtol=RTOL, restart=5)), auto),
        "CG": (field_program(idf.CG(rtol=RTOL)), auto),
    }


def collectives(hlo: str) -> list[tuple[str, int]]:
    """Every collective of a compiled program, with the elements of its result."""
    ops = "all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter"
    pattern = rf"= \S+?\[([\d,]*)\]\S* ({ops})(?:-start)?\("
    return [
        (op, int(np.prod([int(d) for d in dims.split(",") if d])))
        for dims, op in re.findall(pattern, hlo)
    ]


# --8<-- [start:run]
def run(out: Path) -> None:
    """Every program on the global mesh; this process's shards and a report to `out`."""
    shards, report = {}, {"process": jax.process_index(), "programs": {}}
    for name, (program, axis_type) in programs().items():
        # One mesh over the devices of every process.
        mesh = jax.make_mesh((jax.device_count(),), ("shard",), axis_types=(axis_type,))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("shard"))
        # Each process builds only the blocks its own devices hold.
        args = [
            jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i])
            for a in inputs()[name]
        ]
        compiled = jax.jit(program).lower(*args).compile()
        outputs = compiled(*args)
        report["programs"][name] = {
            "sharded": {
                key: value.sharding.is_equivalent_to(sharding, value.ndim)
                for key, value in outputs.items()
            },
            "collectives": collectives(compiled.as_text()),
        }
        for key, value in outputs.items():
            for shard in value.addressable_shards:
                place = ",".join(f"{s.start}:{s.stop}" for s in shard.index[:1])
                shards[f"{name}/{key}/{place}"] = np.asarray(shard.data)
    np.savez(out / f"process-{jax.process_index()}.npz", **shards)
    (out / f"process-{jax.process_index()}.json").write_text(json.dumps(report))
    # --8<-- [end:run]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True, help="HOST:PORT of process 0")
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    # --8<-- [start:initialize]
    jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.processes,
        process_id=args.process_id,
    )
    # --8<-- [end:initialize]
    try:
        jax.devices()  # the CPU backend and its collectives start here
    except RuntimeError as error:  # e.g. a jaxlib built without Gloo
        print(f"cannot start the CPU collectives: {error}", file=sys.stderr)
        sys.exit(CANNOT_START)
    args.out.mkdir(parents=True, exist_ok=True)
    run(args.out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
