"""GPT-2 in Flax NNX as in nanoGPT: pre-LayerNorm, causal self-attention, GELU MLP 4x wide, tied
embeddings (the LM head is ``wte^T`` and stays dense), no biases, no dropout.

Activations stay ``(B*T, d)`` outside attention (XLA:CPU differentiates 2-D products much faster
than 3-D ones). The feed-forward linears are ``blocks/<i>/mlp/c_fc`` and
``blocks/<i>/mlp/c_proj``, which `sste_jax.feed_forward` selects.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> model = GPT(vocab_size=256, n_layer=1, n_head=2, d_model=16, seq_len=8, rngs=nnx.Rngs(0))
>>> model(jnp.zeros((2, 8), jnp.int32)).shape
(16, 256)
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int


def _linear(d_in: int, d_out: int, std: float, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=nnx.initializers.normal(std), rngs=rngs)


class CausalSelfAttention(nnx.Module):
    def __init__(self, n_head: int, d_model: int, proj_std: float, rngs: nnx.Rngs):
        self.n_head = n_head
        self.c_attn = _linear(d_model, 3 * d_model, 0.02, rngs)
        self.c_proj = _linear(d_model, d_model, proj_std, rngs)

    def __call__(self, x_BTxD: Float[Array, "BT d"], batch: int) -> Float[Array, "BT d"]:
        bt, d = x_BTxD.shape
        qkv_BxTx3xNxH = self.c_attn(x_BTxD).reshape(batch, bt // batch, 3, self.n_head, d // self.n_head)
        q, k, v = (qkv_BxTx3xNxH[:, :, i] for i in range(3))
        y_BxTxNxH = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y_BxTxNxH.reshape(bt, d))


class MLP(nnx.Module):
    def __init__(self, d_model: int, proj_std: float, rngs: nnx.Rngs):
        self.c_fc = _linear(d_model, 4 * d_model, 0.02, rngs)
        self.c_proj = _linear(4 * d_model, d_model, proj_std, rngs)

    def __call__(self, x_BTxD: Float[Array, "BT d"]) -> Float[Array, "BT d"]:
        return self.c_proj(jax.nn.gelu(self.c_fc(x_BTxD), approximate=True))


class Block(nnx.Module):
    def __init__(self, n_head: int, d_model: int, proj_std: float, rngs: nnx.Rngs):
        self.ln_1 = nnx.LayerNorm(d_model, use_bias=False, rngs=rngs)
        self.attn = CausalSelfAttention(n_head, d_model, proj_std, rngs)
        self.ln_2 = nnx.LayerNorm(d_model, use_bias=False, rngs=rngs)
        self.mlp = MLP(d_model, proj_std, rngs)

    def __call__(self, x_BTxD: Float[Array, "BT d"], batch: int) -> Float[Array, "BT d"]:
        x_BTxD = x_BTxD + self.attn(self.ln_1(x_BTxD), batch)
        return x_BTxD + self.mlp(self.ln_2(x_BTxD))


def _check_ids(idx_BxT, vocab_size: int) -> None:
    """Raises if concrete (not traced) ids fall outside ``[0, vocab_size)``: their embedding lookup
    would give NaN logits. Under ``jit`` the ids are tracers and nothing is checked (JAX cannot raise
    there); `experiments.lm.data.token_splits` checks the token arrays where they enter."""
    if isinstance(idx_BxT, jax.core.Tracer):
        return
    ids = np.asarray(idx_BxT)
    if ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        where = tuple(int(i) for i in np.argwhere(ids == bad)[0])
        raise ValueError(
            f"token id {bad} at index {where} is outside the model's vocabulary [0, vocab_size={vocab_size}); "
            "its embedding would give NaN logits"
        )


class GPT(nnx.Module):
    """Returns logits ``(B*T, vocab)`` for token ids ``(B, T)``, ``T <= seq_len``.

    Concrete ids outside ``[0, vocab_size)`` raise ValueError; traced ids (inside ``jit``) are not checked.
    """

    def __init__(self, vocab_size: int, n_layer: int, n_head: int, d_model: int, seq_len: int, *, rngs: nnx.Rngs):
        proj_std = 0.02 / math.sqrt(2 * n_layer)  # GPT-2's scaled init of residual projections
        self.seq_len = seq_len
        self.wte = nnx.Embed(vocab_size, d_model, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.wpe = nnx.Embed(seq_len, d_model, embedding_init=nnx.initializers.normal(0.01), rngs=rngs)
        self.blocks = nnx.List([Block(n_head, d_model, proj_std, rngs) for _ in range(n_layer)])
        self.ln_f = nnx.LayerNorm(d_model, use_bias=False, rngs=rngs)

    def features(self, idx_BxT: Int[Array, "B T"]) -> Float[Array, "BT d"]:
        """The final LayerNorm's output ``(B*T, d)``: what the LM head (and a classifier) reads."""
        batch, t = idx_BxT.shape
        if t > self.seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's seq_len={self.seq_len}")
        _check_ids(idx_BxT, self.wte.num_embeddings)
        x_BxTxD = self.wte(idx_BxT) + self.wpe(jnp.arange(t))[None]
        x_BTxD = x_BxTxD.reshape(batch * t, -1)
        for block in self.blocks:
            x_BTxD = block(x_BTxD, batch)
        return self.ln_f(x_BTxD)

    def __call__(self, idx_BxT: Int[Array, "B T"]) -> Float[Array, "BT vocab"]:
        return self.wte.attend(self.features(idx_BxT))
