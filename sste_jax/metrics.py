"""Training metrics of the sparse weights (`sste_jax.sparse_weights`): mask flip rate, β, zero fraction,
relative error, the sharding check, and `to_host`, one transfer of a dict of device scalars.

>>> import jax.numpy as jnp, sste_jax
>>> sste_jax.metrics.to_host({"flip_rate": jnp.float32(0.25)})
{'flip_rate': 0.25}
"""

from sste_jax._metrics import FlipState, check_sharding, flip_rate, init_flip_state, sparsity_stats, to_host

__all__ = ["FlipState", "init_flip_state", "flip_rate", "sparsity_stats", "check_sharding", "to_host"]
