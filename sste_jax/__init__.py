"""sste_jax: 2:4 sparse pre-training with S-STE for JAX and Flax.

>>> import jax, sste_jax
>>> w = jax.random.normal(jax.random.key(0), (8, 4))
>>> bool((sste_jax.soft_threshold_24(w) != 0).reshape(2, 4, 4).sum(1).max() <= 2)
True
"""

from sste_jax._linear import SparsityConfig as SparsityConfig
from sste_jax._linear import forward_weight as forward_weight
from sste_jax._linear import sparse_dense as sparse_dense
from sste_jax._metrics import FlipState as FlipState
from sste_jax._metrics import SparseWeight as SparseWeight
from sste_jax._metrics import check_sharding as check_sharding
from sste_jax._metrics import flip_rate as flip_rate
from sste_jax._metrics import init_flip_state as init_flip_state
from sste_jax._metrics import sparse_weights as sparse_weights
from sste_jax._metrics import sparsity_stats as sparsity_stats
from sste_jax._metrics import to_host as to_host
from sste_jax._optim import MaskedDecayState as MaskedDecayState
from sste_jax._optim import add_masked_decay as add_masked_decay
from sste_jax._optim import add_srste_decay as add_srste_decay
from sste_jax._optim import freeze_beta as freeze_beta
from sste_jax._optim import is_beta as is_beta
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
from sste_jax._step import StepState as StepState
from sste_jax._step import scale_by_step as scale_by_step
from sste_jax._step import step_adam as step_adam
from sste_jax._step import step_state as step_state
from sste_jax._step import step_switched as step_switched
from sste_jax._step import step_v_change as step_v_change
from sste_jax._transform import SparseFn as SparseFn
from sste_jax._transform import sparsify_fn as sparsify_fn

__version__ = "0.1.0"


def __getattr__(name):
    if name == "sparsify":  # the Flax level (and Qwix): imported on first use, keeping ``import sste_jax`` light
        from sste_jax.anymodel import sparsify

        return sparsify
    raise AttributeError(f"module 'sste_jax' has no attribute {name!r}")
