"""Translation (the paper's Table 4, scaled down): a Transformer-base-shaped encoder-decoder in NNX.

Transformer-base (6+6 layers, d 512, 8 heads, ReLU feed-forward 2048, sinusoidal positions, one
embedding shared by source, target and the output projection over a joint BPE vocabulary), with two
changes: it is smaller (`Seq2SeqConfig`), and it is **pre-LN** (LayerNorm before each sub-layer, a
final LayerNorm after each stack) rather than post-LN: pre-LN trains robustly at small scale without
tuning a learning-rate warmup. No dropout. Token id ``PAD = 0`` is padding: the encoder's
self-attention and the decoder's cross-attention ignore padded source positions; the decoder's
self-attention is causal (target padding sits after the real tokens, so causality covers it).

Activations stay ``(B*T, d)`` outside attention (XLA:CPU differentiates 2-D products much faster).
The feed-forward linears are plain ``nnx.Linear`` layers at ``encoder/<i>/mlp/fc1|fc2`` and
``decoder/<i>/mlp/fc1|fc2``, the layers `sste_jax.feed_forward` selects.

Decoding lives in `experiments.translation.decode`.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> model = Transformer(Seq2SeqConfig(vocab_size=32, d_model=16, n_head=2, n_enc_layer=1, n_dec_layer=1,
...                                   max_len=8), rngs=nnx.Rngs(0))
>>> src_BxS, tgt_in_BxT = jnp.ones((2, 5), jnp.int32), jnp.ones((2, 7), jnp.int32)
>>> model(src_BxS, tgt_in_BxT).shape
(14, 32)
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

PAD = 0


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
    """Sizes of a `Transformer`; ``d_ff`` defaults to ``4 * d_model``; ``max_len`` bounds both sides."""

    vocab_size: int
    d_model: int = 256
    n_head: int = 4
    n_enc_layer: int = 3
    n_dec_layer: int = 3
    d_ff: int | None = None
    max_len: int = 128

    def __post_init__(self):
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        if self.d_model % self.n_head or self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even and divisible by n_head={self.n_head}")
        sizes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if any(v < 1 for v in sizes.values()):
            raise ValueError(f"every size must be positive, got {sizes}")


def sinusoids(length: int, d_model: int) -> Float[Array, "L d"]:
    """Transformer positional encodings: ``sin`` in the first half of the features, ``cos`` in the second."""
    inv_freq = np.exp(-math.log(10_000.0) * np.arange(0, d_model, 2) / d_model)
    angle_LxH = np.arange(length)[:, None] * inv_freq[None, :]
    return jnp.asarray(np.concatenate([np.sin(angle_LxH), np.cos(angle_LxH)], axis=1), jnp.float32)


class Attention(nnx.Module):
    """Multi-head attention: queries from ``x``, keys and values given (from `keys_values`)."""

    def __init__(self, n_head: int, d_model: int, rngs: nnx.Rngs):
        self.n_head = n_head
        self.q = nnx.Linear(d_model, d_model, rngs=rngs)
        self.kv = nnx.Linear(d_model, 2 * d_model, rngs=rngs)
        self.proj = nnx.Linear(d_model, d_model, rngs=rngs)

    def keys_values(self, x_BSxD: Float[Array, "BS d"], batch: int) -> tuple[Float[Array, "B S N H"], ...]:
        bs, d = x_BSxD.shape
        kv_BxSx2xNxH = self.kv(x_BSxD).reshape(batch, bs // batch, 2, self.n_head, d // self.n_head)
        return kv_BxSx2xNxH[:, :, 0], kv_BxSx2xNxH[:, :, 1]

    def __call__(
        self,
        x_BTxD: Float[Array, "BT d"],
        k_BxSxNxH: Float[Array, "B S N H"],
        v_BxSxNxH: Float[Array, "B S N H"],
        mask: Bool[Array, "#B 1 #T S"],
    ) -> Float[Array, "BT d"]:
        bt, d = x_BTxD.shape
        batch = k_BxSxNxH.shape[0]
        q_BxTxNxH = self.q(x_BTxD).reshape(batch, bt // batch, self.n_head, d // self.n_head)
        y_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, mask=mask)
        return self.proj(y_BxTxNxH.reshape(bt, d))


class MLP(nnx.Module):
    def __init__(self, d_model: int, d_ff: int, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(d_model, d_ff, rngs=rngs)
        self.fc2 = nnx.Linear(d_ff, d_model, rngs=rngs)

    def __call__(self, x_BTxD: Float[Array, "BT d"]) -> Float[Array, "BT d"]:
        return self.fc2(jax.nn.relu(self.fc1(x_BTxD)))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: Seq2SeqConfig, rngs: nnx.Rngs):
        self.ln_1 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.attn = Attention(cfg.n_head, cfg.d_model, rngs)
        self.ln_2 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, rngs)

    def __call__(self, x_BSxD: Float[Array, "BS d"], src_mask_Bx1x1xS: Bool[Array, "B 1 1 S"]) -> Float[Array, "BS d"]:
        h_BSxD = self.ln_1(x_BSxD)
        x_BSxD = x_BSxD + self.attn(h_BSxD, *self.attn.keys_values(h_BSxD, src_mask_Bx1x1xS.shape[0]), src_mask_Bx1x1xS)
        return x_BSxD + self.mlp(self.ln_2(x_BSxD))


KV = tuple[Float[Array, "B S N H"], Float[Array, "B S N H"]]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Seq2SeqConfig, rngs: nnx.Rngs):
        self.ln_1 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.self_attn = Attention(cfg.n_head, cfg.d_model, rngs)
        self.ln_2 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.cross_attn = Attention(cfg.n_head, cfg.d_model, rngs)
        self.ln_3 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, rngs)

    def __call__(
        self,
        x_BTxD: Float[Array, "BT d"],
        cross_kv: KV,
        src_mask_Bx1x1xS: Bool[Array, "B 1 1 S"],
        cache: KV | None = None,
        pos: Int[Array, ""] | None = None,
    ) -> tuple[Float[Array, "BT d"], KV]:
        """The whole target (``cache=None``, causal), or one position ``pos`` whose earlier keys and
        values are in ``cache`` (``(B, max_len, N, H)`` each). Returns the output and the self-attention
        keys and values (the updated cache)."""
        batch = src_mask_Bx1x1xS.shape[0]
        h_BTxD = self.ln_1(x_BTxD)
        k_BxTxNxH, v_BxTxNxH = self.self_attn.keys_values(h_BTxD, batch)
        if cache is None:
            t = k_BxTxNxH.shape[1]
            self_mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        else:
            k_BxTxNxH = jax.lax.dynamic_update_slice_in_dim(cache[0], k_BxTxNxH, pos, axis=1)
            v_BxTxNxH = jax.lax.dynamic_update_slice_in_dim(cache[1], v_BxTxNxH, pos, axis=1)
            self_mask = (jnp.arange(k_BxTxNxH.shape[1]) <= pos)[None, None, None]
        x_BTxD = x_BTxD + self.self_attn(h_BTxD, k_BxTxNxH, v_BxTxNxH, self_mask)
        x_BTxD = x_BTxD + self.cross_attn(self.ln_2(x_BTxD), *cross_kv, src_mask_Bx1x1xS)
        return x_BTxD + self.mlp(self.ln_3(x_BTxD)), (k_BxTxNxH, v_BxTxNxH)


class DecodeCache(NamedTuple):
    """What `Transformer.decode_step` needs: per decoder layer, the cross-attention keys/values of the
    source and the self-attention keys/values of the positions decoded so far; the source mask."""

    cross: tuple[KV, ...]
    self_kv: tuple[KV, ...]
    src_mask_Bx1x1xS: Bool[Array, "B 1 1 S"]


class Transformer(nnx.Module):
    """Encoder-decoder; ``model(src_BxS, tgt_in_BxT)`` returns logits ``(B*T, vocab)``.

    ``src`` is padded with `PAD` after its tokens; ``tgt_in`` is the target shifted right (``<bos>``
    first). Both lengths must be at most ``cfg.max_len``.
    """

    def __init__(self, cfg: Seq2SeqConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # Unit-variance embeddings after the sqrt(d) scale, unit-variance logits through the tied head.
        init = nnx.initializers.normal(cfg.d_model**-0.5)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init, rngs=rngs)
        self.encoder = nnx.List([EncoderLayer(cfg, rngs) for _ in range(cfg.n_enc_layer)])
        self.enc_ln = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.decoder = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.n_dec_layer)])
        self.dec_ln = nnx.LayerNorm(cfg.d_model, rngs=rngs)

    def _embed(self, ids_BxT: Int[Array, "B T"], positions_T: Int[Array, " T"]) -> Float[Array, "BT d"]:
        if ids_BxT.ndim != 2 or not jnp.issubdtype(ids_BxT.dtype, jnp.integer):
            raise TypeError(f"token ids must be a 2-D integer array (B, T), got {ids_BxT.dtype} {ids_BxT.shape}")
        batch, t = ids_BxT.shape
        if t > self.cfg.max_len:
            raise ValueError(f"sequence length {t} (ids of shape {ids_BxT.shape}) exceeds max_len={self.cfg.max_len}")
        pos_TxD = sinusoids(self.cfg.max_len, self.cfg.d_model)[positions_T]
        x_BxTxD = self.embed(ids_BxT) * math.sqrt(self.cfg.d_model) + pos_TxD[None]
        return x_BxTxD.reshape(batch * t, -1)

    def encode(self, src_BxS: Int[Array, "B S"]) -> Float[Array, "B S d"]:
        """The encoder output (the memory); positions where ``src == PAD`` are never attended to."""
        batch, s = src_BxS.shape
        src_mask_Bx1x1xS = (src_BxS != PAD)[:, None, None, :]
        x_BSxD = self._embed(src_BxS, jnp.arange(s))
        for layer in self.encoder:
            x_BSxD = layer(x_BSxD, src_mask_Bx1x1xS)
        return self.enc_ln(x_BSxD).reshape(batch, s, -1)

    def _cross_kv(self, memory_BxSxD: Float[Array, "B S d"]) -> tuple[KV, ...]:
        batch, s, d = memory_BxSxD.shape
        return tuple(layer.cross_attn.keys_values(memory_BxSxD.reshape(batch * s, d), batch) for layer in self.decoder)

    def decode(
        self, memory_BxSxD: Float[Array, "B S d"], src_mask_BxS: Bool[Array, "B S"], tgt_in_BxT: Int[Array, "B T"]
    ) -> Float[Array, "BT vocab"]:
        """Logits ``(B*T, vocab)`` of the next token at every target position (teacher forcing)."""
        if src_mask_BxS.shape != memory_BxSxD.shape[:2]:
            raise ValueError(f"src_mask of shape {src_mask_BxS.shape} does not match memory {memory_BxSxD.shape}")
        src_mask_Bx1x1xS = src_mask_BxS[:, None, None, :]
        x_BTxD = self._embed(tgt_in_BxT, jnp.arange(tgt_in_BxT.shape[1]))
        for layer, cross_kv in zip(self.decoder, self._cross_kv(memory_BxSxD)):
            x_BTxD, _ = layer(x_BTxD, cross_kv, src_mask_Bx1x1xS)
        return self.embed.attend(self.dec_ln(x_BTxD))

    def __call__(self, src_BxS: Int[Array, "B S"], tgt_in_BxT: Int[Array, "B T"]) -> Float[Array, "BT vocab"]:
        return self.decode(self.encode(src_BxS), src_BxS != PAD, tgt_in_BxT)

    def start_decoding(
        self, memory_BxSxD: Float[Array, "B S d"], src_mask_BxS: Bool[Array, "B S"], max_len: int
    ) -> DecodeCache:
        """An empty cache for decoding up to ``max_len`` target positions from ``memory``."""
        batch = memory_BxSxD.shape[0]
        h = self.cfg.d_model // self.cfg.n_head
        empty_BxLxNxH = jnp.zeros((batch, max_len, self.cfg.n_head, h), memory_BxSxD.dtype)
        self_kv = tuple((empty_BxLxNxH, empty_BxLxNxH) for _ in self.decoder)
        return DecodeCache(self._cross_kv(memory_BxSxD), self_kv, src_mask_BxS[:, None, None, :])

    def decode_step(
        self, cache: DecodeCache, tokens_B: Int[Array, " B"], pos: Int[Array, ""]
    ) -> tuple[Float[Array, "B vocab"], DecodeCache]:
        """Next-token logits after feeding ``tokens_B`` at position ``pos``; the cache with ``pos`` added."""
        x_BxD = self._embed(tokens_B[:, None], jnp.reshape(pos, (1,)))
        self_kv = []
        for layer, cross_kv, layer_cache in zip(self.decoder, cache.cross, cache.self_kv):
            x_BxD, kv = layer(x_BxD, cross_kv, cache.src_mask_Bx1x1xS, layer_cache, pos)
            self_kv.append(kv)
        return self.embed.attend(self.dec_ln(x_BxD)), cache._replace(self_kv=tuple(self_kv))


def masked_cross_entropy(logits_NxV: Float[Array, "N vocab"], targets_N: Int[Array, " N"]) -> Float[Array, ""]:
    """Mean token cross entropy (float32) over the targets that are not `PAD`; 0 when all are.

    >>> float(masked_cross_entropy(jnp.zeros((3, 4)), jnp.array([1, 2, PAD])))  # log 4
    1.3862943649291992
    """
    if logits_NxV.ndim != 2 or targets_N.shape != logits_NxV.shape[:1]:
        raise ValueError(f"expected logits (N, V) and targets (N,), got {logits_NxV.shape} and {targets_N.shape}")
    logp_NxV = jax.nn.log_softmax(logits_NxV.astype(jnp.float32))
    nll_N = -jnp.take_along_axis(logp_NxV, targets_N[:, None], axis=1)[:, 0]
    real_N = targets_N != PAD
    return jnp.sum(jnp.where(real_N, nll_N, 0.0)) / jnp.maximum(jnp.sum(real_N), 1)
