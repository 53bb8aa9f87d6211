"""sste_jax.linen: SparseDense, the sparsify_dense interceptor on an unmodified model, training."""
import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import sste_jax
from sste_jax import SparsityConfig
from sste_jax import linen as sparse_linen


class _MLP(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x_BxLxD):
        return nn.Dense(self.d, name="proj")(nn.gelu(nn.Dense(4 * self.d, name="fc")(x_BxLxD)))


class _Block(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x_BxLxD):
        h = nn.LayerNorm()(x_BxLxD)
        q, k, v = jnp.split(nn.Dense(3 * self.d, name="qkv")(h), 3, axis=-1)
        a_BxLxL = jax.nn.softmax(jnp.einsum("bld,bmd->blm", q, k) / np.sqrt(self.d), axis=-1)
        x_BxLxD = x_BxLxD + nn.Dense(self.d, name="proj")(jnp.einsum("blm,bmd->bld", a_BxLxL, v))
        return x_BxLxD + _MLP(self.d, name="mlp")(nn.LayerNorm()(x_BxLxD))


class _Transformer(nn.Module):
    vocab: int = 11
    d: int = 16

    @nn.compact
    def __call__(self, tokens_BxL):
        h = nn.Embed(self.vocab, self.d)(tokens_BxL)
        for i in range(2):
            h = _Block(self.d, name=f"block_{i}")(h)
        return nn.Dense(self.vocab, name="head")(h)


_TOKENS = jnp.tile(jnp.arange(9) % 5, (4, 1))


def _is_24(w) -> bool:
    return bool(np.asarray(w != 0).reshape(w.shape[0] // 4, 4, w.shape[1]).sum(1).max() <= 2)


def test_sparse_dense_has_dense_param_tree_and_frozen_beta():
    x_BxI = jax.random.normal(jax.random.key(1), (3, 8))
    dense_vars = nn.Dense(4).init(jax.random.key(0), x_BxI)
    variables = sparse_linen.SparseDense(4).init(jax.random.key(0), x_BxI)
    chex.assert_trees_all_equal(variables["params"], dense_vars["params"])
    beta = variables["sparsity"]["beta"].value  # a SparsityBeta box naming the layer's method
    assert variables["sparsity"]["beta"].sparse_method == "sste"
    assert np.asarray(beta).tobytes() == np.asarray(sste_jax.fit_beta(variables["params"]["kernel"])).tobytes()
    y = sparse_linen.SparseDense(4).apply(variables, x_BxI)
    want = sste_jax.sparse_dense(x_BxI, variables["params"]["kernel"], beta) + variables["params"]["bias"][None]
    np.testing.assert_array_equal(y, want)
    with pytest.raises(flax.errors.ScopeCollectionNotFound, match="sparsity"):  # β is created at init only
        sparse_linen.SparseDense(4).apply({"params": variables["params"]}, x_BxI)
    with pytest.raises(ValueError, match="contraction length 6"):
        sparse_linen.SparseDense(4).init(jax.random.key(0), jnp.ones((2, 6)))
    same = sparse_linen.SparseDense(4, config=SparsityConfig(method="dense"))
    np.testing.assert_array_equal(same.apply(variables, x_BxI), nn.Dense(4).apply(dense_vars, x_BxI))


def test_sparsify_dense_intercepts_the_feed_forward_layers_of_an_unmodified_model():
    model = _Transformer()
    dense_vars = model.init(jax.random.key(0), _TOKENS)
    with sparse_linen.sparsify_dense():  # active while tracing
        variables = jax.jit(lambda p: sparse_linen.fit_sparsity(model, p, _TOKENS))(dense_vars["params"])
        y_sparse = jax.jit(model.apply)(variables, _TOKENS)
    assert sorted(variables["sparsity"]) == ["block_0", "block_1"]
    for block in ("block_0", "block_1"):
        assert sorted(variables["sparsity"][block]) == ["mlp"]
        assert sorted(variables["sparsity"][block]["mlp"]) == ["fc", "proj"]
    # The same model run densely with W̃ = β·S(W) baked into the feed-forward kernels gives the same output.
    baked = jax.tree.map(lambda x: x, dense_vars["params"])
    for block in ("block_0", "block_1"):
        for name in ("fc", "proj"):
            layer = baked[block]["mlp"][name]
            beta = nn.unbox(variables["sparsity"][block]["mlp"][name]["beta"])
            assert np.asarray(beta).tobytes() == np.asarray(sste_jax.fit_beta(layer["kernel"])).tobytes()
            layer["kernel"] = sste_jax.forward_weight(layer["kernel"], beta, SparsityConfig())
    dense_apply = jax.jit(model.apply)
    np.testing.assert_allclose(y_sparse, dense_apply({"params": baked}, _TOKENS), rtol=1e-5, atol=1e-5)
    assert not np.allclose(y_sparse, dense_apply(dense_vars, _TOKENS), atol=1e-3)
    # Outside the context the model is dense again; an unsparsifiable selected layer raises, naming it.
    with sparse_linen.sparsify_dense(where=sparse_linen.all_dense):
        with pytest.raises(ValueError, match=r"Dense: the contraction length 7"):
            nn.Dense(3, name="head").init(jax.random.key(0), jnp.ones((2, 7)))


def test_feed_forward_preset_on_linen_paths():
    ff, dense = sparse_linen.feed_forward, nn.Dense(4)
    assert ff(("block_0", "mlp", "proj"), dense) and ff(("layers_3", "fc1"), dense) and ff(("h_0", "wi"), dense)
    assert not ff(("block_0", "proj"), dense) and not ff(("fc",), dense) and not ff(("head",), dense)


def test_training_an_intercepted_model_keeps_beta_and_24():
    model = _Transformer()
    with sparse_linen.sparsify_dense():
        variables = model.init(jax.random.key(0), _TOKENS)
    tx = sste_jax.freeze_beta(optax.adamw(3e-2, b1=0.9, b2=0.95, weight_decay=0.1))
    state = tx.init(variables)

    @jax.jit
    def step(variables, state):
        def loss_fn(v):
            with sparse_linen.sparsify_dense():
                logits = model.apply(v, _TOKENS[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, _TOKENS[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, state = tx.update(grads, state, variables)
        return optax.apply_updates(variables, updates), state, loss

    losses = []
    beta0 = np.asarray(jax.tree.leaves(variables["sparsity"])).tobytes()
    for _ in range(8):
        variables, state, loss = step(variables, state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    assert np.asarray(jax.tree.leaves(variables["sparsity"])).tobytes() == beta0
    for block in ("block_0", "block_1"):
        for name in ("fc", "proj"):
            kernel = variables["params"][block]["mlp"][name]["kernel"]
            beta = nn.unbox(variables["sparsity"][block]["mlp"][name]["beta"])
            assert _is_24(sste_jax.forward_weight(kernel, beta, SparsityConfig()))
    mask = sparse_linen.sparse_kernel_mask(variables)
    assert mask["block_0"]["mlp"]["fc"]["kernel"] and not mask["block_0"]["proj"]["kernel"]
    assert not mask["block_0"]["mlp"]["fc"]["bias"] and not mask["head"]["kernel"]


def test_mvue_keys_come_from_the_sparsity_rng_stream():
    layer = sparse_linen.SparseDense(4, config=SparsityConfig(mvue=True))
    x_TxI = jax.random.normal(jax.random.key(1), (8, 8))
    variables = layer.init({"params": jax.random.key(0), "sparsity": jax.random.key(1)}, x_TxI)

    def grad(key):
        def loss(p):
            return jnp.sum(layer.apply({**variables, "params": p}, x_TxI, rngs={"sparsity": key}) ** 2)

        return jax.grad(loss)(variables["params"])["kernel"]

    np.testing.assert_array_equal(grad(jax.random.key(5)), grad(jax.random.key(5)))
    assert not np.array_equal(grad(jax.random.key(5)), grad(jax.random.key(6)))
    with pytest.raises(flax.errors.InvalidRngError, match="sparsity"):
        layer.apply(variables, x_TxI)


def test_init_refuses_a_kernel_whose_beta_cannot_be_fitted():
    x = jnp.ones((2, 8))
    layer = sparse_linen.SparseDense(4, kernel_init=nn.initializers.zeros)
    with pytest.raises(ValueError, match=r"SparseDense.*all zero.*load the weights first, or pass beta"):
        layer.init(jax.random.key(0), x)
    assert float(sparse_linen.SparseDense(4, kernel_init=nn.initializers.zeros, beta=1.5).init(
        jax.random.key(0), x)["sparsity"]["beta"].value) == 1.5
    # Traced init cannot raise: β is NaN, never a silent 1.0.
    assert np.isnan(float(jax.jit(layer.init)(jax.random.key(0), x)["sparsity"]["beta"].value))
    model = nn.Sequential([nn.Dense(8, kernel_init=nn.initializers.zeros), nn.Dense(4)])
    with sparse_linen.sparsify_dense(where=sparse_linen.all_dense):
        with pytest.raises(ValueError, match="layers_0.*all zero"):
            model.init(jax.random.key(0), x)
    with sparse_linen.sparsify_dense(where=sparse_linen.all_dense, beta=1.25):
        v = model.init(jax.random.key(0), x)
    assert float(v["sparsity"]["layers_0"]["beta"].value) == 1.25


def test_fit_sparsity_refuses_non_finite_weights():
    model = nn.Sequential([nn.Dense(8), nn.Dense(4)])
    x = jnp.ones((2, 8))
    params = model.init(jax.random.key(0), x)["params"]
    params["layers_1"]["kernel"] = params["layers_1"]["kernel"].at[1, 1].set(jnp.inf)
    with sparse_linen.sparsify_dense(where=sparse_linen.all_dense):
        with pytest.raises(ValueError, match="layers_1.*NaN or infinite"):
            sparse_linen.fit_sparsity(model, params, x)
