import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.common import recipes
from experiments.translation import decode
from experiments.translation import model as seq2seq
from experiments.translation.model import PAD, Seq2SeqConfig, Transformer
from sste_jax import nnx as sparse_nnx

BOS, EOS = 1, 2


def _model(vocab_size=24, max_len=12, layers=2, seed=0) -> Transformer:
    cfg = Seq2SeqConfig(vocab_size, d_model=16, n_head=2, n_enc_layer=layers, n_dec_layer=layers, max_len=max_len)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def _padded_src(rng, lengths, width, vocab_size=24):
    src_BxS = rng.integers(3, vocab_size, (len(lengths), width))
    src_BxS[np.arange(width)[None] >= np.array(lengths)[:, None]] = PAD
    return jnp.asarray(src_BxS, jnp.int32)


def test_shapes_and_config_errors():
    model = _model()
    src_BxS, tgt_BxT = _padded_src(np.random.default_rng(0), [5, 3, 7], 7), jnp.ones((3, 9), jnp.int32)
    assert model.cfg.d_ff == 64
    assert model(src_BxS, tgt_BxT).shape == (27, 24) and model.encode(src_BxS).shape == (3, 7, 16)
    with pytest.raises(ValueError, match=r"length 13 .*\(3, 13\).*max_len=12"):
        model(src_BxS, jnp.ones((3, 13), jnp.int32))
    with pytest.raises(TypeError, match="integer"):
        model(src_BxS.astype(jnp.float32), tgt_BxT)
    with pytest.raises(ValueError, match="n_head=3"):
        Seq2SeqConfig(24, d_model=16, n_head=3)
    with pytest.raises(ValueError, match=r"max_len=13 .*max_len=12"):
        decode.greedy_decode(model, src_BxS, BOS, EOS, max_len=13)


def test_source_padding_does_not_leak():
    model = _model()
    src_BxS, tgt_BxT = _padded_src(np.random.default_rng(1), [5, 2, 7], 7), jnp.full((3, 6), 5, jnp.int32)
    logits = model(src_BxS, tgt_BxT)
    more_pad_BxS = jnp.pad(src_BxS, ((0, 0), (0, 4)))  # padded positions, with encoder states of their own
    np.testing.assert_allclose(model(more_pad_BxS, tgt_BxT), logits, atol=1e-5)
    memory_BxSxD, src_mask_BxS = model.encode(src_BxS), src_BxS != PAD
    garbage_BxSxD = jnp.where(src_mask_BxS[:, :, None], memory_BxSxD, 1e3)
    np.testing.assert_allclose(model.decode(garbage_BxSxD, src_mask_BxS, tgt_BxT), logits, atol=1e-5)
    changed_BxS = src_BxS.at[1, 0].set(src_BxS[1, 0] % 20 + 3)  # a real token changes the output
    assert not np.allclose(model(changed_BxS, tgt_BxT).reshape(3, 6, -1)[1], logits.reshape(3, 6, -1)[1])


def test_decoder_is_causal():
    model = _model()
    src_BxS = _padded_src(np.random.default_rng(2), [4, 6], 6)
    tgt_BxT = jnp.asarray(np.random.default_rng(3).integers(3, 24, (2, 8)), jnp.int32)
    logits_BxTxV = model(src_BxS, tgt_BxT).reshape(2, 8, -1)
    changed_BxTxV = model(src_BxS, tgt_BxT.at[:, 5].set(tgt_BxT[:, 5] % 20 + 3)).reshape(2, 8, -1)
    np.testing.assert_allclose(changed_BxTxV[:, :5], logits_BxTxV[:, :5], atol=1e-6)
    assert not np.allclose(changed_BxTxV[:, 5:], logits_BxTxV[:, 5:], atol=1e-3)


def test_feed_forward_selects_exactly_the_mlp_linears():
    model = _model()
    src_BxS = _padded_src(np.random.default_rng(4), [4, 6, 2, 5], 6)
    dense_ids = decode.greedy_decode(model, src_BxS, BOS, EOS, 8)
    recipes.sparsify(model, recipes.get_recipe("sste"), recipes.FEED_FORWARD, seed=0)
    sparse = ["/".join(map(str, p)) for p, n in nnx.iter_graph(model) if isinstance(n, sparse_nnx.SparseLinear)]
    expected = [f"{stack}/{i}/mlp/{fc}" for stack in ("encoder", "decoder") for i in (0, 1) for fc in ("fc1", "fc2")]
    assert sorted(sparse) == sorted(expected)
    dense = [p for p, n in nnx.iter_graph(model) if type(n) is nnx.Linear]
    assert len(dense) == 2 * 3 + 2 * 6  # q, kv, proj per attention: 1 per encoder layer, 2 per decoder layer
    sparse_ids = decode.greedy_decode(model, src_BxS, BOS, EOS, 8)
    assert sparse_ids.shape == dense_ids.shape and not np.array_equal(sparse_ids, dense_ids)


def test_masked_cross_entropy_ignores_pads():
    rng = np.random.default_rng(5)
    logits_NxV = rng.normal(size=(10, 7)).astype(np.float32)
    targets_N = np.array([3, PAD, 1, 6, PAD, PAD, 2, 5, 4, PAD])
    real = targets_N != PAD
    logp_NxV = logits_NxV - np.log(np.exp(logits_NxV).sum(1, keepdims=True))
    manual = -logp_NxV[np.arange(10), targets_N][real].mean()
    loss, grad_NxV = jax.value_and_grad(seq2seq.masked_cross_entropy)(jnp.asarray(logits_NxV), jnp.asarray(targets_N))
    np.testing.assert_allclose(loss, manual, rtol=1e-6)
    assert np.all(grad_NxV[~real] == 0) and np.all(np.abs(grad_NxV[real]).sum(1) > 0)
    assert float(seq2seq.masked_cross_entropy(jnp.asarray(logits_NxV), jnp.zeros(10, jnp.int32))) == 0.0
    with pytest.raises(ValueError, match=r"\(10, 7\) and \(9,\)"):
        seq2seq.masked_cross_entropy(jnp.asarray(logits_NxV), jnp.zeros(9, jnp.int32))


def _greedy_reference(model, src_BxS, eos_id, max_len):
    """No cache: the whole model on a fixed-width target buffer (causal, so later slots do not matter) once
    per position, argmax there; then everything after the first eos blanked out."""
    forward = nnx.jit(lambda m, s, t: m(s, t))
    batch = len(src_BxS)
    tgt_BxT = np.full((batch, max_len), PAD, np.int32)
    tgt_BxT[:, 0] = BOS
    out_BxL = np.zeros((batch, max_len), np.int32)
    for t in range(max_len):
        out_BxL[:, t] = np.argmax(forward(model, src_BxS, jnp.asarray(tgt_BxT)).reshape(batch, max_len, -1)[:, t], -1)
        tgt_BxT[:, t + 1:t + 2] = out_BxL[:, t:t + 1]
    for row in out_BxL:
        if eos_id in row.tolist():
            row[row.tolist().index(eos_id) + 1:] = PAD
    return out_BxL


def test_greedy_decode_matches_step_by_step_reference():
    model = _model()
    src_BxS = _padded_src(np.random.default_rng(6), [5, 2, 7, 1], 7)
    no_eos = _greedy_reference(model, src_BxS, eos_id=-1, max_len=10)
    np.testing.assert_array_equal(decode.greedy_decode(model, src_BxS, BOS, -1, 10), no_eos)
    eos = int(no_eos[0, 3])  # a token the model emits: rows stop there and pad the rest
    expected = _greedy_reference(model, src_BxS, eos, max_len=10)
    assert (expected == PAD).sum() >= 6
    np.testing.assert_array_equal(decode.greedy_decode(model, src_BxS, BOS, eos, 10), expected)


def test_cached_decode_steps_match_teacher_forcing():
    model = _model()
    src_BxS = _padded_src(np.random.default_rng(9), [5, 2, 7], 7)
    tgt_BxT = jnp.asarray(np.random.default_rng(10).integers(3, 24, (3, 6)), jnp.int32)
    memory_BxSxD = model.encode(src_BxS)
    expected_BxTxV = model.decode(memory_BxSxD, src_BxS != PAD, tgt_BxT).reshape(3, 6, -1)
    cache = model.start_decoding(memory_BxSxD, src_BxS != PAD, max_len=6)
    for t in range(6):
        logits_BxV, cache = model.decode_step(cache, tgt_BxT[:, t], jnp.int32(t))
        np.testing.assert_allclose(logits_BxV, expected_BxTxV[:, t], atol=1e-5)


def test_beam_decode_with_a_wide_beam_is_exhaustive():
    # vocab 5, 3 steps: a beam of 4**2 keeps every eos-free prefix, so the search is exact
    model, alpha, max_len = _model(vocab_size=5, max_len=4, seed=1), 0.6, 3
    src_BxS = _padded_src(np.random.default_rng(7), [3, 2], 3, vocab_size=5)
    seqs = [p + (EOS,) for n in range(max_len) for p in itertools.product([0, 1, 3, 4], repeat=n)]
    seqs_CxL = np.array([s + (PAD,) * (max_len - len(s)) for s in seqs], np.int32)
    tgt_in_CxL = np.concatenate([np.full((len(seqs), 1), BOS, np.int32), seqs_CxL[:, :-1]], axis=1)
    best = []
    for src_S in src_BxS:
        src_CxS = jnp.tile(src_S[None], (len(seqs), 1))
        logp_CxLxV = jax.nn.log_softmax(model(src_CxS, jnp.asarray(tgt_in_CxL))).reshape(len(seqs), max_len, -1)
        logp_CxL = np.take_along_axis(np.asarray(logp_CxLxV), seqs_CxL[:, :, None], axis=2)[:, :, 0]
        lengths_C = np.array([len(s) for s in seqs])
        score_C = np.where(np.arange(max_len)[None] < lengths_C[:, None], logp_CxL, 0).sum(1)
        best.append(seqs_CxL[np.argmax(score_C / ((5 + lengths_C) / 6) ** alpha)])
    beam = decode.beam_decode(model, src_BxS, BOS, EOS, max_len, beam=16, length_penalty=alpha)
    np.testing.assert_array_equal(beam, np.stack(best))


def test_translate_batches_and_ids_to_texts():
    model = _model()
    src_NxS = _padded_src(np.random.default_rng(8), [3, 5, 1, 4, 2], 5)
    ids_NxL = decode.translate(decode.greedy_decode, model, src_NxS, BOS, EOS, 6, batch_size=2)
    np.testing.assert_array_equal(ids_NxL, decode.greedy_decode(model, src_NxS, BOS, EOS, 6))
    texts = decode.ids_to_texts(np.array([[7, 8, EOS, 9], [PAD, 7, PAD, 8]]), lambda ids: "-".join(map(str, ids)), EOS)
    assert texts == ["7-8", "7-8"]


def test_bleu_identical_and_disjoint():
    refs = ["In the beginning God created the heaven and the earth.", "And the earth was without form, and void."]
    assert decode.bleu(refs, refs) == pytest.approx(100.0)
    assert decode.bleu(["zzz qqq xxx yyy www", "uuu vvv"], refs) < 1e-6
    with pytest.raises(ValueError, match="1 hypotheses but 2 references"):
        decode.bleu(refs[:1], refs)


def _copy_batch(rng, batch, vocab_size=16, max_symbols=7):
    """Source: 2..max_symbols symbols then pads; target: the same symbols, then eos."""
    lengths = rng.integers(2, max_symbols + 1, batch)
    src_BxS = _padded_src(rng, lengths, max_symbols, vocab_size)
    tgt_out = np.full((batch, max_symbols + 1), PAD, np.int32)
    for b, n in enumerate(lengths):
        tgt_out[b, :n + 1] = [*np.asarray(src_BxS[b, :n]), EOS]
    tgt_in = np.concatenate([np.full((batch, 1), BOS, np.int32), tgt_out[:, :-1]], axis=1)
    tgt_in[tgt_in == EOS] = PAD
    return src_BxS, jnp.asarray(tgt_in), jnp.asarray(tgt_out)


@pytest.mark.integration
@pytest.mark.parametrize("method", ["dense", "sste"])
def test_learns_to_copy(method):
    cfg = Seq2SeqConfig(vocab_size=16, d_model=32, n_head=2, n_enc_layer=1, n_dec_layer=1, max_len=8)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    if method != "dense":
        recipes.sparsify(model, recipes.get_recipe(method), seed=0)
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, src_BxS, tgt_in_BxT, tgt_out_BxT):
        def loss_fn(m):
            return seq2seq.masked_cross_entropy(m(src_BxS, tgt_in_BxT), tgt_out_BxT.reshape(-1))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(0)
    for _ in range(200):
        loss = train_step(model, optimizer, *_copy_batch(rng, 64))
    src_BxS, _, tgt_out_BxT = _copy_batch(np.random.default_rng(1), 200)
    for decoder in (decode.greedy_decode, decode.beam_decode):
        ids_BxL = decoder(model, src_BxS, BOS, EOS, 8)
        exact = np.mean(np.all(np.asarray(ids_BxL) == np.asarray(tgt_out_BxT), axis=1))
        assert exact > 0.9, (decode.__name__, exact, float(loss))  # measured 0.95-0.99 (3 seeds, both methods)
