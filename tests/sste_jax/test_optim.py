"""freeze_beta, add_srste_decay and add_masked_decay on constructed cases."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sste_jax
from sste_jax import SparsityConfig
from sste_jax import nnx as sparse_nnx

_INNERS = {
    "adam": optax.adam(1e-2),
    "adamw_masked_decay": optax.adamw(1e-2, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)),
    "sgd_momentum": optax.sgd(1e-2, momentum=0.9),
    "clip_adamw": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1)),
    "lion": optax.lion(1e-3, weight_decay=0.5),
}


def _paths(tree) -> list[str]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) for path, _ in flat]


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "fc1": {"kernel": jax.random.normal(k1, (8, 4)), "bias": jnp.ones(4), "beta": jnp.float32(1.7)},
        "fc2": {"kernel": jax.random.normal(k2, (4, 8)), "beta": jnp.float32(0.9)},
    }


@pytest.mark.parametrize("name", sorted(_INNERS))
def test_freeze_beta_zero_update_and_no_state(name):
    inner, params = _INNERS[name], _params()
    tx = sste_jax.freeze_beta(inner)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    assert not any("beta" in p for p in _paths(state))
    without_beta = {k: {n: v for n, v in layer.items() if n != "beta"} for k, layer in params.items()}
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(inner.init(without_beta)))
    for _ in range(3):
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
        assert float(updates["fc1"]["beta"]) == 0.0 and float(updates["fc2"]["beta"]) == 0.0
        assert float(jnp.abs(updates["fc1"]["kernel"]).min()) > 0
    assert float(params["fc1"]["beta"]) == np.float32(1.7) and float(params["fc2"]["beta"]) == np.float32(0.9)


def test_freeze_beta_linen_collection_and_custom_predicate():
    variables = {
        "params": {"Dense_0": {"kernel": jnp.ones((4, 4))}},
        "sparsity": {"Dense_0": {"beta": jnp.float32(2.0)}},
    }
    tx = sste_jax.freeze_beta(optax.adamw(0.1, weight_decay=0.1))
    updates, state = tx.update(variables, tx.init(variables), variables)
    assert float(updates["sparsity"]["Dense_0"]["beta"]) == 0.0 and not any("sparsity" in p for p in _paths(state))
    custom = sste_jax.freeze_beta(optax.sgd(0.1), is_frozen=lambda path, leaf: path[-1] == "scale")
    params = {"scale": jnp.float32(3.0), "beta": jnp.float32(1.0)}
    updates, _ = custom.update(params, custom.init(params), params)
    assert float(updates["scale"]) == 0.0  # the custom rule replaces is_beta:
    assert float(updates["beta"]) == np.float32(-0.1)


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.mlp = nnx.List([nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 4, rngs=rngs)])
        self.swish_beta = nnx.Param(jnp.float32(1.0))

    def __call__(self, x):
        return self.mlp[1](jax.nn.swish(self.mlp[0](x)) * self.swish_beta[...])


def _sparse_net(config: SparsityConfig = SparsityConfig()) -> _Net:
    """A `_Net` whose linear layers are `SparseLinear` layers holding the same variables."""
    model = _Net(nnx.Rngs(0))
    for i, layer in enumerate(list(model.mlp)):
        model.mlp[i] = sparse_nnx.SparseLinear.from_linear(layer, config)
    return model


@pytest.mark.parametrize(
    "wrt",
    [nnx.Param, nnx.Variable, nnx.Any(nnx.Param, sparse_nnx.SparsityBeta), sparse_nnx.SparsityBeta],
    ids=["param", "variable", "param_or_beta", "beta_only"],
)
def test_freeze_beta_under_any_nnx_filter(wrt):
    model = _sparse_net()
    betas = [np.asarray(layer.beta[...]).tobytes() for layer in model.mlp]
    optimizer = nnx.Optimizer(model, sste_jax.freeze_beta(optax.adamw(1e-2, weight_decay=0.1)), wrt=wrt)
    assert not any("beta" in p and "swish" not in p for p in _paths(nnx.as_pure(nnx.state(optimizer.opt_state))))

    @nnx.jit
    def step(model, optimizer, x):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)

    kernel0 = np.asarray(model.mlp[0].kernel[...])
    for _ in range(2):
        step(model, optimizer, jnp.ones((4, 8)))
    assert [np.asarray(layer.beta[...]).tobytes() for layer in model.mlp] == betas
    assert (wrt is sparse_nnx.SparsityBeta) == np.array_equal(kernel0, model.mlp[0].kernel[...])


def test_freeze_beta_refuses_a_param_named_beta_and_a_missed_sparsity_beta():
    class WithBeta(nnx.Module):
        def __init__(self):
            self.beta = nnx.Param(jnp.float32(1.0))

    with pytest.raises(ValueError, match=r"beta is a Param, not a SparsityBeta"):
        nnx.Optimizer(WithBeta(), sste_jax.freeze_beta(optax.adam(1e-2)), wrt=nnx.Param)
    model = _sparse_net()
    with pytest.raises(ValueError, match=r"mlp/0/beta is not selected"):
        nnx.Optimizer(model, sste_jax.freeze_beta(optax.adam(1e-2), lambda path, leaf: False), wrt=nnx.Variable)


def test_srste_decay_adds_the_pruned_weights_to_selected_kernels_only():
    w = jnp.array([[4.0, -1.0], [-3.0, 2.0], [0.5, -5.0], [2.0, 0.25]])  # groups of 4 along axis 0
    params = {"sparse": w, "dense": w, "bias": jnp.ones(2)}
    mask = {"sparse": True, "dense": False, "bias": False}
    tx = sste_jax.optim.add_srste_decay(mask, decay=0.5)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    pruned = jnp.array([[0.0, -1.0], [0.0, 0.0], [0.5, 0.0], [2.0, 0.25]])  # the two smallest |w| per column
    np.testing.assert_array_equal(updates["sparse"], 0.5 * pruned)
    np.testing.assert_array_equal(updates["dense"], 0.0)
    np.testing.assert_array_equal(updates["bias"], 0.0)
    with pytest.raises(ValueError, match=r"2-D kernels.*shape \(2,\)"):
        bad = sste_jax.optim.add_srste_decay({"sparse": True, "dense": False, "bias": True})
        bad.update(grads, bad.init(params), params)


def test_ste_layers_with_srste_transform_equal_srste_layers():
    x_BxI = jax.random.normal(jax.random.key(1), (6, 8))

    def grad_and_mask(method):
        model = _sparse_net(SparsityConfig(method=method))
        grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x_BxI) ** 2)))(model)
        return model, nnx.as_pure(grads)

    srste_model, srste_grads = grad_and_mask("srste")
    ste_model, ste_grads = grad_and_mask("ste")
    tx = sste_jax.optim.add_srste_decay(sste_jax.optim.sparse_kernel_mask(ste_model))
    params = nnx.as_pure(nnx.state(ste_model, nnx.Param))
    updates, _ = tx.update(ste_grads, tx.init(params), params)
    chex.assert_trees_all_close(updates, srste_grads, rtol=1e-6, atol=1e-9)


def test_masked_decay_reads_the_masks_the_layers_refresh_every_40_steps():
    # the baseline's schedule: the layer's mask is refreshed from the current weights at steps 0, 40, 80 (the
    # update of count c uses transposable_mask_24 of the weights after update c - c % 40), and the decay reads it
    layer = sparse_nnx.SparseLinear(8, 4, config=SparsityConfig(method="tsrste"), rngs=nnx.Rngs(0), use_bias=True)
    tx = sste_jax.optim.add_masked_decay(decay=0.25)
    keys = jax.random.split(jax.random.key(3), 81)
    weights = [jax.random.normal(k, (8, 4)) for k in keys]
    params = nnx.as_pure(nnx.state(layer, nnx.Param))
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step, w in enumerate(weights):
        layer.kernel[...] = w
        if step % 40 == 0:
            assert sparse_nnx.refresh_masks(layer) == 1
        params = nnx.as_pure(nnx.state(layer, nnx.Param))
        masks = sste_jax.optim.forward_masks(layer)
        assert masks["bias"] is None
        updates, state = update(jax.tree.map(jnp.zeros_like, params), state, params, masks=masks)
        m = np.asarray(sste_jax.transposable_mask_24(weights[step - step % 40]))
        np.testing.assert_array_equal(updates["kernel"], 0.25 * np.where(m, 0.0, np.asarray(w)))
        np.testing.assert_array_equal(updates["bias"], 0.0)
        if step % 40:  # between refreshes the layer's mask is not the current weights' mask
            assert not np.array_equal(m, sste_jax.transposable_mask_24(w))
    assert int(state.count) == 81
    with pytest.raises(ValueError, match="forward masks"):
        tx.update(params, state, params)


def test_masked_decay_takes_the_masks_through_freeze_beta_and_nnx_optimizer():
    model = nnx.Sequential(sparse_nnx.SparseLinear(8, 8, config=SparsityConfig(method="tsrste"), rngs=nnx.Rngs(0)),
                           nnx.Linear(8, 8, rngs=nnx.Rngs(1)))
    w = model.layers[0].kernel[...]
    tx = sste_jax.freeze_beta(optax.chain(optax.clip_by_global_norm(1.0), sste_jax.optim.add_masked_decay(0.5),
                                          optax.sgd(1.0)))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    optimizer.update(model, zeros, masks=sste_jax.optim.forward_masks(model))
    m = np.asarray(model.layers[0].mask[...])
    np.testing.assert_allclose(model.layers[0].kernel[...], np.where(m, w, 0.5 * w), rtol=1e-6)
