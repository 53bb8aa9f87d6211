import gzip
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import methods, report, vision
from sste_jax import nnx as sparse_nnx


def test_digits_split_is_disjoint_and_standardised():
    x_train, y_train, x_test, y_test = vision.load_digits_split()
    assert x_train.shape[1:] == (8, 8) and len(x_test) == 1797 // 5 and len(x_train) + len(x_test) == 1797
    assert set(np.unique(y_test)) == set(range(10))
    assert abs(float(x_train.mean())) < 1e-5 and abs(float(x_train.std()) - 1) < 1e-5


@pytest.mark.parametrize("method", ["dense", "srste", "sste"])
def test_vit_mlps_are_sparse_layers(method):
    cfg = vision.dataset_config(vision.CONFIGS["tiny"], "digits")
    model = vision.build_model(cfg, methods.METHODS[method], seed=0)
    sparse = [path for path, node in nnx.iter_graph(model) if isinstance(node, sparse_nnx.SparseLinear)]
    assert sorted("/".join(map(str, p)) for p in sparse) == ["blocks/0/mlp/fc1", "blocks/0/mlp/fc2"]
    assert model(jnp.zeros((3, 8, 8))).shape == (3, 10)
    with pytest.raises(ValueError, match=r"8x8.*\(3, 6, 6\)"):
        model(jnp.zeros((3, 6, 6)))


def test_tiny_end_to_end_per_method(tmp_path):
    finals = vision.main(["--config", "tiny", "--methods", "dense,srste,sste", "--out", str(tmp_path)])
    assert [f["method"] for f in finals] == ["dense", "srste", "sste"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for f in finals:
        assert 0.0 <= f["test_top1"] <= 1.0 and np.isfinite(f["train_loss"])
        logs = [r for r in records if r["method"] == f["method"] and "final" not in r]
        assert [r["step"] for r in logs] == [3, 6] and all(np.isfinite(r["flip_rate"]) for r in logs)
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {m} |" in table for m in ("dense", "srste", "sste"))
    assert "| dense | " in table and "| 1.000 ± 0.000 |" in table  # dense's flip rate over its own
    for png in ("top1.png", "flip_rate.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_learns_digits_quickly(tmp_path):
    # 150 steps of the small ViT, dense and S-STE: far above the 10% of chance on 359 held-out digits
    finals = vision.main(["--config", "small", "--steps", "150", "--methods", "dense,sste", "--out", str(tmp_path)])
    assert all(f["test_top1"] > 0.6 for f in finals), finals  # measured: 77% both


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_idx_files_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 20)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    x_train, y_train, x_test, y_test = vision.load_fashion_split(tmp_path)
    assert x_train.shape == (64, 28, 28) and x_test.shape == (20, 28, 28) and y_test.shape == (20,)
    out = tmp_path / "out"
    finals = vision.main(["--config", "tiny", "--steps", "2", "--dataset", "fashion", "--data-dir", str(tmp_path),
                          "--methods", "sste", "--out", str(out)])
    assert finals[0]["steps"] == 2 and (out / "table.md").exists()
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        vision.load_fashion_split(tmp_path)


def test_unknown_method_is_rejected(tmp_path):
    with pytest.raises(SystemExit):
        vision.main(["--config", "tiny", "--methods", "dense,bogus", "--out", str(tmp_path)])


def test_summary_pairs_seeds_and_the_table_shows_spread():
    def run(method, seed, top1, flip):
        logs = [{"method": method, "seed": seed, "step": step, "flip_rate": flip * (1 + step), "train_loss": 0.5}
                for step in (2, 4, 6, 8)]
        return logs + [{"method": method, "seed": seed, "final": True, "steps": 8, "test_top1": top1, "train_loss": 0.5}]

    records = run("dense", 0, 0.90, 0.01) + run("dense", 1, 0.80, 0.02) + run("sste", 0, 0.94, 0.02) + run("sste", 1, 0.80, 0.02)
    summary = vision.summarize(report.group_runs(records))
    assert summary["sste"]["test_top1"] == pytest.approx([94.0, 80.0])
    assert summary["sste"]["flip_ratio"] == pytest.approx([2.0, 1.0])  # last quarter (step 8) over dense's, per seed
    assert "| sste | 87.0 ± 7.0 | 94.0, 80.0 | 0.5000 ± 0.0000 | 1.500 ± 0.500 |" in vision.table(summary)


def _fake_tool(folder, name, exit_code, stderr):
    folder.mkdir(exist_ok=True)
    tool = folder / name
    tool.write_text(f"#!/bin/sh\necho '{stderr}' >&2\nexit {exit_code}\n")
    tool.chmod(0o755)


def test_fashion_fetch_names_the_failing_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="`apt-get` is not on PATH.*`apt-get download dataset-fashion-mnist`"):
        vision.fetch_fashion(tmp_path / "cache")
    _fake_tool(tmp_path / "bin", "apt-get", 100, "E: Unable to locate package dataset-fashion-mnist")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(RuntimeError, match=r"`apt-get download dataset-fashion-mnist` failed \(exit 100\): E: Unable"):
        vision.main(["--config", "tiny", "--dataset", "fashion", "--cache-dir", str(tmp_path / "cache"),
                     "--out", str(tmp_path / "out")])
    assert not (tmp_path / "cache" / "dataset-fashion-mnist").exists()  # nothing half-unpacked is left


def test_fashion_is_read_from_the_cache_without_fetching(tmp_path, monkeypatch):
    folder = tmp_path / "dataset-fashion-mnist" / "usr" / "share" / "datasets" / "fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 8)):
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no apt-get: it must not be needed
    monkeypatch.setenv("SSTE_CACHE", str(tmp_path))
    assert vision.fetch_fashion() == folder
    x_train, y_train, x_test, y_test = vision.load_data("fashion")
    assert x_train.shape == (12, 28, 28) and y_test.shape == (8,)


@pytest.mark.slow
def test_fashion_fetch_from_debian(tmp_path):
    x_train, y_train, x_test, y_test = vision.load_data("fashion", cache_dir=tmp_path)
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert set(np.unique(y_train)) == set(range(10)) and np.bincount(y_test).tolist() == [1000] * 10
