"""`on_failure="raise"` on sharded arrays, for tests/test_sharding.py.

Run in a subprocess with four CPU devices (see tests/sharding_script.py). Each case
fails on one device's shard only, and collectives follow the failure (a sum over the
batch, a dot product of the field); a third case is an `implicitdiff.host` function
that raises. Every device must stop with the error, none wait for the others (which
used to end in SIGABRT after 40 s). Prints one JSON object: for each case the
exception's type and the last line of its message, and a second call on good data
(the process goes on).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import implicitdiff as idf

jax.config.update("jax_enable_x64", True)


def sqrt_of(x):
    # At x = 0, y = 0 and ∂c/∂y = 2y = 0: the derivative does not exist.
    return idf.ImplicitFunction(jnp.sqrt, lambda x, y: y**2 - x, on_failure="raise")(x)


def batch(X):
    """Gradients of a batch sharded over its first axis, then their sum."""
    return jnp.sum(jax.vmap(jax.grad(lambda x: jnp.sum(sqrt_of(x))))(X))


def field(x):
    """The gradient of one field sharded over space (a CG solve), then a dot product."""
    f = idf.ImplicitFunction(
        jnp.sqrt, lambda x, y: y**2 - x, linear_solver=idf.CG(), on_failure="raise"
    )
    g = jax.grad(lambda x: jnp.sum(f(x)))(x)
    return g @ x


def checked_sqrt(x):
    if np.any(x == 0):
        raise ValueError("zero")
    return np.sqrt(x)


def host_batch(X):
    """A NumPy function raising on one problem of the batch, then a sum."""
    return jnp.sum(jax.vmap(idf.host(checked_sqrt))(X))


def outcome(fn, bad, good):
    compiled = jax.jit(fn)
    try:
        jax.block_until_ready(compiled(bad))
        result = {"raised": None}
    except Exception as error:
        result = {
            "raised": type(error).__name__,
            "last_line": str(error).splitlines()[-1],
        }
    result["good"] = float(compiled(good))
    return result


def main():
    mesh = Mesh(np.array(jax.devices()), ("d",))
    sharded = NamedSharding(mesh, P("d"))
    X = jnp.ones((8, 3)).at[5, 1].set(0.0)  # one problem, on the third device
    x = jnp.ones(64).at[40].set(0.0)
    put = lambda a: jax.device_put(a, sharded)  # noqa: E731
    print(
        json.dumps(
            {
                "batch": outcome(batch, put(X), put(X + 1.0)),
                "field": outcome(field, put(x), put(x + 1.0)),
                "host": outcome(host_batch, put(X), put(X + 1.0)),
            }
        )
    )


if __name__ == "__main__":
    main()
