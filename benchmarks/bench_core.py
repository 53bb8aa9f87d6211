"""Core cost on this machine: the soft threshold against an elementwise op, and S-STE's fwd+bwd against dense.

At GPT-2 FFN shapes (kernels 768x3072 and 3072x768, 4096 tokens), every variant is compiled first,
then timed in interleaved rounds (one call of each per round) and summarised by its median, so all
variants see the same machine load. Ratios are to the baseline timed in the same rounds.

    python benchmarks/bench_core.py            # prints a table, writes benchmarks/results/bench_core_cpu.json
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import sste_jax
from sste_jax import SparsityConfig

GOALS = {"sste": 1.15, "sste+mvue": 1.3}  # fwd+bwd time / dense fwd+bwd time: the core's cost budget on CPU


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _median_times(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each zero-argument function, timed in interleaved rounds."""
    for fn in fns.values():  # compile and warm up
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _fwd_bwd(config: SparsityConfig | None):
    """jit of ``(y, dx, dW)`` for ``y = x @ W̃`` under ``config`` (plain ``x @ W`` when None)."""

    def run(x_TxI, w_IxO, beta, key, g_TxO):
        if config is None:
            f = lambda x, w: x @ w  # noqa: E731
        else:
            f = lambda x, w: sste_jax.sparse_dense(x, w, beta, key, config)  # noqa: E731
        y, pullback = jax.vjp(f, x_TxI, w_IxO)
        return (y, *pullback(g_TxO))

    return jax.jit(run)


def bench_threshold(shape, repeats):
    w = jax.random.normal(jax.random.key(0), shape)
    fns = {
        "x*2": jax.jit(lambda w: w * 2),
        "abs": jax.jit(jnp.abs),
        "soft_threshold_24": jax.jit(sste_jax.soft_threshold_24),
        "mask_24": jax.jit(sste_jax.mask_24),
    }
    t = _median_times({k: (lambda f=f: f(w)) for k, f in fns.items()}, repeats)
    return {name: {"median_ms": 1e3 * s, "ratio_to_x*2": s / t["x*2"]} for name, s in t.items()}


def bench_linear(tokens, shape, repeats):
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (tokens, shape[0]))
    w = jax.random.normal(kw, shape) * shape[0] ** -0.5
    g = jax.random.normal(kg, (tokens, shape[1]))
    beta = sste_jax.fit_beta(w)
    key = jax.random.key(2)
    variants = {
        "dense x@W": None,
        "sste": SparsityConfig(),
        "sste+mvue": SparsityConfig(mvue=True),
        "sste+fp8": SparsityConfig(fp8=True),
        "sste+mvue+fp8": SparsityConfig(mvue=True, fp8=True),
        "ste": SparsityConfig(method="ste"),
        "srste": SparsityConfig(method="srste"),
    }
    fns = {name: (lambda f=_fwd_bwd(cfg): f(x, w, beta, key, g)) for name, cfg in variants.items()}
    # To explain the MVUE overhead: mvue_24 alone, and the same draws through jax.random.uniform
    # (which XLA:CPU runs as a rolled threefry loop; mvue_24 computes identical bits fused).
    mvue = jax.jit(sste_jax.mvue_24)
    draws = jax.jit(lambda key: jax.random.uniform(key, (2, tokens // 4, shape[1])))
    fns["part: mvue_24(dy)"] = lambda: mvue(key, g)
    fns["ref: jax.random draws"] = lambda: draws(key)
    t = _median_times(fns, repeats)
    return {name: {"median_ms": 1e3 * s, "ratio_to_dense": s / t["dense x@W"]} for name, s in t.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_core_cpu.json"))
    args = parser.parse_args()

    load_before = os.getloadavg()
    threshold = {f"{m}x{n}": bench_threshold((m, n), 3 * args.repeats) for m, n in [(768, 3072), (3072, 768)]}
    linear = {f"{m}x{n}": bench_linear(args.tokens, (m, n), args.repeats) for m, n in [(768, 3072), (3072, 768)]}
    load_after = os.getloadavg()

    print(f"soft threshold vs elementwise (median of {3 * args.repeats} interleaved calls)")
    for shape, rows in threshold.items():
        for name, r in rows.items():
            print(f"  {shape:>9}  {name:<18} {r['median_ms']:8.3f} ms  {r['ratio_to_x*2']:6.2f}x  x*2")
    print(f"fwd+bwd (y, dx, dW), {args.tokens} tokens (median of {args.repeats} interleaved calls)")
    goals_met = {}
    for shape, rows in linear.items():
        for name, r in rows.items():
            goal = GOALS.get(name)
            verdict = "" if goal is None else f"  goal <= {goal}: {'met' if r['ratio_to_dense'] <= goal else 'MISSED'}"
            if goal is not None:
                goals_met[f"{shape} {name}"] = r["ratio_to_dense"] <= goal
            print(f"  {shape:>9}  {name:<20} {r['median_ms']:9.1f} ms  {r['ratio_to_dense']:6.3f}x dense{verdict}")

    result = {
        "machine": {
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "loadavg_1_5_15_before": load_before,
            "loadavg_1_5_15_after": load_after,
        },
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokens": args.tokens,
        "repeats": args.repeats,
        "soft_threshold_vs_elementwise": threshold,
        "fwd_bwd_vs_dense": linear,
        "goals": GOALS,
        "goals_met": goals_met,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
