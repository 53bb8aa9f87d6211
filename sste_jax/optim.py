"""Reading optimizer states: the β rule of `sste_jax.freeze_beta` and STEP's switch inside a state.

The transforms themselves (`sste_jax.freeze_beta`, `sste_jax.scale_by_step`, ...) are at the top
level; these functions look into what they return.

>>> import jax.numpy as jnp, sste_jax
>>> tx = sste_jax.freeze_beta(sste_jax.step_adam(1e-3))
>>> state = tx.init({"w": jnp.ones(3), "beta": jnp.float32(1.0)})
>>> bool(sste_jax.optim.step_switched(state)), sste_jax.optim.is_beta(("beta",), 1.0)
(False, True)
"""

from sste_jax._optim import is_beta
from sste_jax._step import step_state, step_switched, step_v_change

__all__ = ["is_beta", "step_state", "step_switched", "step_v_change"]
