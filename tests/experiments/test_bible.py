import importlib.util
import json
import re
import time
import unicodedata

import numpy as np
import pytest

from experiments.common import cache
from experiments.translation import data as bible

HAS_TOKENIZERS = importlib.util.find_spec("tokenizers") is not None
needs_tokenizers = pytest.mark.skipif(not HAS_TOKENIZERS, reason="needs PyPI tokenizers (experiments extra)")


@pytest.fixture(scope="module")
def synthetic():
    return bible.load_parallel("synthetic")


@pytest.fixture(scope="module")
def tokenizer(synthetic):
    if not HAS_TOKENIZERS:
        pytest.skip("needs PyPI tokenizers (experiments extra)")
    return bible.get_translation_tokenizer(synthetic["train"], vocab_size=300)


def _books(pairs):
    return {p.book for p in pairs}


def test_synthetic_splits_are_disjoint_by_book_and_deterministic(synthetic):
    train, val, test = synthetic["train"], synthetic["val"], synthetic["test"]
    assert train and val and test
    assert _books(val) == set(bible.SYNTHETIC_VAL_BOOKS) and _books(test) == set(bible.SYNTHETIC_TEST_BOOKS)
    assert not (_books(train) & _books(val) or _books(train) & _books(test) or _books(val) & _books(test))
    assert len(train) + len(val) + len(test) == len(bible.synthetic_pairs())
    assert bible.load_parallel("synthetic") == synthetic


def test_synthetic_mapping_is_word_substitution_with_adjective_before_noun():
    pairs = bible.synthetic_pairs(n_books=1, verses_per_book=300)
    with_adjective = [p for p in pairs if p.source.startswith("El perro grande ")]
    assert with_adjective and all(p.target.startswith("The big dog ") for p in with_adjective)
    joined = [p for p in pairs if " y " in p.source]
    assert joined and all(" and " in p.target for p in joined)
    assert all(p.source[0].isupper() and p.source.endswith(".") and p.target.endswith(".") for p in pairs)


def test_split_by_book_rejects_overlap_and_missing_books(synthetic):
    pairs = synthetic["train"]
    with pytest.raises(ValueError, match="both"):
        bible.split_by_book(pairs, ["book_00"], ["book_00", "book_01"])
    with pytest.raises(ValueError, match="book_99"):
        bible.split_by_book(pairs, ["book_99"], ["book_01"])
    with pytest.raises(ValueError, match="unknown corpus"):
        bible.load_parallel("klingon")


def test_clean_verse_removes_markup_and_normalises_whitespace():
    raw = " ¶ And the \\nd LORD spake  unto Moses,\tsaying, "
    assert bible.clean_verse(raw) == "And the LORD spake unto Moses, saying,"
    decomposed = unicodedata.normalize("NFD", "Espíritu de Dios")
    assert bible.clean_verse(decomposed) == "Espíritu de Dios" != decomposed


@needs_tokenizers
def test_tokenizer_round_trips_text_and_reserves_special_ids(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == 300
    for text in ["El perro grande ve una casa azul.", "Y dijo Dios: Sea la luz: y fué la luz.",
                 "¡Ñandú! «naïve» 漢字 🙂  two  spaces"]:  # bytes never seen in training too
        ids = tokenizer.encode(text)
        assert ids and min(ids) > tokenizer.unk_id
        assert tokenizer.decode(ids) == text
    nfd = unicodedata.normalize("NFD", "ciudad alegría")
    assert tokenizer.decode(tokenizer.encode(nfd)) == unicodedata.normalize("NFC", nfd)
    ids = tokenizer.encode("La casa.")
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id, 7, 8, tokenizer.pad_id]) == "La casa."


@needs_tokenizers
def test_tokenizer_is_cached_by_vocab_size_and_training_text(synthetic, tmp_path):
    train = synthetic["train"]
    first = bible.get_translation_tokenizer(train, vocab_size=300, cache_dir=tmp_path)
    files = sorted((tmp_path / "translation_tokenizers").glob("*.json"))
    assert len(files) == 1 and "bpe300-" in files[0].name and cache.record_of(files[0]).is_file()
    mtime = files[0].stat().st_mtime_ns
    again = bible.get_translation_tokenizer(train, vocab_size=300, cache_dir=tmp_path)
    assert files[0].stat().st_mtime_ns == mtime and again.to_str() == first.to_str()
    bible.get_translation_tokenizer(train[1:], vocab_size=300, cache_dir=tmp_path)
    bible.get_translation_tokenizer(train, vocab_size=280, cache_dir=tmp_path)
    assert len(list((tmp_path / "translation_tokenizers").glob("*.json"))) == 3
    files[0].write_text(files[0].read_text().replace('"<unk>"', '"<UNK>"', 1))
    with pytest.warns(RuntimeWarning, match=f"cache damaged: {re.escape(str(files[0]))} has SHA-256"):
        assert bible.get_translation_tokenizer(train, vocab_size=300, cache_dir=tmp_path).to_str() == first.to_str()
    with pytest.raises(ValueError, match="vocab_size"):
        bible.get_translation_tokenizer(train, vocab_size=100)


@needs_tokenizers
def test_encode_split_layout(synthetic, tokenizer):
    pairs = synthetic["val"][:20]
    max_len = bible.max_len_for(pairs, tokenizer, percentile=100)
    enc = bible.encode_split(pairs, tokenizer, max_len)
    assert enc.n_dropped == 0 and list(enc.pairs) == pairs and enc.references == [p.target for p in pairs]
    for arr in (enc.src, enc.tgt_in, enc.tgt_out):
        assert arr.shape == (20, max_len) and arr.dtype == np.int32
    np.testing.assert_array_equal(enc.tgt_in[:, 0], tokenizer.bos_id)
    np.testing.assert_array_equal(enc.tgt_in[:, 1:], enc.tgt_out[:, :-1] * (enc.tgt_out[:, :-1] != tokenizer.eos_id))
    for row, pair in enumerate(pairs):
        src, tgt = tokenizer.encode(pair.source), tokenizer.encode(pair.target)
        np.testing.assert_array_equal(enc.src[row], np.pad(src + [2], (0, max_len - len(src) - 1)))
        np.testing.assert_array_equal(enc.tgt_out[row], np.pad(tgt + [2], (0, max_len - len(tgt) - 1)))
        assert tokenizer.decode(enc.tgt_out[row]) == pair.target and tokenizer.decode(enc.src[row]) == pair.source


@needs_tokenizers
def test_encode_split_drops_long_pairs_instead_of_truncating(synthetic, tokenizer):
    pairs = synthetic["val"]
    src_len, tgt_len = bible.token_lengths(pairs, tokenizer)
    longest = np.maximum(src_len, tgt_len)
    max_len = int(np.median(longest))
    enc = bible.encode_split(pairs, tokenizer, max_len)
    assert 0 < enc.n_dropped == int(np.sum(longest > max_len)) < len(pairs)
    assert len(enc.pairs) == len(enc.src) == len(pairs) - enc.n_dropped
    assert list(enc.pairs) == [p for p, n in zip(pairs, longest) if n <= max_len]
    # every kept row ends with <eos> (no truncation): its last non-pad token is <eos>
    last = enc.tgt_out[np.arange(len(enc.src)), (enc.tgt_out != 0).sum(1) - 1]
    np.testing.assert_array_equal(last, tokenizer.eos_id)
    with pytest.raises(ValueError, match="max_len"):
        bible.encode_split(pairs, tokenizer, 1)


@needs_tokenizers
def test_max_len_for_is_a_percentile_rounded_up(synthetic, tokenizer):
    pairs = synthetic["train"]
    longest = np.maximum(*bible.token_lengths(pairs, tokenizer))
    assert bible.max_len_for(pairs, tokenizer, 100, multiple_of=1) == longest.max()
    for q in (50, 90, 99):
        max_len = bible.max_len_for(pairs, tokenizer, q, multiple_of=8)
        assert max_len % 8 == 0 and max_len - 8 < np.percentile(longest, q, method="higher") <= max_len
        assert np.mean(longest <= max_len) >= q / 100
    with pytest.raises(ValueError, match="percentile"):
        bible.max_len_for(pairs, tokenizer, 0)


def test_fetch_without_apt_get_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="(?s)`apt-get` is not on PATH.*synthetic"):
        bible.load_parallel("bible", cache_dir=tmp_path)


def test_failed_download_says_to_run_apt_get_update(tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_apt = fake_bin / "apt-get"
    fake_apt.write_text("#!/bin/sh\necho 'E: Unable to locate package sword-text-sparv' >&2\nexit 100\n")
    fake_apt.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake_bin))
    with pytest.raises(RuntimeError, match=r"(?s)`apt-get download sword-text-sparv` failed \(exit 100\)"
                                           r".*Unable to locate.*apt-get update"):
        bible.fetch_bible_pairs(tmp_path)
    assert [p.name for p in (tmp_path / "bible").iterdir()] == []  # no half-fetched package left


def _cache_pairs(cache_dir, books):
    """A ``pairs.jsonl`` as `fetch_bible_pairs` writes it (with its record), one verse per book."""
    (cache_dir / "bible").mkdir()
    lines = [json.dumps({"book": b, "chapter": 1, "verse": 1, "es": f"Yo {b}.", "en": f"I {b}."}, ensure_ascii=False)
             for b in books]
    path = cache_dir / "bible" / "pairs.jsonl"
    cache.write_recorded(path, "".join(line + "\n" for line in lines).encode())
    return path


def test_cached_pairs_are_reused_without_fetching(tmp_path, monkeypatch):
    _cache_pairs(tmp_path, ["Gen", *bible.BIBLE_VAL_BOOKS, *bible.BIBLE_TEST_BOOKS])
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # any fetch would fail
    splits = bible.load_parallel("bible", cache_dir=tmp_path)
    assert [p.book for p in splits["train"]] == ["Gen"]
    assert _books(splits["val"]) == set(bible.BIBLE_VAL_BOOKS)
    assert _books(splits["test"]) == set(bible.BIBLE_TEST_BOOKS)
    assert splits["train"][0] == bible.Pair("Gen", 1, 1, "Yo Gen.", "I Gen.")


def test_damaged_cached_pairs_are_refused_naming_the_file_when_they_cannot_be_rebuilt(tmp_path, monkeypatch):
    path = _cache_pairs(tmp_path, ["Gen", *bible.BIBLE_VAL_BOOKS, *bible.BIBLE_TEST_BOOKS])
    path.write_bytes(path.read_bytes().replace(b"I Gen.", b"I Gem."))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # the packages cannot be fetched
    with pytest.warns(RuntimeWarning, match=re.escape(str(path))), pytest.raises(
            cache.CacheError, match=f"(?s){re.escape(str(path))} has SHA-256 .*`apt-get` is not on PATH"):
        bible.load_parallel("bible", cache_dir=tmp_path)
    assert not path.exists()


@pytest.mark.slow
@needs_tokenizers
def test_real_bible_download_and_parse(tmp_path):
    pytest.importorskip("pysword")
    start = time.perf_counter()
    splits = bible.load_parallel("bible", cache_dir=tmp_path)
    fetch_s = time.perf_counter() - start
    sizes = {name: len(pairs) for name, pairs in splits.items()}
    assert sum(sizes.values()) == 31084
    assert 0.04 < sizes["val"] / 31084 < 0.06 and 0.04 < sizes["test"] / 31084 < 0.06
    first = splits["train"][0]
    assert first[:3] == ("Gen", 1, 1) and first.target == "In the beginning God created the heaven and the earth."
    assert first.source.startswith("EN el principio crió Dios")
    everything = [p for pairs in splits.values() for p in pairs]
    assert all(p.source and p.target and "\\" not in p.target + p.source for p in everything)
    start = time.perf_counter()
    assert bible.load_parallel("bible", cache_dir=tmp_path) == splits
    reload_s = time.perf_counter() - start
    tok = bible.get_translation_tokenizer(splits["train"], vocab_size=8000, cache_dir=tmp_path)
    assert tok.vocab_size == 8000
    max_len = bible.max_len_for(splits["train"], tok, 99)
    enc = bible.encode_split(splits["test"], tok, max_len)
    assert enc.n_dropped < 0.03 * sizes["test"]
    assert tok.decode_batch(enc.tgt_out[:5]) == enc.references[:5]
    print(f"\nfetch+parse {fetch_s:.1f}s, reload {reload_s:.2f}s, sizes {sizes}, max_len@99% {max_len}, "
          f"test dropped {enc.n_dropped}")
