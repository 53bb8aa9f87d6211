"""Pallas prune+compress and MVUE+compress kernels vs XLA's fusion of the pure functions.

CPU: the interpreted kernel against XLA, correctness first (bit equality), times for the record.
GPU: the compiled kernels against the XLA-fused pure-JAX versions on a 4096×16384 and a 768×3072
bf16 weight, as achieved GB/s (fewest bytes: read once, write once) and as a fraction of the
device's copy bandwidth measured in the same run.

    PYTHONPATH=. python benchmarks/bench_kernels.py [--out benchmarks/results/bench_kernels_<device>.json]
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import sste_jax
from sste_jax.kernels import mvue_compress_24, prune_compress_24


def time_fn(f, input_sets, reps=7):
    """Seconds per call of ``f``: one jit runs ``f`` on each input set in turn (chained by
    optimisation barriers so XLA cannot merge or reorder calls); median and spread over ``reps``."""

    @jax.jit
    def many(sets):
        outs, prev = [], None
        for args in sets:
            if prev is not None:
                args, _ = jax.lax.optimization_barrier((args, prev))
            prev = f(*args)
            outs.append(prev)
        return outs

    jax.block_until_ready(many(input_sets))
    jax.block_until_ready(many(input_sets))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(many(input_sets))
        times.append((time.perf_counter() - t0) / len(input_sets))
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def device_name():
    d = jax.devices()[0]
    return getattr(d, "device_kind", d.platform).replace(" ", "-")


def copy_bandwidth(nbytes=512 << 20):
    """Bytes read + written per second by the fastest of three plain passes over 512 MiB buffers."""
    found = {}
    for name, dtype, f in (("add_bf16", jnp.bfloat16, lambda x: x + jnp.asarray(1, x.dtype)),
                           ("scale_f32", jnp.float32, lambda x: x * 2.0),
                           ("copy_f32", jnp.float32, lambda x: jnp.array(x, copy=True))):
        n = nbytes // jnp.dtype(dtype).itemsize
        sets = [(jax.random.normal(jax.random.key(i), (n,), dtype),) for i in range(4)]
        t = time_fn(f, sets)
        found[name] = {"Bps": 2 * nbytes / t["median_s"], **t}
        print(f"copy {name}: {2 * nbytes / t['median_s'] / 1e9:.0f} GB/s")
    return max(v["Bps"] for v in found.values()), found


def xla_prune_compress(w, beta):
    w_tilde = sste_jax.forward_weight(w, beta, sste_jax.SparsityConfig())
    _, meta = sste_jax.compress_24(w)
    values = sste_jax.compress_24(w_tilde)[0]  # positions may differ on ties; bytes are what we time
    bits = sste_jax.mask_24(w).reshape(w.shape[0] // 4, 4, w.shape[1])
    mask_bits = sum(bits[:, k].astype(jnp.uint8) << k for k in range(4)).astype(jnp.uint8)
    return values, meta, mask_bits


def xla_mvue_compress(key, g):
    return sste_jax.compress_24(sste_jax.mvue_24(key, g))


def prune_bytes(k, n, itemsize):
    return k * n * itemsize + (k // 2) * n * itemsize + 2 * (k // 4) * n


def mvue_bytes(t, n, itemsize):
    return t * n * itemsize + (t // 2) * n * itemsize + (t // 4) * n


def bench_gpu(results):
    bw, t = copy_bandwidth()
    results["copy_bandwidth_Bps"] = bw
    results["copy_time"] = t
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s (read+write)")
    rows = []
    for k, n in ((4096, 16384), (768, 3072)):
        n_sets = max(4, int(2e9 // (k * n * 2)))
        n_sets = min(n_sets, 64)
        ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) for i in range(n_sets)]
        beta = jnp.float32(1.48)
        nbytes = prune_bytes(k, n, 2)
        # correctness on the device first
        out = prune_compress_24(ws[0], beta)
        ref = (beta * sste_jax.soft_threshold_24(ws[0].astype(jnp.float32))).astype(jnp.bfloat16)  # rounded once
        same = bool((sste_jax.decompress_24(out.values, out.meta) == ref).all())
        xla_ref = jax.jit(sste_jax.forward_weight, static_argnums=2)(ws[0], beta, sste_jax.SparsityConfig())
        results.setdefault("xla_forward_weight_vs_round_once_mismatch", {})[f"{k}x{n}"] = float(
            jnp.mean(xla_ref != ref)
        )
        meta_same = bool((out.meta == sste_jax.compress_24(ws[0])[1]).all())
        variants = {"xla": lambda w: xla_prune_compress(w, beta)}
        for bg, bn, warps in ((16, 256, 4), (8, 512, 4), (4, 1024, 4), (8, 1024, 8), (2, 2048, 8), (32, 256, 8)):
            variants[f"pallas_bg{bg}_bn{bn}_w{warps}"] = (
                lambda w, bg=bg, bn=bn, warps=warps: prune_compress_24(w, beta, block=(bg, bn), num_warps=warps)
            )
        variants["pallas_transposed"] = lambda w: prune_compress_24(w, beta, transpose=True)
        for name, f in variants.items():
            try:
                t = time_fn(f, [(w,) for w in ws])
            except Exception as e:  # a block config Triton rejects: record it, keep going
                rows.append({"op": "prune_compress", "shape": [k, n], "variant": name, "error": repr(e)[:300]})
                print(f"prune {k}x{n} {name}: FAILED {repr(e)[:200]}")
                continue
            gbs = nbytes / t["median_s"] / 1e9
            rows.append({"op": "prune_compress", "shape": [k, n], "variant": name, **t, "GBps": gbs,
                         "frac_copy_bw": nbytes / t["median_s"] / bw, "bitexact": same, "meta_exact": meta_same})
            print(f"prune {k}x{n} {name:28s} {t['median_s'] * 1e6:9.1f} us  {gbs:7.0f} GB/s  "
                  f"{nbytes / t['median_s'] / bw:5.1%} of copy  (bit-exact {same}, meta {meta_same})")
        # MVUE on a (tokens, features) gradient of the same size
        key = jax.random.key(0)
        v, m = mvue_compress_24(key, ws[0])
        mv_same = bool((sste_jax.decompress_24(v, m) == jax.jit(sste_jax.mvue_24)(key, ws[0])).all())
        mvue_variants = {"xla": lambda g: xla_mvue_compress(key, g)}
        for bg, bn, warps in ((16, 256, 4), (8, 256, 4), (8, 128, 4), (16, 256, 8), (4, 512, 4)):
            mvue_variants[f"pallas_bg{bg}_bn{bn}_w{warps}"] = (
                lambda g, bg=bg, bn=bn, warps=warps: mvue_compress_24(key, g, block=(bg, bn), num_warps=warps))
        for name, f in mvue_variants.items():
            try:
                t = time_fn(f, [(w,) for w in ws])
            except Exception as e:
                rows.append({"op": "mvue_compress", "shape": [k, n], "variant": name, "error": repr(e)[:300]})
                print(f"mvue {k}x{n} {name}: FAILED {repr(e)[:200]}")
                continue
            nb = mvue_bytes(k, n, 2)
            rows.append(
                {
                    "op": "mvue_compress",
                    "shape": [k, n],
                    "variant": name,
                    **t,
                    "GBps": nb / t["median_s"] / 1e9,
                    "frac_copy_bw": nb / t["median_s"] / bw,
                    "bitexact": mv_same,
                }
            )
            print(f"mvue  {k}x{n} {name:28s} {t['median_s'] * 1e6:9.1f} us  {nb / t['median_s'] / 1e9:7.0f} GB/s  "
                  f"{nb / t['median_s'] / bw:5.1%} of copy  (bit-exact vs mvue_24 {mv_same})")
    results["rows"] = rows


def bench_cpu(results):
    rows = []
    w = jax.random.normal(jax.random.key(0), (256, 512), jnp.float32)
    beta = sste_jax.fit_beta(w)
    out = prune_compress_24(w, beta, interpret=True)
    ref = jax.jit(sste_jax.forward_weight, static_argnums=2)(w, beta, sste_jax.SparsityConfig())
    same = bool((sste_jax.decompress_24(out.values, out.meta) == ref).all())
    for name, f in (("xla", lambda w: xla_prune_compress(w, beta)),
                    ("pallas_interpret", lambda w: prune_compress_24(w, beta, interpret=True))):
        t = time_fn(f, [(w,)], reps=3)
        rows.append({"op": "prune_compress", "shape": list(w.shape), "variant": name, **t, "bitexact": same})
        print(f"prune {w.shape} {name:18s} {t['median_s'] * 1e3:8.2f} ms (bit-exact {same})")
    results["rows"] = rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {"device": device_name(), "platform": jax.default_backend(), "jax": jax.__version__}
    print(results)
    (bench_gpu if jax.default_backend() == "gpu" else bench_cpu)(results)
    out = args.out or f"benchmarks/results/bench_kernels_{results['device']}.json"
    with open(out, "w") as f:
        json.dump(results, f, indent=1, default=float)
    print("saved", out)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
