"""Reading metrics on the host: `to_host` brings a dict of device scalars over in one transfer.

The metrics themselves (`sste_jax.flip_rate`, `sste_jax.sparsity_stats`, ...) are at the top level.

>>> import jax.numpy as jnp, sste_jax
>>> sste_jax.metrics.to_host({"flip_rate": jnp.float32(0.25)})
{'flip_rate': 0.25}
"""

from sste_jax._metrics import to_host

__all__ = ["to_host"]
