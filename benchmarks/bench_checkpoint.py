"""Checkpoint cost on this machine: `sste_jax.checkpoint` against plain orbax on the same state.

A 128 MiB float32 state (8 arrays of 4M values) is saved and restored, in interleaved rounds, by
(a) a plain orbax ``CheckpointManager`` (synchronous save, ``StandardSave``/``StandardRestore``) and
(b) `save_checkpoint` / `restore_checkpoint` (atomic, checksummed and verified: one `fingerprint`
pass each way, and a read of every stored chunk before a restore). The checksum pass is also timed alone.
Medians; ratios are to plain orbax timed in the same rounds.

    python benchmarks/bench_checkpoint.py    # prints a table, writes benchmarks/results/bench_checkpoint_cpu.json
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from sste_jax import checkpoint


def _state(mib: int) -> dict:
    n = mib * 2**20 // 4 // 8
    keys = jax.random.split(jax.random.key(0), 8)
    return {f"w{i}": jax.random.normal(k, (n,)) for i, k in enumerate(keys)}


def _plain(root: Path, state: dict):
    def save(step):
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
        with ocp.CheckpointManager(root / "plain", options=options) as manager:
            manager.save(step, args=ocp.args.StandardSave(state))
            manager.wait_until_finished()

    def restore(step):
        with ocp.CheckpointManager(root / "plain") as manager:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
            return manager.restore(step, args=ocp.args.StandardRestore(abstract))

    return save, restore


def _ours(root: Path, state: dict):
    return (lambda step: checkpoint.save_checkpoint(root / "ours", step, state),
            lambda step: checkpoint.restore_checkpoint(root / "ours", state, step))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_checkpoint_cpu.json"))
    args = p.parse_args()
    state = jax.block_until_ready(_state(args.mib))
    root = Path(tempfile.mkdtemp())
    times: dict[str, list[float]] = {k: [] for k in ("plain_save", "ours_save", "plain_restore", "ours_restore",
                                                      "fingerprint")}
    try:
        kinds = {"plain": _plain(root, state), "ours": _ours(root, state)}
        checkpoint.fingerprint(state)  # compile once
        for step in range(args.rounds + 1):  # round 0 warms up
            for name, (save, restore) in kinds.items():
                began = time.perf_counter()
                save(step)
                saved = time.perf_counter()
                jax.block_until_ready(restore(step))
                done = time.perf_counter()
                if step:
                    times[f"{name}_save"].append(saved - began)
                    times[f"{name}_restore"].append(done - saved)
            began = time.perf_counter()
            checkpoint.fingerprint(state)
            if step:
                times["fingerprint"].append(time.perf_counter() - began)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "jax": jax.__version__, "orbax": ocp.__version__ if hasattr(ocp, "__version__") else "?"},
        "mib": args.mib, "rounds": args.rounds, "median_s": median, "all_s": times,
        "ratio_save": median["ours_save"] / median["plain_save"],
        "ratio_restore": median["ours_restore"] / median["plain_restore"],
    }
    for k, v in median.items():
        print(f"{k:14s} {v * 1e3:9.1f} ms")
    print(f"ours / plain orbax: save {result['ratio_save']:.2f}x, restore {result['ratio_restore']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
