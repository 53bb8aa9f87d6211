"""Text from a trained run: the run's model loaded from its last checkpoint, sampled with a KV cache.

    python -m experiments.lm.sample --workdir runs/sste --prompt "ROMEO:" --tokens 200 --temperature 0.8 --top-k 40
    python -m experiments.lm.sample --workdir runs/sste --weights compressed      # 2:4 layers from packed weights
    python -m experiments.lm.sample --workdir runs/sste --export runs/sste_hf     # the model of an export_hf folder
    python -m experiments.lm.sample --workdir runs/sste --export runs/sste_hf --backend cusparselt  # GPU

``--weights``: ``trained`` (the run's layers as trained, 2:4 forward weights), ``dense`` (every sparse
layer densified: an ``nnx.Linear`` holding its forward weight), ``compressed`` (2:4 layers as
`sste_jax.nnx.CompressedLinear`, decompressed once per generation, before decoding). All three hold
the same forward weights; they give the same tokens for a seed when the run's 2:4 layers compute
float products, while ``dense`` turns a run trained with FP8 products into float products (other
logits: `experiments.lm.agreement` measures it). ``--export`` reads an `experiments.lm.export_hf`
folder back, refusing one whose files do not match its ``SHA256SUMS``. Sampling is a pure function
of the weights, the prompt, the temperature, top-k and the seed. ``--backend`` (with ``--export`` or
``--weights compressed``) serves the 2:4 layers through `sste_jax.nnx.to_backend`: ``xla``
(decompressed once at load; the same tokens), ``cusparselt`` or ``cusparselt-fp8`` (cuSPARSELt
products on an NVIDIA GPU, bf16 or e4m3: rounding may change tokens).

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from experiments.lm.model import GPT
>>> model = GPT(vocab_size=256, n_layer=1, n_head=2, d_model=16, seq_len=16, rngs=nnx.Rngs(0))
>>> out = generate(model, jnp.array([[72, 105]]), 5, temperature=0.8, top_k=10, seed=0)
>>> out.shape, bool((out == generate(model, jnp.array([[72, 105]]), 5, temperature=0.8, top_k=10, seed=0)).all())
((1, 5), True)
"""

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from experiments.common import flags
from experiments.lm.export_hf import import_hf
from experiments.lm.model import GPT
from experiments.lm.train import load_run
from sste_jax import nnx as sparse_nnx

WEIGHTS = ("trained", "dense", "compressed")


def with_weights(model: GPT, weights: str) -> GPT:
    """A copy of ``model`` whose sparse layers are kept (``"trained"``), densified (``"dense"``) or
    compressed (``"compressed"``); the forward weights are the same in all three."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: use one of {WEIGHTS}")
    copy = nnx.clone(model)
    if weights == "dense":
        return sparse_nnx.densify_layers(copy)
    if weights == "compressed":
        return sparse_nnx.compress_layers(copy)
    return copy


def _forward(model: GPT, ids_BxT, cache, start):
    """Logits of the last position and the updated cache, for ``ids_BxT`` at positions ``start + t``;
    ``cache`` holds each layer's keys and values ``(B, L, heads, head_dim)``."""
    batch, t = ids_BxT.shape
    x_BTxD = (model.wte(ids_BxT) + model.wpe(start + jnp.arange(t))[None]).reshape(batch * t, -1)
    new_cache = []
    for block, (k_BxLxNxH, v_BxLxNxH) in zip(model.blocks, cache):
        attn = block.attn
        n, length = attn.n_head, k_BxLxNxH.shape[1]
        qkv = attn.c_attn(block.ln_1(x_BTxD)).reshape(batch, t, 3, n, -1)
        q_BxTxNxH = qkv[:, :, 0]
        k_BxLxNxH = jax.lax.dynamic_update_slice(k_BxLxNxH, qkv[:, :, 1], (0, start, 0, 0))
        v_BxLxNxH = jax.lax.dynamic_update_slice(v_BxLxNxH, qkv[:, :, 2], (0, start, 0, 0))
        visible_TxL = jnp.arange(length)[None, :] <= start + jnp.arange(t)[:, None]  # causal, and only filled slots
        y_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_BxLxNxH, v_BxLxNxH, mask=visible_TxL[None, None])
        x_BTxD = x_BTxD + attn.c_proj(y_BxTxNxH.reshape(batch * t, -1))
        x_BTxD = x_BTxD + block.mlp(block.ln_2(x_BTxD))
        new_cache.append((k_BxLxNxH, v_BxLxNxH))
    last_BxD = x_BTxD.reshape(batch, t, -1)[:, -1]
    return model.wte.attend(model.ln_f(last_BxD)).astype(jnp.float32), new_cache


def _pick(logits_BxV: Float[Array, "B V"], key, temperature: float, top_k: int) -> Int[Array, " B"]:
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1)
    if top_k:
        kth_B = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_B, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV / temperature, axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _generate(graphdef, state, prompt_BxP, steps: int, temperature: float, top_k: int, key):
    model = sparse_nnx.decompress_layers(nnx.merge(graphdef, state))  # 2:4 weights decompressed once, here
    batch, p = prompt_BxP.shape
    d, n = model.wte.features, model.blocks[0].attn.n_head
    length = p + steps
    cache = [(jnp.zeros((batch, length, n, d // n), model.wte.embedding.dtype),) * 2 for _ in model.blocks]
    logits_BxV, cache = _forward(model, prompt_BxP, cache, 0)

    def step(carry, i):
        logits_BxV, cache = carry
        token_B = _pick(logits_BxV, jax.random.fold_in(key, i), temperature, top_k)
        logits_BxV, cache = _forward(model, token_B[:, None], cache, p + i)
        return (logits_BxV, cache), token_B

    _, tokens_SxB = jax.lax.scan(step, (logits_BxV, cache), jnp.arange(steps))
    return tokens_SxB.T


def generate(model: GPT, prompt_BxP: Int[Array, "B P"], steps: int, *, temperature: float = 1.0, top_k: int = 0,
             seed: int = 0) -> Int[Array, "B steps"]:
    """``steps`` new tokens after each prompt (all prompts of one length), one forward pass per token with
    a KV cache. ``temperature=0`` is greedy; ``top_k`` > 0 samples among the k most likely tokens.
    Deterministic: the same weights, prompt, settings and ``seed`` give the same tokens."""
    prompt_BxP = jnp.asarray(prompt_BxP)
    if prompt_BxP.ndim != 2 or prompt_BxP.shape[1] < 1 or not jnp.issubdtype(prompt_BxP.dtype, jnp.integer):
        raise ValueError(f"prompt must be integer token ids of shape (batch, length >= 1), got {prompt_BxP.dtype}"
                         f"{list(prompt_BxP.shape)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: must be an integer >= 1")
    if prompt_BxP.shape[1] + steps > model.seq_len:
        raise ValueError(f"prompt length {prompt_BxP.shape[1]} + steps {steps} exceeds the model's context "
                         f"seq_len={model.seq_len}")
    if not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r}: must be a finite number >= 0")
    vocab = model.wte.num_embeddings
    if not isinstance(top_k, int) or not 0 <= top_k <= vocab:
        raise ValueError(f"top_k={top_k!r}: must be an integer in [0, vocab_size={vocab}]")
    model(prompt_BxP)  # checks the ids against the vocabulary (concrete ids)
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt_BxP.astype(jnp.int32), steps, float(temperature), top_k,
                     jax.random.key(seed))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the training run (its run.json and checkpoints)")
    p.add_argument("--export", help="an export_hf folder: sample its weights (read back into our GPT) instead")
    p.add_argument("--weights", choices=WEIGHTS, default="trained")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--tokens", type=flags.integer(1), default=100,
                   help="new tokens (prompt + tokens <= the model's seq_len)")
    p.add_argument("--temperature", type=flags.number(minimum=0), default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=flags.integer(0), default=0, help="0: all tokens")
    p.add_argument("--seed", type=flags.integer(0), default=0)
    p.add_argument("--backend", choices=sparse_nnx.BACKENDS, default=None,
                   help="serve the compressed 2:4 layers (--export or --weights compressed) this way")
    args = p.parse_args(argv)
    if args.backend and not args.export and args.weights != "compressed":
        p.error("--backend applies to compressed 2:4 layers: add --export DIR or --weights compressed")
    return args


def main(argv=None) -> None:

    args = parse_args(argv)
    try:
        model, tokenizer, _ = load_run(args.workdir)
        model = import_hf(args.export, model) if args.export else with_weights(model, args.weights)
        prompt = tokenizer.encode(args.prompt)
        if args.backend:
            model = sparse_nnx.to_backend(model, args.backend)
        tokens = generate(model, jnp.asarray([prompt]), args.tokens, temperature=args.temperature,
                          top_k=args.top_k, seed=args.seed)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # a run or export that cannot be read names its file
        sys.exit(f"error: {e}")
    print(args.prompt + tokenizer.decode(np.asarray(tokens[0]).tolist()))


if __name__ == "__main__":
    main()
