"""The scaling views: each method's gap to dense and the paired differences S-STE − SR-STE and
S-STE − STE as the training length grows (``--steps``) or as the model widens (``--configs``), with
95% intervals over seeds.

    python -m experiments.lm.scaling --config capacity --steps 1500 3000 6000
    python -m experiments.lm.scaling --configs capacity capacity_d128 capacity_d256 \\
        --methods dense ste srste sste sste_mvue_fp8 --seeds 0 1 2 3 4

Length: the methods train at their rates tuned at the config's own length
(`experiments.lm.configs.TUNED_LR`) with the same seeds; the config's own length shares its runs with
`experiments.lm.compare`, other lengths live in ``runs/lm_<config>_steps<N>``. Width: each config
(the same tokens, another ``d_model``) trains in ``runs/lm_<config>`` at its own tuned rates, shared
with `experiments.lm.compare` and `experiments.lm.sweep`. Writes ``scaling.md`` (a summary table,
then each point's comparison table) and ``scaling.png`` (left: each method's gap to dense; right: the
paired differences; lines are means over seeds, bands their 95% intervals) to ``--out`` (default
``runs/lm_<config>_scaling``, or ``runs/lm_<first config>_width`` for ``--configs``).
"""

import argparse
import pathlib
import sys
import time

import numpy as np

from experiments.common import cli, flags, loop, report, runner
from experiments.lm import compare
from experiments.lm.configs import CONFIGS, get_config

METHODS = ("dense", "srste", "sste")
DIFFERENCES = (("sste", "srste"), ("sste", "ste"), ("sste_mvue_fp8", "srste"))


def summary_table(summaries: dict[str, dict], labels: dict[str, str]) -> str:
    """One row per point: each method's gap to dense and the `DIFFERENCES` present, with intervals."""
    first = next(iter(summaries.values()))
    gaps = [name for name in first if name != "dense"]
    pairs = [(a, b) for a, b in DIFFERENCES if a in first and b in first]
    head = [f"{name} − dense" for name in gaps] + [f"{a} − {b}" for a, b in pairs]
    lines = ["| point | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for point, summary in summaries.items():
        cells = [report.format_interval(summary[name]["gap_dense"]) for name in gaps]
        cells += [report.format_interval(report.paired_differences(summary, a, b, "val_loss")) for a, b in pairs]
        lines.append(f"| {labels[point]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summaries: dict[str, dict], xs: list[float], ticks: list[str], xlabel: str, path: pathlib.Path,
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    points = list(summaries)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))

    def line(ax, values_by_point, label, color):
        stats = np.array([report.paired_interval(v) for v in values_by_point])
        ax.plot(xs, stats[:, 0], marker="o", label=label, color=color)
        ax.fill_between(xs, stats[:, 1], stats[:, 2], color=color, alpha=0.15, lw=0)

    for name in summaries[points[0]]:
        if name != "dense":
            line(left, [summaries[p][name]["gap_dense"] for p in points], name, report.color(name))
    for a, b in DIFFERENCES:
        if a in summaries[points[0]] and b in summaries[points[0]]:
            line(right, [report.paired_differences(summaries[p], a, b, "val_loss") for p in points], f"{a} − {b}",
                 report.color(b if a == "sste" else a))
    for ax, ylabel in ((left, "val loss − dense (nats)"), (right, "paired difference (nats)")):
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(xs, ticks)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    report.save_figure(fig, path)


def main(argv=None) -> dict[str, dict]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_config_args(p, CONFIGS, "capacity")
    cli.add_methods_args(p, METHODS, (0, 1, 2))
    axis = p.add_mutually_exclusive_group()
    axis.add_argument("--steps", nargs="+", type=flags.integer(1), help="the length axis (default 1500 3000 6000)")
    axis.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), metavar="CONFIG",
                      help="the width axis: configs with the same tokens, e.g. capacity capacity_d128 capacity_d256")
    cli.add_jobs_arg(p)
    p.add_argument("--out", default=None, help="default runs/lm_<config>_scaling (width: runs/lm_<config>_width)")
    args = p.parse_args(argv)
    if args.recipe or any(s.split("=")[0].split(".")[-1] == "steps" for s in args.set):
        p.error("--steps sets the lengths; drop steps from --set (and --recipe)")
    try:
        cfg = get_config(args.config, args.set)
        configs = {name: get_config(name, args.set) for name in args.configs or ()}
        if configs and len({(c.optim.steps, c.optim.batch_size * c.optim.grad_accum * c.model.seq_len)
                            for c in configs.values()}) > 1:
            raise ValueError("--configs must train on the same tokens (steps, batch, context)")
    except ValueError as e:
        p.error(str(e))
    began = time.perf_counter()
    tokens_per_step = cfg.optim.batch_size * cfg.optim.grad_accum * cfg.model.seq_len
    if configs:
        planned = {name: compare.plan(name, args.methods, args.seeds, args.set, pathlib.Path(f"runs/lm_{name}"))
                   for name in configs}
        labels = {name: f"d {c.model.d_model} (`{name}`)" for name, c in configs.items()}
        xs = [c.model.d_model for c in configs.values()]
        ticks, xlabel = [str(x) for x in xs], "d_model (same tokens)"
        what, out = "width", pathlib.Path(args.out or f"runs/lm_{args.configs[0]}_width")
    else:
        lengths = args.steps or [1500, 3000, 6000]
        planned = {}
        for n in lengths:
            runs_dir = pathlib.Path(f"runs/lm_{args.config}" + ("" if n == cfg.optim.steps else f"_steps{n}"))
            overrides = args.set + ([] if n == cfg.optim.steps else [f"steps={n}"])
            planned[str(n)] = compare.plan(args.config, args.methods, args.seeds, overrides, runs_dir)
        labels = {str(n): f"{n} steps ({n * tokens_per_step / 1e6:.1f}M tokens)" for n in lengths}
        xs = [n * tokens_per_step / 1e6 for n in lengths]
        ticks, xlabel = [f"{x:.1f}M" for x in xs], "training tokens"
        what, out = "training length", pathlib.Path(args.out or f"runs/lm_{args.config}_scaling")
    try:
        runner.execute("experiments.lm.train", [pl for pls in planned.values() for pl in pls], args.jobs)
    except (loop.RunMismatchError, runner.RunsFailed) as e:
        sys.exit(f"error: {e}")
    summaries = {k: compare.summarize(runner.load(pls), tokens_per_step) for k, pls in planned.items()}
    command = "python -m experiments.lm.scaling " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = [f"#### {labels[k]}\n\n" + compare.table(summaries[k], compare.lrs_of(planned[k]), args.seeds) + "\n"
                + compare.verdict(summaries[k]) for k in planned]
    text = (f"### Scaling with {what}\n\nCommand: `{command.strip()}`. Machine: {report.machine()}. Each method at "
            f"its rate tuned {'at that width' if configs else f'at {cfg.optim.steps} steps'}.\n\n"
            + summary_table(summaries, labels) + "\nMean [95% interval] over seeds " + str(args.seeds)
            + ", paired by seed; * = the interval excludes 0.\n\n" + "\n\n".join(sections) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.md").write_text(text)
    plot(summaries, xs, ticks, xlabel, out / "scaling.png",
         f"gap to dense and paired differences vs {what} (bands: 95% CI over seeds {args.seeds})")
    print(text)
    print(f"wrote {out}/scaling.md, scaling.png in {time.perf_counter() - began:.0f} s")
    return summaries


if __name__ == "__main__":
    main()
