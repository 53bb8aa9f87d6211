"""sste_jax: 2:4 sparse pre-training with S-STE for JAX and Flax.

>>> import jax, sste_jax
>>> w = jax.random.normal(jax.random.key(0), (8, 4))
>>> bool((sste_jax.soft_threshold_24(w) != 0).reshape(2, 4, 4).sum(1).max() <= 2)
True
"""

from sste_jax._linear import SparsityConfig as SparsityConfig
from sste_jax._linear import forward_weight as forward_weight
from sste_jax._linear import sparse_dense as sparse_dense
from sste_jax._sparsity import compress_24 as compress_24
from sste_jax._sparsity import decompress_24 as decompress_24
from sste_jax._sparsity import fit_beta as fit_beta
from sste_jax._sparsity import hard_threshold_24 as hard_threshold_24
from sste_jax._sparsity import mask_24 as mask_24
from sste_jax._sparsity import mvue_24 as mvue_24
from sste_jax._sparsity import soft_threshold_24 as soft_threshold_24
from sste_jax._sparsity import transposable_mask_24 as transposable_mask_24

# Re-exports added by the layer, optimizer, metrics and checkpoint modules go below this line.

__version__ = "0.1.0"
