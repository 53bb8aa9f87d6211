"""The main job: every method against dense on the capacity-limited LM, each at its tuned learning
rate, with paired 95% intervals over seeds and a closing line that says what is resolved.

    python -m experiments.lm.compare                      # capacity config, 4 methods x 3 seeds
    python -m experiments.lm.compare --methods dense ste srste tsrste_df step sste sste_mvue sste_mvue_fp8 \\
        --seeds 0 1 2 3 4

Runs go one per core as single-threaded processes (`experiments.common.runner`); each lives in
``<runs-dir>/<method>_lr<lr>_s<seed>`` (default ``runs/lm_<config>``), finished ones are reused,
interrupted ones resumed, and a folder holding other settings is refused. Every method of a seed
sees the same batches and initial weights, so differences are paired by seed. Each method trains at
its learning rate from `experiments.lm.configs.TUNED_LR` (the sweep's best) unless ``--lr
METHOD=RATE`` sets one method's (e.g. ``--lr srste=0.012``) or ``--set lr=...`` fixes one for all.
Writes ``table.md``, ``val_loss.png`` and ``flip_rate.png`` to ``--out`` (default
``<runs-dir>/report``).
"""

import argparse
import pathlib
import sys
import time

import numpy as np

from experiments.common import cli, flags, loop, report, runner
from experiments.common.config import sets_lr, with_lr
from experiments.common.recipes import METHODS
from experiments.lm.configs import CONFIGS, TUNED_LR, get_config, recipe_defaults
from experiments.lm.train import make_run

MAIN = ("dense", "ste", "srste", "sste")
PAIRS = (("sste", "srste"), ("sste", "ste"), ("srste", "ste"), ("sste_mvue_fp8", "srste"), ("sste_mvue_fp8", "ste"),
         ("sste_mvue_fp8", "sste"), ("sste", "step"), ("sste", "tsrste_df"), ("tsrste_df_mvue", "tsrste_df"))


def parse_method_lr(text: str) -> tuple[str, float]:
    """``METHOD=RATE`` as ``(method, rate)``; raises ValueError naming what is wrong."""
    method, sep, rate = text.partition("=")
    if not sep or method not in METHODS:
        raise ValueError(f"{text!r}: expected METHOD=RATE with METHOD one of {' '.join(METHODS)}")
    try:
        return method, flags.number(above=0)(rate)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{text!r}: the rate {e}") from None


def run_dir(runs_dir: pathlib.Path, method: str, lr: float, seed: int) -> pathlib.Path:
    return runs_dir / f"{method}_lr{lr:g}_s{seed}"


def plan(config: str, methods, seeds, overrides, runs_dir: pathlib.Path,
         lrs: dict[str, float] | None = None) -> list[runner.Planned]:
    """The runs of ``methods`` x ``seeds``, each method at ``lrs[method]``, else at ``--set lr=`` if
    given, else at its tuned rate for ``config`` (`TUNED_LR`), else at the config's; STEP with the
    config's piloted switch (`experiments.lm.configs.STEP_RECIPE`)."""
    base = get_config(config, overrides)
    fixed_lr = sets_lr(base, overrides)
    tuned = {} if fixed_lr else TUNED_LR.get(config, {})
    out = []
    for method in methods:
        lr = (lrs or {}).get(method) or tuned.get(method, base.optim.lr)
        cfg = base if lr == base.optim.lr else with_lr(base, lr)
        lr_args = () if fixed_lr else (f"lr={cfg.optim.lr!r}", f"min_lr={cfg.optim.min_lr!r}")
        sets = (*overrides, *lr_args)
        args = ("--config", config, *(("--set", *sets) if sets else ()))
        changes = recipe_defaults(config, method)
        out += [runner.Planned(method, seed, make_run(cfg, method, seed, recipe_changes=changes),
                               run_dir(runs_dir, method, lr, seed), args) for seed in seeds]
    return out


def lrs_of(planned: list[runner.Planned]) -> dict[str, float]:
    return {p.name: p.run.config.optim.lr for p in planned}


def summarize(runs: report.Runs, tokens_per_step: int) -> dict[str, dict[str, list[float]]]:
    """Per method, one value per seed: final val loss (2:4 weights), its gap to dense, the late flip
    rate over dense's, tokens/s; differences paired by seed."""
    out = report.summarize_finals(runs, ("val_loss", "val_loss_dense_w"))
    for name, row in out.items():
        if "dense" in runs:
            row["gap_dense"] = [v - d for v, d in zip(row["val_loss"], out["dense"]["val_loss"])]
        speeds = [np.median([r["steps_per_s"] for r in recs if r.get("kind") == "train"][1:] or [np.nan])
                  for _, recs in sorted(runs[name].items())]
        row["tokens_per_s"] = [float(s) * tokens_per_step for s in speeds]
    return out


def table(summary, lrs: dict[str, float], seeds) -> str:
    digits = 4
    lines = ["| method | LR | val loss (2:4 weights) | − dense (95% CI) | flip rate, last ¼ (× dense) | tokens/s |",
             "|---|---|---|---|---|---|"]
    for name, row in summary.items():
        gap = report.format_interval(row["gap_dense"], digits) if name != "dense" and "gap_dense" in row else ""
        flips = report.format_spread(row["flip_ratio"], 2) if "flip_ratio" in row else ""
        lines.append(f"| {name} | {lrs[name]:g} | {report.format_spread(row['val_loss'], digits)} | {gap} | {flips} | "
                     f"{np.nanmean(row['tokens_per_s']):.0f} |")
    differences = report.difference_table(summary, PAIRS, "val_loss", digits)
    if differences:
        lines += ["", differences.rstrip("\n")]
    lines += ["", f"Seeds {list(seeds)}; val loss: mean ± half the range; differences paired by seed (same batches "
              "and initial weights) with a two-sided 95% Student-t interval; * marks an interval that excludes 0 "
              "(resolved). Negative means lower (better) loss than the reference."]
    return "\n".join(lines) + "\n"


def verdict(summary) -> str:
    """One sentence per comparison with S-STE: which differences are resolved, in words."""
    words = []
    refs = [("dense", "gap_dense")] + [(b, None) for a, b in PAIRS if a == "sste" and b in summary]
    if "sste" not in summary:
        return "S-STE was not run: nothing to conclude about it."
    for ref, key in refs:
        if ref not in summary:
            continue
        d = (
            summary["sste"][key]
            if key
            else report.paired_differences(summary, "sste", ref, "val_loss")
        )
        if len(d) < 2:
            words.append(f"S-STE vs {ref}: {d[0]:+.4f} nats on one seed (no interval: run more seeds)")
            continue
        mean, lo, hi = report.paired_interval(d)
        if lo > 0:
            words.append(f"S-STE is worse than {ref} by {mean:.4f} nats (95% CI {lo:.4f} to {hi:.4f}): resolved")
        elif hi < 0:
            words.append(f"S-STE beats {ref} by {-mean:.4f} nats (95% CI {-hi:.4f} to {-lo:.4f}): resolved")
        else:
            words.append(f"S-STE vs {ref}: {mean:+.4f} nats, 95% CI {lo:+.4f} to {hi:+.4f}: not resolved (the data "
                         f"rule out a lead of S-STE over {ref} above {-lo:.4f} nats and a deficit above {hi:.4f})")
    return "; ".join(words) + "."


def write_plots(runs: report.Runs, out: pathlib.Path, caption: str) -> None:
    report.plot_curves(runs, "val_loss", out / "val_loss.png", "validation loss (2:4 weights)", title=caption,
                       skip_first=True)
    report.plot_curves(runs, "flip_rate", out / "flip_rate.png", "mask flip rate per step", log=True, title=caption)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_config_args(p, CONFIGS, "capacity")
    cli.add_methods_args(p, MAIN, (0, 1, 2))
    cli.add_jobs_arg(p)
    p.add_argument("--xla-threads", choices=["one", "default"], default="one",
                   help="one: single-threaded XLA per run (default); default: XLA's own threading (use --jobs 1)")
    p.add_argument("--lr", nargs="+", action="extend", default=[], type=flags.parsed_by(parse_method_lr),
                   metavar="METHOD=RATE", help="a method's peak rate instead of its tuned one (min_lr keeps the "
                                               "config's ratio), e.g. srste=0.012; repeatable")
    p.add_argument("--runs-dir", default=None, help="default runs/lm_<config>")
    p.add_argument("--out", default=None, help="default <runs-dir>/report")
    args = p.parse_args(argv)
    if args.recipe:
        p.error("--recipe is for experiments.lm.train (one method); compare runs each method's own recipe")
    lrs = dict(args.lr)
    if len(lrs) < len(args.lr):
        p.error("--lr: a method is given twice")
    if set(lrs) - set(args.methods):
        p.error(f"--lr {' '.join(sorted(set(lrs) - set(args.methods)))}: not among --methods")
    try:
        cfg = get_config(args.config, args.set)
    except ValueError as e:
        p.error(str(e))
    if lrs and sets_lr(cfg, args.set):
        p.error("--lr and --set lr=... both set rates: use one")
    runs_dir = pathlib.Path(args.runs_dir or f"runs/lm_{args.config}")
    out = pathlib.Path(args.out or runs_dir / "report")
    began = time.perf_counter()
    planned = plan(args.config, args.methods, args.seeds, args.set, runs_dir, lrs)
    try:
        runner.execute("experiments.lm.train", planned, args.jobs, single_thread=args.xla_threads == "one")
    except (loop.RunMismatchError, runner.RunsFailed) as e:
        sys.exit(f"error: {e}")
    runs = runner.load(planned)
    summary = summarize(runs, cfg.optim.batch_size * cfg.optim.grad_accum * cfg.model.seq_len)
    m = cfg.model
    command = "python -m experiments.lm.compare " + " ".join(argv if argv is not None else sys.argv[1:])
    title = (f"### `{args.config}`: {m.n_layer} layers x d {m.d_model}, {cfg.optim.steps} steps, seeds "
             f"{args.seeds}\n\nCommand: `{command.strip()}`. Machine: {report.machine(args.xla_threads == 'one')}.\n\n")
    text = title + table(summary, lrs_of(planned), args.seeds) + "\n" + verdict(summary) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    write_plots(runs, out, f"{args.config}, seeds {args.seeds}, each method at its LR (band: seed range)")
    print(text)
    print(f"wrote {out}/table.md, val_loss.png, flip_rate.png in {time.perf_counter() - began:.0f} s")
    return text


if __name__ == "__main__":
    main()
