"""sste_jax.nnx: SparseLinear (built, or made from an nnx.Linear) on a small transformer, training with freeze_beta,
MVUE keys."""
import re

import chex
import flax.linen
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


FEED_FORWARD = next(iter(sste_jax.feed_forward()))  # the paper's choice, as a regex on paths


def _feed_forward(path) -> bool:
    return re.fullmatch(FEED_FORWARD, "/".join(map(str, path))) is not None


def _swap(model, config=SparsityConfig(), where=_feed_forward, *, rngs=None, beta=None):
    """Replaces, in place, the plain ``nnx.Linear`` layers whose path ``where`` selects by
    `SparseLinear.from_linear` (the same variables); returns ``model``."""
    chosen = [(path, node) for path, node in nnx.iter_graph(model) if type(node) is nnx.Linear and where(path)]
    for path, layer in chosen:
        parent = model
        for p in path[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        sparse = sparse_nnx.SparseLinear.from_linear(layer, config, rngs=rngs, beta=beta)
        if isinstance(path[-1], int):
            parent[path[-1]] = sparse
        else:
            setattr(parent, path[-1], sparse)
    return model


def _sparse_layers(model):
    return {"/".join(map(str, p)): m for p, m in nnx.iter_graph(model) if isinstance(m, sparse_nnx.SparseLinear)}


def _is_24(w) -> bool:
    nonzero = np.asarray(w != 0).reshape(w.shape[0] // 4, 4, w.shape[1]).sum(1)
    return bool(nonzero.max() <= 2)


def test_from_linear_keeps_the_linear_variables_and_fits_beta():
    model = _Transformer(nnx.Rngs(0))
    kernels = {i: model.blocks[i].mlp.fc.kernel for i in range(2)}
    biases = {i: model.blocks[i].mlp.fc.bias for i in range(2)}
    before = nnx.state(model, nnx.Param)
    assert _swap(model) is model
    assert sorted(_sparse_layers(model)) == [f"blocks/{i}/mlp/{n}" for i in (0, 1) for n in ("fc", "proj")]
    assert type(model.blocks[0].attn.proj) is nnx.Linear and type(model.head) is nnx.Linear
    for i in range(2):
        fc = model.blocks[i].mlp.fc
        assert fc.kernel is kernels[i] and fc.bias is biases[i]  # the same variables, not copies
        assert np.asarray(fc.beta[...]).tobytes() == np.asarray(sste_jax.fit_beta(fc.kernel[...])).tobytes()
        assert type(fc.beta) is sparse_nnx.SparsityBeta and not isinstance(fc.beta, nnx.Param)
        assert fc.beta.get_metadata()["spec"].config == SparsityConfig()
    after = nnx.state(model, nnx.Param)
    assert jax.tree.structure(before) == jax.tree.structure(after)  # β is not a Param
    # A sparse layer is not made sparse again (its β stays); to_linear gives back a plain layer holding W̃.
    with pytest.raises(TypeError, match="plain nnx.Linear, got SparseLinear"):
        sparse_nnx.SparseLinear.from_linear(model.blocks[0].mlp.fc)
    fc = model.blocks[0].mlp.fc
    plain = fc.to_linear()
    assert type(plain) is nnx.Linear
    np.testing.assert_array_equal(plain.kernel[...], fc.forward_weight())
    x_BxLxD = jax.random.normal(jax.random.key(0), (2, 3, 16))
    np.testing.assert_array_equal(plain(x_BxLxD), fc(x_BxLxD))


def test_feed_forward_rules_and_every_linear():
    ff = lambda *path: _feed_forward(path)  # noqa: E731
    assert ff("blocks", 0, "mlp", "c_proj") and ff("h", 3, "fc1")
    assert ff("layers", 1, "feed_forward", "w2") and ff("blocks", 2, "up_proj")
    assert not ff("blocks", 0, "attn", "proj") and not ff("fc") and not ff("head")
    model = _Transformer(nnx.Rngs(0), vocab=10)  # head: 16 -> 10, contraction 16: selected
    tokens_BxL = jnp.arange(8).reshape(2, 4) % 10
    every = sste_jax.sparsify(model, {".*": SparsityConfig()}, tokens_BxL)
    assert len(sste_jax.sparse_weights(every)) == 9
    with pytest.raises(ValueError, match=r"kernel: the contraction length 6 .* not divisible by 4"):
        sste_jax.sparsify(nnx.Linear(6, 8, rngs=nnx.Rngs(0)), {".*": SparsityConfig()}, jnp.ones((2, 6)))


def test_unsparsifiable_linear_layers_are_refused_and_left_unchanged():
    odd = nnx.Linear(18, 64, rngs=nnx.Rngs(1))
    precise = nnx.Linear(64, 18, precision=jax.lax.Precision.HIGH, rngs=nnx.Rngs(1))
    subclass = type("MyLinear", (nnx.Linear,), {})(16, 64, rngs=nnx.Rngs(1))
    kernel = odd.kernel
    with pytest.raises(TypeError, match="from_linear takes a plain nnx.Linear, got MyLinear"):
        sparse_nnx.SparseLinear.from_linear(subclass)
    with pytest.raises(ValueError, match=r"from_linear\(18, 64\): .*in_features=18.*\(18, 64\)"):
        sparse_nnx.SparseLinear.from_linear(odd)
    with pytest.raises(ValueError, match=r"from_linear\(64, 18\): .*precision"):
        sparse_nnx.SparseLinear.from_linear(precise)
    assert odd.kernel is kernel and type(odd) is nnx.Linear and not hasattr(odd, "beta")
    # A dense config does not need groups of 4.
    dense = sparse_nnx.SparseLinear.from_linear(odd, SparsityConfig(method="dense"))
    assert dense.kernel is kernel and dense.config.method == "dense"


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
    sparse = _swap(_Transformer(nnx.Rngs(1)))
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
    model = _swap(_Transformer(nnx.Rngs(0)))
    betas = {n: np.asarray(m.beta[...]).tobytes() for n, m in _sparse_layers(model).items()}
    tx = sste_jax.freeze_beta(optax.adamw(3e-2, b1=0.9, b2=0.95, weight_decay=0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    tokens_BxL = jnp.tile(jnp.arange(9) % 5, (4, 1))  # a memorisable sequence
    losses = [float(_train_step(model, optimizer, tokens_BxL)) for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0]
    for name, layer in _sparse_layers(model).items():
        assert np.asarray(layer.beta[...]).tobytes() == betas[name]
        assert _is_24(layer.forward_weight())


def test_mvue_keys_differ_per_layer_and_are_reproducible_and_hold_no_state():
    config = SparsityConfig(mvue=True)

    def build(seed):
        return _swap(_Transformer(nnx.Rngs(0)), config, rngs=nnx.Rngs(sparsity=seed))

    with pytest.raises(ValueError, match="rngs"):
        sparse_nnx.SparseLinear.from_linear(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), config)

    @nnx.jit
    def grads(model, tokens_BxL):
        return nnx.grad(lambda m: jnp.sum(m(tokens_BxL) ** 2))(model)

    tokens_BxL = jnp.arange(8).reshape(2, 4) % 11
    a, b, c = build(5), build(5), build(6)
    def values(model):
        return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
                for x in jax.tree.leaves(nnx.state(model))]

    state_before = values(a)
    g_a1, g_b1, g_c1 = grads(a, tokens_BxL), grads(b, tokens_BxL), grads(c, tokens_BxL)
    g_a2 = grads(a, tokens_BxL)
    k = lambda g, i: np.asarray(g["blocks"][i]["mlp"]["fc"]["kernel"][...])  # noqa: E731
    np.testing.assert_array_equal(k(g_a1, 0), k(g_b1, 0))  # same seed: same keys
    assert not np.array_equal(k(g_a1, 0), k(g_c1, 0))  # other seed
    np.testing.assert_array_equal(k(g_a1, 0), k(g_a2, 0))  # same inputs and weights: the same draw
    chex.assert_trees_all_equal(values(a), state_before)  # no state advanced
    layers = _sparse_layers(a).values()
    assert all(type(m.mvue_key) is sparse_nnx.MVUEKey and not isinstance(m.mvue_key, nnx.Param) for m in layers)
    keys = {str(jax.random.key_data(m.mvue_key[...])) for m in layers}
    assert len(keys) == 4  # one key per layer
    # Inference draws nothing: no key is needed for a forward pass.
    np.testing.assert_array_equal(a(tokens_BxL), c(tokens_BxL))


def test_mvue_draw_is_fresh_when_the_input_or_the_weight_changes():
    from sste_jax._linear import fresh_key

    config = SparsityConfig(mvue=True)
    layer = sparse_nnx.SparseLinear(8, 4, config=config, rngs=nnx.Rngs(0, sparsity=3))
    r_TxO = jax.random.normal(jax.random.key(1), (8, 4))  # the output gradient, which MVUE samples

    def layer_grad(layer, x_TxI):
        return nnx.grad(lambda m: jnp.sum(m(x_TxI) * r_TxO))(layer)["kernel"][...]

    def product_grad(kernel, x_TxI, key):
        beta = layer.beta[...]
        return jax.grad(lambda w: jnp.sum(sste_jax.sparse_dense(x_TxI, w, beta, key, config) * r_TxO))(kernel)

    key = layer.mvue_key[...]
    x_TxI = jax.random.normal(jax.random.key(2), (8, 8))
    kernel = layer.kernel[...]
    np.testing.assert_array_equal(layer_grad(layer, x_TxI), product_grad(kernel, x_TxI, fresh_key(key, x_TxI, kernel)))
    # A new input: a new draw (not the previous input's).
    x2_TxI = x_TxI.at[0, 0].add(1.0)
    got = layer_grad(layer, x2_TxI)
    np.testing.assert_array_equal(got, product_grad(kernel, x2_TxI, fresh_key(key, x2_TxI, kernel)))
    assert not np.array_equal(got, product_grad(kernel, x2_TxI, fresh_key(key, x_TxI, kernel)))
    # A new weight (an optimizer step): a new draw.
    layer.kernel[...] = kernel * 1.01
    kernel2 = layer.kernel[...]
    got = layer_grad(layer, x_TxI)
    np.testing.assert_array_equal(got, product_grad(kernel2, x_TxI, fresh_key(key, x_TxI, kernel2)))
    assert not np.array_equal(got, product_grad(kernel2, x_TxI, fresh_key(key, x_TxI, kernel)))


def test_mvue_under_nnx_scan():
    layer = sparse_nnx.SparseLinear(8, 4, config=SparsityConfig(mvue=True), rngs=nnx.Rngs(0))
    key = np.asarray(jax.random.key_data(layer.mvue_key[...]))

    def grad(layer, x_TxI):
        return nnx.grad(lambda m: jnp.sum(m(x_TxI) ** 2))(layer)["kernel"][...]

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def grad_steps(layer, x_TxI):
        return layer, grad(layer, x_TxI)

    x_TxI = jax.random.normal(jax.random.key(2), (4, 8))
    x_SxTxI = jnp.stack([x_TxI, x_TxI, x_TxI.at[0, 0].add(1.0)])
    _, g_SxIxO = grad_steps(layer, x_SxTxI)
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(layer.mvue_key[...])), key)  # nothing to carry
    np.testing.assert_array_equal(g_SxIxO[0], g_SxIxO[1])  # the same input and weight: the same draw
    for s in range(3):  # each scanned step draws what the same call outside the scan draws
        np.testing.assert_allclose(g_SxIxO[s], grad(layer, x_SxTxI[s]), rtol=1e-6, atol=1e-7)


def test_sparse_kernel_mask_selects_sparse_kernels_of_the_given_methods():
    model = _Transformer(nnx.Rngs(0))
    _swap(model, SparsityConfig(method="srste"), where=lambda path: path[-2:] == ("mlp", "proj"))
    _swap(model, SparsityConfig(method="ste"))  # the feed-forward layers still dense: fc

    def selected(model, **kw):
        flat = nnx.to_flat_state(sste_jax.optim.sparse_kernel_mask(model, **kw))
        return sorted("/".join(map(str, p)) for p, v in flat if v)

    kernels = [f"blocks/{i}/mlp/{n}/kernel" for i in (0, 1) for n in ("fc", "proj")]
    assert selected(model) == kernels
    assert selected(model, methods=("ste",)) == [k for k in kernels if "/fc/" in k]
    assert selected(model, methods=("srste", "dense")) == [k for k in kernels if "/proj/" in k]
    mask = sste_jax.optim.sparse_kernel_mask(model)
    assert jax.tree.structure(nnx.as_pure(nnx.state(model, nnx.Param))) == jax.tree.structure(mask)
    # A model made sparse by sste_jax.sparsify: the same kernels.
    made = sste_jax.sparsify(_Transformer(nnx.Rngs(0)), sste_jax.feed_forward(), jnp.arange(8).reshape(2, 4) % 11)
    assert selected(made) == kernels


def test_tsrste_layers_hold_a_transposable_mask_refreshed_on_request():
    model = _swap(_Transformer(nnx.Rngs(0)), SparsityConfig(method="tsrste"))
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
    model = _swap(_Transformer(nnx.Rngs(0)), SparsityConfig())
    layers = _sparse_layers(model)
    for layer in layers.values():
        layer.kernel[...] = 3.0 * layer.kernel[...]
    assert sparse_nnx.refit_beta(model) == 4
    for layer in layers.values():
        assert float(layer.beta[...]) == pytest.approx(float(sste_jax.fit_beta(layer.kernel[...])))
    assert sparse_nnx.refit_beta(model, lambda w: jnp.float32(2.0)) == 4
    assert all(float(layer.beta[...]) == 2.0 for layer in layers.values())
    ste = _swap(_Transformer(nnx.Rngs(0)), SparsityConfig(method="ste"))
    assert sparse_nnx.refit_beta(ste) == 0
    assert all(float(layer.beta[...]) == 1.0 for layer in _sparse_layers(ste).values())


def test_from_linear_refuses_a_kernel_whose_beta_cannot_be_fitted():
    model = _Transformer(nnx.Rngs(0))
    model.blocks[1].mlp.fc.kernel[...] = jnp.zeros_like(model.blocks[1].mlp.fc.kernel[...])
    model.blocks[0].mlp.proj.kernel[...] = model.blocks[0].mlp.proj.kernel[...].at[0, 0].set(jnp.nan)
    for layer, problem in ((model.blocks[1].mlp.fc, "all zero"), (model.blocks[0].mlp.proj, "NaN")):
        with pytest.raises(ValueError) as info:
            sparse_nnx.SparseLinear.from_linear(layer)
        msg = str(info.value)
        assert f"from_linear({layer.in_features}, {layer.out_features})" in msg and problem in msg, msg
        assert "load the weights first, or pass beta" in msg
    assert not _sparse_layers(model)  # nothing changed
    _swap(model, beta=1.25)
    assert all(float(m.beta[...]) == 1.25 for m in _sparse_layers(model).values())
    # Other methods ignore β: a zero kernel is fine for them.
    zero = nnx.Linear(8, 4, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
    assert float(sparse_nnx.SparseLinear.from_linear(zero, SparsityConfig(method="ste")).beta[...]) == 1.0


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
    calls = [
        ("SparseLinear.from_linear(8, 8): config", lambda: sparse_nnx.SparseLinear.from_linear(
            nnx.Linear(8, 8, rngs=nnx.Rngs(0)), config)),
        ("SparseLinear(8, 4): config", lambda: sparse_nnx.SparseLinear(8, 4, config=config, rngs=nnx.Rngs(0))),
        ("sparse_dense: config", lambda: sste_jax.sparse_dense(jnp.ones((2, 8)), jnp.ones((8, 4)), 1.0, config=config)),
        ("forward_weight: config", lambda: sste_jax.forward_weight(jnp.ones((8, 4)), 1.0, config)),
        ("sparsify: rules['.*']", lambda: sste_jax.sparsify(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), {".*": config},
                                                            jnp.ones((2, 8)))),
        ("sparsify: rules['.*']", lambda: sste_jax.sparsify(flax.linen.Dense(4), {".*": config})),
        ("sparsify_fn: rules['w']", lambda: sste_jax.sparsify_fn(lambda p, x: x @ p["w"], {"w": config})),
    ]
    for where, call in calls:
        with pytest.raises(TypeError, match=re.escape(f"{where} must be a sste_jax.SparsityConfig")) as info:
            call()
        if isinstance(config, dict):
            assert "SparsityConfig(**{'method': 'ste'})" in str(info.value), where
