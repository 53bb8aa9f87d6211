"""The downstream task: which of Jane Austen's six novels a window of text comes from.

- `load_novels(corpus, cache_dir)` -> ``{title: lines}``: ``"austen"`` is Debian's
  ``r-cran-janeaustenr`` (public-domain Project Gutenberg texts), fetched once into the cache
  directory with ``apt-get download`` (`experiments.common.cache.fetch_debian`: verified on every use)
  and read from its R data (`experiments.finetune.rdata`); ``"synthetic"`` is three generated
  "novels" that need no download.
- `split_chapters(novels, val_every)` -> `Split`: each novel cut into chapters at its ``CHAPTER``
  headings (front matter and headings dropped); every ``val_every``-th chapter, from the third,
  is held out for validation, the rest is training text. A validation window never holds training
  text, and the language models were pre-trained on Shakespeare only: no window was seen before.
- `train_batch(split, step, batch_size, seq_len, seed)` -> ``(x_BxL, y_B)``: a novel drawn uniformly,
  then a window of its training text; a pure function of ``(seed, step)``.
- `eval_windows(split, seq_len, per_class)` -> ``(x_NxL, y_N)``: ``per_class`` evenly spaced windows
  of each novel's validation text.

Text is UTF-8 bytes (the byte-level tokenizer of the pre-trained ``capacity`` models).

>>> split = split_chapters(load_novels("synthetic"), val_every=5)
>>> x_BxL, y_B = train_batch(split, step=0, batch_size=4, seq_len=16, seed=0)
>>> x_BxL.shape, y_B.shape, split.titles
((4, 16), (4,), ('alpha', 'beta', 'gamma'))
"""

import dataclasses
import pathlib
import re

import numpy as np

from experiments.common.cache import cache_dir_default, fetch_debian
from experiments.finetune import rdata

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
_CHAPTER = re.compile(r"^\s*chapter\b", re.I)
_VOLUME = re.compile(r"^\s*volume\b", re.I)


@dataclasses.dataclass(frozen=True)
class Split:
    """Per class (novel, in ``titles`` order): training and validation text as byte arrays, and
    which chapters went where."""

    titles: tuple[str, ...]
    train: tuple[np.ndarray, ...]
    val: tuple[np.ndarray, ...]
    train_chapters: tuple[tuple[int, ...], ...]
    val_chapters: tuple[tuple[int, ...], ...]


def _synthetic_novels(chapters: int = 12, lines: int = 40) -> dict[str, list[str]]:
    """Three "novels" whose sentences use each its own names and end with their chapter's number."""
    rng = np.random.default_rng(7)
    verbs = ["visits", "writes to", "dances with", "speaks of", "walks with"]
    names = {"alpha": ["Anne", "Arthur"], "beta": ["Bella", "Bertram"], "gamma": ["Grace", "Gilbert"]}
    novels = {}
    for title, (a, b) in names.items():
        text = [title.upper(), ""]
        for c in range(chapters):
            text += [f"CHAPTER {c + 1}", ""]
            text += [f"{rng.choice([a, b])} {rng.choice(verbs)} {rng.choice([a, b, 'the family'])}. ({c + 1})"
                     for _ in range(lines)]
        novels[title] = text
    return novels


def fetch_austen(cache_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """The R data folder of ``r-cran-janeaustenr``, unpacked once into ``<cache>/r-cran-janeaustenr``."""
    target = pathlib.Path(cache_dir or cache_dir_default()) / AUSTEN_PACKAGE
    return fetch_debian(AUSTEN_PACKAGE, target, AUSTEN_DATA, "Jane Austen's novels",
                        "use --set corpus=synthetic")


def load_novels(corpus: str = "austen", cache_dir: str | pathlib.Path | None = None) -> dict[str, list[str]]:
    """``{title: lines}`` of the six novels (``"austen"``, fetched once) or the synthetic three."""
    if corpus == "synthetic":
        return _synthetic_novels()
    if corpus != "austen":
        raise ValueError(f"unknown corpus {corpus!r}: use 'austen' or 'synthetic'")
    novels = rdata.lazy_load(fetch_austen(cache_dir))
    return {title: [line or "" for line in lines] for title, lines in sorted(novels.items())}


def chapters(lines: list[str]) -> list[str]:
    """The chapters' texts (lines joined by newlines), without the front matter and the headings."""
    out: list[list[str]] = []
    for line in lines:
        if _CHAPTER.match(line):
            out.append([])
        elif out and not _VOLUME.match(line):
            out[-1].append(line)
    return ["\n".join(chapter).strip("\n") + "\n" for chapter in out]


def split_chapters(novels: dict[str, list[str]], val_every: int = 5) -> Split:
    """Every ``val_every``-th chapter of each novel (indices 2, 2 + val_every, ...) for validation."""
    if val_every < 2:
        raise ValueError(f"val_every={val_every}: must be >= 2 (some chapters must remain for training)")
    titles, train, val, train_ids, val_ids = [], [], [], [], []
    for title, lines in novels.items():
        parts = chapters(lines)
        held = [i for i in range(len(parts)) if i % val_every == 2 % val_every]
        kept = [i for i in range(len(parts)) if i not in held]
        if not held or not kept:
            raise ValueError(f"{title}: {len(parts)} chapters cannot be split with val_every={val_every}")
        titles.append(title)
        train.append(np.frombuffer("".join(parts[i] for i in kept).encode("utf-8"), np.uint8))
        val.append(np.frombuffer("".join(parts[i] for i in held).encode("utf-8"), np.uint8))
        train_ids.append(tuple(kept))
        val_ids.append(tuple(held))
    return Split(tuple(titles), tuple(train), tuple(val), tuple(train_ids), tuple(val_ids))


def train_batch(split: Split, step: int, batch_size: int, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``batch_size`` windows of training text, each of a class drawn uniformly; int32."""
    rng = np.random.default_rng([seed, step])
    y_B = rng.integers(0, len(split.titles), size=batch_size)
    starts = [rng.integers(0, len(split.train[c]) - seq_len + 1) for c in y_B]
    x_BxL = np.stack([split.train[c][s:s + seq_len] for c, s in zip(y_B, starts)])
    return x_BxL.astype(np.int32), y_B.astype(np.int32)


def eval_windows(split: Split, seq_len: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` evenly spaced windows of each class's validation text, the same for every call."""
    xs, ys = [], []
    for c, text in enumerate(split.val):
        if len(text) < seq_len:
            raise ValueError(f"{split.titles[c]}: {len(text)} validation bytes, fewer than seq_len={seq_len}")
        starts = np.linspace(0, len(text) - seq_len, per_class).astype(np.int64)
        xs.append(np.stack([text[s:s + seq_len] for s in starts]))
        ys.append(np.full(per_class, c))
    return np.concatenate(xs).astype(np.int32), np.concatenate(ys).astype(np.int32)
