"""Orbax checkpoints of any training-state pytree, and exports of inference weights; no framework imported.

A training state is any pytree: ``nnx.state(model)`` (β included), ``nnx.state(optimizer)``, the
step, a typed PRNG key (stored as its key data), a `FlipState`. Saves are atomic (orbax writes a
temporary directory and renames it) and never replace an existing step; every array's checksum
(see `fingerprint`) is stored with it and checked at restore. Arrays sharded over several
processes are saved by every process together (each writes its shards, as orbax does) and may be
restored on another process count or sharding: the checksum does not depend on the layout. A
missing, truncated, corrupt or mismatched checkpoint raises `FileNotFoundError` / `CheckpointError`
naming the path and what is wrong, and is never written to; `restore_latest` falls back to the
newest checkpoint that verifies. A failed write
(e.g. a full disk) raises `CheckpointWriteError` (an ``OSError``) and leaves no partial folder.
Each checkpoint also records its sparse weights (the `SparseSpec` of every β); restoring into a target
whose sparse weights differ raises `CheckpointConfigError`.
A training loop keeps one `Checkpointer` (one orbax manager, saves written in the background);
`save_checkpoint`, `restore_checkpoint` and `restore_latest` are one synchronous call each.
`save_export` and `restore_export` write and read one folder of inference weights with the same checks
(`sste_jax.nnx.export_compressed` uses them). A folder without the checksum record this module writes
is refused, naming the file.

>>> import tempfile, jax, jax.numpy as jnp
>>> from sste_jax import checkpoint
>>> state = {"step": jnp.int32(3), "key": jax.random.key(0)}
>>> d = tempfile.mkdtemp()
>>> _ = checkpoint.save_checkpoint(d, 3, state)
>>> restored = checkpoint.restore_checkpoint(d, state)
>>> int(restored["step"]), bool(jnp.all(jax.random.key_data(restored["key"]) == jax.random.key_data(state["key"])))
(3, True)
"""

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import re
import shutil
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sste_jax import _fingerprint
from sste_jax._event_loops import settling_loops
from sste_jax._fingerprint import fingerprint
from sste_jax._layout import SparseSpec, SparsityBeta
from sste_jax._optim import key_name

__all__ = [
    "Checkpointer",
    "CheckpointError",
    "CheckpointWriteError",
    "CheckpointConfigError",
    "save_checkpoint",
    "restore_checkpoint",
    "restore_latest",
    "checkpoint_steps",
    "save_export",
    "restore_export",
    "fingerprint",
]


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored: truncated, corrupt, or not matching the target.

    >>> import tempfile, jax.numpy as jnp
    >>> from sste_jax import checkpoint
    >>> d = tempfile.mkdtemp()
    >>> _ = checkpoint.save_checkpoint(d, 1, {"w": jnp.ones(3)})
    >>> try:
    ...     checkpoint.restore_checkpoint(d, {"w": jnp.ones(4)})
    ... except checkpoint.CheckpointError as e:
    ...     print("refused")
    refused
    """


class CheckpointConfigError(CheckpointError):
    """The checkpoint's sparse layers (which layers, their method and settings) differ from the target's.

    >>> import tempfile, jax.numpy as jnp
    >>> from flax import nnx
    >>> from sste_jax import checkpoint, nnx as sparse_nnx
    >>> model = nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0)))
    >>> d = tempfile.mkdtemp()
    >>> _ = checkpoint.save_checkpoint(d, 1, nnx.state(model))
    >>> dense = nnx.Sequential(nnx.Linear(8, 4, rngs=nnx.Rngs(0)))
    >>> try:
    ...     checkpoint.restore_checkpoint(d, nnx.state(dense))
    ... except checkpoint.CheckpointConfigError as e:
    ...     print("layers differ")
    layers differ
    """


class CheckpointWriteError(OSError):
    """Writing a checkpoint or export failed (e.g. the disk is full); its partial folder was removed.

    >>> from sste_jax import checkpoint
    >>> issubclass(checkpoint.CheckpointWriteError, OSError)
    True
    """


_CHECKSUMS = "sste_checksums"  # the orbax item (a JSON file) holding each array's checksum
_CHECKSUM_FILE = "checksums.json"
_EXPORT_FILE = "sste_export.json"  # an export's checksums and per-layer settings
_DELETING = ".sste-deleting-"  # a step being rotated away is renamed to this prefix first


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


def _check_narrowing(name: str, leaf) -> None:
    """Raises if a 64-bit host leaf would lose range when stored as 32-bit (JAX without x64)."""
    if jax.config.jax_enable_x64 or _is_prng_key(leaf) or isinstance(leaf, jax.Array):
        return
    if isinstance(leaf, bool):
        return
    if isinstance(leaf, int):
        if not -(2**31) <= leaf < 2**31:
            raise ValueError(
                f"state leaf {name!r} = {leaf} does not fit the int32 it would be stored as; "
                "store it as a string or split it, or enable jax_enable_x64"
            )
        return
    a = np.asarray(leaf) if isinstance(leaf, np.ndarray | np.generic | float) else None
    if a is None or a.dtype.itemsize != 8:
        return
    if a.dtype.kind == "f":
        with np.errstate(over="ignore", under="ignore"):
            narrow = a.astype(np.float32)
        lost = (np.isfinite(a) & ~np.isfinite(narrow)) | ((a != 0) & (narrow == 0))
    elif a.dtype.kind in "iu":
        info = np.iinfo(np.int32 if a.dtype.kind == "i" else np.uint32)
        lost = (a < info.min) | (a > info.max)
    else:
        return
    if np.any(lost):
        first = a.reshape(-1)[np.argmax(lost.reshape(-1))]
        raise ValueError(
            f"state leaf {name!r} ({a.dtype}{list(a.shape)}) would be stored as 32-bit and lose "
            f"{int(np.sum(lost))} value(s), e.g. {first!r}; convert it yourself or enable jax_enable_x64"
        )


def _record(flat: dict[str, Any]) -> dict:
    """``{"algorithm": "fingerprint64", "layout": {name: [dtype, shape]}}`` of the stored arrays; their
    checksums go under ``"arrays"``. The layout lets a restore check the target without reading
    orbax's metadata."""
    layout = {n: [str(a.dtype), list(a.shape)] for n, a in ((n, _abstract(a)) for n, a in flat.items())}
    return {"algorithm": "fingerprint64", "layout": layout}


class _ChecksumHandler(ocp.JsonCheckpointHandler):
    """Writes a checkpoint's checksum record, fetching its checksums (dispatched by `Checkpointer.save`)
    in the background with the arrays' write, so that `save` does not wait for them."""

    async def async_save(self, directory, item=None, args=None):
        async def write():
            record = {**args.record, "arrays": _fingerprint.to_hex(args.sums.result())}
            if jax.process_index() == 0:
                (directory / _CHECKSUM_FILE).write_text(json.dumps(record))

        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="sste_checksums")]


@ocp.args.register_with_handler(_ChecksumHandler, for_save=True)
@dataclasses.dataclass
class _ChecksumSave(ocp.args.CheckpointArgs):
    record: dict
    sums: concurrent.futures.Future  # of the dispatched `_fingerprint.start_fingerprints`


@ocp.args.register_with_handler(_ChecksumHandler, for_restore=True)
@dataclasses.dataclass
class _ChecksumRestore(ocp.args.CheckpointArgs):
    """Unused (restores read the record with `_read_record`); orbax wants a handler's restore arguments."""


def _verify_checksums(path: pathlib.Path, record: dict, restored: dict[str, Any]) -> None:
    """Raises `CheckpointError` naming the first array whose values do not match its stored checksum."""
    wanted = {n: v for n, v in record["arrays"].items() if n in restored}
    found = fingerprint({n: restored[n] for n in wanted})
    for name, want in wanted.items():
        if found[name] != want:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: array {name!r} does not match its stored checksum "
                f"(fingerprint64 {found[name]}, stored {want})"
            )


_LAYERS = "sparse_layers"  # the key, in the checksum item, of the sparse-layer record


def _spec(leaf) -> SparseSpec | None:
    """The `SparseSpec` a β carries: an NNX `SparsityBeta` variable's metadata or a `SparsityBeta` box's."""
    if isinstance(leaf, SparsityBeta):
        return leaf.spec
    if hasattr(type(leaf), "get_metadata") and hasattr(leaf, "get_value"):  # an nnx.Variable
        spec = leaf.get_metadata().get("spec")
        return spec if isinstance(spec, SparseSpec) else None
    return None


def _sparse_layers(tree) -> dict[str, dict]:
    """``{β path: what its weight trains}`` of every β in ``tree`` (`_spec`): the `SparsityConfig` as a dict,
    the grouped axis and the layout (as JSON gives them back)."""
    layers = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: _spec(x) is not None)[0]:
        spec = _spec(leaf)
        if spec is not None:
            record = {"config": dataclasses.asdict(spec.config), "axis": spec.axis, "layout": spec.layout}
            layers[_path_name(path)] = json.loads(json.dumps(record))
    return layers


def _compared(record: dict) -> dict:
    """The fields of a β's record that define training: the weight's layout and grouped axis, and of its config
    ``method``, ``mvue``, ``fp8``, ``n``, ``m``, ``group_axis`` and the decay its method uses. ``backend`` and
    ``matmul`` (how the same product is computed) may change."""
    config = record.get("config", {})
    fields = ["method", "mvue", "fp8", "n", "m", "group_axis"]
    fields += {"srste": ["srste_decay"], "tsrste": ["masked_decay"]}.get(config.get("method"), [])
    return {"axis": record.get("axis"), "layout": record.get("layout"), **{f: config[f] for f in fields if f in config}}


def _check_layers(path: pathlib.Path, record: dict, target: Any) -> None:
    """Raises `CheckpointConfigError` naming each β whose presence or compared fields differ between the
    checkpoint's ``record`` and ``target``."""
    stored, wanted = record[_LAYERS], _sparse_layers(target)
    problems = []
    for name in sorted(set(stored) | set(wanted)):
        if (name in stored) != (name in wanted):
            where = "the checkpoint" if name in stored else "the target"
            problems.append(f"{name}: a sparse weight's β only in {where}")
            continue
        a, b = _compared(stored[name]), _compared(wanted[name])
        diff = [f"{f}={a.get(f)!r} in the checkpoint, {b.get(f)!r} in the target"
                for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
        if diff:
            problems.append(f"{name}: " + ", ".join(diff))
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise CheckpointConfigError(
            f"checkpoint {path} was saved from differently sparsified weights than the target's:\n  "
            + "\n  ".join(shown)
            + "\nBuild the target with the checkpoint's configs (or pass check_layers=False to restore anyway)"
        )


def _read_record(path: pathlib.Path, file: pathlib.Path) -> dict:
    """The checkpoint's checksum record in ``file``, checked whole (`_check_record`)."""
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no checksum file {file}: it was not written by "
                              "sste_jax.checkpoint, which refuses it")
    return _check_record(path, file, _read_json(path, file), layers=True)


def _check_record(path: pathlib.Path, file: pathlib.Path, record: Any, layers: bool) -> dict:
    """``record`` if it holds fingerprint64 checksums, the layout and (``layers``) the sparse-layer record;
    else raises `CheckpointError` naming ``file`` and what it lacks."""
    problem = None
    if not isinstance(record, dict) or record.get("algorithm") != "fingerprint64":
        problem = "no fingerprint64 checksums"
    elif not isinstance(record.get("arrays"), dict):
        problem = "no checksum per array"
    elif not isinstance(record.get("layout"), dict):
        problem = "no dtype and shape per array"
    elif layers and not isinstance(record.get(_LAYERS), dict):
        problem = "no sparse-layer record"
    elif layers and not all(isinstance(v, dict) for v in record[_LAYERS].values()):
        problem = "a sparse-layer record that is not one dict per β"
    if problem:
        raise CheckpointError(f"{path}: its checksum file {file} is malformed ({problem})")
    return record


def _read_json(path: pathlib.Path, file: pathlib.Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {file} is unreadable ({_first_line(e)})") from None


def _flatten(tree) -> tuple[dict[str, Any], list, Any]:
    """``({"a/b/c": stored array}, original leaves, treedef)`` of a pytree."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in leaves:
        _check_narrowing(_path_name(path), leaf)
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


def _manager(directory: pathlib.Path, async_save: bool, compress: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save, create=True)
    handlers = {
        "default": ocp.PyTreeCheckpointHandler(use_compression=compress),
        _CHECKSUMS: _ChecksumHandler(filename=_CHECKSUM_FILE),
    }
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _step_problem(step_dir: pathlib.Path) -> str | None:
    """Why a committed step folder is not intact (a file of its layout is missing), or None.

    Cheap: checks that the files orbax and this module write are present, without reading arrays.
    """
    meta = step_dir / "_CHECKPOINT_METADATA"
    try:
        items = json.loads(meta.read_text()).get("item_handlers") or {"default": None}
    except (OSError, ValueError):
        return f"{meta} is missing or unreadable"
    items = items if isinstance(items, dict) else {"default": items}
    required = []
    if "default" in items:
        store = step_dir / "default"
        processes = sorted(store.glob("ocdbt.process_*"))
        required += [store / "_METADATA", store / "manifest.ocdbt"] + [p / "manifest.ocdbt" for p in processes]
        if not processes:
            required.append(store / "ocdbt.process_0")
    if _CHECKSUMS in items:
        required.append(step_dir / _CHECKSUMS / _CHECKSUM_FILE)
    missing = [str(f.relative_to(step_dir)) for f in required if not f.exists()]
    return f"{', '.join(missing)} missing (a half-written or half-deleted step)" if missing else None


def _all_steps(directory: pathlib.Path) -> list[int]:
    """Every committed step folder under ``directory``, intact or not."""
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The steps with a committed, intact checkpoint under ``directory`` (``[]`` if there is none).

    A step missing any file of its layout (e.g. left half-deleted by an interrupted rotation) is
    not listed; the arrays' bytes are verified by `restore_checkpoint`.

    >>> import tempfile, jax.numpy as jnp
    >>> from sste_jax import checkpoint
    >>> d = tempfile.mkdtemp()
    >>> for step in (10, 20):
    ...     _ = checkpoint.save_checkpoint(d, step, {"w": jnp.ones(3)})
    >>> checkpoint.checkpoint_steps(d)
    [10, 20]
    """
    directory = pathlib.Path(directory).absolute()
    if not directory.is_dir():
        return []
    return [s for s in _all_steps(directory) if _step_problem(directory / str(s)) is None]


def _is_write_failure(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return True
    text = str(e)
    return any(s in text for s in ("rrno", "No space left", "File too large", "Disk quota", "RESOURCE_EXHAUSTED"))


def _write_failed(e: Exception, what: str, partial: list[pathlib.Path]) -> None:
    """Removes the ``partial`` folders of a failed write (process 0); raises `CheckpointWriteError` for
    I/O failures."""
    for p in partial if jax.process_index() == 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    if _is_write_failure(e):
        errno = getattr(e, "errno", None)
        if errno is None:
            found = re.search(r"os_error_code='(\d+)'|\[Errno (\d+)\]", str(e))
            errno = int(found.group(1) or found.group(2)) if found else None
        message = f"{what} failed, partial files removed: {_first_line(e)}"
        raise (CheckpointWriteError(errno, message) if errno else CheckpointWriteError(message)) from e
    raise e


def _sync(name: str) -> None:
    """Waits for every process (a no-op for one): folders change only on process 0, between barriers."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _rotate(directory: pathlib.Path, max_to_keep: int) -> None:
    """Deletes the oldest steps beyond ``max_to_keep``: each is first renamed away (atomic), so an
    interrupted deletion never leaves a half-deleted step that looks like a checkpoint."""
    for old in _all_steps(directory)[:-max_to_keep]:
        doomed = directory / f"{_DELETING}{old}"
        os.rename(directory / str(old), doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    for leftover in directory.glob(f"{_DELETING}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def save_checkpoint(
    directory: str | os.PathLike, step: int, state: Any, *, max_to_keep: int | None = None, compress: bool = False
) -> pathlib.Path:
    """Saves ``state`` as ``directory/<step>``, atomically, with a checksum per array (`fingerprint`);
    returns that path.

    Raises `FileExistsError` if ``step`` is not newer than every checkpoint already there (nothing
    is overwritten). ``max_to_keep`` deletes the oldest checkpoints beyond that count. ``compress``
    zstd-compresses the arrays (orbax's default; off here: training states are mostly random mantissa
    bits, so it saves little space and slows saving and restoring). Leaves are
    stored by path name (``"model/blocks/0/fc1/kernel"``); Python scalars as JAX (32-bit) arrays,
    and a 64-bit NumPy or Python value that 32 bits cannot hold (1e300, 2**40) raises ValueError
    (unless ``jax_enable_x64``). A failed write raises `CheckpointWriteError` (an ``OSError``)
    after removing its temporary folder. One call, written synchronously: a training loop keeps a
    `Checkpointer` instead.

    The sparse weights are recorded next to the checksums and checked by `restore_checkpoint`: for
    every β in ``state`` (an NNX `sste_jax.nnx.SparsityBeta` variable, or a `SparsityBeta` box of a
    ``"sparsity"`` collection) the config, grouped axis and layout its `SparseSpec` carries. β saved as
    bare arrays (e.g. ``nnx.to_pure_dict``) are not recorded.

    Args:
      directory: the run's checkpoint folder (created if missing).
      step: the step, newer than every step there.
      state: any pytree (see the module docstring).
      max_to_keep: keep at most this many steps (None: all).
      compress: zstd-compress the arrays.

    >>> import tempfile, jax.numpy as jnp
    >>> from sste_jax import checkpoint
    >>> d = tempfile.mkdtemp()
    >>> checkpoint.save_checkpoint(d, 5, {"w": jnp.ones(3), "step": 5}).name
    '5'
    """
    with Checkpointer(directory, max_to_keep=max_to_keep, async_save=False, compress=compress) as checkpointer:
        return checkpointer.save(step, state)


def _quietly(path: pathlib.Path, what: str, read):
    """``read()``, turning a failure into `CheckpointError` (``what`` says which read failed)."""
    try:
        with settling_loops():
            return read()
    except Exception as e:
        message = f"checkpoint {path} is truncated or corrupt: {what} failed ({_first_line(e)})"
    raise CheckpointError(message)


def _stored_layout(path: pathlib.Path, record: dict) -> dict[str, tuple[tuple, np.dtype]]:
    """``{name: (shape, dtype)}`` of the stored arrays, from the checksum record."""
    try:
        return {n: (tuple(shape), np.dtype(dtype)) for n, (dtype, shape) in record["layout"].items()}
    except (AttributeError, TypeError, ValueError):
        raise CheckpointError(f"checkpoint {path}: its checksum file is malformed (layout)") from None


def _restore_from(path: pathlib.Path, store: pathlib.Path, read, target: Any, record: dict) -> Any:
    """Shared by `restore_checkpoint` and `restore_export`: checks the stored bytes, then names, shapes and
    dtypes against ``target`` (from the checksum ``record``), then reads and verifies the arrays."""
    flat, like, treedef = _flatten(target)
    if not (store / "manifest.ocdbt").is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {store / 'manifest.ocdbt'} is missing")
    stored = _stored_layout(path, record)
    missing = [n for n in flat if n not in stored]
    extra = [n for n in stored if n not in flat]
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not match the target: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''}"
        )
    abstract = {n: _abstract(leaf) for n, leaf in flat.items()}
    for n, a in abstract.items():
        shape, dtype = stored[n]
        if shape != a.shape or dtype != a.dtype:
            raise CheckpointError(
                f"checkpoint {path}: {n!r} is stored as {dtype}{list(shape)} "
                f"but the target is {a.dtype}{list(a.shape)}"
            )
    restored = _unnest(_quietly(path, "reading the arrays", lambda: read(_nest(abstract))))
    _verify_checksums(path, record, restored)
    leaves = [_from_array(restored[n], leaf) for n, leaf in zip(flat, like)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _pytree_restore(abstract: dict) -> ocp.args.PyTreeRestore:
    """Restores ``abstract``'s arrays with its shapes, dtypes and shardings."""
    return ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


class Checkpointer:
    """The checkpoints of one run in ``directory``, written and read through one long-lived orbax
    ``CheckpointManager``; saves are asynchronous.

    `save` returns once ``state``'s arrays are copied off their devices (they may then be donated
    or changed) and their checksums dispatched; the checksums are fetched and the step written in
    the background. The next `save`, `restore`, `wait` or `close` (also leaving a ``with`` block)
    waits for it first, and a failed write raises `CheckpointWriteError` there. Otherwise as
    `save_checkpoint`, `restore_checkpoint` and `restore_latest` (which each use one, synchronously,
    for one call): a step is committed atomically and never overwritten, every array is verified
    against its checksum at restore, and ``max_to_keep`` deletes the oldest steps once a newer one
    is committed.
    ``async_save=False`` makes `save` return only once the step is committed; ``compress`` as in
    `save_checkpoint`.

    Args:
      directory: the run's checkpoint folder (created at the first save).
      max_to_keep: keep at most this many steps (None: all).
      async_save: write in the background.
      compress: zstd-compress the arrays.

    >>> import tempfile, jax.numpy as jnp
    >>> from sste_jax import checkpoint
    >>> d = tempfile.mkdtemp()
    >>> with checkpoint.Checkpointer(d, max_to_keep=2) as ckpt:
    ...     for step in (1, 2, 3):
    ...         _ = ckpt.save(step, {"w": jnp.full(3, step)})
    ...     step, state = ckpt.restore_latest({"w": jnp.zeros(3, jnp.int32)})
    >>> checkpoint.checkpoint_steps(d), step, state["w"].tolist()
    ([2, 3], 3, [3, 3, 3])
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = None,
        async_save: bool = True,
        compress: bool = False,
    ):
        if max_to_keep is not None and (int(max_to_keep) != max_to_keep or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be a positive integer or None, got {max_to_keep!r}")
        self.directory = pathlib.Path(directory).absolute()
        self.max_to_keep = None if max_to_keep is None else int(max_to_keep)
        self.async_save = bool(async_save)
        self.compress = bool(compress)
        self._manager: ocp.CheckpointManager | None = None
        self._pending: int | None = None  # the step being written in the background
        self._closed = False

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self, steps: list[int]) -> ocp.CheckpointManager:
        """The orbax manager, created on first use; told of steps that others added or moved away (it may
        still list the older steps that `wait` rotated away: they matter to neither save nor restore)."""
        if self._closed:
            raise RuntimeError(f"the Checkpointer of {self.directory} is closed")
        if self._manager is None:
            self._manager = _manager(self.directory, self.async_save, self.compress)
        else:
            known = set(self._manager.all_steps())
            if not known >= set(steps) or max(known, default=None) != max(steps, default=None):
                self._manager.reload()
        return self._manager

    def _discard(self) -> None:
        """Drops the manager after a failure; the next call starts a fresh one."""
        manager, self._manager = self._manager, None
        if manager is not None:
            try:
                manager.close()
            except Exception:  # noqa: BLE001 - the failure being reported is the one that matters
                pass

    def _failed(self, step: int, e: Exception) -> None:
        self._discard()
        partial = list(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
        if (self.directory / str(step)).exists() and _step_problem(self.directory / str(step)):
            partial.append(self.directory / str(step))
        _write_failed(e, f"saving step {step} in {self.directory}", partial)

    def steps(self) -> list[int]:
        """The committed, intact steps (as `checkpoint_steps`), after waiting for a pending save.

        >>> import tempfile, jax.numpy as jnp
        >>> from sste_jax import checkpoint
        >>> with checkpoint.Checkpointer(tempfile.mkdtemp()) as ckpt:
        ...     _ = ckpt.save(7, {"w": jnp.ones(3)})
        ...     ckpt.steps()
        [7]
        """
        self.wait()
        return checkpoint_steps(self.directory)

    def save(self, step: int, state: Any) -> pathlib.Path:
        """Starts saving ``state`` as ``directory/<step>`` (see `save_checkpoint` for what is stored and
        recorded); returns that path, which exists once the write is committed (`wait`).

        Raises `FileExistsError` if ``step`` is not newer than every step there, pending ones included.

        >>> import tempfile, jax.numpy as jnp
        >>> from sste_jax import checkpoint
        >>> with checkpoint.Checkpointer(tempfile.mkdtemp()) as ckpt:
        ...     path = ckpt.save(5, {"w": jnp.ones(3), "step": 5})
        >>> path.name, path.is_dir()
        ('5', True)
        """
        if int(step) != step or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        step = int(step)
        flat, _, _ = _flatten(state)
        self.wait()
        self.directory.mkdir(parents=True, exist_ok=True)
        steps = _all_steps(self.directory)
        if steps and step <= max(steps):
            raise FileExistsError(
                f"cannot save step {step} in {self.directory}: it already holds step(s) up to {max(steps)}; "
                "checkpoints are never overwritten"
            )
        record, sums = {**_record(flat), _LAYERS: _sparse_layers(state)}, concurrent.futures.Future()
        if not self.async_save:  # orbax writes the record inside its save call
            sums.set_result(_fingerprint.start_fingerprints(flat))
        manager = self._open(steps)
        try:
            args = ocp.args.Composite(
                default=ocp.args.PyTreeSave(_nest(flat)), **{_CHECKSUMS: _ChecksumSave(record, sums)}
            )
            saved = manager.save(step, args=args)
            if self.async_save:  # once orbax has its host copy: the two do not compete for the arrays
                sums.set_result(_fingerprint.start_fingerprints(flat))
            if not saved:
                raise CheckpointError(f"orbax declined to save step {step} in {self.directory}")
        except Exception as e:
            if not sums.done():
                sums.set_exception(e)
            self._failed(step, e)
        self._pending = step
        if not self.async_save:
            self.wait()
        return self.directory / str(step)

    def wait(self) -> None:
        """Waits for the pending save to commit, then applies ``max_to_keep``; raises
        `CheckpointWriteError` (its partial folder removed) if the write failed.

        >>> import tempfile, jax.numpy as jnp
        >>> from sste_jax import checkpoint
        >>> ckpt = checkpoint.Checkpointer(tempfile.mkdtemp())
        >>> path = ckpt.save(1, {"w": jnp.ones(3)})
        >>> ckpt.wait()
        >>> path.is_dir()
        True
        >>> ckpt.close()
        """
        step, self._pending = self._pending, None
        if step is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._failed(step, e)
        if self.max_to_keep is not None:
            if jax.process_index() == 0:
                _rotate(self.directory, self.max_to_keep)
            _sync(f"rotated {self.directory}")

    def close(self) -> None:
        """Waits for the pending save (raising if it failed) and releases the orbax manager.

        >>> import tempfile
        >>> from sste_jax import checkpoint
        >>> ckpt = checkpoint.Checkpointer(tempfile.mkdtemp())
        >>> ckpt.close()
        """
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._manager is not None:
                self._manager.close()
                self._manager = None

    def _restorable_steps(self) -> list[int]:
        """Every committed step folder (intact or not), after waiting for a pending save; raises
        `FileNotFoundError` if there is none."""
        self.wait()
        steps = _all_steps(self.directory) if self.directory.is_dir() else []
        if not steps:
            raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        return steps

    def restore(self, target: Any, step: int | None = None, *, check_layers: bool = True) -> Any:
        """Restores ``step`` (default: the latest) with the structure of ``target``; as `restore_checkpoint`.

        >>> import tempfile, jax.numpy as jnp
        >>> from sste_jax import checkpoint
        >>> with checkpoint.Checkpointer(tempfile.mkdtemp()) as ckpt:
        ...     _ = ckpt.save(5, {"w": jnp.arange(3.0)})
        ...     ckpt.restore({"w": jnp.zeros(3)})["w"].tolist()
        [0.0, 1.0, 2.0]
        """
        steps = self._restorable_steps()
        step = max(steps) if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; it holds steps {steps}")
        path = self.directory / str(step)
        problem = _step_problem(path)
        if problem:
            raise CheckpointError(
                f"checkpoint {path} is incomplete: {problem}; restore_latest falls back to an older one"
            )
        record = _read_record(path, path / _CHECKSUMS / _CHECKSUM_FILE)
        if check_layers:
            _check_layers(path, record, target)
        manager = self._open(steps)
        try:
            return _restore_from(
                path,
                path / "default",
                lambda abstract: manager.restore(
                    step, args=ocp.args.Composite(default=_pytree_restore(abstract))
                )["default"],
                target,
                record,
            )
        except CheckpointError:
            self._discard()
            raise

    def restore_latest(self, target: Any, *, check_layers: bool = True) -> tuple[int, Any]:
        """``(step, state)`` of the newest step that restores and verifies; as `restore_latest`.

        >>> import tempfile, jax.numpy as jnp
        >>> from sste_jax import checkpoint
        >>> with checkpoint.Checkpointer(tempfile.mkdtemp()) as ckpt:
        ...     for step in (1, 2):
        ...         _ = ckpt.save(step, {"w": jnp.full(3, step)})
        ...     ckpt.restore_latest({"w": jnp.zeros(3, jnp.int32)})[0]
        2
        """
        steps = self._restorable_steps()
        failures = []
        for step in reversed(steps):
            try:
                state = self.restore(target, step, check_layers=check_layers)
            except CheckpointConfigError:
                raise
            except CheckpointError as e:
                failures.append(f"step {step}: {e}")
                warnings.warn(f"skipping checkpoint {self.directory / str(step)}: {e}", RuntimeWarning, stacklevel=2)
                continue
            return step, state
        raise CheckpointError(f"no checkpoint in {self.directory} restores:\n  " + "\n  ".join(failures))


def restore_checkpoint(
    directory: str | os.PathLike, target: Any, step: int | None = None, *, check_layers: bool = True
) -> Any:
    """Restores the checkpoint of ``step`` (default: the latest) with the structure of ``target``.

    ``target`` is a state of the right structure, e.g. freshly built; its arrays' shardings are
    used for the restored arrays. Raises `FileNotFoundError` when there is no such checkpoint and
    `CheckpointError` when it is incomplete, truncated, corrupt (an array's bytes do not match
    their stored checksum) or does not match ``target``; `CheckpointConfigError` (before reading any
    array) when a layer is sparse in one but not the other, or, where both the checkpoint and
    ``target`` hold the modules (see `save_checkpoint`), a layer's ``method``, ``mvue``, ``fp8`` or
    the decay its method uses differ (``backend`` and ``matmul`` may). ``check_layers=False`` skips
    that check, e.g. to resume a run that switched a layer's method.

    Args:
      directory: the run's checkpoint folder.
      target: a state of the checkpoint's structure (its arrays' shardings place the restored ones).
      step: the step (default: the latest).
      check_layers: compare the sparse weights' records first.

    >>> import tempfile, jax.numpy as jnp
    >>> from sste_jax import checkpoint
    >>> d = tempfile.mkdtemp()
    >>> _ = checkpoint.save_checkpoint(d, 5, {"w": jnp.arange(3.0)})
    >>> checkpoint.restore_checkpoint(d, {"w": jnp.zeros(3)})["w"].tolist()
    [0.0, 1.0, 2.0]
    """
    with Checkpointer(directory) as checkpointer:
        return checkpointer.restore(target, step, check_layers=check_layers)


def restore_latest(directory: str | os.PathLike, target: Any, *, check_layers: bool = True) -> tuple[int, Any]:
    """``(step, state)`` of the newest checkpoint under ``directory`` that restores and verifies.

    For resuming: a newer checkpoint that is incomplete, truncated or corrupt is skipped with a
    warning naming it and why. Raises `FileNotFoundError` if there is no checkpoint, and
    `CheckpointError` listing every failure if none restores (also when ``target`` does not match).
    A `CheckpointConfigError` (sparse layers differ, see `restore_checkpoint`) is raised at once.

    >>> import tempfile, jax.numpy as jnp
    >>> from sste_jax import checkpoint
    >>> d = tempfile.mkdtemp()
    >>> for step in (1, 2):
    ...     _ = checkpoint.save_checkpoint(d, step, {"w": jnp.full(3, step)})
    >>> step, state = checkpoint.restore_latest(d, {"w": jnp.zeros(3, jnp.int32)})
    >>> step, state["w"].tolist()
    (2, [2, 2, 2])
    """
    with Checkpointer(directory) as checkpointer:
        return checkpointer.restore_latest(target, check_layers=check_layers)


def save_export(directory: str | os.PathLike, state: Any, info: dict | None = None) -> pathlib.Path:
    """Saves ``state`` (any pytree) as one orbax folder ``directory``, for inference: atomically, with every
    array's checksum (`fingerprint`) and ``info`` (JSON fields) in its ``sste_export.json``; returns it.

    ``directory`` must not exist (nothing is overwritten). The folder is written beside it and renamed into
    place; a failed write raises `CheckpointWriteError` and leaves nothing behind. `restore_export` reads it
    back; `sste_jax.nnx.export_compressed` writes a model's 2:4-compressed layers with it.

    >>> import tempfile, jax.numpy as jnp
    >>> from sste_jax import checkpoint
    >>> path = checkpoint.save_export(tempfile.mkdtemp() + "/export", {"w": jnp.ones(3)}, {"note": "fp32"})
    >>> sorted(p.name for p in path.iterdir() if p.suffix == ".json")
    ['sste_export.json']
    """
    directory = pathlib.Path(directory).absolute()
    if directory.exists():
        raise FileExistsError(f"cannot export to {directory}: it already exists")
    info = dict(info or {})
    if "checksums" in info:
        raise ValueError("save_export: info has a 'checksums' field, where the export's own checksums go")
    flat, _, _ = _flatten(state)
    record = {**_record(flat), "arrays": fingerprint(flat)}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.sste-export-tmp-{os.getpid()}"
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        checkpointer.save(tmp, args=ocp.args.StandardSave(_nest(flat)))
        with open(tmp / _EXPORT_FILE, "w") as f:
            json.dump({"checksums": record, **info}, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, directory)
    except Exception as e:
        partial = [tmp, *directory.parent.glob(f"{tmp.name}.orbax-checkpoint-tmp*")]
        _write_failed(e, f"exporting to {directory}", partial)
    finally:
        checkpointer.close()
    return directory


def restore_export(directory: str | os.PathLike, target: Any) -> tuple[Any, dict]:
    """``(state, info)`` of a `save_export` folder: its arrays in the structure of ``target`` (names, shapes
    and dtypes checked against the export's record, every array verified against its checksum) and the
    ``info`` saved with it.

    Raises `FileNotFoundError` when there is no export at ``directory`` and `CheckpointError`, naming the
    file, when its ``sste_export.json`` is missing, unreadable or malformed, when an array is corrupt, or when
    it does not match ``target``.

    >>> import tempfile, jax.numpy as jnp
    >>> from sste_jax import checkpoint
    >>> path = checkpoint.save_export(tempfile.mkdtemp() + "/export", {"w": jnp.arange(3.0)}, {"note": "fp32"})
    >>> state, info = checkpoint.restore_export(path, {"w": jnp.zeros(3)})
    >>> state["w"].tolist(), info
    ([0.0, 1.0, 2.0], {'note': 'fp32'})
    """
    directory = pathlib.Path(directory).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"no exported model at {directory}")
    file = directory / _EXPORT_FILE
    if not file.is_file():
        raise CheckpointError(f"exported model {directory} has no {file}: it was not written by sste_jax, "
                              "which refuses it")
    info = _read_json(directory, file)
    record = _check_record(directory, file, info.get("checksums") if isinstance(info, dict) else None, layers=False)
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        state = _restore_from(
            directory,
            directory,
            lambda abstract: checkpointer.restore(directory, args=ocp.args.StandardRestore(abstract)),
            target,
            record,
        )
    finally:
        checkpointer.close()
    return state, {k: v for k, v in info.items() if k != "checksums"}
