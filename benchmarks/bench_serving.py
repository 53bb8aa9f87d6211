"""Bytes on disk and load time of each way out of a trained 2:4 GPT, on CPU.

A GPT (the experiments' model, byte vocabulary, S-STE feed-forward layers) is written five ways:
the orbax training checkpoint of its state (dense ``W`` + β), the orbax 2:4 export
(`checkpoint.export_compressed`: values + uint8 metadata), and the Hugging Face folder of
`experiments.export_hf` in float32 and bfloat16 (2:4 weights as sparse-24-bitmask) plus, for
reference, the same folder with every weight dense. Each is loaded ``--repeats`` times (median): into
our JAX model, and the Hugging Face folders also by ``transformers`` (PyTorch CPU). Sizes count the
files; "ffn" counts only the feed-forward weights' tensors.

    python benchmarks/bench_serving.py [--layers 4 --d-model 512]
    # prints a table, writes benchmarks/results/bench_serving_cpu.json
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
import numpy as np
from flax import nnx

from experiments import export_hf
from experiments.common import recipes
from experiments.lm import data
from experiments.lm.model import GPT
from sste_jax import checkpoint, serving


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

    itemsize = {"F32": 4, "BF16": 2, "F16": 2, "U8": 1, "I64": 8}
    with safe_open(str(file), "pt") as f:
        tensors = [f.get_slice(k) for k in f.keys() if ".mlp." in k and not k.endswith(".bias")]
        return sum(int(np.prod(t.get_shape())) * itemsize[t.get_dtype()] for t in tensors)


def _ready(model: nnx.Module) -> nnx.Module:
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_serving_cpu.json"))
    args = p.parse_args(argv)
    import torch
    import transformers

    def build(seed):
        gpt = GPT(256, args.layers, args.heads, args.d_model, args.seq_len, rngs=nnx.Rngs(seed))
        return recipes.sparsify(gpt, recipes.METHODS["sste"], seed=seed)

    model, tokenizer = build(0), data.get_tokenizer("byte")
    tmp = Path(tempfile.mkdtemp())
    try:
        checkpoint.save_checkpoint(tmp / "ckpt", 0, nnx.state(model))
        checkpoint.export_compressed(tmp / "orbax_24", model)
        export_hf.export_hf(model, tokenizer, tmp / "hf_24_f32")
        export_hf.export_hf(model, tokenizer, tmp / "hf_24_bf16", "bfloat16")
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
            "orbax_24": lambda: _ready(checkpoint.load_compressed(tmp / "orbax_24", build(1))),
            "hf_24_f32": lambda: _ready(export_hf.import_hf(tmp / "hf_24_f32", build(1))),
            "hf_24_bf16": lambda: _ready(export_hf.import_hf(tmp / "hf_24_bf16", build(1))),
        }
        transformers.logging.set_verbosity_error()
        torch_loads = {
            "hf_24_f32": hf_load(tmp / "hf_24_f32", torch.float32),
            "hf_24_bf16": hf_load(tmp / "hf_24_bf16", torch.bfloat16),
            "hf_dense_f32": hf_load(tmp / "hf_dense_f32", torch.float32),
        }
        build_seconds = _median_seconds(lambda: _ready(build(1)), args.repeats)
        rows = {}
        for name in ("orbax_checkpoint", "orbax_24", "hf_24_f32", "hf_24_bf16", "hf_dense_f32"):
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
