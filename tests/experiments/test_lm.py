"""experiments.lm: the GPT task on the shared loop, run identity, the β-matched control, and the
comparison's table and verdict."""
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sste_jax
from experiments.common import loop, recipes, report, runner
from experiments.lm import compare, data
from experiments.lm import train as lm_train
from experiments.lm.configs import get_config
from sste_jax import checkpoint

TINY = get_config("tiny")


def _records(workdir, kind):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and bool(jnp.all(x == y))


@pytest.mark.integration
@pytest.mark.parametrize("method", sorted(recipes.METHODS))
def test_tiny_trains_each_method(tmp_path, method):
    state = lm_train.train(lm_train.make_run(TINY, method), tmp_path, progress=False)
    assert int(state["step"]) == TINY.optim.steps
    losses = [r["train_loss"] for r in _records(tmp_path, "train")]
    assert losses[-1] < losses[0]  # 8 steps at lr 3e-3 learn the synthetic corpus's letter statistics
    final, = _records(tmp_path, "final")
    assert math.isfinite(final["val_loss"]) and final["step"] == TINY.optim.steps
    zeros = [v for k, v in final.items() if k.startswith("zero_fraction/")]
    assert len(zeros) == 2 * TINY.model.n_layer  # c_fc and c_proj of each block
    dense_at_end = method in ("dense", "tsrste_df", "tsrste_df_mvue")  # the dense finish trains its last sixth dense
    assert all(z == (0.0 if dense_at_end else 0.5) for z in zeros)
    assert ("val_loss_dense_w" in final) == method.startswith("sste")
    assert checkpoint.checkpoint_steps(tmp_path / "ckpt") == [4, 8]
    assert all({"method", "seed", "step", "kind"} <= set(r) for r in _records(tmp_path, "eval"))


@pytest.mark.integration
def test_interrupt_and_resume_are_bit_identical(tmp_path, monkeypatch):
    run = lm_train.make_run(TINY, "sste_mvue")  # MVUE: the key counters must be restored too
    straight = lm_train.train(run, tmp_path / "straight", progress=False)

    half = lm_train.train(run, tmp_path / "split", until=3, progress=False)
    assert int(half["step"]) == 3 and checkpoint.checkpoint_steps(tmp_path / "split" / "ckpt") == [3]
    batch, calls = data.batch_at, []

    def interrupting(tokens, step, batch_size, seq_len, seed):  # Ctrl-C while the host prepares step 6
        calls.append(step)
        if step == 5:
            raise KeyboardInterrupt
        return batch(tokens, step, batch_size, seq_len, seed)

    monkeypatch.setattr(data, "batch_at", interrupting)
    with pytest.raises(KeyboardInterrupt):
        lm_train.train(run, tmp_path / "split", resume=True, progress=False)
    assert calls[0] == 3 and checkpoint.checkpoint_steps(tmp_path / "split" / "ckpt") == [3, 4, 5]
    assert 5 in [r["step"] for r in _records(tmp_path / "split", "train")]  # pending metrics written first
    monkeypatch.setattr(data, "batch_at", batch)
    resumed = lm_train.train(run, tmp_path / "split", resume=True, progress=False)

    for part in ("params", "opt", "rest"):
        _assert_trees_equal(straight[part], resumed[part])
    split_val = {r["step"]: r["val_loss"] for r in _records(tmp_path / "split", "eval")}
    assert sorted(split_val) == [4, 8]
    assert all(split_val[r["step"]] == r["val_loss"] for r in _records(tmp_path / "straight", "eval"))
    assert len(_records(tmp_path / "split", "final")) == 1


@pytest.mark.integration
def test_workdir_guards(tmp_path):
    run = lm_train.make_run(TINY, "ste")
    lm_train.train(run, tmp_path, until=2, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        lm_train.train(run, tmp_path, progress=False)
    other = lm_train.make_run(get_config("tiny", ["lr=1e-3", "min_lr=1e-4"]), "dense", seed=3)
    with pytest.raises(loop.RunMismatchError, match=r"config.optim.lr: 0.003 != 0.001.*method: 'ste' != 'dense'"):
        lm_train.train(other, tmp_path, resume=True, progress=False)
    stored = json.loads((tmp_path / "run.json").read_text())
    assert stored["identity"]["method"] == "ste"  # not overwritten by the refused run


@pytest.mark.integration
def test_resume_with_metrics_but_no_checkpoint_is_refused(tmp_path):
    run = lm_train.make_run(TINY, "sste")
    lm_train.train(run, tmp_path, until=2, progress=False)
    before = (tmp_path / "metrics.jsonl").read_text()
    checkpoint_dir = tmp_path / "ckpt"
    import shutil

    shutil.rmtree(checkpoint_dir)
    with pytest.raises(RuntimeError, match="metrics but no checkpoint"):
        lm_train.train(run, tmp_path, resume=True, progress=False)
    assert (tmp_path / "metrics.jsonl").read_text() == before


@pytest.mark.integration
def test_corrupt_checkpoint_fails_clearly_and_touches_nothing(tmp_path):
    run = lm_train.make_run(TINY, "sste")
    lm_train.train(run, tmp_path, until=2, progress=False)
    files = sorted(p for p in (tmp_path / "ckpt" / "2").rglob("*") if p.is_file())
    victim = max(files, key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt|incomplete"):
        lm_train.train(run, tmp_path, resume=True, progress=False)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.integration
def test_init_from_dense_fits_beta_to_the_dense_weights(tmp_path):
    dense = lm_train.train(lm_train.make_run(TINY, "dense"), tmp_path / "dense", until=4, progress=False)
    sparse = lm_train.make_run(TINY, "sste", seed=1, init_from=str(tmp_path / "dense"))
    start = lm_train.train(sparse, tmp_path / "sste", until=1, progress=False)
    beta = start["rest"]["blocks"][0]["mlp"]["c_fc"]["beta"][...]
    first = lm_train._dense_weights(tmp_path / "dense", sparse, 256)
    _assert_trees_equal(dense["params"], first)
    assert beta == sste_jax.fit_beta(first["blocks"][0]["mlp"]["c_fc"]["kernel"][...])
    with pytest.raises(ValueError, match="not 'dense'"):
        lm_train.train(lm_train.make_run(TINY, "sste", init_from=str(tmp_path / "sste")), tmp_path / "again",
                       progress=False)


def test_beta_matched_control_scales_only_the_sparse_kernels():
    cfg = get_config("tiny", ["warmup=0"])  # a nonzero learning rate at step 0
    scale = lm_train.beta_lr_scale(cfg, 0, 256)
    assert 1.3 < scale < 1.7  # fit_beta of Gaussian weights is about 1.48
    model = lm_train.build_model(lm_train.make_run(cfg, "dense"), 256)
    recipe = recipes.get_recipe("dense")
    tx, plain_tx = (recipes.make_optimizer(cfg.optim, model, recipe, s) for s in (scale, 1.0))
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(jnp.ones_like, params)
    scaled, _ = tx.update(grads, tx.init(params), params)
    plain, _ = plain_tx.update(grads, plain_tx.init(params), params)
    flat_scaled, flat_plain = nnx.to_flat_state(scaled), nnx.to_flat_state(plain)
    ratios = {"/".join(map(str, k)): float(np.max(np.abs(a[...])) / np.max(np.abs(b[...])))
              for (k, a), (_, b) in zip(flat_scaled, flat_plain)}
    assert len(ratios) == len(flat_plain) and any("/mlp/" in name for name in ratios)
    for name, ratio in ratios.items():
        expected = scale if "/mlp/" in name and name.endswith("kernel") else 1.0
        assert ratio == pytest.approx(expected, rel=1e-5), name


def test_cli_takes_repeated_flags_and_refuses_bad_values(tmp_path, capsys):
    args = lm_train.parse_args(["--workdir", "w", "--set", "lr=1e-3", "--set", "steps=5", "--recipe", "mask_refresh=3",
                                "--recipe", "dense_finish=0.2"])
    assert args.set == ["lr=1e-3", "steps=5"] and args.recipe == ["mask_refresh=3", "dense_finish=0.2"]
    for bad, message in ((["--set", "lr=-1"], "lr=-1"), (["--set", "lr=nan"], "lr=nan"), (["--set", "clip=-1"], "clip"),
                         (["--set", "b2=1.5"], "b2"), (["--set", "min_lr=1"], "min_lr"),
                         (["--set", "warmup=-1"], "warmup"), (["--set", "weight_decay=-0.1"], "weight_decay"),
                         (["--set", "lr=abc"], "lr must be a float"), (["--set", "n_layer=0"], "n_layer"),
                         (["--set", "eval_batches=0"], "eval_batches"), (["--set", "seq_len=10000000"], "seq_len"),
                         (["--set", "lr=1e-3", "--set", "lr=2e-3"], "set twice"), (["--until", "-1"], "--until"),
                         (["--recipe", "mask_refresh=2", "--recipe", "mask_refresh=3"], "set twice"),
                         (["--sparse-lr-scale", "x"], "sparse-lr-scale")):
        with pytest.raises(SystemExit) as exit_:
            lm_train.main(["--config", "tiny", "--workdir", str(tmp_path / "w"), *bad])
        assert message in str(exit_.value.code) + capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def _fake_run(folder, method, seed, final_loss, flip, steps=8):
    folder.mkdir(parents=True)
    records = []
    for step in range(2, steps + 1, 2):
        records.append({"method": method, "seed": seed, "step": step, "kind": "train", "train_loss": 5.0,
                        "flip_rate": flip * (1 + seed), "steps_per_s": step / 2})
        records.append({"method": method, "seed": seed, "step": step, "kind": "eval",
                        "val_loss": final_loss + seed * 0.1 + (steps - step)})
    records.append({"method": method, "seed": seed, "step": steps, "kind": "final", "steps": steps,
                    "val_loss": final_loss + seed * 0.1})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_compare_table_verdict_and_plots_from_fake_metrics(tmp_path):
    losses = {"dense": (2.0, 0.01), "srste": (2.06, 0.015), "sste": (2.03, 0.02)}
    for name, (loss, flip) in losses.items():
        for seed in (0, 1, 2):
            _fake_run(tmp_path / "runs" / f"{name}_s{seed}", name, seed, loss + 0.001 * seed * (name == "sste"), flip)
    runs = report.load_runs({n: {s: tmp_path / "runs" / f"{n}_s{s}" for s in (0, 1, 2)} for n in losses})
    summary = compare.summarize(runs, tokens_per_step=100)
    assert summary["sste"]["gap_dense"] == pytest.approx([0.03, 0.031, 0.032])
    assert summary["sste"]["flip_ratio"] == pytest.approx([2.0, 2.0, 2.0])  # paired by seed
    assert summary["sste"]["tokens_per_s"] == [300.0] * 3  # median of 2, 3, 4 steps/s: the first interval left out
    text = compare.table(summary, {n: 3e-3 for n in losses}, [0, 1, 2])
    assert "| sste − srste | -0.0290 [-0.0315, -0.0265]* |" in text
    assert compare.verdict(summary) == ("S-STE is worse than dense by 0.0310 nats (95% CI 0.0285 to 0.0335): resolved; "
                                        "S-STE beats srste by 0.0290 nats (95% CI 0.0265 to 0.0315): resolved.")
    compare.write_plots(runs, tmp_path / "out", "fake")
    for png in ("val_loss.png", "flip_rate.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.integration
def test_compare_reuses_finished_runs_and_refuses_other_settings(tmp_path):
    planned = compare.plan("tiny", ["dense"], [0], [], tmp_path)
    (p,) = planned
    assert p.workdir == tmp_path / "dense_lr0.003_s0" and p.args == ("--config", "tiny", "--set", "lr=0.003",
                                                                     "min_lr=0.0003")
    lm_train.main([*p.args, "--method", "dense", "--seed", "0", "--workdir", str(p.workdir), "--quiet"])
    assert loop.finished(p.workdir, p.run)
    (other,) = compare.plan("tiny", ["dense"], [0], ["n_layer=1"], tmp_path)
    with pytest.raises(loop.RunMismatchError, match="config.model.n_layer: 2 != 1"):
        loop.finished(other.workdir, other.run)


def test_compare_lr_flag_sets_one_methods_rate_and_keeps_the_others_tuned(tmp_path, monkeypatch):
    class Planned(Exception):
        pass

    def stop(module, planned, *args, **kwargs):
        raise Planned(planned)

    monkeypatch.setattr(runner, "execute", stop)
    with pytest.raises(Planned) as caught:
        compare.main(["--config", "tiny", "--methods", "dense", "sste", "--lr", "sste=0.006", "--seeds", "0",
                      "--runs-dir", str(tmp_path)])
    (planned,) = caught.value.args
    got = {p.name: (p.workdir.name, p.run.config.optim.lr, p.run.config.optim.min_lr) for p in planned}
    assert got == {"dense": ("dense_lr0.003_s0", 0.003, pytest.approx(3e-4)),
                   "sste": ("sste_lr0.006_s0", 0.006, pytest.approx(6e-4))}


def _fake_grid(tmp_path, means):
    """{method: {lr: runs}} with final val losses ``mean ± 0.01`` over seeds 0, 1."""
    grid = {}
    for method, by_lr in means.items():
        for lr, mean in by_lr.items():
            folders = {}
            for seed, offset in ((0, -0.01), (1, 0.01)):
                folder = tmp_path / f"{method}_lr{lr:g}_s{seed}"
                _fake_run(folder, method, seed, mean + offset - seed * 0.1, 0.01)
                folders[seed] = folder
            grid.setdefault(method, {})[lr] = report.load_runs({method: folders})
    return grid


def test_sweep_picks_the_best_rate_and_flags_edges(tmp_path):
    from experiments.lm import sweep

    grid = _fake_grid(tmp_path, {"dense": {3e-3: 1.9, 6e-3: 1.8, 1.2e-2: 1.85},
                                 "ste": {3e-3: 1.95, 6e-3: 1.97, 1.2e-2: 2.0}})
    best, edges = sweep.best_rates(grid)
    assert best == {"dense": 6e-3, "ste": 3e-3} and edges == ["ste"]
    text = sweep.sweep_table(grid)
    assert "| dense | 1.9000 (1.890, 1.910) | **1.8000 (1.790, 1.810)** | 1.8500 (1.840, 1.860) |" in text
    sweep.plot_sweep(grid, tmp_path / "lr.png", "fake")
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("lrs", "best", "expected"), [
    ([3e-3, 6e-3, 1.2e-2], 1.2e-2, 2.4e-2), ([3e-3, 6e-3, 1.2e-2], 3e-3, 1.5e-3),
    ([6e-3, 8.5e-3, 1.2e-2], 1.2e-2, 1.7e-2), ([1.2e-2, 6e-3, 8.5e-3], 6e-3, 4.2e-3),
    ([4.2e-3, 6e-3, 8.5e-3, 1.2e-2, 2.4e-2], 2.4e-2, 4.8e-2),
])
def test_sweep_extends_an_edge_by_the_grids_own_step(lrs, best, expected):
    from experiments.lm import sweep

    assert sweep.next_rate(lrs, best) == expected


def test_step_runs_start_from_the_configs_piloted_switch(tmp_path, monkeypatch):
    from experiments.lm import configs, nm

    monkeypatch.setitem(configs.STEP_RECIPE, "tiny", {"switch_threshold": 1e-9})
    (step,), (dense,) = (compare.plan("tiny", [m], [0], [], tmp_path) for m in ("step", "dense"))
    assert step.run.recipe().switch_threshold == 1e-9 and dense.run.recipe_changes == ()
    assert lm_train.make_run(TINY, "step", 0, recipe_changes=configs.recipe_defaults("tiny", "step")) == step.run
    (at_14,) = nm.plan("tiny", ["step"], [0], [], (1, 4))
    assert dict(at_14.run.recipe_changes) == {"switch_threshold": 1e-9, "n": 1, "m": 4}


def test_nm_report_says_whether_the_rates_were_tuned_or_set():
    from experiments.lm import nm

    lrs = {"dense": 0.012, "sste": 0.0085}
    assert nm.rates_note(lrs, False) == "Learning rates (tuned at 2:4): dense 0.012, sste 0.0085."
    assert nm.rates_note(lrs, True) == "Learning rates (set by --set): dense 0.012, sste 0.0085."


def test_verdict_says_what_an_unresolved_difference_rules_out():
    summary = {"sste": {"val_loss": [1.0, 1.02, 0.99]}, "srste": {"val_loss": [1.01, 1.0, 1.0]}}
    assert compare.verdict(summary) == ("S-STE vs srste: +0.0000 nats, 95% CI -0.0430 to +0.0430: not resolved (the "
                                        "data rule out a lead of S-STE over srste above 0.0430 nats and a deficit "
                                        "above 0.0430).")


def test_step_pilot_runs_are_named_by_threshold_rate_and_seed(tmp_path):
    from experiments.lm import step_pilot

    runs = {lr: compare.plan("tiny", ["step"], [1], [], tmp_path, {"step": lr})[0] for lr in (3e-3, 6e-3)}
    names = {(lr, t): step_pilot.with_threshold(q, "tiny", t, None if t else 1).workdir.name
             for lr, q in runs.items() for t in (0.0, 2e-8)}
    assert names == {(3e-3, 0.0): "curve_lr0.003_s1", (3e-3, 2e-8): "thr2e-08_lr0.003_s1",
                     (6e-3, 0.0): "curve_lr0.006_s1", (6e-3, 2e-8): "thr2e-08_lr0.006_s1"}
    pilot = step_pilot.with_threshold(runs[6e-3], "tiny", 2e-8)
    assert pilot.run.recipe().switch_threshold == 2e-8 and pilot.run.config.optim.lr == 6e-3


def test_step_pilot_finds_where_each_threshold_fires():
    from experiments.lm import step_pilot

    points = ((10, 5.0), (20, 3.0), (30, 2.0), (40, 1.0))
    records = [{"kind": "train", "step": s, "step_v_change": v} for s, v in points]
    steps, values = step_pilot.curve(records, until=30)
    assert steps.tolist() == [10, 20, 30] and values.tolist() == [5.0, 3.0, 2.0]
    assert step_pilot.fires_at(steps, values, 4.0, t_min=5) == 20
    assert step_pilot.fires_at(steps, values, 4.0, t_min=20) == 30  # strictly after T_min
    assert step_pilot.fires_at(steps, values, 1.0, t_min=5) is None
    curves = [(np.arange(10, 60, 10), np.array([9.0, 1.0, 2.0, 3.0, 4.0]) * 1e-7)]
    assert step_pilot.default_candidates(curves, t_min=10) == [3.2e-07, 2.5e-07, 1.7e-07, 1.1e-07, 3e-08]
    fired = {4.0: (20, 20), 3.5: (20, 20), 2.5: (30, None), 0.5: (None, None)}
    assert step_pilot.representatives(fired) == {4.0: 4.0, 3.5: 4.0, 2.5: 2.5, 0.5: 0.0}


def test_scaling_summary_table_has_a_row_per_point():
    from experiments.lm import scaling

    def summary(shift):
        return {"dense": {"val_loss": [1.0, 1.0, 1.0], "gap_dense": [0, 0, 0]},
                "srste": {"val_loss": [1.05, 1.06, 1.07], "gap_dense": [0.05, 0.06, 0.07]},
                "sste": {"val_loss": [1.04 + shift, 1.05, 1.06], "gap_dense": [0.04 + shift, 0.05, 0.06]}}

    text = scaling.summary_table({"a": summary(0.0), "b": summary(0.01)}, {"a": "d 64", "b": "d 128"})
    assert "| point | srste − dense | sste − dense | sste − srste |" in text
    assert "| d 64 | +0.0600 [+0.0352, +0.0848]* | +0.0500 [+0.0252, +0.0748]* | -0.0100 [-0.0100, -0.0100]* |" in text
