"""The scaling view: the gap to dense and S-STE − SR-STE as the training length grows, with seed bands.

    python -m experiments.lm.scaling --config capacity --steps 1500 3000 6000

For each length the methods train at their tuned rates (`experiments.lm.configs.TUNED_LR`, tuned at
the config's own length) with the same seeds; the config's own length shares its runs with
`experiments.lm.compare`, other lengths live in ``runs/lm_<config>_steps<N>``. Writes
``scaling.md`` and ``scaling.png`` (left: each method's gap to dense; right: the paired differences
S-STE − SR-STE and S-STE − STE; lines are means over seeds, bands their 95% intervals) to ``--out``
(default ``runs/lm_<config>_scaling``).
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


def plot(summaries: dict[int, dict], tokens_per_step: int, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    lengths = sorted(summaries)
    tokens = [n * tokens_per_step / 1e6 for n in lengths]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))

    def line(ax, values_by_length, label, color):
        stats = np.array([report.paired_interval(v) for v in values_by_length])
        ax.plot(tokens, stats[:, 0], marker="o", label=label, color=color)
        ax.fill_between(tokens, stats[:, 1], stats[:, 2], color=color, alpha=0.15, lw=0)

    for name in summaries[lengths[0]]:
        if name != "dense":
            line(left, [summaries[n][name]["gap_dense"] for n in lengths], name, report.color(name))
    for a, b in (("sste", "srste"), ("sste", "ste")):
        if a in summaries[lengths[0]] and b in summaries[lengths[0]]:
            diffs = [[x - y for x, y in zip(summaries[n][a]["val_loss"], summaries[n][b]["val_loss"])] for n in lengths]
            line(right, diffs, f"{a} − {b}", report.color(b))
    for ax, ylabel in ((left, "val loss − dense (nats)"), (right, "paired difference (nats)")):
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(tokens, [f"{t:.1f}M" for t in tokens])
        ax.set_xlabel("training tokens")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    report.save_figure(fig, path)


def main(argv=None) -> dict[int, dict]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_config_args(p, CONFIGS, "capacity")
    cli.add_methods_args(p, METHODS, (0, 1, 2))
    p.add_argument("--steps", nargs="+", type=flags.integer(1), default=[1500, 3000, 6000], help="default: %(default)s")
    cli.add_jobs_arg(p)
    p.add_argument("--out", default=None, help="default runs/lm_<config>_scaling")
    args = p.parse_args(argv)
    if args.recipe or any(s.split("=")[0].split(".")[-1] == "steps" for s in args.set):
        p.error("--steps sets the lengths; drop steps from --set (and --recipe)")
    try:
        cfg = get_config(args.config, args.set)
    except ValueError as e:
        p.error(str(e))
    began = time.perf_counter()
    planned = {}
    for n in args.steps:
        runs_dir = pathlib.Path(f"runs/lm_{args.config}" + ("" if n == cfg.optim.steps else f"_steps{n}"))
        overrides = args.set + ([] if n == cfg.optim.steps else [f"steps={n}"])
        planned[n] = compare.plan(args.config, args.methods, args.seeds, overrides, runs_dir)
    try:
        runner.execute("experiments.lm.train", [pl for n in args.steps for pl in planned[n]], args.jobs)
    except (loop.RunMismatchError, runner.RunsFailed) as e:
        sys.exit(f"error: {e}")
    tokens_per_step = cfg.optim.batch_size * cfg.optim.grad_accum * cfg.model.seq_len
    summaries = {n: compare.summarize(runner.load(planned[n]), tokens_per_step) for n in args.steps}
    command = "python -m experiments.lm.scaling " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = [
        f"#### {n} steps ({n * tokens_per_step / 1e6:.1f}M tokens)\n\n"
        + compare.table(summaries[n], compare.lrs_of(planned[n]), args.seeds)
        + "\n"
        + compare.verdict(summaries[n])
        for n in args.steps
    ]
    text = (
        f"### Scaling with training length, `{args.config}`\n\nCommand: `{command.strip()}`. "
        f"Machine: {report.machine()}. Learning rates tuned at {cfg.optim.steps} steps.\n\n"
        + "\n\n".join(sections)
        + "\n"
    )
    out = pathlib.Path(args.out or f"runs/lm_{args.config}_scaling")
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.md").write_text(text)
    plot(
        summaries,
        tokens_per_step,
        out / "scaling.png",
        f"{args.config}: gap to dense and paired differences vs training length "
        f"(bands: 95% CI over seeds {args.seeds})",
    )
    print(text)
    print(f"wrote {out}/scaling.md, scaling.png in {time.perf_counter() - began:.0f} s")
    return summaries


if __name__ == "__main__":
    main()
