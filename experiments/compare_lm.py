"""Compares every method against dense (and a β-matched dense control) on one config, 2 seeds.

    python -m experiments.compare_lm --config small

Runs go one per core as single-threaded subprocesses pinned with ``taskset`` (faster in total than
multi-threaded runs, SPEC §8), all with the same seeds and therefore the same data order. Finished
runs under ``runs/lm_<config>/`` are reused and interrupted ones resumed. Writes
``results/lm_<config>/table.md``, ``val_loss.png`` and ``flip_rate.png``.
"""

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

from experiments.configs import get_config
from experiments.report import format_spread, late_mean, plot_curves, read_records
from experiments.methods import METHODS

# name -> train_lm arguments: every method, and "dense_beta": dense with the sparse layers' LR x mean β (SPEC §8)
RUNS = {"dense_beta": ["--method", "dense", "--ffn-lr-scale", "beta"], **{m: ["--method", m] for m in METHODS}}
MAIN = ["dense", "dense_beta", "ste", "srste", "sste", "sste_mvue", "sste_mvue_fp8"]  # the README comparison
SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _finished(workdir: pathlib.Path, steps: int) -> bool:
    path = workdir / "metrics.jsonl"
    return path.exists() and any(r["step"] == steps and "val_loss" in r for r in read_records(path))


def run_all(config: str, names: list[str], seeds: list[int], steps: int, runs_dir: pathlib.Path,
            jobs: int, overrides: list[str]) -> None:
    """Runs the missing (name, seed) trainings, ``jobs`` at a time, each pinned to one core."""
    queue = [(n, s) for n in names for s in seeds if not _finished(runs_dir / f"{n}_s{s}", steps)]
    cores = sorted(os.sched_getaffinity(0))[:jobs] if hasattr(os, "sched_getaffinity") else list(range(jobs))
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD}".strip(),
           "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    active: dict[int, tuple] = {}
    failed = []
    while queue or active:
        for core in [c for c in cores if c not in active]:
            if not queue:
                break
            name, seed = queue.pop(0)
            workdir = runs_dir / f"{name}_s{seed}"
            workdir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "experiments.train_lm", "--config", config, *RUNS[name],
                   "--seed", str(seed), "--steps", str(steps), "--workdir", str(workdir), "--quiet"]
            if overrides:
                cmd += ["--set", *overrides]
            if (workdir / "ckpt").exists():
                cmd.append("--resume")
            if shutil.which("taskset"):
                cmd = ["taskset", "-c", str(core), *cmd]
            log = (workdir / "log.txt").open("a")
            print(f"[core {core}] {name} seed {seed}", flush=True)
            active[core] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), name, seed, log)
        time.sleep(0.5)
        for core, (proc, name, seed, log) in list(active.items()):
            if proc.poll() is not None:
                log.close()
                del active[core]
                if proc.returncode:
                    failed.append(f"{name} seed {seed} (exit {proc.returncode}, see {runs_dir / f'{name}_s{seed}' / 'log.txt'})")
    if failed:
        raise RuntimeError("runs failed: " + "; ".join(failed))


def summarize(runs: dict[str, dict[int, list[dict]]], steps: int) -> dict[str, dict[str, list[float]]]:
    """Per method and metric, one value per seed: final 2:4 val loss, gaps (paired by seed) to dense
    and to the β-matched control, last-quarter flip rate over dense's own, median tokens/s."""
    def final_val(records):
        return [r for r in records if "val_loss" in r][-1]["val_loss"]

    def late_flips(records):
        return late_mean(records, "flip_rate", steps)

    def speed(records):
        rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first includes compilation
        return float(np.median(rates)) if rates else float("nan")

    out = {}
    for name, by_seed in runs.items():
        seeds = sorted(by_seed)
        row = {"val_loss": [final_val(by_seed[s]) for s in seeds], "tokens_per_s": [speed(by_seed[s]) for s in seeds]}
        for ref, key in (("dense", "gap_dense"), ("dense_beta", "gap_dense_beta")):
            if ref in runs:
                row[key] = [final_val(by_seed[s]) - final_val(runs[ref][s]) for s in seeds]
        if "dense" in runs:
            row["flip_ratio"] = [late_flips(by_seed[s]) / late_flips(runs["dense"][s]) for s in seeds]
        out[name] = row
    return out


def write_table(summary: dict, path: pathlib.Path, title: str) -> str:
    lines = [
        f"### {title}", "",
        "| method | val loss (2:4 weights) | vs dense | vs dense, LR×β | flip rate, last ¼ (× dense) | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        cells = [
            format_spread(row["val_loss"], 4),
            format_spread(row["gap_dense"], 4, True) if "gap_dense" in row else "",
            format_spread(row["gap_dense_beta"], 4, True) if "gap_dense_beta" in row else "",
            format_spread(row["flip_ratio"], 3) if "flip_ratio" in row else "",
            format_spread(row["tokens_per_s"], 0),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± half the range over seeds; gaps and ratios are paired by seed (same data order)."]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def write_plots(runs: dict[str, dict[int, list[dict]]], folder: pathlib.Path) -> None:
    plot_curves(runs, "val_loss", folder / "val_loss.png", "validation loss (2:4 weights)")
    plot_curves(runs, "flip_rate", folder / "flip_rate.png", "mask flip rate per step", log=True)


def load_runs(runs_dir: pathlib.Path, names: list[str], seeds: list[int]) -> dict[str, dict[int, list[dict]]]:
    return {n: {s: read_records(runs_dir / f"{n}_s{s}" / "metrics.jsonl") for s in seeds} for n in names}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="small")
    p.add_argument("--methods", nargs="*", default=MAIN, choices=list(RUNS))
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, help="overrides the config's steps")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    p.add_argument("--runs-dir", default=None, help="default runs/lm_<config>")
    p.add_argument("--out", default=None, help="default results/lm_<config>")
    args = p.parse_args(argv)
    cfg = get_config(args.config, args.set)
    steps = args.steps or cfg.steps
    runs_dir = pathlib.Path(args.runs_dir or f"runs/lm_{args.config}")
    out = pathlib.Path(args.out or f"results/lm_{args.config}")
    began = time.perf_counter()
    run_all(args.config, args.methods, args.seeds, steps, runs_dir, args.jobs, args.set)
    runs = load_runs(runs_dir, args.methods, args.seeds)
    title = f"`{args.config}`: {cfg.n_layer} layers x d {cfg.d_model}, {steps} steps, seeds {args.seeds}"
    print(write_table(summarize(runs, steps), out / "table.md", title))
    write_plots(runs, out)
    print(f"wrote {out}/table.md, val_loss.png, flip_rate.png in {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
