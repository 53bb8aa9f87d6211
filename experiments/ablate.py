"""The S-STE ablations, scaled down: the paper's Table 2 (soft threshold, β rule), Table 8 (MVUE, FP8)
and Figure 4 (β frozen vs recomputed), on the vision task (ViT) or the language-model task.

    python -m experiments.ablate --task vision --config small --seeds 0 1 2
    python -m experiments.ablate --task vision --config small --set dataset=fashion --sets fig4
    python -m experiments.ablate --task lm --seeds 0 1

Each set is a list of recipe names (`experiments.common.recipes.METHODS`), ``dense`` the reference:

- ``table2``: ``ste`` (soft threshold off: a hard threshold, whose MSE-optimal β is exactly 1),
  ``sste_beta_none`` (soft, β = 1), ``sste_beta_l1`` (soft, β = ‖W‖₁ / ‖S(W)‖₁) and ``sste`` (soft,
  β minimising ‖W − β·S(W)‖²: the method).
- ``table8``: ``sste``, ``sste_mvue``, ``sste_fp8``, ``sste_mvue_fp8``.
- ``fig4``: ``sste`` (β frozen) and ``sste_beta_refit`` (β recomputed from the current weights every
  epoch on vision, ``ceil(n_train / batch)`` steps or ``--refit-every``; every 50 steps, the recipe's
  default, on the LM, whose runs are shorter than one epoch).

Runs go one per core as single-threaded processes of the task's train module
(`experiments.common.runner`); finished ones are reused, interrupted ones resumed. Vision runs live
in ``runs/ablation_vision_<config>`` (``runs/ablation_vision_fashion_<config>`` on Fashion-MNIST);
LM runs in ``runs/lm_<config>``, shared with `experiments.lm.compare`, each method at its learning
rate from `experiments.lm.configs.TUNED_LR` (else the config's). Writes to ``--out`` (default
``<runs-dir>/ablation``): ``<set>.md`` per set (the table, then each variant minus S-STE, paired by
seed; ``table2`` ends with each rule's final β); for ``fig4`` also ``flip_rate_beta.png`` (flip rate
per step, log scale: dense, β frozen, β recomputed) and ``beta.png`` (mean β of the sparse layers); LM
also ``val_loss.png`` and ``flip_rate.png`` of every run.
"""

import argparse
import dataclasses
import pathlib
import sys
import time

from experiments.common import cli, flags, loop, report, runner
from experiments.common.recipes import METHODS

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
REFIT = "sste_beta_refit"
LM_REFIT_EVERY = METHODS[REFIT].refit_beta_every  # the LM runs' period (the recipe default, 50)
DEFAULT_CONFIG = {"vision": "small", "lm": "capacity"}


def method_names(sets: list[str]) -> list[str]:
    """The methods the chosen sets need, each once, in order."""
    return list(dict.fromkeys(name for s in sets for name in SETS[s][1]))


def _mean_beta(runs: report.Runs, name: str) -> dict[int, float]:
    """``name``'s mean β of the sparse layers per evaluated step, mean over seeds."""
    return dict(zip(*report.seed_mean_curve(runs[name], "beta_mean")))


def beta_note(runs: report.Runs) -> str:
    """One line: the mean β (over layers, then seeds) of the frozen run and the recomputed one's path."""
    frozen, refit = _mean_beta(runs, "sste"), list(_mean_beta(runs, REFIT).items())
    (first, b0), (last, b1) = refit[0], refit[-1]
    return (f"Mean β of the sparse layers (mean over seeds): frozen {next(iter(frozen.values())):.3f}; "
            f"recomputed {b0:.3f} at step {first} → {b1:.3f} at step {last}.\n")


def final_beta_note(runs: report.Runs, names) -> str:
    """One line: each of ``names``' β at its last evaluation (mean over layers, then seeds)."""
    finals = {name: list(_mean_beta(runs, name).values())[-1] for name in names}
    return ("Mean β of the sparse layers at the end (mean over seeds): "
            + ", ".join(f"`{name}` {b:.3f}" for name, b in finals.items()) + ".\n")


def plan_refit(planned: runner.Planned, make_run, refit_every: int) -> runner.Planned:
    """``planned`` (a ``sste_beta_refit`` run of the task's ``plan``) with β recomputed every
    ``refit_every`` steps: the same `loop.Run` as ``--recipe refit_beta_every=N`` gives the train module."""
    item = f"refit_beta_every={refit_every}"
    run = planned.run
    changed = make_run(run.config, run.method, run.seed, recipe_changes=cli.parse_recipe([item]))
    workdir = planned.workdir.with_name(f"{REFIT}_every{refit_every}_s{run.seed}")
    return dataclasses.replace(planned, run=changed, workdir=workdir, args=(*planned.args, "--recipe", item))


def labelled(summary: dict, labels: dict[str, str], refit_every: int, gaps: bool = True) -> dict:
    """``summary`` keyed ``label (`name`)``; the reference row has no gap to itself (nor any row
    without ``gaps``)."""
    out = {}
    for name, label in labels.items():
        row = dict(summary[name])
        if name == "dense" or not gaps:
            row.pop("gap_dense", None)
        out[f"{label.format(refit=refit_every)} (`{name}`)"] = row
    return out


def differences_to_sste(summary: dict, labels: dict[str, str], key: str, digits: int, unit: str) -> str:
    """The set's own comparison: each variant in ``labels`` minus S-STE on ``key``, paired by seed, as a
    Markdown table (empty when the set has no S-STE row or no variant)."""
    if "sste" not in labels:
        return ""
    pairs = [(name, "sste") for name in labels if name not in ("dense", "sste")]
    text = report.difference_table(summary, pairs, key, digits, unit)
    return "\n" + text if text else ""


def write_results(runs: report.Runs, sets: list[str], out: pathlib.Path, header: str, refit_every: int,
                  table) -> dict[str, str]:
    """The sets' tables (``<set>.md``; ``table(runs_of_set, labels)`` gives each) and, for ``fig4``,
    ``flip_rate_beta.png`` and ``beta.png``; returns ``{set: text}``."""
    out.mkdir(parents=True, exist_ok=True)
    texts = {}
    for s in sets:
        title, labels = SETS[s]
        subset = {name: runs[name] for name in labels}
        text = f"### {title}\n\n{header}\n\n{table(subset, labels)}"
        if s == "table2":
            text += "\n" + final_beta_note(subset, [name for name in labels if name != "dense"])
        if s == "fig4":
            text += "\n" + beta_note(subset)
        (out / f"{s}.md").write_text(text)
        texts[s] = text
        print(text)
    if "fig4" in sets:
        title = f"β frozen vs recomputed every {refit_every} steps"
        report.plot_curves({name: runs[name] for name in SETS["fig4"][1]}, "flip_rate", out / "flip_rate_beta.png",
                           "mask flip rate per step", log=True, title=title)
        report.plot_curves({n: runs[n] for n in ("sste", REFIT)}, "beta_mean", out / "beta.png",
                           "β, mean over the sparse layers", title=title)
    return texts


def _execute(module: str, planned: list[runner.Planned], jobs: int | None) -> report.Runs:
    try:
        runner.execute(module, planned, jobs)
    except (loop.RunMismatchError, runner.RunsFailed) as e:
        sys.exit(f"error: {e}")
    return runner.load(planned)


def run_vision(p: argparse.ArgumentParser, args, names: list[str], command: str):
    """Trains (or reuses) the vision runs; returns ``(runs, out, header, refit_every, table)``."""
    from experiments.vision import compare
    from experiments.vision.configs import get_config
    from experiments.vision.data import fetch_fashion, load_data
    from experiments.vision.train import make_run

    try:
        cfg = get_config(args.config, args.set)
    except ValueError as e:
        p.error(str(e))
    dataset, o = cfg.data.dataset, cfg.optim
    if args.data_dir and dataset != "fashion":
        p.error("--data-dir is for dataset=fashion (--set dataset=fashion)")
    suffix = "_fashion" if dataset == "fashion" else ""
    runs_dir = pathlib.Path(args.runs_dir or f"runs/ablation_vision{suffix}_{args.config}")
    out = pathlib.Path(args.out or runs_dir / "ablation")
    try:
        data_dir = (args.data_dir or fetch_fashion(args.cache_dir)) if dataset == "fashion" else None
        refit_every = args.refit_every
        if REFIT in names and refit_every is None:  # one epoch: each step takes batch_size * grad_accum images
            refit_every = compare.epoch_steps(len(load_data(dataset, data_dir)[1]), o.batch_size * o.grad_accum)
    except (RuntimeError, OSError, ValueError) as e:  # a failed fetch names its command; a bad idx folder
        sys.exit(f"error: {e}")
    data_args = ("--data-dir", str(data_dir)) if data_dir else ()
    planned = compare.plan(args.config, names, args.seeds, args.set, runs_dir, data_args)
    planned = [plan_refit(q, make_run, refit_every) if q.name == REFIT else q for q in planned]
    runs = _execute("experiments.vision.train", planned, args.jobs)
    m = cfg.model
    header = (f"ViT on {dataset}, config `{args.config}` ({m.n_layer}-block, d {m.d_model}), {o.steps} steps, "
              f"seeds {args.seeds}. Command: `{command}`")

    def table(subset, labels):
        summary = compare.summarize(subset)
        return (compare.table(labelled(summary, labels, refit_every))
                + differences_to_sste(summary, labels, "test_top1", 1, "top-1 points"))

    return runs, out, header, refit_every, table


def run_lm(p: argparse.ArgumentParser, args, names: list[str], command: str):
    """Trains (or reuses) the LM runs; returns ``(runs, out, header, refit_every, table)``."""
    from experiments.lm import compare
    from experiments.lm.configs import get_config

    try:
        cfg = get_config(args.config, args.set)
    except ValueError as e:
        p.error(str(e))
    runs_dir = pathlib.Path(args.runs_dir or f"runs/lm_{args.config}")
    out = pathlib.Path(args.out or runs_dir / "ablation")
    planned = compare.plan(args.config, names, args.seeds, args.set, runs_dir)
    runs = _execute("experiments.lm.train", planned, args.jobs)
    lrs = compare.lrs_of(planned)
    o, m = cfg.optim, cfg.model
    caption = f"{args.config}, seeds {args.seeds}, each method at its LR (band: seed range)"
    out.mkdir(parents=True, exist_ok=True)
    compare.write_plots(runs, out, caption)
    header = (f"GPT `{args.config}` ({m.n_layer} layers x d {m.d_model}), {o.steps} steps, seeds {args.seeds}, "
              f"each method at its learning rate (LR column). Command: `{command}`")
    several = len(args.seeds) >= 2
    note = "" if several else "\nOne seed: no interval for the gap to dense (run 2 or more seeds).\n"

    def table(subset, labels):
        summary = compare.summarize(subset, o.batch_size * o.grad_accum * m.seq_len)
        rows = labelled(summary, labels, LM_REFIT_EVERY, gaps=several)
        label_lrs = {key: lrs[name] for key, name in zip(rows, labels)}
        diffs = differences_to_sste(summary, labels, "val_loss", 4, "nats") if several else ""
        return compare.table(rows, label_lrs, args.seeds) + diffs + note

    return runs, out, header, LM_REFIT_EVERY, table


def main(argv=None) -> dict[str, str]:
    """Runs the ablation; returns ``{set: Markdown text}`` (also written to ``<out>/<set>.md``)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", required=True, choices=sorted(DEFAULT_CONFIG))
    p.add_argument("--config", help="vision: tiny or small (default small); lm: any of experiments.lm.configs "
                                    "(default capacity)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. dataset=fashion (vision) or steps=100; repeatable")
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS), metavar="SET",
                   help=f"any of {' '.join(SETS)} (default: all)")
    p.add_argument("--seeds", nargs="+", type=flags.integer(0), default=[0], help="default: %(default)s")
    p.add_argument("--refit-every", type=flags.integer(1),
                   help="vision only: β recomputation period in steps (default one epoch)")
    cli.add_jobs_arg(p)
    p.add_argument("--runs-dir", help="default runs/ablation_vision[_fashion]_<config> (vision), "
                                      "runs/lm_<config> (lm, shared with experiments.lm.compare)")
    p.add_argument("--out", help="default <runs-dir>/ablation")
    p.add_argument("--data-dir", help="vision on fashion only: the idx files (default: fetched into the cache)")
    p.add_argument("--cache-dir", help="vision only: data cache (default $SSTE_CACHE or ~/.cache/sste_jax)")
    args = p.parse_args(argv)
    if args.task == "lm" and (args.refit_every is not None or args.data_dir or args.cache_dir):
        p.error(f"--refit-every, --data-dir and --cache-dir are for --task vision (the LM recomputes β every "
                f"{LM_REFIT_EVERY} steps, its recipe's default)")
    args.seeds = list(dict.fromkeys(args.seeds))
    if args.task == "vision":
        from experiments.vision.configs import CONFIGS
    else:
        from experiments.lm.configs import CONFIGS
    args.config = args.config or DEFAULT_CONFIG[args.task]
    if args.config not in CONFIGS:
        p.error(f"--config {args.config!r} is not a {args.task} config: use one of {sorted(CONFIGS)}")
    sets = list(dict.fromkeys(args.sets))
    names = method_names(sets)
    command = ("python -m experiments.ablate " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    began = time.perf_counter()
    run = run_vision if args.task == "vision" else run_lm
    runs, out, header, refit_every, table = run(p, args, names, command)
    texts = write_results(runs, sets, out, header, refit_every, table)
    print(f"wrote {out} in {time.perf_counter() - began:.0f} s")
    return texts


if __name__ == "__main__":
    main()
