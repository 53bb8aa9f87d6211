import json

import numpy as np
import pytest

from experiments import ablate, methods, report, vision
from sste_jax import nnx as sparse_nnx

TINY_VIT = vision.dataset_config(vision.CONFIGS["tiny"], "digits")


def _soft_threshold_np(w_IxO):
    """Independent of the library: per group of 4 along axis 0, subtract the 2nd-smallest magnitude."""
    groups_GxFx4 = w_IxO.reshape(-1, 4, w_IxO.shape[1]).transpose(0, 2, 1)
    t = np.sort(np.abs(groups_GxFx4), axis=-1)[..., 1:2]
    s = np.sign(groups_GxFx4) * np.maximum(np.abs(groups_GxFx4) - t, 0)
    return s.transpose(0, 2, 1).reshape(w_IxO.shape)


def _sparse_layers(method):
    mlp = vision.build_model(TINY_VIT, methods.METHODS[method], seed=0).blocks[0].mlp
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


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_vision_fig4_end_to_end(tmp_path):
    ablate.main(["--task", "vision", "--config", "tiny", "--sets", "fig4", "--refit-every", "2", "--out", str(tmp_path)])
    runs = report.group_runs(_records(tmp_path / "metrics.jsonl"))
    assert sorted(runs) == ["dense", "sste", "sste_beta_refit"]
    text = (tmp_path / "fig4.md").read_text()
    assert "Command: `python -m experiments.ablate --task vision" in text and "recomputed every 2 steps" in text
    assert all(f"(`{method}`) |" in text for method in runs) and "Mean β of the sparse layers" in text
    for png in ("flip_rate_beta.png", "beta.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"

    def betas(method):  # logged at steps 3 and 6
        return [r["beta_mean"] for r in runs[method][0] if "step" in r]

    initial = np.mean([float(layer.beta[...]) for layer in _sparse_layers("sste")])
    assert betas("sste") == pytest.approx([initial] * 2, rel=1e-6)  # frozen
    refit = betas("sste_beta_refit")  # recomputed at steps 2, 4, 6: follows the weights
    assert len(refit) == 2 and refit[0] != refit[1] and initial not in refit


@pytest.mark.slow  # 8 ViT compilations: ~35 s here (CI covers these methods on the LM, test_experiments.py)
def test_vision_tables_end_to_end(tmp_path):
    ablate.main(["--task", "vision", "--config", "tiny", "--sets", "table2,table8", "--out", str(tmp_path)])
    runs = report.group_runs(_records(tmp_path / "metrics.jsonl"))
    assert sorted(runs) == sorted(ablate.method_names(["table2", "table8"]))
    for name in ("table2", "table8"):
        text = (tmp_path / f"{name}.md").read_text()
        assert all(f"(`{method}`) |" in text for method in ablate.SETS[name][1])
    for method in runs:
        logs = [r for r in runs[method][0] if "step" in r]
        assert all(np.isfinite(r["flip_rate"]) for r in logs) and 0 <= logs[-1]["test_top1"] <= 1


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(SystemExit):
        ablate.main(["--task", "vision", "--config", "tiny", "--sets", "table3", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        ablate.main(["--task", "lm", "--config", "tiny", "--refit-every", "2", "--out", str(tmp_path)])


def _fake_lm_run(folder, val_loss, flip, betas):
    """A finished 8-step train_lm run: train records every 2 steps, evaluations at 4 and 8."""
    folder.mkdir(parents=True)
    train = [{"step": s, "train_loss": 3.0, "flip_rate": flip, "tokens_per_s": 100.0} for s in (2, 4, 6, 8)]
    evals = [{"step": s, "val_loss": val_loss, "beta_mean": b} for s, b in zip((4, 8), betas)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train + evals))


def test_lm_ablation_tables_from_finished_runs(tmp_path):
    # finished runs are reused (no training): the tables and plots of all three sets
    for seed in (0, 1):
        for i, name in enumerate(ablate.method_names(list(ablate.SETS))):
            betas = (1.5, 1.7 + seed) if name == "sste_beta_refit" else (1.5, 1.5)
            _fake_lm_run(tmp_path / "runs" / f"{name}_s{seed}", 2.0 + 0.01 * i, 0.01 * (1 + i), betas)
    ablate.main(["--task", "lm", "--config", "tiny", "--steps", "8", "--seeds", "0", "1",
                 "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    table2 = (out / "table2.md").read_text()
    assert "Command: `python -m experiments.ablate --task lm" in table2
    assert "| soft threshold, β L1 (‖W‖₁ / ‖S(W)‖₁) (`sste_beta_l1`) | 2.0300 ± 0.0000 | +0.0300 ± 0.0000 |" in table2
    assert "| S-STE + FP8 (`sste_fp8`) | 2.0600 ± 0.0000 | +0.0600 ± 0.0000 |  | 7.000 ± 0.000 |" in (out / "table8.md").read_text()
    fig4 = (out / "fig4.md").read_text()
    assert "recomputed every 50 steps (`sste_beta_refit`)" in fig4
    assert "frozen 1.500; recomputed 1.500 at step 4 → 2.200 at step 8" in fig4  # mean over the two seeds
    for png in ("flip_rate_beta.png", "beta.png", "val_loss.png", "flip_rate.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # three train_lm subprocesses: ~12 s CPU each, ~40 s wall here on 2 shared cores
def test_lm_ablation_end_to_end(tmp_path):
    # three pinned single-thread train_lm subprocesses on the synthetic corpus, two at a time
    ablate.main(["--task", "lm", "--config", "tiny", "--sets", "fig4", "--steps", "4", "--seeds", "0", "--jobs", "2",
                 "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    text = (out / "fig4.md").read_text()
    assert "Command: `python -m experiments.ablate --task lm" in text and "(`sste_beta_refit`) |" in text
    for png in ("flip_rate_beta.png", "beta.png", "val_loss.png", "flip_rate.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    refit = [r["beta_mean"] for r in _records(tmp_path / "runs" / "sste_beta_refit_s0" / "metrics.jsonl")
             if "beta_mean" in r]
    frozen = [r["beta_mean"] for r in _records(tmp_path / "runs" / "sste_s0" / "metrics.jsonl") if "beta_mean" in r]
    assert len(frozen) == len(refit) == 1 and frozen == refit  # evaluated at step 4: no refit before step 50
