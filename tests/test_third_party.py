"""One call on models nobody here wrote: tunix's Llama 3 (NNX), Hugging Face's Flax GPT-2 (Linen),
Google DeepMind's gemma (Linen, Python >= 3.12). Each is skipped cleanly where it does not install."""
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sste_jax
from sste_jax import SparsityConfig

pytest.importorskip("qwix")
CONFIG = SparsityConfig(mvue=True, fp8=True)


@pytest.fixture(autouse=True)
def _their_broadcasting():
    """These models rely on implicit rank promotion, which the suite otherwise turns into an error."""
    with jax.numpy_rank_promotion("allow"):
        yield


def _tunix_llama():
    """tunix's Llama 3 model module, without ``tunix/__init__`` (which imports its trainers' dependencies)."""
    spec = importlib.util.find_spec("tunix")
    if spec is None:
        pytest.skip("tunix is not installed (pip install --no-deps google-tunix)")
    if "tunix" not in sys.modules:
        package = types.ModuleType("tunix")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["tunix"] = package
    from tunix.models.llama3 import model as llama

    return llama


@pytest.mark.filterwarnings("ignore:'sharding' is deprecated:DeprecationWarning")  # tunix's own code
@pytest.mark.filterwarnings("ignore:jax.interpreters.pxla.thread_resources is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:'.value' access is now deprecated:DeprecationWarning")
def test_tunix_llama3_trains_with_mvue_fp8_under_remat():
    llama = _tunix_llama()
    config = llama.ModelConfig(num_layers=2, vocab_size=32, embed_dim=16, hidden_dim=64, num_heads=2, head_dim=8,
                               num_kv_heads=1, rope_theta=10_000, norm_eps=1e-5,
                               remat_config=llama.RematConfig.BLOCK)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 32)
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    mask = jnp.tril(jnp.ones((16, 16), bool))[None].repeat(2, 0)
    dense = llama.Llama3(config, rngs=nnx.Rngs(0))
    params = [v for _, v in nnx.iter_graph(dense) if isinstance(v, nnx.Param)]
    for i, param in enumerate(params):  # tunix initialises kernels to zero, for weights loaded later: "load" some
        shape = param[...].shape
        param[...] = (
            jax.random.normal(jax.random.key(i), shape) / np.sqrt(shape[0]) if len(shape) > 1 else jnp.ones(shape)
        )
    model = sste_jax.sparsify(dense, sste_jax.feed_forward(CONFIG), tokens, positions, None, mask,
                              rngs=nnx.Rngs(sparsity=0))
    for layer in model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(layer.mlp, name)
            np.testing.assert_allclose(linear.beta[...], sste_jax.fit_beta(linear.kernel[...]), rtol=1e-6)
    betas = {p: v[...] for p, v in nnx.iter_graph(model) if isinstance(v, sste_jax.nnx.SparsityBeta)}
    assert len(betas) == 2 * 3  # the feed-forward linears only: attention, embeddings and head stay dense
    opt = nnx.Optimizer(model, sste_jax.freeze_beta(optax.adam(3e-3)), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(model):
            logits, _ = model(tokens, positions, None, mask)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(30)]
    assert losses[-1] < losses[0] - 0.5, losses
    after = {p: v[...] for p, v in nnx.iter_graph(model) if isinstance(v, sste_jax.nnx.SparsityBeta)}
    assert all(np.array_equal(betas[p], after[p]) for p in betas)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "FlaxGPT2LMHeadModel"):
        pytest.skip("this transformers has no Flax models (4.57 is the last with them)")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    return transformers.FlaxGPT2LMHeadModel(config, seed=0)


def test_hf_flax_gpt2_linen_module_out_in_kernels():
    hf = _gpt2()
    model = sste_jax.sparsify(hf.module, sste_jax.feed_forward(CONFIG))
    ids = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
    mask, pos = jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(16), (2, 16))
    variables = model.init(jax.random.key(1), ids, mask, pos)
    sparsity = variables["sparsity"]["transformer"]["h"]
    assert sorted(sparsity["0"]["mlp"]) == ["c_fc", "c_proj"] and "attn" not in sparsity["0"]
    kernel = variables["params"]["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"]  # (out, in)
    np.testing.assert_allclose(sparsity["0"]["mlp"]["c_fc"]["beta"], sste_jax.fit_beta(kernel, axis=1), rtol=1e-6)
    tx = sste_jax.freeze_beta(optax.adam(3e-3))
    state = tx.init(variables)

    @jax.jit
    def step(variables, state, key):
        def loss_fn(v):
            logits = model.apply(v, ids, mask, pos, rngs={"sparsity": key}).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, state = tx.update(grads, state, variables)
        return optax.apply_updates(variables, updates), state, loss

    losses = []
    for i in range(30):
        variables, state, loss = step(variables, state, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.5, losses
    np.testing.assert_array_equal(variables["sparsity"]["transformer"]["h"]["0"]["mlp"]["c_fc"]["beta"],
                                  sparsity["0"]["mlp"]["c_fc"]["beta"])


def test_hf_flax_gpt2_wrapper_through_sparsify_fn():
    hf = _gpt2()
    ids = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
    sparse = sste_jax.sparsify_fn(lambda p, ids: hf(ids, params=p).logits, sste_jax.feed_forward(CONFIG))
    variables = sparse.init(hf.params, ids)
    assert sorted(variables["sparsity"]) == [
        f"transformer/h/{i}/mlp/{n}/kernel" for i in (0, 1) for n in ("c_fc", "c_proj")
    ]
    kernel = hf.params["transformer"]["h"]["0"]["mlp"]["c_proj"]["kernel"]  # (out, in): groups along axis 1
    np.testing.assert_allclose(variables["sparsity"]["transformer/h/0/mlp/c_proj/kernel"],
                               sste_jax.fit_beta(kernel, axis=1), rtol=1e-6)
    loss = lambda v: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        sparse(v, ids, key=jax.random.key(0))[:, :-1], ids[:, 1:]).mean()
    grads = jax.jit(jax.grad(loss))(variables)
    assert np.all(np.isfinite(grads["params"]["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"]))


def test_gemma_feed_forward_einsums():
    gemma_modules = pytest.importorskip("gemma.gm.nn._modules", reason="gemma needs Python >= 3.12")
    for transpose in (False, True):
        ffn = gemma_modules.FeedForward(features=16, hidden_dim=64, transpose_gating_einsum=transpose)
        model = sste_jax.sparsify(ffn, {".*": CONFIG})
        x = jax.random.normal(jax.random.key(0), (2, 8, 16))
        variables = model.init(jax.random.key(1), x)
        gating = variables["params"]["gating_einsum"]  # (2, D, F), or (2, F, D) transposed
        axis = 2 if transpose else 1  # D, the contraction axis, in each layout
        np.testing.assert_allclose(variables["sparsity"]["gating_einsum_beta"], sste_jax.fit_beta(gating, axis=axis),
                                   rtol=1e-6)
