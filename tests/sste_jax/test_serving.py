"""Export to safetensors + compressed-tensors, checked by the real clients (transformers on PyTorch CPU),
import back, and sampling that gives the same tokens for the same weights."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx, traverse_util
from hypothesis import given
from hypothesis import strategies as st

import sste_jax
from experiments.common import recipes
from experiments.lm import agreement, data, export_hf
from experiments.lm import sample as lm_sample
from experiments.lm import train as lm_train
from experiments.lm.configs import get_config
from experiments.lm.model import GPT
from sste_jax import SparsityConfig, serving
from sste_jax import nnx as sparse_nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

EPS32 = float(np.finfo(np.float32).eps)


def _trained_like(method: str = "sste", seed: int = 0) -> GPT:
    """A small GPT sparsified with ``method`` whose weights moved after sparsification (β no longer fits,
    a T-SR-STE mask is no longer the top-2), as after training."""
    model = recipes.sparsify(GPT(256, 2, 2, 32, 16, rngs=nnx.Rngs(seed)), recipes.METHODS[method], seed=seed)
    for i, (_, v) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        noise = jax.random.normal(jax.random.key(100 + i), v.shape) * 0.02
        v[...] = v[...] * 1.3 + noise
    return model


def _ids(batch=3, length=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, 256, (batch, length)), jnp.int32)


def _export(tmp_path, model, dtype="float32"):
    return export_hf.export_hf(model, data.get_tokenizer("byte"), tmp_path / "hf", dtype)


def _hf_logits(directory, ids, dtype=None):
    dtype = torch.float32 if dtype is None else dtype
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    with torch.no_grad():
        return hf, hf(torch.from_numpy(np.asarray(ids, np.int64))).logits.float().numpy()


@pytest.mark.parametrize("method", ["sste", "tsrste"])
def test_transformers_loads_the_export_and_gives_our_logits(tmp_path, method):
    model = _trained_like(method)
    ids = _ids()
    ours = np.asarray(model(ids)).reshape(*ids.shape, -1)
    out = _export(tmp_path, model)
    config = json.loads((out / "config.json").read_text())
    sparsity = config["quantization_config"]["sparsity_config"]
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert sparsity["format"] == "sparse-24-bitmask" and sparsity["sparsity_structure"] == "2:4"
    assert sparsity["targets"] == [f"transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")]
    hf, theirs = _hf_logits(out, ids)
    assert type(hf).__name__ == export_hf.ARCHITECTURE
    w = hf.transformer.h[1].mlp.c_proj.weight.detach().numpy()  # (out, in), decompressed by compressed-tensors
    np.testing.assert_array_equal(w, np.asarray(model.blocks[1].mlp.c_proj.forward_weight()).T)
    # Float32 round-off: the same sums in another order; each logit is O(1) after 2 blocks of width 32-128.
    scale = np.abs(ours).max()
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=64 * EPS32 * scale)
    assert not np.array_equal(theirs, np.zeros_like(theirs))


def test_the_24_weights_take_half_the_bytes_plus_a_bitmask(tmp_path):
    from safetensors import safe_open

    model = _trained_like()
    out = _export(tmp_path, model)
    with safe_open(str(out / serving.SAFETENSORS_FILE), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    name = "transformer.h.0.mlp.c_fc"
    assert f"{name}.weight" not in stored
    dense = model.blocks[0].mlp.c_fc.kernel
    values, bitmask = stored[f"{name}.compressed"], stored[f"{name}.bitmask"]
    assert values.element_size() * values.numel() == dense.nbytes // 2
    assert bitmask.numel() == dense.size // 8 and bitmask.dtype == torch.uint8  # one bit per weight
    assert stored["transformer.h.0.attn.c_attn.weight"].shape == (96, 32)  # dense layers stay dense


def test_bfloat16_export_loads_in_transformers(tmp_path):
    model = _trained_like()
    out = _export(tmp_path, model, "bfloat16")
    hf, _ = _hf_logits(out, _ids(1, 4), torch.bfloat16)
    w = hf.transformer.h[0].mlp.c_fc.weight.detach().float().numpy()
    want = np.asarray(model.blocks[0].mlp.c_fc.forward_weight().astype(jnp.bfloat16).astype(jnp.float32)).T
    np.testing.assert_array_equal(w, want)


def test_exported_tokenizer_round_trips_the_byte_tokenizer(tmp_path):
    out = _export(tmp_path, _trained_like())
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = data.get_tokenizer("byte")
    for text in ["ROMEO:\nBut soft!", "naïve café — 東京 🙂", "\t  spaces  \x01\x7f"]:
        assert tok.encode(text) == ours.encode(text)
        assert tok.decode(ours.encode(text)) == text
    assert tok.eos_token_id == ours.eot_id


def test_exported_gpt2_tokenizer_gives_our_bpe_ids(tmp_path):
    ours = data.get_tokenizer("gpt2")
    export_hf.save_tokenizer(tmp_path, ours)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ["ROMEO:\nBut soft! what light through yonder window breaks?", "naïve café — 東京 🙂  x",
                 "it's   they'll\t\n\n end  ", "a<|endoftext|>b"]:  # training's BPE does not match the token
        assert tok.encode(text) == ours.encode(text)
        assert tok.decode(ours.encode(text)) == text
    assert tok.eos_token_id == ours.eot_id


@pytest.mark.parametrize("method", ["sste", "tsrste", "dense"])
def test_import_back_is_exact(tmp_path, method):
    model = _trained_like(method)
    out = _export(tmp_path, model)
    fresh = _trained_like(method, seed=5)
    served = export_hf.import_hf(out, fresh)
    ids = _ids()
    assert np.asarray(served(ids)).tobytes() == np.asarray(model(ids)).tobytes()
    kinds = {type(served.blocks[0].mlp.c_fc).__name__, type(served.blocks[0].attn.c_attn).__name__}
    assert kinds == ({"CompressedLinear", "Linear"} if method != "dense" else {"Linear"})


def test_serving_refuses_bad_input(tmp_path):
    w = {"fc/kernel": jnp.ones((8, 4))}
    targets = {"fc/kernel": serving.Target("fc.weight", transpose=True)}
    with pytest.raises(ValueError, match=r"'fc.weight' is not 2:4 along its contraction axis: group 0 of row 0 has 4 "
                                         r"non-zeros \(nor along its other axis: it is not a 2:4 weight\)"):
        serving.save_safetensors(tmp_path / "a", w, targets, sparse={"fc/kernel"})
    kernel_24 = {"fc/kernel": sste_jax.hard_threshold_24(jax.random.normal(jax.random.key(0), (8, 8)))}  # (in, out)
    with pytest.raises(ValueError, match=r"it is 2:4 along its other axis: write a Flax \(in, out\) kernel with "
                                         r"transpose=True"):
        serving.save_safetensors(tmp_path / "e", kernel_24, {"fc/kernel": serving.Target("fc.weight")},
                                 sparse={"fc/kernel"})
    with pytest.raises(ValueError, match=r"no target name for the weights \['fc/kernel'\]"):
        serving.save_safetensors(tmp_path / "b", w, {})
    with pytest.raises(ValueError, match="dtype='int8'"):
        serving.save_safetensors(tmp_path / "c", w, targets, dtype="int8")
    serving.save_safetensors(tmp_path / "d", w, targets)
    with pytest.raises(FileExistsError, match="already exists"):
        serving.save_safetensors(tmp_path / "d", w, targets)
    with pytest.raises(ValueError, match=r"not mapped \['fc.weight'\]"):
        serving.load_safetensors(tmp_path / "d", {"x": serving.Target("other.weight")})
    model = _sparse_two(SparsityConfig())
    weights, sparse = serving.inference_weights(model)
    weights["b/kernel"] = jnp.ones((4, 8))
    with pytest.raises(ValueError, match=r"b/kernel: shape \(4, 8\) in the weights, \(8, 8\) in the model"):
        sparse_nnx.import_weights(_Two(nnx.Rngs(1)), weights, sparse=sparse)


@pytest.mark.parametrize("layer, name", [("attn", "transformer.h.0.attn.c_attn.weight"),
                                         ("mlp", "transformer.h.0.mlp.c_fc.weight")])
def test_an_export_refuses_non_finite_weights_naming_the_weight_and_the_count(tmp_path, layer, name):
    model = _trained_like()
    linear = model.blocks[0].attn.c_attn if layer == "attn" else model.blocks[0].mlp.c_fc  # dense / 2:4
    linear.kernel[...] = linear.kernel[...].at[0, :3].set(jnp.nan)
    path = f"blocks/0/{layer}/{'c_attn' if layer == 'attn' else 'c_fc'}/kernel"
    bad = int(np.sum(~np.isfinite(np.asarray(serving.inference_weights(model)[0][path]))))
    assert bad >= 1
    with pytest.raises(ValueError, match=rf"weight '{re.escape(name)}': {bad} of its \d+ values are not finite"):
        export_hf.export_hf(model, data.get_tokenizer("byte"), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.fixture(scope="module")
def byte_hf(tmp_path_factory):
    """The byte-level run's exported tokenizer, loaded by transformers."""
    out = tmp_path_factory.mktemp("byte_tokenizer")
    export_hf.save_tokenizer(out, data.get_tokenizer("byte"))
    return transformers.AutoTokenizer.from_pretrained(out)


def test_exported_byte_tokenizer_gives_the_training_ids_for_all_256_bytes(byte_hf):
    ours = data.get_tokenizer("byte")
    every_byte = list(range(256))
    assert byte_hf.decode(every_byte, skip_special_tokens=True) == ours.decode(every_byte)
    assert all(byte_hf.decode([b], skip_special_tokens=True) == ours.decode([b]) for b in every_byte)
    for text in [chr(c) for c in range(256)] + ["".join(map(chr, range(256))), "aĀb", "<|endoftext|>"]:
        assert byte_hf.encode(text) == ours.encode(text), text
    assert byte_hf.encode("Ā") == [0xC4, 0x80] and byte_hf.decode(byte_hf.encode("Ā")) == "Ā"
    assert byte_hf.eos_token_id == ours.eot_id


# random UTF-8 text, with the end-of-text token's texts (ours and GPT-2's) and NUL mixed in
TEXTS = st.lists(st.one_of(st.text(), st.sampled_from(["Ā", "<|endoftext|>", "\x00"]))).map("".join)


@given(TEXTS)
def test_exported_byte_tokenizer_gives_the_training_ids_for_any_text(byte_hf, text):
    ours = data.get_tokenizer("byte")
    ids = ours.encode(text)
    assert byte_hf.encode(text) == ids
    assert byte_hf.decode(ids, skip_special_tokens=True) == ours.decode(ids)


@pytest.fixture(scope="module")
def gpt2_tokenizers(tmp_path_factory):
    """``(exported, training)``: GPT-2's BPE as exported and loaded by transformers, and as trained with."""
    ours, out = data.get_tokenizer("gpt2"), tmp_path_factory.mktemp("gpt2_tokenizer")
    export_hf.save_tokenizer(out, ours)
    return transformers.AutoTokenizer.from_pretrained(out), ours


@given(TEXTS)
def test_exported_gpt2_tokenizer_gives_the_training_ids_for_any_text(gpt2_tokenizers, text):
    exported, ours = gpt2_tokenizers
    assert exported.encode(text) == ours.encode(text)


@given(st.binary())
def test_exported_byte_tokenizer_decodes_any_byte_sequence_as_training_does(byte_hf, raw):
    assert byte_hf.decode(list(raw), skip_special_tokens=True) == data.get_tokenizer("byte").decode(list(raw))


class _Two(nnx.Module):
    def __init__(self, rngs):
        self.a, self.b = nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        return self.b(self.a(x))


def _sparse_two(config: SparsityConfig) -> _Two:
    """A `_Two` whose layers are `SparseLinear` layers holding the same variables."""
    model = _Two(nnx.Rngs(0))
    model.a = sparse_nnx.SparseLinear.from_linear(model.a, config)
    model.b = sparse_nnx.SparseLinear.from_linear(model.b, config)
    return model


def test_kv_cache_decoding_matches_the_full_forward():
    model = _trained_like()
    prompt = _ids(2, 3)
    tokens = lm_sample.generate(model, prompt, 8, temperature=0)  # greedy
    seq = jnp.concatenate([prompt, tokens], axis=1)
    logits = np.asarray(model(seq)).reshape(*seq.shape, -1)
    np.testing.assert_array_equal(np.argmax(logits[:, 2:-1], -1), np.asarray(tokens))


def test_same_weights_give_the_same_tokens(tmp_path):
    model = _trained_like()
    imported = export_hf.import_hf(_export(tmp_path, model), _trained_like(seed=9))
    prompt = _ids(2, 4)
    runs = {w: lm_sample.generate(lm_sample.with_weights(model, w), prompt, 10, temperature=0.9, top_k=20, seed=3)
            for w in lm_sample.WEIGHTS}
    runs["imported"] = lm_sample.generate(imported, prompt, 10, temperature=0.9, top_k=20, seed=3)
    first = np.asarray(runs["trained"])
    for name, tokens in runs.items():
        np.testing.assert_array_equal(np.asarray(tokens), first, err_msg=name)
    other_seed = lm_sample.generate(model, prompt, 10, temperature=0.9, top_k=20, seed=4)
    assert not np.array_equal(np.asarray(other_seed), first)  # the seed matters


def test_top_k_one_is_greedy_and_bad_settings_are_refused():
    model = _trained_like()
    prompt = _ids(1, 2)
    np.testing.assert_array_equal(lm_sample.generate(model, prompt, 5, temperature=1.0, top_k=1, seed=0),
                                  lm_sample.generate(model, prompt, 5, temperature=0))
    with pytest.raises(ValueError, match="exceeds the model's context seq_len=16"):
        lm_sample.generate(model, prompt, 15)
    with pytest.raises(ValueError, match="top_k=300"):
        lm_sample.generate(model, prompt, 2, top_k=300)
    with pytest.raises(ValueError, match="temperature=-1"):
        lm_sample.generate(model, prompt, 2, temperature=-1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``{method: workdir}`` of short training runs: S-STE, with FP8 products, with MVUE and FP8."""
    root = tmp_path_factory.mktemp("trained")
    cfg = get_config("tiny", ["steps=2", "warmup=1", "ckpt_every=2", "eval_every=2", "log_every=1"])
    for method in ("sste", "sste_fp8", "sste_mvue_fp8"):
        lm_train.train(lm_train.make_run(cfg, method), root / method, progress=False)
    return {method: root / method for method in ("sste", "sste_fp8", "sste_mvue_fp8")}


@pytest.mark.integration
def test_a_run_trained_with_mvue_samples_from_its_own_weights(trained, capsys):
    """The sparse layers draw no MVUE key in a forward pass: the compiled decoding loop runs them as is."""
    for weights in ("trained", "compressed"):
        lm_sample.main(["--workdir", str(trained["sste_mvue_fp8"]), "--prompt", "ab", "--tokens", "6", "--seed", "1",
                        "--weights", weights])
        assert capsys.readouterr().out.startswith("ab")


@pytest.mark.integration
def test_cli_exports_a_trained_run_and_samples_it(trained, tmp_path, capsys):
    run = str(trained["sste"])
    export_hf.main(["--workdir", run, "--out", str(tmp_path / "hf")])
    assert "GPTBigCodeForCausalLM, sparse24" in capsys.readouterr().out
    texts = []
    for extra in (["--weights", "compressed"], ["--export", str(tmp_path / "hf")],
                  ["--export", str(tmp_path / "hf"), "--backend", "xla"]):
        lm_sample.main(["--workdir", run, "--prompt", "ab", "--tokens", "6", "--seed", "1", *extra])
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] == texts[2] and texts[0].startswith("ab")
    export_hf.main(["--workdir", run, "--out", str(tmp_path / "hf8"), "--fp8", "channel"])
    assert "2:4 weights FP8 e4m3 per-channel scales" in capsys.readouterr().out
    config = json.loads((tmp_path / "hf8" / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    with pytest.raises(SystemExit, match="already exists"):
        export_hf.main(["--workdir", run, "--out", str(tmp_path / "hf")])


def test_dense_format_stores_every_weight_dense_and_serves_the_same_model(tmp_path):
    from safetensors import safe_open

    model, ids = _trained_like(), _ids()
    out = export_hf.export_hf(model, data.get_tokenizer("byte"), tmp_path / "hf", format="dense")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with safe_open(str(out / serving.SAFETENSORS_FILE), "pt") as f:
        assert all(k.endswith((".weight", ".bias")) for k in f.keys())
        w = f.get_tensor("transformer.h.0.mlp.c_fc.weight").numpy()
    np.testing.assert_array_equal(w, np.asarray(model.blocks[0].mlp.c_fc.forward_weight()).T)
    ours = np.asarray(model(ids)).reshape(*ids.shape, -1)
    _, theirs = _hf_logits(out, ids)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=64 * EPS32 * np.abs(ours).max())
    served = export_hf.import_hf(out, _trained_like(seed=5))
    assert type(served.blocks[0].mlp.c_fc).__name__ == "Linear"
    assert np.asarray(served(ids)).tobytes() == np.asarray(model(ids)).tobytes()


@pytest.mark.integration
def test_the_ways_of_serving_agree_as_measured(trained, tmp_path):
    """What docs/serving.md states: the same logits and tokens for every way of serving a run, except
    that a run trained with FP8 products computes other logits once its 2:4 layers are dense."""
    for method, run in trained.items():
        exports = [export_hf.export_hf(*lm_train.load_run(run)[:2], tmp_path / f"{method}_{f}", format=f)
                   for f in export_hf.FORMATS]
        rows = {name.split(" (")[0].replace(str(tmp_path), ""): (diff, same)
                for name, diff, same in agreement.measure(str(run), [str(e) for e in exports], tokens=8)}
        fp8 = method.endswith("fp8")
        assert rows["compressed"] == rows[f"export /{method}_sparse24"] == (0.0, True)
        assert (rows["dense"][0] > 0) == fp8 and (rows[f"export /{method}_dense"][0] > 0) == fp8
        assert rows["trained"] == (0.0, True)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_bit(path):
    content = bytearray(path.read_bytes())
    content[-3] ^= 1  # in a tensor's data, past the header: the safetensors format itself does not notice
    path.write_bytes(bytes(content))


@pytest.mark.integration
@pytest.mark.parametrize("damage, file, why", [
    (_truncate, serving.SAFETENSORS_FILE, "has SHA-256"), (_flip_a_bit, serving.SAFETENSORS_FILE, "has SHA-256"),
    (_flip_a_bit, "config.json", "has SHA-256"), (_truncate, "tokenizer.json", "has SHA-256"),
    (lambda path: path.unlink(), "SHA256SUMS", "is missing"),
])
def test_a_damaged_export_is_refused_on_import_naming_the_file(trained, tmp_path, damage, file, why):
    run, out = str(trained["sste"]), tmp_path / "hf"
    export_hf.main(["--workdir", run, "--out", str(out)])
    damage(out / file)
    with pytest.raises(SystemExit, match=re.escape(f"{out} is not an intact export_hf folder: {out / file} {why}")):
        lm_sample.main(["--workdir", run, "--export", str(out), "--tokens", "2"])


def test_a_truncated_safetensors_file_is_refused_naming_it(tmp_path):
    out = _export(tmp_path, _trained_like())
    _truncate(out / serving.SAFETENSORS_FILE)
    with pytest.raises(ValueError, match=re.escape(f"{out / serving.SAFETENSORS_FILE} is damaged or truncated")):
        serving.load_safetensors(out, export_hf.targets(2))


def _dequantized_fp8(w_IxO, per_channel: bool):
    """Our own FP8 e4m3 round trip of an ``(in, out)`` kernel: scale = max|W| / 448 per tensor or per output
    column, then ``W_fp8 · scale``: what a reader of the FP8 export computes with."""
    w = np.asarray(w_IxO, np.float32)  # NumPy: IEEE division (XLA may multiply by a rounded reciprocal)
    scale = np.abs(w).max(axis=0 if per_channel else None, keepdims=per_channel) / np.float32(448)
    return (w / scale).astype(jnp.float8_e4m3fn).astype(np.float32) * scale


@pytest.mark.parametrize("scales", serving.FP8_SCALES)
def test_fp8_export_loads_in_transformers_and_gives_the_logits_of_its_dequantized_weights(tmp_path, scales):
    model = _trained_like()
    out = export_hf.export_hf(model, data.get_tokenizer("byte"), tmp_path / "hf", fp8=scales)
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["format"] == "float-quantized" and quant["sparsity_config"]["format"] == "sparse-24-bitmask"
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (weights["type"], weights["num_bits"], weights["strategy"]) == ("float", 8, scales)
    back = serving.load_safetensors(out, export_hf.targets(2))
    for i in range(2):
        for name in ("c_fc", "c_proj"):
            w = getattr(model.blocks[i].mlp, name).forward_weight()
            want = _dequantized_fp8(w, scales == "channel")
            np.testing.assert_array_equal(back[f"blocks/{i}/mlp/{name}/kernel"], want)
            assert not np.array_equal(want, np.asarray(w))  # FP8 rounding changed the weights
    served = export_hf.import_hf(out, _trained_like(seed=5))
    np.testing.assert_array_equal(served.blocks[1].mlp.c_proj.forward_weight(), back["blocks/1/mlp/c_proj/kernel"])
    ids = _ids()
    ours = np.asarray(served(ids)).reshape(*ids.shape, -1)
    hf, theirs = _hf_logits(out, ids)
    w = hf.transformer.h[0].mlp.c_fc.weight.detach().numpy()  # decompressed and dequantized by compressed-tensors
    np.testing.assert_array_equal(w, back["blocks/0/mlp/c_fc/kernel"].T)
    scale = np.abs(ours).max()
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=64 * EPS32 * scale)
    trained = np.asarray(model(ids)).reshape(*ids.shape, -1)
    assert not np.array_equal(ours, trained)  # the FP8 weights are not the trained ones


def test_fp8_24_weights_take_one_byte_per_kept_value(tmp_path):
    from safetensors import safe_open

    model = _trained_like()
    out = export_hf.export_hf(model, data.get_tokenizer("byte"), tmp_path / "hf", fp8="channel")
    with safe_open(str(out / serving.SAFETENSORS_FILE), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    name, dense = "transformer.h.0.mlp.c_fc", model.blocks[0].mlp.c_fc.kernel
    values, scale = stored[f"{name}.compressed"], stored[f"{name}.weight_scale"]
    assert values.dtype == torch.float8_e4m3fn and values.numel() == dense.size // 2
    assert scale.dtype == torch.float32 and tuple(scale.shape) == (dense.shape[1], 1)  # one per output row
    assert stored["transformer.h.0.attn.c_attn.weight"].dtype == torch.float32  # dense layers stay as they are


def test_fp8_keeps_the_24_format_when_kept_values_underflow(tmp_path):
    # (in, out) = (8, 2): each output column has two groups of 4 along ``in``; the kept values 1e-6 and -1e-6
    # are far below e4m3's smallest step times the scale 1/448 and become 0.
    w = np.zeros((8, 2), np.float32)
    w[[0, 1, 5, 6], 0] = [1.0, 1e-6, -0.5, -1e-6]
    w[[2, 3, 4, 7], 1] = [0.25, -0.75, 1e-6, 0.125]
    targets = {"fc/kernel": serving.Target("fc.weight", transpose=True)}
    d = serving.save_safetensors(tmp_path / "fc", {"fc/kernel": w}, targets, sparse=["fc/kernel"], fp8="tensor")
    back = serving.load_safetensors(d, targets)["fc/kernel"]
    want = _dequantized_fp8(w, per_channel=False)
    np.testing.assert_array_equal(back, want)
    assert (want[[1, 6, 4], [0, 0, 1]] == 0).all() and not np.signbit(back).any(where=back == 0)
    assert np.count_nonzero(back) == 5 and np.count_nonzero(w) == 8  # three kept values underflowed
    layer = sparse_nnx.import_weights(nnx.Sequential(nnx.Linear(8, 2, rngs=nnx.Rngs(0))), {"layers/0/kernel": back,
                                   "layers/0/bias": np.zeros(2, np.float32)}, sparse={"layers/0/kernel"}).layers[0]
    assert isinstance(layer, sparse_nnx.CompressedLinear)
    np.testing.assert_array_equal(layer.forward_weight(), want)


@pytest.mark.outside_annotations
def test_fp8_refuses_bad_input(tmp_path):
    w = np.zeros((8, 4), np.float32)
    w[0, 0] = np.inf
    targets = {"fc/kernel": serving.Target("fc.weight", transpose=True)}
    with pytest.raises(ValueError, match=r"fp8='row'"):
        serving.save_safetensors(tmp_path / "a", {"fc/kernel": w}, targets, sparse=["fc/kernel"], fp8="row")
    with pytest.raises(ValueError, match=r"'fc.weight': 1 of its 32 values are not finite"):
        serving.save_safetensors(tmp_path / "b", {"fc/kernel": w}, targets, sparse=["fc/kernel"], fp8="tensor")


class _LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        x = jax.nn.relu(linen.Dense(16, name="up")(x))
        x = linen.Dense(16, name="mid")(x)
        return linen.Dense(8, name="head")(x)  # stays dense


def test_linen_export_loads_back_and_serves_as_a_plain_linen_model(tmp_path):
    model = sste_jax.sparsify(_LinenMLP(), {"up|mid": SparsityConfig()})
    x = jax.random.normal(jax.random.key(1), (3, 8))
    variables = model.init(jax.random.key(0), x)
    variables = {**variables, "params": jax.tree.map(lambda p: p * 1.3, variables["params"])}  # β no longer fits
    y = model.apply(variables, x)
    weights, sparse = serving.inference_weights(variables)
    assert sparse == {"up/kernel", "mid/kernel"}
    up = variables["params"]["up"]["kernel"]
    assert not np.array_equal(weights["up/kernel"], up)  # the forward weight β·S(W), not W
    assert (np.asarray(weights["up/kernel"]).reshape(2, 4, 16) != 0).sum(1).max() == 2
    targets = {p: serving.Target(p.replace("/", ".").replace("kernel", "weight"), transpose=p.endswith("kernel"))
               for p in weights}
    back = serving.load_safetensors(serving.save_safetensors(tmp_path / "m", weights, targets, sparse=sparse), targets)
    assert back.keys() == weights.keys()
    for p in weights:
        np.testing.assert_array_equal(back[p], weights[p], err_msg=p)
    plain = linen.Sequential([linen.Dense(16, name="up"), jax.nn.relu, linen.Dense(16, name="mid"),
                              linen.Dense(8, name="head")])
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in back.items()}, sep="/")
    served = plain.apply({"params": {f"layers_{i}": params[n] for i, n in ((0, "up"), (2, "mid"), (3, "head"))}}, x)
    np.testing.assert_array_equal(served, y)


@pytest.mark.parametrize("n, m", [(1, 4), (2, 8)])
def test_linen_export_keeps_the_layers_n_m_pattern(n, m):
    config = SparsityConfig(n=n, m=m)
    variables = sste_jax.sparsify(linen.Dense(8), {".*": config}).init(jax.random.key(0), jnp.ones((2, 16)))
    beta = variables["sparsity"]["kernel"]
    assert (beta.spec.config.n, beta.spec.config.m) == (n, m)
    weights, sparse = serving.inference_weights(variables)
    assert sparse == {"kernel"}
    want = sste_jax.forward_weight(variables["params"]["kernel"], beta.value, config)
    np.testing.assert_array_equal(weights["kernel"], want)
    assert (np.asarray(weights["kernel"]).reshape(16 // m, m, 8) != 0).sum(1).max() == n


@pytest.mark.outside_annotations
def test_linen_export_refuses_variables_without_their_beta_boxes_or_params():
    variables = sste_jax.sparsify(linen.Dense(4), {".*": SparsityConfig()}).init(jax.random.key(0), jnp.ones((2, 8)))
    bare = {**variables, "sparsity": {"kernel": variables["sparsity"]["kernel"].value}}
    with pytest.raises(ValueError, match=r"variables\['sparsity'\]\['kernel'\] is not the β of a weight"):
        serving.inference_weights(bare)
    with pytest.raises(TypeError, match=r"the variables \{'params', 'sparsity'\}"):
        serving.inference_weights({"sparsity": variables["sparsity"]})


def test_xla_backend_decompresses_once_and_gives_the_same_logits(tmp_path):
    model = _trained_like()
    served = export_hf.import_hf(_export(tmp_path, model), _trained_like(seed=5))
    ids = _ids()
    want = np.asarray(served(ids))
    dense = sparse_nnx.to_backend(served, "xla")
    assert type(dense.blocks[0].mlp.c_fc).__name__ == "Linear"
    assert not any(isinstance(n, sparse_nnx.CompressedLinear) for _, n in nnx.iter_graph(dense))
    assert np.asarray(dense(ids)).tobytes() == want.tobytes()


@pytest.mark.outside_annotations
def test_backends_refuse_what_they_cannot_run():
    served = sparse_nnx.compress_layers(_sparse_two(SparsityConfig()))
    with pytest.raises(ValueError, match=r"backend='tpu'"):
        sparse_nnx.to_backend(served, "tpu")
    if jax.default_backend() != "gpu":
        for backend in ("cusparselt", "cusparselt-fp8"):
            with pytest.raises(RuntimeError, match=r"jax.default_backend\(\) is 'cpu'"):
                sparse_nnx.to_backend(served, backend)
        with pytest.raises(RuntimeError, match="sparse tensor cores"):
            sparse_nnx.CusparseltLinear.from_weight(jnp.zeros((16, 16)))
    fp8 = sparse_nnx.compress_layers(_sparse_two(SparsityConfig(fp8=True)))
    with pytest.raises(ValueError, match="a: the layer computes FP8 products"):
        sparse_nnx.to_backend(fp8, "xla")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cusparselt", "cusparselt-fp8"])
def test_cusparselt_backend_matches_the_dense_product(backend):
    import sste_jax

    k, m, tokens = 256, 128, 37  # a token count that is no multiple of 16
    w_IxO = sste_jax.hard_threshold_24(jax.random.normal(jax.random.key(0), (k, m)))
    bias = jax.random.normal(jax.random.key(1), (m,))
    x = jax.random.normal(jax.random.key(2), (tokens, k))
    served = nnx.Sequential(sparse_nnx.CompressedLinear(*sste_jax.compress_24(w_IxO), bias))
    fast = sparse_nnx.to_backend(served, backend)
    assert isinstance(fast.layers[0], sparse_nnx.CusparseltLinear)
    y = np.asarray(nnx.jit(lambda mdl, v: mdl(v))(fast, x), np.float64)
    if backend == "cusparselt":  # bf16 operands, float32 accumulation, bf16 output
        xr = np.asarray(x.astype(jnp.bfloat16), np.float64)
        wr = np.asarray(w_IxO.astype(jnp.bfloat16), np.float64)
        out_unit = 2.0**-8  # bf16 rounding of the output (and of the bias sum)
    else:  # the e4m3 operands: per-tensor input scale (sste_jax's FP8 cast), per-output-channel weight scale
        from sste_jax import _fp8

        qx, xs = _fp8.quantize(x, jnp.float8_e4m3fn)
        xr = np.asarray(qx, np.float64) / float(xs)
        ws = fast.layers[0].scale[...]
        np.testing.assert_allclose(ws, jnp.abs(w_IxO).max(0) / 448, rtol=2 * EPS32)
        wr = np.asarray(jnp.clip(w_IxO / ws, -448, 448).astype(jnp.float8_e4m3fn), np.float64) * np.asarray(ws)
        out_unit = 4 * EPS32  # the float32 output times scale / input scale, plus the bias
    ref = xr @ wr + np.asarray(bias, np.float64)
    # rounding of the output plus float32 accumulation over k terms
    tol = out_unit * (np.abs(ref) + np.abs(np.asarray(bias))) + k * EPS32 * (np.abs(xr) @ np.abs(wr))
    assert np.all(np.abs(y - ref) <= tol), np.max(np.abs(y - ref) / tol)
    plain = sparse_nnx.densify_layers(fast)  # every inference layer bakes into an nnx.Linear
    assert type(plain.layers[0]).__name__ == "Linear"
    np.testing.assert_allclose(np.asarray(plain.layers[0].kernel[...], np.float64), wr, rtol=4 * EPS32, atol=0)


@pytest.mark.parametrize("inputs", serving.FP8_INPUTS)
def test_fp8_inputs_declare_w8a8_layers_that_transformers_runs(tmp_path, inputs):
    model = _trained_like()
    out = export_hf.export_hf(model, data.get_tokenizer("byte"), tmp_path / "hf", fp8="channel", fp8_inputs=inputs)
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    act = group["input_activations"]
    assert (act["type"], act["num_bits"], act["strategy"], act["dynamic"]) == ("float", 8, inputs, True)
    hf, _ = _hf_logits(out, _ids(1, 2))
    layer = hf.transformer.h[0].mlp.c_fc
    x = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32) * np.float32([[1], [3], [0.1], [10], [1]])
    with torch.no_grad():  # (batch, tokens, features) as in the model: compressed-tensors' tokens are axes 0 and 1
        y = layer(torch.from_numpy(x[None]))[0].numpy().astype(np.float64)
    # the reader's dynamic e4m3 cast of the input (scale = max|x| / 448 per token or per tensor), then the product
    amax = np.abs(x).max(axis=1 if inputs == "token" else None, keepdims=True)
    scale = amax / np.float32(448)
    xq = (x / scale).astype(jnp.float8_e4m3fn).astype(np.float32) * scale
    w = serving.load_safetensors(out, export_hf.targets(2))["blocks/0/mlp/c_fc/kernel"].astype(np.float64)
    want = xq.astype(np.float64) @ w  # zero bias
    tol = 32 * EPS32 * (np.abs(xq) @ np.abs(w)) + EPS32 * np.abs(want)  # float32 sums of 32 terms, output rounding
    assert np.all(np.abs(y - want) <= tol)
    unrounded = x.astype(np.float64) @ w
    assert np.abs(y - unrounded).max() > 100 * tol.max()  # the inputs were rounded to e4m3


@pytest.mark.outside_annotations
def test_fp8_inputs_need_fp8_weights(tmp_path):
    w = {"fc/kernel": np.zeros((8, 4), np.float32)}
    targets = {"fc/kernel": serving.Target("fc.weight", transpose=True)}
    with pytest.raises(ValueError, match=r"fp8_inputs='token': use None, or one of .* together with fp8"):
        serving.save_safetensors(tmp_path / "a", w, targets, sparse=["fc/kernel"], fp8_inputs="token")
    with pytest.raises(ValueError, match=r"fp8_inputs='channel'"):
        serving.save_safetensors(tmp_path / "b", w, targets, sparse=["fc/kernel"], fp8="tensor", fp8_inputs="channel")
