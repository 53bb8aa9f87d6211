"""β as an NNX variable: `SparsityBeta`, where `sste_jax.nnx.SparseLinear` and `sste_jax.sparsify` keep each
sparse weight's frozen scale, with its `sste_jax._layout.SparseSpec` as metadata. (A ``"sparsity"`` collection of
Linen or `sste_jax.sparsify_fn` holds the same record in `sste_jax._layout.SparsityBeta` boxes.)

>>> import jax.numpy as jnp, sste_jax
>>> from sste_jax._layout import SparseSpec
>>> beta = SparsityBeta(jnp.float32(1.5), spec=SparseSpec(sste_jax.SparsityConfig()))
>>> float(beta[...]), beta.spec.config.method
(1.5, 'sste')
"""

from flax import nnx

__all__ = ["SparsityBeta"]


class SparsityBeta(nnx.Variable):
    """A frozen S-STE scale β (float32; one per layer of a stacked weight); not an ``nnx.Param``.

    Its metadata ``spec`` (a `SparseSpec`: config, grouped axis, layout) says what the weight trains, so
    that metrics, checkpoints and export know each β's weight. `SparseLinear` and `sste_jax.sparsify`
    keep their β in it.

    >>> from flax import nnx
    >>> import sste_jax
    >>> from sste_jax import nnx as sparse_nnx
    >>> layer = sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0))
    >>> isinstance(layer.beta, nnx.Param), layer.beta.spec.config.method
    (False, 'sste')
    """

    sste_frozen = True  # tells `sste_jax.freeze_beta` (which does not import Flax) what this is
