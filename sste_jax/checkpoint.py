"""Orbax checkpoints of any training-state pytree, and the 2:4-compressed export of a trained model.

A training state is any pytree: ``nnx.state(model)`` (β included), ``nnx.state(optimizer)``, the
step, a typed PRNG key (stored as its key data), a `FlipState`. Saves are atomic (orbax writes a
temporary directory and renames it) and never replace an existing step; a missing, truncated or
mismatched checkpoint raises `FileNotFoundError` / `CheckpointError` naming the path and what is
wrong, and is never written to.

>>> import tempfile, jax, jax.numpy as jnp
>>> from sste_jax import checkpoint
>>> state = {"step": jnp.int32(3), "key": jax.random.key(0)}
>>> d = tempfile.mkdtemp()
>>> _ = checkpoint.save_checkpoint(d, 3, state)
>>> restored = checkpoint.restore_checkpoint(d, state)
>>> int(restored["step"]), bool(jnp.all(jax.random.key_data(restored["key"]) == jax.random.key_data(state["key"])))
(3, True)
"""

import gc
import os
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype
from jaxtyping import Array, Float, Shaped, UInt8

from sste_jax._linear import SparsityConfig, forward_weight, sparse_dense
from sste_jax._metrics import sparse_modules
from sste_jax._optim import key_name
from sste_jax._sparsity import compress_24, decompress_24

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "restore_checkpoint",
    "checkpoint_steps",
    "Packed24",
    "CompressedLinear",
    "compress_layers",
    "densify_layers",
    "export_compressed",
    "load_compressed",
]


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored: truncated, corrupt, or not matching the target."""


def _path_name(path: tuple) -> str:
    """``"a/0/b"`` for a key path; an NNX Variable's own ``.value`` step is left out."""
    return "/".join(str(key_name(k)) for k in path if k != jax.tree_util.GetAttrKey("value"))


def _is_prng_key(leaf) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _as_array(leaf) -> jax.Array | np.ndarray:
    """What is stored for a leaf: key data for typed keys, an array for Python scalars."""
    if _is_prng_key(leaf):
        return jax.random.key_data(leaf)
    return leaf if isinstance(leaf, jax.Array | np.ndarray) else jnp.asarray(leaf)


def _from_array(value, like):
    """Inverse of `_as_array`, shaped after the target leaf ``like``."""
    if _is_prng_key(like):
        return jax.random.wrap_key_data(value, impl=jax.random.key_impl(like))
    if isinstance(like, np.ndarray):
        return np.asarray(value)
    if isinstance(like, bool | int | float):
        return type(like)(value.item())
    return value


def _flatten(tree) -> tuple[dict[str, Any], list, Any]:
    """``({"a/b/c": stored array}, original leaves, treedef)`` of a pytree."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = {_path_name(path): _as_array(leaf) for path, leaf in leaves}
    if len(flat) != len(leaves):
        raise ValueError("two leaves of the state have the same path name; checkpoints need unique names")
    return flat, [leaf for _, leaf in leaves], treedef


def _nest(flat: dict[str, Any]) -> dict:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}`` (orbax stores nested dicts as named arrays)."""
    out: dict = {}
    for name, leaf in flat.items():
        *parents, last = name.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def _unnest(tree, prefix="") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        out.update(_unnest(v, name + "/") if isinstance(v, dict) else {name: v})
    return out


def _abstract(leaf) -> jax.ShapeDtypeStruct:
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0].split(' See full')[0][:300] if text else ''}"


def _manager(directory: pathlib.Path, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
    )
    return ocp.CheckpointManager(directory, options=options, item_handlers=ocp.StandardCheckpointHandler())


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The steps with a finished checkpoint under ``directory`` (``[]`` if there is none)."""
    directory = pathlib.Path(directory).absolute()
    if not directory.is_dir():
        return []
    return sorted(_manager(directory).all_steps())


def save_checkpoint(
    directory: str | os.PathLike, step: int, state: Any, *, max_to_keep: int | None = None
) -> pathlib.Path:
    """Saves ``state`` as ``directory/<step>``, atomically; returns that path.

    Raises `FileExistsError` if ``step`` is not newer than every checkpoint already there (nothing
    is overwritten). ``max_to_keep`` deletes the oldest checkpoints beyond that count. Leaves are
    stored by path name (``"model/blocks/0/fc1/kernel"``); Python scalars as JAX (32-bit) arrays.
    """
    directory = pathlib.Path(directory).absolute()
    if int(step) != step or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    step = int(step)
    manager = _manager(directory, max_to_keep)
    steps = manager.all_steps()
    if steps and step <= max(steps):
        raise FileExistsError(
            f"cannot save step {step} in {directory}: it already holds step(s) up to {max(steps)}; "
            "checkpoints are never overwritten"
        )
    flat, _, _ = _flatten(state)
    if not manager.save(step, args=ocp.args.StandardSave(_nest(flat))):
        raise CheckpointError(f"orbax declined to save step {step} in {directory}")
    manager.wait_until_finished()
    manager.close()
    return directory / str(step)


def _verify_store(path: pathlib.Path, store: pathlib.Path) -> None:
    """Reads every stored value of an OCDBT array store, so truncation fails here, by key, not in orbax."""
    if not (store / "manifest.ocdbt").is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {store / 'manifest.ocdbt'} is missing")
    key = None
    try:
        kvstore = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{store}/"}).result()
        for key in kvstore.list().result():
            kvstore.read(key).result()
    except Exception as e:
        where = f"reading {key.decode()!r} failed" if key is not None else "its index is unreadable"
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {where} ({_first_line(e)})") from None


def _quietly(path: pathlib.Path, what: str, read):
    """``read()``, turning a failure into `CheckpointError` (``what`` says which read failed).

    When one array read fails, orbax abandons the coroutines of the others; they are finalised here
    (their "exception ignored" reports muted) instead of surfacing later as unrelated warnings.
    """
    hook, sys.unraisablehook = sys.unraisablehook, lambda _: None
    try:
        try:
            return read()
        except Exception as e:
            message = f"checkpoint {path} is truncated or corrupt: {what} failed ({_first_line(e)})"
        gc.collect()
    finally:
        sys.unraisablehook = hook
    raise CheckpointError(message)


def _restore_from(path: pathlib.Path, store: pathlib.Path, read_metadata, read, target: Any) -> Any:
    """Shared by `restore_checkpoint` and `load_compressed`: checks the stored bytes, then names,
    shapes and dtypes against ``target``, then reads."""
    flat, like, treedef = _flatten(target)
    _verify_store(path, store)
    metadata = _quietly(path, "reading its metadata", read_metadata)
    if getattr(metadata, "tree", None) is None:
        raise CheckpointError(f"checkpoint {path} is incomplete: its array metadata (_METADATA) is missing")
    stored = _unnest(metadata.tree)
    missing = [n for n in flat if n not in stored]
    extra = [n for n in stored if n not in flat]
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not match the target: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''}"
        )
    abstract = {n: _abstract(leaf) for n, leaf in flat.items()}
    for n, a in abstract.items():
        shape, dtype = tuple(stored[n].shape), np.dtype(stored[n].dtype)
        if shape != a.shape or dtype != a.dtype:
            raise CheckpointError(
                f"checkpoint {path}: {n!r} is stored as {dtype}{list(shape)} "
                f"but the target is {a.dtype}{list(a.shape)}"
            )
    restored = _unnest(_quietly(path, "reading the arrays", lambda: read(_nest(abstract))))
    leaves = [_from_array(restored[n], leaf) for n, leaf in zip(flat, like)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def restore_checkpoint(directory: str | os.PathLike, target: Any, step: int | None = None) -> Any:
    """Restores the checkpoint of ``step`` (default: the latest) with the structure of ``target``.

    ``target`` is a state of the right structure, e.g. freshly built; its arrays' shardings are
    used for the restored arrays. Raises `FileNotFoundError` when there is no such checkpoint and
    `CheckpointError` when it is truncated, corrupt or does not match ``target``.
    """
    directory = pathlib.Path(directory).absolute()
    steps = checkpoint_steps(directory)
    if not steps:
        raise FileNotFoundError(f"no checkpoint found in {directory}")
    step = max(steps) if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; it holds steps {steps}")
    manager = _manager(directory)
    try:
        return _restore_from(
            directory / str(step),
            directory / str(step) / "default",
            lambda: manager.item_metadata(step),
            lambda abstract: manager.restore(step, args=ocp.args.StandardRestore(abstract)),
            target,
        )
    finally:
        manager.close()


class Packed24(nnx.Variable):
    """2:4-compressed weight data of a `CompressedLinear` (kept values or uint8 metadata); not a Param."""


class CompressedLinear(nnx.Module):
    """Inference layer holding ``W̃`` as `compress_24` values + metadata: half the weight bytes, plus
    one uint8 per group of 4. Its output equals the sparse layer's bit for bit (same product, same
    forward weight after `decompress_24`)."""

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
        self.values = Packed24(values)
        self.meta = Packed24(meta)
        self.bias = nnx.Param(bias) if bias is not None else None
        self.fp8, self.dtype, self.promote_dtype = fp8, dtype, promote_dtype

    def __call__(self, x: Float[Array, "*batch in"]) -> Float[Array, "*batch out"]:
        kernel = decompress_24(self.values[...], self.meta[...])
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        y = sparse_dense(x, kernel, 1.0, config=SparsityConfig(method="dense", fp8=self.fp8))
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent = model
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def _bias(layer) -> jax.Array | None:
    return layer.bias[...] if getattr(layer, "bias", None) is not None else None


def _dense_linear(layer, kernel: jax.Array) -> nnx.Linear:
    """An ``nnx.Linear`` like ``layer`` (same dtypes, precision, bias) holding ``kernel``."""
    linear = nnx.Linear(
        layer.in_features,
        layer.out_features,
        use_bias=layer.bias is not None,
        dtype=layer.dtype,
        param_dtype=layer.param_dtype,
        precision=layer.precision,
        promote_dtype=layer.promote_dtype,
        rngs=nnx.Rngs(0),
    )
    linear.kernel[...] = kernel
    if layer.bias is not None:
        linear.bias[...] = layer.bias[...]
    return linear


def densify_layers(model: nnx.Module) -> nnx.Module:
    """Replaces, in place, every sparse layer by an ``nnx.Linear`` whose kernel is its ``W̃`` (β·S(W)
    baked in); returns ``model``. The result needs nothing from sste_jax to run."""
    for path, layer in sparse_modules(model):
        w_tilde = forward_weight(layer.kernel[...], layer.beta[...], layer.config)
        _replace(model, path, _dense_linear(layer, w_tilde))
    return model


def compress_layers(model: nnx.Module) -> nnx.Module:
    """Replaces, in place, every 2:4 layer by a `CompressedLinear` of its ``W̃`` (layers with
    ``method="dense"`` by an ``nnx.Linear``); returns ``model``."""
    for path, layer in sparse_modules(model):
        w_tilde = forward_weight(layer.kernel[...], layer.beta[...], layer.config)
        if layer.config.sparse:
            new = CompressedLinear(
                *compress_24(w_tilde),
                _bias(layer),
                fp8=layer.config.fp8,
                dtype=layer.dtype,
                promote_dtype=layer.promote_dtype,
            )
        else:
            new = _dense_linear(layer, w_tilde)
        _replace(model, path, new)
    return model


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def export_compressed(directory: str | os.PathLike, model: nnx.Module) -> pathlib.Path:
    """Saves an inference copy of ``model`` (2:4 layers compressed by `compress_layers`) with orbax.

    ``directory`` must not exist (nothing is overwritten); ``model`` itself is left unchanged.
    Load it with `load_compressed`.
    """
    directory = pathlib.Path(directory).absolute()
    if directory.exists():
        raise FileExistsError(f"cannot export to {directory}: it already exists")
    flat, _, _ = _flatten(nnx.state(compress_layers(nnx.clone(model))))
    _checkpointer().save(directory, args=ocp.args.StandardSave(_nest(flat)))
    return directory


def load_compressed(directory: str | os.PathLike, model: nnx.Module) -> nnx.Module:
    """Loads an `export_compressed` directory into ``model``, a freshly built model sparsified with
    the same configs (any weights): its sparse layers become `CompressedLinear`; returns it."""
    directory = pathlib.Path(directory).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"no exported model at {directory}")
    compress_layers(model)
    checkpointer = _checkpointer()
    state = _restore_from(
        directory,
        directory,
        lambda: checkpointer.metadata(directory).item_metadata,
        lambda abstract: checkpointer.restore(directory, args=ocp.args.StandardRestore(abstract)),
        nnx.state(model),
    )
    nnx.update(model, state)
    return model
