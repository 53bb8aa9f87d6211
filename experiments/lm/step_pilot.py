"""STEP's switch threshold, piloted for the statistic it compares: the windowed mean of
``mean|v_t − v_{t−1}|`` over the sparse weights (`sste_jax.optim.step_v_change`).

    python -m experiments.lm.step_pilot --config capacity

Stage 1 trains STEP with threshold 0, so that its switch waits for ``T_max`` (half the run), logging
every ``--log-every`` steps: up to ``T_max`` its statistic is the curve any threshold sees until it
fires, so the curve shows where each candidate fires (the first logged step after ``T_min`` where
it is below the threshold; exact with ``--log-every 1``, the default, where thresholds that fire
at the same steps on every seed train identically and share their runs). The candidates are
``--thresholds``, by default the 5%, 25%, 50% and 75% quantiles of the logged statistic between
``T_min`` and ``T_max`` over the seeds (two significant digits) and the recipe's earlier 3e-8.
Stage 2 trains STEP at each candidate with the same seeds, at STEP's tuned rate; threshold 0 (switch
at ``T_max``) is a candidate too, its runs stage 1's. The best threshold has the lowest mean final
validation loss; the command prints the `experiments.lm.configs.STEP_RECIPE` entry. Runs live in
``runs/lm_<config>_step_pilot`` (named by threshold, rate and seed); writes ``pilot.md`` and
``pilot.png`` (the curve per seed, log scale, each candidate as a line with a mark where it fires)
to ``--out`` (default that folder's ``report``).
"""

import argparse
import dataclasses
import pathlib
import sys
import time

import numpy as np

from experiments.common import cli, flags, loop, report, runner
from experiments.common.recipes import METHODS
from experiments.lm import compare
from experiments.lm.configs import CONFIGS, TUNED_LR, get_config, recipe_defaults
from experiments.lm.train import make_run

QUANTILES = (0.05, 0.25, 0.5, 0.75)
EARLIER = 3e-8  # the threshold piloted for the earlier statistic (every parameter, a full window)


def with_threshold(planned: runner.Planned, config: str, threshold: float, log_every: int | None = None):
    """``planned`` (a STEP run of `compare.plan`) with ``switch_threshold`` and, if given, ``log_every``."""
    changes = tuple(sorted({**dict(recipe_defaults(config, "step")), "switch_threshold": float(threshold)}.items()))
    cfg = planned.run.config
    if log_every:
        cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, log_every=log_every))
    sets = (*planned.args[planned.args.index("--set") + 1:], *((f"log_every={log_every}",) if log_every else ()))
    name = "curve" if log_every else f"thr{threshold:.2g}"
    return dataclasses.replace(planned, run=make_run(cfg, "step", planned.seed, recipe_changes=changes),
                               workdir=compare.run_dir(planned.workdir.parent, name, cfg.optim.lr, planned.seed),
                               args=("--config", config, "--set", *sets, "--recipe", f"switch_threshold={threshold!r}"))


def curve(records: list[dict], until: int) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, statistic)`` of a run's train records up to step ``until``."""
    points = [(r["step"], r["step_v_change"]) for r in records if r.get("kind") == "train" and r["step"] <= until]
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def fires_at(steps: np.ndarray, values: np.ndarray, threshold: float, t_min: int) -> int | None:
    """The first logged step after ``t_min`` whose statistic is below ``threshold``, or None (``T_max``)."""
    below = np.flatnonzero((steps > t_min) & (values < threshold))
    return int(steps[below[0]]) if below.size else None


def default_candidates(curves: list[tuple[np.ndarray, np.ndarray]], t_min: int) -> list[float]:
    """`QUANTILES` of the statistic's logged values after ``t_min`` over every seed (two significant
    digits), and `EARLIER`: thresholds across the range the switch can meet."""
    after = np.concatenate([values[steps > t_min] for steps, values in curves])
    return sorted({float(f"{q:.2g}") for q in np.quantile(after, QUANTILES)} | {EARLIER}, reverse=True)


def representatives(fired: dict[float, tuple]) -> dict[float, float]:
    """Per threshold, the one whose runs stand for it: the largest threshold firing at the same steps
    on every seed (they train identically); 0 (stage 1's runs) for those that never fire."""
    groups: dict[tuple, float] = {}
    for t, steps in fired.items():
        groups[steps] = max(groups.get(steps, t), t)
    return {t: groups[steps] if any(s is not None for s in steps) else 0.0 for t, steps in fired.items()}


def plot(curves, candidates, fired, t_min: int, t_max: int, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for seed, (steps, values) in curves.items():
        ax.plot(steps, values, lw=1.2, label=f"statistic, seed {seed}")
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(candidates)))
    for threshold, color in zip(candidates, colors):
        ax.axhline(threshold, color=color, ls="--", lw=0.9, label=f"threshold {threshold:.2g}")
        for step in fired[threshold]:
            if step is not None:
                ax.plot(step, threshold, marker="v", color=color, ms=7)
    for x, name in ((t_min, "T_min"), (t_max, "T_max")):
        ax.axvline(x, color="gray", lw=0.8)
        ax.text(x, ax.get_ylim()[1], f" {name}", va="top", fontsize=8, color="gray")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("window mean of mean|v_t − v_(t−1)| (sparse weights)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    report.save_figure(fig, path)


def main(argv=None) -> float:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_config_args(p, CONFIGS, "capacity")
    p.add_argument("--seeds", nargs="+", type=flags.integer(0), default=[0, 1], help="default: %(default)s")
    p.add_argument("--thresholds", nargs="+", type=flags.number(above=0), help="default: from the curve")
    p.add_argument("--log-every", type=flags.integer(1), default=1,
                   help="stage 1's logging period (default 1: the curve is the statistic itself)")
    cli.add_jobs_arg(p)
    p.add_argument("--out", default=None, help="default runs/lm_<config>_step_pilot/report")
    args = p.parse_args(argv)
    if args.recipe:
        p.error("--recipe: the pilot sets the switch threshold itself")
    try:
        cfg = get_config(args.config, args.set)
    except ValueError as e:
        p.error(str(e))
    runs_dir = pathlib.Path(f"runs/lm_{args.config}_step_pilot")
    out = pathlib.Path(args.out or runs_dir / "report")
    recipe = METHODS["step"]
    steps = cfg.optim.steps
    t_min, t_max = round(recipe.switch_min * steps), round(recipe.switch_max * steps)
    lr = TUNED_LR.get(args.config, {}).get("step", cfg.optim.lr)
    base = compare.plan(args.config, ["step"], args.seeds, args.set, runs_dir, {"step": lr})
    began = time.perf_counter()
    try:
        first = [with_threshold(q, args.config, 0.0, args.log_every) for q in base]
        runner.execute("experiments.lm.train", first, args.jobs)
        curves = {q.seed: curve(recs, t_max) for q, recs in zip(first, runner.load(first)["step"].values())}
        candidates = sorted(args.thresholds or default_candidates(list(curves.values()), t_min), reverse=True)
        fired = {t: tuple(fires_at(*curves[s], t, t_min) for s in args.seeds) for t in candidates}
        trained = representatives(fired) if args.log_every == 1 else {t: t for t in candidates}
        second = {t: [with_threshold(q, args.config, t) for q in base] for t in set(trained.values()) - {0.0}}
        runner.execute("experiments.lm.train", [q for qs in second.values() for q in qs], args.jobs)
    except (loop.RunMismatchError, runner.RunsFailed) as e:
        sys.exit(f"error: {e}")
    rows = {t: runner.load(qs)["step"] for t, qs in second.items()} | {0.0: runner.load(first)["step"]}
    finals = {t: [report.final_record(by_seed[s]) for s in args.seeds] for t, by_seed in rows.items()}
    mean_loss = {t: float(np.mean([f["val_loss"] for f in fs])) for t, fs in finals.items()}
    best = min(mean_loss, key=mean_loss.get)
    command = "python -m experiments.lm.step_pilot " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"### STEP's switch threshold, `{args.config}`, seeds {args.seeds}\n",
             f"Command: `{command.strip()}`. Machine: {report.machine()}. STEP at LR {lr:g}; T_min {t_min}, "
             f"T_max {t_max} of {steps} steps.\n",
             "| threshold | fires on the curve at (per seed) | runs of | switched at (per seed) | val loss (per seed) "
             "| mean |",
             "|---|---|---|---|---|---|"]
    for t in [*candidates, 0.0]:
        rep = trained.get(t, 0.0)
        on_curve = ", ".join(str(step or "T_max") for step in fired[t]) if t else "T_max (never below)"
        switched = ", ".join(str(f.get("second_phase_from")) for f in finals[rep])
        losses = ", ".join(f"{f['val_loss']:.4f}" for f in finals[rep])
        text = f"{mean_loss[rep]:.4f}"
        lines.append(f"| {t:.2g} | {on_curve} | {rep:.2g} | {switched} | {losses} | "
                     f"{f'**{text}**' if rep == best else text} |")
    lines += ["", f"Best: threshold {best:.2g} (lowest mean final validation loss, 2:4 weights). 'Switched at' is the "
              "first step of the hard 2:4 phase. " + ("Thresholds that fire at the same steps on every seed train "
                                                      "identically: they share the runs of the largest of them "
                                                      "('runs of'; 0: stage 1's)." if args.log_every == 1 else "")]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "pilot.md").write_text(text)
    plot(curves, candidates, fired, t_min, t_max, out / "pilot.png",
         f"STEP on `{args.config}` with threshold 0 (switch at T_max): the statistic and where each candidate fires")
    print(text)
    print(f"STEP_RECIPE[{args.config!r}] = {{'switch_threshold': {best!r}}}")
    print(f"wrote {out}/pilot.md, pilot.png in {time.perf_counter() - began:.0f} s")
    return best


if __name__ == "__main__":
    main()
