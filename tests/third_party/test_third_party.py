"""One call on models nobody here wrote, with the whole method (S-STE + MVUE + FP8): Hugging Face's Flax
GPT-2 (its Linen module, and its wrapper through `sparsify_fn`), Equinox (layers stacked and scanned,
with biases), tunix's Llama 3 (NNX, rematerialised blocks); and, where a Python 3.12 environment with them
exists (`tests/third_party/setup_py312.sh`), Google DeepMind's gemma and Google's MaxText (its default
scanned layout, layers on parameter axis 1, Linen and NNX). Each model passes every check of
`tests/third_party/checks.py`; each is skipped cleanly where it does not install."""
import functools
import importlib.util
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sste_jax
from tests.third_party import checks

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _their_broadcasting():
    """These models rely on implicit rank promotion, which the suite otherwise turns into an error."""
    with jax.numpy_rank_promotion("allow"):
        yield


def _xent(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


# --- Hugging Face Flax GPT-2 ------------------------------------------------------------------------------

@functools.cache
def _gpt2():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "FlaxGPT2LMHeadModel"):
        pytest.skip("this transformers has no Flax models (4.57 is the last with them)")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.FlaxGPT2LMHeadModel(config, seed=0)
    ids = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
    return model, ids, jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(16), (2, 16))


GPT2_AXES = {f"transformer/h/{i}/mlp/{n}/kernel": 1 for i in (0, 1) for n in ("c_fc", "c_proj")}  # (out, in)


@pytest.mark.filterwarnings("ignore:.*TensorFlow and JAX classes are deprecated")
def test_hf_flax_gpt2_linen_module():
    hf, ids, mask, pos = _gpt2()

    def make(config, seed):
        sparse = sste_jax.sparsify(hf.module, sste_jax.feed_forward(config), seed=seed)
        variables = sparse.init(jax.random.key(1), ids, mask, pos)
        return checks.View(
            variables,
            loss=lambda v: _xent(sparse.apply(v, ids, mask, pos).logits, ids),
            record=sste_jax.sparse_weights,
            weights=lambda tree: checks.named(tree["params"]),
            dense=lambda w: _xent(hf.module.apply({"params": checks.replaced(variables["params"], w)}, ids, mask,
                                                  pos).logits, ids),
        )

    checks.check_all(make, GPT2_AXES)


@pytest.mark.filterwarnings("ignore:.*TensorFlow and JAX classes are deprecated")
def test_hf_flax_gpt2_wrapper_through_sparsify_fn():
    hf, ids, _, _ = _gpt2()

    def make(config, seed):
        sparse = sste_jax.sparsify_fn(lambda p, ids: hf(ids, params=p).logits, sste_jax.feed_forward(config),
                                      seed=seed)
        return checks.View(
            sparse.init(hf.params, ids),
            loss=lambda v: _xent(sparse(v, ids), ids),
            record=sste_jax.sparse_weights,
            weights=lambda tree: checks.named(tree["params"]),
            dense=lambda w: _xent(hf(ids, params=checks.replaced(hf.params, w)).logits, ids),
        )

    checks.check_all(make, GPT2_AXES)


# --- Equinox: stacked layers scanned, with biases ----------------------------------------------------------

def test_equinox_scanned_mlp_with_biases():
    eqx = pytest.importorskip("equinox")

    class Block(eqx.Module):
        mlp: eqx.nn.MLP

    stacked = eqx.filter_vmap(lambda k: Block(eqx.nn.MLP(8, 8, 32, depth=1, key=k)))(
        jax.random.split(jax.random.key(0), 3))
    arrays, static = eqx.partition(stacked, eqx.is_array)
    x = jax.random.normal(jax.random.key(1), (32, 8))

    def forward(arrays, x):
        def step(h, layer):
            return h + jax.vmap(eqx.combine(layer, static).mlp)(h), None

        return jax.lax.scan(step, x, arrays)[0]

    def loss(out):
        return jnp.mean((out - jnp.sin(x)) ** 2)

    def make(config, seed):
        sparse = sste_jax.sparsify_fn(forward, sste_jax.feed_forward(config), seed=seed)
        return checks.View(sparse.init(arrays, x), loss=lambda v: loss(sparse(v, x)), record=sste_jax.sparse_weights,
                           weights=lambda tree: checks.named(tree["params"]),
                           dense=lambda w: loss(forward(checks.replaced(arrays, w), x)))

    # (layers, out, in) weights: groups along in, parameter axis 2; the stacked biases feed no product
    checks.check_all(make, {"mlp/layers/0/weight": 2, "mlp/layers/1/weight": 2}, drop=0.05)


# --- tunix's Llama 3 (NNX, remat) ---------------------------------------------------------------------------

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
def test_tunix_llama3_with_rematerialised_blocks():
    llama = _tunix_llama()
    config = llama.ModelConfig(num_layers=2, vocab_size=32, embed_dim=16, hidden_dim=64, num_heads=2, head_dim=8,
                               num_kv_heads=1, rope_theta=10_000, norm_eps=1e-5,
                               remat_config=llama.RematConfig.BLOCK)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 32)
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    mask = jnp.tril(jnp.ones((16, 16), bool))[None].repeat(2, 0)

    def dense_model():
        model = llama.Llama3(config, rngs=nnx.Rngs(0))
        for i, param in enumerate(v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)):
            shape = param[...].shape  # tunix initialises kernels to zero, for weights loaded later: "load" some
            param[...] = jax.random.normal(jax.random.key(i), shape) / np.sqrt(shape[0]) if len(shape) > 1 \
                else jnp.ones(shape)
        return model

    def loss(model):
        return _xent(model(tokens, positions, None, mask)[0], tokens)

    def make(config, seed):
        model = sste_jax.sparsify(dense_model(), sste_jax.feed_forward(config), tokens, positions, None, mask,
                                  seed=seed)
        return checks.nnx_view(model, dense_model(), loss)

    axes = {f"layers/{i}/mlp/{n}/kernel": 0 for i in (0, 1) for n in ("gate_proj", "up_proj", "down_proj")}
    checks.check_all(make, axes)


# --- gemma and MaxText (Python >= 3.12) -----------------------------------------------------------------------

def _python312() -> pathlib.Path:
    python = pathlib.Path(os.environ.get("SSTE_JAX_PY312", ROOT / ".venv312" / "bin" / "python"))
    if not python.exists():
        pytest.skip("no Python 3.12 environment with gemma and MaxText: bash tests/third_party/setup_py312.sh")
    return python


@pytest.mark.parametrize("model", ["gemma", "maxtext-linen", "maxtext-nnx", "maxtext-attention-out"])
def test_python312_models(model):
    done = subprocess.run([str(_python312()), str(ROOT / "tests" / "third_party" / "run_py312.py"), model],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "DECOUPLE_GCLOUD": "TRUE"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert f"{model}: all checks passed" in done.stdout
