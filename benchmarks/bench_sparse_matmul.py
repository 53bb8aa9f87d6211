"""cuSPARSELt 2:4 GEMMs vs ``jnp.dot`` dense on the same GPU, in the same process.

1. GEMMs: 8192³ and the GPT-2 124M/350M/774M FFN shapes (N = 8192 tokens), bf16 and fp8 e4m3,
   sparse with the weight pre-compressed and with compression included.
2. The S-STE FFN block (x → W1 → gelu → W2) forward+backward with MVUE, per-step prune+compress
   included, dense vs S-STE on XLA vs S-STE on cuSPARSELt.
3. A GPT-2 124M-shaped training step (12 layers, d 768, 8×1024 tokens, AdamW), MLP linears 2:4,
   built here from `sste_jax.sparse_dense` (no shared model module existed when this was written).

    PYTHONPATH=. python benchmarks/bench_sparse_matmul.py [--quick] [--out ...json]
"""

import argparse
import json
import math
import sys

import jax
import jax.numpy as jnp
import optax

import sste_jax
from sste_jax.kernels import cusparselt

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_kernels import device_name, time_fn  # noqa: E402

TOKENS = 8192
GEMMS = {
    "8192^3": (8192, 8192, 8192),
    "124M_fc1": (3072, 768, TOKENS),
    "124M_fc2": (768, 3072, TOKENS),
    "350M_fc1": (4096, 1024, TOKENS),
    "350M_fc2": (1024, 4096, TOKENS),
    "774M_fc1": (5120, 1280, TOKENS),
    "774M_fc2": (1280, 5120, TOKENS),
}
E4M3 = jnp.float8_e4m3fn


def _sets(m, k, n, count):
    out = []
    for i in range(count):
        kw, kx = jax.random.split(jax.random.key(i))
        w_KxM = jax.random.normal(kw, (k, m), jnp.float32)
        a_MxK = sste_jax.hard_threshold_24(w_KxM).T.astype(jnp.bfloat16)
        out.append((a_MxK, jax.random.normal(kx, (n, k), jnp.bfloat16)))
    return out


def bench_gemms(quick):
    rows = []
    for name, (m, k, n) in GEMMS.items():
        if quick and name not in ("8192^3", "124M_fc1", "124M_fc2"):
            continue
        count = max(2, min(16, int(1.5e9 // ((m * k + n * k + n * m) * 2))))
        sets = _sets(m, k, n, count)
        flops = 2 * m * n * k
        dense_w = [(a.T, x) for a, x in sets]  # dense W (K, M) in Flax layout: y = x @ W
        variants = {
            "dense_bf16": (dense_w, lambda w, x: jnp.dot(x, w)),
            "sparse_bf16": ([(cusparselt.compress(a), x) for a, x in sets],
                            lambda c, x: cusparselt.matmul(c, x, m)),
            "sparse_bf16_incl_compress": (sets, lambda a, x: cusparselt.sparse_linear(x, a)),
            "compress_only_bf16": ([(a,) for a, _ in sets], cusparselt.compress),

            "dense_fp8": ([(w.astype(E4M3), x.astype(E4M3)) for w, x in dense_w],
                          lambda w, x: jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())),
                                                           preferred_element_type=jnp.bfloat16)),
            "sparse_fp8": ([(cusparselt.compress(a.astype(E4M3)), x.astype(E4M3)) for a, x in sets],
                           lambda c, x: cusparselt.matmul(c, x, m, jnp.bfloat16)),
        }
        base = {}
        for vname, (inputs, f) in variants.items():
            try:
                t = time_fn(f, inputs)
            except Exception as e:
                rows.append({"gemm": name, "variant": vname, "error": repr(e)[:400]})
                print(f"{name:10s} {vname:26s} FAILED {repr(e)[:300]}")
                continue
            base[vname] = t["median_s"]
            row = {"gemm": name, "M": m, "K": k, "N": n, "variant": vname, **t,
                   "TFLOPs_dense_equiv": flops / t["median_s"] / 1e12}
            if "dense_bf16" in base:
                row["speedup_vs_dense_bf16"] = base["dense_bf16"] / t["median_s"]
            if "fp8" in vname and "dense_fp8" in base:
                row["speedup_vs_dense_fp8"] = base["dense_fp8"] / t["median_s"]
            rows.append(row)
            print(f"{name:10s} {vname:26s} {t['median_s'] * 1e3:8.3f} ms  {row['TFLOPs_dense_equiv']:6.0f} TFLOP/s  "
                  f"x{row.get('speedup_vs_dense_bf16', float('nan')):.3f} vs dense bf16"
                  + (f"  x{row['speedup_vs_dense_fp8']:.3f} vs dense fp8" if "speedup_vs_dense_fp8" in row else ""))
    return rows


def _ffn(params, x, key, config):
    w1, w2 = params["w1"], params["w2"]
    k1, k2 = jax.random.split(key)
    h = sste_jax.sparse_dense(x, w1.astype(jnp.bfloat16), params["b1"], k1, config)
    h = jax.nn.gelu(h)
    return sste_jax.sparse_dense(h, w2.astype(jnp.bfloat16), params["b2"], k2, config)


CONFIGS = {
    "dense": sste_jax.SparsityConfig(method="dense"),
    "sste_xla": sste_jax.SparsityConfig(mvue=True),
    "sste_cusparselt": sste_jax.SparsityConfig(mvue=True, matmul="cusparselt"),
    "sste_cusparselt_fp8fwd": sste_jax.SparsityConfig(mvue=True, fp8=True, matmul="cusparselt"),
    "dense_fp8": sste_jax.SparsityConfig(method="dense", fp8=True),
    "sste_pallas": sste_jax.SparsityConfig(mvue=True, backend="pallas"),
}


def bench_ffn(quick):
    rows = []
    for model, d in (("124M", 768), ("350M", 1024), ("774M", 1280)):
        if quick and model != "124M":
            continue
        sets = []
        for i in range(3):
            k1, k2, k3 = jax.random.split(jax.random.key(i), 3)
            w1 = jax.random.normal(k1, (d, 4 * d)) * 0.02
            w2 = jax.random.normal(k2, (4 * d, d)) * 0.02
            params = {"w1": w1, "w2": w2, "b1": sste_jax.fit_beta(w1), "b2": sste_jax.fit_beta(w2)}
            sets.append((params, jax.random.normal(k3, (TOKENS, d), jnp.bfloat16)))
        base = None
        for cname, config in CONFIGS.items():
            def step(params, x, config=config):
                def loss(p, x):
                    y = _ffn(p, x, jax.random.key(0), config)
                    return jnp.mean(jnp.square(y.astype(jnp.float32)))
                return jax.grad(loss, argnums=(0, 1))(params, x)

            try:
                t = time_fn(step, sets)
            except Exception as e:
                rows.append({"ffn": model, "config": cname, "error": repr(e)[:400]})
                print(f"FFN {model} {cname:24s} FAILED {repr(e)[:300]}")
                continue
            base = base or t["median_s"]
            rows.append(
                {"ffn": model, "d": d, "tokens": TOKENS, "config": cname, **t, "speedup_vs_dense": base / t["median_s"]}
            )
            print(
                f"FFN {model} fwd+bwd {cname:24s} {t['median_s'] * 1e3:8.3f} ms  x{base / t['median_s']:.3f} vs dense"
            )
    return rows


def _gpt2_params(key, layers=12, d=768, vocab=50304, seq=1024):
    keys = iter(jax.random.split(key, 4 * layers + 2))
    normal = lambda shape, std=0.02: jax.random.normal(next(keys), shape) * std  # noqa: E731
    blocks = []
    for _ in range(layers):
        fc, proj = normal((d, 4 * d)), normal((4 * d, d), 0.02 / math.sqrt(2 * layers))
        blocks.append({"attn": normal((d, 3 * d)), "attn_out": normal((d, d)), "fc": fc, "proj": proj,
                       "ln1": jnp.ones(d), "ln2": jnp.ones(d)})
    params = {"wte": normal((vocab, d)), "wpe": normal((seq, d)), "blocks": blocks, "lnf": jnp.ones(d)}
    betas = [{"fc": sste_jax.fit_beta(b["fc"]), "proj": sste_jax.fit_beta(b["proj"])} for b in blocks]
    return params, betas


def _layer_norm(x, scale):
    x = x.astype(jnp.float32)
    x = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)
    return (x * scale).astype(jnp.bfloat16)


def _gpt2_loss(params, betas, tokens_BxL, key, config, heads=12):
    b, seq = tokens_BxL.shape
    d = params["wte"].shape[1]
    bf = lambda t: t.astype(jnp.bfloat16)  # noqa: E731
    x_NxD = bf(params["wte"][tokens_BxL].reshape(b * seq, d) + jnp.tile(params["wpe"][:seq], (b, 1)))
    for i, (blk, beta) in enumerate(zip(params["blocks"], betas)):
        h = _layer_norm(x_NxD, blk["ln1"]) @ bf(blk["attn"])
        q, k, v = (t.reshape(b, seq, heads, d // heads) for t in jnp.split(h, 3, axis=-1))
        a = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b * seq, d)
        x_NxD = x_NxD + a @ bf(blk["attn_out"])
        h = _layer_norm(x_NxD, blk["ln2"])
        kf, kp = jax.random.split(jax.random.fold_in(key, i))
        h = jax.nn.gelu(sste_jax.sparse_dense(h, bf(blk["fc"]), beta["fc"], kf, config))
        x_NxD = x_NxD + sste_jax.sparse_dense(h, bf(blk["proj"]), beta["proj"], kp, config)
    logits = _layer_norm(x_NxD, params["lnf"]) @ bf(params["wte"]).T
    targets = jnp.roll(tokens_BxL, -1, axis=1).reshape(-1)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def bench_gpt2_step(configs):
    rows = []
    params, betas = _gpt2_params(jax.random.key(0))
    opt = optax.adamw(1.5e-4, b1=0.9, b2=0.95, weight_decay=0.1)
    opt_state = opt.init(params)
    tokens = [(jax.random.randint(jax.random.key(i), (8, 1024), 0, 50257),) for i in range(2)]
    base = None
    for cname in configs:
        config = CONFIGS[cname]

        @jax.jit
        def train_step(params, opt_state, tokens, config=config):
            loss, grads = jax.value_and_grad(_gpt2_loss)(params, betas, tokens, jax.random.key(1), config)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        try:
            t = time_fn(train_step, [(params, opt_state, tok) for (tok,) in tokens], reps=5)
            loss = float(train_step(params, opt_state, tokens[0][0])[2])
        except Exception as e:
            rows.append({"gpt2_124M_step": cname, "error": repr(e)[:400]})
            print(f"GPT-2 124M step {cname:18s} FAILED {repr(e)[:300]}")
            continue
        base = base or t["median_s"]
        rows.append(
            {"gpt2_124M_step": cname, "batch": [8, 1024], **t, "loss": loss, "speedup_vs_dense": base / t["median_s"]}
        )
        print(
            f"GPT-2 124M train step {cname:18s} {t['median_s'] * 1e3:8.2f} ms  "
            f"x{base / t['median_s']:.3f} vs dense  (loss {loss:.3f})"
        )
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--parts", default="gemm,ffn,gpt2")
    parser.add_argument("--gpt2-configs", default="dense,sste_xla,sste_pallas,sste_cusparselt")
    args = parser.parse_args()
    results = {"device": device_name(), "jax": jax.__version__, "tokens": TOKENS}
    print(results)
    parts = args.parts.split(",")
    if "gemm" in parts:
        results["gemm"] = bench_gemms(args.quick)
    if "ffn" in parts:
        results["ffn"] = bench_ffn(args.quick)
    if "gpt2" in parts:
        results["gpt2_step"] = bench_gpt2_step(args.gpt2_configs.split(","))
    out = args.out or f"benchmarks/results/bench_sparse_matmul_{results['device']}.json"
    with open(out, "w") as f:
        json.dump(results, f, indent=1, default=float)
    print("saved", out)


if __name__ == "__main__":
    main()
