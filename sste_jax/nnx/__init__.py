"""Flax NNX: `SparseLinear`, a 2:4 sparse ``nnx.Linear`` for models you write yourself, the inference layers
that serve it, and gradient accumulation that prunes once per step.

A `SparseLinear` fits its frozen β to its initial kernel (``docs/algorithm.md#beta-and-the-optimizer``);
`SparseLinear.from_linear` makes one from an existing ``nnx.Linear`` (same kernel and bias variables).
β lives in a `SparsityBeta` variable, not an ``nnx.Param``: an ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
never sees it (and `sste_jax.freeze_beta` protects it under any other filter). For a model you did not
write, use `sste_jax.sparsify`.

For inference, `densify_layers` and `compress_layers` swap each sparse layer, in place, for an
``nnx.Linear`` holding its forward weight or a `CompressedLinear` holding it packed by
`sste_jax.compress_24`; both ask the layer (``layer.forward_weight()``), so every method, T-SR-STE's
masked layers included, converts. `to_backend` serves compressed layers on XLA or cuSPARSELt
(`CusparseltLinear`), `import_weights` builds them from files (`sste_jax.serving`), `export_compressed`
and `load_compressed` save and load them with orbax.

MVUE (``SparsityConfig(mvue=True)``) takes its key from the layer's `MVUEKey`, drawn once from
``rngs`` (the ``"sparsity"`` stream, else ``"default"``) and never advanced: each draw folds in the
product's input and weight (``docs/algorithm.md#mvue-keys``), so it is fresh every step without RNG
state that a scan or a decoding loop would have to carry, and inference needs no key.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from sste_jax import nnx as sparse_nnx
>>> class Block(nnx.Module):
...     def __init__(self, rngs):
...         self.up = sparse_nnx.SparseLinear(8, 32, rngs=rngs)
...         self.down = sparse_nnx.SparseLinear(32, 8, rngs=rngs)
...     def __call__(self, x):
...         return x + self.down(nnx.relu(self.up(x)))
>>> Block(nnx.Rngs(0))(jnp.ones((2, 8))).shape
(2, 8)
"""

from sste_jax.nnx._accumulate import accumulate_gradients as accumulate_gradients
from sste_jax.nnx._inference import BACKENDS as BACKENDS
from sste_jax.nnx._inference import CompressedLinear as CompressedLinear
from sste_jax.nnx._inference import CompressedWeight as CompressedWeight
from sste_jax.nnx._inference import CusparseltLinear as CusparseltLinear
from sste_jax.nnx._inference import compress_layers as compress_layers
from sste_jax.nnx._inference import decompress_layers as decompress_layers
from sste_jax.nnx._inference import densify_layers as densify_layers
from sste_jax.nnx._inference import export_compressed as export_compressed
from sste_jax.nnx._inference import import_weights as import_weights
from sste_jax.nnx._inference import load_compressed as load_compressed
from sste_jax.nnx._inference import to_backend as to_backend
from sste_jax.nnx._layers import MVUEKey as MVUEKey
from sste_jax.nnx._layers import SparseLinear as SparseLinear
from sste_jax.nnx._layers import SparsityBeta as SparsityBeta
from sste_jax.nnx._layers import SparsityMask as SparsityMask
from sste_jax.nnx._layers import refit_beta as refit_beta
from sste_jax.nnx._layers import refresh_masks as refresh_masks

__all__ = [
    # the training layer and its variables
    "SparseLinear", "SparsityBeta", "SparsityMask", "MVUEKey", "refresh_masks", "refit_beta",
    # gradient accumulation
    "accumulate_gradients",
    # inference layers and surgery
    "CompressedLinear", "CompressedWeight", "CusparseltLinear", "densify_layers", "compress_layers",
    "decompress_layers", "to_backend", "BACKENDS", "import_weights",
    # the compressed export
    "export_compressed", "load_compressed",
]  # fmt: skip
