"""The downstream comparison (the paper's GLUE table, scaled down): each method's pre-trained
``capacity`` model fine-tuned on the Austen task with its own method, against dense and against
training from scratch, with paired intervals over seeds.

    python -m experiments.finetune.compare                                   # tuned rates, seeds 0-4
    python -m experiments.finetune.compare --lrs 3e-4 1e-3 3e-3 --seeds 0 1  # the rate grid

Each row fine-tunes the pre-training run of its method and seed (`experiments.lm.compare`'s runs in
``runs/lm_<pretrained>``, trained first if missing, each at its tuned rate); ``scratch`` rows (``--scratch``,
default dense) fine-tune the same classifier from the initial weights of the seed, with no
pre-training. For a seed every row sees the same batches and validation windows, so differences are
paired by seed. Rows train at their rate in `experiments.finetune.configs.TUNED_LR` unless
``--set lr=`` fixes one; ``--lrs`` instead trains every row at every rate and prints the grid (mean
final validation loss and accuracy over ``--seeds``, the lowest loss per row in bold) and the
``TUNED_LR`` entry. Runs live in ``<runs-dir>/<row>_lr<lr>_s<seed>`` (default
``runs/finetune_<config>``); finished ones are reused. Writes ``table.md`` (or ``grid.md``) and
``val_acc.png`` to ``--out`` (default ``<runs-dir>/report``).
"""

import argparse
import pathlib
import sys
import time

import numpy as np

from experiments.common import cli, flags, loop, report, runner
from experiments.common.config import sets_lr, with_lr
from experiments.finetune.configs import CONFIGS, TUNED_LR, get_config
from experiments.finetune.train import make_run
from experiments.lm import compare as lm_compare

MAIN = ("dense", "ste", "srste", "sste", "sste_mvue_fp8")
SCRATCH = "scratch"  # row-name prefix: no pre-training
PAIRS = (("sste", "srste"), ("sste", "ste"), ("srste", "ste"), ("sste_mvue_fp8", "srste"), ("sste_mvue_fp8", "sste"),
         ("dense", "scratch_dense"), ("sste", "scratch_dense"))


def row_method(row: str) -> str:
    return row.removeprefix(SCRATCH + "_")


def plan(config: str, rows, seeds, overrides, runs_dir: pathlib.Path, pretrained: dict, lr_of) -> list[runner.Planned]:
    """The fine-tunings of ``rows`` x ``seeds``; ``pretrained[(method, seed)]`` is the starting run's
    folder; ``lr_of(row)`` the row's peak rate."""
    base = get_config(config, overrides)
    out = []
    for row in rows:
        lr = lr_of(row)
        cfg = with_lr(base, lr)
        sets = (*overrides, f"lr={lr!r}", f"min_lr={cfg.optim.min_lr!r}")
        for seed in seeds:
            start = "" if row.startswith(SCRATCH) else str(pretrained[(row, seed)])
            args = ("--config", config, "--set", *sets, *(("--init-from", start) if start else ()))
            out.append(runner.Planned(row, seed, make_run(cfg, row_method(row), seed, init_from=start),
                                      runs_dir / f"{row}_lr{lr:g}_s{seed}", args))
    return out


def execute(planned: list[runner.Planned], jobs: int | None) -> None:
    """Trains the planned fine-tunings that have not finished (a row's method is its name's)."""
    todo = [runner.Job(f"{p.name} seed {p.seed}", "experiments.finetune.train",
                       ("--method", row_method(p.name), "--seed", str(p.seed), "--workdir", str(p.workdir), "--quiet",
                        "--resume", *p.args), p.workdir, p.run.config.optim.steps)
            for p in planned if not loop.finished(p.workdir, p.run)]
    runner.run_jobs(todo, jobs)


def summarize(runs: report.Runs) -> dict[str, dict[str, list[float]]]:
    """Per row, one value per seed: final validation accuracy (%) and loss."""
    out = report.summarize_finals(runs, ("val_acc", "val_loss"))
    for row in out.values():
        row["val_acc"] = [100 * a for a in row["val_acc"]]
        row.pop("flip_ratio", None)
    return out


def table(summary, lrs: dict[str, float], seeds) -> str:
    lines = ["| row | LR | val accuracy (%) | per seed | − dense, points (95% CI) | val loss | − dense (95% CI) |",
             "|---|---|---|---|---|---|---|"]
    for name, row in summary.items():
        gaps = [report.format_interval([a - b for a, b in zip(row[k], summary["dense"][k])], d)
                if name != "dense" and "dense" in summary else "" for k, d in (("val_acc", 1), ("val_loss", 3))]
        lines.append(f"| {name} | {lrs[name]:g} | {report.format_spread(row['val_acc'], 1)} | "
                     f"{', '.join(f'{a:.1f}' for a in row['val_acc'])} | {gaps[0]} | "
                     f"{report.format_spread(row['val_loss'], 3)} | {gaps[1]} |")
    pairs = [(a, b) for a, b in PAIRS if a in summary and b in summary]
    if pairs:
        lines += ["", "| difference | accuracy, points (95% CI) | loss (95% CI) |", "|---|---|---|"]
        for a, b in pairs:
            cells = [report.format_interval(report.paired_differences(summary, a, b, k), d)
                     for k, d in (("val_acc", 1), ("val_loss", 3))]
            lines.append(f"| {a} − {b} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Seeds {list(seeds)}: seed s fine-tunes pre-training run s; accuracy and loss on the held-out "
              "chapters with the 2:4 weights, mean ± half the range; differences paired by seed with a two-sided 95% "
              "Student-t interval, * when it excludes 0."]
    return "\n".join(lines) + "\n"


def grid_table(grid: dict[str, dict[float, dict]]) -> tuple[str, dict[str, float]]:
    """The rate grid as Markdown (mean final val loss, then accuracy, over seeds; lowest loss bold)
    and each row's best rate."""
    lrs = sorted({lr for by_lr in grid.values() for lr in by_lr})
    lines = ["| row | " + " | ".join(f"LR {lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    best = {}
    for row, by_lr in grid.items():
        means = {lr: (np.mean(s[row]["val_loss"]), np.mean(s[row]["val_acc"])) for lr, s in by_lr.items()}
        best[row] = min(means, key=lambda lr: means[lr][0])
        cells = [f"{means[lr][0]:.3f}, {means[lr][1]:.1f}%" if lr in means else "" for lr in lrs]
        lines.append(f"| {row} | " + " | ".join(f"**{c}**" if lr == best[row] else c for lr, c in zip(lrs, cells))
                     + " |")
    return "\n".join(lines) + "\n", best


def main(argv=None) -> str:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_config_args(p, CONFIGS, "capacity")
    cli.add_methods_args(p, MAIN, (0, 1, 2, 3, 4))
    p.add_argument("--scratch", nargs="*", default=["dense"], metavar="METHOD",
                   help="methods also fine-tuned without pre-training (default: dense)")
    p.add_argument("--lrs", nargs="+", type=flags.number(above=0), help="train every row at each rate: the grid")
    cli.add_jobs_arg(p)
    p.add_argument("--runs-dir", default=None, help="default runs/finetune_<config>")
    p.add_argument("--out", default=None, help="default <runs-dir>/report")
    args = p.parse_args(argv)
    try:
        cfg = get_config(args.config, args.set)
        fixed = sets_lr(cfg, args.set)
        if args.recipe or (fixed and args.lrs):
            raise ValueError("--recipe does not apply; --lrs and --set lr exclude each other")
    except ValueError as e:
        p.error(str(e))
    rows = [*args.methods, *(f"{SCRATCH}_{m}" for m in args.scratch)]
    runs_dir = pathlib.Path(args.runs_dir or f"runs/finetune_{args.config}")
    out = pathlib.Path(args.out or runs_dir / "report")
    began = time.perf_counter()
    lm = cfg.data.pretrained
    try:
        pre = lm_compare.plan(lm, args.methods, args.seeds, [], pathlib.Path(f"runs/lm_{lm}"))
        runner.execute("experiments.lm.train", pre, args.jobs)
        pretrained = {(q.name, q.seed): q.workdir for q in pre}
        tuned = TUNED_LR.get(args.config, {})
        rates = args.lrs or [None]
        planned = {lr: plan(args.config, rows, args.seeds, [s for s in args.set if not s.startswith("lr=")],
                            runs_dir, pretrained,
                            lambda row, lr=lr: lr or (cfg.optim.lr if fixed else tuned.get(row, cfg.optim.lr)))
                   for lr in rates}
        execute([q for qs in planned.values() for q in qs], args.jobs)
    except (loop.RunMismatchError, runner.RunsFailed, ValueError) as e:
        sys.exit(f"error: {e}")
    command = "python -m experiments.finetune.compare " + " ".join(argv if argv is not None else sys.argv[1:])
    head = (f"### Fine-tuning on Austen's novels, `{args.config}`, seeds {args.seeds}\n\nCommand: `{command.strip()}`. "
            f"Machine: {report.machine()}.\n\n")
    out.mkdir(parents=True, exist_ok=True)
    if args.lrs:
        grid = {}
        for lr, qs in planned.items():
            for row, values in summarize(runner.load(qs)).items():
                grid.setdefault(row, {})[lr] = {row: values}
        text, best = grid_table(grid)
        text = (head + "Final validation loss, accuracy: means over the seeds; the lowest loss per row in bold.\n\n"
                + text)
        (out / "grid.md").write_text(text)
        print(text)
        print(f"TUNED_LR[{args.config!r}] = {best!r}")
        return text
    (qs,) = planned.values()
    runs = runner.load(qs)
    text = head + table(summarize(runs), {q.name: q.run.config.optim.lr for q in qs}, args.seeds)
    (out / "table.md").write_text(text)
    report.plot_curves(runs, "val_acc", out / "val_acc.png", "validation accuracy (held-out chapters)",
                       title=f"fine-tuning on Austen, `{args.config}`, seeds {args.seeds} (band: seed range)")
    print(text)
    print(f"wrote {out}/table.md, val_acc.png in {time.perf_counter() - began:.0f} s")
    return text


if __name__ == "__main__":
    main()
