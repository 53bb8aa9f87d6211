"""A small ViT: square single-channel images cut into patches, a class token, pre-LN blocks.

Its feed-forward linears are ``mlp/fc1`` and ``mlp/fc2`` of each block, the layers
`sste_jax.feed_forward` selects for 2:4 sparsity.

>>> from experiments.common.config import ModelConfig
>>> vit = ViT(ModelConfig(1, 2, 16, 17), 8, 2, 10, rngs=nnx.Rngs(params=0))
>>> vit(jnp.zeros((3, 8, 8))).shape
(3, 10)
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from experiments.common.config import ModelConfig


class Attention(nnx.Module):
    def __init__(self, n_head: int, d_model: int, rngs: nnx.Rngs):
        self.n_head = n_head
        self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
        self.proj = nnx.Linear(d_model, d_model, rngs=rngs)

    def __call__(self, x_BTxD: Float[Array, "BT d"], batch: int) -> Float[Array, "BT d"]:
        bt, d = x_BTxD.shape
        qkv_BxTx3xNxH = self.qkv(x_BTxD).reshape(batch, bt // batch, 3, self.n_head, d // self.n_head)
        q, k, v = (qkv_BxTx3xNxH[:, :, i] for i in range(3))
        return self.proj(jax.nn.dot_product_attention(q, k, v).reshape(bt, d))


class MLP(nnx.Module):
    def __init__(self, d_model: int, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.fc2 = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, x_BTxD: Float[Array, "BT d"]) -> Float[Array, "BT d"]:
        return self.fc2(jax.nn.gelu(self.fc1(x_BTxD)))


class Block(nnx.Module):
    def __init__(self, n_head: int, d_model: int, rngs: nnx.Rngs):
        self.ln_1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = Attention(n_head, d_model, rngs)
        self.ln_2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp = MLP(d_model, rngs)

    def __call__(self, x_BTxD: Float[Array, "BT d"], batch: int) -> Float[Array, "BT d"]:
        x_BTxD = x_BTxD + self.attn(self.ln_1(x_BTxD), batch)
        return x_BTxD + self.mlp(self.ln_2(x_BTxD))


class ViT(nnx.Module):
    """Returns class logits ``(B, n_classes)`` for square single-channel images ``(B, S, S)``; the
    shape is ``m``'s, whose ``seq_len`` must be the patch count + 1 (the class token)."""

    def __init__(self, m: ModelConfig, image_size: int, patch: int, n_classes: int, *, rngs: nnx.Rngs):
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not divisible by the patch size {patch}")
        self.image_size, self.patch = image_size, patch
        n_tokens = (image_size // patch) ** 2 + 1
        if n_tokens != m.seq_len:
            raise ValueError(f"seq_len={m.seq_len} must be the patch count + 1 = {n_tokens}")
        self.embed = nnx.Linear(patch * patch, m.d_model, rngs=rngs)
        self.cls = nnx.Param(jnp.zeros((1, 1, m.d_model)))
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, n_tokens, m.d_model)))
        self.blocks = nnx.List([Block(m.n_head, m.d_model, rngs) for _ in range(m.n_layer)])
        self.ln_f = nnx.LayerNorm(m.d_model, rngs=rngs)
        self.head = nnx.Linear(m.d_model, n_classes, rngs=rngs)

    def __call__(self, x_BxSxS: Float[Array, "B S S"]) -> Float[Array, "B classes"]:
        batch, s, s2 = x_BxSxS.shape
        if (s, s2) != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got shape {x_BxSxS.shape}")
        g, p = s // self.patch, self.patch
        patches_BxPxQ = x_BxSxS.reshape(batch, g, p, g, p).transpose(0, 1, 3, 2, 4).reshape(batch, g * g, -1)
        tokens_BxPxD = self.embed(patches_BxPxQ)
        cls_Bx1xD = jnp.broadcast_to(self.cls[...], (batch, 1, tokens_BxPxD.shape[-1]))
        x_BxTxD = jnp.concatenate([cls_Bx1xD, tokens_BxPxD], axis=1) + self.pos[...]
        x_BTxD = x_BxTxD.reshape(batch * x_BxTxD.shape[1], -1)
        for block in self.blocks:
            x_BTxD = block(x_BTxD, batch)
        return self.head(self.ln_f(x_BTxD.reshape(batch, -1, x_BTxD.shape[-1])[:, 0]))
