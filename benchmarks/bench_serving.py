"""Bytes on disk and load time of each way out of a trained 2:4 GPT, on CPU.

A GPT (the experiments' model, byte vocabulary, S-STE feed-forward layers) is written six ways:
the orbax training checkpoint of its state (dense ``W`` + β), the orbax 2:4 export
(`sste_jax.nnx.export_compressed`: values + uint8 metadata), and the Hugging Face folder of
`experiments.lm.export_hf` in float32, bfloat16 and bfloat16 with the 2:4 weights in FP8 e4m3 (per-channel
scales) (2:4 weights as sparse-24-bitmask) plus, for
reference, the same folder with every weight dense. Each is loaded ``--repeats`` times (median): into
our JAX model, and the Hugging Face folders also by ``transformers`` (PyTorch CPU). Sizes count the
files; "ffn" counts only the feed-forward weights' tensors.

    python benchmarks/bench_serving.py [--layers 4 --d-model 512]
    # prints a table, writes benchmarks/results/bench_serving_cpu.json

GPU mode (``--gpu``): prefill and decode tokens/s of GPT-2 124M / 350M / 774M shapes (vocabulary 50304,
context 1024, S-STE feed-forward layers) served three ways, in bfloat16 activations: ``dense_bf16`` (every
weight dense, XLA's GEMMs), ``24_bf16`` and ``24_e4m3`` (the 2:4 feed-forward weights compressed once by
cuSPARSELt, `sste_jax.nnx.to_backend`; e4m3 with per-channel weight scales). Prefill is one forward pass
of ``--batch`` prompts of ``--prompt`` tokens filling a KV cache; decode is one cached step of
``--decode-batch`` sequences at position ``--prompt``. Each is jitted, warmed up (which also runs
cuSPARSELt's kernel search once per shape) and timed ``--repeats`` times (median); ratios are against
``dense_bf16`` of the same size in the same process. Weights are random (speed does not depend on them).

    python benchmarks/bench_serving.py --gpu [--sizes 124M,350M,774M]
    # writes benchmarks/results/bench_serving_gpu_<device>.json

``--tiny`` runs either mode at toy sizes (a smoke test; on CPU the GPU mode measures ``dense_bf16`` and
``24_decompress``, the `sste_jax.nnx.CompressedLinear` layers as loaded, and skips cuSPARSELt), writing to a
temporary folder unless ``--out`` is given.
"""

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.common import recipes
from experiments.lm import data, export_hf
from experiments.lm import sample as lm_sample
from experiments.lm.model import GPT
from sste_jax import checkpoint, serving
from sste_jax import nnx as sparse_nnx

# GPT-2's shapes: (layers, d_model, heads); vocabulary 50257 padded to 50304, context 1024.
GPT2_SIZES = {"124M": (12, 768, 12), "350M": (24, 1024, 16), "774M": (36, 1280, 20)}
GPT2_VOCAB, GPT2_CONTEXT = 50304, 1024


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _ffn_bytes(file: Path) -> int:
    from safetensors import safe_open

    itemsize = {"F32": 4, "BF16": 2, "F16": 2, "U8": 1, "I64": 8, "F8_E4M3": 1}
    with safe_open(str(file), "pt") as f:
        tensors = [f.get_slice(k) for k in f.keys() if ".mlp." in k and not k.endswith(".bias")]
        return sum(int(np.prod(t.get_shape())) * itemsize[t.get_dtype()] for t in tensors)


def _ready(model: nnx.Module) -> nnx.Module:
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    return model


def _served(size: tuple[int, int, int], vocab: int, context: int, variant: str) -> GPT:
    """A random GPT of ``size`` with S-STE feed-forward layers, served as ``variant``, weights in bfloat16."""
    layers, d, heads = size
    model = recipes.sparsify(GPT(vocab, layers, heads, d, context, rngs=nnx.Rngs(0)), recipes.METHODS["sste"], seed=0)
    model = sparse_nnx.densify_layers(model) if variant == "dense_bf16" else sparse_nnx.compress_layers(model)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda v: v.astype(jnp.bfloat16), params))
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Module) and hasattr(module, "dtype"):
            module.dtype = jnp.bfloat16  # compute in bfloat16 (Embed, LayerNorm, Linear, CompressedLinear)
    if variant in ("24_bf16", "24_e4m3"):
        sparse_nnx.to_backend(model, "cusparselt" if variant == "24_bf16" else "cusparselt-fp8")
    return model


def _throughput(model: GPT, batch: int, prompt: int, decode_batch: int, repeats: int) -> dict[str, float]:
    """Prefill and decode tokens/s of ``model`` (jitted; compile and warm-up excluded)."""
    graphdef, state = nnx.split(model)
    d, n = model.wte.features, model.blocks[0].attn.n_head
    length = min(model.seq_len, prompt + 1)

    def empty_cache(b):
        return [(jnp.zeros((b, length, n, d // n), jnp.bfloat16),) * 2 for _ in model.blocks]

    @jax.jit
    def prefill(state, ids_BxT):
        return lm_sample._forward(nnx.merge(graphdef, state), ids_BxT, empty_cache(ids_BxT.shape[0]), 0)

    @jax.jit
    def decode(state, token_Bx1, cache):
        return lm_sample._forward(nnx.merge(graphdef, state), token_Bx1, cache, prompt)

    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.wte.num_embeddings, (batch, prompt)), jnp.int32)
    tokens = ids[:decode_batch, :1] if decode_batch <= batch else jnp.zeros((decode_batch, 1), jnp.int32)
    cache = empty_cache(decode_batch)
    jax.block_until_ready(prefill(state, ids))
    jax.block_until_ready(decode(state, tokens, cache))
    prefill_s = _median_seconds(lambda: jax.block_until_ready(prefill(state, ids)), repeats)
    decode_s = _median_seconds(lambda: jax.block_until_ready(decode(state, tokens, cache)), repeats)
    return {"prefill_tokens_per_s": batch * prompt / prefill_s, "prefill_s": prefill_s,
            "decode_tokens_per_s": decode_batch / decode_s, "decode_step_s": decode_s}


def gpu_main(args) -> None:
    on_gpu = jax.default_backend() == "gpu"
    device = jax.devices()[0].device_kind if on_gpu else _cpu_model()
    if args.tiny:
        sizes, vocab, context = {"tiny": (2, 64, 4)}, 512, 64
        args.batch, args.prompt, args.decode_batch, args.repeats = 2, 16, 4, 2
    else:
        sizes = {k: GPT2_SIZES[k] for k in args.sizes.split(",")}
        vocab, context = GPT2_VOCAB, GPT2_CONTEXT
    variants = ("dense_bf16", "24_bf16", "24_e4m3") if on_gpu else ("dense_bf16", "24_decompress")
    if not on_gpu:
        print(f"no GPU (jax.default_backend() is {jax.default_backend()!r}): measuring {variants}, not cuSPARSELt")
    rows = {}
    for size_name, size in sizes.items():
        for variant in variants:
            model = _served(size, vocab, context, variant)
            rows[f"{size_name}/{variant}"] = _throughput(model, args.batch, args.prompt, args.decode_batch,
                                                         args.repeats)
            del model
        base = rows[f"{size_name}/dense_bf16"]
        for variant in variants:
            r = rows[f"{size_name}/{variant}"]
            r["prefill_vs_dense"] = r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
            r["decode_vs_dense"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    result = {"device": device, "backend": jax.default_backend(),
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "sizes": {k: dict(zip(("layers", "d_model", "heads"), v)) for k, v in sizes.items()},
              "vocab": vocab, "context": context, "sparse": "feed-forward (S-STE), weights random",
              "batch": args.batch, "prompt": args.prompt, "decode_batch": args.decode_batch, "repeats": args.repeats,
              "results": rows, "versions": {"jax": jax.__version__}}
    print(f"{'size/variant':<22}{'prefill tok/s':>15}{'vs dense':>10}{'decode tok/s':>15}{'vs dense':>10}")
    for name, r in rows.items():
        print(f"{name:<22}{r['prefill_tokens_per_s']:>15.0f}{r['prefill_vs_dense']:>10.3f}"
              f"{r['decode_tokens_per_s']:>15.0f}{r['decode_vs_dense']:>10.3f}")
    out = args.out or str(Path(__file__).parent / "results" / f"bench_serving_gpu_{device.replace(' ', '-')}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gpu", action="store_true", help="prefill/decode throughput of GPT-2 shapes (see above)")
    p.add_argument("--sizes", default=",".join(GPT2_SIZES), help="GPU mode: comma list of " + ",".join(GPT2_SIZES))
    p.add_argument("--batch", type=int, default=8, help="GPU mode: prompts per prefill")
    p.add_argument("--prompt", type=int, default=512, help="GPU mode: prompt length (the decode position)")
    p.add_argument("--decode-batch", type=int, default=32, help="GPU mode: sequences per decode step")
    p.add_argument("--tiny", action="store_true", help="toy sizes, a smoke test (output to a temporary folder)")
    p.add_argument("--out", default=None, help="the JSON file to write (default: under benchmarks/results/)")
    args = p.parse_args(argv)
    if args.tiny and args.out is None:
        args.out = str(Path(tempfile.mkdtemp()) / "bench_serving.json")
    if args.gpu:
        return gpu_main(args)
    if args.tiny:
        args.layers, args.d_model, args.heads, args.seq_len, args.repeats = 2, 64, 4, 32, 1
    args.out = args.out or str(Path(__file__).parent / "results" / "bench_serving_cpu.json")
    import torch
    import transformers

    def build(seed):
        gpt = GPT(256, args.layers, args.heads, args.d_model, args.seq_len, rngs=nnx.Rngs(seed))
        return recipes.sparsify(gpt, recipes.METHODS["sste"], seed=seed)

    model, tokenizer = build(0), data.get_tokenizer("byte")
    tmp = Path(tempfile.mkdtemp())
    try:
        checkpoint.save_checkpoint(tmp / "ckpt", 0, nnx.state(model))
        sparse_nnx.export_compressed(tmp / "orbax_24", model)
        export_hf.export_hf(model, tokenizer, tmp / "hf_24_f32")
        export_hf.export_hf(model, tokenizer, tmp / "hf_24_bf16", "bfloat16")
        export_hf.export_hf(model, tokenizer, tmp / "hf_24_fp8", "bfloat16", fp8="channel")
        weights, _ = export_hf.hf_weights(model)
        serving.save_safetensors(tmp / "hf_dense_f32", weights, export_hf.targets(args.layers),
                                 config=export_hf.hf_config(model, tokenizer))
        ffn_dense = sum(layer.kernel.nbytes for _, layer in nnx.iter_graph(model)
                        if type(layer).__name__ == "SparseLinear")

        def hf_load(folder, dtype):
            return lambda: transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)

        loads = {
            "orbax_checkpoint": lambda: _ready(nnx.merge(nnx.graphdef(model), checkpoint.restore_checkpoint(
                tmp / "ckpt", nnx.state(build(1))))),
            "orbax_24": lambda: _ready(sparse_nnx.load_compressed(tmp / "orbax_24", build(1))),
            "hf_24_f32": lambda: _ready(export_hf.import_hf(tmp / "hf_24_f32", build(1))),
            "hf_24_bf16": lambda: _ready(export_hf.import_hf(tmp / "hf_24_bf16", build(1))),
            "hf_24_fp8": lambda: _ready(export_hf.import_hf(tmp / "hf_24_fp8", build(1))),
        }
        transformers.logging.set_verbosity_error()
        torch_loads = {
            "hf_24_f32": hf_load(tmp / "hf_24_f32", torch.float32),
            "hf_24_bf16": hf_load(tmp / "hf_24_bf16", torch.bfloat16),
            "hf_24_fp8": hf_load(tmp / "hf_24_fp8", torch.bfloat16),
            "hf_dense_f32": hf_load(tmp / "hf_dense_f32", torch.float32),
        }
        build_seconds = _median_seconds(lambda: _ready(build(1)), args.repeats)
        rows = {}
        for name in ("orbax_checkpoint", "orbax_24", "hf_24_f32", "hf_24_bf16", "hf_24_fp8", "hf_dense_f32"):
            path = tmp / {"orbax_checkpoint": "ckpt"}.get(name, name)
            row = {"bytes": _bytes(path)}
            if name.startswith("hf"):
                row["ffn_bytes"] = _ffn_bytes(path / serving.SAFETENSORS_FILE)
            if name in loads:
                row["jax_load_s"] = _median_seconds(loads[name], args.repeats) - build_seconds
            if name in torch_loads:
                row["transformers_load_s"] = _median_seconds(torch_loads[name], args.repeats)
            rows[name] = row
    finally:
        shutil.rmtree(tmp)
    result = {"machine": _cpu_model(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "model": {"layers": args.layers, "d_model": args.d_model, "heads": args.heads, "seq_len": args.seq_len,
                        "vocab": 256, "sparse": "feed-forward (S-STE)"},
              "ffn_dense_float32_bytes": ffn_dense, "repeats": args.repeats,
              "jax_load_excludes_model_build_s": build_seconds, "formats": rows,
              "versions": {"jax": jax.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__}}
    print(f"{'format':<18}{'bytes':>12}{'ffn bytes':>12}{'JAX load s':>12}{'transformers s':>16}")
    for name, r in rows.items():
        print(f"{name:<18}{r['bytes']:>12}{r.get('ffn_bytes', ''):>12}"
              f"{r.get('jax_load_s', float('nan')):>12.3f}{r.get('transformers_load_s', float('nan')):>16.3f}")
    print(f"feed-forward weights dense float32: {ffn_dense} B")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
