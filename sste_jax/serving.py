"""The file formats of a trained 2:4 model: the safetensors folders inference engines read, and back.

The export is a Hugging Face style folder: ``model.safetensors`` and ``config.json`` whose
``quantization_config`` names the ``compressed-tensors`` method with a ``sparsity_config`` of
format ``"sparse-24-bitmask"``, the layout ``transformers`` (through the ``compressed-tensors``
package) reads, and vLLM up to 0.18 did (docs/serving.md: which engine reads which format). 2:4
weights are stored as their kept values (half the bytes) plus a bitmask (one bit per weight); every
other weight is stored dense. The writer and reader of
the format are ``compressed-tensors``' own (`Sparse24BitMaskTensor`) and ``safetensors``; they need
PyTorch (CPU is enough): ``pip install -e ".[serving]"``.

The library side knows no model: `inference_weights` gives a model's weights by parameter path (each
sparse layer's forward weight ``W̃ = β·S(W)`` asked from the layer, so the export is β-free), and a
mapping ``{path: Target(name, transpose)}`` says where each goes. Flax kernels are ``(in, out)``;
PyTorch ``Linear`` weights are ``(out, in)`` with the 2:4 groups along ``in``, the last axis, which
is what the bitmask format packs: pass ``transpose=True`` for them. `load_safetensors` reads a
folder back into ``{path: array}`` in our layout, bit for bit; `sste_jax.nnx.import_weights` puts them
into an NNX model, 2:4 kernels as `sste_jax.nnx.CompressedLinear` layers, and `sste_jax.nnx.to_backend`
serves those on XLA or cuSPARSELt. ``save_safetensors(..., fp8=...)`` stores the 2:4 weights as FP8 e4m3
with per-tensor or per-channel scales instead.

>>> import tempfile, jax, jax.numpy as jnp, numpy as np
>>> from flax import nnx
>>> from sste_jax import nnx as sparse_nnx, serving
>>> class MLP(nnx.Module):
...     def __init__(self, rngs, linear=nnx.Linear):
...         self.fc1, self.fc2 = linear(8, 16, rngs=rngs), linear(16, 8, rngs=rngs)
...     def __call__(self, x):
...         return self.fc2(jax.nn.relu(self.fc1(x)))
>>> model = MLP(nnx.Rngs(0), linear=sparse_nnx.SparseLinear)
>>> weights, sparse = serving.inference_weights(model)
>>> targets = {p: serving.Target(p.replace("/kernel", ".weight").replace("/", "."), transpose=p.endswith("kernel"))
...            for p in weights}
>>> d = serving.save_safetensors(tempfile.mkdtemp() + "/mlp", weights, targets, sparse=sparse)
>>> back = serving.load_safetensors(d, targets)
>>> all(np.array_equal(back[p], weights[p]) for p in weights)
True
>>> served = sparse_nnx.import_weights(MLP(nnx.Rngs(1)), back, sparse=sparse)
>>> x = jnp.ones((2, 8))
>>> bool(jnp.array_equal(served(x), model(x))), type(served.fc1).__name__
(True, 'CompressedLinear')
"""

import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from sste_jax._metrics import find_weights

__all__ = [
    "Target",
    "inference_weights",
    "save_safetensors",
    "load_safetensors",
    "SAFETENSORS_FILE",
    "DTYPES",
    "FP8_SCALES",
    "FP8_INPUTS",
]

SAFETENSORS_FILE = "model.safetensors"
DTYPES = ("float32", "bfloat16", "float16")
FP8_SCALES = ("tensor", "channel")
FP8_INPUTS = ("token", "tensor")
_PACKED = ("compressed", "bitmask", "shape")  # what compressed-tensors stores for one 2:4 weight
_SCALE = "weight_scale"  # and for one FP8 weight, its scale(s)


class Target(NamedTuple):
    """Where one parameter goes: the tensor ``name`` in the file, and whether our array is written
    transposed (``True`` for a Flax ``(in, out)`` kernel stored as a PyTorch ``(out, in)`` weight).

    >>> from sste_jax import serving
    >>> serving.Target("model.fc1.weight", transpose=True)
    Target(name='model.fc1.weight', transpose=True)
    """

    name: str
    transpose: bool = False


def _needs_torch():
    try:
        import compressed_tensors  # noqa: F401
        import safetensors  # noqa: F401
        import torch
    except ImportError as e:
        raise ImportError(
            f"sste_jax.serving needs torch, safetensors and compressed-tensors ({e}): pip install -e '.[serving]'"
        ) from None
    return torch


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def inference_weights(model: Any) -> tuple[dict[str, Array], frozenset[str]]:
    """``({path: array}, sparse paths)``: every trainable parameter of ``model`` by ``/``-joined path, each sparse
    weight (`sste_jax.sparse_weights`) replaced by its forward weight ``W̃`` (β·S(W) for S-STE, the masked weight
    for T-SR-STE), and the paths of those whose forward weight is N:M sparse. ``model`` is an NNX model
    (the inference layers of a served model, `sste_jax.nnx.CompressedLinear` and
    `sste_jax.nnx.CusparseltLinear`, give the weight they compute with) or the variables
    ``{"params", "sparsity"}`` of a Linen module or function made sparse by `sste_jax.sparsify` /
    `sste_jax.sparsify_fn` (Flax's partitioning boxes unboxed). The original model holding these weights,
    without sste_jax, computes what the sparse model computes.

    >>> from flax import nnx
    >>> from sste_jax import nnx as sparse_nnx, serving
    >>> model = nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0)))
    >>> weights, sparse = serving.inference_weights(model)
    >>> sorted(weights), sorted(sparse)
    (['layers/0/bias', 'layers/0/kernel'], ['layers/0/kernel'])
    >>> bool((weights["layers/0/kernel"] == model.layers[0].forward_weight()).all())  # β·S(W), not W
    True
    """
    if isinstance(model, Mapping):
        from sste_jax._sparsify import _linen_params

        weights = {path: jnp.asarray(v) for path, v in _linen_params(model).items()}
        served = []
    else:
        from flax import nnx

        from sste_jax.nnx import CompressedLinear, CusparseltLinear

        weights = {_path_str(path): v[...] for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        served = [(path, node) for path, node in nnx.iter_graph(model)
                  if isinstance(node, CompressedLinear | CusparseltLinear)]
    sparse = set()
    for name, w in find_weights(model).items():
        weights[name] = w.forward()
        if w.config.sparse:
            sparse.add(name)
    for path, node in served:  # an inference layer gives the weight it computes with
        weights[_path_str((*path, "kernel"))] = node.forward_weight()
        sparse.add(_path_str((*path, "kernel")))
    return weights, frozenset(sparse)


def _check_targets(paths: Iterable[str], targets: Mapping[str, Target]) -> None:
    missing = sorted(set(paths) - set(targets))
    if missing:
        raise ValueError(f"no target name for the weights {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    names = [t.name for t in targets.values()]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"target names used twice: {twice[:8]}")
    packed = [n for n in names if n.rsplit(".", 1)[-1] in (*_PACKED, _SCALE)]
    if packed:
        raise ValueError(
            f"target names {packed[:8]} end in a name the format uses for its own tensors {(*_PACKED, _SCALE)}"
        )


def _check_finite(name: str, w: np.ndarray) -> None:
    """Raises naming the weight and how many of its values are NaN or infinite, if any are."""
    if jnp.issubdtype(w.dtype, jnp.floating):
        bad = int(np.size(w) - np.count_nonzero(np.isfinite(w.astype(np.float32))))
        if bad:
            raise ValueError(f"weight {name!r}: {bad} of its {np.size(w)} values are not finite (NaN or infinite): "
                             "the model diverged or its weights are damaged; nothing was written")


def _groups_over_2(w_OxI: np.ndarray) -> np.ndarray:
    """The non-zero count of each group of 4 along the last axis, where it exceeds 2: ``(row, group, count)``."""
    counts = (w_OxI.reshape(w_OxI.shape[0], -1, 4) != 0).sum(-1)
    return np.column_stack([*np.nonzero(counts > 2), counts[counts > 2]])


def _check_24(name: str, w_OxI: np.ndarray) -> None:
    """Raises unless the ``(out, in)`` weight has at most 2 non-zeros in each group of 4 along ``in``."""
    if w_OxI.ndim != 2 or w_OxI.shape[1] % 4:
        raise ValueError(f"2:4 weight {name!r} must be 2-D with its last axis divisible by 4, got shape {w_OxI.shape}")
    over = _groups_over_2(w_OxI)
    if len(over):
        row, group, count = over[0]
        transposed_is_24 = w_OxI.shape[0] % 4 == 0 and not len(_groups_over_2(w_OxI.T))
        cause = ("it is 2:4 along its other axis: write a Flax (in, out) kernel with transpose=True" if transposed_is_24
                 else "nor along its other axis: it is not a 2:4 weight")
        raise ValueError(f"weight {name!r} is not 2:4 along its contraction axis: group {group} of row {row} has "
                         f"{count} non-zeros ({cause})")


def save_safetensors(
    directory: str | os.PathLike,
    weights: Mapping[str, Any],
    targets: Mapping[str, Target],
    *,
    sparse: Iterable[str] = (),
    dtype: str = "float32",
    fp8: str | None = None,
    fp8_inputs: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Writes ``weights`` to ``directory/model.safetensors`` and ``directory/config.json``.

    Args:
      weights: ``{path: array}``, e.g. from `inference_weights`.
      targets: ``{path: Target}`` for every path of ``weights``.
      sparse: the paths stored as "sparse-24-bitmask" (each must be 2:4 along its contraction axis,
        the last axis once written: raises naming the weight otherwise).
      dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``, for every floating-point weight (but the
        FP8 ones).
      fp8: ``None``, or ``"tensor"`` / ``"channel"`` to store the ``sparse`` weights as FP8 e4m3 with one
        float32 scale per tensor / per output row (``scale = max|W| / 448``, ``W_fp8 = round(W / scale)``),
        described by a compressed-tensors ``quantization_config`` ("float-quantized", symmetric, static)
        next to the 2:4 ``sparsity_config``: one byte per kept weight. A reader's weight is
        ``W_fp8 · scale`` (what `load_safetensors` returns); a kept value below e4m3's smallest step
        becomes 0, which the 2:4 format holds (a group then has fewer than 2 non-zeros).
      fp8_inputs: with ``fp8``: ``None`` (weight-only FP8), or ``"token"`` / ``"tensor"`` to declare the
        inputs of those layers dynamically quantized to FP8 e4m3 per token / per tensor at run time
        (W8A8: what sparse FP8 kernels such as vLLM's 2:4 CUTLASS path require; readers then round the
        inputs too, e.g. ``transformers`` on CPU). Nothing about the inputs is stored.
      config: the model's own ``config.json`` fields (architecture, sizes); the
        ``quantization_config`` of the 2:4 weights is added to it.

    ``directory`` must not exist (nothing is overwritten). Every floating-point weight must be finite:
    one holding a NaN or an infinity is refused, naming it and the count of such values, before
    anything is written. Returns ``directory``.

    >>> import tempfile, jax, sste_jax
    >>> from sste_jax import serving
    >>> w = sste_jax.hard_threshold_24(jax.random.normal(jax.random.key(0), (8, 4)))  # 2:4, (in, out)
    >>> targets = {"fc/kernel": serving.Target("fc.weight", transpose=True)}
    >>> d = serving.save_safetensors(tempfile.mkdtemp() + "/fc", {"fc/kernel": w}, targets, sparse=["fc/kernel"])
    >>> sorted(p.name for p in d.iterdir())
    ['config.json', 'model.safetensors']
    """
    torch = _needs_torch()
    from compressed_tensors.compressors import ModelCompressor, Sparse24BitMaskTensor
    from compressed_tensors.config import Sparse24BitMaskConfig
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {DTYPES}")
    if fp8 is not None and fp8 not in FP8_SCALES:
        raise ValueError(f"fp8={fp8!r}: use None or one of {FP8_SCALES} (one scale per tensor or per output row)")
    if fp8_inputs is not None and (fp8 is None or fp8_inputs not in FP8_INPUTS):
        raise ValueError(f"fp8_inputs={fp8_inputs!r}: use None, or one of {FP8_INPUTS} together with fp8")
    directory = pathlib.Path(directory)
    if directory.exists():
        raise FileExistsError(f"cannot export to {directory}: it already exists")
    sparse = set(sparse)
    unknown = sorted(sparse - set(weights))
    if unknown:
        raise ValueError(f"sparse paths {unknown[:8]} are not among the weights")
    _check_targets(weights, targets)
    torch_dtype = getattr(torch, dtype)
    tensors, modules, kept = {}, [], 0
    for path, array in weights.items():
        a = np.asarray(jax.device_get(array))
        a = a.T if targets[path].transpose else a
        t = torch.from_numpy(np.ascontiguousarray(a.astype(np.float32) if a.dtype.kind == "f" else a))
        t = t.to(torch_dtype) if t.is_floating_point() else t
        name = targets[path].name
        _check_finite(name, a)
        if path in sparse:
            _check_24(name, a)
            extra = {}
            if fp8 is not None:
                t, extra[_SCALE] = _quantize_fp8(torch.from_numpy(np.ascontiguousarray(a, np.float32)), fp8)
            tensors.update(Sparse24BitMaskTensor.from_dense(t).dict(name_prefix=name))
            tensors.update({f"{name.removesuffix('.weight')}.{k}": v for k, v in extra.items()})
            modules.append(name.removesuffix(".weight"))
            kept += int(np.count_nonzero(a))
        else:
            tensors[name] = t
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / SAFETENSORS_FILE), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({**dict(config or {}), "torch_dtype": dtype}, indent=2))
    if modules:
        total = sum(int(np.size(weights[p])) for p in sparse)
        sparsity = Sparse24BitMaskConfig(targets=sorted(modules), global_sparsity=1 - kept / total)
        quantization = _fp8_config(sorted(modules), fp8, fp8_inputs) if fp8 is not None else None
        ModelCompressor(sparsity_config=sparsity, quantization_config=quantization).update_config(str(directory))
    return directory


def _fp8_args(strategy: str, dynamic: bool = False):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=dynamic)


def _fp8_config(modules: list[str], strategy: str, inputs: str | None = None):
    """compressed-tensors' description of FP8 e4m3 weights (static scales) and, with ``inputs``, of
    dynamically quantized FP8 inputs."""
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

    inputs = _fp8_args(inputs, dynamic=True) if inputs is not None else None
    scheme = QuantizationScheme(targets=modules, weights=_fp8_args(strategy), input_activations=inputs)
    return QuantizationConfig(
        config_groups={"group_0": scheme},
        format=CompressionFormat.float_quantized.value,
        quantization_status=QuantizationStatus.COMPRESSED,
    )


def _quantize_fp8(w_OxI, strategy: str):
    """``(W_fp8, scale)`` of a float32 ``(out, in)`` weight by compressed-tensors' own scale and rounding;
    a value that rounds to zero is stored as +0 (the bitmask packer ranks -0 below +0)."""
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization.utils import calculate_qparams

    args = _fp8_args(strategy)
    dims = dict(dim=1, keepdim=True) if strategy == "channel" else {}
    lo, hi = w_OxI.amin(**dims).reshape(-1, 1), w_OxI.amax(**dims).reshape(-1, 1)
    scale, zero_point = calculate_qparams(lo, hi, args)
    if strategy == "tensor":
        scale, zero_point = scale.reshape(1), zero_point.reshape(1)
    compressor = BaseCompressor.load_from_registry(
        CompressionFormat.float_quantized.value, config=_fp8_config([], strategy)
    )
    q = compressor.compress_weight(weight=w_OxI, scale=scale, zero_point=zero_point, quantization_args=args)["weight"]
    q = torch.where(q.float() == 0, torch.zeros_like(q), q)
    return q, scale


def load_safetensors(directory: str | os.PathLike, targets: Mapping[str, Target]) -> dict[str, np.ndarray]:
    """``{path: array}`` of an export (our layout, float32/bfloat16/float16 as stored), 2:4 weights
    decompressed by ``compressed-tensors`` (FP8 ones dequantized, ``W_fp8 · scale`` in float32): the
    inverse of `save_safetensors`. Raises naming the file when it is truncated or its header is
    damaged, and naming every target missing from the file and every tensor of the file no target
    names. (The format has no checksum: a flipped bit in a tensor's data is not noticed here.)

    >>> import tempfile, jax, numpy as np, sste_jax
    >>> from sste_jax import serving
    >>> w = sste_jax.hard_threshold_24(jax.random.normal(jax.random.key(0), (8, 4)))
    >>> targets = {"fc/kernel": serving.Target("fc.weight", transpose=True)}
    >>> d = serving.save_safetensors(tempfile.mkdtemp() + "/fc", {"fc/kernel": w}, targets, sparse=["fc/kernel"])
    >>> back = serving.load_safetensors(d, targets)
    >>> back["fc/kernel"].shape, bool(np.array_equal(back["fc/kernel"], w))  # our (in, out) layout, exact
    ((8, 4), True)
    """
    torch = _needs_torch()
    from compressed_tensors.compressors import Sparse24BitMaskTensor
    from compressed_tensors.quantization import dequantize
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = pathlib.Path(directory) / SAFETENSORS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {SAFETENSORS_FILE} in {directory}")
    try:
        stored = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is damaged or truncated, not a readable safetensors file ({e})") from None
    dense: dict[str, Any] = {}
    for name in list(stored):
        prefix, _, leaf = name.rpartition(".")
        if leaf == "bitmask":
            parts = {k: stored.pop(f"{prefix}.{k}") for k in _PACKED}
            dense[f"{prefix}.weight"] = Sparse24BitMaskTensor.from_compressed_data(**parts).decompress()
    for name in list(stored):
        prefix, _, leaf = name.rpartition(".")
        if leaf == _SCALE:
            if f"{prefix}.weight" not in dense:
                raise ValueError(f"{file}: {name} scales no 2:4 weight (FP8 weights are read only when 2:4)")
            dense[f"{prefix}.weight"] = dequantize(dense[f"{prefix}.weight"], stored.pop(name))
    dense.update({k: v for k, v in stored.items() if k.rsplit(".", 1)[-1] not in _PACKED})
    by_name = {t.name: path for path, t in targets.items()}
    missing = sorted(set(by_name) - set(dense))
    extra = sorted(set(dense) - set(by_name))
    if missing or extra:
        raise ValueError(f"{file}: tensors missing {missing[:8]}, not mapped {extra[:8]}")
    out = {}
    for name, path in by_name.items():
        t = dense[name]
        a = t.view(torch.int16).numpy().view(jnp.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
        out[path] = np.ascontiguousarray(a.T if targets[path].transpose else a)
    return out
