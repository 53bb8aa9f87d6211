"""A tiny Google DeepMind ``gemma`` transformer (``gm.nn.Transformer``, Flax Linen) that runs on CPU in seconds.

Needs the Python 3.12 environment made by ``setup_py312.sh`` (gemma requires Python >= 3.12)::

    .venv312/bin/python tests/third_party/gemma_model.py

Facts (gemma 4.0.1):
  * ``Transformer.__call__`` is wrapped in ``nn.jit``; blocks are a Python list (``layer_0``, ``layer_1``, ...),
    no scan, no remat.
  * Every weight product is ``gm.nn.Einsum`` -> ``jnp.einsum(eqn, x, w)`` (weight on the right):
      FeedForward   ``gating_einsum`` (2, F, H)   '...F,NFH->...NH'   (or (2, H, F) '...F,NHF->...NH' when
                                                                        ``transpose_gating_einsum=True``, as Gemma 3)
                    ``linear``        (H, F)      '...H,HF->...F'
      Attention     ``q_einsum``      (N, D, H)   'BTD,NDH->BTNH'     (when num_kv_heads != num_heads)
                    ``kv_einsum``     (2, K, D, H) 'BSD,CKDH->CBSKH'
                    ``qkv_einsum``    (3, N, D, H) 'BTD,SNDH->SBTNH'  (when num_kv_heads == num_heads)
                    ``attn_vec_einsum`` (N, H, D) 'BTNH,NHD->BTD'
      Embedder      ``input_embedding`` (V, D): gather to encode, ``x @ table.T`` to decode (tied).
    In the jaxpr (jnp.einsum -> dot_general) the weight is the rhs operand except ``kv_einsum`` / ``qkv_einsum``,
    where it is the lhs; ``attn_vec_einsum`` contracts act dims (3, 2) with weight dims (1, 0), i.e. (H, N).
  * The parameter dtype is the module's ``dtype`` (default bfloat16): pass ``dtype=jnp.float32`` for float32.
"""
from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # kauldron imports tensorflow

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from gemma import gm  # noqa: E402
from gemma.gm.nn import _config  # noqa: E402

VOCAB, SEQ, BATCH = 128, 16, 2


@dataclasses.dataclass
class Tiny:
    model: gm.nn.Transformer
    tokens: jax.Array  # (BATCH, SEQ) int32, no 0s (gemma treats 0 as padding)
    config: _config.TransformerConfig

    def init(self, key=None):
        """Plain (unboxed) ``{'params': ...}``."""
        return self.model.init(jax.random.key(0) if key is None else key, self.tokens)

    def apply(self, variables, tokens=None):
        """Logits (BATCH, SEQ, VOCAB)."""
        return self.model.apply(variables, self.tokens if tokens is None else tokens).logits


def config(num_layers=2, embed_dim=32, hidden_dim=64, num_heads=2, head_dim=16, num_kv_heads=1, vocab=VOCAB,
           transpose_gating_einsum=False):
    return _config.TransformerConfig(
        num_embed=vocab, embed_dim=embed_dim, hidden_dim=hidden_dim, num_heads=num_heads, head_dim=head_dim,
        num_kv_heads=num_kv_heads, final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True,
        attention_types=(gm.nn.AttentionType.GLOBAL,) * num_layers,
        transpose_gating_einsum=transpose_gating_einsum,
    )


def build(num_layers=2, dtype=jnp.float32, **kwargs) -> Tiny:
    cfg = config(num_layers=num_layers, **kwargs)
    model = gm.nn.Transformer(config=cfg, dtype=dtype)
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 1, cfg.num_embed)
    return Tiny(model, tokens, cfg)


def loss(variables, apply_fn, tokens):
    """Next-token cross entropy; ``apply_fn(variables, tokens)`` returns gemma's ``Output``."""
    logits = apply_fn(variables, tokens).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def build_feed_forward(features=32, hidden_dim=64):
    """gemma's FeedForward alone: (module, x)."""
    ff = gm.nn.FeedForward(features=features, hidden_dim=hidden_dim, transpose_gating_einsum=False)
    return ff, jax.random.normal(jax.random.key(2), (BATCH, SEQ, features), jnp.float32)


def main():
    import time

    for kw in ({}, {"num_kv_heads": 2}, {"transpose_gating_einsum": True}):
        t = time.time()
        tiny = build(**kw)
        variables = tiny.init()
        shapes = jax.tree_util.tree_map_with_path(lambda p, x: (jax.tree_util.keystr(p), x.shape, x.dtype),
                                                  variables)
        value, grads = jax.value_and_grad(loss)(variables, tiny.model.apply, tiny.tokens)
        print(kw, "loss", float(value), "grad-norm", float(optax.global_norm(grads)), f"{time.time() - t:.1f}s")
        if not kw:
            for path, shape, dtype in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)):
                print("  ", path, shape, dtype)
    ff, x = build_feed_forward()
    params = ff.init(jax.random.key(0), x)
    print("FeedForward", jax.tree.map(jnp.shape, params),
          jax.grad(lambda p: (ff.apply(p, x) ** 2).mean())(params)["params"]["linear"].shape)


if __name__ == "__main__":
    main()
