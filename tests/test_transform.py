"""sste_jax.sparsify_fn: products found in the jaxpr, axes from the op, vmap, scan, checkpoint, Equinox."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sste_jax
from sste_jax import SparsityConfig

D = 8


def _mlp_params(key, layers=None):
    k1, k2 = jax.random.split(key)
    lead = () if layers is None else (layers,)
    return {
        "attn": jax.random.normal(jax.random.key(9), (D, D)) / 3,
        "mlp": {"w_in": jax.random.normal(k1, lead + (4 * D, D)) / 3,  # (out, in): used as x @ w.T
                "w_out": jax.random.normal(k2, lead + (4 * D, D)) / 6},  # (in, out)
    }


def _block(attn, w_in, w_out, x):
    x = x + x @ attn
    return x + jax.nn.relu(jnp.einsum("td,fd->tf", x, w_in)) @ w_out


def _fn(params, x):
    return _block(params["attn"], params["mlp"]["w_in"], params["mlp"]["w_out"], x)


def _w_tilde(w, axis, beta):
    return beta * sste_jax.soft_threshold_24(w, axis=axis)


def test_forward_is_the_2_4_product_on_each_weights_contraction_axis():
    params = _mlp_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, D))
    sparse = sste_jax.sparsify_fn(_fn, {r"mlp/.*": SparsityConfig()})
    variables = sparse.init(params, x)
    betas = variables["sparsity"]
    assert sorted(betas) == ["mlp/w_in", "mlp/w_out"]
    np.testing.assert_allclose(betas["mlp/w_in"], sste_jax.fit_beta(params["mlp"]["w_in"], axis=1), rtol=1e-6)
    np.testing.assert_allclose(betas["mlp/w_out"], sste_jax.fit_beta(params["mlp"]["w_out"], axis=0), rtol=1e-6)
    expected = _block(params["attn"], _w_tilde(params["mlp"]["w_in"], 1, betas["mlp/w_in"]),
                      _w_tilde(params["mlp"]["w_out"], 0, betas["mlp/w_out"]), x)
    np.testing.assert_allclose(sparse(variables, x), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(sparse)(variables, x), expected, rtol=1e-5, atol=1e-6)


def test_weight_gradient_is_straight_through_and_beta_gets_none():
    params = _mlp_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, D))
    sparse = sste_jax.sparsify_fn(_fn, {r"mlp/.*": SparsityConfig()})
    variables = sparse.init(params, x)
    grads = jax.grad(lambda v: jnp.sum(sparse(v, x) ** 2))(variables)
    betas = variables["sparsity"]
    w_in_t = _w_tilde(params["mlp"]["w_in"], 1, betas["mlp/w_in"])
    w_out_t = _w_tilde(params["mlp"]["w_out"], 0, betas["mlp/w_out"])
    g_in, g_out, g_attn = jax.grad(lambda a, b, c: jnp.sum(_block(c, a, b, x) ** 2), argnums=(0, 1, 2))(
        w_in_t, w_out_t, params["attn"])
    np.testing.assert_allclose(grads["params"]["mlp"]["w_in"], g_in, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["params"]["mlp"]["w_out"], g_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["params"]["attn"], g_attn, rtol=1e-4, atol=1e-5)
    assert all(float(g) == 0.0 for g in grads["sparsity"].values())


def test_per_token_vmap_is_one_batched_product():
    """MVUE groups 4 tokens: a per-token vmap must arrive as one product, equal to the batched one."""
    params = _mlp_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, D))
    config = SparsityConfig(mvue=True, fp8=True)
    per_token = sste_jax.sparsify_fn(lambda p, x: jax.vmap(lambda t: _fn(p, t[None])[0])(x), {r"mlp/.*": config})
    batched = sste_jax.sparsify_fn(_fn, {r"mlp/.*": config})
    variables = batched.init(params, x)
    key = jax.random.key(3)
    g_tok = jax.grad(lambda v: jnp.sum(per_token(v, x, key=key) ** 2))(variables)
    g_bat = jax.grad(lambda v: jnp.sum(batched(v, x, key=key) ** 2))(variables)
    for name in ("w_in", "w_out"):
        np.testing.assert_allclose(g_tok["params"]["mlp"][name], g_bat["params"]["mlp"][name], rtol=1e-5, atol=1e-6)


def test_scan_over_stacked_layers_with_checkpoint_trains_with_mvue_fp8():
    layers = 3
    params = _mlp_params(jax.random.key(0), layers)

    def fn(p, x):
        def body(h, w):
            return jax.checkpoint(lambda h: _block(p["attn"], w["w_in"], w["w_out"], h))(h), None

        return jax.lax.scan(body, x, p["mlp"])[0]

    x = jax.random.normal(jax.random.key(1), (32, D))
    y = jnp.sin(x)
    sparse = sste_jax.sparsify_fn(fn, sste_jax.feed_forward(SparsityConfig(mvue=True, fp8=True)))
    variables = sparse.init(params, x)
    fitted = [float(sste_jax.fit_beta(params["mlp"]["w_in"][i], axis=1)) for i in range(layers)]
    np.testing.assert_allclose(variables["sparsity"]["mlp/w_in"], np.float32(fitted), rtol=1e-6)  # summation order
    fitted = variables["sparsity"]["mlp/w_in"]
    # forward: each layer with its own β
    plain = sste_jax.sparsify_fn(fn, sste_jax.feed_forward())
    h = x
    for i in range(layers):
        h = _block(params["attn"], _w_tilde(params["mlp"]["w_in"][i], 1, variables["sparsity"]["mlp/w_in"][i]),
                   _w_tilde(params["mlp"]["w_out"][i], 0, variables["sparsity"]["mlp/w_out"][i]), h)
    np.testing.assert_allclose(plain(variables, x), h, rtol=1e-4, atol=1e-5)
    tx = sste_jax.freeze_beta(optax.adam(1e-2))
    state = tx.init(variables)

    @jax.jit
    def step(variables, state, key):
        loss, g = jax.value_and_grad(lambda v: jnp.mean((sparse(v, x, key=key) - y) ** 2))(variables)
        updates, state = tx.update(g, state, variables)
        return optax.apply_updates(variables, updates), state, loss

    losses = []
    for i in range(40):
        variables, state, loss = step(variables, state, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    np.testing.assert_array_equal(variables["sparsity"]["mlp/w_in"], np.float32(fitted))


def test_errors_name_the_rule_or_parameter():
    params = _mlp_params(jax.random.key(0))
    x = jnp.ones((4, D))
    with pytest.raises(ValueError, match=r"rules \['nothing'\] match no parameter"):
        sste_jax.sparsify_fn(_fn, {"nothing": SparsityConfig()}).init(params, x)
    with pytest.raises(ValueError, match="mlp/w: .*batch"):
        sste_jax.sparsify_fn(
            lambda p, x: jnp.einsum("btd,bdf->btf", x, p["mlp"]["w"]), {"mlp/w": SparsityConfig()}
        ).init({"mlp": {"w": jnp.ones((2, 8, 4))}}, jnp.ones((2, 4, 8)))
    with pytest.raises(ValueError, match="no β for mlp/w_in"):
        sste_jax.sparsify_fn(_fn, {r"mlp/.*": SparsityConfig()})({"params": params, "sparsity": {}}, x)


def test_equinox_mlp_under_vmap():
    eqx = pytest.importorskip("equinox")
    model = {"mlp": eqx.nn.MLP(D, D, 4 * D, 1, key=jax.random.key(0))}
    x = jax.random.normal(jax.random.key(1), (16, D))
    y = jnp.sin(x)
    sparse = sste_jax.sparsify_fn(
        lambda m, x: jax.vmap(m["mlp"])(x), sste_jax.feed_forward(SparsityConfig(mvue=True, fp8=True))
    )
    variables = sparse.init(model, x)
    assert sorted(variables["sparsity"]) == ["mlp/layers/0/weight", "mlp/layers/1/weight"]
    w0 = model["mlp"].layers[0].weight  # (out, in): 2:4 along axis 1
    beta = variables["sparsity"]["mlp/layers/0/weight"]
    np.testing.assert_allclose(beta, sste_jax.fit_beta(w0, axis=1), rtol=1e-6)
    params, static = eqx.partition(variables, eqx.is_inexact_array)
    tx = sste_jax.freeze_beta(optax.adam(1e-2))
    state = tx.init(params)

    @eqx.filter_jit
    def step(params, state, key):
        loss, g = eqx.filter_value_and_grad(
            lambda p: jnp.mean((sparse(eqx.combine(p, static), x, key=key) - y) ** 2))(params)
        updates, state = tx.update(g, state, params)
        return eqx.apply_updates(params, updates), state, loss

    losses = []
    for i in range(40):
        params, state, loss = step(params, state, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    assert float(params["sparsity"]["mlp/layers/0/weight"]) == float(beta)


def test_checkpoint_prunes_once():
    params = _mlp_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, D))
    sparse = sste_jax.sparsify_fn(lambda p, x: jax.checkpoint(_fn)(p, x), {r"mlp/.*": SparsityConfig()})
    variables = sparse.init(params, x)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(sparse(v, x))))(variables))
    assert jaxpr.count(" abs ") == 2 * 4  # two weights, each soft-thresholded once (4 abs per pruning)
