"""The vision comparison (the paper's Table 5, scaled down): each method's ViT against dense, test
top-1 with paired intervals over seeds.

    python -m experiments.vision.compare                                  # small, digits, seed 0
    python -m experiments.vision.compare --set dataset=fashion steps=1000 --seeds 0 1

Runs go one per core as single-threaded processes of `experiments.vision.train`
(`experiments.common.runner`); each lives in ``<runs-dir>/<method>_s<seed>`` (default
``runs/vision_<dataset>_<config>``), finished ones are reused, interrupted ones resumed, and a folder
holding other settings is refused. Fashion-MNIST is fetched once here (unless ``--data-dir``) and
handed to the runs. Every method of a seed sees the same batches and initial weights, so
differences are paired by seed. Writes ``table.md``, ``top1.png`` and ``flip_rate.png`` to ``--out``
(default ``<runs-dir>/report``).

>>> epoch_steps(1438, 64)
23
"""

import argparse
import math
import pathlib
import sys
import time

from experiments.common import cli, loop, report, runner
from experiments.vision.configs import CONFIGS, get_config
from experiments.vision.data import fetch_fashion
from experiments.vision.train import make_run

MAIN = ("dense", "srste", "sste")
PAIRS = (("sste", "srste"), ("sste", "ste"), ("srste", "ste"))


def run_dir(runs_dir: pathlib.Path, method: str, seed: int) -> pathlib.Path:
    return runs_dir / f"{method}_s{seed}"


def plan(config: str, methods, seeds, overrides, runs_dir: pathlib.Path, data_args=()) -> list[runner.Planned]:
    """The runs of ``methods`` x ``seeds`` on ``get_config(config, overrides)``; ``data_args`` (e.g.
    ``("--data-dir", path)``) go to every run's command line without entering its identity."""
    cfg = get_config(config, overrides)
    args = ("--config", config, *(("--set", *overrides) if overrides else ()), *data_args)
    return [runner.Planned(method, seed, make_run(cfg, method, seed), run_dir(runs_dir, method, seed), args)
            for method in methods for seed in seeds]


def summarize(runs: report.Runs) -> dict[str, dict[str, list[float]]]:
    """Per name, one value per seed: final test top-1 (%), train loss, the late flip rate over dense's
    and, when ``runs`` has ``"dense"``, the top-1 gap to dense in points (``gap_dense``), paired by seed."""
    out = report.summarize_finals(runs, ("test_top1", "train_loss"))
    for row in out.values():
        row["test_top1"] = [100 * a for a in row["test_top1"]]
    if "dense" in out:
        for name, row in out.items():
            dense = dict(zip(sorted(runs["dense"]), out["dense"]["test_top1"]))
            row["gap_dense"] = [a - dense[s] for s, a in zip(sorted(runs[name]), row["test_top1"])]
    return out


def table(summary: dict[str, dict[str, list[float]]]) -> str:
    """The Markdown table of a `summarize` result, one row per key (method name or label), then the
    top-1 differences of `PAIRS` present (from 2 seeds on)."""
    lines = ["| method | test top-1 (%) | per seed | − dense, points (95% CI) | final train loss | "
             "flip rate, last ¼ (× dense) |", "|---|---|---|---|---|---|"]
    for name, row in summary.items():
        seeds = ", ".join(f"{a:.1f}" for a in row["test_top1"])
        gap = ""
        if name != "dense" and "gap_dense" in row:
            d = row["gap_dense"]
            gap = report.format_interval(d, 1) if len(d) >= 2 else f"{d[0]:+.1f}"
        flips = report.format_spread(row["flip_ratio"], 3) if "flip_ratio" in row else ""
        lines.append(f"| {name} | {report.format_spread(row['test_top1'], 1)} | {seeds} | {gap} | "
                     f"{report.format_spread(row['train_loss'], 4)} | {flips} |")
    if all(len(row["test_top1"]) >= 2 for row in summary.values()):
        differences = report.difference_table(summary, PAIRS, "test_top1", 1, "top-1 points")
        if differences:
            lines += ["", differences.rstrip("\n")]
    return "\n".join(lines) + (
        "\n\nTop-1 with the 2:4 forward weights: mean ± half the range over seeds. Differences and flip-rate ratios "
        "are paired by seed (same batches and initial weights); with 2 or more seeds the difference has a two-sided "
        "95% Student-t interval, * when it excludes 0.\n")


def epoch_steps(n_train: int, batch_size: int) -> int:
    """Steps per pass over ``n_train`` examples: the period of the β-recomputation ablation."""
    return math.ceil(n_train / batch_size)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_config_args(p, CONFIGS, "small")
    cli.add_methods_args(p, MAIN, (0,))
    cli.add_jobs_arg(p)
    p.add_argument("--runs-dir", default=None, help="default runs/vision_<dataset>_<config>")
    p.add_argument("--out", default=None, help="default <runs-dir>/report")
    p.add_argument("--data-dir", help="Fashion-MNIST's idx files (default: fetched into the cache)")
    p.add_argument("--cache-dir", help="data cache (default $SSTE_CACHE or ~/.cache/sste_jax)")
    args = p.parse_args(argv)
    if args.recipe:
        p.error("--recipe is for experiments.vision.train (one method); compare runs each method's own recipe")
    try:
        cfg = get_config(args.config, args.set)
    except ValueError as e:
        p.error(str(e))
    dataset = cfg.data.dataset
    if args.data_dir and dataset != "fashion":
        p.error("--data-dir is for dataset=fashion (--set dataset=fashion)")
    runs_dir = pathlib.Path(args.runs_dir or f"runs/vision_{dataset}_{args.config}")
    out = pathlib.Path(args.out or runs_dir / "report")
    began = time.perf_counter()
    data_args = ()
    if dataset == "fashion":
        try:
            data_args = ("--data-dir", str(args.data_dir or fetch_fashion(args.cache_dir)))
        except RuntimeError as e:
            sys.exit(f"error: {e}")
    planned = plan(args.config, args.methods, args.seeds, args.set, runs_dir, data_args)
    try:
        runner.execute("experiments.vision.train", planned, args.jobs)
    except (loop.RunMismatchError, runner.RunsFailed) as e:
        sys.exit(f"error: {e}")
    runs = runner.load(planned)
    m = cfg.model
    command = "python -m experiments.vision.compare " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        f"### ViT on {dataset}, `{args.config}`: {m.n_layer}-block, d {m.d_model}, {cfg.optim.steps} steps, "
        f"seeds {args.seeds}\n\nCommand: `{command.strip()}`. Machine: {report.machine()}.\n\n" + table(summarize(runs))
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    caption = f"ViT on {dataset}, `{args.config}`, seeds {args.seeds} (band: seed range)"
    report.plot_curves(runs, "test_top1", out / "top1.png", "test top-1 accuracy (2:4 weights)", title=caption)
    report.plot_curves(runs, "flip_rate", out / "flip_rate.png", "mask flip rate per step", log=True, title=caption)
    print(text)
    print(f"wrote {out}/table.md, top1.png, flip_rate.png in {time.perf_counter() - began:.0f} s")
    return text


if __name__ == "__main__":
    main()
