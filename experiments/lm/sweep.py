"""The fair comparison: a learning-rate sweep per method (same grid for all), then more seeds at each
method's best rate, with paired 95% intervals.

    python -m experiments.lm.sweep --config capacity

Stage 1 trains every method at every rate of ``--lrs`` with ``--seeds``; a method's best rate has
the lowest mean final validation loss (2:4 weights) over those seeds. Where a method's best rate is
at an edge of its grid, its grid is extended by one more step beyond that edge, as wide as the
grid's step at that edge (up to ``--extend`` times), so every best rate ends inside its method's
grid or the table says it does not. A finer grid around the rates found, e.g. factor √2:

    python -m experiments.lm.sweep --config capacity --lrs 0.006 0.0085 0.012 --seeds 0 1 2 3 4

Stage 2 trains each method at its best rate with ``--final-seeds`` (the stage-1 seeds among them
are reused) and writes the comparison table
(`experiments.lm.compare.table`). Runs share ``--runs-dir`` with `experiments.lm.compare`, so the
main job reuses them. Writes ``sweep.md``, ``lr_sweep.png``, ``val_loss.png`` and ``flip_rate.png``
to ``--out`` (default ``<runs-dir>/sweep``) and prints the ``TUNED_LR`` entry for the config.
"""

import argparse
import pathlib
import sys
import time

import numpy as np

from experiments.common import cli, flags, loop, report, runner
from experiments.common.config import sets_lr
from experiments.lm import compare
from experiments.lm.configs import CONFIGS, get_config

METHODS = ("dense", "ste", "srste", "tsrste_df", "step", "sste", "sste_mvue", "sste_mvue_fp8")
LRS = (3e-3, 6e-3, 1.2e-2, 2.4e-2)


Grid = dict[str, dict[float, report.Runs]]  # method -> rate -> {method: {seed: records}}


def best_rates(grid: Grid) -> tuple[dict[str, float], list[str]]:
    """Per method, the rate with the lowest mean final validation loss over seeds, and the methods
    whose best rate is at an edge of their grid."""
    best, edges = {}, []
    for m, by_lr in grid.items():
        lrs = sorted(by_lr)
        means = [np.mean([report.final_record(r)["val_loss"] for r in by_lr[lr][m].values()]) for lr in lrs]
        best[m] = lrs[int(np.argmin(means))]
        if best[m] in (lrs[0], lrs[-1]):
            edges.append(m)
    return best, edges


def next_rate(lrs: list[float], best: float) -> float:
    """The rate one grid step beyond ``best`` (an edge of ``lrs``), the step as wide as the grid's
    step at that edge, rounded to 2 significant digits: 1.2e-2 after 6e-3, 8.5e-3 gives 1.7e-2."""
    lrs = sorted(lrs)
    step = lrs[-1] / lrs[-2] if best == lrs[-1] else lrs[0] / lrs[1]
    return float(f"{best * step:.2g}")


def sweep_table(grid: Grid) -> str:
    """The grid as Markdown: mean final val loss over seeds (per-seed values in brackets), best bold."""
    lrs = sorted({lr for by_lr in grid.values() for lr in by_lr})
    best, _ = best_rates(grid)
    lines = ["| method | " + " | ".join(f"LR {lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for m, by_lr in grid.items():
        cells = []
        for lr in lrs:
            if lr not in by_lr:
                cells.append("")
                continue
            values = [report.final_record(r)["val_loss"] for _, r in sorted(by_lr[lr][m].items())]
            text = f"{np.mean(values):.4f} ({', '.join(f'{v:.3f}' for v in values)})"
            cells.append(f"**{text}**" if lr == best[m] else text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(grid: Grid, path: pathlib.Path, title: str) -> None:
    """Final validation loss against learning rate per method (mean over seeds, band: seed range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, by_lr in grid.items():
        lrs = sorted(by_lr)
        values = np.array([[report.final_record(r)["val_loss"] for _, r in sorted(by_lr[lr][m].items())]
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
    report.save_figure(fig, path)


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_config_args(p, CONFIGS, "capacity")
    cli.add_methods_args(p, METHODS, (0, 1))
    p.add_argument("--lrs", nargs="+", type=flags.number(above=0), default=list(LRS), help="default: %(default)s")
    p.add_argument("--extend", type=flags.integer(0), default=2, help="grid extensions per method at most (default 2)")
    p.add_argument("--final-seeds", nargs="+", type=flags.integer(0), default=[0, 1, 2, 3, 4],
                   help="default: %(default)s")
    cli.add_jobs_arg(p)
    p.add_argument("--runs-dir", default=None, help="default runs/lm_<config>")
    p.add_argument("--out", default=None, help="default <runs-dir>/sweep")
    args = p.parse_args(argv)
    try:
        cfg = get_config(args.config, args.set)
        if sets_lr(cfg, args.set) or args.recipe:
            raise ValueError("the sweep sets lr itself and runs each method's own recipe: drop --set lr / --recipe")
        if len(args.lrs) < 3:
            raise ValueError(f"--lrs {args.lrs}: give at least 3 rates")
    except ValueError as e:
        p.error(str(e))
    runs_dir = pathlib.Path(args.runs_dir or f"runs/lm_{args.config}")
    out = pathlib.Path(args.out or runs_dir / "sweep")
    began = time.perf_counter()

    def train_grid(cells: list[tuple[str, float]]) -> None:
        planned = {cell: compare.plan(args.config, [cell[0]], args.seeds, args.set, runs_dir, {cell[0]: cell[1]})
                   for cell in cells}
        runner.execute("experiments.lm.train", [pl for pls in planned.values() for pl in pls], args.jobs)
        for (m, lr), pls in planned.items():
            grid.setdefault(m, {})[lr] = runner.load(pls)

    grid: Grid = {}
    try:
        train_grid([(m, lr) for m in args.methods for lr in args.lrs])
        for _ in range(args.extend):
            best, edges = best_rates(grid)
            if not edges:
                break
            train_grid([(m, next_rate(list(grid[m]), best[m])) for m in edges])
        best, edges = best_rates(grid)
        grid = {m: grid[m] for m in args.methods}
        final = compare.plan(args.config, args.methods, args.final_seeds, args.set, runs_dir, best)
        runner.execute("experiments.lm.train", final, args.jobs)
    except (loop.RunMismatchError, runner.RunsFailed) as e:
        sys.exit(f"error: {e}")
    runs = runner.load(final)
    summary = compare.summarize(runs, cfg.optim.batch_size * cfg.optim.grad_accum * cfg.model.seq_len)
    command = "python -m experiments.lm.sweep " + " ".join(argv if argv is not None else sys.argv[1:])
    m = cfg.model
    edge_note = (f"Best rate still at the edge of its grid for {', '.join(edges)}: widen --lrs or --extend.\n"
                 if edges else "Every method's best rate lies inside its grid.\n")
    text = (
        f"### Learning-rate sweep, `{args.config}` ({m.n_layer} layers x d {m.d_model}, {cfg.optim.steps} steps)\n\n"
        f"Command: `{command.strip()}`. Machine: {report.machine()}.\n\n"
        f"Final validation loss (2:4 weights), mean over seeds {args.seeds}; best per method in bold.\n\n"
        f"{sweep_table(grid)}\n{edge_note}\n### Each method at its best rate, seeds {args.final_seeds}\n\n"
        + compare.table(summary, best, args.final_seeds)
        + "\n"
        + compare.verdict(summary)
        + "\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(text)
    plot_sweep(grid, out / "lr_sweep.png", f"{args.config}: final val loss vs LR, seeds {args.seeds}")
    compare.write_plots(runs, out, f"{args.config}, each method at its best LR, seeds {args.final_seeds}")
    print(text)
    print(f"TUNED_LR[{args.config!r}] = {best!r}")
    print(f"wrote {out}/sweep.md, lr_sweep.png, val_loss.png, flip_rate.png in {time.perf_counter() - began:.0f} s")
    return best


if __name__ == "__main__":
    main()
