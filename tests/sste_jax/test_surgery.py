"""Model surgery asks each layer for its forward weight: T-SR-STE (which keeps a mask) densifies,
compresses and exports like the other methods."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sste_jax
from sste_jax import SparsityConfig
from sste_jax import nnx as sparse_nnx


class _MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(16, 32, rngs=rngs)
        self.fc2 = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


def _tsrste_model(seed: int) -> _MLP:
    model = _MLP(nnx.Rngs(seed))
    config = SparsityConfig(method="tsrste")
    model.fc1 = sparse_nnx.SparseLinear.from_linear(model.fc1, config)
    model.fc2 = sparse_nnx.SparseLinear.from_linear(model.fc2, config)
    model.fc1.kernel[...] *= 1.5  # the kernel moved after the last mask refresh: the mask, not top-2, decides
    return model


def test_tsrste_mask_differs_from_top2_so_the_layer_must_be_asked():
    layer = _tsrste_model(0).fc1
    assert not np.array_equal(layer.forward_weight() != 0, sste_jax.mask_24(layer.kernel[...]))


@pytest.mark.parametrize("surgery", ["densify", "compress"])
def test_tsrste_model_survives_surgery_bitwise(surgery):
    model = _tsrste_model(0)
    x = jax.random.normal(jax.random.key(1), (6, 16))
    y = model(x)
    w_tilde = model.fc1.forward_weight()
    op = sparse_nnx.densify_layers if surgery == "densify" else sparse_nnx.compress_layers
    served = op(nnx.clone(model))
    assert type(served.fc1) is (nnx.Linear if surgery == "densify" else sparse_nnx.CompressedLinear)
    got = served.fc1.kernel[...] if surgery == "densify" else served.fc1.forward_weight()
    assert np.asarray(got).tobytes() == np.asarray(w_tilde).tobytes()
    assert np.asarray(served(x)).tobytes() == np.asarray(y).tobytes()


def test_tsrste_model_exports_and_loads(tmp_path):
    model = _tsrste_model(0)
    x = jax.random.normal(jax.random.key(2), (4, 16))
    sparse_nnx.export_compressed(tmp_path / "export", model)
    served = sparse_nnx.load_compressed(tmp_path / "export", _tsrste_model(3))
    assert np.asarray(served(x)).tobytes() == np.asarray(model(x)).tobytes()


def test_checkpoint_reexports_the_surgery_of_the_layer_module():
    assert sparse_nnx.CompressedLinear is sparse_nnx.CompressedLinear
    assert sparse_nnx.densify_layers is sparse_nnx.densify_layers
    assert sparse_nnx.compress_layers is sparse_nnx.compress_layers


def test_a_sparse_module_without_forward_weight_is_named():
    class Odd(nnx.Module):  # looks sparse (kernel, beta, config) but cannot say its forward weight
        def __init__(self):
            self.kernel = nnx.Param(jnp.ones((4, 4)))
            self.beta = nnx.Variable(jnp.float32(1))
            self.config = SparsityConfig()

    class Holder(nnx.Module):
        def __init__(self):
            self.odd = Odd()

    with pytest.raises(TypeError, match="odd: Odd has no forward_weight"):
        sparse_nnx.densify_layers(Holder())


def test_decompress_layers_keeps_outputs_and_fp8_layers():
    model = sparse_nnx.compress_layers(_tsrste_model(0))
    x = jax.random.normal(jax.random.key(3), (5, 16))
    y = model(x)
    model.fc2.fp8 = True  # an FP8 product cannot become a plain nnx.Linear: kept
    y_fp8 = model(x)
    sparse_nnx.decompress_layers(model)
    assert type(model.fc1) is nnx.Linear and type(model.fc2) is sparse_nnx.CompressedLinear
    assert np.asarray(model(x)).tobytes() == np.asarray(y_fp8).tobytes()
    model.fc2.fp8 = False
    sparse_nnx.decompress_layers(model)
    assert type(model.fc2) is nnx.Linear and np.asarray(model(x)).tobytes() == np.asarray(y).tobytes()


def test_densify_layers_bakes_compressed_layers_and_models_made_by_sparsify():
    x = jax.random.normal(jax.random.key(4), (8, 16))
    served = sparse_nnx.compress_layers(_tsrste_model(0))
    y = served(x)
    dense = sparse_nnx.densify_layers(served)
    assert type(dense.fc1) is nnx.Linear and type(dense.fc2) is nnx.Linear
    assert np.asarray(dense(x)).tobytes() == np.asarray(y).tobytes()
    made = sste_jax.sparsify(_MLP(nnx.Rngs(0)), {"fc1|fc2": SparsityConfig()}, x)
    y = made(x)
    w_tilde = sste_jax.sparse_weights(made)["fc1/kernel"].forward()
    dense = sparse_nnx.densify_layers(made)
    assert type(dense) is _MLP and not hasattr(dense, "sparsity")
    assert np.asarray(dense.fc1.kernel[...]).tobytes() == np.asarray(w_tilde).tobytes()
    np.testing.assert_allclose(dense(x), y, rtol=1e-6, atol=1e-6)
