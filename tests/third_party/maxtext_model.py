"""Tiny llama2-style MaxText decoders that build, run forward and ``jax.grad`` on CPU in seconds.

Needs the Python 3.12 environment made by ``setup_py312.sh`` (MaxText 0.2.5 requires Python >= 3.12)::

    .venv312/bin/python tests/third_party/maxtext_model.py          # prints the facts used in the report

What MaxText 0.2.5 is (read from its source, checked by running this file):
  * ``maxtext.models.models.Transformer`` is a Flax **NNX** module. Pre-training (``maxtext.trainers.pre_train.train``)
    trains it directly: ``loss_fn(model, ...)`` calls ``model(decoder_input_tokens=..., decoder_positions=...,
    decoder_segment_ids=..., enable_dropout=config.enable_dropout, decoder_target_tokens=...,
    decoder_target_mask=...)`` under ``jax.value_and_grad`` of the split ``nnx.Param`` state.
  * The **Linen** model is ``models.transformer_as_linen(...)`` = ``TransformerLinen``, an ``nnx_wrappers.ToLinen``
    around that NNX class (what ``model_creation_utils.from_config(config, mesh=mesh)`` returns when no ``rngs`` are
    given; used by checkpoint conversion, AOT compile, inference). Its ``init`` returns params boxed in
    ``nn.LogicallyPartitioned``; its ``apply`` accepts boxed or plain params (it unboxes ``AxisMetadata``) and
    **re-constructs the NNX module, initialisers included, on every apply**, then overwrites its state.
  * MaxText 0.2.5 is built for jax >= 0.11.1. With jax 0.10.2 only one import breaks:
    ``jax.experimental.xla_metadata.must_fuse_call`` (used only by its jax flash-attention kernel). ``_shim_jax`` below
    adds a no-op stand-in before MaxText is imported; ``attention="dot_product"`` never calls it.

Forward jaxpr with scan_layers=True, param_scan_axis=1 (``jax.make_jaxpr(lambda p: tiny.apply(p))``, float32):
  * Linen apply first re-runs the full parameter initialisation (random_bits, an init ``scan`` of length num_layers),
    outputs unused; the NNX path has no such part.
  * Each stacked kernel (layers at axis 1) is ``transpose``d to layers-first OUTSIDE the decoder ``scan`` and enters
    it as an ``xs`` operand (sliced on axis 0); consts = positions, segment ids; carry = activations; the layers'
    RNG state (count u32[L], key[L] per stream) rides along as xs and comes back as ys that MaxText drops.
    With param_scan_axis=0 there is no transpose.
  * The scan body is one ``remat2`` (jax.checkpoint, remat_policy 'full' -> policy None, prevent_cse False).
  * Products are ``dot_general(activation, kernel)``, kernel on the rhs; RMSNorm's scale multiply is also a
    ``dot_general`` (scale on the lhs, batch dims only, no contraction). dtype=bfloat16 adds a
    ``convert_element_type`` f32->bf16 on each kernel inside the body, right before its dot_general.
"""
from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("DECOUPLE_GCLOUD", "TRUE")  # maxtext.common.gcloud_stub: stub out GCS / JetStream / diagnostics
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def _shim_jax():
    import jax.experimental.xla_metadata as xla_metadata

    if not hasattr(xla_metadata, "must_fuse_call"):  # jax >= 0.11 API, imported by maxtext's jax_flash_attention
        xla_metadata.must_fuse_call = lambda name: (lambda fn: fn)


_shim_jax()

from flax import nnx  # noqa: E402
from maxtext.configs import pyconfig  # noqa: E402
from maxtext.utils import max_utils, maxtext_utils, maxtext_utils_nnx, model_creation_utils  # noqa: E402
from maxtext.utils.globals import MAXTEXT_CONFIGS_DIR  # noqa: E402

SEQ, BATCH = 16, 2


def make_config(num_layers=2, *, scan_layers=True, param_scan_axis=1, emb=32, heads=4, kv_heads=4, head_dim=8,
                mlp=64, vocab=128, seq=SEQ, batch=BATCH, **overrides):
    """A MaxText ``HyperParameters`` from its own ``base.yml`` (decoder_block llama2, remat_policy 'full',
    mlp_activations ['silu', 'linear'], logits_via_embedding False), shrunk and made float32, single CPU device."""
    kwargs = dict(
        run_name="tiny", enable_checkpointing=False, skip_jax_distributed_system=True, hardware="cpu",
        dataset_type="synthetic", attention="dot_product", dtype="float32", weight_dtype="float32",
        base_emb_dim=emb, base_num_query_heads=heads, base_num_kv_heads=kv_heads, head_dim=head_dim,
        base_mlp_dim=mlp, base_num_decoder_layers=num_layers, vocab_size=vocab, max_target_length=seq,
        per_device_batch_size=batch, scan_layers=scan_layers, param_scan_axis=param_scan_axis,
    )
    kwargs.update(overrides)
    return pyconfig.initialize(["", os.path.join(MAXTEXT_CONFIGS_DIR, "base.yml")], **kwargs)


@dataclasses.dataclass
class Tiny:
    config: object  # pyconfig.HyperParameters
    mesh: jax.sharding.Mesh
    model: object  # models.TransformerLinen (Linen)
    tokens: jax.Array  # (batch, seq) int32
    positions: jax.Array  # (batch, seq) int32
    segment_ids: jax.Array  # (batch, seq) int32, all 1 (one packed segment)

    def init(self, key=None, *, enable_dropout=False):
        """``{'params': ...}`` with every leaf boxed in ``nn.LogicallyPartitioned`` (what MaxText's
        ``maxtext_utils.init_initial_state`` calls: rngs params/dropout/aqt)."""
        key = jax.random.key(0) if key is None else key
        params_key, dropout_key, aqt_key = jax.random.split(key, 3)
        return self.model.init({"params": params_key, "dropout": dropout_key, "aqt": aqt_key}, self.tokens,
                               self.positions, self.segment_ids, enable_dropout=enable_dropout)

    def apply(self, variables, tokens=None, *, enable_dropout=False, rngs=None, **kwargs):
        """Logits (batch, seq, vocab) float32."""
        tokens = self.tokens if tokens is None else tokens
        return apply(self.model, variables, tokens, enable_dropout=enable_dropout, rngs=rngs, **kwargs)


def _inputs(tokens):
    batch, seq = tokens.shape
    return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)), jnp.ones((batch, seq), jnp.int32)


def apply(model, variables, tokens, *, enable_dropout=False, rngs=None, **kwargs):
    """``model.apply`` the way MaxText's Linen callers do (e.g. ``experimental/rl/grpo_utils``): positional
    tokens and positions, ``decoder_segment_ids``, ``enable_dropout``, ``rngs`` (dropout/aqt; not needed when
    dropout is off), ``model_mode`` defaults to "train". Accepts ``{'params': p}`` or bare ``p``."""
    if "params" not in variables:
        variables = {"params": variables}
    positions, segment_ids = _inputs(tokens)
    return model.apply(variables, tokens, positions, decoder_segment_ids=segment_ids, enable_dropout=enable_dropout,
                       rngs=rngs, **kwargs)


def loss(variables, apply_fn, tokens):
    """Next-token cross entropy like MaxText's ``train.loss_fn``: ``max_utils.cross_entropy_with_logits`` against
    one-hot targets, masked by segment, summed and divided by the token count. ``apply_fn(variables, tokens)``
    returns logits (e.g. ``tiny.apply``; or ``functools.partial(apply, model)``)."""
    logits = apply_fn(variables, tokens)
    targets = tokens[:, 1:]
    xent, _ = max_utils.cross_entropy_with_logits(logits[:, :-1], jax.nn.one_hot(targets, logits.shape[-1]))
    mask = jnp.ones_like(targets, bool)
    return jnp.sum(xent * mask) / (jnp.sum(mask) + 1e-8)


def build(num_layers=2, *, scan_layers=True, param_scan_axis=1, **kwargs) -> Tiny:
    """The Linen ``TransformerLinen`` MaxText builds with ``from_config(config, mesh=mesh)``."""
    config = make_config(num_layers, scan_layers=scan_layers, param_scan_axis=param_scan_axis, **kwargs)
    mesh = maxtext_utils.get_mesh_from_config(config)
    model = model_creation_utils.from_config(config, mesh=mesh)
    tokens = jax.random.randint(jax.random.key(1), (config.micro_batch_size_to_train_on, config.max_target_length),
                                1, config.vocab_size, dtype=jnp.int32)
    return Tiny(config, mesh, model, tokens, *_inputs(tokens))


def build_nnx(num_layers=2, *, scan_layers=True, param_scan_axis=1, rng_key=None, **kwargs):
    """The NNX ``models.Transformer`` that MaxText's pre-training loop trains, with its rngs
    (``maxtext_utils_nnx.create_nnx_rngs``: streams params, dropout, aqt). Returns ``(model, config, tokens)``."""
    config = make_config(num_layers, scan_layers=scan_layers, param_scan_axis=param_scan_axis, **kwargs)
    mesh = maxtext_utils.get_mesh_from_config(config)
    rngs = maxtext_utils_nnx.create_nnx_rngs(config, rng_key=rng_key)
    model = model_creation_utils.from_config(config, mesh=mesh, rngs=rngs)
    tokens = jax.random.randint(jax.random.key(1), (config.micro_batch_size_to_train_on, config.max_target_length),
                                1, config.vocab_size, dtype=jnp.int32)
    return model, config, tokens


def nnx_loss(model, tokens, *, enable_dropout=False):
    """The NNX call of ``train.loss_fn`` (without its data-dict plumbing), same cross entropy as ``loss``."""
    positions, segment_ids = _inputs(tokens)
    logits = model(decoder_input_tokens=tokens, decoder_positions=positions, decoder_segment_ids=segment_ids,
                   enable_dropout=enable_dropout)
    nnx.pop(model, nnx.Intermediate)
    targets = tokens[:, 1:]
    xent, _ = max_utils.cross_entropy_with_logits(logits[:, :-1], jax.nn.one_hot(targets, logits.shape[-1]))
    return xent.mean()


def unbox(tree):
    """Strip ``nn.LogicallyPartitioned`` boxes."""
    import flax.linen as nn

    return nn.meta.unbox(tree)


def main():
    import time

    import optax

    for layers, kw in ((2, {}), (4, {}), (2, {"scan_layers": False}), (2, {"param_scan_axis": 0})):
        t = time.time()
        tiny = build(layers, **kw)
        variables = tiny.init()
        value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(variables, tiny.apply, tiny.tokens)
        plain = unbox(variables)
        value2 = loss(plain, tiny.apply, tiny.tokens)
        print(f"linen layers={layers} {kw} loss {float(value):.4f} (unboxed {float(value2):.4f}) "
              f"grad-norm {float(optax.global_norm(unbox(grads))):.4f} {time.time() - t:.1f}s")
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables, is_leaf=lambda x: hasattr(x, "names")):
            print("   ", jax.tree_util.keystr(path), type(leaf).__name__, leaf.value.shape, leaf.value.dtype,
                  getattr(leaf, "names", None))
    t = time.time()
    model, _, tokens = build_nnx(2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(params):
        return nnx_loss(nnx.merge(graphdef, params, rest, copy=True), tokens)

    value, grads = jax.value_and_grad(f)(params)
    print(f"nnx loss {float(value):.4f} grad-norm {float(optax.global_norm(grads)):.4f} {time.time() - t:.1f}s")


if __name__ == "__main__":
    main()
