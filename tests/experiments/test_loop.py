"""experiments.common.loop and records: the guards that keep a run's good state (non-finite stop,
SIGTERM save, torn metrics), config validation and overrides."""
import os
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.common import config, loop, records, report
from experiments.lm import data
from experiments.lm import train as lm_train
from experiments.lm.configs import get_config
from sste_jax import checkpoint

TINY = get_config("tiny", ["steps=8", "log_every=1", "ckpt_every=2", "keep_checkpoints=2"])


def _task(poison_at=None, on_batch=None):
    """The tiny LM task; the loss turns NaN from step ``poison_at`` on; ``on_batch(i)`` runs per batch."""
    train_tokens, val_tokens = data.token_splits(data.load_corpus("synthetic"), data.get_tokenizer("byte"), None)
    base = lm_train.make_task(TINY, 0, train_tokens, val_tokens)

    def batch_at(i):
        if on_batch:
            on_batch(i)
        x, y = base.batch_at(i)
        return x, y, np.full((1, 1), i + 1 >= (poison_at or 10**9), np.float32)

    def loss(model, x, y, poison):
        return lm_train.lm_loss(model, x, y) + jnp.where(poison[0] > 0, jnp.nan, 0.0)

    return loop.Task(loss, batch_at, base.evaluate)


def _fit(tmp_path, task, method="sste", **kw):
    run = lm_train.make_run(TINY, method)
    return loop.fit(run, tmp_path, task, lm_train.build_model(run, 256), progress=False, **kw)


@pytest.mark.integration
def test_non_finite_loss_stops_before_saving_and_keeps_the_finite_checkpoints(tmp_path):
    with pytest.raises(loop.NonFiniteError, match=r"step 5: train_loss=nan.*newest checkpoint \(4\)"):
        _fit(tmp_path, _task(poison_at=5))
    assert checkpoint.checkpoint_steps(tmp_path / "ckpt") == [2, 4]  # rotation kept the finite ones
    kinds = [r["kind"] for r in records.read_records(tmp_path / "metrics.jsonl")]
    assert "final" not in kinds
    state = checkpoint.restore_checkpoint(tmp_path / "ckpt", _fit(tmp_path / "fresh", _task(), until=1))
    assert int(state["step"]) == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


@pytest.mark.integration
def test_sigterm_saves_pending_metrics_and_a_checkpoint(tmp_path):
    def term(i):
        if i == 3:  # while the host prepares step 4 (steps 1-3 done, step 3 not yet checkpointed)
            os.kill(os.getpid(), signal.SIGTERM)

    cfg_task = _task(on_batch=term)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        _fit(tmp_path, cfg_task)
    assert checkpoint.checkpoint_steps(tmp_path / "ckpt") == [2, 3]
    assert [r["step"] for r in records.read_records(tmp_path / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the loop restored the handlers


def test_records_tolerate_a_torn_last_line_and_name_other_damage(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    records.append_record(path, {"method": "m", "seed": 0, "step": 1, "kind": "train"})
    with path.open("a") as f:
        f.write('{"method": "m", "seed": 0, "st')
    assert [r["step"] for r in records.read_records(path)] == [1]
    assert "torn last line" in capsys.readouterr().err
    good = '{"method": "m", "seed": 0, "step": %d, "kind": "train"}\n'
    path.write_text(good % 1 + "{bad\n" + good % 2)
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2"):
        records.read_records(path)
    with pytest.raises(ValueError, match="kind"):
        records.append_record(path, {"step": 3})
    assert records.last_step(tmp_path / "missing.jsonl") == 0


def test_config_parts_validate_and_overrides_resolve():
    cfg = get_config("capacity", ["lr=6e-3", "optim.min_lr=6e-4", "corpus=synthetic", "log_every=10"])
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.data.corpus, cfg.loop.log_every) == (6e-3, 6e-4, "synthetic", 10)
    assert config.with_lr(cfg, 3e-3).optim.min_lr == pytest.approx(3e-4)
    with pytest.raises(ValueError, match="unknown setting 'learning_rate'"):
        get_config("tiny", ["learning_rate=1"])
    with pytest.raises(ValueError, match="unknown config"):
        get_config("huge")
    with pytest.raises(ValueError, match="d_model=32: must be divisible by n_head=3"):
        get_config("tiny", ["n_head=3"])
    with pytest.raises(ValueError, match="set twice"):
        get_config("tiny", ["steps=3", "optim.steps=4"])
    with pytest.raises(ValueError, match="warmup=9"):
        get_config("tiny", ["warmup=9"])  # beyond steps=8
    with pytest.raises(ValueError, match="unknown method"):
        lm_train.make_run(get_config("tiny"), "magnitude")
    with pytest.raises(ValueError, match="sparse_lr_scale"):
        lm_train.make_run(get_config("tiny"), "dense", sparse_lr_scale=float("nan"))


def test_identity_hash_and_differences():
    a = {"config": {"optim": {"lr": 1.0}}, "seed": 0}
    b = {"config": {"optim": {"lr": 2.0}}, "seed": 0}
    assert config.identity_hash(a) != config.identity_hash(b) and config.identity_hash(a) == config.identity_hash(
        dict(a)
    )
    assert config.differing_fields(a, b) == ["config.optim.lr: 1.0 != 2.0"]


def test_paired_interval_matches_a_direct_t_computation():
    d = np.array([0.010, 0.013, 0.009, 0.015, 0.011])
    mean, lo, hi = report.paired_interval(d)
    half = 2.776 * d.std(ddof=1) / np.sqrt(5)
    assert (mean, lo, hi) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half))
    assert report.resolved(d) and not report.resolved([0.01, -0.01, 0.005])
    with pytest.raises(ValueError, match="at least 2"):
        report.paired_interval([1.0])


@pytest.mark.integration
def test_runner_names_failed_runs_and_their_logs(tmp_path):
    from experiments.common import runner

    ok = runner.Job("ok", "json.tool", ("--help",), tmp_path / "ok", steps=1)
    bad = runner.Job("bad run", "json.tool", ("--no-such-flag",), tmp_path / "bad", steps=1)
    with pytest.raises(runner.RunsFailed, match=r"1 of 2 runs failed: bad run \(exit 2; log: .*bad/log.txt\)"):
        runner.run_jobs([ok, bad], parallel=2, progress=False, poll=0.05)
    assert "usage" in (tmp_path / "ok" / "log.txt").read_text()
    assert "--no-such-flag" in (tmp_path / "bad" / "log.txt").read_text()


@pytest.mark.integration
def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, capsys):
    straight = _fit(tmp_path / "straight", _task())
    _fit(tmp_path / "split", _task(), until=4)  # checkpoints 2 and 4
    files = sorted(
        p for p in (tmp_path / "split" / "ckpt" / "4").rglob("*") if p.is_file() and "checksum" not in str(p)
    )
    victim = max(files, key=lambda p: p.stat().st_size)
    data_ = bytearray(victim.read_bytes())
    data_[len(data_) // 2] ^= 0x10  # one flipped bit in the array data
    victim.write_bytes(bytes(data_))
    resumed = _fit(tmp_path / "split", _task(), resume=True)
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "4.damaged" in err and (tmp_path / "split" / "ckpt" / "4.damaged").is_dir()
    chex.assert_trees_all_equal(straight["params"], resumed["params"])
    steps = [r["step"] for r in records.read_records(tmp_path / "split" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 9))  # the records after step 2 were rewritten, once


@pytest.mark.integration
def test_an_mvue_run_stopped_and_resumed_is_bit_identical_to_one_straight_run(tmp_path):
    """MVUE's keys fold in the bits of each product's input and weight: restored bit for bit, they draw the
    same samples as the straight run."""
    straight = _fit(tmp_path / "straight", _task(), method="sste_mvue_fp8")
    _fit(tmp_path / "split", _task(), method="sste_mvue_fp8", until=4)
    resumed = _fit(tmp_path / "split", _task(), method="sste_mvue_fp8", resume=True)
    chex.assert_trees_all_equal(straight["params"], resumed["params"])
    losses = lambda d: [r["train_loss"] for r in records.read_records(d / "metrics.jsonl") if r["kind"] == "train"]  # noqa: E731
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")


@pytest.mark.integration
def test_a_run_stopped_in_its_last_evaluation_resumes_to_the_straight_runs_final_record(tmp_path):
    """Stopped after its last step's checkpoint but before its final record, a resumed run trains nothing:
    it evaluates the restored state again and takes the last train record from its metrics."""
    straight = tmp_path / "straight"
    _fit(straight, _task())
    reached_last_step, stopped = [], []
    base = _task(on_batch=lambda i: reached_last_step.append(i) if i == TINY.optim.steps - 1 else None)

    def evaluate(model):
        if reached_last_step and not stopped:
            stopped.append(True)
            raise KeyboardInterrupt("SIGTERM")
        return base.evaluate(model)

    task = loop.Task(base.loss_fn, base.batch_at, evaluate, base.finish, base.eval_dense_w)
    split = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        _fit(split, task)
    assert checkpoint.checkpoint_steps(split / "ckpt")[-1] == TINY.optim.steps
    assert "final" not in [r["kind"] for r in records.read_records(split / "metrics.jsonl")]
    _fit(split, task, resume=True)
    got, want = records.read_records(split / "metrics.jsonl"), records.read_records(straight / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
    final, expected = report.final_record(got), report.final_record(want)
    assert final["val_loss"] == expected["val_loss"] and final["train_loss"] == expected["train_loss"]
