"""Decoding a translation `Transformer`: greedy and beam search, jitted with a fixed length, reusing the
encoder output and a key/value cache; `translate` to strings, `bleu` with sacrebleu (13a tokenisation).

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from experiments.translation.model import Seq2SeqConfig, Transformer
>>> model = Transformer(Seq2SeqConfig(vocab_size=32, d_model=16, n_head=2, n_enc_layer=1, n_dec_layer=1,
...                                   max_len=8), rngs=nnx.Rngs(0))
>>> greedy_decode(model, jnp.ones((2, 5), jnp.int32), bos_id=1, eos_id=2, max_len=6).shape
(2, 6)
"""

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Int

from experiments.translation.model import PAD, Transformer


def _check_decode_args(model: Transformer, src_BxS, max_len: int) -> None:
    if not 1 <= max_len <= model.cfg.max_len:
        raise ValueError(f"max_len={max_len} must be in [1, the model's max_len={model.cfg.max_len}]")
    if src_BxS.ndim != 2:
        raise ValueError(f"src must be (B, S), got shape {src_BxS.shape}")


def greedy_decode(
    model: Transformer, src_BxS: Int[Array, "B S"], bos_id: int, eos_id: int, max_len: int
) -> Int[Array, "B max_len"]:
    """Greedy decoding (jitted per shape): ``max_len`` tokens per source, ``eos_id`` included, `PAD` after it.

    Stops early once every row has produced ``eos_id``. A model with MVUE layers needs ``B`` divisible
    by 4 (each step feeds ``B`` tokens through them).
    """
    src_BxS = jnp.asarray(src_BxS)
    _check_decode_args(model, src_BxS, max_len)
    graphdef, state = nnx.split(model)
    return _greedy(graphdef, state, src_BxS, bos_id, eos_id, max_len)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _greedy(graphdef, state, src_BxS, bos_id: int, eos_id: int, max_len: int):
    model = nnx.merge(graphdef, state)  # merged afresh in the loop too: a layer may mutate (MVUE key counters)
    batch = src_BxS.shape[0]
    cache = model.start_decoding(model.encode(src_BxS), src_BxS != PAD, max_len)

    def running(carry):
        pos, _, _, done_B, _ = carry
        return (pos < max_len) & ~jnp.all(done_B)

    def step(carry):
        pos, tokens_B, cache, done_B, out_BxL = carry
        logits_BxV, cache = nnx.merge(graphdef, state).decode_step(cache, tokens_B, pos)
        next_B = jnp.where(done_B, PAD, jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32))
        out_BxL = jax.lax.dynamic_update_slice_in_dim(out_BxL, next_B[:, None], pos, axis=1)
        return pos + 1, next_B, cache, done_B | (next_B == eos_id), out_BxL

    init = (jnp.zeros((), jnp.int32), jnp.full((batch,), bos_id, jnp.int32), cache, jnp.zeros((batch,), bool),
            jnp.full((batch, max_len), PAD, jnp.int32))
    return jax.lax.while_loop(running, step, init)[-1]


def beam_decode(
    model: Transformer,
    src_BxS: Int[Array, "B S"],
    bos_id: int,
    eos_id: int,
    max_len: int,
    beam: int = 4,
    length_penalty: float = 0.6,
) -> Int[Array, "B max_len"]:
    """Beam search (jitted per shape): the finished hypothesis with the best ``log p / lp(len)``,
    ``lp(n) = ((5 + n) / 6) ** length_penalty`` (GNMT), with ``n`` counting ``eos``; a row with no
    finished hypothesis returns its best live one. Runs all ``max_len`` steps. Output as `greedy_decode`'s.
    """
    src_BxS = jnp.asarray(src_BxS)
    _check_decode_args(model, src_BxS, max_len)
    if beam < 1:
        raise ValueError(f"beam must be positive, got {beam}")
    if not 0 <= eos_id < model.cfg.vocab_size:
        raise ValueError(f"eos_id={eos_id} is not a token id of the vocabulary (size {model.cfg.vocab_size})")
    graphdef, state = nnx.split(model)
    return _beam(graphdef, state, src_BxS, bos_id, eos_id, max_len, beam, float(length_penalty))


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6, 7))
def _beam(graphdef, state, src_BxS, bos_id: int, eos_id: int, max_len: int, beam: int, alpha: float):
    model = nnx.merge(graphdef, state)
    batch = src_BxS.shape[0]
    memory_BKxSxD = jnp.repeat(model.encode(src_BxS), beam, axis=0)  # row b*beam + k: beam k of source b
    cache = model.start_decoding(memory_BKxSxD, jnp.repeat(src_BxS != PAD, beam, axis=0), max_len)
    rows_B = jnp.arange(batch)

    def step(pos, carry):
        tokens_BK, cache, score_BxK, seqs_BxKxL, best_score_B, best_BxL = carry
        logits_BKxV, cache = nnx.merge(graphdef, state).decode_step(cache, tokens_BK, pos)
        logp_BxKxV = jax.nn.log_softmax(logits_BKxV.astype(jnp.float32)).reshape(batch, beam, -1)
        vocab = logp_BxKxV.shape[-1]
        cand_BxKxV = score_BxK[:, :, None] + logp_BxKxV
        # Finishing here: the best candidate that ends with eos, against the best finished so far.
        end_score_BxK = cand_BxKxV[:, :, eos_id] / ((5.0 + pos + 1) / 6.0) ** alpha
        k_end_B = jnp.argmax(end_score_BxK, axis=1)
        end_B = end_score_BxK[rows_B, k_end_B]
        ended_BxL = seqs_BxKxL[rows_B, k_end_B].at[:, pos].set(eos_id)
        better_B = end_B > best_score_B
        best_score_B = jnp.where(better_B, end_B, best_score_B)
        best_BxL = jnp.where(better_B[:, None], ended_BxL, best_BxL)
        # Staying alive: the top `beam` candidates that do not end with eos.
        cand_BxKxV = cand_BxKxV.at[:, :, eos_id].set(-jnp.inf)
        score_BxK, flat_BxK = jax.lax.top_k(cand_BxKxV.reshape(batch, -1), beam)
        parent_BxK, token_BxK = flat_BxK // vocab, (flat_BxK % vocab).astype(jnp.int32)
        seqs_BxKxL = seqs_BxKxL[rows_B[:, None], parent_BxK].at[:, :, pos].set(token_BxK)
        flat_parent_BK = (rows_B[:, None] * beam + parent_BxK).reshape(-1)
        cache = cache._replace(self_kv=jax.tree.map(lambda a: a[flat_parent_BK], cache.self_kv))
        return token_BxK.reshape(-1), cache, score_BxK, seqs_BxKxL, best_score_B, best_BxL

    # Only beam 0 is live at the start, so the first step does not pick `beam` copies of one token.
    score_BxK = jnp.tile(jnp.where(jnp.arange(beam) == 0, 0.0, -jnp.inf)[None], (batch, 1))
    init = (
        jnp.full((batch * beam,), bos_id, jnp.int32),
        cache,
        score_BxK,
        jnp.full((batch, beam, max_len), PAD, jnp.int32),
        jnp.full((batch,), -jnp.inf),
        jnp.full((batch, max_len), PAD, jnp.int32),
    )
    _, _, _, seqs_BxKxL, best_score_B, best_BxL = jax.lax.fori_loop(0, max_len, step, init)
    live_BxL = seqs_BxKxL[:, 0]  # top_k sorts: beam 0 is the best live hypothesis
    return jnp.where(jnp.isfinite(best_score_B)[:, None], best_BxL, live_BxL)


def translate(
    decode: Callable[..., Int[Array, "B L"]],
    model: Transformer,
    src_NxS: Int[Array, "N S"],
    bos_id: int,
    eos_id: int,
    max_len: int,
    batch_size: int = 64,
) -> np.ndarray:
    """``decode`` (`greedy_decode` or `beam_decode`) over ``src`` in batches of ``batch_size``; the last
    batch is padded with copies of its first row, so one shape compiles once. Returns ``(N, max_len)``."""
    src_NxS = np.asarray(src_NxS)
    outs = []
    for i in range(0, len(src_NxS), batch_size):
        chunk_BxS = src_NxS[i : i + batch_size]
        filler = np.repeat(chunk_BxS[:1], batch_size - len(chunk_BxS), axis=0)
        ids_BxL = decode(model, np.concatenate([chunk_BxS, filler]), bos_id, eos_id, max_len)
        outs.append(np.asarray(ids_BxL)[: len(chunk_BxS)])
    return np.concatenate(outs) if outs else np.zeros((0, max_len), np.int32)


def ids_to_texts(ids_NxL, detokenize: Callable[[list[int]], str], eos_id: int) -> list[str]:
    """One string per row: the ids before the first ``eos_id``, `PAD` dropped, through ``detokenize``.

    >>> ids_to_texts(np.array([[5, 6, 2, 7], [8, PAD, 9, PAD]]), lambda ids: " ".join(map(str, ids)), eos_id=2)
    ['5 6', '8 9']
    """
    texts = []
    for row in np.asarray(ids_NxL).tolist():
        row = row[: row.index(eos_id)] if eos_id in row else row
        texts.append(detokenize([t for t in row if t != PAD]))
    return texts


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) with one reference per hypothesis: sacrebleu, its default 13a tokenisation.

    >>> round(bleu(["the cat sat on the mat"], ["the cat sat on the mat"]), 6)
    100.0
    """
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)
