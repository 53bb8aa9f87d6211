"""Flip rate, β / zero-fraction / relative-error stats and the host-side metrics dict (docs/algorithm.md#metrics)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sste_jax
from sste_jax import SparseWeight, SparsityConfig
from sste_jax import nnx as sparse_nnx


def _random_weights(key, shapes):
    keys = jax.random.split(key, len(shapes))
    return {name: SparseWeight(jax.random.normal(k, s)) for k, (name, s) in zip(keys, shapes.items())}


SHAPES = {"a": (16, 8), "b": (8, 3), "blocks/0/fc": (32, 20)}


def test_flip_rate_is_zero_when_weights_do_not_move():
    weights = _random_weights(jax.random.key(0), SHAPES)
    state = sste_jax.metrics.init_flip_state(weights)
    step = jax.jit(sste_jax.metrics.flip_rate)
    for _ in range(3):
        rates, state = step(state, weights)
        assert sste_jax.metrics.to_host(rates) == {"flip_rate": 0.0, **{f"flip_rate/{n}": 0.0 for n in SHAPES}}


def test_flip_rate_exact_on_constructed_case():
    # Layer "a": two groups in one column; the first changes its top-2 from {0,1} to {1,3}: 2 of 8 flip.
    a0 = jnp.array([[4.0], [3.0], [2.0], [1.0], [-5.0], [1.0], [2.0], [0.0]])
    a1 = jnp.array([[1.0], [3.0], [2.0], [4.0], [-5.0], [1.0], [2.0], [0.5]])
    # Layer "b": 3 columns; column 0 goes {0,1} -> {2,3} (4 flips), column 1 is a tie resolved to the
    # higher indices both times (no flip), column 2 goes {0,2} -> {0,2} by sign only (no flip).
    b0 = jnp.array([[4.0, 1.0, -3.0], [3.0, 1.0, 0.0], [2.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    b1 = jnp.array([[1.0, 2.0, 3.0], [2.0, 2.0, 0.0], [3.0, 2.0, -2.0], [4.0, 2.0, -1.0]])
    state = sste_jax.metrics.init_flip_state({"a": SparseWeight(a0), "b": SparseWeight(b0)})
    rates, state = sste_jax.metrics.flip_rate(state, {"a": SparseWeight(a1), "b": SparseWeight(b1)})
    rates = sste_jax.metrics.to_host(rates)
    assert rates["flip_rate/a"] == 2 / 8
    assert rates["flip_rate/b"] == pytest.approx(4 / 12, rel=1e-7)
    assert rates["flip_rate"] == pytest.approx((2 + 4) / (8 + 12), rel=1e-7)
    # The state now holds the new masks: moving back flips the same entries again.
    rates, _ = sste_jax.metrics.flip_rate(state, {"a": SparseWeight(a0), "b": SparseWeight(b0)})
    assert sste_jax.metrics.to_host(rates)["flip_rate/a"] == 2 / 8


def test_flip_rate_global_is_element_weighted_mean_and_matches_numpy():
    w0 = _random_weights(jax.random.key(1), SHAPES)
    noise = _random_weights(jax.random.key(2), SHAPES)
    w1 = {n: SparseWeight(w0[n].kernel + 0.3 * noise[n].kernel) for n in SHAPES}
    rates, _ = jax.jit(sste_jax.metrics.flip_rate)(sste_jax.metrics.init_flip_state(w0), w1)
    rates = sste_jax.metrics.to_host(rates)
    diffs = {n: np.asarray(sste_jax.mask_24(w0[n].kernel) != sste_jax.mask_24(w1[n].kernel)) for n in SHAPES}
    for n in SHAPES:
        assert rates[f"flip_rate/{n}"] == pytest.approx(diffs[n].mean(), rel=1e-6)
    sizes = {n: np.prod(SHAPES[n]) for n in SHAPES}
    weighted = sum(rates[f"flip_rate/{n}"] * sizes[n] for n in SHAPES) / sum(sizes.values())
    assert rates["flip_rate"] == pytest.approx(weighted, rel=1e-6)
    all_diffs = np.concatenate([d.ravel() for d in diffs.values()])
    assert rates["flip_rate"] == pytest.approx(all_diffs.mean(), rel=1e-6)
    assert 0 < rates["flip_rate"] < 1


def test_flip_rate_respects_the_grouped_axis():
    w = jax.random.normal(jax.random.key(3), (6, 8))
    moved = w.at[:, :4].set(w[:, :4][:, ::-1])  # permute within groups along axis 1 only
    state = sste_jax.metrics.init_flip_state({"e": SparseWeight(w, axis=1)})
    rates, _ = sste_jax.metrics.flip_rate(state, {"e": SparseWeight(moved, axis=1)})
    expected = np.mean(np.asarray(sste_jax.mask_24(w, axis=1) != sste_jax.mask_24(moved, axis=1)))
    assert float(rates["flip_rate"]) == pytest.approx(expected, rel=1e-6)


def test_flip_state_is_packed_bits():
    weights = _random_weights(jax.random.key(4), SHAPES)
    state = sste_jax.metrics.init_flip_state(weights)
    for n, shape in SHAPES.items():
        assert state.masks[n].dtype == jnp.uint8
        assert state.masks[n].shape == (-(-int(np.prod(shape)) // 8),)


def test_flip_rate_rejects_mismatched_layers():
    weights = _random_weights(jax.random.key(5), SHAPES)
    state = sste_jax.metrics.init_flip_state(weights)
    with pytest.raises(ValueError, match="blocks/0/fc"):
        sste_jax.metrics.flip_rate(state, {n: w for n, w in weights.items() if n != "blocks/0/fc"})
    with pytest.raises(ValueError, match=r"layer 'a'.*\(16, 12\)"):
        sste_jax.metrics.flip_rate(state, {**weights, "a": SparseWeight(jnp.ones((16, 12)))})


def test_sparsity_stats():
    kernel = jax.random.normal(jax.random.key(6), (64, 16))
    beta = sste_jax.fit_beta(kernel)
    weights = {
        "s": SparseWeight(kernel, beta),
        "h": SparseWeight(kernel, config=SparsityConfig(method="ste")),
        "d": SparseWeight(kernel, config=SparsityConfig(method="dense")),
    }
    stats = sste_jax.metrics.to_host(jax.jit(sste_jax.metrics.sparsity_stats)(weights))
    assert stats["beta/s"] == float(beta)
    w_tilde = np.asarray(beta * sste_jax.soft_threshold_24(kernel))
    k = np.asarray(kernel)
    assert stats["zero_fraction/s"] == np.mean(w_tilde == 0) >= 0.5
    assert stats["rel_error/s"] == pytest.approx(np.linalg.norm(k - w_tilde) / np.linalg.norm(k), rel=1e-5)
    assert stats["zero_fraction/h"] == 0.5
    hard = np.asarray(sste_jax.hard_threshold_24(kernel))
    assert stats["rel_error/h"] == pytest.approx(np.linalg.norm(k - hard) / np.linalg.norm(k), rel=1e-5)
    assert stats["zero_fraction/d"] == 0.0 and stats["rel_error/d"] == 0.0
    # β is fitted to minimise the error: the fitted scale beats β = 1.
    unscaled = sste_jax.metrics.to_host(sste_jax.metrics.sparsity_stats({"s": SparseWeight(kernel)}))
    assert stats["rel_error/s"] < unscaled["rel_error/s"]
    assert all(type(v) is float for v in stats.values())


def test_rel_error_of_all_zero_kernel_is_zero():
    stats = sste_jax.metrics.to_host(sste_jax.metrics.sparsity_stats({"z": SparseWeight(jnp.zeros((8, 4)))}))
    assert stats == {"beta/z": 1.0, "zero_fraction/z": 1.0, "rel_error/z": 0.0}


def test_sparse_weights_of_an_nnx_model():
    class Net(nnx.Module):
        def __init__(self, rngs, linear=nnx.Linear):
            self.blocks = nnx.List([nnx.Sequential(linear(8, 16, rngs=rngs), linear(16, 8, rngs=rngs))])
            self.head = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(self.blocks[0](x))

    model = Net(nnx.Rngs(0), linear=sparse_nnx.SparseLinear)
    weights = sste_jax.sparse_weights(model)
    assert list(weights) == ["blocks/0/layers/0/kernel", "blocks/0/layers/1/kernel"]  # the dense head is not listed
    layer = model.blocks[0].layers[1]
    assert np.array_equal(weights["blocks/0/layers/1/kernel"].kernel, layer.kernel[...])
    assert float(weights["blocks/0/layers/1/kernel"].beta) == float(layer.beta[...])
    assert np.array_equal(weights["blocks/0/layers/1/kernel"].forward(), layer.forward_weight())
    stats = sste_jax.metrics.to_host(sste_jax.metrics.sparsity_stats(weights))
    assert set(stats) == {f"{s}/blocks/0/layers/{i}/kernel" for s in ("beta", "zero_fraction", "rel_error")
                          for i in (0, 1)}
    # The same weights, by the same names, when sste_jax.sparsify made the plain model sparse.
    made = sste_jax.sparsify(Net(nnx.Rngs(0)), {"blocks/.*": SparsityConfig()}, jnp.ones((4, 8)))
    assert list(sste_jax.sparse_weights(made)) == list(weights)
    with pytest.raises(ValueError, match="no sparse weights"):
        sste_jax.sparse_weights(Net(nnx.Rngs(0)))
