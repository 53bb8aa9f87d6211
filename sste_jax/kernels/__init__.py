"""Fused 2:4 kernels: Pallas prune/compress and MVUE/compress, and cuSPARSELt and CUTLASS sm90 sparse GEMMs
(optional).

The ground floor: these modules import nothing of the core but its pure primitives (`sste_jax._sparsity`,
`sste_jax._fp8`, `sste_jax._config`); the core decides which kernel runs where (`sste_jax._backend`) and
imports them only when chosen. Everything here works on CPU (Pallas interpret mode, the CUTLASS operand
emitters) except the cuSPARSELt and CUTLASS extensions, which need CUDA and build on demand.

>>> import jax.numpy as jnp
>>> from sste_jax import kernels
>>> kernels.prune_compress_24(jnp.ones((8, 16)), method="ste").values.shape
(4, 16)
"""

from sste_jax.kernels import _cusparselt as cusparselt
from sste_jax.kernels import _cutlass as cutlass
from sste_jax.kernels._mvue import mvue_compress_24 as mvue_compress_24
from sste_jax.kernels._prune import Compressed24 as Compressed24
from sste_jax.kernels._prune import prune_compress_24 as prune_compress_24

__all__ = ["Compressed24", "prune_compress_24", "mvue_compress_24", "cusparselt", "cutlass"]
