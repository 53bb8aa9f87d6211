"""Tables, intervals and plots shared by the experiments.

A set of runs is ``{name: {seed: records}}`` (`group_runs`, `load_runs`). Differences between
methods are paired by seed (every method sees the same batches and initial weights for a seed) and
reported as a mean with a two-sided 95% Student-t interval over seeds (`paired_interval`); a
difference is *resolved* when its interval excludes zero. Plots draw the mean over seeds with a band
from the lowest to the highest seed, one fixed colour per method in every figure (`COLORS`).

>>> runs = group_runs([{"method": "a", "seed": s, "step": t, "kind": "train", "loss": t + s}
...                    for s in (0, 1) for t in (1, 2)])
>>> seed_mean_curve(runs["a"], "loss")
([1, 2], [1.5, 2.5])
>>> mean, lo, hi = paired_interval([0.010, 0.012, 0.014])
>>> round(mean, 3), round(lo, 4), round(hi, 4)
(0.012, 0.007, 0.017)
"""

import math
import pathlib

import numpy as np

from experiments.common.records import read_records

Runs = dict[str, dict[int, list[dict]]]

# two-sided 95% quantiles of Student's t, by degrees of freedom (1..30); beyond, the normal's 1.96
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)

COLORS = {  # one colour per method across every figure
    "dense": "black", "dense_beta": "dimgray", "ste": "tab:red", "srste": "tab:orange", "tsrste": "tab:brown",
    "tsrste_df": "peru", "tsrste_df_mvue": "sienna", "step": "tab:purple", "sste": "tab:blue", "sste_mvue": "tab:cyan",
    "sste_fp8": "tab:olive", "sste_mvue_fp8": "tab:green", "sste_beta_none": "tab:pink",
    "sste_beta_l1": "tab:gray", "sste_beta_refit": "navy",
}


def group_runs(records: list[dict]) -> Runs:
    """``{method: {seed: records}}`` from records that carry ``method`` and ``seed``."""
    runs: Runs = {}
    for r in records:
        runs.setdefault(r["method"], {}).setdefault(r["seed"], []).append(r)
    return runs


def load_runs(workdirs: dict[str, dict[int, pathlib.Path]]) -> Runs:
    """``{name: {seed: records}}`` from ``{name: {seed: workdir}}``."""
    return {
        n: {s: read_records(pathlib.Path(w) / "metrics.jsonl") for s, w in by.items()} for n, by in workdirs.items()
    }


def final_record(records: list[dict]) -> dict:
    """The record a run writes when it ends (``kind == "final"``)."""
    for r in records:
        if r.get("kind") == "final":
            return r
    raise ValueError("the run has no final record: it has not finished")


def t975(n: int) -> float:
    """The two-sided 95% Student-t quantile for ``n`` values (``n - 1`` degrees of freedom)."""
    if n < 2:
        raise ValueError(f"an interval needs at least 2 values, got {n}")
    return _T975[n - 2] if n - 1 <= len(_T975) else 1.96


def paired_interval(differences) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of per-seed ``differences`` and its 95% t-interval."""
    d = np.asarray(differences, np.float64)
    half = t975(len(d)) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def resolved(differences) -> bool:
    """Whether the 95% interval of the per-seed ``differences`` excludes zero."""
    _, lo, hi = paired_interval(differences)
    return lo > 0 or hi < 0


def format_interval(differences, digits: int = 4) -> str:
    """``+mean [low, high]`` of `paired_interval`, with ``*`` when resolved (one value: itself, no interval)."""
    if len(differences) < 2:
        return f"{differences[0]:+.{digits}f} (1 seed)"
    mean, lo, hi = paired_interval(differences)
    return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]" + ("*" if lo > 0 or hi < 0 else "")


def paired_differences(summary: dict[str, dict[str, list[float]]], a: str, b: str, key: str) -> list[float]:
    """``a − b`` on ``key``, seed by seed (each name's values in the same seed order)."""
    return [x - y for x, y in zip(summary[a][key], summary[b][key])]


def difference_table(summary: dict[str, dict[str, list[float]]], pairs, key: str, digits: int = 4,
                     unit: str = "") -> str:
    """A Markdown table of ``a − b`` on ``key`` for each pair of ``pairs`` present in ``summary`` (per
    name, one value per seed in the same seed order): mean, 95% interval, per seed; empty without pairs.

    >>> print(difference_table({"a": {"loss": [1.0, 2.0]}, "b": {"loss": [0.5, 1.0]}}, [("a", "b")], "loss", 1), end="")
    | difference | mean (95% CI) | per seed |
    |---|---|---|
    | a − b | +0.8 [-2.4, +3.9] | +0.5, +1.0 |
    """
    present = [(a, b) for a, b in pairs if a in summary and b in summary]
    if not present:
        return ""
    head = f"difference ({unit})" if unit else "difference"
    lines = [f"| {head} | mean (95% CI) | per seed |", "|---|---|---|"]
    for a, b in present:
        d = paired_differences(summary, a, b, key)
        lines.append(f"| {a} − {b} | {format_interval(d, digits)} | {', '.join(f'{v:+.{digits}f}' for v in d)} |")
    return "\n".join(lines) + "\n"


def format_spread(values, digits: int, signed: bool = False) -> str:
    """``mean ± half the range`` of per-seed values."""
    mean, spread = float(np.mean(values)), (max(values) - min(values)) / 2
    return f"{mean:+.{digits}f} ± {spread:.{digits}f}" if signed else f"{mean:.{digits}f} ± {spread:.{digits}f}"


def late_mean(records: list[dict], key: str, steps: int) -> float:
    """Mean of ``key`` over the records of the last quarter of ``steps``."""
    return float(np.mean([r[key] for r in records if key in r and r["step"] > 0.75 * steps]))


def summarize_finals(runs: Runs, keys: tuple[str, ...]) -> dict[str, dict[str, list[float]]]:
    """Per name, one value per seed of each of ``keys`` its final records have and, when ``runs`` has
    ``"dense"``, ``flip_ratio``: the mean flip rate over the last quarter over dense's (paired by seed)."""
    def late_flips(records):
        return late_mean(records, "flip_rate", final_record(records)["steps"])

    out = {}
    for name, by_seed in runs.items():
        finals = [final_record(by_seed[s]) for s in sorted(by_seed)]
        row = {key: [f[key] for f in finals] for key in keys if key in finals[0]}
        if "dense" in runs:
            row["flip_ratio"] = [late_flips(by_seed[s]) / late_flips(runs["dense"][s]) for s in sorted(by_seed)]
        out[name] = row
    return out


def seed_curves(by_seed: dict[int, list[dict]], key: str) -> tuple[list[int], np.ndarray]:
    """``(steps, values_SxT)``: ``key`` of every seed at the steps every seed logged it."""
    per_seed = [{r["step"]: r[key] for r in records if key in r and "step" in r} for records in by_seed.values()]
    steps = sorted(set.intersection(*(set(c) for c in per_seed)))
    return steps, np.array([[c[s] for s in steps] for c in per_seed], np.float64)


def seed_mean_curve(by_seed: dict[int, list[dict]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, means)``: ``key`` averaged over seeds at the steps every seed logged it."""
    steps, values = seed_curves(by_seed, key)
    return steps, [float(v) for v in values.mean(0)]


def machine(single_thread: bool = True) -> str:
    """The CPU model (with its family and model numbers: one name covers several generations), usable
    cores, threading and jax version: the line every results table states."""
    import os
    import platform

    import jax

    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu = f"{info['model name']} (family {info['cpu family']}, model {info['model']})"
    except (OSError, KeyError):
        cpu = platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = "single-threaded runs, one per core" if single_thread else "XLA's default threading"
    return f"{cpu}, {cores} cores, jax {jax.__version__}, {threads}"


def color(name: str) -> str:
    """The method's fixed colour (a name's method is its part before any ``@``)."""
    return COLORS.get(name.split("@")[0], "tab:gray")


def save_figure(fig, path: pathlib.Path) -> None:
    """Lays out ``fig``, writes it as a PNG to ``path`` (making its folder) and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_curves(runs: Runs, key: str, path: pathlib.Path, ylabel: str, log: bool = False, title: str = "",
                skip_first: bool = False) -> None:
    """``key`` against step, one line per name (mean over seeds, band from the lowest to the highest
    seed; ``dense`` dashed), as a PNG. ``skip_first`` leaves out each curve's first point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, by_seed in runs.items():
        steps, values = seed_curves(by_seed, key)
        if skip_first:
            steps, values = steps[1:], values[:, 1:]
        style = {"linestyle": "--"} if name.startswith("dense") else {}
        marker = {"marker": "o", "markersize": 3} if len(steps) < 12 else {}
        ax.plot(steps, values.mean(0), label=name, color=color(name), lw=1.4, **style, **marker)
        if len(values) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=color(name), alpha=0.15, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
