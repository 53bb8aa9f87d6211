"""CUTLASS sm90 2:4 GEMMs vs ``jnp.dot`` and vs the cuSPARSELt FFI on the same GPU, in the same process.

1. GEMMs: 8192³ and the forward and weight-gradient shapes of the FFN linears of GPT-2 350M and 1.5B and
   Llama-7B (T = 8192 tokens): dense bf16/e4m3 ``dot_general``, CUTLASS bf16/e4m3 (and e5m2 for the
   weight gradient) with operands pre-emitted and with the emitter included, cuSPARSELt bf16/e4m3.
2. Bandwidth of the operand emitter (`sste_jax.kernels.cutlass.emit_sm90`) and of MVUE + emit, as a
   fraction of plain copy bandwidth.
3. The S-STE FFN block forward+backward and the GPT-2 124M training step of ``bench_sparse_matmul.py``,
   dense vs S-STE on XLA vs S-STE on CUTLASS (bf16 and e4m3).

    PYTHONPATH=. python benchmarks/bench_cutlass.py [--parts gemm,emit,ffn,gpt2] [--out ...json]
    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/bench_cutlass.py --dry-run   # tiny, no GPU call

``--dry-run`` runs every piece at tiny sizes on any backend: the dense and emitter timings run, and every
GPU-only variant is traced and lowered for CUDA instead of run (recorded as ``"lowered"``).
"""

import argparse
import json
import sys

import jax
import jax.numpy as jnp

import sste_jax
from sste_jax.kernels import cusparselt, cutlass

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench_sparse_matmul  # noqa: E402
from bench_kernels import copy_bandwidth, device_name, time_fn  # noqa: E402

E4M3, E5M2, BF16 = jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.bfloat16
TOKENS = 8192
# (M, K, N) of D = A @ Bᵀ with A 2:4 along K: forward M = out, K = in, N = tokens; weight gradient
# dW = xᵀ ĝ as (ĝᵀ x)ᵀ: M = out, K = tokens, N = in.
FFN = {"350M": (1024, 4096), "1.5B": (1600, 6400), "7B": (4096, 11008)}
GEMMS = {"8192^3": (8192, 8192, 8192)}
for _model, (_d, _f) in FFN.items():
    GEMMS |= {f"{_model}_up_fwd": (_f, _d, TOKENS), f"{_model}_down_fwd": (_d, _f, TOKENS),
              f"{_model}_up_wgrad": (_f, TOKENS, _d), f"{_model}_down_wgrad": (_d, TOKENS, _f)}  # fmt: skip
CUTLASS_CONFIGS = {
    "sste_cutlass": sste_jax.SparsityConfig(mvue=True, matmul="cutlass"),
    "sste_cutlass_fp8": sste_jax.SparsityConfig(mvue=True, fp8=True, matmul="cutlass"),
}


def _operands(m, k, n, count, scale=1):
    out = []
    for i in range(count):
        ka, kb = jax.random.split(jax.random.key(i))
        a_MxK = sste_jax.hard_threshold_24(jax.random.normal(ka, (m, k)), axis=1)
        out.append((a_MxK, jax.random.normal(kb, (n, k))))
    return out


def _measure(f, sets, dry_run, gpu_only):
    """Seconds per call, or on a dry run of a GPU-only variant: lowered for CUDA, not run."""
    if dry_run and gpu_only:
        jax.jit(f).trace(*sets[0]).lower(lowering_platforms=("cuda",))
        return "lowered"
    return time_fn(f, sets, reps=2 if dry_run else 7)


def bench_gemms(dry_run):
    rows = []
    for name, (m, k, n) in GEMMS.items():
        if dry_run:
            m, k, n = (max(64, x // 64) for x in (m, k, n))
            m, k, n = -(-m // 64) * 64, -(-k // 128) * 128, -(-n // 64) * 64
        count = 2 if dry_run else max(2, min(8, int(1.5e9 // ((m * k + n * k + n * m) * 2))))
        raw = _operands(m, k, n, count)
        bf = [(a.astype(BF16), b.astype(BF16)) for a, b in raw]
        e4 = [(a.astype(E4M3), b.astype(E4M3)) for a, b in raw]
        e5 = [(a.astype(E5M2), b.astype(E5M2)) for a, b in raw]
        fp8_dot = jax.lax.dot_general
        variants = {  # name: (input sets, f, GPU only)
            "dense_bf16": (bf, lambda a, b: b @ a.T, False),
            "dense_e4m3": (e4, lambda a, b: fp8_dot(b, a, (((1,), (1,)), ((), ())), preferred_element_type=BF16),
                           False),
            "cutlass_bf16": ([(*cutlass.emit_sm90(a), b) for a, b in bf],
                             lambda v, e, b: cutlass.matmul(cutlass.Sm90Sparse(v, e), b), True),
            "cutlass_bf16_incl_emit": (bf, lambda a, b: cutlass.sparse_linear(b, a), True),
            "cutlass_e4m3": ([(*cutlass.emit_sm90(a), b) for a, b in e4],
                             lambda v, e, b: cutlass.matmul(cutlass.Sm90Sparse(v, e), b), True),
            "cutlass_e5m2": ([(*cutlass.emit_sm90(a), b) for a, b in e5],
                             lambda v, e, b: cutlass.matmul(cutlass.Sm90Sparse(v, e), b), True),
            "cusparselt_bf16": (bf, lambda a, b: cusparselt.sparse_linear(b, a), True),
            "cusparselt_e4m3_incl_compress": (
                e4, lambda a, b: cusparselt.matmul(cusparselt.compress(a), b, a.shape[0], BF16), True),
        }  # fmt: skip
        row = {"gemm": name, "M": m, "K": k, "N": n, "flops": 2 * m * n * k}
        for vname, (sets, f, gpu_only) in variants.items():
            try:
                t = _measure(f, sets, dry_run, gpu_only)
            except Exception as e:  # an unsupported shape or type is recorded, not fatal
                row[vname] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                continue
            row[vname] = t
            if isinstance(t, dict):
                t["TFLOPs"] = row["flops"] / t["median_s"] / 1e12
        for vname in variants:
            base = "dense_e4m3" if "e4m3" in vname or "e5m2" in vname else "dense_bf16"
            if isinstance(row[vname], dict) and "median_s" in row[vname] and "median_s" in row[base]:
                row[vname]["speedup_vs_dense"] = row[base]["median_s"] / row[vname]["median_s"]
        rows.append(row)
        print(json.dumps({k: (v if not isinstance(v, dict) else v.get("speedup_vs_dense", v.get("error", "")))
                          for k, v in row.items()}))  # fmt: skip
    return rows


def bench_emitters(dry_run):
    """Emitter and MVUE+emit throughput in bytes moved (read + written) per second vs copy bandwidth."""
    copy_bps, _ = copy_bandwidth(16 << 20 if dry_run else 512 << 20)
    rows = []
    shapes = [(256, 512)] if dry_run else [(4096, 4096), (11008, 4096), (4096, 8192)]
    for m, k in shapes:
        raw = _operands(m, k, 1, 3)
        a_bf = [(a.astype(BF16),) for a, _ in raw]
        g = [(jax.random.normal(jax.random.key(i), (k, m), BF16),) for i in range(3)]  # (T, O): ĝᵀ is (O, T)
        moved = m * k * 2 + m * k + m * k // 8  # read bf16 dense, write half the values and 4 bits per group
        for name, (f, sets) in {
            "emit_bf16": (cutlass.emit_sm90, a_bf),
            "mvue_emit_bf16": (lambda g: cutlass.emit_sm90(sste_jax.mvue_24(jax.random.key(0), g).T), g),
        }.items():
            t = time_fn(f, sets, reps=2 if dry_run else 7)
            rows.append({"op": name, "M": m, "K": k, "bytes": moved, **t, "Bps": moved / t["median_s"],
                         "fraction_of_copy": moved / t["median_s"] / copy_bps})  # fmt: skip
            print(f"{name} {m}x{k}: {rows[-1]['Bps'] / 1e9:.0f} GB/s = {rows[-1]['fraction_of_copy']:.2f} of copy")
    return {"copy_Bps": copy_bps, "rows": rows}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes; GPU-only variants lowered, not run")
    parser.add_argument("--parts", default="gemm,emit,ffn,gpt2")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    parts = args.parts.split(",")
    result = {"device": device_name(), "jax": jax.__version__, "dry_run": args.dry_run}
    if "gemm" in parts:
        result["gemm"] = bench_gemms(args.dry_run)
    if "emit" in parts:
        result["emit"] = bench_emitters(args.dry_run)
    configs = bench_sparse_matmul.CONFIGS
    if args.dry_run:  # the FFN benchmark runs its XLA configs only (the GEMM configs raise off a GPU)
        for name in [n for n in configs if n not in ("dense", "sste_xla")]:
            del configs[name]
        bench_sparse_matmul.TOKENS = 64
    else:
        configs.update(CUTLASS_CONFIGS)
    if "ffn" in parts:
        result["ffn"] = bench_sparse_matmul.bench_ffn(quick=args.dry_run)
    if "gpt2" in parts and not args.dry_run:
        result["gpt2"] = bench_sparse_matmul.bench_gpt2_step(["dense", "sste_xla", *CUTLASS_CONFIGS])
    out = args.out or f"benchmarks/results/bench_cutlass_{result['device']}.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print("wrote", out)


if __name__ == "__main__":
    main()
