"""Fused 2:4 kernels: Pallas prune/compress and MVUE/compress, and cuSPARSELt and CUTLASS sm90 sparse GEMMs
(optional).

Imported lazily by the core; everything here works on CPU (Pallas interpret mode, the CUTLASS operand
emitters) except the cuSPARSELt and CUTLASS extensions, which need CUDA and build on demand.
"""

from sste_jax.kernels import _cusparselt as cusparselt
from sste_jax.kernels import _cutlass as cutlass
from sste_jax.kernels._mvue import mvue_compress_24 as mvue_compress_24
from sste_jax.kernels._prune import Pruned24 as Pruned24
from sste_jax.kernels._prune import prune_compress_24 as prune_compress_24

__all__ = ["Pruned24", "prune_compress_24", "mvue_compress_24", "cusparselt", "cutlass"]
