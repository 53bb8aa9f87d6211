"""experiments.ablate: the β rules, the vision sets end to end through the runner, the LM sets from
finished runs and end to end, and the argument checks."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ablate
from experiments.common import loop, report, runner
from experiments.common.config import identity_hash
from experiments.common.recipes import get_recipe
from experiments.common.records import read_records
from experiments.lm import compare as lm_compare
from experiments.vision import train as vision_train
from experiments.vision.configs import get_config as vision_config
from sste_jax import checkpoint
from sste_jax import nnx as sparse_nnx

TINY_VIT = vision_config("tiny")


def _soft_threshold_np(w_IxO):
    """Independent of the library: per group of 4 along axis 0, subtract the 2nd-smallest magnitude."""
    groups_GxFx4 = w_IxO.reshape(-1, 4, w_IxO.shape[1]).transpose(0, 2, 1)
    t = np.sort(np.abs(groups_GxFx4), axis=-1)[..., 1:2]
    s = np.sign(groups_GxFx4) * np.maximum(np.abs(groups_GxFx4) - t, 0)
    return s.transpose(0, 2, 1).reshape(w_IxO.shape)


def _sparse_layers(method):
    mlp = vision_train.build_model(TINY_VIT, get_recipe(method), seed=0).blocks[0].mlp
    assert isinstance(mlp.fc1, sparse_nnx.SparseLinear) and isinstance(mlp.fc2, sparse_nnx.SparseLinear)
    return [mlp.fc1, mlp.fc2]


def test_beta_rules_on_the_initial_model():
    for method, rule in (("sste", lambda w, s: (w * s).sum() / (s * s).sum()),
                         ("sste_beta_l1", lambda w, s: np.abs(w).sum() / np.abs(s).sum()),
                         ("sste_beta_none", lambda w, s: 1.0)):
        for layer in _sparse_layers(method):
            w = np.asarray(layer.kernel[...], np.float64)
            assert float(layer.beta[...]) == pytest.approx(rule(w, _soft_threshold_np(w)), rel=1e-5), method
    # distinct scales: ‖W‖₁ counts the pruned half too, so the L1 β exceeds the MSE fit (≈1.5 for Gaussians)
    l1, mse = (float(_sparse_layers(m)[0].beta[...]) for m in ("sste_beta_l1", "sste"))
    assert 1.0 < mse < l1


def _by_kind(workdir, kind):
    return [r for r in read_records(workdir / "metrics.jsonl") if r["kind"] == kind]


@pytest.mark.integration
def test_vision_fig4_end_to_end(tmp_path):
    runs_dir, out = tmp_path / "runs", tmp_path / "out"
    argv = ["--task", "vision", "--config", "tiny", "--set", "eval_every=3", "--sets", "fig4", "--refit-every", "2",
            "--jobs", "2", "--runs-dir", str(runs_dir), "--out", str(out)]
    texts = ablate.main(argv)
    workdirs = {"dense": runs_dir / "dense_s0", "sste": runs_dir / "sste_s0",
                "sste_beta_refit": runs_dir / "sste_beta_refit_every2_s0"}
    assert sorted(p.name for p in runs_dir.iterdir()) == sorted(w.name for w in workdirs.values())
    stored = json.loads((workdirs["sste_beta_refit"] / "run.json").read_text())["identity"]
    assert stored["method"] == "sste_beta_refit" and stored["recipe"] == {"refit_beta_every": 2}
    text = (out / "fig4.md").read_text()
    assert texts == {"fig4": text}
    assert "Command: `python -m experiments.ablate --task vision" in text and "recomputed every 2 steps" in text
    assert all(f"(`{method}`) |" in text for method in workdirs) and "Mean β of the sparse layers" in text
    for png in ("flip_rate_beta.png", "beta.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    def betas(method):  # evaluated at steps 3 and 6
        return [r["beta_mean"] for r in _by_kind(workdirs[method], "eval")]

    initial = np.mean([float(layer.beta[...]) for layer in _sparse_layers("sste")])
    assert betas("sste") == pytest.approx([initial] * 2, rel=1e-6)  # frozen
    refit = betas("sste_beta_refit")  # recomputed at steps 2, 4, 6: follows the weights
    assert len(refit) == 2 and refit[0] != refit[1] and initial not in refit
    # a second call reuses the finished runs (nothing trains) and writes the same table
    before = {w: (w / "metrics.jsonl").read_text() for w in workdirs.values()}
    assert ablate.main(argv)["fig4"].split("Command:")[0] == text.split("Command:")[0]
    assert {w: (w / "metrics.jsonl").read_text() for w in workdirs.values()} == before


@pytest.mark.integration
@pytest.mark.slow  # 8 ViT trainings in subprocesses: ~2 min on 2 shared cores
def test_vision_tables_end_to_end(tmp_path):
    runs_dir = tmp_path / "runs"
    texts = ablate.main(["--task", "vision", "--config", "tiny", "--sets", "table2", "table8", "--jobs", "2",
                         "--runs-dir", str(runs_dir)])
    out = runs_dir / "ablation"  # the default --out
    methods = ablate.method_names(["table2", "table8"])
    assert sorted(p.name for p in runs_dir.iterdir() if p.name != "ablation") == sorted(f"{m}_s0" for m in methods)
    for name in ("table2", "table8"):
        text = (out / f"{name}.md").read_text()
        assert texts[name] == text
        assert all(f"(`{method}`) |" in text for method in ablate.SETS[name][1])
    for method in methods:
        records = read_records(runs_dir / f"{method}_s0" / "metrics.jsonl")
        assert all(np.isfinite(r["flip_rate"]) for r in records if r["kind"] == "train")
        assert 0 <= report.final_record(records)["test_top1"] <= 1


@pytest.mark.parametrize("argv, message", [
    (["--task", "vision", "--config", "tiny", "--sets", "table3"], "invalid choice: 'table3'"),
    (["--task", "lm", "--config", "tiny", "--refit-every", "2"], "--refit-every, --data-dir and --cache-dir are for"),
    (["--task", "vision", "--config", "tiny", "--refit-every", "0"], "--refit-every: '0': must be an integer >= 1"),
    (["--task", "vision", "--config", "capacity"], "'capacity' is not a vision config"),
    (["--task", "lm", "--config", "tiny", "--set", "lr=abc"], "lr must be a float"),
    (["--task", "vision", "--config", "tiny", "--set", "dataset=mnist"], "dataset='mnist'"),
    (["--task", "vision", "--config", "tiny", "--data-dir", "x"], "--data-dir is for dataset=fashion"),
    (["--task", "vision", "--seeds", "-1"], "--seeds: '-1': must be an integer >= 0"),
    (["--config", "tiny"], "--task"),
])
def test_bad_arguments_are_rejected(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        ablate.main([*argv, "--runs-dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_differences_to_sste_are_paired_by_seed():
    summary = {"dense": {"val_loss": [2.0, 2.1, 2.2]}, "sste": {"val_loss": [1.9, 2.0, 2.3]},
               "ste": {"val_loss": [2.0, 2.2, 2.3]}}
    text = ablate.differences_to_sste(summary, {"dense": "", "ste": "", "sste": ""}, "val_loss", 4, "nats")
    # differences 0.1, 0.2, 0.0: mean 0.1, sd 0.1, half-width t(2) 4.303 x 0.1 / sqrt(3) = 0.2484
    assert "| difference (nats) | mean (95% CI) | per seed |" in text
    assert "| ste − sste | +0.1000 [-0.1484, +0.3484] | +0.1000, +0.2000, +0.0000 |" in text
    assert "dense − sste" not in text
    assert ablate.differences_to_sste(summary, {"dense": "", "sste": ""}, "val_loss", 4, "nats") == ""
    assert ablate.differences_to_sste(summary, {"dense": "", "ste": ""}, "val_loss", 4, "nats") == ""


def _fake_lm_run(planned: runner.Planned, val_loss: float, flip: float, betas, steps: int = 8):
    """A finished run as `loop.fit` leaves it: ``run.json`` of the planned run's identity, metrics
    (train records every 2 steps, evaluations at 4 and 8, the final record) and a last checkpoint
    (a stand-in state: a finished run is never restored)."""
    tag = {"method": planned.name, "seed": planned.seed}
    planned.workdir.mkdir(parents=True)
    info = {"identity": planned.run.identity(), "hash": identity_hash(planned.run.identity()), "git_commit": "test"}
    (planned.workdir / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    records = [{**tag, "step": s, "kind": "train", "train_loss": 3.0, "flip_rate": flip, "grad_norm": 1.0,
                "phase": 0.0, "steps_per_s": 10.0} for s in range(2, steps + 1, 2)]
    evals = [{**tag, "step": s, "kind": "eval", "val_loss": val_loss, "beta_mean": b} for s, b in zip((4, 8), betas)]
    final = {**tag, "step": steps, "kind": "final", "steps": steps, "train_loss": 3.0,
             **{k: v for k, v in evals[-1].items() if k not in tag and k not in ("step", "kind")},
             "second_phase_from": None, "seconds": 1.0}
    records = sorted(records + evals, key=lambda r: r["step"]) + [final]
    (planned.workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    checkpoint.save_checkpoint(planned.workdir / "ckpt", steps, {"step": jnp.array(steps, jnp.int32)})
    assert loop.finished(planned.workdir, planned.run)


def test_lm_ablation_tables_from_finished_runs(tmp_path, monkeypatch):
    # finished runs are reused (nothing trains): the tables and plots of all three sets
    runs_dir, names = tmp_path / "runs", ablate.method_names(list(ablate.SETS))
    for p in lm_compare.plan("tiny", names, [0, 1], [], runs_dir):
        special = {"sste_beta_refit": (1.5, 1.7 + p.seed), "sste_beta_l1": (2.4, 2.5 + 0.2 * p.seed)}
        betas = special.get(p.name, (1.5, 1.5))
        i = names.index(p.name)
        _fake_lm_run(p, 2.0 + 0.01 * i, 0.01 * (1 + i), betas)
    launched = []
    monkeypatch.setattr(runner, "run_jobs", lambda jobs, *a, **k: launched.extend(jobs))
    texts = ablate.main(["--task", "lm", "--config", "tiny", "--seeds", "0", "1", "--runs-dir", str(runs_dir),
                         "--out", str(tmp_path / "out")])
    assert launched == []
    out = tmp_path / "out"
    assert texts == {s: (out / f"{s}.md").read_text() for s in ablate.SETS}
    table2 = texts["table2"]
    assert "Command: `python -m experiments.ablate --task lm" in table2
    assert (
        "| reference (`dense`) | 0.003 | 2.0000 ± 0.0000 |  | 1.00 ± 0.00 | 640 |" in table2
    )  # 10 steps/s x 4 x 16 tokens
    assert ("| soft threshold, β L1 (‖W‖₁ / ‖S(W)‖₁) (`sste_beta_l1`) | 0.003 | 2.0300 ± 0.0000 | "
            "+0.0300 [+0.0300, +0.0300]* | 4.00 ± 0.00 |") in table2
    assert ("| S-STE + FP8 (`sste_fp8`) | 0.003 | 2.0600 ± 0.0000 | +0.0600 [+0.0600, +0.0600]* | 7.00 ± 0.00 |"
            in texts["table8"])
    assert "| sste_beta_l1 − sste | -0.0100 [-0.0100, -0.0100]* | -0.0100, -0.0100 |" in table2
    assert table2.endswith("at the end (mean over seeds): `ste` 1.500, `sste_beta_none` 1.500, "
                           "`sste_beta_l1` 2.600, `sste` 1.500.\n")  # the last evaluation's, mean over seeds
    assert "| sste_mvue_fp8 − sste | +0.0300 [+0.0300, +0.0300]* |" in texts["table8"]
    fig4 = texts["fig4"]
    assert "recomputed every 50 steps (`sste_beta_refit`)" in fig4
    assert "frozen 1.500; recomputed 1.500 at step 4 → 2.200 at step 8" in fig4  # mean over the two seeds
    for png in ("flip_rate_beta.png", "beta.png", "val_loss.png", "flip_rate.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.integration
@pytest.mark.slow  # three experiments.lm.train subprocesses: ~1 min wall on 2 shared cores
def test_lm_ablation_end_to_end(tmp_path):
    runs_dir = tmp_path / "runs"
    texts = ablate.main(["--task", "lm", "--config", "tiny", "--sets", "fig4", "--set", "steps=4", "--seeds", "0",
                         "--jobs", "2", "--runs-dir", str(runs_dir)])
    out = runs_dir / "ablation"  # the default --out
    text = (out / "fig4.md").read_text()
    assert texts == {"fig4": text}
    assert "Command: `python -m experiments.ablate --task lm" in text and "(`sste_beta_refit`) |" in text
    assert "One seed: no interval" in text
    for png in ("flip_rate_beta.png", "beta.png", "val_loss.png", "flip_rate.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    refit, frozen = ([r["beta_mean"] for r in _by_kind(runs_dir / f"{m}_lr0.003_s0", "eval")]
                     for m in ("sste_beta_refit", "sste"))
    assert len(frozen) == len(refit) == 1 and frozen == refit  # evaluated at step 4: no refit before step 50
