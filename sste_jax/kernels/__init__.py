"""Fused 2:4 kernels: Pallas prune/compress and MVUE/compress, and cuSPARSELt sparse GEMMs (optional).

Imported lazily by the core; everything here works on CPU (Pallas interpret mode) except the
cuSPARSELt extension, which needs CUDA and builds on demand.
"""

from sste_jax.kernels import _cusparselt as cusparselt
from sste_jax.kernels._mvue import mvue_compress_24 as mvue_compress_24
from sste_jax.kernels._prune import Pruned24 as Pruned24
from sste_jax.kernels._prune import prune_compress_24 as prune_compress_24

__all__ = ["Pruned24", "prune_compress_24", "mvue_compress_24", "cusparselt"]
