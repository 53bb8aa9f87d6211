"""STEP's claim at CPU scale: how each method degrades as the N:M pattern gets more aggressive.

    python -m experiments.lm.nm --config capacity --patterns 2:4 1:4 2:8

Dense, SR-STE, STEP and S-STE train at each pattern (the feed-forward linears keep N of every M
weights) with the same seeds, each method at its learning rate tuned at 2:4
(`experiments.lm.configs.TUNED_LR`). 2:4 shares its runs with `experiments.lm.compare`
(``runs/lm_<config>``), other patterns live in ``runs/lm_<config>_n<N>m<M>``; dense runs once.
Writes ``nm.md`` (per pattern: each method's gap to dense; per method: its degradation from 2:4;
and the paired differences of degradation, STEP − SR-STE and S-STE − STEP, which answer "does STEP
degrade less?") and ``nm.png`` to ``--out`` (default ``runs/lm_<config>_nm``).
"""

import argparse
import dataclasses
import pathlib
import sys
import time

import numpy as np

from experiments.common import cli, flags, loop, report, runner
from experiments.common.config import sets_lr
from experiments.lm import compare
from experiments.lm.configs import CONFIGS, get_config
from experiments.lm.train import make_run

METHODS = ("dense", "srste", "step", "sste")
PAIRS = (("step", "srste"), ("sste", "step"), ("sste", "srste"))


def parse_pattern(text: str) -> tuple[int, int]:
    n, _, m = text.partition(":")
    if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise ValueError(f"pattern {text!r}: expected N:M with 0 < N < M, e.g. 2:4")
    return int(n), int(m)


def plan(config: str, methods, seeds, overrides, pattern: tuple[int, int]) -> list[runner.Planned]:
    """The runs of the sparse ``methods`` at ``pattern`` (2:4 in the main job's folder)."""
    n, m = pattern
    if pattern == (2, 4):
        return compare.plan(config, methods, seeds, overrides, pathlib.Path(f"runs/lm_{config}"))
    planned = compare.plan(config, methods, seeds, overrides, pathlib.Path(f"runs/lm_{config}_n{n}m{m}"))
    def changed(p):
        return tuple(sorted({**dict(p.run.recipe_changes), "n": n, "m": m}.items()))

    return [dataclasses.replace(p, run=make_run(p.run.config, p.name, p.seed, recipe_changes=changed(p)),
                                args=(*p.args, "--recipe", f"n={n}", f"m={m}")) for p in planned]


def rates_note(lrs: dict[str, float], fixed: bool) -> str:
    """The report's line on the rates: each method's, tuned at 2:4 or fixed by ``--set lr=``."""
    return f"Learning rates ({'set by --set' if fixed else 'tuned at 2:4'}): " + ", ".join(
        f"{k} {v:g}" for k, v in lrs.items()) + "."


def _degradation(summaries, method, pattern):
    return [x - y for x, y in zip(summaries[pattern][method]["val_loss"], summaries[(2, 4)][method]["val_loss"])]


def tables(summaries: dict[tuple[int, int], dict], seeds) -> str:
    patterns = sorted(summaries, key=lambda p: p[0] / p[1], reverse=True)
    sparse = [name for name in summaries[patterns[0]] if name != "dense"]
    head = "| method | " + " | ".join(f"{n}:{m} − dense" for n, m in patterns) + " |"
    lines = [head, "|---" * (len(patterns) + 1) + "|"]
    for name in sparse:
        cells = [report.format_interval(summaries[p][name]["gap_dense"]) for p in patterns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    others = [p for p in patterns if p != (2, 4)]
    if (2, 4) in summaries and others:
        lines += ["", "| method | " + " | ".join(f"{n}:{m} − 2:4" for n, m in others) + " |",
                  "|---" * (len(others) + 1) + "|"]
        for name in sparse:
            lines.append(f"| {name} | " + " | ".join(report.format_interval(_degradation(summaries, name, p))
                                                   for p in others) + " |")
        pairs = [(a, b) for a, b in PAIRS if a in sparse and b in sparse]
        lines += ["", "| degradation difference | " + " | ".join(f"{n}:{m}" for n, m in others) + " |",
                  "|---" * (len(others) + 1) + "|"]
        for a, b in pairs:
            cells = [report.format_interval([x - y for x, y in zip(_degradation(summaries, a, p),
                                                                   _degradation(summaries, b, p))]) for p in others]
            lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    steps = {p: summaries[p]["step"].get("second_phase_from") for p in patterns if "step" in summaries[p]}
    lines += ["", f"Seeds {list(seeds)}; mean (95% paired Student-t interval), * = the interval excludes 0. "
              "Degradation = val loss at the pattern − val loss at 2:4, same method and seed; a negative "
              "degradation difference a − b means a loses less than b."]
    if any(steps.values()):
        lines.append("STEP switched at steps " + "; ".join(f"{n}:{m}: {v}" for (n, m), v in steps.items()) + ".")
    return "\n".join(lines) + "\n"


def plot(summaries, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = sorted(summaries, key=lambda p: p[0] / p[1], reverse=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = np.arange(len(patterns))
    for name in summaries[patterns[0]]:
        if name == "dense":
            continue
        stats = np.array([report.paired_interval(summaries[p][name]["gap_dense"]) for p in patterns])
        ax.errorbar(xs, stats[:, 0], yerr=[stats[:, 0] - stats[:, 1], stats[:, 2] - stats[:, 0]], marker="o",
                    capsize=3, label=name, color=report.color(name))
    ax.set_xticks(xs, [f"{n}:{m}" for n, m in patterns])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("N:M pattern of the feed-forward linears")
    ax.set_ylabel("val loss − dense (nats)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    report.save_figure(fig, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_config_args(p, CONFIGS, "capacity")
    cli.add_methods_args(p, METHODS, (0, 1, 2))
    p.add_argument("--patterns", nargs="+", type=flags.parsed_by(parse_pattern), default=[(2, 4), (1, 4), (2, 8)],
                   metavar="N:M", help="default: 2:4 1:4 2:8")
    cli.add_jobs_arg(p)
    p.add_argument("--out", default=None, help="default runs/lm_<config>_nm")
    args = p.parse_args(argv)
    if args.recipe:
        p.error("--patterns sets N and M; each method runs its own recipe")
    try:
        cfg = get_config(args.config, args.set)
        patterns = args.patterns
    except ValueError as e:
        p.error(str(e))
    if "dense" not in args.methods:
        p.error("the gaps are to dense: keep dense in --methods")
    began = time.perf_counter()
    sparse = [m for m in args.methods if m != "dense"]
    dense = compare.plan(args.config, ["dense"], args.seeds, args.set, pathlib.Path(f"runs/lm_{args.config}"))
    planned = {pat: plan(args.config, sparse, args.seeds, args.set, pat) for pat in patterns}
    try:
        runner.execute("experiments.lm.train", dense + [pl for pat in patterns for pl in planned[pat]], args.jobs)
    except (loop.RunMismatchError, runner.RunsFailed) as e:
        sys.exit(f"error: {e}")
    tokens_per_step = cfg.optim.batch_size * cfg.optim.grad_accum * cfg.model.seq_len
    summaries = {}
    for pat in patterns:
        runs = runner.load(dense + planned[pat])
        summaries[pat] = compare.summarize(runs, tokens_per_step)
        if "step" in runs:
            summaries[pat]["step"]["second_phase_from"] = [report.final_record(recs).get("second_phase_from")
                                                           for _, recs in sorted(runs["step"].items())]
    command = "python -m experiments.lm.nm " + " ".join(argv if argv is not None else sys.argv[1:])
    lrs = compare.lrs_of(dense + planned[patterns[0]])
    text = (f"### N:M patterns, `{args.config}`\n\nCommand: `{command.strip()}`. Machine: {report.machine()}. "
            f"{rates_note(lrs, sets_lr(cfg, args.set))}\n\n"
            + tables(summaries, args.seeds))
    out = pathlib.Path(args.out or f"runs/lm_{args.config}_nm")
    out.mkdir(parents=True, exist_ok=True)
    (out / "nm.md").write_text(text)
    plot(summaries, out / "nm.png", f"{args.config}: gap to dense by N:M pattern (95% CI over seeds {args.seeds})")
    print(text)
    print(f"wrote {out}/nm.md, nm.png in {time.perf_counter() - began:.0f} s")
    return summaries


if __name__ == "__main__":
    main()
