"""The fair comparison: a learning-rate sweep per method (same grid for all), then more seeds at each
method's best rate, with paired 95% intervals.

    python -m experiments.lm.sweep --config capacity

Stage 1 trains every method at every rate of ``--lrs`` with ``--seeds``; a method's best rate has
the lowest mean final validation loss (2:4 weights) over those seeds, and a best rate at the edge
of the grid is reported (widen the grid). Stage 2 trains each method at its best rate with
``--final-seeds`` (the stage-1 seeds among them are reused) and writes the comparison table
(`experiments.lm.compare.table`). Runs share ``--runs-dir`` with `experiments.lm.compare`, so the
main job reuses them. Writes ``sweep.md``, ``lr_sweep.png``, ``val_loss.png`` and ``flip_rate.png``
to ``--out`` (default ``<runs-dir>/sweep``) and prints the ``TUNED_LR`` entry for the config.
"""

import argparse
import pathlib
import sys
import time

import numpy as np

from experiments.common import cli, loop, report, runner
from experiments.common.config import parse_overrides
from experiments.lm import compare
from experiments.lm.configs import CONFIGS, get_config

METHODS = ("dense", "ste", "srste", "tsrste_df", "step", "sste", "sste_mvue", "sste_mvue_fp8")
LRS = (1.5e-3, 3e-3, 6e-3, 1.2e-2)


def sweep_table(runs_by_lr: dict[float, report.Runs], methods) -> tuple[str, dict[str, float], list[str]]:
    """The grid as Markdown (mean final val loss over seeds, best bold), the best rate per method and
    the methods whose best rate is at an edge of the grid."""
    lrs = sorted(runs_by_lr)
    means = {m: [np.mean([report.final_record(r)["val_loss"] for r in runs_by_lr[lr][m].values()]) for lr in lrs]
             for m in methods}
    best = {m: lrs[int(np.argmin(v))] for m, v in means.items()}
    edges = [m for m in methods if best[m] in (lrs[0], lrs[-1])]
    lines = ["| method | " + " | ".join(f"LR {lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for m in methods:
        cells = [f"**{v:.4f}**" if lr == best[m] else f"{v:.4f}" for lr, v in zip(lrs, means[m])]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", best, edges


def plot_sweep(runs_by_lr: dict[float, report.Runs], methods, path: pathlib.Path, title: str) -> None:
    """Final validation loss against learning rate per method (mean over seeds, band: seed range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted(runs_by_lr)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in methods:
        values = np.array([[report.final_record(r)["val_loss"] for _, r in sorted(runs_by_lr[lr][m].items())]
                           for lr in lrs])
        ax.plot(lrs, values.mean(1), marker="o", label=m, color=report.color(m),
                linestyle="--" if m == "dense" else "-")
        ax.fill_between(lrs, values.min(1), values.max(1), color=report.color(m), alpha=0.12, lw=0)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (2:4 weights)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_args(p, CONFIGS, "capacity")
    cli.add_methods_args(p, METHODS, (0, 1))
    p.add_argument("--lrs", nargs="+", type=float, default=list(LRS), help="default: %(default)s")
    p.add_argument("--final-seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="default: %(default)s")
    p.add_argument("--jobs", type=int, default=None, help="parallel runs (default: one per core)")
    p.add_argument("--runs-dir", default=None, help="default runs/lm_<config>")
    p.add_argument("--out", default=None, help="default <runs-dir>/sweep")
    args = p.parse_args(argv)
    try:
        cfg = get_config(args.config, args.set)
        if ("optim", "lr") in parse_overrides(cfg, args.set) or args.recipe:
            raise ValueError("the sweep sets lr itself and runs each method's own recipe: drop --set lr / --recipe")
        if len(args.lrs) < 3 or min(args.lrs) <= 0:
            raise ValueError(f"--lrs {args.lrs}: give at least 3 positive rates")
    except ValueError as e:
        p.error(str(e))
    runs_dir = pathlib.Path(args.runs_dir or f"runs/lm_{args.config}")
    out = pathlib.Path(args.out or runs_dir / "sweep")
    began = time.perf_counter()
    grid = {lr: compare.plan(args.config, args.methods, args.seeds, args.set, runs_dir, {m: lr for m in args.methods})
            for lr in args.lrs}
    try:
        runner.execute("experiments.lm.train", [pl for planned in grid.values() for pl in planned], args.jobs)
        runs_by_lr = {lr: runner.load(planned) for lr, planned in grid.items()}
        grid_text, best, edges = sweep_table(runs_by_lr, args.methods)
        final = compare.plan(args.config, args.methods, args.final_seeds, args.set, runs_dir, best)
        runner.execute("experiments.lm.train", final, args.jobs)
    except (loop.RunMismatchError, runner.RunsFailed) as e:
        sys.exit(f"error: {e}")
    runs = runner.load(final)
    summary = compare.summarize(runs, cfg.optim.batch_size * cfg.optim.grad_accum * cfg.model.seq_len)
    command = "python -m experiments.lm.sweep " + " ".join(argv if argv is not None else sys.argv[1:])
    m = cfg.model
    edge_note = (f"Best rate at the edge of the grid for {', '.join(edges)}: widen --lrs.\n" if edges
                 else "Every method's best rate lies inside the grid.\n")
    text = (f"### Learning-rate sweep, `{args.config}` ({m.n_layer} layers x d {m.d_model}, {cfg.optim.steps} steps)\n\n"
            f"Command: `{command.strip()}`. Machine: {report.machine()}.\n\n"
            f"Final validation loss (2:4 weights), mean over seeds {args.seeds}; best per method in bold.\n\n"
            f"{grid_text}\n{edge_note}\n### Each method at its best rate, seeds {args.final_seeds}\n\n"
            + compare.table(summary, best, args.final_seeds) + "\n" + compare.verdict(summary) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(text)
    plot_sweep(runs_by_lr, args.methods, out / "lr_sweep.png", f"{args.config}: final val loss vs LR, seeds {args.seeds}")
    compare.write_plots(runs, out, f"{args.config}, each method at its best LR, seeds {args.final_seeds}")
    print(text)
    print(f"TUNED_LR[{args.config!r}] = {best!r}")
    print(f"wrote {out}/sweep.md, lr_sweep.png, val_loss.png, flip_rate.png in {time.perf_counter() - began:.0f} s")
    return best


if __name__ == "__main__":
    main()
