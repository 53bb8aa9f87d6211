"""Optimizer pieces: the baselines' gradient terms and STEP, their states, and what reads them.

`sste_jax.freeze_beta` (at the top level) keeps β frozen under any optimizer; here are SR-STE's and
T-SR-STE's decays, STEP's preconditioner, the mask of the sparse weights that selects what they act
on, the layers' forward masks that T-SR-STE's decay reads, and the readers of STEP's switch.

>>> import jax.numpy as jnp, sste_jax
>>> tx = sste_jax.freeze_beta(sste_jax.optim.step_adam(1e-3))
>>> state = tx.init({"w": jnp.ones(3), "beta": jnp.float32(1.0)})
>>> bool(sste_jax.optim.step_switched(state)), sste_jax.optim.is_beta(("beta",), 1.0)
(False, True)
"""

from sste_jax._metrics import forward_masks, sparse_kernel_mask
from sste_jax._optim import AddMaskedDecayState, add_masked_decay, add_srste_decay, is_beta
from sste_jax._step import ScaleByStepState, scale_by_step, step_adam, step_state, step_switched, step_v_change

__all__ = [
    "sparse_kernel_mask",
    "forward_masks",
    "add_srste_decay",
    "add_masked_decay",
    "AddMaskedDecayState",
    "scale_by_step",
    "step_adam",
    "ScaleByStepState",
    "is_beta",
    "step_state",
    "step_switched",
    "step_v_change",
]
