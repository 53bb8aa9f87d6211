"""The baselines' decay terms on the pruned weights, written once.

* `srste_term`: SR-STE's ``λ·(1 − mask_24(W))⊙W``, added in the backward pass of ``"srste"``
  layers (and of the parameter path) and by `sste_jax.optim.add_srste_decay`.
* `masked_decay_term`: T-SR-STE's ``α·(1 − M)⊙W`` for a given mask ``M``, added by
  `sste_jax.optim.add_masked_decay` after gradient clipping, as T-SR-STE's authors do.

>>> import jax.numpy as jnp
>>> from sste_jax._decay import srste_term
>>> srste_term(jnp.array([[1.0], [-4.0], [3.0], [2.0]]), 0.5).ravel().tolist()
[0.5, 0.0, 0.0, 1.0]
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from sste_jax._sparsity import mask_nm

__all__ = ["srste_term", "masked_decay_term"]


def masked_decay_term(
    w: Float[Array, "..."], mask: Bool[Array, "..."], decay: float | jax.Array
) -> Float[Array, "..."]:
    """``decay·(1 − mask)⊙w`` in ``w``'s dtype: decays the weights ``mask`` prunes."""
    return (decay * jnp.where(mask, jnp.zeros((), w.dtype), w)).astype(w.dtype)


def srste_term(w: Float[Array, "..."], decay: float, axis: int = 0, *, n: int = 2, m: int = 4) -> Float[Array, "..."]:
    """SR-STE's gradient term ``decay·(1 − mask_nm(W, n, m))⊙W`` (groups along ``axis``; 2:4 by default)."""
    return masked_decay_term(w, mask_nm(w, n, m, axis), decay)
