"""sste_jax: 2:4 sparse pre-training with S-STE for JAX and Flax.

>>> import jax, sste_jax
>>> w = jax.random.normal(jax.random.key(0), (8, 4))
>>> bool((sste_jax.soft_threshold_24(w) != 0).reshape(2, 4, 4).sum(1).max() <= 2)
True
"""

import importlib

from sste_jax import metrics as metrics
from sste_jax import optim as optim
from sste_jax._config import SparsityConfig as SparsityConfig
from sste_jax._linear import PrunedWeight as PrunedWeight
from sste_jax._linear import forward_weight as forward_weight
from sste_jax._linear import prune_weight as prune_weight
from sste_jax._linear import sparse_dense as sparse_dense
from sste_jax._metrics import SparseWeight as SparseWeight
from sste_jax._metrics import sparse_weights as sparse_weights
from sste_jax._optim import freeze_beta as freeze_beta
from sste_jax._product import remat_policy as remat_policy
from sste_jax._product import sparse_dot_general as sparse_dot_general
from sste_jax._select import feed_forward as feed_forward
from sste_jax._sparsity import compress_24 as compress_24
from sste_jax._sparsity import decompress_24 as decompress_24
from sste_jax._sparsity import fit_beta as fit_beta
from sste_jax._sparsity import hard_threshold_24 as hard_threshold_24
from sste_jax._sparsity import hard_threshold_nm as hard_threshold_nm
from sste_jax._sparsity import mask_24 as mask_24
from sste_jax._sparsity import mask_nm as mask_nm
from sste_jax._sparsity import mvue_24 as mvue_24
from sste_jax._sparsity import soft_threshold_24 as soft_threshold_24
from sste_jax._sparsity import soft_threshold_nm as soft_threshold_nm
from sste_jax._sparsity import transposable_mask_24 as transposable_mask_24

__version__ = "0.1.0"

__all__ = [
    # pure 2:4 and N:M functions
    "soft_threshold_24", "mask_24", "hard_threshold_24", "fit_beta", "mvue_24", "compress_24", "decompress_24",
    "transposable_mask_24", "mask_nm", "soft_threshold_nm", "hard_threshold_nm",
    # the sparse product
    "SparsityConfig", "sparse_dense", "sparse_dot_general", "forward_weight", "prune_weight", "PrunedWeight",
    "remat_policy",
    # any model, one call
    "sparsify", "sparsify_fn", "feed_forward", "SparseModule", "SparseFn",
    # training and its record
    "freeze_beta", "sparse_weights", "SparseWeight",
    # submodules
    "optim", "metrics", "nnx", "checkpoint", "serving", "kernels",
]

# imported on first use, keeping ``import sste_jax`` light (Flax, orbax, the kernels)
_LAZY_MODULES = ("nnx", "checkpoint", "kernels", "serving")
_LAZY_NAMES = ("sparsify", "sparsify_fn", "SparseModule", "SparseFn")


def __getattr__(name):
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module("sste_jax._sparsify"), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"sste_jax.{name}")
    raise AttributeError(f"module 'sste_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
