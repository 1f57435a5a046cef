"""A deep equilibrium layer in Equinox, trained with optax.

The layer's output is the fixed point `z* = tanh(W z* + U x + b)`, found by iterating
the map. Backpropagating through the iterations stores every iterate: memory and time
grow with their number. The implicit function theorem differentiates the fixed point
from its condition `c(x, z) = z - tanh(W z + U x + b) = 0` alone, at a cost that does
not depend on how the fixed point was found.

Here the conditions are an `equinox.Module`, the `Cell`, that holds the parameters:
an `ImplicitFunction` differentiates the floating-point arrays of its conditions, so
`eqx.filter_grad` of the loss reaches `W`, `U` and `b` through the implicit rule.
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import matplotlib.ticker as ticker
import numpy as np
import optax
from _common import QUICK, Checks, save_figure
from jax import lax

import implicitdiff as idf

jax.config.update("jax_enable_x64", True)

HIDDEN = 32
BATCH = 64 if QUICK else 256
TRAIN_STEPS = 200 if QUICK else 400
TOLERANCE = 1e-12  # training solves the equilibrium to this residual
BENCHMARK_ITERATIONS = (5, 40) if QUICK else (5, 10, 20, 40, 80, 160)
CONTRACTION = 0.9  # bound on the spectral norm of the effective W


class Cell(eqx.Module):
    """The map f(z, x) = tanh(W z + U x + b); calling the cell gives z - f(z, x)."""

    W: jax.Array
    U: jax.Array
    b: jax.Array

    def __init__(self, d_in, hidden, key):
        k_w, k_u = jax.random.split(key)
        self.W = jax.random.normal(k_w, (hidden, hidden)) / hidden
        self.U = jax.random.normal(k_u, (hidden, d_in))
        self.b = jnp.zeros(hidden)

    def f(self, z, x):
        # ‖W‖₂ ≤ ‖W‖_F ≤ CONTRACTION < 1 and tanh is 1-Lipschitz: f contracts in z,
        # so the fixed point exists, is unique, and ∂c/∂z = I - ∂f/∂z is invertible.
        W = CONTRACTION * self.W / jnp.maximum(1.0, jnp.linalg.norm(self.W))
        return jnp.tanh(W @ z + self.U @ x + self.b)

    def __call__(self, x, z):  # the conditions of the implicit function
        return z - self.f(z, x)


def fixed_point(cell, iterations, x):
    """`iterations` steps of z ← f(z, x) from z = 0, or with `iterations=None` as many
    as it takes to reach |z - f(z, x)| ≤ TOLERANCE (a while_loop: not unrollable)."""
    z0 = jnp.zeros(cell.b.shape)
    if iterations is not None:
        return lax.fori_loop(0, iterations, lambda _, z: cell.f(z, x), z0)

    def unconverged(z_and_fz):
        z, fz = z_and_fz
        return jnp.max(jnp.abs(z - fz)) > TOLERANCE

    return lax.while_loop(
        unconverged, lambda zf: (zf[1], cell.f(zf[1], x)), (z0, cell.f(z0, x))
    )[1]


class DEQClassifier(eqx.Module):
    cell: Cell
    readout: eqx.nn.Linear
    iterations: int | None = eqx.field(static=True)
    implicit: bool = eqx.field(static=True)

    def __call__(self, x):
        if self.implicit:
            forward = eqx.Partial(fixed_point, self.cell, self.iterations)
            # A fixed iteration count (the memory comparison) stops short of the
            # fixed point on purpose: the default condition check would refuse it.
            checked = {} if self.iterations is None else {"check_conditions": None}
            z = idf.ImplicitFunction(forward, self.cell, **checked)(x)
        else:  # backpropagation through the unrolled iterations
            z = fixed_point(self.cell, self.iterations, x)
        return self.readout(z)


def make_model(key, iterations, implicit):
    k_cell, k_out = jax.random.split(key)
    cell = Cell(2, HIDDEN, k_cell)
    readout = eqx.nn.Linear(HIDDEN, 2, key=k_out)
    return DEQClassifier(cell, readout, iterations, implicit)


def with_forward(model, iterations, implicit):
    """The same parameters with another forward or backward."""
    return DEQClassifier(model.cell, model.readout, iterations, implicit)


def two_spirals(key, n):
    """Two interleaved spirals: not linearly separable, a small nonlinear task."""
    k_t, k_label, k_noise = jax.random.split(key, 3)
    t = jax.random.uniform(k_t, (n,), minval=0.25, maxval=1.0) * 3 * jnp.pi
    label = jax.random.bernoulli(k_label, 0.5, (n,)).astype(jnp.int32)
    angle = t + jnp.pi * label
    x = jnp.stack([t * jnp.cos(angle), t * jnp.sin(angle)], axis=1) / (3 * jnp.pi)
    return x + 0.02 * jax.random.normal(k_noise, x.shape), label


def loss_fn(model, x, label):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()


grad_fn = eqx.filter_jit(eqx.filter_grad(loss_fn))


def accuracy(model, x, label):
    return jnp.mean(jnp.argmax(jax.vmap(model)(x), axis=1) == label)


def train(model, data_key):
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, key):
        x, label = two_spirals(key, BATCH)
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, label)
        updates, opt_state = optimizer.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, loss

    losses = []
    for key in jax.random.split(data_key, TRAIN_STEPS):
        model, opt_state, loss = step(model, opt_state, key)
        losses.append(float(loss))
    return model, losses


def measure_gradient(model, x, label, repeats=20):
    """Peak memory (bytes, from XLA's memory analysis of the compiled gradient) and
    fastest time (seconds) of one gradient evaluation: the least disturbed by other
    processes on a shared machine."""
    params, static = eqx.partition(model, eqx.is_array)
    grad = lambda params, x, label: eqx.filter_grad(loss_fn)(
        eqx.combine(params, static), x, label
    )
    compiled = jax.jit(grad).lower(params, x, label).compile()
    stats = compiled.memory_analysis()
    memory = (
        stats.temp_size_in_bytes
        + stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
    )
    jax.block_until_ready(compiled(params, x, label))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, x, label))
        times.append(time.perf_counter() - start)
    return memory, min(times)


def max_tree_difference(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in pairs)


def main():
    checks = Checks()
    key_model, key_data, key_test = jax.random.split(jax.random.key(0), 3)
    model = make_model(key_model, None, implicit=True)
    x_test, label_test = two_spirals(key_test, 2000)

    start = time.perf_counter()
    model, losses = train(model, key_data)
    print(
        f"trained {TRAIN_STEPS} steps in {time.perf_counter() - start:.1f} s, "
        f"final loss {losses[-1]:.3f}"
    )
    test_accuracy = float(accuracy(model, x_test, label_test))
    checks.true(
        "DEQ learns the two spirals",
        test_accuracy > 0.9,
        f"test accuracy {test_accuracy:.3f}",
    )

    z_star = jax.vmap(lambda x: fixed_point(model.cell, None, x))(x_test)
    residual = jnp.max(jnp.abs(jax.vmap(model.cell)(x_test, z_star)))
    checks.error("equilibrium residual |z - f(z, x)| after training", residual, 1e-11)

    # The implicit gradient equals backpropagation through a converged iteration.
    x, label = two_spirals(key_data, BATCH)
    implicit_grad = grad_fn(model, x, label)
    unrolled_grad = grad_fn(with_forward(model, 1000, False), x, label)
    checks.error(
        "implicit gradient vs backprop through 1000 iterations",
        max_tree_difference(implicit_grad, unrolled_grad),
        1e-10,
    )

    print(
        f"{'iterations':>10} {'implicit MB':>12} {'unrolled MB':>12} "
        f"{'implicit ms':>12} {'unrolled ms':>12}"
    )
    rows = []
    for n in BENCHMARK_ITERATIONS:
        implicit = measure_gradient(with_forward(model, n, True), x, label)
        unrolled = measure_gradient(with_forward(model, n, False), x, label)
        rows.append(
            (
                n,
                implicit[0] / 2**20,
                unrolled[0] / 2**20,
                1e3 * implicit[1],
                1e3 * unrolled[1],
            )
        )
        print("{:>10} {:>12.2f} {:>12.2f} {:>12.2f} {:>12.2f}".format(*rows[-1]))
    n, mem_implicit, mem_unrolled, t_implicit, t_unrolled = map(
        np.array, zip(*rows, strict=True)
    )
    checks.true(
        "implicit memory does not grow with the iterations",
        mem_implicit.max() <= 1.1 * mem_implicit.min(),
        f"{mem_implicit.min():.2f}-{mem_implicit.max():.2f} MB",
    )
    checks.true(
        "unrolled memory grows with the iterations",
        mem_unrolled[-1] > 2 * mem_unrolled[0],
        f"{mem_unrolled[0]:.2f} -> {mem_unrolled[-1]:.2f} MB",
    )

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
    grid = jnp.linspace(-1.1, 1.1, 120)
    gx, gy = jnp.meshgrid(grid, grid)
    points = jnp.stack([gx.ravel(), gy.ravel()], axis=1)
    p = jax.nn.softmax(jax.vmap(model)(points), axis=1)[:, 1].reshape(gx.shape)
    axes[0].contourf(gx, gy, p, levels=20, cmap="RdBu_r", alpha=0.6)
    axes[0].scatter(*x_test[:400].T, c=label_test[:400], cmap="RdBu_r", s=6)
    axes[0].set(
        title=f"DEQ decision (test accuracy {test_accuracy:.2f})",
        aspect="equal",
        xticks=[],
        yticks=[],
    )
    panels = [
        (
            axes[1],
            mem_unrolled,
            mem_implicit,
            "peak memory of a gradient (MB)",
            "Memory",
        ),
        (axes[2], t_unrolled, t_implicit, "time per gradient (ms)", "Time (CPU)"),
    ]
    for axis, unrolled, implicit, ylabel, title in panels:
        axis.plot(n, unrolled, "o-", label="backprop through iterations")
        axis.plot(n, implicit, "s-", label="implicit (idf.ImplicitFunction)")
        axis.set(
            xscale="log",
            yscale="log",
            xlabel="forward iterations",
            ylabel=ylabel,
            title=title,
        )
        # The measured counts as ticks, in plain numbers (not 4×10¹).
        axis.set_xticks(n, [str(k) for k in n])
        axis.xaxis.set_minor_locator(ticker.NullLocator())
        axis.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        axis.yaxis.set_minor_formatter(ticker.NullFormatter())
    axes[1].legend()
    table = {
        "forward iterations": [int(k) for k in n],
        "implicit: peak memory (MB)": [round(m, 2) for m in mem_implicit.tolist()],
        "unrolled: peak memory (MB)": [round(m, 2) for m in mem_unrolled.tolist()],
        "implicit: time (ms)": [round(t, 1) for t in t_implicit.tolist()],
        "unrolled: time (ms)": [round(t, 1) for t in t_unrolled.tolist()],
    }
    print("the table of docs/examples/deep_equilibrium.md:")
    for row, values in table.items():
        print(f"| {row} | " + " | ".join(f"{v:g}" for v in values) + " |")
    save_figure(fig, "deep_equilibrium", {"table": table, "batch": BATCH})
    checks.finish()


if __name__ == "__main__":
    main()
