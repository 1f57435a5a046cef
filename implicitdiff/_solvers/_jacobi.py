import jax.numpy as jnp
import lineax as lx

from .._misc import ravel, unravel
from ._preconditioner import AbstractPreconditioner


class Jacobi(AbstractPreconditioner):
    """The Jacobi (diagonal) preconditioner `M⁻¹ = diag(A)⁻¹`, for the `preconditioner`
    argument of [`implicitdiff.CG`][], [`implicitdiff.GMRES`][] and
    [`implicitdiff.BiCGStab`][].

    It helps when the unknowns have very different scales (rows of `A` of different
    magnitudes) and costs one division per unknown and step. `presolve` extracts the
    diagonal with `lineax.diagonal`: free for a sparse or diagonal operator, but a
    matrix-free operator is materialised for it (`n` products with `A`), so on a
    large matrix-free problem pair it with `representation=idf.Sparse(...)`. Zero or
    non-finite diagonal entries are replaced by one (that unknown is left unscaled).

    !!! Example

        ```python
        import implicitdiff as idf

        solver = idf.GMRES(preconditioner=idf.Jacobi())
        ```
    """

    def presolve(self, A, y):
        diagonal = lx.diagonal(A)
        usable = jnp.isfinite(diagonal) & (diagonal != 0)
        return jnp.where(usable, diagonal, 1), A.in_structure()

    def apply(self, state, r):
        diagonal, x_structure = state
        return unravel(ravel(r) / diagonal, x_structure)


Jacobi.__init__.__doc__ = """**Arguments:** none."""
