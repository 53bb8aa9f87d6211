"""The S-STE ablations, scaled down: the paper's Table 2 (soft threshold, β rule), Table 8 (MVUE, FP8)
and Figure 4 (β frozen vs recomputed), on the vision task (ViT) or the language-model task.

    python -m experiments.ablate --task vision --config small --seeds 0,1,2
    python -m experiments.ablate --task lm --config small --seeds 0,1 --jobs 2

Each set is a list of `experiments.methods` names, with ``dense`` as the reference:

- ``table2``: ``ste`` (soft threshold off: a hard threshold, whose MSE-optimal β is exactly 1),
  ``sste_beta_none`` (soft, β = 1), ``sste_beta_l1`` (soft, β = ‖W‖₁ / ‖S(W)‖₁) and ``sste`` (soft,
  β minimising ‖W − β·S(W)‖²: the method).
- ``table8``: ``sste``, ``sste_mvue``, ``sste_fp8``, ``sste_mvue_fp8``.
- ``fig4``: ``sste`` (β frozen) and ``sste_beta_refit`` (β recomputed from the current weights every
  epoch on vision, ``ceil(n_train / batch_size)`` steps; every 50 steps on the LM, whose runs are
  shorter than one epoch).

Vision runs go one after another in this process (`experiments.vision.train`). LM runs are
`experiments.compare_lm.run_all`'s pinned single-thread subprocesses; finished ones under
``runs/lm_<config>`` (shared with `compare_lm`) are reused. Writes ``results/ablation_<task>_<config>/``
(vision on Fashion-MNIST: ``ablation_vision_fashion_<config>``): ``table2.md``, ``table8.md``,
``fig4.md``, ``flip_rate_beta.png`` (flip rate per step, log scale: dense, β frozen, β recomputed),
``beta.png`` (the mean β of the sparse layers, frozen and recomputed); vision also the runs'
``metrics.jsonl``, LM also ``val_loss.png`` and ``flip_rate.png`` of every run (the JSON lines stay in
the runs folder).
"""

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time


from experiments import compare_lm, methods, vision
from experiments.configs import get_config
from experiments.report import group_runs, plot_curves, seed_mean_curve

REFERENCE = "reference"
SETS = {
    "table2": ("Table 2 analogue: soft threshold and β rule", {
        "dense": REFERENCE,
        "ste": "soft threshold off (hard threshold, β = 1)",
        "sste_beta_none": "soft threshold, β none (1)",
        "sste_beta_l1": "soft threshold, β L1 (‖W‖₁ / ‖S(W)‖₁)",
        "sste": "soft threshold, β MSE (S-STE)",
    }),
    "table8": ("Table 8 analogue: MVUE and FP8", {
        "dense": REFERENCE,
        "sste": "S-STE",
        "sste_mvue": "S-STE + MVUE",
        "sste_fp8": "S-STE + FP8",
        "sste_mvue_fp8": "S-STE + MVUE + FP8",
    }),
    "fig4": ("Figure 4 analogue: β frozen vs recomputed", {
        "dense": REFERENCE,
        "sste": "S-STE, β frozen",
        "sste_beta_refit": "S-STE, β recomputed every {refit} steps",
    }),
}
LM_REFIT_EVERY = methods.METHODS["sste_beta_refit"].refit_beta_every  # the LM runs' period (50)


def method_names(sets: list[str]) -> list[str]:
    """The methods the chosen sets need, each once, in order."""
    return list(dict.fromkeys(name for s in sets for name in SETS[s][1]))


def run_vision(cfg, data, names: list[str], seeds: list[int], refit_every: int,
               metrics_path: pathlib.Path) -> dict[str, dict[int, list[dict]]]:
    """Trains every (method, seed) into a fresh ``metrics_path``; returns ``{method: {seed: records}}``."""
    metrics_path.unlink(missing_ok=True)
    for seed in seeds:
        for name in names:
            changes = {"refit_beta_every": refit_every} if name == "sste_beta_refit" else {}
            final = vision.train(cfg, name, seed, data, metrics_path, **changes)
            print(f"{name} seed {seed}: test top-1 {100 * final['test_top1']:.1f}% in {final['seconds']:.0f} s",
                  flush=True)
    return group_runs([json.loads(line) for line in metrics_path.read_text().splitlines()])


def beta_note(runs: dict[str, dict[int, list[dict]]]) -> str:
    """One line: the mean β (over layers, then seeds) of the frozen run and the recomputed one's path."""
    def betas(name):  # {step: mean over seeds}
        return dict(zip(*seed_mean_curve(runs[name], "beta_mean")))

    frozen, refit = betas("sste"), list(betas("sste_beta_refit").items())
    (first, b0), (last, b1) = refit[0], refit[-1]
    return (f"Mean β of the sparse layers (mean over seeds): frozen {next(iter(frozen.values())):.3f}; "
            f"recomputed {b0:.3f} at step {first} → {b1:.3f} at step {last}.\n")


def write_results(task: str, runs, sets: list[str], out: pathlib.Path, header: str, steps: int,
                  refit_every: int) -> None:
    """The sets' tables (``<set>.md``) and, for ``fig4``, ``flip_rate_beta.png`` and ``beta.png``."""
    out.mkdir(parents=True, exist_ok=True)
    for s in sets:
        title, labels = SETS[s]
        subset = {name: runs[name] for name in labels}
        summary = vision.summarize(subset) if task == "vision" else compare_lm.summarize(subset, steps)
        labelled = {f"{label.format(refit=refit_every)} (`{name}`)": summary[name] for name, label in labels.items()}
        if task == "vision":
            text = f"### {title}\n\n{header}\n\n{vision.table(labelled)}"
        else:
            text = compare_lm.write_table(labelled, out / f"{s}.md", f"{title}. {header}")
        if s == "fig4":
            text += "\n" + beta_note(subset)
        (out / f"{s}.md").write_text(text)
        print(text)
    if "fig4" in sets:
        fig = {name: runs[name] for name in SETS["fig4"][1]}
        title = f"β frozen vs recomputed every {refit_every} steps"
        plot_curves(fig, "flip_rate", out / "flip_rate_beta.png", "mask flip rate per step", log=True,
                           title=title)
        plot_curves({n: runs[n] for n in ("sste", "sste_beta_refit")}, "beta_mean", out / "beta.png",
                           "β, mean over the sparse layers", title=title)


def _ints(values: list[str]) -> list[int]:
    return [int(v) for item in values for v in item.split(",") if v]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, choices=["vision", "lm"])
    p.add_argument("--config", default="small", choices=["tiny", "small"])
    p.add_argument("--dataset", choices=sorted(vision.DATASETS), help="vision only (default digits)")
    p.add_argument("--data-dir", help="vision on fashion: the idx files (default: fetched into the cache)")
    p.add_argument("--cache-dir", help="data cache (default $SSTE_CACHE or ~/.cache/sste_jax)")
    p.add_argument("--sets", default="table2,table8,fig4", help="comma-separated, from " + ",".join(SETS))
    p.add_argument("--seeds", nargs="+", default=["0"], help="e.g. 0,1,2 or 0 1 2")
    p.add_argument("--steps", type=int, help="training steps (overrides the config)")
    p.add_argument("--refit-every", type=int, help="vision only: β recomputation period (default one epoch)")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count(), help="LM only: parallel single-thread runs")
    p.add_argument("--runs-dir", help="LM only: default runs/lm_<config> (runs/lm_<config>_<steps>steps with --steps)")
    p.add_argument("--out", help="default results/ablation_<task>[_fashion]_<config>")
    args = p.parse_args(argv)
    sets = args.sets.split(",")
    if unknown := [s for s in sets if s not in SETS]:
        p.error(f"unknown sets {unknown}: use some of {list(SETS)}")
    if args.task == "lm" and (args.dataset or args.data_dir or args.refit_every):
        p.error(f"--dataset, --data-dir and --refit-every are for --task vision (the LM recomputes β every "
                f"{LM_REFIT_EVERY} steps)")
    seeds, names = _ints(args.seeds), method_names(sets)
    command = "python -m experiments.ablate " + " ".join(argv if argv is not None else sys.argv[1:])
    began = time.perf_counter()
    if args.task == "vision":
        dataset = args.dataset or "digits"
        cfg = vision.dataset_config(vision.CONFIGS[args.config], dataset)
        cfg = dataclasses.replace(cfg, steps=args.steps or cfg.steps)
        data = vision.load_data(dataset, args.data_dir, args.cache_dir)
        refit_every = args.refit_every or vision.epoch_steps(len(data[1]), cfg.batch_size)
        out = pathlib.Path(args.out or f"results/ablation_vision{'_fashion' * (dataset == 'fashion')}_{args.config}")
        out.mkdir(parents=True, exist_ok=True)
        runs = run_vision(cfg, data, names, seeds, refit_every, out / "metrics.jsonl")
        steps = cfg.steps
        header = f"ViT on {dataset}, config `{args.config}`, {cfg.steps} steps, seeds {seeds}. Command: `{command}`"
    else:
        cfg = get_config(args.config)
        steps, refit_every = args.steps or cfg.steps, LM_REFIT_EVERY
        runs_dir = pathlib.Path(args.runs_dir or f"runs/lm_{args.config}"
                                + (f"_{steps}steps" if steps != cfg.steps else ""))
        out = pathlib.Path(args.out or f"results/ablation_lm_{args.config}")
        compare_lm.run_all(args.config, names, seeds, steps, runs_dir, args.jobs, [])
        runs = compare_lm.load_runs(runs_dir, names, seeds)
        out.mkdir(parents=True, exist_ok=True)
        compare_lm.write_plots(runs, out)
        header = (f"GPT `{args.config}` ({cfg.n_layer} layers x d {cfg.d_model}), {steps} steps, seeds {seeds}. "
                  f"Command: `{command}`")
    write_results(args.task, runs, sets, out, header, steps, refit_every)
    print(f"wrote {out} in {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
