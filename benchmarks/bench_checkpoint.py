"""Checkpoint cost on this machine: `sste_jax.checkpoint` against plain orbax on the same state.

A 128 MiB float32 state (8 arrays of 4M values) is saved and restored, in interleaved rounds, by

- ``plain_call``: a new synchronous orbax ``CheckpointManager`` per call (``StandardSave`` /
  ``StandardRestore``, orbax's defaults), against ``ours_call``: `save_checkpoint` / `restore_checkpoint`;
- ``plain_manager``: one long-lived orbax ``CheckpointManager`` with async saves (orbax's defaults),
  against ``ours_manager``: one long-lived `Checkpointer`;
- ``plain_raw_manager``: as ``plain_manager`` but storing the arrays uncompressed, as ours do: ours
  against it is the cost of the checksums and checks alone (``ratio_same_storage``).

Ours are atomic, checksummed and verified: one `fingerprint` pass each way (also timed alone).
Every kind keeps the 2 newest steps. ``save`` is timed until the step is committed (an async save
is waited for), ``save_blocking`` until the save call returns (training would go on from there).
Each round times every kind once, so ratios are paired: the median over rounds of ours / plain
orbax in the same round, with the rounds' smallest and largest ratio. ``bytes`` is each kind's
newest step on disk.

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

KEEP = 2


def _state(mib: int) -> dict:
    n = mib * 2**20 // 4 // 8
    keys = jax.random.split(jax.random.key(0), 8)
    return {f"w{i}": jax.random.normal(k, (n,)) for i, k in enumerate(keys)}


def _abstract(state: dict) -> dict:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def _plain_call(root: Path, state: dict):
    def save(step):
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True, max_to_keep=KEEP)
        with ocp.CheckpointManager(root, options=options) as manager:
            manager.save(step, args=ocp.args.StandardSave(state))
            manager.wait_until_finished()

    def restore(step):
        with ocp.CheckpointManager(root) as manager:
            return manager.restore(step, args=ocp.args.StandardRestore(_abstract(state)))

    return save, (lambda: None), restore, (lambda: None)


def _ours_call(root: Path, state: dict):
    return (lambda step: checkpoint.save_checkpoint(root, step, state, max_to_keep=KEEP), (lambda: None),
            lambda step: checkpoint.restore_checkpoint(root, state, step), (lambda: None))


def _plain_manager(root: Path, state: dict):
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True, create=True, max_to_keep=KEEP)
    manager = ocp.CheckpointManager(root, options=options)
    return (lambda step: manager.save(step, args=ocp.args.StandardSave(state)), manager.wait_until_finished,
            lambda step: manager.restore(step, args=ocp.args.StandardRestore(_abstract(state))), manager.close)


def _plain_raw_manager(root: Path, state: dict):
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True, create=True, max_to_keep=KEEP)
    manager = ocp.CheckpointManager(root, options=options,
                                    item_handlers=ocp.PyTreeCheckpointHandler(use_compression=False))
    restore_args = ocp.checkpoint_utils.construct_restore_args(_abstract(state))
    return (lambda step: manager.save(step, args=ocp.args.PyTreeSave(state)), manager.wait_until_finished,
            lambda step: manager.restore(step, args=ocp.args.PyTreeRestore(_abstract(state), restore_args)),
            manager.close)


def _ours_manager(root: Path, state: dict):
    ckpt = checkpoint.Checkpointer(root, max_to_keep=KEEP)
    return (lambda step: ckpt.save(step, state), ckpt.wait, lambda step: ckpt.restore(state, step), ckpt.close)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_checkpoint_cpu.json"))
    args = p.parse_args()
    state = jax.block_until_ready(_state(args.mib))
    root = Path(tempfile.mkdtemp())
    makers = {"plain_call": _plain_call, "ours_call": _ours_call, "plain_manager": _plain_manager,
              "plain_raw_manager": _plain_raw_manager, "ours_manager": _ours_manager}
    times: dict[str, list[float]] = {"fingerprint": []}
    for name in makers:
        times.update({f"{name}_{what}": [] for what in ("save", "save_blocking", "restore")})
    kinds = {name: make(root / name, state) for name, make in makers.items()}
    try:
        checkpoint.fingerprint(state)  # compile once
        for step in range(args.rounds + 1):  # round 0 warms up
            for name, (save, wait, restore, _) in kinds.items():
                began = time.perf_counter()
                save(step)
                returned = time.perf_counter()
                wait()
                saved = time.perf_counter()
                jax.block_until_ready(restore(step))
                done = time.perf_counter()
                if step:
                    times[f"{name}_save"].append(saved - began)
                    times[f"{name}_save_blocking"].append(returned - began)
                    times[f"{name}_restore"].append(done - saved)
            began = time.perf_counter()
            checkpoint.fingerprint(state)
            if step:
                times["fingerprint"].append(time.perf_counter() - began)
        stored = {name: sum(f.stat().st_size for f in (root / name / str(args.rounds)).rglob("*") if f.is_file())
                  for name in makers}
    finally:
        for *_, close in kinds.values():
            close()
        shutil.rmtree(root, ignore_errors=True)
    median = {k: statistics.median(v) for k, v in times.items()}

    def paired(ours: str, plain: str) -> dict:
        per_round = [a / b for a, b in zip(times[ours], times[plain])]
        return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}

    whats = ("save", "save_blocking", "restore")
    ratios = {f"{kind}_{what}": paired(f"ours_{kind}_{what}", f"plain_{kind}_{what}")
              for kind in ("call", "manager") for what in whats}
    same_storage = {f"manager_{what}": paired(f"ours_manager_{what}", f"plain_raw_manager_{what}") for what in whats}
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "jax": jax.__version__, "orbax": ocp.__version__ if hasattr(ocp, "__version__") else "?"},
        "mib": args.mib, "rounds": args.rounds, "median_s": median, "all_s": times, "bytes": stored,
        "ratio": ratios, "ratio_same_storage": same_storage,
    }
    for k, v in median.items():
        print(f"{k:32s} {v * 1e3:9.1f} ms")
    for k, v in stored.items():
        print(f"{k:32s} {v / 2**20:9.1f} MiB on disk")
    for label, table in (("plain orbax", ratios), ("plain orbax, uncompressed", same_storage)):
        for k, v in table.items():
            print(f"ours / {label}, {k:20s} {v['median']:.2f}x  (rounds {v['min']:.2f}-{v['max']:.2f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
