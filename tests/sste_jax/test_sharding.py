"""Sparse layers and a training step under jit on a mesh of the 8 fake CPU devices.

Sharded and unsharded runs differ only by the order of float32 sums (gradient all-reduce over the
data axis, partial products of a sharded contraction), ~1e-7 relative per sum and a few Adam steps:
values agree to 1e-5 relative, and the 2:4 masks, whose margins are far larger, agree exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import sste_jax
from sste_jax import SparseWeight, SparsityConfig
from sste_jax import nnx as sparse_nnx

CONFIG = SparsityConfig()
_TX = optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.1)


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def _init(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"w1": jax.random.normal(k1, (64, 128)) / 8, "w2": jax.random.normal(k2, (128, 32)) / 11}
    betas = {n: sste_jax.fit_beta(w) for n, w in params.items()}
    return params, betas


def _loss(params, betas, x_BxI, y_BxO):
    h_BxH = jax.nn.gelu(sste_jax.sparse_dense(x_BxI, params["w1"], betas["w1"], config=CONFIG))
    return jnp.mean((sste_jax.sparse_dense(h_BxH, params["w2"], betas["w2"], config=CONFIG) - y_BxO) ** 2)


@jax.jit
def _step(params, betas, opt, flips, x_BxI, y_BxO):
    loss, grads = jax.value_and_grad(_loss)(params, betas, x_BxI, y_BxO)
    updates, opt = _TX.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
    rates, flips = sste_jax.metrics.flip_rate(flips, {n: SparseWeight(params[n], betas[n]) for n in params})
    return params, opt, flips, loss, rates


def _batches(n):
    keys = jax.random.split(jax.random.key(42), n)
    xs = [jax.random.normal(k, (32, 64)) for k in keys]
    return [(x_BxI, jnp.sin(2 * x_BxI[:, :32])) for x_BxI in xs]


def _train(params, betas, batches, put_params=lambda t: t, put_batch=lambda t: t):
    params = put_params(params)
    opt = _TX.init(params)
    flips = sste_jax.metrics.init_flip_state({n: SparseWeight(params[n], betas[n]) for n in params})
    losses = []
    for x, y in batches:
        params, opt, flips, loss, rates = _step(params, betas, opt, flips, put_batch(x), put_batch(y))
        losses.append(float(loss))
    return params, losses, sste_jax.metrics.to_host(rates)


def _assert_same_run(sharded, unsharded):
    (p_s, l_s, r_s), (p_u, l_u, r_u) = sharded, unsharded
    np.testing.assert_allclose(l_s, l_u, rtol=1e-5)
    for n in p_u:
        np.testing.assert_allclose(np.asarray(p_s[n]), np.asarray(p_u[n]), rtol=1e-5, atol=1e-6)
        assert np.array_equal(sste_jax.mask_24(p_s[n]), sste_jax.mask_24(p_u[n]))
    assert r_s == pytest.approx(r_u, abs=1e-6)
    assert l_u[-1] < l_u[0]


def test_data_parallel_step_equals_unsharded():
    params, betas = _init()
    batches = _batches(4)
    mesh = _mesh((8,), ("data",))
    replicated, by_batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    sharded = _train(
        params,
        betas,
        batches,
        put_params=lambda t: jax.device_put(t, replicated),
        put_batch=lambda t: jax.device_put(t, by_batch),
    )
    assert sharded[0]["w1"].sharding.is_equivalent_to(replicated, 2)
    _assert_same_run(sharded, _train(params, betas, batches))


def test_fsdp_step_equals_unsharded():
    params, betas = _init()
    batches = _batches(4)
    mesh = _mesh((2, 4), ("data", "fsdp"))
    kernel = NamedSharding(mesh, P("fsdp", None))  # contraction axis over 4 devices: 16 and 32 rows each
    put_params = lambda t: jax.device_put(t, kernel)  # noqa: E731
    placed = put_params(params)
    sste_jax.metrics.check_sharding({n: SparseWeight(placed[n], betas[n]) for n in placed})
    put_batch = lambda t: jax.device_put(t, NamedSharding(mesh, P("data")))  # noqa: E731
    sharded = _train(params, betas, batches, put_params, put_batch)
    assert sharded[0]["w1"].sharding.shard_shape((64, 128)) == (16, 128)
    _assert_same_run(sharded, _train(params, betas, batches))


def test_layer_forward_under_mesh_equals_unsharded():
    params, betas = _init()
    x_BxI = _batches(1)[0][0]
    mesh = _mesh((8,), ("fsdp",))
    w = jax.device_put(params["w1"], NamedSharding(mesh, P("fsdp", None)))  # 8 rows per device
    f = jax.jit(lambda x, w: sste_jax.sparse_dense(x, w, betas["w1"]))
    np.testing.assert_allclose(f(x_BxI, w), f(x_BxI, params["w1"]), rtol=1e-5, atol=1e-6)


def test_sharding_that_splits_a_group_names_the_layer():
    mesh = _mesh((8,), ("fsdp",))
    kernel = jnp.zeros((16, 8))  # 8 shards of 2 rows: every group of 4 straddles two devices
    placed = jax.device_put(kernel, NamedSharding(mesh, P("fsdp", None)))
    with pytest.raises(ValueError, match=r"weight 'blocks/1/mlp/fc1'.*shards of shape \(2, 8\).*axis 0"):
        sste_jax.metrics.check_sharding({"blocks/1/mlp/fc1": SparseWeight(placed)})
    # The same plan is rejected before placing anything, from a ShapeDtypeStruct.
    plan = jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
    with pytest.raises(ValueError, match="weight 'fc'"):
        sste_jax.metrics.check_sharding({"fc": SparseWeight(plan)})
    # Sharding the output axis, or the grouped axis into shards of 4, is fine.
    by_column = jax.device_put(jnp.zeros((16, 8)), NamedSharding(mesh, P(None, "fsdp")))
    sste_jax.metrics.check_sharding({"fc": SparseWeight(by_column)})
    rows_of_4 = jax.device_put(jnp.zeros((32, 8)), NamedSharding(mesh, P("fsdp")))
    sste_jax.metrics.check_sharding({"fc": SparseWeight(rows_of_4)})
    # A kernel grouped along axis 1 is checked along axis 1.
    placed = jax.device_put(jnp.zeros((8, 16)), NamedSharding(mesh, P(None, "fsdp")))
    with pytest.raises(ValueError, match=r"weight 'e'.*axis 1"):
        sste_jax.metrics.check_sharding({"e": SparseWeight(placed, axis=1)})


class _MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, d: int = 32):
        self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
        self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x_BxD):
        return self.fc2(jax.nn.gelu(self.fc1(x_BxD)))


def _sparse_mlp(d: int = 32) -> _MLP:
    model = _MLP(nnx.Rngs(0), d)
    model.fc1 = sparse_nnx.SparseLinear.from_linear(model.fc1, SparsityConfig())
    model.fc2 = sparse_nnx.SparseLinear.from_linear(model.fc2, SparsityConfig())
    return model


def _shard_kernels(model, mesh, spec):
    """FSDP: every 2-D parameter sharded by ``spec``, the rest replicated."""
    state = nnx.state(model)
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec if x.ndim == 2 else P()), state)
    nnx.update(model, jax.device_put(state, shardings))


@nnx.jit
def _nnx_step(model, optimizer, x_BxD, y_BxD):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x_BxD) - y_BxD) ** 2))(model)
    optimizer.update(model, grads)
    return loss


def _nnx_train(model, put_batch=lambda t: t):
    optimizer = nnx.Optimizer(model, _TX, wrt=nnx.Param)
    keys = jax.random.split(jax.random.key(9), 3)
    losses = []
    for k in keys:
        x_BxD = jax.random.normal(k, (32, 32))
        losses.append(float(_nnx_step(model, optimizer, put_batch(x_BxD), put_batch(jnp.sin(x_BxD)))))
    return {n: w.kernel for n, w in sste_jax.sparse_weights(model).items()}, losses


def test_nnx_model_fsdp_and_data_parallel_equals_unsharded():
    mesh = _mesh((2, 4), ("data", "fsdp"))
    model = _sparse_mlp()
    _shard_kernels(model, mesh, P("fsdp", None))
    sste_jax.metrics.check_sharding(sste_jax.sparse_weights(model))
    assert model.fc1.kernel[...].sharding.shard_shape((32, 128)) == (8, 128)
    kernels, losses = _nnx_train(model, lambda t: jax.device_put(t, NamedSharding(mesh, P("data"))))
    ref_kernels, ref_losses = _nnx_train(_sparse_mlp())
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert ref_losses[-1] < ref_losses[0]
    for n in ref_kernels:
        np.testing.assert_allclose(np.asarray(kernels[n]), np.asarray(ref_kernels[n]), rtol=1e-5, atol=1e-6)
        assert np.array_equal(sste_jax.mask_24(kernels[n]), sste_jax.mask_24(ref_kernels[n]))


def test_nnx_model_with_group_splitting_sharding_names_the_layer():
    model = _sparse_mlp(d=16)  # fc1 has 16 input rows: 8 shards of 2 split its groups; fc2's 64 rows don't
    _shard_kernels(model, _mesh((8,), ("fsdp",)), P("fsdp", None))
    with pytest.raises(ValueError, match=r"weight 'fc1/kernel'.*\(16, 64\).*\(2, 64\)"):
        sste_jax.metrics.check_sharding(sste_jax.sparse_weights(model))


def test_mvue_on_a_sharded_gradient_equals_the_unsharded_and_differs_across_shards():
    # The MVUE key is one replicated value per layer and step; each random draw is indexed by its
    # position in the global array, so the samples do not depend on the sharding, and identical rows
    # on different data shards are sampled independently.
    row = jax.random.normal(jax.random.key(3), (1, 64))
    g_TxO = jnp.tile(row, (32, 1))  # every token has the same gradient row
    key = jax.random.key(7)
    sample = jax.jit(lambda k, g: sste_jax.mvue_24(k, g, axis=0))
    want = np.asarray(sample(key, g_TxO))
    mesh = _mesh((8,), ("data",))
    sharded = sample(key, jax.device_put(g_TxO, NamedSharding(mesh, P("data", None))))
    np.testing.assert_array_equal(np.asarray(sharded), want)
    shards = [np.asarray(s.data) for s in sharded.addressable_shards]
    assert len(shards) == 8 and not any(np.array_equal(shards[0], s) for s in shards[1:])
