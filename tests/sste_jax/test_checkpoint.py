"""Orbax checkpoints (bit-identical resume, clear errors, no overwrite) and the 2:4-compressed export."""

import hashlib
import json
import os
import pathlib
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sste_jax
from sste_jax import SparseWeight, SparsityConfig, _fingerprint, checkpoint
from sste_jax import nnx as sparse_nnx

CONFIG = SparsityConfig(mvue=True)


def _init_state(seed: int):
    """A training state as a plain pytree: params, frozen β, AdamW state, step, typed key, flip masks."""
    return _init_state_from(jax.random.key(seed))


@jax.jit
def _init_state_from(key):
    k1, k2, key = jax.random.split(key, 3)
    params = {
        "w1": jax.random.normal(k1, (16, 32)) / 4,
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(k2, (32, 8)) / 6,
    }
    betas = {"w1": sste_jax.fit_beta(params["w1"]), "w2": sste_jax.fit_beta(params["w2"])}
    flips = sste_jax.metrics.init_flip_state({n: SparseWeight(params[n], betas[n], CONFIG) for n in betas})
    opt = _TX.init(params)
    return {"params": params, "betas": betas, "opt": opt, "step": jnp.int32(0), "key": key, "flips": flips}


_TX = optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.1)


def _loss(params, betas, key, x, y):
    k1, k2 = jax.random.split(key)
    h = jax.nn.gelu(sste_jax.sparse_dense(x, params["w1"], betas["w1"], k1, CONFIG) + params["b1"][None])
    return jnp.mean((sste_jax.sparse_dense(h, params["w2"], betas["w2"], k2, CONFIG) - y) ** 2)


@jax.jit
def _train_step(state):
    key = jax.random.fold_in(state["key"], state["step"])
    kx, ky, kl = jax.random.split(key, 3)
    x, y = jax.random.normal(kx, (8, 16)), jax.random.normal(ky, (8, 8))
    grads = jax.grad(_loss)(state["params"], state["betas"], kl, x, y)
    updates, opt = _TX.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    weights = {n: SparseWeight(params[n], state["betas"][n], CONFIG) for n in state["betas"]}
    rates, flips = sste_jax.metrics.flip_rate(state["flips"], weights)
    new = {**state, "params": params, "opt": opt, "step": state["step"] + 1, "flips": flips}
    return new, rates


def _run(state, steps):
    for _ in range(steps):
        state, _ = _train_step(state)
    return state


def _assert_bitwise_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()  # bitwise, NaN and -0.0 included


def _file_digests(root: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_resume_is_bit_identical(tmp_path):
    straight = _run(_init_state(0), 4)
    half = _run(_init_state(0), 2)
    checkpoint.save_checkpoint(tmp_path, 2, half)
    fresh = _init_state(1)  # a different state of the same structure, as in a new process
    resumed = _run(checkpoint.restore_checkpoint(tmp_path, fresh), 2)
    _assert_bitwise_equal(straight, resumed)
    assert int(resumed["step"]) == 4
    # β was restored, not recomputed from the fresh state's weights.
    assert float(resumed["betas"]["w1"]) == float(_init_state(0)["betas"]["w1"]) != float(fresh["betas"]["w1"])


def test_python_and_numpy_leaves_round_trip(tmp_path):
    state = {"step": 7, "lr": 0.5, "table": np.arange(6, dtype=np.uint8), "key": jax.random.key(3)}
    checkpoint.save_checkpoint(tmp_path, 7, state)
    restored = checkpoint.restore_checkpoint(tmp_path, {**state, "step": 0, "key": jax.random.key(0)})
    assert restored["step"] == 7 and type(restored["step"]) is int
    assert restored["lr"] == 0.5 and isinstance(restored["table"], np.ndarray)
    _assert_bitwise_equal(restored, state)


def test_steps_latest_and_max_to_keep(tmp_path):
    state = _init_state(0)
    assert checkpoint.checkpoint_steps(tmp_path / "none") == []
    for step in (1, 2, 5):
        checkpoint.save_checkpoint(tmp_path, step, {**state, "step": jnp.int32(step)}, max_to_keep=2)
    assert checkpoint.checkpoint_steps(tmp_path) == [2, 5]
    assert int(checkpoint.restore_checkpoint(tmp_path, state)["step"]) == 5
    assert int(checkpoint.restore_checkpoint(tmp_path, state, step=2)["step"]) == 2


def test_missing_checkpoint_errors_name_the_path(tmp_path):
    state = _init_state(0)
    with pytest.raises(FileNotFoundError, match=f"no checkpoint found in {tmp_path / 'absent'}"):
        checkpoint.restore_checkpoint(tmp_path / "absent", state)
    assert not (tmp_path / "absent").exists()
    checkpoint.save_checkpoint(tmp_path, 1, state)
    with pytest.raises(FileNotFoundError, match=r"step 4 .* holds steps \[1\]"):
        checkpoint.restore_checkpoint(tmp_path, state, step=4)


def test_mismatched_target_is_an_error_naming_the_entry(tmp_path):
    state = _init_state(0)
    checkpoint.save_checkpoint(tmp_path, 1, state)
    with pytest.raises(checkpoint.CheckpointError, match=r"missing \['extra'\]"):
        checkpoint.restore_checkpoint(tmp_path, {**state, "extra": jnp.ones(2)})
    smaller = {**state, "params": {**state["params"], "b1": jnp.zeros(16)}}
    with pytest.raises(checkpoint.CheckpointError, match=r"'params/b1' is stored as float32\[32\].*float32\[16\]"):
        checkpoint.restore_checkpoint(tmp_path, smaller)


def test_never_overwrites(tmp_path):
    state = _init_state(0)
    checkpoint.save_checkpoint(tmp_path, 2, state)
    before = _file_digests(tmp_path)
    for step in (2, 1):
        with pytest.raises(FileExistsError, match=f"cannot save step {step} in {tmp_path}"):
            checkpoint.save_checkpoint(tmp_path, step, _init_state(1))
    assert _file_digests(tmp_path) == before
    _assert_bitwise_equal(checkpoint.restore_checkpoint(tmp_path, _init_state(1)), state)


def test_truncated_checkpoint_is_a_clear_error_and_leaves_others_intact(tmp_path):
    state = _init_state(0)
    checkpoint.save_checkpoint(tmp_path, 1, state)
    checkpoint.save_checkpoint(tmp_path, 2, _run(state, 1))
    good = _file_digests(tmp_path / "1")
    # Cut every data file of step 2 in half (orbax leaves some unreferenced ones: cutting just one
    # might not damage the checkpoint).
    for data_file in [p for p in (tmp_path / "2").rglob("*") if p.is_file() and p.parent.name == "d"]:
        with open(data_file, "r+b") as f:
            f.truncate(data_file.stat().st_size // 2)
    broken = _file_digests(tmp_path / "2")
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint {tmp_path / '2'} is truncated or corrupt"):
        checkpoint.restore_checkpoint(tmp_path, state)
    assert _file_digests(tmp_path / "1") == good and _file_digests(tmp_path / "2") == broken
    _assert_bitwise_equal(checkpoint.restore_checkpoint(tmp_path, _init_state(1), step=1), state)
    # A new save goes to a new step and touches neither.
    checkpoint.save_checkpoint(tmp_path, 3, state)
    assert _file_digests(tmp_path / "1") == good and _file_digests(tmp_path / "2") == broken


def test_checkpoint_without_metadata_is_a_clear_error(tmp_path):
    state = _init_state(0)
    checkpoint.save_checkpoint(tmp_path, 1, state)
    (metadata,) = [p for p in (tmp_path / "1").rglob("_METADATA")]
    os.remove(metadata)
    message = f"checkpoint {tmp_path / '1'} is incomplete: .*_METADATA"
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.restore_checkpoint(tmp_path, state)


# --- NNX models: resume and the compressed / dense export ------------------------------------------


class _Block(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
        self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x_BxD):
        return x_BxD + self.fc2(jax.nn.gelu(self.fc1(self.norm(x_BxD))))


class _Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, d: int = 32):
        self.embed = nnx.Linear(8, d, rngs=rngs)
        self.blocks = nnx.List([_Block(d, rngs) for _ in range(2)])
        self.head = nnx.Linear(d, 4, rngs=rngs)

    def __call__(self, x_BxI):
        h_BxD = self.embed(x_BxI)
        for block in self.blocks:
            h_BxD = block(h_BxD)
        return self.head(h_BxD)


def _is_ffn(path) -> bool:
    return str(path[-1]).startswith("fc")


def _swap(model: _Model, config: SparsityConfig = SparsityConfig(), where=_is_ffn, rngs=None) -> _Model:
    """``model`` with the blocks' linear layers that ``where`` selects replaced, in place, by
    `SparseLinear.from_linear` (the same variables)."""
    for block in model.blocks:
        for name in ("fc1", "fc2"):
            if where(("blocks", name)):
                setattr(block, name, sparse_nnx.SparseLinear.from_linear(getattr(block, name), config, rngs=rngs))
    return model


def _sparse_model(seed: int, config: SparsityConfig = SparsityConfig()) -> _Model:
    return _swap(_Model(nnx.Rngs(seed)), config, rngs=nnx.Rngs(seed + 100))


def _nnx_train_state(seed: int):
    model = _sparse_model(seed, SparsityConfig(mvue=True))  # the MVUE keys live in the model state
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.1), wrt=nnx.Param)
    flips = sste_jax.metrics.init_flip_state(sste_jax.sparse_weights(model))
    return model, optimizer, {"flips": flips, "key": jax.random.key(seed + 10), "step": jnp.int32(0)}


@nnx.jit
def _nnx_step(model, optimizer, extra):
    x_BxI = jax.random.normal(jax.random.fold_in(extra["key"], extra["step"]), (16, 8))
    y_BxO = jnp.sin(2 * x_BxI[:, :4])
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x_BxI) - y_BxO) ** 2))(model)
    optimizer.update(model, grads)
    _, flips = sste_jax.metrics.flip_rate(extra["flips"], sste_jax.sparse_weights(model))
    return loss, {**extra, "flips": flips, "step": extra["step"] + 1}


def _nnx_run(model, optimizer, extra, steps):
    losses = []
    for _ in range(steps):
        loss, extra = _nnx_step(model, optimizer, extra)
        losses.append(float(loss))
    return extra, losses


def _everything(model, optimizer, extra):
    return {"model": nnx.state(model), "optimizer": nnx.state(optimizer), **extra}


def test_nnx_resume_is_bit_identical(tmp_path):
    model, optimizer, extra = _nnx_train_state(0)
    beta0 = {n: w.beta for n, w in sste_jax.sparse_weights(model).items()}
    extra, losses = _nnx_run(model, optimizer, extra, 4)
    assert losses[-1] < losses[0]
    straight = _everything(model, optimizer, extra)

    model, optimizer, extra = _nnx_train_state(0)
    extra, _ = _nnx_run(model, optimizer, extra, 2)
    checkpoint.save_checkpoint(tmp_path, 2, _everything(model, optimizer, extra))
    model, optimizer, extra = _nnx_train_state(1)  # fresh, different weights, β and key
    restored = checkpoint.restore_checkpoint(tmp_path, _everything(model, optimizer, extra))
    nnx.update(model, restored.pop("model"))
    nnx.update(optimizer, restored.pop("optimizer"))
    extra, _ = _nnx_run(model, optimizer, restored, 2)
    _assert_bitwise_equal(straight, _everything(model, optimizer, extra))
    # β is frozen through training and restored, bit for bit.
    for name, w in sste_jax.sparse_weights(model).items():
        assert np.asarray(w.beta).tobytes() == np.asarray(beta0[name]).tobytes()
        assert np.all(np.asarray(w.forward() != 0).reshape(-1, 4, w.kernel.shape[1]).sum(1) <= 2)


def _tree_nbytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("config", [SparsityConfig(), SparsityConfig(method="ste", fp8=True)], ids=["sste", "ste_fp8"])
def test_export_compressed_round_trip_is_bitwise_with_half_the_bytes(tmp_path, config):
    model = _sparse_model(0, config)
    model.blocks[0].fc1.kernel[...] *= 1.3  # as after training: β no longer fits exactly
    x_BxI = jax.random.normal(jax.random.key(7), (5, 3, 8))
    forward = nnx.jit(lambda m, x: m(x))
    y = forward(model, x_BxI)
    kernels = {n: w.kernel for n, w in sste_jax.sparse_weights(model).items()}
    sparse_nnx.export_compressed(tmp_path / "export", model)
    assert isinstance(model.blocks[0].fc1, sparse_nnx.SparseLinear)  # the trained model is untouched
    inference = sparse_nnx.load_compressed(tmp_path / "export", _sparse_model(1, config))
    assert np.asarray(forward(inference, x_BxI)).tobytes() == np.asarray(y).tobytes()
    for name, kernel in kernels.items():
        _, index, attribute, _ = name.split("/")  # blocks/<i>/<fc>/kernel
        layer = getattr(inference.blocks[int(index)], attribute)
        assert isinstance(layer, sparse_nnx.CompressedLinear)
        assert layer.values.nbytes == kernel.nbytes // 2  # half the weight bytes
        assert layer.meta.nbytes == kernel.size // 4  # one uint8 per group of 4
    dense = sum(k.nbytes for k in kernels.values())
    packed = _tree_nbytes(nnx.state(inference, sparse_nnx.CompressedWeight))
    on_disk = sum(p.stat().st_size for p in (tmp_path / "export").rglob("*") if p.is_file())
    print(
        f"\n{config.method}, fp8={config.fp8}: sparse kernels {dense} B dense -> {packed} B compressed; "
        f"export on disk {on_disk} B"
    )
    assert packed == dense // 2 + dense // 16  # float32: values 1/2, metadata 1/16 of the dense bytes


def test_densified_model_matches_bitwise():
    model = _sparse_model(0)
    x_BxI = jax.random.normal(jax.random.key(8), (6, 8))
    forward = nnx.jit(lambda m, x: m(x))
    y = forward(model, x_BxI)
    dense = sparse_nnx.densify_layers(nnx.clone(model))
    assert type(dense.blocks[1].fc2) is nnx.Linear
    with pytest.raises(ValueError, match="no sparse weights"):
        sste_jax.sparse_weights(dense)
    assert np.asarray(forward(dense, x_BxI)).tobytes() == np.asarray(y).tobytes()
    w = sste_jax.sparse_weights(model)["blocks/1/fc2/kernel"]
    assert np.asarray(dense.blocks[1].fc2.kernel[...]).tobytes() == np.asarray(w.forward()).tobytes()


def test_load_compressed_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no exported model at {tmp_path / 'none'}"):
        sparse_nnx.load_compressed(tmp_path / "none", _sparse_model(0))
    sparse_nnx.export_compressed(tmp_path / "export", _sparse_model(0))
    with pytest.raises(FileExistsError, match="already exists"):
        sparse_nnx.export_compressed(tmp_path / "export", _sparse_model(0))
    wider = _swap(_Model(nnx.Rngs(0), d=64))
    message = r"'blocks/0/fc1/bias' is stored as float32\[128\] but the target is float32\[256\]"
    with pytest.raises(checkpoint.CheckpointError, match=message):
        sparse_nnx.load_compressed(tmp_path / "export", wider)


def test_a_saved_module_records_its_layer_configs_and_refuses_a_differently_sparsified_target(tmp_path):
    sste = _sparse_model(0)
    checkpoint.save_checkpoint(tmp_path, 1, {"model": sste, "step": jnp.int32(1)})
    record = json.loads((tmp_path / "1" / "sste_checksums" / "checksums.json").read_text())["sparse_layers"]
    assert sorted(record) == [f"model/blocks/{i}/{fc}/beta" for i in (0, 1) for fc in ("fc1", "fc2")]
    assert record["model/blocks/0/fc1/beta"]["config"]["method"] == "sste"
    assert (record["model/blocks/0/fc1/beta"]["axis"], record["model/blocks/0/fc1/beta"]["layout"]) == (0, [])

    ste = {"model": _sparse_model(1, SparsityConfig(method="ste")), "step": jnp.int32(0)}
    with pytest.raises(checkpoint.CheckpointConfigError) as info:
        checkpoint.restore_checkpoint(tmp_path, ste)
    message = str(info.value)
    assert str(tmp_path / "1") in message
    assert "model/blocks/0/fc1/beta: method='sste' in the checkpoint, 'ste' in the target" in message
    assert "model/blocks/1/fc2/beta" in message
    with pytest.raises(checkpoint.CheckpointConfigError), warnings.catch_warnings():
        warnings.simplefilter("error")  # raised at once, not skipped as a damaged step
        checkpoint.restore_latest(tmp_path, ste)
    srste = {"model": _sparse_model(1, SparsityConfig(method="srste", srste_decay=1e-3)), "step": jnp.int32(0)}
    with pytest.raises(checkpoint.CheckpointConfigError, match="method='sste' in the checkpoint, 'srste'"):
        checkpoint.restore_checkpoint(tmp_path, srste)
    mvue = {"model": _sparse_model(1, SparsityConfig(mvue=True)), "step": jnp.int32(0)}
    with pytest.raises(checkpoint.CheckpointConfigError, match="mvue=False in the checkpoint, True in the target"):
        checkpoint.restore_checkpoint(tmp_path, mvue)

    restored = checkpoint.restore_checkpoint(tmp_path, ste, check_layers=False)  # opted out
    assert int(restored["step"]) == 1
    other_backend = {"model": _sparse_model(1, SparsityConfig(backend="pallas")), "step": jnp.int32(0)}
    restored = checkpoint.restore_checkpoint(tmp_path, other_backend)  # how it is computed may change
    # the values of the checkpoint; the target's own β metadata (its backend) is kept
    _assert_bitwise_equal(nnx.to_pure_dict(nnx.state(restored["model"])), nnx.to_pure_dict(nnx.state(sste)))
    assert restored["model"].blocks[0].fc1.beta.get_metadata()["spec"].config.backend == "pallas"


def test_srste_decay_differences_are_refused_and_a_bare_model_state_is_recorded(tmp_path):
    checkpoint.save_checkpoint(tmp_path, 1, _sparse_model(0, SparsityConfig(method="srste")))
    target = _sparse_model(1, SparsityConfig(method="srste", srste_decay=1e-3))
    with pytest.raises(
        checkpoint.CheckpointConfigError, match=r"blocks/0/fc1/beta: srste_decay=0\.0002 in the checkpoint, "
    ):
        checkpoint.restore_checkpoint(tmp_path, target)


def test_plain_states_record_which_layers_are_sparse(tmp_path):
    checkpoint.save_checkpoint(tmp_path, 1, {"model": nnx.state(_sparse_model(0))})
    half = _swap(_Model(nnx.Rngs(1)), where=lambda path: path[-1] == "fc1")
    with pytest.raises(
        checkpoint.CheckpointConfigError, match="model/blocks/0/fc2/beta: a sparse weight's β only in the checkpoint"
    ):
        checkpoint.restore_checkpoint(tmp_path, {"model": nnx.state(half)})
    # The β variables of an nnx.State carry their layer's method: sste -> ste is refused.
    ste = nnx.state(_sparse_model(1, SparsityConfig(method="ste")))
    with pytest.raises(
        checkpoint.CheckpointConfigError, match="model/blocks/0/fc1/beta: method='sste' in the checkpoint, 'ste'"
    ):
        checkpoint.restore_checkpoint(tmp_path, {"model": ste})
    restored = checkpoint.restore_checkpoint(tmp_path, {"model": nnx.state(_sparse_model(1))})
    assert "model" in restored


def test_checkpoints_without_a_layer_record_or_with_a_malformed_one_are_refused(tmp_path):
    checkpoint.save_checkpoint(tmp_path, 1, {"model": _sparse_model(0)})
    file = tmp_path / "1" / "sste_checksums" / "checksums.json"
    info = json.loads(file.read_text())
    del info["sparse_layers"]
    file.write_text(json.dumps(info))
    for check_layers in (True, False):  # what it trained is unknown, whether or not the check is waived
        with pytest.raises(checkpoint.CheckpointError, match=rf"{file} is malformed \(no sparse-layer record\)"):
            checkpoint.restore_checkpoint(tmp_path, {"model": _sparse_model(1)}, check_layers=check_layers)
    info["sparse_layers"] = {"model/layers/0/beta": "not a dict"}
    file.write_text(json.dumps(info))
    with pytest.raises(checkpoint.CheckpointError, match=r"malformed \(a sparse-layer record that is not one dict"):
        checkpoint.restore_checkpoint(tmp_path, {"model": _sparse_model(1)})


def test_sparsify_fn_variables_record_their_configs(tmp_path):
    params = {"mlp": {"kernel": jax.random.normal(jax.random.key(0), (16, 64))}}

    def fn(p, x):
        return x @ p["mlp"]["kernel"]

    x_BxI = jnp.ones((2, 16))
    sste = sste_jax.sparsify_fn(fn, {"mlp": SparsityConfig()}).init(params, x_BxI)
    checkpoint.save_checkpoint(tmp_path, 1, sste)
    restored = checkpoint.restore_checkpoint(tmp_path, sste)
    assert float(restored["sparsity"]["mlp/kernel"].value) == float(sste["sparsity"]["mlp/kernel"].value)
    ste = sste_jax.sparsify_fn(fn, {"mlp": SparsityConfig(method="ste")}).init(params, x_BxI)
    with pytest.raises(
        checkpoint.CheckpointConfigError, match="sparsity/mlp/kernel: method='sste' in the checkpoint, 'ste'"
    ):
        checkpoint.restore_checkpoint(tmp_path, ste)


def test_linen_variables_record_each_layers_method_and_refuse_a_differently_sparsified_target(tmp_path):
    import dataclasses

    from flax import linen as nn

    from sste_jax._layout import SparsityBeta

    x_BxI = jnp.ones((2, 8))

    def variables(config, seed):
        return sste_jax.sparsify(nn.Dense(4), {".*": config}).init(jax.random.key(seed), x_BxI)

    sste = variables(SparsityConfig(mvue=True), 0)
    checkpoint.save_checkpoint(tmp_path, 1, sste)
    record = json.loads((tmp_path / "1" / "sste_checksums" / "checksums.json").read_text())["sparse_layers"]
    assert record == {"sparsity/kernel": {"config": dataclasses.asdict(SparsityConfig(mvue=True)), "axis": 0,
                                          "layout": []}}
    with pytest.raises(checkpoint.CheckpointConfigError, match="n=2 in the checkpoint, 1 in the target"):
        checkpoint.restore_checkpoint(tmp_path, variables(SparsityConfig(mvue=False, n=1), 1))
    restored = checkpoint.restore_checkpoint(tmp_path, variables(SparsityConfig(mvue=True), 1))
    assert type(restored["sparsity"]["kernel"]) is SparsityBeta
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(sste)):
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
    with pytest.raises(checkpoint.CheckpointConfigError, match="method='sste' in the checkpoint, 'ste' in the target"):
        checkpoint.restore_checkpoint(tmp_path, variables(SparsityConfig(method="ste", mvue=True), 1))
    with pytest.raises(checkpoint.CheckpointConfigError, match="mvue=True in the checkpoint, False in the target"):
        checkpoint.restore_checkpoint(tmp_path, variables(SparsityConfig(), 1))
    # β saved as bare arrays carry no spec: nothing is recorded, and a target with a spec'd β is refused.
    bare = lambda v: {**v, "sparsity": {k: b.value for k, b in v["sparsity"].items()}}  # noqa: E731
    checkpoint.save_checkpoint(tmp_path, 2, bare(sste))
    record = json.loads((tmp_path / "2" / "sste_checksums" / "checksums.json").read_text())["sparse_layers"]
    assert record == {}
    restored = checkpoint.restore_checkpoint(tmp_path, bare(variables(SparsityConfig(method="ste"), 1)))
    want = np.asarray(sste["sparsity"]["kernel"].value)
    assert np.asarray(restored["sparsity"]["kernel"]).tobytes() == want.tobytes()
    only_in_target = "sparsity/kernel: a sparse weight's β only in the target"
    with pytest.raises(checkpoint.CheckpointConfigError, match=only_in_target):
        checkpoint.restore_checkpoint(tmp_path, variables(SparsityConfig(mvue=True), 1))


def test_checkpointer_saves_in_the_background_from_a_host_copy(tmp_path):
    state = _run(_init_state(0), 2)
    with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        path = ckpt.save(1, state)
        for leaf in jax.tree.leaves(state):  # freed, as a donating train step would
            if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                leaf.delete()
        _assert_bitwise_equal(ckpt.restore(_init_state(9)), _run(_init_state(0), 2))
        with pytest.raises(FileExistsError, match="never overwritten"):
            ckpt.save(1, _init_state(1))
        ckpt.save(2, _init_state(2))
        ckpt.save(3, _init_state(3))
        assert ckpt.steps() == [2, 3] and not path.exists()
    _assert_bitwise_equal(checkpoint.restore_checkpoint(tmp_path, _init_state(9)), _init_state(3))
    with pytest.raises(RuntimeError, match="is closed"):
        ckpt.save(4, _init_state(4))


def test_checkpointer_fetches_the_checksums_in_the_background(tmp_path, monkeypatch):
    fetched_in, fetch = [], _fingerprint.to_hex
    record = lambda sums: fetched_in.append(threading.current_thread()) or fetch(sums)  # noqa: E731
    monkeypatch.setattr(_fingerprint, "to_hex", record)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _init_state(1))
    assert fetched_in and threading.main_thread() not in fetched_in  # save() did not wait for them
    _assert_bitwise_equal(checkpoint.restore_checkpoint(tmp_path, _init_state(9)), _init_state(1))

    def full(sums):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_fingerprint, "to_hex", full)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(2, _init_state(2))
    with pytest.raises(checkpoint.CheckpointWriteError, match="saving step 2 .* No space left"):
        ckpt.wait()
    assert checkpoint.checkpoint_steps(tmp_path) == [1] and sorted(p.name for p in tmp_path.iterdir()) == ["1"]
    ckpt.close()


def test_checkpointer_follows_steps_moved_by_others(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _init_state(1))
        ckpt.save(2, _init_state(2))
        ckpt.wait()
        os.rename(tmp_path / "2", tmp_path / "2.damaged")  # as the experiments' loop sets a damaged step aside
        ckpt.save(2, _init_state(4))
        step, restored = ckpt.restore_latest(_init_state(9))
        assert step == 2
        _assert_bitwise_equal(restored, _init_state(4))
        checkpoint.save_checkpoint(tmp_path, 3, _init_state(3))  # another writer
        _assert_bitwise_equal(ckpt.restore(_init_state(9)), _init_state(3))
