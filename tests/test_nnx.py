"""sste_jax.nnx: SparseLinear, sparsify on a small transformer, training with freeze_beta, MVUE keys."""
import re

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


class _Attention(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs):
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
        self.proj = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x_BxLxD):
        q, k, v = jnp.split(self.qkv(x_BxLxD), 3, axis=-1)
        a_BxLxL = jax.nn.softmax(jnp.einsum("bld,bmd->blm", q, k) / np.sqrt(q.shape[-1]), axis=-1)
        return self.proj(jnp.einsum("blm,bmd->bld", a_BxLxL, v))


class _MLP(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs):
        self.fc = nnx.Linear(d, 4 * d, rngs=rngs)
        self.proj = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x_BxLxD):
        return self.proj(jax.nn.gelu(self.fc(x_BxLxD)))


class _Block(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = _Attention(d, rngs)
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp = _MLP(d, rngs)

    def __call__(self, x_BxLxD):
        x_BxLxD = x_BxLxD + self.attn(self.norm1(x_BxLxD))
        return x_BxLxD + self.mlp(self.norm2(x_BxLxD))


class _Transformer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, vocab: int = 11, d: int = 16, layers: int = 2):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = nnx.List([_Block(d, rngs) for _ in range(layers)])
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens_BxL):
        h_BxLxD = self.embed(tokens_BxL)
        for block in self.blocks:
            h_BxLxD = block(h_BxLxD)
        return self.head(h_BxLxD)


def _sparse_layers(model):
    return {"/".join(map(str, p)): m for p, m in nnx.iter_graph(model) if isinstance(m, sparse_nnx.SparseLinear)}


def _is_24(w) -> bool:
    nonzero = np.asarray(w != 0).reshape(w.shape[0] // 4, 4, w.shape[1]).sum(1)
    return bool(nonzero.max() <= 2)


def test_sparsify_swaps_feed_forward_layers_in_place_keeping_variables():
    model = _Transformer(nnx.Rngs(0))
    kernels = {i: model.blocks[i].mlp.fc.kernel for i in range(2)}
    before = nnx.state(model, nnx.Param)
    assert sparse_nnx.sparsify(model) is model
    assert sorted(_sparse_layers(model)) == [f"blocks/{i}/mlp/{n}" for i in (0, 1) for n in ("fc", "proj")]
    assert type(model.blocks[0].attn.proj) is nnx.Linear and type(model.head) is nnx.Linear
    for i in range(2):
        fc = model.blocks[i].mlp.fc
        assert fc.kernel is kernels[i]  # the same variable, not a copy
        assert np.asarray(fc.beta[...]).tobytes() == np.asarray(sste_jax.fit_beta(fc.kernel[...])).tobytes()
        assert type(fc.beta) is sparse_nnx.SparsityBeta and not isinstance(fc.beta, nnx.Param)
    after = nnx.state(model, nnx.Param)
    assert jax.tree.structure(before) == jax.tree.structure(after)  # β is not a Param
    # Sparsifying again leaves sparse layers (and their β) alone.
    model.blocks[0].mlp.fc.kernel[...] *= 2
    assert sparse_nnx.sparsify(model) is model
    assert sorted(_sparse_layers(model)) == [f"blocks/{i}/mlp/{n}" for i in (0, 1) for n in ("fc", "proj")]
    assert float(model.blocks[0].mlp.fc.beta[...]) == float(sste_jax.fit_beta(kernels[0][...] / 2))
    with pytest.raises(ValueError, match="selected no nnx.Linear"):  # a `where` that matches nothing at all
        sparse_nnx.sparsify(model, where=lambda path, layer: False)


def test_feed_forward_and_all_linear_presets():
    ff = sparse_nnx.feed_forward
    layer = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
    assert ff(("blocks", 0, "mlp", "c_proj"), layer) and ff(("h", 3, "fc1"), layer)
    assert ff(("layers", 1, "feed_forward", "w2"), layer) and ff(("blocks", 2, "up_proj"), layer)
    assert not ff(("blocks", 0, "attn", "proj"), layer) and not ff(("fc",), layer) and not ff(("head",), layer)
    model = _Transformer(nnx.Rngs(0), vocab=10)  # head: 16 -> 10, contraction 16: selected
    sparse_nnx.sparsify(model, where=sparse_nnx.all_linear)
    assert len(_sparse_layers(model)) == 9
    assert not sparse_nnx.all_linear(("x",), nnx.Linear(6, 8, rngs=nnx.Rngs(0)))


def test_unsparsifiable_selected_layers_are_reported_and_nothing_changes():
    model = _Transformer(nnx.Rngs(0))
    model.blocks[1].mlp.fc = nnx.Linear(18, 64, rngs=nnx.Rngs(1))
    model.blocks[1].mlp.proj = nnx.Linear(64, 18, precision=jax.lax.Precision.HIGH, rngs=nnx.Rngs(1))
    model.blocks[0].mlp.fc = type("MyLinear", (nnx.Linear,), {})(16, 64, rngs=nnx.Rngs(1))
    with pytest.raises(
        ValueError,
        match=r"blocks/0/mlp/fc: MyLinear subclasses[\s\S]*"
        r"blocks/1/mlp/fc: .*in_features=18.*\(18, 64\)[\s\S]*blocks/1/mlp/proj: .*precision",
    ):
        sparse_nnx.sparsify(model)
    assert not _sparse_layers(model)
    # A dense config does not need groups of 4.
    model.blocks[0].mlp.fc = nnx.Linear(16, 64, rngs=nnx.Rngs(1))
    sparse_nnx.sparsify(model, SparsityConfig(method="dense"), where=lambda path, m: path[-2:] == ("mlp", "fc"))
    assert sorted(_sparse_layers(model)) == ["blocks/0/mlp/fc", "blocks/1/mlp/fc"]


def test_sparse_linear_matches_nnx_linear_and_sparse_dense():
    dense = nnx.Linear(8, 12, rngs=nnx.Rngs(3))
    same = sparse_nnx.SparseLinear(8, 12, config=SparsityConfig(method="dense"), rngs=nnx.Rngs(3))
    x_BxLxI = jax.random.normal(jax.random.key(1), (2, 3, 8))
    np.testing.assert_array_equal(same(x_BxLxI), dense(x_BxLxI))  # same init, same product
    layer = sparse_nnx.SparseLinear(8, 12, rngs=nnx.Rngs(3))
    layer.bias[...] = jnp.arange(12.0)
    want = sste_jax.sparse_dense(x_BxLxI, layer.kernel[...], layer.beta[...]) + jnp.arange(12.0)[None, None]
    np.testing.assert_array_equal(layer(x_BxLxI), want)
    w_tilde = layer.forward_weight()
    assert _is_24(w_tilde)
    want_w = sste_jax.forward_weight(layer.kernel[...], layer.beta[...], SparsityConfig())
    np.testing.assert_array_equal(w_tilde, want_w)
    # dtype promotion follows nnx.Linear: bf16 params and compute give a bf16 output.
    half = sparse_nnx.SparseLinear(8, 4, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert half(x_BxLxI).dtype == nnx.Linear(8, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(x_BxLxI).dtype == jnp.bfloat16
    assert half.beta[...].dtype == jnp.float32
    assert float(sparse_nnx.SparseLinear(8, 4, config=SparsityConfig(method="ste"), rngs=nnx.Rngs(0)).beta[...]) == 1.0
    with pytest.raises(ValueError, match=r"SparseLinear\(6, 4\).*in_features=6"):
        sparse_nnx.SparseLinear(6, 4, rngs=nnx.Rngs(0))


def test_dense_state_loads_into_sparsified_model_by_name():
    dense = _Transformer(nnx.Rngs(0))
    sparse = sparse_nnx.sparsify(_Transformer(nnx.Rngs(1)))
    betas = {n: np.asarray(m.beta[...]).tobytes() for n, m in _sparse_layers(sparse).items()}
    nnx.update(sparse, nnx.state(dense, nnx.Param))  # a dense checkpoint: params only, same names
    chex.assert_trees_all_equal(nnx.state(sparse, nnx.Param), nnx.state(dense, nnx.Param))
    assert {n: np.asarray(m.beta[...]).tobytes() for n, m in _sparse_layers(sparse).items()} == betas
    # ... and the sparse model's params load back into the dense model.
    other = _Transformer(nnx.Rngs(2))
    nnx.update(other, nnx.state(sparse, nnx.Param))
    tokens_BxL = jnp.arange(12).reshape(2, 6) % 11
    np.testing.assert_array_equal(other(tokens_BxL), dense(tokens_BxL))


@nnx.jit
def _train_step(model, optimizer, tokens_BxL):
    def loss_fn(m):
        logits = m(tokens_BxL[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BxL[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def test_training_with_freeze_beta_keeps_beta_and_24():
    model = sparse_nnx.sparsify(_Transformer(nnx.Rngs(0)))
    betas = {n: np.asarray(m.beta[...]).tobytes() for n, m in _sparse_layers(model).items()}
    tx = sste_jax.freeze_beta(optax.adamw(3e-2, b1=0.9, b2=0.95, weight_decay=0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    tokens_BxL = jnp.tile(jnp.arange(9) % 5, (4, 1))  # a memorisable sequence
    losses = [float(_train_step(model, optimizer, tokens_BxL)) for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0]
    for name, layer in _sparse_layers(model).items():
        assert np.asarray(layer.beta[...]).tobytes() == betas[name]
        assert _is_24(layer.forward_weight())


def test_mvue_keys_differ_per_layer_and_call_and_are_reproducible():
    config = SparsityConfig(mvue=True)

    def build(seed):
        model = _Transformer(nnx.Rngs(0))
        return sparse_nnx.sparsify(model, config, rngs=nnx.Rngs(sparsity=seed))

    with pytest.raises(ValueError, match="rngs"):
        sparse_nnx.sparsify(_Transformer(nnx.Rngs(0)), config)

    @nnx.jit
    def grads(model):
        return nnx.grad(lambda m: jnp.sum(m(jnp.arange(8).reshape(2, 4) % 11) ** 2))(model)

    a, b, c = build(5), build(5), build(6)
    g_a1, g_b1, g_c1 = grads(a), grads(b), grads(c)
    g_a2 = grads(a)
    k = lambda g, i: np.asarray(g["blocks"][i]["mlp"]["fc"]["kernel"][...])  # noqa: E731
    np.testing.assert_array_equal(k(g_a1, 0), k(g_b1, 0))  # same seed: same keys
    assert not np.array_equal(k(g_a1, 0), k(g_c1, 0))  # other seed
    assert not np.array_equal(k(g_a1, 0), k(g_a2, 0))  # the stream advanced (state carried by nnx.jit)
    assert int(a.blocks[0].mlp.fc.rngs.count[...]) == 2
    keys = {str(jax.random.key_data(m.rngs.key[...])) for m in _sparse_layers(a).values()}
    assert len(keys) == 4  # one stream per layer


def test_mvue_under_nnx_scan():
    layer = sparse_nnx.SparseLinear(8, 4, config=SparsityConfig(mvue=True), rngs=nnx.Rngs(0))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def grad_steps(layer, x_TxI):
        g = nnx.grad(lambda m: jnp.sum(m(x_TxI) ** 2))(layer)
        return layer, g["kernel"][...]

    x_SxTxI = jnp.broadcast_to(jax.random.normal(jax.random.key(2), (4, 8)), (3, 4, 8))
    _, g_SxIxO = grad_steps(layer, x_SxTxI)
    assert int(layer.rngs.count[...]) == 3
    assert not np.array_equal(g_SxIxO[0], g_SxIxO[1])  # fresh keys on every scanned step


def test_sparse_kernel_mask_selects_sparse_kernels_of_the_given_methods():
    model = _Transformer(nnx.Rngs(0))
    sparse_nnx.sparsify(model, SparsityConfig(method="srste"), where=lambda path, _: path[-2:] == ("mlp", "proj"))
    sparse_nnx.sparsify(model, SparsityConfig(method="ste"))  # the feed-forward layers still dense: fc

    def selected(**kw):
        flat = nnx.to_flat_state(sparse_nnx.sparse_kernel_mask(model, **kw))
        return sorted("/".join(map(str, p)) for p, v in flat if v)

    kernels = [f"blocks/{i}/mlp/{n}/kernel" for i in (0, 1) for n in ("fc", "proj")]
    assert selected() == kernels
    assert selected(methods=("ste",)) == [k for k in kernels if "/fc/" in k]
    assert selected(methods=("srste", "dense")) == [k for k in kernels if "/proj/" in k]
    mask = sparse_nnx.sparse_kernel_mask(model)
    assert jax.tree.structure(nnx.as_pure(nnx.state(model, nnx.Param))) == jax.tree.structure(mask)


def test_tsrste_layers_hold_a_transposable_mask_refreshed_on_request():
    model = sparse_nnx.sparsify(_Transformer(nnx.Rngs(0)), SparsityConfig(method="tsrste"))
    layers = _sparse_layers(model)
    assert sorted(layers) == ["blocks/0/mlp/fc", "blocks/0/mlp/proj", "blocks/1/mlp/fc", "blocks/1/mlp/proj"]
    for layer in layers.values():
        assert isinstance(layer.mask, sparse_nnx.SparsityMask) and not isinstance(layer.mask, nnx.Param)
        np.testing.assert_array_equal(layer.mask[...], sste_jax.transposable_mask_24(layer.kernel[...]))
        assert _is_24(layer.forward_weight()) and _is_24(layer.forward_weight().T)
    fc = layers["blocks/0/mlp/fc"]
    old = np.asarray(fc.mask[...])
    fc.kernel[...] = jax.random.normal(jax.random.key(5), fc.kernel.shape)
    np.testing.assert_array_equal(fc.mask[...], old)  # stale until refreshed
    assert sparse_nnx.refresh_masks(model) == 4
    new = np.asarray(sste_jax.transposable_mask_24(fc.kernel[...]))
    assert (new != old).any()
    np.testing.assert_array_equal(fc.mask[...], new)
    # the mask is not trained
    assert not any("mask" in "/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def test_tsrste_needs_out_features_divisible_by_4():
    with pytest.raises(ValueError, match=r"out_features=6 \(kernel \(8, 6\)\) divisible by 4"):
        sparse_nnx.SparseLinear(8, 6, config=SparsityConfig(method="tsrste"), rngs=nnx.Rngs(0))


def test_refit_beta_sets_sste_betas_only():
    model = sparse_nnx.sparsify(_Transformer(nnx.Rngs(0)), SparsityConfig())
    layers = _sparse_layers(model)
    for layer in layers.values():
        layer.kernel[...] = 3.0 * layer.kernel[...]
    assert sparse_nnx.refit_beta(model) == 4
    for layer in layers.values():
        assert float(layer.beta[...]) == pytest.approx(float(sste_jax.fit_beta(layer.kernel[...])))
    assert sparse_nnx.refit_beta(model, lambda w: jnp.float32(2.0)) == 4
    assert all(float(layer.beta[...]) == 2.0 for layer in layers.values())
    ste = sparse_nnx.sparsify(_Transformer(nnx.Rngs(0)), SparsityConfig(method="ste"))
    assert sparse_nnx.refit_beta(ste) == 0
    assert all(float(layer.beta[...]) == 1.0 for layer in _sparse_layers(ste).values())


def test_sparsify_refuses_a_kernel_whose_beta_cannot_be_fitted():
    model = _Transformer(nnx.Rngs(0))
    model.blocks[1].mlp.fc.kernel[...] = jnp.zeros_like(model.blocks[1].mlp.fc.kernel[...])
    model.blocks[0].mlp.proj.kernel[...] = model.blocks[0].mlp.proj.kernel[...].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError) as info:
        sparse_nnx.sparsify(model)
    msg = str(info.value)
    assert "blocks/1/mlp/fc" in msg and "all zero" in msg and "blocks/0/mlp/proj" in msg and "NaN" in msg, msg
    assert "load the weights first, or pass beta" in msg
    assert not _sparse_layers(model)  # nothing changed
    sparse_nnx.sparsify(model, beta=1.25)
    assert all(float(m.beta[...]) == 1.25 for m in _sparse_layers(model).values())
    # Other methods ignore β: a zero kernel is fine for them.
    sparse_nnx.sparsify(_Transformer(nnx.Rngs(0)), SparsityConfig(method="ste"), where=lambda p, m: True)


def test_sparse_linear_with_zero_init_needs_beta():
    zeros = nnx.initializers.zeros
    with pytest.raises(ValueError, match=r"SparseLinear\(8, 4\).*all zero.*pass beta"):
        sparse_nnx.SparseLinear(8, 4, kernel_init=zeros, rngs=nnx.Rngs(0))
    layer = sparse_nnx.SparseLinear(8, 4, kernel_init=zeros, beta=1.5, rngs=nnx.Rngs(0))
    assert float(layer.beta[...]) == 1.5 and layer.beta[...].dtype == jnp.float32


def test_mvue_layer_runs_inference_on_any_token_count():
    layer = sparse_nnx.SparseLinear(8, 4, config=SparsityConfig(mvue=True), rngs=nnx.Rngs(0))
    for tokens in (1, 3):
        assert layer(jnp.ones((tokens, 8))).shape == (tokens, 4)
    with pytest.raises(ValueError, match="token count 3 must be divisible by 4"):
        nnx.grad(lambda m: m(jnp.ones((3, 8))).sum())(layer)


@pytest.mark.outside_annotations
@pytest.mark.parametrize("config", [{"method": "ste"}, "sste"])
def test_a_dict_or_string_config_is_refused_naming_the_call_and_the_fix(config):
    from sste_jax import linen as sparse_linen

    calls = {
        "sparsify": lambda: sparse_nnx.sparsify(nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0))), config),
        "SparseLinear(8, 4)": lambda: sparse_nnx.SparseLinear(8, 4, config=config, rngs=nnx.Rngs(0)),
        "sparse_dense": lambda: sste_jax.sparse_dense(jnp.ones((2, 8)), jnp.ones((8, 4)), 1.0, config=config),
        "forward_weight": lambda: sste_jax.forward_weight(jnp.ones((8, 4)), 1.0, config),
        "sparsity_spec": lambda: sste_jax.sparsity_spec({"w": jnp.ones((8, 4))}, lambda p, leaf: 0, config),
        "sparsify_dense": lambda: sparse_linen.sparsify_dense(config).__enter__(),
        "SparseDense": lambda: sparse_linen.SparseDense(4, config=config).init(jax.random.key(0), jnp.ones((2, 8))),
    }
    for where, call in calls.items():
        with pytest.raises(TypeError, match=re.escape(f"{where}: config must be a sste_jax.SparsityConfig")) as info:
            call()
        if isinstance(config, dict):
            assert "SparsityConfig(**{'method': 'ste'})" in str(info.value), where
