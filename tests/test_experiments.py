import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sste_jax
from experiments import compare_lm, methods, train_lm
from experiments.configs import get_config
from sste_jax import checkpoint

TINY = get_config("tiny")


def _records(workdir, key):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def _assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and bool(jnp.all(x == y))


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_tiny_trains_each_method(tmp_path, method):
    state = train_lm.train(TINY, train_lm.Run(method=method), tmp_path, progress=False)
    assert int(state["step"]) == TINY.steps
    losses = [r["train_loss"] for r in _records(tmp_path, "train_loss")]
    assert losses[-1] < losses[0]  # 8 steps at lr 3e-3 learn the synthetic corpus's letter statistics
    final = _records(tmp_path, "val_loss")[-1]
    assert math.isfinite(final["val_loss"]) and final["step"] == TINY.steps
    zeros = [v for k, v in final.items() if k.startswith("zero_fraction/")]
    assert len(zeros) == 2 * TINY.n_layer  # c_fc and c_proj of each block
    dense_at_end = method in ("dense", "tsrste_df")  # tsrste_df: its last tenth trains dense
    assert all(z == (0.0 if dense_at_end else 0.5) for z in zeros)
    assert ("val_loss_dense_w" in final) == method.startswith("sste")
    assert checkpoint.checkpoint_steps(tmp_path / "ckpt") == [4, 8]


def test_interrupt_and_resume_are_bit_identical(tmp_path, monkeypatch):
    run = train_lm.Run(method="sste_mvue")  # MVUE: the key counters must be restored too
    straight = train_lm.train(TINY, run, tmp_path / "straight", progress=False)

    half = train_lm.train(TINY, run, tmp_path / "split", until=3, progress=False)
    assert int(half["step"]) == 3 and checkpoint.checkpoint_steps(tmp_path / "split" / "ckpt") == [3]
    batch, calls = train_lm._batch, []

    def interrupting(tokens, step, cfg, seed):  # Ctrl-C while the host prepares step 6
        calls.append(step)
        if step == 5:
            raise KeyboardInterrupt
        return batch(tokens, step, cfg, seed)

    monkeypatch.setattr(train_lm, "_batch", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train_lm.train(TINY, run, tmp_path / "split", resume=True, progress=False)
    assert calls[0] == 3 and checkpoint.checkpoint_steps(tmp_path / "split" / "ckpt") == [3, 4, 5]
    monkeypatch.setattr(train_lm, "_batch", batch)
    resumed = train_lm.train(TINY, run, tmp_path / "split", resume=True, progress=False)

    _assert_trees_equal(straight["params"], resumed["params"])
    _assert_trees_equal(straight["opt"], resumed["opt"])
    _assert_trees_equal(straight["rest"], resumed["rest"])
    split_val = {r["step"]: r["val_loss"] for r in _records(tmp_path / "split", "val_loss")}
    assert sorted(split_val) == [3, 4, 8]  # `until` evaluates where it stops; a resumed run appends
    assert all(split_val[r["step"]] == r["val_loss"] for r in _records(tmp_path / "straight", "val_loss"))


def test_new_run_refuses_an_existing_workdir(tmp_path):
    train_lm.train(TINY, train_lm.Run(method="ste"), tmp_path, until=2, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train_lm.train(TINY, train_lm.Run(method="ste"), tmp_path, progress=False)


def test_corrupt_checkpoint_fails_clearly_and_touches_nothing(tmp_path):
    run = train_lm.Run(method="sste")
    train_lm.train(TINY, run, tmp_path, until=2, progress=False)
    files = sorted(p for p in (tmp_path / "ckpt" / "2").rglob("*") if p.is_file())
    victim = max(files, key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt|incomplete"):
        train_lm.train(TINY, run, tmp_path, resume=True, progress=False)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_init_from_dense_fits_beta_to_the_dense_weights(tmp_path):
    dense = train_lm.train(TINY, train_lm.Run(method="dense"), tmp_path / "dense", until=4, progress=False)
    start = train_lm.train(TINY, train_lm.Run(method="sste", seed=1), tmp_path / "sste", until=0,
                           init_from=tmp_path / "dense", progress=False)
    _assert_trees_equal(dense["params"], start["params"])
    kernel = start["params"]["blocks"][0]["mlp"]["c_fc"]["kernel"][...]
    beta = start["rest"]["blocks"][0]["mlp"]["c_fc"]["beta"][...]
    assert beta == sste_jax.fit_beta(kernel)
    fresh = train_lm.initial_state(TINY, 256, train_lm.Run(method="sste", seed=1))[1]
    assert beta != fresh["rest"]["blocks"][0]["mlp"]["c_fc"]["beta"][...]
    with pytest.raises(ValueError, match="not 'dense'"):
        train_lm.train(TINY, train_lm.Run(method="sste"), tmp_path / "again", init_from=tmp_path / "sste",
                       progress=False)


def test_beta_matched_control_scales_only_the_sparse_kernels():
    cfg = dataclasses.replace(TINY, warmup=0)  # a nonzero learning rate at step 0
    run = train_lm.Run(method="dense", ffn_lr_scale="beta")
    prog, state, model = train_lm.initial_state(cfg, 256, run)
    tx = prog.tx
    scale = train_lm.lr_scale(run, model)
    assert 1.3 < scale < 1.7  # fit_beta of Gaussian weights is about 1.48 (SPEC §8)
    plain_tx = train_lm.initial_state(cfg, 256, train_lm.Run(method="dense"))[0].tx
    grads = jax.tree.map(jnp.ones_like, state["params"])
    scaled, _ = tx.update(grads, state["opt"], state["params"])
    plain, _ = plain_tx.update(grads, plain_tx.init(state["params"]), state["params"])
    flat_scaled, flat_plain = nnx.to_flat_state(scaled), nnx.to_flat_state(plain)
    ratios = {"/".join(map(str, k)): float(np.max(np.abs(a[...])) / np.max(np.abs(b[...])))
              for (k, a), (_, b) in zip(flat_scaled, flat_plain)}
    assert len(ratios) == len(flat_plain) and any("/mlp/" in name for name in ratios)
    for name, ratio in ratios.items():
        expected = scale if "/mlp/" in name and name.endswith("kernel") else 1.0
        assert ratio == pytest.approx(expected, rel=1e-5), name


def test_config_overrides_and_bad_input():
    cfg = get_config("small", ["lr=3e-3", "batch_size=8", "corpus=synthetic"])
    assert (cfg.lr, cfg.batch_size, cfg.corpus) == (3e-3, 8, "synthetic")
    with pytest.raises(ValueError, match="bad override"):
        get_config("tiny", ["learning_rate=1"])
    with pytest.raises(ValueError, match="unknown config"):
        get_config("huge")
    with pytest.raises(ValueError, match="n_head"):
        dataclasses.replace(TINY, n_head=3)
    with pytest.raises(ValueError, match="unknown method"):
        train_lm.Run(method="magnitude")


def _fake_run(seed, final_loss, flip, steps=8):
    records = []
    for step in range(2, steps + 1, 2):
        records.append({"step": step, "train_loss": 5.0, "flip_rate": flip * (1 + seed), "tokens_per_s": 100.0 * step})
        records.append({"step": step, "val_loss": final_loss + seed * 0.1 + (steps - step)})
    return records


def test_compare_table_and_plots_from_fake_metrics(tmp_path):
    names = ["dense", "dense_beta", "sste"]
    for name, loss, flip in (("dense", 2.0, 0.01), ("dense_beta", 1.9, 0.01), ("sste", 1.95, 0.02)):
        for seed in (0, 1):
            folder = tmp_path / "runs" / f"{name}_s{seed}"
            folder.mkdir(parents=True)
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _fake_run(seed, loss, flip)))
    runs = compare_lm.load_runs(tmp_path / "runs", names, [0, 1])
    summary = compare_lm.summarize(runs, steps=8)
    assert summary["sste"]["val_loss"] == pytest.approx([1.95, 2.05])
    assert summary["sste"]["gap_dense"] == pytest.approx([-0.05, -0.05])
    assert summary["sste"]["gap_dense_beta"] == pytest.approx([0.05, 0.05])
    assert summary["sste"]["flip_ratio"] == pytest.approx([2.0, 2.0])  # paired by seed
    assert summary["sste"]["tokens_per_s"] == [600.0, 600.0]  # median of 400, 600, 800: the first (compiling) interval is left out
    text = compare_lm.write_table(summary, tmp_path / "out" / "table.md", "fake")
    assert "| sste | 2.0000 ± 0.0500 | -0.0500 ± 0.0000 | +0.0500 ± 0.0000 | 2.000 ± 0.000 |" in text
    compare_lm.write_plots(runs, tmp_path / "out")
    for png in ("val_loss.png", "flip_rate.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"
