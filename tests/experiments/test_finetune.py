"""experiments.finetune: the Austen task's R reader and chapter split (no validation text in
training), and a tiny pre-train → fine-tune that keeps the 2:4 layers and their β."""

import gzip
import json
import struct
import zlib

import numpy as np
import pytest

from experiments.finetune import compare, data, rdata
from experiments.finetune import train as ft_train
from experiments.finetune.configs import get_config
from experiments.lm import train as lm_train
from experiments.lm.configs import get_config as lm_config

TINY = get_config("tiny")


def _xdr(*parts) -> bytes:
    return b"X\n" + struct.pack(">3i", 3, 0, 0) + struct.pack(">i", 5) + b"UTF-8" + b"".join(parts)


def _ints(*values) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _strings(*texts, attr=b"") -> bytes:
    flags = 16 | ((1 << 9) if attr else 0)
    out = _ints(flags, len(texts))
    for t in texts:
        out += _ints(9 | (1 << 18), len(t)) + t.encode()  # CHARSXP, UTF-8 flag
    return out + attr


def _names_attr(*names) -> bytes:  # pairlist (names = <character>) then NULL
    return _ints(2 | (1 << 10), 1) + _ints(9, 5) + b"names" + _strings(*names) + _ints(254)


def test_rdata_reads_a_lazy_load_database(tmp_path):
    novels = {"one": ["ONE", "Chapter 1", "a b"], "two": ["TWO", "Chapter 1", "c"]}
    blob, offsets = b"", []
    for lines in novels.values():
        body = _xdr(_strings(*lines))
        entry = struct.pack(">i", len(body)) + zlib.compress(body)
        offsets.append((len(blob), len(entry)))
        blob += entry
    variables = _ints(19 | (1 << 9), len(offsets)) + b"".join(_ints(13, 2, *o) for o in offsets) + _names_attr(*novels)
    index = _xdr(_ints(19 | (1 << 9), 3), variables, _ints(19, 0), _ints(10, 1, 1),
                 _names_attr("variables", "references", "compressed"))
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    assert rdata.lazy_load(tmp_path) == novels
    with pytest.raises(ValueError, match="truncated"):
        rdata.parse(_xdr(_strings("abc"))[:-1])


def test_chapters_drop_front_matter_headings_and_volumes():
    lines = ["EMMA", "By Jane Austen", "VOLUME I", "CHAPTER I", "", "Emma Woodhouse,", "", "Chapter 2", "Mr. Knightley",
             "VOLUME II", "CHAPTER III", "The end."]
    assert data.chapters(lines) == ["Emma Woodhouse,\n", "Mr. Knightley\n", "The end.\n"]


def test_the_split_holds_out_whole_chapters_and_windows_come_from_them():
    novels = data.load_novels("synthetic")
    split = data.split_chapters(novels, val_every=5)
    for c, title in enumerate(split.titles):
        parts = data.chapters(novels[title])
        assert split.val_chapters[c] == (2, 7) and sorted(split.train_chapters[c] + split.val_chapters[c]) == list(
            range(len(parts)))
        train_text, val_text = bytes(split.train[c]).decode(), bytes(split.val[c]).decode()
        assert val_text == parts[2] + parts[7] and all(parts[i] in train_text for i in split.train_chapters[c])
    x_NxL, y_N = data.eval_windows(split, seq_len=48, per_class=5)  # each holds a line's "(chapter)"
    for x, y in zip(x_NxL, y_N):
        window = bytes(x.astype(np.uint8))
        assert window in bytes(split.val[y]) and window not in bytes(split.train[y])
    a, b = (data.train_batch(split, 3, 8, 16, seed=1) for _ in range(2))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])  # a function of (seed, step)
    with pytest.raises(ValueError, match="val_every"):
        data.split_chapters(novels, val_every=1)


def _final(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return next(r for r in map(json.loads, lines) if r["kind"] == "final")


@pytest.mark.integration
def test_a_pretrained_sste_model_fine_tunes_sparse_with_its_own_beta(tmp_path):
    lm_run = lm_train.make_run(lm_config("tiny"), "sste", seed=0)
    lm_train.train(lm_run, tmp_path / "lm", progress=False)
    pretrained_beta = {k: v for k, v in _final(tmp_path / "lm").items() if k.startswith("beta/")}
    run = ft_train.make_run(TINY, "sste", 0, init_from=tmp_path / "lm")
    ft_train.train(run, tmp_path / "ft", progress=False)
    final = _final(tmp_path / "ft")
    assert 0.0 <= final["val_acc"] <= 1.0 and np.isfinite(final["val_loss"])
    assert {k.replace("beta/gpt/", "beta/"): v for k, v in final.items() if k.startswith("beta/")} == pretrained_beta
    assert all(v == 0.5 for k, v in final.items() if k.startswith("zero_fraction/"))
    with pytest.raises(ValueError, match="fine-tune it with --method sste"):
        ft_train.make_run(TINY, "srste", 0, init_from=tmp_path / "lm")
    scratch = ft_train.make_run(TINY, "dense", 0)
    ft_train.train(scratch, tmp_path / "scratch", progress=False)
    assert all(v == 0.0 for k, v in _final(tmp_path / "scratch").items() if k.startswith("zero_fraction/"))


def test_table_pairs_rows_by_seed():
    summary = {"dense": {"val_acc": [60.0, 62.0, 61.0], "val_loss": [1.0, 0.9, 0.95]},
               "sste": {"val_acc": [58.0, 61.0, 59.0], "val_loss": [1.1, 0.95, 1.0]},
               "scratch_dense": {"val_acc": [40.0, 41.0, 42.0], "val_loss": [1.5, 1.4, 1.45]}}
    text = compare.table(summary, {n: 1e-3 for n in summary}, [0, 1, 2])
    assert "| sste | 0.001 | 59.3 ± 1.5 | 58.0, 61.0, 59.0 | -1.7 [-3.1, -0.2]* |" in text
    assert "| dense − scratch_dense | +20.0 [+17.5, +22.5]* |" in text
