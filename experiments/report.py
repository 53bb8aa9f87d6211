"""Metrics files, tables and plots shared by the experiments.

Runs write JSON lines (`append_record`); a set of runs is ``{name: {seed: records}}`` (`group_runs`);
tables show a mean ± half the range over seeds (`format_spread`); plots show per-name curves
averaged over seeds with dense as the dashed reference (`plot_curves`).

>>> runs = group_runs([{"method": "a", "seed": s, "step": t, "loss": t + s} for s in (0, 1) for t in (1, 2)])
>>> seed_mean_curve(runs["a"], "loss"), format_spread([1.0, 2.0], 2)
(([1, 2], [1.5, 2.5]), '1.50 ± 0.50')
"""

import json
import pathlib

import numpy as np

Runs = dict[str, dict[int, list[dict]]]


def append_record(path: pathlib.Path, record: dict) -> None:
    """Appends ``record`` to a JSON-lines file."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def group_runs(records: list[dict]) -> Runs:
    """``{method: {seed: records}}`` from records that carry ``method`` and ``seed``."""
    runs: Runs = {}
    for r in records:
        runs.setdefault(r["method"], {}).setdefault(r["seed"], []).append(r)
    return runs


def format_spread(values: list[float], digits: int, signed: bool = False) -> str:
    """``mean ± half the range`` of per-seed values."""
    mean, spread = float(np.mean(values)), (max(values) - min(values)) / 2
    return f"{mean:+.{digits}f} ± {spread:.{digits}f}" if signed else f"{mean:.{digits}f} ± {spread:.{digits}f}"


def late_mean(records: list[dict], key: str, steps: int) -> float:
    """Mean of ``key`` over the records of the last quarter of ``steps``."""
    return float(np.mean([r[key] for r in records if key in r and r["step"] > 0.75 * steps]))


def final_record(records: list[dict]) -> dict:
    """The record a run writes when it ends (``"final": True``)."""
    return next(r for r in records if r.get("final"))


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


def seed_mean_curve(by_seed: dict[int, list[dict]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, means)``: ``key`` averaged over seeds at the steps every seed logged it."""
    per_seed = [{r["step"]: r[key] for r in records if key in r and "step" in r} for records in by_seed.values()]
    steps = sorted(set.intersection(*(set(c) for c in per_seed)))
    return steps, [float(np.mean([c[s] for c in per_seed])) for s in steps]


def plot_curves(runs: Runs, key: str, path: pathlib.Path, ylabel: str, log: bool = False, title: str = "") -> None:
    """``key`` against step, one line per name (mean over seeds; ``dense`` dashed black), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_seed in runs.items():
        style = {"color": "black", "linestyle": "--"} if name == "dense" else {}
        ax.plot(*seed_mean_curve(by_seed, key), label=name, **style)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
