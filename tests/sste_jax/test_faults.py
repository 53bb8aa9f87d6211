"""Fault injection on checkpoints and exports: corrupt bytes, half-deleted steps, narrowing, full disks."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sste_jax import SparsityConfig, _fingerprint, checkpoint
from sste_jax import nnx as sparse_nnx

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _state(step: int):
    return {"w": jnp.arange(4096, dtype=jnp.float32) * step, "b": jnp.ones(8), "step": jnp.int32(step)}


def _flip_a_data_byte(step_dir: pathlib.Path) -> None:
    """Flips one byte in the middle of the largest array data file (orbax stores it uncompressed)."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d" and "ocdbt.process" in str(p)]
    data = max(files, key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


def _equal(a, b) -> bool:
    return all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def test_a_flipped_byte_is_caught_by_the_checksum_naming_the_array(tmp_path):
    checkpoint.save_checkpoint(tmp_path, 1, _state(1))
    stored = json.loads((tmp_path / "1" / "sste_checksums" / "checksums.json").read_text())
    assert stored["algorithm"] == "fingerprint64"
    assert _equal(checkpoint.restore_checkpoint(tmp_path, _state(0)), _state(1))
    _flip_a_data_byte(tmp_path / "1")
    with pytest.raises(checkpoint.CheckpointError, match=rf"checkpoint {tmp_path / '1'} is corrupt: array 'w'"):
        checkpoint.restore_checkpoint(tmp_path, _state(0))


def test_a_tampered_checksum_file_is_an_error(tmp_path):
    checkpoint.save_checkpoint(tmp_path, 1, _state(1))
    file = tmp_path / "1" / "sste_checksums" / "checksums.json"
    sums = json.loads(file.read_text())
    sums["arrays"]["b"] = sums["arrays"]["b"][:-1] + ("0" if sums["arrays"]["b"][-1] != "0" else "1")
    file.write_text(json.dumps(sums))
    with pytest.raises(checkpoint.CheckpointError, match="array 'b' does not match its stored checksum"):
        checkpoint.restore_checkpoint(tmp_path, _state(0))
    file.write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="checksums.json is unreadable"):
        checkpoint.restore_checkpoint(tmp_path, _state(0))


def test_restore_latest_falls_back_past_corrupt_and_half_deleted_steps(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save_checkpoint(tmp_path, step, _state(step))
    _flip_a_data_byte(tmp_path / "4")
    os.remove(tmp_path / "3" / "default" / "manifest.ocdbt")  # as a deletion killed midway leaves it
    os.remove(tmp_path / "2" / "sste_checksums" / "checksums.json")
    assert checkpoint.checkpoint_steps(tmp_path) == [1, 4]  # 4 looks intact; its bytes are checked at restore
    with pytest.warns(RuntimeWarning) as caught:
        step, state = checkpoint.restore_latest(tmp_path, _state(0))
    assert step == 1 and _equal(state, _state(1))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3 and "4 is corrupt: array 'w'" in messages[0], messages
    assert "manifest.ocdbt missing" in messages[1] and "checksums.json missing" in messages[2], messages
    with pytest.raises(checkpoint.CheckpointError, match="is incomplete: default/manifest.ocdbt missing"):
        checkpoint.restore_checkpoint(tmp_path, _state(0), step=3)
    with pytest.raises(FileNotFoundError):
        checkpoint.restore_latest(tmp_path / "none", _state(0))
    os.remove(tmp_path / "1" / "default" / "_METADATA")
    with pytest.warns(RuntimeWarning), pytest.raises(checkpoint.CheckpointError, match="no checkpoint .* restores"):
        checkpoint.restore_latest(tmp_path, _state(0))


def test_an_interrupted_rotation_leaves_no_listed_half_deleted_step(tmp_path, monkeypatch):
    checkpoint.save_checkpoint(tmp_path, 1, _state(1))
    checkpoint.save_checkpoint(tmp_path, 2, _state(2))
    real_rmtree = checkpoint.shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        next(p for p in pathlib.Path(path).rglob("*") if p.is_file()).unlink()
        raise KeyboardInterrupt  # stands for the process being killed here

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, 3, _state(3), max_to_keep=1)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    assert checkpoint.checkpoint_steps(tmp_path) == [2, 3]
    assert checkpoint.restore_latest(tmp_path, _state(0))[0] == 3
    checkpoint.save_checkpoint(tmp_path, 4, _state(4), max_to_keep=2)  # also clears the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]


def test_64_bit_leaves_that_32_bits_cannot_hold_raise(tmp_path):
    for leaf, what in (
        (np.array([1.5, 1e300]), "float64"),
        (np.array([1e-300]), "float64"),
        (np.array([2**40], np.int64), "int64"),
        (2**40, "int32"),
        (np.float64(-1e39), "float64"),
    ):
        with pytest.raises(ValueError, match=rf"'opt/x'.*{what}"):
            checkpoint.save_checkpoint(tmp_path, 1, {"opt": {"x": leaf}})
    assert checkpoint.checkpoint_steps(tmp_path) == []
    fine = {"x": np.array([0.1, 1e30, 0.0, np.inf]), "i": np.array([2**31 - 1], np.int64), "f": 1e30}
    checkpoint.save_checkpoint(tmp_path, 1, fine)
    restored = checkpoint.restore_checkpoint(tmp_path, fine)
    np.testing.assert_array_equal(restored["x"], np.array([0.1, 1e30, 0.0, np.inf], np.float32))


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.mlp = nnx.Sequential(nnx.Linear(64, 128, rngs=rngs), nnx.relu, nnx.Linear(128, 64, rngs=rngs))

    def __call__(self, x):
        return self.mlp(x)


def _net(seed, fp8=False):
    model = _Net(nnx.Rngs(seed))
    for i in (0, 2):
        model.mlp.layers[i] = sparse_nnx.SparseLinear.from_linear(model.mlp.layers[i], SparsityConfig(fp8=fp8))
    return model


def test_export_checksums_and_failed_loads_leave_the_model_unchanged(tmp_path):
    sparse_nnx.export_compressed(tmp_path / "e", _net(0))
    assert not [p for p in tmp_path.iterdir() if p.name != "e"]  # no temporary folder left
    info = json.loads((tmp_path / "e" / "sste_export.json").read_text())
    assert set(info["layers"]) == {"mlp/layers/0", "mlp/layers/2"}
    _flip_a_data_byte(tmp_path / "e")
    target = _net(1)
    before = nnx.state(target)
    with pytest.raises(checkpoint.CheckpointError, match=rf"{tmp_path / 'e'} is corrupt: array 'mlp/layers/"):
        sparse_nnx.load_compressed(tmp_path / "e", target)
    assert type(target.mlp.layers[0]) is sparse_nnx.SparseLinear and _equal(nnx.state(target), before)


def test_load_compressed_honours_the_exported_fp8_setting(tmp_path):
    model = _net(0, fp8=True)
    x = jax.random.normal(jax.random.key(1), (4, 64)) * 3
    want = sparse_nnx.compress_layers(nnx.clone(model))(x)
    sparse_nnx.export_compressed(tmp_path / "e", model)
    loaded = sparse_nnx.load_compressed(tmp_path / "e", _net(1, fp8=False))
    assert loaded.mlp.layers[0].fp8 is True
    assert np.asarray(loaded(x)).tobytes() == np.asarray(want).tobytes()


_FULL_DISK = textwrap.dedent(
    """
    import json, pathlib, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from sste_jax import SparsityConfig, checkpoint, nnx as sparse_nnx
    d = pathlib.Path(sys.argv[1])
    checkpoint.save_checkpoint(d / "ckpt", 1, {"a": jnp.ones(4)})
    big = jnp.asarray(np.random.default_rng(0).normal(size=(512, 1024)), jnp.float32)
    model = nnx.Sequential(sparse_nnx.SparseLinear(1024, 512, config=SparsityConfig(), rngs=nnx.Rngs(0)))
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    out = {}
    def save_async():
        with checkpoint.Checkpointer(d / "ckpt") as ckpt:
            ckpt.save(2, {"a": big})

    for what, fn in (("save", lambda: checkpoint.save_checkpoint(d / "ckpt", 2, {"a": big})),
                     ("async_save", save_async),
                     ("export", lambda: sparse_nnx.export_compressed(d / "export", model))):
        try:
            fn()
            out[what] = "no error"
        except Exception as e:
            out[what] = [type(e).__name__, isinstance(e, OSError), e.errno, str(e)]
    out["ckpt"] = sorted(p.name for p in (d / "ckpt").iterdir())
    out["root"] = sorted(p.name for p in d.iterdir())
    out["steps"] = checkpoint.checkpoint_steps(d / "ckpt")
    print("RESULT" + json.dumps(out))
    """
)


def test_a_full_disk_raises_an_os_error_and_leaves_no_partial_folder(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    line = [x for x in run.stdout.splitlines() if x.startswith("RESULT")]
    assert line, run.stderr[-3000:]
    out = json.loads(line[0][len("RESULT"):])
    for what in ("save", "async_save", "export"):
        name, is_os_error, errno, message = out[what]
        assert name == "CheckpointWriteError" and is_os_error and errno == 27, out[what]
        assert "partial files removed" in message
    assert out["ckpt"] == ["1"] and out["steps"] == [1]
    assert out["root"] == ["ckpt"], out["root"]


def test_checkpoints_and_exports_without_the_checksum_record_are_refused_naming_the_file(tmp_path):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
    manager = ocp.CheckpointManager(tmp_path / "old", options=options, item_handlers=ocp.StandardCheckpointHandler())
    manager.save(5, args=ocp.args.StandardSave(_state(5)))
    manager.wait_until_finished()
    manager.close()
    file = tmp_path / "old" / "5" / "sste_checksums" / "checksums.json"
    for check_layers in (True, False):  # not written by sste_jax: what it holds and trained is unknown
        with pytest.raises(checkpoint.CheckpointError, match=rf"has no checksum file {file}: it was not written"):
            checkpoint.restore_checkpoint(tmp_path / "old", _state(0), check_layers=check_layers)
    sparse_nnx.export_compressed(tmp_path / "e", _net(0))
    info = json.loads((tmp_path / "e" / "sste_export.json").read_text())
    os.remove(tmp_path / "e" / "sste_export.json")
    with pytest.raises(checkpoint.CheckpointError, match=rf"has no {tmp_path / 'e' / 'sste_export.json'}"):
        sparse_nnx.load_compressed(tmp_path / "e", _net(1))
    (tmp_path / "e" / "sste_export.json").write_text(json.dumps({"checksums": info["checksums"]}))  # no settings
    with pytest.raises(checkpoint.CheckpointError, match=r"sste_export.json is malformed \(it needs the fp8 setting"):
        sparse_nnx.load_compressed(tmp_path / "e", _net(1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3fn", "int32", "uint8", "bool", "uint32"])
def test_every_single_bit_flip_changes_the_fingerprint(dtype):
    values = jax.random.normal(jax.random.key(1), (2, 3)) * 7
    a = np.asarray(values > 0 if dtype == "bool" else values.astype(dtype))
    bits = a.view(np.uint8) if a.dtype != np.bool_ else a.astype(np.uint8)
    flips = []
    for byte in range(bits.size):
        for bit in range(1 if a.dtype == np.bool_ else 8):
            damaged = bits.copy().reshape(-1)
            damaged[byte] ^= np.uint8(1 << bit)
            flips.append(
                damaged.view(a.dtype).reshape(a.shape) if a.dtype != np.bool_ else damaged.astype(bool).reshape(a.shape)
            )
    names = {f"f{i}": f for i, f in enumerate(flips)}
    sums = checkpoint.fingerprint({"clean": a, **names})
    assert all(sums[n] != sums["clean"] for n in names)
    assert len(set(sums.values())) == len(flips) + 1  # distinct damages give distinct sums here, too


def test_the_fingerprint_does_not_depend_on_the_sharding():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    w = jax.random.normal(jax.random.key(0), (64, 32))
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    layouts = [jax.device_put(w, NamedSharding(mesh, spec)) for spec in (P("a", "b"), P(None, "a"), P())]
    want = checkpoint.fingerprint({"w": np.asarray(w)})
    assert all(checkpoint.fingerprint({"w": x}) == want for x in layouts)
    assert checkpoint.fingerprint({"w": w.T})["w"] != want["w"]  # same values, other positions


def _reference_fingerprint(a: np.ndarray) -> str:
    """`checkpoint.fingerprint` of one array, written out in NumPy (64-bit arithmetic, then mod 2**32)."""
    if a.dtype == np.bool_:
        words = a.astype(np.uint64).reshape(-1)
    else:
        words = a.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]).astype(np.uint64)
    index, wrap = np.arange(words.size, dtype=np.uint64), np.uint64(2**32)

    def mix(x):
        x = x ^ (x >> np.uint64(16))
        x = (x * np.uint64(0x85EBCA6B)) % wrap
        x = x ^ (x >> np.uint64(13))
        x = (x * np.uint64(0xC2B2AE35)) % wrap
        return x ^ (x >> np.uint64(16))

    weighted = np.sum((words * ((index * np.uint64(0x9E3779B1)) % wrap | np.uint64(1))) % wrap) % wrap
    mixed = np.sum(mix(words ^ mix((index + np.uint64(0x7F4A7C15)) % wrap))) % wrap
    return f"{int(weighted):08x}{int(mixed):08x}"


@pytest.mark.parametrize("size", [0, 1, 7, 2**16, 2**16 + 1, 300_001])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "bool"])
def test_the_fingerprint_is_its_documented_formula_at_every_size(size, dtype):
    """Pins the formula (checkpoints already written must keep verifying), through the halving sums
    used on CPU: sizes below, at and above where the halving stops, and not powers of two."""
    values = jax.random.normal(jax.random.key(size), (size,)) * 100
    a = np.asarray(values > 0 if dtype == "bool" else values.astype(dtype))
    assert checkpoint.fingerprint({"a": a})["a"] == _reference_fingerprint(a)


def test_the_fingerprint_halves_only_on_cpu():
    arrays = {"a": jnp.ones(300_001)}
    for platform, slices in (("cpu", True), ("cuda", False)):  # halving slices; elsewhere one reduction
        hlo = _fingerprint.digests.trace(arrays).lower(lowering_platforms=(platform,)).as_text()
        assert ("stablehlo.slice" in hlo) is slices and hlo.count("stablehlo.reduce") == 2


def test_a_restore_checks_the_target_against_the_recorded_layout(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    checkpoint.save_checkpoint(tmp_path, 1, _state(1))
    file = tmp_path / "1" / "sste_checksums" / "checksums.json"
    record = json.loads(file.read_text())
    assert record["layout"] == {"w": ["float32", [4096]], "b": ["float32", [8]], "step": ["int32", []]}
    mismatch = {**_state(0), "b": jnp.ones(9)}
    with monkeypatch.context() as m:  # the record suffices: orbax's metadata is not read
        m.setattr(ocp.CheckpointManager, "item_metadata", lambda *a, **k: pytest.fail("read orbax's metadata"))
        assert _equal(checkpoint.restore_checkpoint(tmp_path, _state(0)), _state(1))
        with pytest.raises(checkpoint.CheckpointError, match=r"'b' is stored as float32\[8\] but the target is"):
            checkpoint.restore_checkpoint(tmp_path, mismatch)
    file.write_text(json.dumps({k: v for k, v in record.items() if k != "layout"}))  # no layout: refused
    with pytest.raises(checkpoint.CheckpointError, match=rf"{file} is malformed \(no dtype and shape per array\)"):
        checkpoint.restore_checkpoint(tmp_path, _state(0))
    file.write_text(json.dumps({**record, "layout": {"w": "float32"}}))
    with pytest.raises(checkpoint.CheckpointError, match=r"checksum file is malformed \(layout\)"):
        checkpoint.restore_checkpoint(tmp_path, _state(0))


def test_arrays_are_stored_uncompressed_unless_asked(tmp_path):
    state = {"zeros": jnp.zeros(2**16), "step": jnp.int32(3)}

    def stored_bytes(path):
        return sum(f.stat().st_size for f in (path / "default").rglob("*") if f.is_file())

    plain = checkpoint.save_checkpoint(tmp_path / "plain", 1, state)
    with checkpoint.Checkpointer(tmp_path / "zstd", compress=True) as ckpt:
        zstd = ckpt.save(1, state)
    assert stored_bytes(plain) > 2**18 > 10 * stored_bytes(zstd)  # 256 KiB of zeros, raw and compressed
    for path in (plain, zstd):
        assert _equal(checkpoint.restore_checkpoint(path.parent, state), state)


def test_a_checksum_record_that_is_not_fingerprint64_is_refused_naming_the_file(tmp_path):
    checkpoint.save_checkpoint(tmp_path, 1, _state(1))
    file = tmp_path / "1" / "sste_checksums" / "checksums.json"
    record = json.loads(file.read_text())
    file.write_text(json.dumps({**record, "algorithm": "crc32"}))
    with pytest.raises(checkpoint.CheckpointError, match=rf"{file} is malformed \(no fingerprint64 checksums\)"):
        checkpoint.restore_checkpoint(tmp_path, _state(0), check_layers=False)
