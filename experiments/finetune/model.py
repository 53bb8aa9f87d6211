"""The classifier: a pre-trained GPT (`experiments.lm.model.GPT`) read out by a linear head on the
mean of its final features over the window's positions.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from experiments.lm.model import GPT
>>> gpt = GPT(vocab_size=256, n_layer=1, n_head=2, d_model=16, seq_len=8, rngs=nnx.Rngs(0))
>>> Classifier(gpt, n_classes=6)(jnp.zeros((3, 8), jnp.int32)).shape
(3, 6)
"""

from flax import nnx
from jaxtyping import Array, Float, Int

from experiments.lm.model import GPT


class Classifier(nnx.Module):
    """``gpt``'s features averaged over positions, then ``head`` (zero-initialised: the first step
    starts from uniform class probabilities whatever the body)."""

    def __init__(self, gpt: GPT, n_classes: int):
        d_model = gpt.ln_f.scale.shape[0]
        self.gpt = gpt
        self.head = nnx.Linear(d_model, n_classes, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))

    def __call__(self, idx_BxL: Int[Array, "B L"]) -> Float[Array, "B classes"]:
        batch, length = idx_BxL.shape
        features_BxD = self.gpt.features(idx_BxL).reshape(batch, length, -1).mean(1)
        return self.head(features_BxD)
