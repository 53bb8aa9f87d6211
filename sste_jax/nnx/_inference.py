"""Inference layers and the surgery that makes them: a trained model's sparse layers served as plain
``nnx.Linear`` layers (`densify_layers`), 2:4-compressed (`CompressedLinear`, `compress_layers`) or on
Hopper's sparse tensor cores (`CusparseltLinear`, `to_backend`); weights read from files put into a model
(`import_weights`), and the compressed export (`export_compressed`, `load_compressed`).

Every layer holding a forward weight answers ``layer.forward_weight()``: the converters ask it, so every
method (T-SR-STE's masked layers included) and every inference layer converts.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from sste_jax import nnx as sparse_nnx
>>> model = nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0)))
>>> y = model(jnp.ones((2, 8)))
>>> served = sparse_nnx.compress_layers(model)
>>> type(served.layers[0]).__name__, bool(jnp.array_equal(served(jnp.ones((2, 8))), y))
('CompressedLinear', True)
"""

import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype
from jaxtyping import Array, Float, Shaped, UInt8

from sste_jax._linear import forward_product
from sste_jax._metrics import find_weights, sparse_modules
from sste_jax._sparsify import unsparsify
from sste_jax._sparsity import compress_24, decompress_24, valid_meta
from sste_jax.nnx._layers import Path, linear_like, path_str, set_child

__all__ = [
    "CompressedWeight",
    "CompressedLinear",
    "CusparseltLinear",
    "densify_layers",
    "compress_layers",
    "decompress_layers",
    "to_backend",
    "BACKENDS",
    "import_weights",
    "export_compressed",
    "load_compressed",
]

BACKENDS = ("xla", "cusparselt", "cusparselt-fp8")  # what `to_backend` serves compressed layers on


class CompressedWeight(nnx.Variable):
    """The stored form of a compressed 2:4 weight in an inference layer: `CompressedLinear`'s kept values and
    uint8 metadata, `CusparseltLinear`'s packed bytes and FP8 scales; not an ``nnx.Param``.

    >>> from flax import nnx
    >>> from sste_jax import nnx as sparse_nnx
    >>> model = nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0)))
    >>> layer = sparse_nnx.compress_layers(model).layers[0]
    >>> isinstance(layer.meta, sparse_nnx.CompressedWeight), layer.meta[...].dtype, isinstance(layer.meta, nnx.Param)
    (True, dtype('uint8'), False)
    """


class CompressedLinear(nnx.Module):
    """Inference layer holding ``W̃`` as `sste_jax.compress_24` values + metadata: half the weight
    bytes, plus one uint8 per group of 4. It decompresses once per call (a jitted model folds that
    into the compiled program) and its output equals the sparse layer's bit for bit (same product,
    same forward weight).

    Args:
      values: the kept values, ``(in / 2, out)``.
      meta: their positions, ``(in / 4, out)`` uint8.
      bias: ``(out,)``, or None.
      fp8: compute the product in FP8 (e4m3), as the sparse layer with ``SparsityConfig(fp8=True)`` does.
      dtype: the computation dtype (as ``nnx.Linear``'s).
      promote_dtype: how the input, weight and bias are promoted (as ``nnx.Linear``'s).

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> w = sste_jax.hard_threshold_24(jax.random.normal(jax.random.key(0), (8, 4)))
    >>> layer = CompressedLinear(*sste_jax.compress_24(w))
    >>> bool(jnp.array_equal(layer(jnp.ones((2, 8))), jnp.ones((2, 8)) @ w)), layer.forward_weight().shape
    (True, (8, 4))
    """

    def __init__(
        self,
        values: Shaped[Array, "half out"],
        meta: UInt8[Array, "groups out"],
        bias: Float[Array, " out"] | None = None,
        *,
        fp8: bool = False,
        dtype: Any = None,
        promote_dtype: Any = promote_dtype,
    ):
        self.values = CompressedWeight(values)
        self.meta = CompressedWeight(meta)
        self.bias = nnx.Param(bias) if bias is not None else None
        self.fp8, self.dtype, self.promote_dtype = fp8, dtype, promote_dtype

    def forward_weight(self) -> Float[Array, "in out"]:
        """The forward weight ``W̃`` (`sste_jax.decompress_24` of the stored data)."""
        return decompress_24(self.values[...], self.meta[...])

    def __call__(self, x: Float[Array, "*batch in"]) -> Float[Array, "*batch out"]:
        kernel = self.forward_weight()
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        y = forward_product(x, kernel, fp8=self.fp8)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


class CusparseltLinear(nnx.Module):
    """Inference layer whose product runs on Hopper's sparse tensor cores: ``y = x @ W̃ (+ bias)`` with ``W̃ᵀ``
    compressed once by cuSPARSELt (`sste_jax.kernels.cusparselt`) in bfloat16, or in FP8 e4m3 with one
    float32 scale per output channel (``W̃ᵀ ≈ scale·W_fp8``; the input is cast to e4m3 with a per-call
    per-tensor scale, the product accumulated in float32 and rescaled). Built by `to_backend` or
    `from_weight` (needs an NVIDIA GPU with cuSPARSELt: ``pip install -e ".[cuda]"``); the layer's dimensions
    must be multiples of 16, the token count is padded to one.

    Args:
      packed: cuSPARSELt's compressed ``W̃ᵀ`` (bytes).
      in_features, out_features: the layer's dimensions.
      bias: ``(out,)``, or None.
      scale: FP8 only: the ``(out,)`` scales of ``W_fp8``.
      dtype: the output dtype (default: the input's).

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> w = sste_jax.hard_threshold_24(jax.random.normal(jax.random.key(0), (64, 32)))
    >>> layer = CusparseltLinear.from_weight(w)  # doctest: +SKIP
    >>> y = layer(jnp.ones((5, 64), jnp.bfloat16))  # doctest: +SKIP
    """

    def __init__(
        self,
        packed: UInt8[Array, " nbytes"],
        in_features: int,
        out_features: int,
        bias: Float[Array, " out"] | None = None,
        scale: Float[Array, " out"] | None = None,
        *,
        dtype: Any = None,
    ):
        self.packed = CompressedWeight(packed)
        self.scale = CompressedWeight(scale) if scale is not None else None
        self.bias = nnx.Param(bias) if bias is not None else None
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype

    @classmethod
    def from_weight(
        cls, w_IxO: Float[Array, "in out"], bias: Float[Array, " out"] | None = None, *, fp8: bool = False,
        dtype: Any = None, name: str = "weight",
    ) -> "CusparseltLinear":
        """Compresses the 2:4 ``(in, out)`` forward weight ``w_IxO`` (2:4 along ``in``) for cuSPARSELt, once.

        >>> import jax, sste_jax
        >>> w = sste_jax.hard_threshold_24(jax.random.normal(jax.random.key(0), (64, 32)))
        >>> CusparseltLinear.from_weight(w).out_features  # doctest: +SKIP
        32
        """
        from sste_jax.kernels import cusparselt

        _check_gpu("CusparseltLinear")
        w_OxI = jnp.asarray(w_IxO).T
        if any(d % 16 for d in w_OxI.shape):
            raise ValueError(f"{name}: cuSPARSELt needs in and out divisible by 16, got (in, out) = {w_IxO.shape}")
        kept = np.count_nonzero(np.asarray(jax.device_get(w_OxI)).reshape(w_OxI.shape[0], -1, 4), axis=-1)
        if kept.max(initial=0) > 2:
            raise ValueError(f"weight {name!r} is not 2:4 along its contraction axis (in): a group of 4 has "
                             f"{int(kept.max())} non-zeros")
        scale = None
        if fp8:
            fmax = float(jnp.finfo(jnp.float8_e4m3fn).max)
            w_OxI = w_OxI.astype(jnp.float32)
            amax = jnp.max(jnp.abs(w_OxI), axis=1)
            scale = jnp.where(amax > 0, amax / fmax, 1.0)
            packed = cusparselt.compress(jnp.clip(w_OxI / scale[:, None], -fmax, fmax).astype(jnp.float8_e4m3fn))
        else:
            packed = cusparselt.compress(w_OxI.astype(jnp.bfloat16))
        return cls(packed, w_OxI.shape[1], w_OxI.shape[0], bias, scale, dtype=dtype)

    def _product(self, x_NxI: jax.Array) -> jax.Array:
        """``x @ W̃`` in float32 (no bias), ``x`` 2-D."""
        from sste_jax import _fp8
        from sste_jax.kernels import cusparselt

        n = x_NxI.shape[0]
        x_NxI = jnp.pad(x_NxI, ((0, -n % 16), (0, 0)))
        if self.scale is not None:
            qx, sx = _fp8.quantize(x_NxI, _fp8.FORWARD)
            y = cusparselt.matmul(self.packed[...], qx, self.out_features, jnp.float32) * (self.scale[...] / sx)
        else:
            y = cusparselt.matmul(self.packed[...], x_NxI.astype(jnp.bfloat16), self.out_features, jnp.bfloat16)
        return y[:n].astype(jnp.float32)

    def forward_weight(self) -> Float[Array, "in out"]:
        """The ``(in, out)`` weight the layer multiplies by (float32): its product with the identity, so ``W̃``
        as stored (bfloat16, or ``W_fp8·scale`` up to float32 rounding). Needs the GPU, as the layer does."""
        return self._product(jnp.eye(self.in_features, dtype=jnp.float32))

    def __call__(self, x: Float[Array, "*batch in"]) -> Float[Array, "*batch out"]:
        y = self._product(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype or x.dtype).reshape(*x.shape[:-1], self.out_features)


def _check_gpu(what: str) -> None:
    if jax.default_backend() != "gpu":
        raise RuntimeError(
            f"{what} runs on an NVIDIA GPU's sparse tensor cores (cuSPARSELt); jax.default_backend() is "
            f"{jax.default_backend()!r}: serve with backend='xla' (or the CompressedLinear layers as they are) here"
        )


_INFERENCE_LAYERS = (CompressedLinear, CusparseltLinear)


def _forward_weights(model: nnx.Module) -> list[tuple[Path, nnx.Module, jax.Array]]:
    """``(path, layer, W̃)`` of every sparse layer, each ``W̃`` from the layer's own ``forward_weight()``
    (so a layer that keeps a mask, e.g. T-SR-STE's, applies it); raises naming a layer that has none."""
    out = []
    for path, layer in sparse_modules(model):
        if not callable(getattr(layer, "forward_weight", None)):
            raise TypeError(f"{path_str(path)}: {type(layer).__name__} has no forward_weight() to export")
        out.append((path, layer, layer.forward_weight()))
    return out


def densify_layers(model: nnx.Module) -> nnx.Module:
    """Bakes every forward weight ``W̃`` (β·S(W)) into the model, in place; returns ``model``. `SparseLinear`
    layers and every inference layer (`CompressedLinear`, `CusparseltLinear`) become ``nnx.Linear``; a model
    `sste_jax.sparsify` made holds ``W̃`` in its own parameters and is its own class again, without
    ``sparsity``. The result needs nothing from sste_jax to run.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sste_jax import nnx as sparse_nnx
    >>> model = nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0)))
    >>> x = jnp.ones((2, 8))
    >>> y = model(x)
    >>> dense = sparse_nnx.densify_layers(model)
    >>> type(dense.layers[0]).__name__, bool(jnp.allclose(dense(x), y))
    ('Linear', True)
    """
    for path, layer, w_tilde in _forward_weights(model):
        set_child(model, path, linear_like(layer, w_tilde))
    for path, node in list(nnx.iter_graph(model)):
        if isinstance(node, _INFERENCE_LAYERS):
            set_child(model, path, linear_like(node, node.forward_weight()))
    return unsparsify(model, {name: w.forward() for name, w in find_weights(model).items()})


def compress_layers(model: nnx.Module) -> nnx.Module:
    """Replaces, in place, every 2:4 layer by a `CompressedLinear` of its ``W̃`` (layers with
    ``method="dense"`` by an ``nnx.Linear``); returns ``model``.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sste_jax import nnx as sparse_nnx
    >>> model = nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0)))
    >>> x = jnp.ones((2, 8))
    >>> y = model(x)
    >>> compressed = sparse_nnx.compress_layers(model)
    >>> type(compressed.layers[0]).__name__, bool(jnp.array_equal(compressed(x), y))
    ('CompressedLinear', True)
    """
    for path, layer, w_tilde in _forward_weights(model):
        if layer.config.sparse:
            bias = layer.bias[...] if layer.bias is not None else None
            new = CompressedLinear(
                *compress_24(w_tilde), bias, fp8=layer.config.fp8, dtype=layer.dtype, promote_dtype=layer.promote_dtype
            )
        else:
            new = linear_like(layer, w_tilde)
        set_child(model, path, new)
    return model


def decompress_layers(model: nnx.Module) -> nnx.Module:
    """Replaces, in place, every `CompressedLinear` (except FP8 ones, whose product is FP8) by an
    ``nnx.Linear`` holding its decompressed weight; returns ``model``. Call it once on a served model
    (e.g. inside a jitted generation function, before its decoding loop) so the weights are
    decompressed once, not on every call; the outputs are the same, bit for bit.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sste_jax import nnx as sparse_nnx
    >>> model = sparse_nnx.compress_layers(nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0))))
    >>> x = jnp.ones((2, 8))
    >>> y = model(x)
    >>> served = sparse_nnx.decompress_layers(model)
    >>> type(served.layers[0]).__name__, bool(jnp.array_equal(served(x), y))
    ('Linear', True)
    """
    for path, node in list(nnx.iter_graph(model)):
        if isinstance(node, CompressedLinear) and not node.fp8:
            set_child(model, path, linear_like(node, node.forward_weight()))
    return model


def to_backend(model: nnx.Module, backend: str) -> nnx.Module:
    """Replaces, in place, every `CompressedLinear` of a served model (e.g. from `import_weights`) by a layer
    for ``backend`` (one of `BACKENDS`); returns ``model``.

    ``"xla"``: an ``nnx.Linear`` holding the decompressed weight, decompressed here once (a
    `CompressedLinear` keeps half the bytes and decompresses in every call), the same outputs
    (`decompress_layers`, refusing FP8 layers, which an ``nnx.Linear`` cannot compute).
    ``"cusparselt"`` / ``"cusparselt-fp8"``: a `CusparseltLinear` holding the weight compressed once by
    cuSPARSELt in bfloat16 / FP8 e4m3 (NVIDIA GPU only: raises `RuntimeError` elsewhere).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sste_jax import nnx as sparse_nnx
    >>> model = nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0)))
    >>> served = sparse_nnx.compress_layers(model)
    >>> x, y = jnp.ones((2, 8)), served(jnp.ones((2, 8)))
    >>> plain = sparse_nnx.to_backend(served, "xla")
    >>> type(plain.layers[0]).__name__, bool(jnp.array_equal(plain(x), y))
    ('Linear', True)
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: use one of {BACKENDS}")
    if backend != "xla":
        _check_gpu(f"backend={backend!r}")
    layers = [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, CompressedLinear)]
    for path, layer in layers:
        name = path_str(path)
        if backend == "xla":
            if layer.fp8:
                raise ValueError(f"{name}: the layer computes FP8 products, which an nnx.Linear does not; keep it")
            new = linear_like(layer, layer.forward_weight())
        else:
            bias = layer.bias[...] if layer.bias is not None else None
            new = CusparseltLinear.from_weight(
                layer.forward_weight(), bias, fp8=backend == "cusparselt-fp8", dtype=layer.dtype, name=name
            )
        set_child(model, path, new)
    return model


def import_weights(model: nnx.Module, weights: Mapping[str, Any], *, sparse: Iterable[str] = ()) -> nnx.Module:
    """Puts ``weights`` (``{path: array}``, e.g. from `sste_jax.serving.load_safetensors`) into ``model`` in
    place; returns it.

    ``model`` is a freshly built model of the same architecture (dense or sparsified, any weights).
    The layer of each ``sparse`` kernel becomes a `CompressedLinear` holding that 2:4 weight compressed
    (decompressed once per call: its output equals the exported model's); every other path must be an
    ``nnx.Param`` of ``model`` of the same shape (raises naming each mismatch).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sste_jax import nnx as sparse_nnx, serving
    >>> model = nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0)))
    >>> weights, sparse = serving.inference_weights(model)
    >>> served = sparse_nnx.import_weights(nnx.Sequential(nnx.Linear(8, 4, rngs=nnx.Rngs(1))), weights, sparse=sparse)
    >>> x = jnp.ones((2, 8))
    >>> type(served.layers[0]).__name__, bool(jnp.array_equal(served(x), model(x)))
    ('CompressedLinear', True)
    """
    sparse = set(sparse)
    params = {path_str(path): v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    layers = {path_str(path): (path, node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}
    problems = []
    for path, array in weights.items():
        if path in sparse:
            layer = layers.get(path.removesuffix("/kernel"))
            if not path.endswith("/kernel") or layer is None or not isinstance(layer[1], nnx.Linear):
                problems.append(f"{path}: not the kernel of an nnx.Linear layer of the model")
            elif tuple(layer[1].kernel.shape) != np.shape(array):
                problems.append(f"{path}: shape {np.shape(array)} in the weights, {layer[1].kernel.shape} in the model")
        elif path not in params:
            problems.append(f"{path}: not a parameter of the model")
        elif tuple(params[path].shape) != np.shape(array):
            problems.append(f"{path}: shape {np.shape(array)} in the weights, {params[path].shape} in the model")
    absent = sorted(p for p in params if p not in weights)
    problems += [f"{p}: a parameter of the model with no weight" for p in absent]
    if problems:
        raise ValueError("the weights do not fit the model:\n  " + "\n  ".join(problems[:12]))
    for path, array in weights.items():
        if path in sparse:
            layer_path, layer = layers[path.removesuffix("/kernel")]
            bias = jnp.asarray(weights[f"{path[: -len('kernel')]}bias"]) if layer.bias is not None else None
            fp8 = bool(getattr(getattr(layer, "config", None), "fp8", False))
            new = CompressedLinear(
                *compress_24(jnp.asarray(array)), bias, fp8=fp8, dtype=layer.dtype, promote_dtype=layer.promote_dtype
            )
            set_child(model, layer_path, new)
        elif not any(path == f"{s[: -len('kernel')]}bias" for s in sparse):
            params[path][...] = jnp.asarray(array, params[path].dtype)
    return model


def _compressed_layers(model: nnx.Module) -> dict[str, CompressedLinear]:
    return {path_str(path): node for path, node in nnx.iter_graph(model) if isinstance(node, CompressedLinear)}


def export_compressed(directory: str | os.PathLike, model: nnx.Module) -> pathlib.Path:
    """Saves an inference copy of ``model`` (2:4 layers compressed by `compress_layers`) with orbax
    (`sste_jax.checkpoint.save_export`); returns ``directory``.

    ``directory`` must not exist (nothing is overwritten); ``model`` itself is left unchanged. The
    export is written to a temporary sibling folder and renamed into place, with each array's
    checksum and each compressed layer's ``fp8`` setting (in ``sste_export.json``). Load it with
    `load_compressed`. A failed write raises `sste_jax.checkpoint.CheckpointWriteError` and leaves nothing
    behind.

    >>> import tempfile
    >>> from flax import nnx
    >>> from sste_jax import nnx as sparse_nnx
    >>> model = nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0)))
    >>> path = sparse_nnx.export_compressed(tempfile.mkdtemp() + "/export", model)
    >>> path.name
    'export'
    """
    from sste_jax import checkpoint

    compressed = compress_layers(nnx.clone(model))
    layers = {name: {"fp8": bool(layer.fp8)} for name, layer in _compressed_layers(compressed).items()}
    return checkpoint.save_export(directory, nnx.state(compressed), {"layers": layers})


def load_compressed(directory: str | os.PathLike, model: nnx.Module) -> nnx.Module:
    """Loads an `export_compressed` directory into ``model``, a freshly built model sparsified with
    the same configs (any weights): its sparse layers become `CompressedLinear`; returns it.

    Each layer takes the exported ``fp8`` setting. Everything is read and verified (checksums,
    metadata bytes) on a copy first: on any error ``model`` is left exactly as it was.

    >>> import tempfile, jax.numpy as jnp
    >>> from flax import nnx
    >>> from sste_jax import nnx as sparse_nnx
    >>> model = nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0)))
    >>> path = sparse_nnx.export_compressed(tempfile.mkdtemp() + "/export", model)
    >>> served = sparse_nnx.load_compressed(path, nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(1))))
    >>> x = jnp.ones((2, 8))
    >>> bool(jnp.array_equal(served(x), model(x)))
    True
    """
    from sste_jax import checkpoint

    directory = pathlib.Path(directory).absolute()
    target = compress_layers(nnx.clone(model))
    state, info = checkpoint.restore_export(directory, nnx.state(target))
    names = set(_compressed_layers(target))
    settings = info.get("layers")
    if not isinstance(settings, dict) or set(settings) != names or \
            not all(isinstance(v, dict) and isinstance(v.get("fp8"), bool) for v in settings.values()):
        raise checkpoint.CheckpointError(
            f"exported model {directory}: {directory / 'sste_export.json'} is malformed (it needs the fp8 setting "
            f"of each compressed layer, {sorted(names)[:8]})"
        )
    nnx.update(target, state)
    for name, layer in _compressed_layers(target).items():
        if not bool(jnp.all(valid_meta(layer.meta[...]))):
            raise checkpoint.CheckpointError(
                f"exported model {directory}: {name}/meta holds bytes compress_24 never writes"
            )
    compress_layers(model)
    nnx.update(model, state)
    for name, layer in _compressed_layers(model).items():
        layer.fp8 = settings[name]["fp8"]
    return model
