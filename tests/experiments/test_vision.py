import gzip
import importlib.util
import json
import os
import re

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.common import cache, report
from experiments.common.recipes import get_recipe
from experiments.common.records import read_records
from experiments.vision import compare, data, train
from experiments.vision.configs import get_config
from sste_jax import nnx as sparse_nnx

TINY = get_config("tiny")


def test_digits_split_is_disjoint_and_standardised():
    x_train, y_train, x_test, y_test = data.load_digits_split()
    assert x_train.shape[1:] == (8, 8) and len(x_test) == 1797 // 5 and len(x_train) + len(x_test) == 1797
    rows = {x.tobytes() for x in x_train}
    assert sum(x.tobytes() in rows for x in x_test) < 5  # only the few duplicate images of the dataset
    assert set(np.unique(y_test)) == set(range(10))
    assert abs(float(x_train.mean())) < 1e-5 and abs(float(x_train.std()) - 1) < 1e-5


def test_config_follows_the_dataset_and_validates():
    assert TINY.model.seq_len == 17 and TINY.data.dataset == "digits"
    assert get_config("tiny", ["dataset=fashion"]).model.seq_len == 50
    with pytest.raises(ValueError, match="dataset='mnist'"):
        get_config("tiny", ["dataset=mnist"])
    with pytest.raises(ValueError, match="seq_len=20"):
        get_config("tiny", ["seq_len=20"])


@pytest.mark.parametrize("method", ["dense", "srste", "sste"])
def test_vit_mlps_are_sparse_layers(method):
    model = train.build_model(TINY, get_recipe(method), seed=0)
    sparse = [path for path, node in nnx.iter_graph(model) if isinstance(node, sparse_nnx.SparseLinear)]
    assert sorted("/".join(map(str, p)) for p in sparse) == ["blocks/0/mlp/fc1", "blocks/0/mlp/fc2"]
    assert model(jnp.zeros((3, 8, 8))).shape == (3, 10)
    with pytest.raises(ValueError, match=r"8x8.*\(3, 6, 6\)"):
        model(jnp.zeros((3, 6, 6)))


def test_batches_are_a_function_of_seed_and_step():
    task = train.make_task(TINY, 0, data.load_digits_split())
    x, y = task.batch_at(4)
    assert x.shape == (1, 32, 8, 8) and y.shape == (1, 32)
    assert np.array_equal(task.batch_at(4)[0], x) and not np.array_equal(task.batch_at(5)[0], x)
    assert not np.array_equal(train.make_task(TINY, 1, data.load_digits_split()).batch_at(4)[0], x)


@pytest.mark.integration
def test_tiny_end_to_end_per_method_through_compare(tmp_path):
    runs_dir = tmp_path / "runs"
    argv = ["--config", "tiny", "--methods", "dense", "srste", "sste", "--runs-dir", str(runs_dir)]
    text = compare.main(argv)
    for method in ("dense", "srste", "sste"):
        records = read_records(runs_dir / f"{method}_s0" / "metrics.jsonl")
        assert [r["step"] for r in records if r["kind"] == "train"] == [3, 6]
        assert all(np.isfinite(r["flip_rate"]) for r in records if r["kind"] == "train")
        final = report.final_record(records)
        assert 0.0 <= final["test_top1"] <= 1.0 and 0.0 <= final["train_top1"] <= 1.0
        assert final["steps"] == 6 and np.isfinite(final["train_loss"])
        assert f"| {method} |" in text
    assert "| dense | " in text and "| 1.000 ± 0.000 |" in text  # dense's flip rate over its own
    out = runs_dir / "report"
    assert (out / "table.md").read_text() == text
    for png in ("top1.png", "flip_rate.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert compare.main(argv) == text  # finished runs are reused, not retrained


@pytest.mark.integration
def test_learns_digits_quickly(tmp_path):
    # 150 steps of the small ViT, dense and S-STE: far above the 10% of chance on 359 held-out digits
    cfg, digits = get_config("small", ["steps=150"]), data.load_digits_split()
    for method in ("dense", "sste"):
        train.train(train.make_run(cfg, method), tmp_path / method, data=digits, progress=False)
        final = report.final_record(read_records(tmp_path / method / "metrics.jsonl"))
        assert final["test_top1"] > 0.6, final  # measured: ~77% both


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _fake_fashion(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "t10k"), sizes):
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))


@pytest.mark.integration
def test_fashion_idx_files_end_to_end(tmp_path):
    idx = tmp_path / "idx"
    _fake_fashion(idx, (64, 20))
    x_train, y_train, x_test, y_test = data.load_fashion_split(idx)
    assert x_train.shape == (64, 28, 28) and x_test.shape == (20, 28, 28) and y_test.shape == (20,)
    work = tmp_path / "run"
    train.main(["--config", "tiny", "--set", "dataset=fashion", "steps=2", "--data-dir", str(idx), "--method", "sste",
                "--workdir", str(work), "--quiet"])
    identity = json.loads((work / "run.json").read_text())["identity"]
    assert identity["config"]["data"]["dataset"] == "fashion" and identity["config"]["model"]["seq_len"] == 50
    assert "data_dir" not in json.dumps(identity)  # where the files are is not part of the run
    assert report.final_record(read_records(work / "metrics.jsonl"))["steps"] == 2
    (idx / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        data.load_fashion_split(idx)
    with pytest.raises(SystemExit, match="t10k-images"):
        train.main(["--config", "tiny", "--set", "dataset=fashion", "--data-dir", str(idx), "--workdir",
                    str(tmp_path / "other")])
    with pytest.raises(SystemExit, match="--data-dir is for dataset=fashion"):
        train.main(["--config", "tiny", "--data-dir", str(idx), "--workdir", str(tmp_path / "other")])


def test_unknown_method_is_rejected(tmp_path):
    with pytest.raises(SystemExit):
        compare.main(["--config", "tiny", "--methods", "dense", "bogus", "--runs-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        train.main(["--config", "tiny", "--method", "bogus", "--workdir", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        train.make_run(TINY, "bogus")
    assert not any(tmp_path.iterdir())


def test_summary_pairs_seeds_and_the_table_shows_spread():
    def run(method, seed, top1, flip):
        logs = [{"method": method, "seed": seed, "step": step, "kind": "train", "flip_rate": flip * (1 + step),
                 "train_loss": 0.5} for step in (2, 4, 6, 8)]
        return logs + [{"method": method, "seed": seed, "step": 8, "kind": "final", "steps": 8, "test_top1": top1,
                        "train_loss": 0.5}]

    records = (
        run("dense", 0, 0.90, 0.01)
        + run("dense", 1, 0.80, 0.02)
        + run("sste", 0, 0.94, 0.02)
        + run("sste", 1, 0.80, 0.02)
        + run("srste", 0, 0.92, 0.01)
        + run("srste", 1, 0.79, 0.01)
    )
    summary = compare.summarize(report.group_runs(records))
    assert summary["sste"]["test_top1"] == pytest.approx([94.0, 80.0])
    assert summary["sste"]["gap_dense"] == pytest.approx([4.0, 0.0])  # paired by seed
    assert summary["sste"]["flip_ratio"] == pytest.approx([2.0, 1.0])  # last quarter (step 8) over dense's, per seed
    text = compare.table(summary)
    assert "| sste | 87.0 ± 7.0 | 94.0, 80.0 | +2.0 [-23.4, +27.4] | 0.5000 ± 0.0000 | 1.500 ± 0.500 |" in text
    assert "| dense | 85.0 ± 5.0 | 90.0, 80.0 |  | 0.5000 ± 0.0000 | 1.000 ± 0.000 |" in text
    # sste − srste per seed 2.0, 1.0: mean 1.5, half-width t(1) 12.706 x 0.7071 / sqrt(2) = 6.35
    assert "| sste − srste | +1.5 [-4.9, +7.9] | +2.0, +1.0 |" in text and "sste − ste" not in text
    one_seed = compare.table(
        compare.summarize(report.group_runs(run("dense", 0, 0.90, 0.01) + run("sste", 0, 0.94, 0.02)))
    )
    assert "| sste | 94.0 ± 0.0 | 94.0 | +4.0 | 0.5000 ± 0.0000 | 2.000 ± 0.000 |" in one_seed
    assert "| difference" not in one_seed
    no_dense = compare.summarize(report.group_runs(run("sste", 0, 0.94, 0.02)))
    assert "gap_dense" not in no_dense[
        "sste"
    ] and "| sste | 94.0 ± 0.0 | 94.0 |  | 0.5000 ± 0.0000 |  |" in compare.table(no_dense)


@pytest.mark.integration
def test_resume_after_until_is_bit_identical(tmp_path):
    run, digits = train.make_run(TINY, "sste", seed=1), data.load_digits_split()
    straight = train.train(run, tmp_path / "straight", data=digits, progress=False)
    train.train(run, tmp_path / "split", until=4, data=digits, progress=False)
    resumed = train.train(run, tmp_path / "split", resume=True, data=digits, progress=False)
    assert int(resumed["step"]) == 6
    for key in ("params", "rest", "opt"):
        chex.assert_trees_all_equal(straight[key], resumed[key])
    # the split run also logs where it stopped (step 4), so its last train mean covers steps 5-6 only;
    # its evaluations and the rest of its final record are the straight run's
    drop = ("seconds", "train_loss")
    ends = [[{k: v for k, v in r.items() if k not in drop} for r in read_records(tmp_path / d / "metrics.jsonl")
             if r["kind"] != "train"] for d in ("straight", "split")]
    assert [r["kind"] for r in ends[0]] == ["eval", "final"] and ends[0] == ends[1]


@pytest.mark.integration
def test_workdir_with_other_settings_is_refused(tmp_path):
    base = ["--config", "tiny", "--method", "dense", "--workdir", str(tmp_path), "--quiet", "--until", "3"]
    train.main([*base, "--set", "steps=4"])
    with pytest.raises(SystemExit, match=r"config\.optim\.lr: 0\.003 != 0\.001"):
        train.main([*base, "--set", "steps=4", "lr=1e-3", "--resume"])
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main([*base, "--set", "steps=4"])


def _fake_tool(folder, name, exit_code, stderr):
    folder.mkdir(exist_ok=True)
    tool = folder / name
    tool.write_text(f"#!/bin/sh\necho '{stderr}' >&2\nexit {exit_code}\n")
    tool.chmod(0o755)


def test_fashion_fetch_names_the_failing_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="`apt-get` is not on PATH.*`apt-get download dataset-fashion-mnist`"):
        data.fetch_fashion(tmp_path / "cache")
    _fake_tool(tmp_path / "bin", "apt-get", 100, "E: Unable to locate package dataset-fashion-mnist")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    failed = r"`apt-get download dataset-fashion-mnist` failed \(exit 100\): E: Unable"
    with pytest.raises(SystemExit, match=failed):
        compare.main(["--config", "tiny", "--set", "dataset=fashion", "--cache-dir", str(tmp_path / "cache"),
                      "--runs-dir", str(tmp_path / "runs")])
    with pytest.raises(SystemExit, match=failed):
        train.main(["--config", "tiny", "--set", "dataset=fashion", "--cache-dir", str(tmp_path / "cache"),
                    "--workdir", str(tmp_path / "run")])
    assert not (tmp_path / "cache" / "dataset-fashion-mnist").exists()  # nothing half-unpacked is left
    assert not (tmp_path / "runs").exists() and not (tmp_path / "run").exists()


def test_fashion_is_read_from_the_cache_without_fetching(tmp_path, monkeypatch):
    folder = tmp_path / "dataset-fashion-mnist" / "usr" / "share" / "datasets" / "fashion-mnist"
    _fake_fashion(folder, (12, 8))
    cache.record_folder(tmp_path / "dataset-fashion-mnist", folder.iterdir())  # as fetch_debian does
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no apt-get: it must not be needed
    monkeypatch.setenv("SSTE_CACHE", str(tmp_path))
    assert data.fetch_fashion() == folder
    x_train, y_train, x_test, y_test = data.load_data("fashion")
    assert x_train.shape == (12, 28, 28) and y_test.shape == (8,)


def _fake_debian(bin_dir, tree):
    """apt-get and dpkg-deb stand-ins: ``apt-get download P`` leaves an empty P_1_all.deb, ``dpkg-deb -x``
    copies ``tree`` into its target."""
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text('#!/bin/sh\ntouch "$2_1_all.deb"\n')
    (bin_dir / "dpkg-deb").write_text(f'#!/bin/sh\nmkdir -p "$3" && cp -r "{tree}/." "$3"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)


def test_a_damaged_debian_file_in_the_cache_is_unpacked_again_with_a_warning(tmp_path, monkeypatch):
    _fake_fashion(tmp_path / "deb" / "usr" / "share" / "datasets" / "fashion-mnist", (12, 8))
    _fake_debian(tmp_path / "bin", tmp_path / "deb")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    folder = data.fetch_fashion(tmp_path / "cache")
    expected = data.load_fashion_split(folder)
    images = folder / "train-images-idx3-ubyte.gz"
    pixels = bytearray(gzip.decompress(images.read_bytes()))
    pixels[100] ^= 1  # one pixel, one bit
    images.write_bytes(gzip.compress(bytes(pixels)))
    with pytest.warns(RuntimeWarning, match=f"cache damaged: {re.escape(str(images))} has SHA-256"):
        assert data.fetch_fashion(tmp_path / "cache") == folder
    assert all(a.tobytes() == b.tobytes() for a, b in zip(data.load_fashion_split(folder), expected))


@pytest.mark.slow
def test_fashion_fetch_from_debian(tmp_path):
    x_train, y_train, x_test, y_test = data.load_data("fashion", cache_dir=tmp_path)
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert set(np.unique(y_train)) == set(range(10)) and np.bincount(y_test).tolist() == [1000] * 10


def test_digits_are_scikit_learns_from_either_source(tmp_path, monkeypatch):
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x, y = digits.images.astype(np.float32), digits.target.astype(np.int32)
    order = np.random.default_rng(3).permutation(len(y))
    test, train_rows = order[: len(y) // 5], order[len(y) // 5 :]
    x = (x - x[train_rows].mean()) / x[train_rows].std()
    expected = (x[train_rows], y[train_rows], x[test], y[test])
    from_wheel = data.load_digits_split(seed=3)
    # Without scikit-learn: Debian's python3-sklearn, here already unpacked in the cache (its gzip
    # header differs from the wheel's; the CSV inside is what is checked).
    folder = tmp_path / data.DIGITS_PACKAGE / "usr/lib/python3/dist-packages/sklearn/datasets/data"
    folder.mkdir(parents=True)
    csv = gzip.decompress(data.digits_file().read_bytes())
    (folder / "digits.csv.gz").write_bytes(gzip.compress(csv, mtime=1))
    cache.record_folder(tmp_path / data.DIGITS_PACKAGE, [folder / "digits.csv.gz"])  # as fetch_debian does
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "sklearn" else real_find_spec(n))
    assert data.digits_file(tmp_path) == folder / "digits.csv.gz"
    from_debian = data.load_digits_split(seed=3, cache_dir=tmp_path)
    for a, b, c in zip(expected, from_wheel, from_debian):
        assert a.dtype == b.dtype == c.dtype and a.tobytes() == b.tobytes() == c.tobytes()
    tampered = bytearray(csv)
    tampered[100] ^= 1
    (folder / "digits.csv.gz").write_bytes(gzip.compress(bytes(tampered)))
    cache.record_folder(tmp_path / data.DIGITS_PACKAGE, [folder / "digits.csv.gz"])  # a package that differs
    with pytest.raises(ValueError, match=r"SHA-256 .*\(scikit-learn's digits set\)"):
        data.load_digits_split(cache_dir=tmp_path)
