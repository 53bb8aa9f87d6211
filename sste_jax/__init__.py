"""sste_jax: 2:4 sparse pre-training with S-STE for JAX and Flax.

>>> import jax, sste_jax
>>> w = jax.random.normal(jax.random.key(0), (8, 4))
>>> bool((sste_jax.soft_threshold_24(w) != 0).reshape(2, 4, 4).sum(1).max() <= 2)
True
"""

import importlib
import warnings

from sste_jax import metrics as metrics
from sste_jax import optim as optim
from sste_jax._linear import Pruned as Pruned
from sste_jax._linear import SparsityConfig as SparsityConfig
from sste_jax._linear import forward_weight as forward_weight
from sste_jax._linear import prune_weight as prune_weight
from sste_jax._linear import sparse_dense as sparse_dense
from sste_jax._metrics import FlipState as FlipState
from sste_jax._metrics import SparseWeight as SparseWeight
from sste_jax._metrics import check_sharding as check_sharding
from sste_jax._metrics import flip_rate as flip_rate
from sste_jax._metrics import init_flip_state as init_flip_state
from sste_jax._metrics import sparse_weights as sparse_weights
from sste_jax._metrics import sparsity_stats as sparsity_stats
from sste_jax._optim import AddMaskedDecayState as AddMaskedDecayState
from sste_jax._optim import add_masked_decay as add_masked_decay
from sste_jax._optim import add_srste_decay as add_srste_decay
from sste_jax._optim import freeze_beta as freeze_beta
from sste_jax._params import ParamSparsity as ParamSparsity
from sste_jax._params import apply_sparsity as apply_sparsity
from sste_jax._params import einsum_axis as einsum_axis
from sste_jax._params import select_kernels as select_kernels
from sste_jax._params import select_paths as select_paths
from sste_jax._params import sparsity_spec as sparsity_spec
from sste_jax._params import spec_weights as spec_weights
from sste_jax._product import remat_policy as remat_policy
from sste_jax._product import sparse_dot_general as sparse_dot_general
from sste_jax._product import sparse_einsum as sparse_einsum
from sste_jax._select import FEED_FORWARD as FEED_FORWARD
from sste_jax._select import feed_forward as feed_forward
from sste_jax._select import match_rule as match_rule
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
from sste_jax._step import ScaleByStepState as ScaleByStepState
from sste_jax._step import scale_by_step as scale_by_step
from sste_jax._step import step_adam as step_adam
from sste_jax._transform import SparseFn as SparseFn
from sste_jax._transform import sparsify_fn as sparsify_fn

__version__ = "0.1.0"

__all__ = [
    # pure 2:4 and N:M functions
    "soft_threshold_24", "mask_24", "hard_threshold_24", "fit_beta", "mvue_24", "compress_24", "decompress_24",
    "transposable_mask_24", "mask_nm", "soft_threshold_nm", "hard_threshold_nm",
    # the sparse linear transform
    "SparsityConfig", "sparse_dense", "forward_weight", "prune_weight", "Pruned", "sparse_dot_general",
    "sparse_einsum", "remat_policy",
    # optimizer transforms and their states
    "freeze_beta", "add_srste_decay", "add_masked_decay", "AddMaskedDecayState", "scale_by_step", "step_adam",
    "ScaleByStepState",
    # any model: the parameter path, the function transform, module selection
    "sparsify", "sparsify_fn", "SparseFn", "sparsity_spec", "apply_sparsity", "ParamSparsity", "spec_weights",
    "select_kernels", "select_paths", "einsum_axis", "feed_forward", "FEED_FORWARD", "match_rule",
    # metrics
    "SparseWeight", "sparse_weights", "FlipState", "init_flip_state", "flip_rate", "sparsity_stats", "check_sharding",
    # submodules
    "optim", "metrics", "nnx", "linen", "checkpoint",
]

# old names, kept for one release: each warns (DeprecationWarning) and returns the same object
_DEPRECATED = {
    "StepState": ("sste_jax._step", "ScaleByStepState", "sste_jax.ScaleByStepState"),
    "MaskedDecayState": ("sste_jax._optim", "AddMaskedDecayState", "sste_jax.AddMaskedDecayState"),
    "step_state": ("sste_jax.optim", "step_state", "sste_jax.optim.step_state"),
    "step_switched": ("sste_jax.optim", "step_switched", "sste_jax.optim.step_switched"),
    "step_v_change": ("sste_jax.optim", "step_v_change", "sste_jax.optim.step_v_change"),
    "is_beta": ("sste_jax.optim", "is_beta", "sste_jax.optim.is_beta"),
    "to_host": ("sste_jax.metrics", "to_host", "sste_jax.metrics.to_host"),
}

# imported on first use, keeping ``import sste_jax`` light (Flax's module systems, Qwix, orbax, the kernels)
_LAZY_MODULES = ("nnx", "linen", "checkpoint", "anymodel", "kernels", "serving")


def __getattr__(name):
    if name in _DEPRECATED:
        module, attr, new = _DEPRECATED[name]
        warnings.warn(
            f"sste_jax.{name} is deprecated and will be removed in the next release; use {new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), attr)
    if name == "sparsify":
        from sste_jax.anymodel import sparsify

        return sparsify
    if name in _LAZY_MODULES:
        return importlib.import_module(f"sste_jax.{name}")
    raise AttributeError(f"module 'sste_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
