"""N:M beyond 2:4 through the layer: `SparsityConfig(n=, m=)`, the sparse product, SR-STE's term, β, the
NNX layer, the flip rate and the checkpoint record; expected values from a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sste_jax
from sste_jax import SparsityConfig
from sste_jax import nnx as sparse_nnx

NM = [(1, 4), (2, 8), (1, 2)]


def ref_groups(w, n, m):
    """Along axis 0, per group of m: the top-n mask (ties: higher index) and the soft threshold by the
    (n+1)-th largest magnitude, float64."""
    w = np.asarray(w, np.float64)
    mask, soft = np.zeros(w.shape, bool), np.zeros(w.shape)
    for g in range(w.shape[0] // m):
        for col in range(w.shape[1]):
            a = w[g * m : (g + 1) * m, col]
            for k in sorted(range(m), key=lambda k: (abs(a[k]), k), reverse=True)[:n]:
                mask[g * m + k, col] = True
            t = np.sort(np.abs(a))[::-1][n]
            soft[g * m : (g + 1) * m, col] = np.sign(a) * np.maximum(np.abs(a) - t, 0.0)
    return mask, soft


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(12, 16)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32),
            rng.normal(size=(12, 8)).astype(np.float32))


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("method", ["ste", "srste", "sste"])
def test_sparse_dense_nm_forward_and_gradients(n, m, method):
    x, w, g = _data()
    cfg = SparsityConfig(method=method, n=n, m=m, srste_decay=0.1)
    beta = float(sste_jax.fit_beta(jnp.asarray(w), n=n, m=m)) if method == "sste" else 1.0
    y, pullback = jax.vjp(lambda x, w: sste_jax.sparse_dense(x, w, beta, config=cfg), jnp.asarray(x), jnp.asarray(w))
    dx, dw = pullback(jnp.asarray(g))
    mask, soft = ref_groups(w, n, m)
    wt = beta * soft if method == "sste" else np.where(mask, w, 0.0)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    np.testing.assert_allclose(np.asarray(y), x64 @ wt, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), g64 @ wt.T, rtol=1e-5, atol=1e-5)
    dw_ref = x64.T @ g64 + (0.1 * np.where(mask, 0.0, w) if method == "srste" else 0.0)
    np.testing.assert_allclose(np.asarray(dw), dw_ref, rtol=1e-5, atol=1e-6)
    nonzero = (np.asarray(sste_jax.forward_weight(jnp.asarray(w), beta, cfg)) != 0).reshape(-1, m, 8).sum(1)
    assert nonzero.max() <= n


def test_default_config_is_24_and_24_names_keep_working():
    assert (SparsityConfig().n, SparsityConfig().m) == (2, 4) and SparsityConfig().is_24
    w = jnp.asarray(_data()[1])
    for method in ("ste", "sste"):
        np.testing.assert_array_equal(sste_jax.forward_weight(w, 1.3, SparsityConfig(method=method, n=2, m=4)),
                                      sste_jax.forward_weight(w, 1.3, SparsityConfig(method=method)))


@pytest.mark.parametrize("changes,match", [
    ({"mvue": True}, "mvue=True exist for 2:4 only"),
    ({"method": "tsrste"}, "method='tsrste' exist for 2:4 only"),
    ({"backend": "pallas"}, "backend='pallas' exist for 2:4 only"),
    ({"matmul": "cusparselt", "method": "ste"}, "matmul='cusparselt' exist for 2:4 only"),
])
def test_2_4_only_features_raise_outside_2_4(changes, match):
    with pytest.raises(ValueError, match=rf"SparsityConfig\(n=1, m=4\): {match}"):
        SparsityConfig(n=1, m=4, **changes)


@pytest.mark.outside_annotations
def test_bad_nm_raise():
    with pytest.raises(ValueError, match="need 1 <= n < m, got n=8, m=8"):
        SparsityConfig(n=8, m=8)
    with pytest.raises(TypeError, match="n must be an int"):
        SparsityConfig(n=1.0)
    with pytest.raises(ValueError, match=r"N:M groups of 8 need the length of axis 0 to be divisible by 8"):
        sste_jax.sparse_dense(jnp.ones((2, 12)), jnp.ones((12, 4)), 1.0, config=SparsityConfig(n=2, m=8))


def test_nnx_layer_nm_beta_flip_rate_and_errors():
    cfg = SparsityConfig(method="sste", n=2, m=8)
    layer = sparse_nnx.SparseLinear(16, 8, config=cfg, rngs=nnx.Rngs(0))
    w = np.asarray(layer.kernel[...])
    soft = ref_groups(w, 2, 8)[1]
    beta = (w.astype(np.float64) * soft).sum() / (soft * soft).sum()
    assert float(layer.beta[...]) == pytest.approx(beta, rel=1e-5)
    np.testing.assert_allclose(np.asarray(layer.forward_weight()), beta * soft, rtol=1e-5, atol=1e-6)
    spec = layer.beta.get_metadata()["spec"]
    assert (spec.config.n, spec.config.m) == (2, 8)
    weights = sste_jax.sparse_weights(nnx.Sequential(layer))
    state = sste_jax.metrics.init_flip_state(weights)
    mask = ref_groups(w, 2, 8)[0]
    np.testing.assert_array_equal(np.unpackbits(np.asarray(state.masks["layers/0/kernel"]))[: w.size], mask.ravel())
    with pytest.raises(ValueError, match=r"in_features=12 \(kernel \(12, 8\)\) is not divisible by 8"):
        sparse_nnx.SparseLinear(12, 8, config=cfg, rngs=nnx.Rngs(0))


def test_recipes_take_an_nm_pattern():
    from experiments.common import recipes

    step = recipes.get_recipe("step", n=2, m=8)
    assert (step.config.n, step.config.m, step.then.n, step.then.m) == (2, 8, 2, 8)
    assert recipes.get_recipe("srste", n=1, m=4).config == SparsityConfig(method="srste", n=1, m=4)
    assert recipes.get_recipe("sste") == recipes.METHODS["sste"] and recipes.METHODS["sste"].config.is_24
    with pytest.raises(ValueError, match=r"n=1, m=4\): mvue=True exist for 2:4 only"):
        recipes.get_recipe("sste_mvue", n=1, m=4)
