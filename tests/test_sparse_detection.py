"""Sparsity detection ("auto"): the detected pattern against the nonzeros of a dense
Jacobian (jax.jacfwd at a random point)."""

import functools as ft
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from implicitdiff._sparse import _detect as _detect_module
from implicitdiff._sparse._detect import detect_sparsity

jax.config.update("jax_enable_x64", True)

N = 6  # grid side
RNG = np.random.default_rng(0)


def stencil_pad(y):
    p = jnp.pad(y, 1)
    laplacian = 4 * y - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]
    return laplacian + y**3


def stencil_roll(y):
    neighbours = sum(jnp.roll(y, s, axis) for s in (-1, 1) for axis in (0, 1))
    return 4 * y - neighbours + jnp.sin(y)


def tridiagonal(y):
    interior = -y[:-2] + 2 * y[1:-1] - y[2:]
    return jnp.concatenate([2 * y[:1] - y[1:2], interior, 2 * y[-1:] - y[-2:-1]]) * y


BLOCK = RNG.normal(size=(4, 4))
BLOCKS = RNG.normal(size=(3, 4, 4)) * (RNG.random((3, 4, 4)) < 0.5)


def block_diagonal(y):
    shared = jnp.einsum("ij,bj->bi", BLOCK, y.reshape(3, 4))
    own = jnp.einsum("bij,bj->bi", BLOCKS, jnp.tanh(y).reshape(3, 4))
    return (shared + own).ravel() + y**3


EDGES = RNG.integers(0, 20, size=(2, 40))
DEGREE = np.bincount(EDGES[1], minlength=20)


def graph_laplacian(y):
    src, dst = EDGES
    incoming = jnp.zeros_like(y).at[dst].add(y[src])
    return DEGREE * y - incoming + y**3


MIX = RNG.normal(size=(5, 20)) * (RNG.random((5, 20)) < 0.3)


def assorted(y):
    """cumsum, reductions, transposes, reversal, masks, dynamic slices, a sparse
    constant matrix, a nested jit and a checkpoint."""
    a = jnp.cumsum(y[:5]) + jnp.flip(y[5:10]) + y[10:20].reshape(2, 5).T.ravel()[:5]
    b = jnp.where(np.arange(5) % 2 == 0, y[:5], 2 * y[15:]) + MIX @ y
    c = lax.dynamic_slice(y, (7,), (5,)) * jnp.sum(y[18:])
    d = jax.jit(lambda z: jax.checkpoint(lambda w: w[::2] * 3)(z))(y[:10])
    e = (
        lax.dynamic_update_slice(jnp.zeros(5), y[:2], (2,))
        + y.at[np.array([1, 3])].set(0.5 * y[:2])[:5]
    )
    return jnp.concatenate([a, b, c, d, e])


def tiled(y):
    """`jnp.tile` (its own primitive): each unknown feeds several outputs."""
    return (
        5 * y
        + 0.2 * jnp.tile(y, 2)[3:15]
        + jnp.tile(y.reshape(3, 4), (2, 1))[1:4].ravel() * y
    )


def pytree(tree):
    u, v = tree["u"], tree["v"]
    return {"u": u * v[:, None] + jnp.roll(u, 1, 0), "v": v**2 + u[:, 0]}


SYSTEMS = {
    "stencil_pad": (stencil_pad, (N, N)),
    "stencil_roll": (stencil_roll, (N, N)),
    "tridiagonal": (tridiagonal, (12,)),
    "block_diagonal": (block_diagonal, (12,)),
    "graph_laplacian": (graph_laplacian, (20,)),
    "assorted": (assorted, (20,)),
    "tiled": (tiled, (12,)),
}


def _point(shape):
    return jnp.asarray(RNG.uniform(0.5, 1.5, size=shape))


def _detect(fn, y, jit=True):
    """Detects the pattern of the linearisation of `fn` at `y`, as the implicit rule
    does: optionally under jit, where the constants are tracers."""
    found = []

    def run(y):
        _, linear = jax.linearize(fn, y)
        found.append(detect_sparsity(linear, jax.eval_shape(lambda: y)))
        return y

    (jax.jit(run) if jit else run)(y)
    (pattern,) = found
    return pattern


def _dense_pattern(pattern):
    dense = np.zeros(pattern.shape, bool)
    dense[pattern.rows, pattern.cols] = True
    return dense


def _true_pattern(fn, y):
    flat, unravel = jax.flatten_util.ravel_pytree(y)
    ravelled = lambda flat: jax.flatten_util.ravel_pytree(fn(unravel(flat)))[0]
    return np.asarray(jax.jit(jax.jacfwd(ravelled))(flat)) != 0


def _assert_exact(fn, y, jit=True):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no primitive may fall back
        pattern = _detect(fn, y, jit)
    np.testing.assert_array_equal(_dense_pattern(pattern), _true_pattern(fn, y))


@pytest.mark.parametrize("widest_table", [None, 0, 2])
@pytest.mark.parametrize("name", list(SYSTEMS))
def test_detected_pattern_is_exact(name, widest_table, monkeypatch):
    """Under jit, as in the implicit rule: the constants are tracers there. Index
    sets are tables while narrow, CSR matrices once wider than `_WIDEST_TABLE`:
    lowered here, every rule meets both, and the mix of the two."""
    if widest_table is not None:
        monkeypatch.setattr(_detect_module, "_WIDEST_TABLE", widest_table)
    fn, shape = SYSTEMS[name]
    _assert_exact(fn, _point(shape))


@pytest.mark.parametrize("name", ["stencil_pad", "graph_laplacian"])
def test_detected_pattern_is_exact_eagerly(name):
    """Without jit the constants are concrete arrays."""
    fn, shape = SYSTEMS[name]
    _assert_exact(fn, _point(shape), jit=False)


def test_pytree_unknowns_follow_ravel_order():
    _assert_exact(pytree, {"u": _point((4, 3)), "v": _point((4,))})


def test_unknown_primitive_is_conservative_and_warns():
    def with_scan(y):
        _, running = lax.scan(lambda carry, v: (carry + v, carry + v), 0.0, y[:4])
        return jnp.concatenate([running, y[4:] ** 2])

    y = _point((8,))
    with pytest.warns(RuntimeWarning, match="scan"):
        pattern = _detect(with_scan, y, jit=False)
    dense, true = _dense_pattern(pattern), _true_pattern(with_scan, y)
    assert np.all(dense[true])  # contains the true pattern
    assert dense[:4, :4].all()  # the scan's block is taken as full
    np.testing.assert_array_equal(dense[4:], true[4:])  # the rest stays exact


def test_traced_indices_are_conservative():
    """Indices that are inputs of the jitted function are unknown when tracing: the
    gather falls back to "every element", which still contains the truth."""

    def run(y, idx):
        _, linear = jax.linearize(lambda y: y[idx] * y, y)
        with pytest.warns(RuntimeWarning, match="gather"):
            found.append(detect_sparsity(linear, jax.eval_shape(lambda: y)))
        return y

    found = []
    jax.jit(run)(_point((5,)), jnp.array([4, 3, 2, 1, 0]))
    assert found[0].nnz == 25


def test_detection_runs_once_per_trace(monkeypatch):
    from implicitdiff._sparse import _representation

    calls = []
    original = _representation.detect_sparsity

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(_representation, "detect_sparsity", counting)
    import implicitdiff as idf

    sparse = idf.Sparse("auto")

    @jax.jit
    def assemble(y):
        _, linear = jax.linearize(stencil_pad, y)
        return sparse.operator(linear, jax.eval_shape(lambda: y)).data

    first = assemble(_point((N, N)))
    second = assemble(_point((N, N)))
    assert len(calls) == 1
    assert jnp.all(jnp.isfinite(first)) and not jnp.allclose(first, second)


def test_custom_jvp_and_custom_vjp_calls_are_followed():
    """A linear function given directly (not linearised) keeps its custom rules."""

    @jax.custom_vjp
    def double_reversed(x):
        return 2 * x[::-1]

    double_reversed.defvjp(
        lambda x: (double_reversed(x), None), lambda _, g: (2 * g[::-1],)
    )

    @jax.custom_jvp
    def triple_rolled(x):
        return 3 * jnp.roll(x, 1)

    triple_rolled.defjvp(lambda p, t: (triple_rolled(*p), triple_rolled(*t)))

    def linear(x):
        return double_reversed(x[:6]) + triple_rolled(x[2:])

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pattern = detect_sparsity(linear, jax.ShapeDtypeStruct((8,), jnp.float64))
    matrix = jax.vmap(linear, out_axes=1)(jnp.eye(8))  # exact: `linear` is linear
    np.testing.assert_array_equal(_dense_pattern(pattern), np.asarray(matrix) != 0)


INDICES = np.array([3, 1, 4, 1, 5, 9, 2, 6, 0, 7])


@pytest.mark.parametrize(
    "take",
    [
        lambda y: jnp.take(y, INDICES),
        lambda y: jnp.take(y, INDICES - 10),  # negative indices
        lambda y: jnp.take(y, INDICES + 3, mode="clip"),
        lambda y: jnp.take(y, INDICES + 5, mode="fill", fill_value=0.0),
        lambda y: jnp.take(y.reshape(2, 5), np.array([1, 0, 1]), axis=0).ravel()[:10],
        lambda y: jnp.take_along_axis(
            y.reshape(2, 5), np.array([[1, 0, 4, 4, 2], [2, 2, 3, 0, 1]]), axis=1
        ).ravel(),
    ],
    ids=["take", "negative", "clip", "fill", "axis", "along_axis"],
)
@pytest.mark.parametrize("jit", [True, False])
def test_take_is_exact(take, jit):
    """Under jit the gather indices of `jnp.take` are a residual that a `jit` call
    computes next to the gathered values (which depend on the unknowns): only the
    former are folded."""
    _assert_exact(lambda y: take(y) * y + y**2, _point((10,)), jit)


KERNEL_1D = np.array([0.5, 0.0, -1.5])
KERNELS_2D = RNG.normal(size=(4, 1, 3, 3)) * (RNG.random((4, 1, 3, 3)) < 0.6)
SIGNAL = RNG.normal(size=(1, 1, 8)) * (np.arange(8) % 3 != 0)


def _conv_2d(y, **options):
    out = lax.conv_general_dilated(y.reshape(1, 2, 6, 7), KERNELS_2D, **options)
    return jnp.concatenate([out.ravel(), y])


CONVOLUTIONS = {
    "convolve_same": (lambda y: jnp.convolve(y, KERNEL_1D, mode="same") * y, (12,)),
    "convolve_full": (
        lambda y: jnp.convolve(y, jnp.asarray(KERNEL_1D))[1:-1] + y**2,
        (12,),
    ),
    "convolve_valid": (lambda y: jnp.convolve(y, KERNEL_1D, mode="valid"), (12,)),
    "1d_strided_dilated": (
        lambda y: lax.conv_general_dilated(
            y.reshape(1, 1, 12),
            KERNEL_1D.reshape(1, 1, 3),
            (2,),
            ((3, -1),),
            lhs_dilation=(2,),
            rhs_dilation=(3,),
        ).ravel(),
        (12,),
    ),
    "2d_grouped": (
        ft.partial(
            _conv_2d,
            window_strides=(2, 1),
            padding=((1, 0), (2, 1)),
            lhs_dilation=(1, 2),
            rhs_dilation=(2, 1),
            feature_group_count=2,
        ),
        (84,),
    ),
    "2d_same": (
        ft.partial(
            _conv_2d, window_strides=(1, 1), padding="SAME", feature_group_count=2
        ),
        (84,),
    ),
    "2d_nhwc": (
        lambda y: (
            lax.conv_general_dilated(
                y.reshape(2, 5, 4, 1),
                KERNELS_2D.transpose(2, 3, 1, 0),
                (1, 2),
                "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            ).ravel()[::2]
            * y
        ),
        (40,),
    ),
    "kernel_unknown": (
        lambda y: (
            lax.conv_general_dilated(
                jnp.asarray(SIGNAL), y[:3].reshape(1, 1, 3), (1,), ((1, 1),)
            ).ravel()[:5]
            + y
        ),
        (5,),
    ),
    "both_unknown": (
        lambda y: lax.conv_general_dilated(
            y.reshape(1, 1, 6), y[:3].reshape(1, 1, 3), (2,), ((2, 0),)
        ).ravel(),
        (6,),
    ),
}


@pytest.mark.parametrize("name", list(CONVOLUTIONS))
def test_convolution_is_exact(name):
    """`jnp.convolve` and `lax.conv_general_dilated`: strides, padding (negative
    too), input and kernel dilation, feature groups, layouts, a kernel that depends
    on the unknowns, and the structural zeros of a constant kernel or signal."""
    fn, shape = CONVOLUTIONS[name]
    _assert_exact(fn, _point(shape))


def test_convolution_is_exact_eagerly():
    fn, shape = CONVOLUTIONS["2d_grouped"]
    _assert_exact(fn, _point(shape), jit=False)
