"""Exports a trained language-model run to a Hugging Face folder that ``transformers`` loads.

    python -m experiments.lm.export_hf --workdir runs/sste --out runs/sste_hf [--dtype bfloat16]
    python -m experiments.lm.export_hf --workdir runs/sste --out runs/sste_fp8 --fp8 channel [--fp8-inputs token]
    python -m experiments.lm.export_hf --workdir runs/sste --out runs/sste_dense --format dense

The folder holds ``model.safetensors``, ``config.json`` with the architecture, a tokenizer
(``tokenizer.json``) and ``SHA256SUMS`` (every file's hash, checked by `import_hf`). ``--format
sparse24`` (the default) stores the 2:4 feed-forward weights in compressed-tensors'
"sparse-24-bitmask" format (kept values plus a bitmask; the rest dense) with the
``quantization_config`` compressed-tensors reads; ``--format dense`` stores every weight dense, for
engines that read only dense weights. Load either with
``AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)`` (the 2:4 format needs
``compressed-tensors`` installed). The export is β-free: each 2:4 weight is the forward weight
``β·S(W)`` itself. A weight holding a NaN or an infinity is refused, naming it.

Architecture. Our GPT is GPT-2's math (pre-LayerNorm, GELU with the tanh approximation, learned
positions, tied embeddings, ``1/sqrt(head_dim)`` attention), but Hugging Face's ``GPT2LMHeadModel``
stores its linears as ``Conv1D`` weights ``(in, out)``, while the bitmask format packs 2:4 groups along
a weight's last axis: a 2:4 GPT-2 ``Conv1D`` weight has them along its first axis, which the format
cannot hold (and vLLM's 2:4 kernels read ``(out, in)`` weights). So the export is
``GPTBigCodeForCausalLM`` with ``multi_query=False``: the same network as GPT-2 built from
``nn.Linear`` layers (``(out, in)`` weights), ``activation_function="gelu_pytorch_tanh"``,
``layer_norm_epsilon=1e-6`` (Flax's default; GPT-2's 1e-5 would differ), zero biases where ours has
none, and ``c_attn``'s output rows reordered from our ``(q|k|v, head)`` to its ``(head, q|k|v)``.

Tokenizer. A byte-level run exports a ``tokenizers`` BPE with no merges whose ids are the UTF-8 byte
values (id 0, NUL, is the end-of-text token, as in training): it round-trips every text. A GPT-2-BPE
run exports GPT-2's tokenizer built from the same offline files as training (its end-of-text 50256;
ids above 50256 are the embedding's padding). Both declare ``split_special_tokens``: the
end-of-text token's text is never matched in the input (training's tokenizers do not match it
either), so every text gets the ids training gave it.
"""

import argparse
import json
import pathlib
import sys
from typing import Any

import jax.numpy as jnp
import numpy as np

from experiments.common import cache
from experiments.common.records import BadFileError, read_json
from experiments.lm import data
from experiments.lm.model import GPT
from experiments.lm.train import load_run
from sste_jax import nnx as sparse_nnx
from sste_jax import serving

ARCHITECTURE = "GPTBigCodeForCausalLM"
FORMATS = ("sparse24", "dense")


def _c_attn_to_hf(kernel_DxE, n_head: int):
    """Our ``c_attn`` kernel's output columns ``(3, head, hd)`` reordered to GPTBigCode's ``(head, 3, hd)``."""
    d = kernel_DxE.shape[0]
    return jnp.asarray(kernel_DxE).reshape(d, 3, n_head, -1).transpose(0, 2, 1, 3).reshape(d, -1)


def _c_attn_from_hf(kernel_DxE, n_head: int):
    d = kernel_DxE.shape[0]
    return jnp.asarray(kernel_DxE).reshape(d, n_head, 3, -1).transpose(0, 2, 1, 3).reshape(d, -1)


def targets(n_layer: int) -> dict[str, serving.Target]:
    """Our parameter paths (and the zero biases GPTBigCode has and ours lacks) -> GPTBigCode's tensor names."""
    out = {"wte/embedding": serving.Target("transformer.wte.weight"),
           "wpe/embedding": serving.Target("transformer.wpe.weight"),
           "ln_f/scale": serving.Target("transformer.ln_f.weight"),
           "ln_f/bias": serving.Target("transformer.ln_f.bias")}
    for i in range(n_layer):
        ours, hf = f"blocks/{i}", f"transformer.h.{i}"
        for norm in ("ln_1", "ln_2"):
            out[f"{ours}/{norm}/scale"] = serving.Target(f"{hf}.{norm}.weight")
            out[f"{ours}/{norm}/bias"] = serving.Target(f"{hf}.{norm}.bias")
        for layer in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            name = f"{hf}.{layer.replace('/', '.')}"
            out[f"{ours}/{layer}/kernel"] = serving.Target(f"{name}.weight", transpose=True)
            out[f"{ours}/{layer}/bias"] = serving.Target(f"{name}.bias")
    return out


def hf_config(model: GPT, tokenizer: data.Tokenizer) -> dict[str, Any]:
    """GPTBigCode's ``config.json`` fields for ``model``."""
    d, n = model.wte.features, model.blocks[0].attn.n_head
    return {
        "architectures": [ARCHITECTURE], "model_type": "gpt_bigcode",
        "vocab_size": model.wte.num_embeddings, "n_positions": model.seq_len, "n_embd": d,
        "n_layer": len(model.blocks), "n_head": n, "n_inner": 4 * d, "multi_query": False,
        "activation_function": "gelu_pytorch_tanh", "layer_norm_epsilon": model.ln_f.epsilon,
        "scale_attn_weights": True, "tie_word_embeddings": True,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id,
    }


def hf_weights(model: GPT) -> tuple[dict[str, Any], frozenset[str]]:
    """``({path: array}, 2:4 paths)`` of ``model`` in GPTBigCode's arrangement (see `targets`)."""
    weights, sparse = serving.inference_weights(model)
    n_head = model.blocks[0].attn.n_head
    for path, target in targets(len(model.blocks)).items():
        if path.endswith("/bias"):
            width = weights[path.replace("/bias", "/scale" if "ln_" in path else "/kernel")].shape[-1]
            weights[path] = jnp.zeros((width,), jnp.float32)
        if path.endswith("c_attn/kernel"):
            weights[path] = _c_attn_to_hf(weights[path], n_head)
    return weights, sparse


def save_tokenizer(out: pathlib.Path, tokenizer: data.Tokenizer) -> None:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` that reproduce ``tokenizer``'s ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if tokenizer.name == "byte":
        table = _bytes_to_unicode()
        tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        eos = table[tokenizer.eot_id]
        tok.decoder = decoders.ByteLevel()
    else:
        tok, eos = tokenizer.hf, "<|endoftext|>"
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos,
         "split_special_tokens": True, "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}, indent=2))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (printable ASCII/Latin-1 stay themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def check_format(format: str, fp8: str | None) -> None:
    """Raises unless ``format`` is one of `FORMATS` and ``fp8`` (which stores 2:4 weights) fits it."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: use one of {FORMATS}")
    if format == "dense" and fp8 is not None:
        raise ValueError("--fp8 stores the 2:4 weights as FP8; --format dense stores no 2:4 weights")


def export_hf(model: GPT, tokenizer: data.Tokenizer, out, dtype: str = "float32",
              fp8: str | None = None, fp8_inputs: str | None = None, format: str = "sparse24") -> pathlib.Path:
    """Writes ``model`` (a trained GPT, any sparse method) and ``tokenizer`` to the folder ``out``, its
    files' hashes to ``out/SHA256SUMS``; ``format`` ``"sparse24"`` stores the 2:4 weights compressed,
    ``"dense"`` every weight dense; ``fp8`` (``"tensor"`` or ``"channel"`` scales) stores the 2:4
    weights as FP8 e4m3, ``fp8_inputs`` (``"token"`` or ``"tensor"``) declares their inputs
    dynamically FP8 (`sste_jax.serving.save_safetensors`)."""
    check_format(format, fp8)
    weights, sparse = hf_weights(model)
    sparse = sparse if format == "sparse24" else frozenset()
    out = serving.save_safetensors(out, weights, targets(len(model.blocks)), sparse=sparse, dtype=dtype, fp8=fp8,
                                   fp8_inputs=fp8_inputs, config=hf_config(model, tokenizer))
    save_tokenizer(out, tokenizer)
    cache.record_folder(out, sorted(out.iterdir()))
    return out


def import_hf(directory, model: GPT) -> GPT:
    """Reads an `export_hf` folder into ``model`` (a GPT of the same shape, e.g. the run's own, any
    weights): its 2:4 layers become `sste_jax.nnx.CompressedLinear`, the sparse layers the export
    holds dense an ``nnx.Linear``; its outputs equal the exported model's. Raises `BadFileError`
    naming the file when a file of the folder does not match its ``SHA256SUMS`` (damaged, truncated,
    missing), and ValueError if a bias the export wrote as zero is not zero (the folder was not made
    by us)."""
    directory = pathlib.Path(directory)
    if why := cache.problem(directory / cache.SUMS):
        raise BadFileError(f"{directory} is not an intact export_hf folder: {why}; export it again")
    config = read_json(directory / "config.json")
    if config.get("architectures") != [ARCHITECTURE]:
        raise ValueError(f"{directory}: architecture {config.get('architectures')}, expected [{ARCHITECTURE!r}]")
    n_layer, n_head = config["n_layer"], config["n_head"]
    if (n_layer, n_head) != (len(model.blocks), model.blocks[0].attn.n_head):
        raise ValueError(f"{directory}: {n_layer} layers x {n_head} heads, the model has "
                         f"{len(model.blocks)} x {model.blocks[0].attn.n_head}")
    sparse_modules = set(config.get("quantization_config", {}).get("sparsity_config", {}).get("targets", []))
    table = targets(n_layer)
    weights = serving.load_safetensors(directory, table)
    nonzero = [p for p in table if p.endswith("/bias") and np.any(weights[p] != 0)]
    if nonzero:
        raise ValueError(f"{directory}: biases {nonzero[:4]} are not zero; our GPT has none")
    weights = {p: a for p, a in weights.items() if not p.endswith("/bias")}
    for path in weights:
        if path.endswith("c_attn/kernel"):
            weights[path] = np.asarray(_c_attn_from_hf(weights[path], n_head))
    sparse = {p for p, t in table.items() if t.name.removesuffix(".weight") in sparse_modules}
    if not sparse:
        model = sparse_nnx.densify_layers(model)
    return sparse_nnx.import_weights(model, weights, sparse=sparse)


def main(argv=None) -> None:

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a language-model training run")
    p.add_argument("--out", required=True, help="the folder to write (must not exist)")
    p.add_argument("--format", choices=FORMATS, default="sparse24",
                   help="sparse24: the 2:4 weights in compressed-tensors' sparse-24-bitmask format (default); "
                        "dense: every weight dense, for engines that read only dense weights")
    p.add_argument("--dtype", choices=serving.DTYPES, default="float32")
    p.add_argument("--fp8", choices=serving.FP8_SCALES, default=None,
                   help="store the 2:4 weights as FP8 e4m3 with one scale per tensor or per output channel")
    p.add_argument("--fp8-inputs", choices=serving.FP8_INPUTS, default=None,
                   help="with --fp8: declare the 2:4 layers' inputs dynamically FP8 per token or per tensor (W8A8)")
    args = p.parse_args(argv)
    try:
        check_format(args.format, args.fp8)
    except ValueError as e:
        p.error(str(e))
    try:
        model, tokenizer, run = load_run(args.workdir)
        out = export_hf(model, tokenizer, args.out, args.dtype, args.fp8, args.fp8_inputs, args.format)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError, cache.CacheError) as e:
        sys.exit(f"error: {e}")
    sizes = {f.name: f.stat().st_size for f in sorted(out.iterdir())}
    kind = f"{args.format}, {args.dtype}" + (f", 2:4 weights FP8 e4m3 per-{args.fp8} scales" if args.fp8 else "")
    kind += f", inputs FP8 per-{args.fp8_inputs}" if args.fp8_inputs else ""
    print(f"exported {run.method} run {args.workdir} -> {out} ({ARCHITECTURE}, {kind}): {sizes}")


if __name__ == "__main__":
    main()
