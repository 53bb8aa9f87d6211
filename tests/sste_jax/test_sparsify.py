"""sste_jax.sparsify / sparsify_fn: every product of a chosen weight is the S-STE product — forward and
gradient — however the weight reaches it and under whatever transformation the caller applies."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import sste_jax
from sste_jax import SparsityConfig
from sste_jax._select import check_rules, match_weight

X_TxD = jax.random.normal(jax.random.key(1), (8, 16))
C_TxF = jax.random.normal(jax.random.key(2), (8, 8))  # the loss's output weights: sum(y * C)


def _w(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape) / np.sqrt(shape[-2] if len(shape) > 1 else 4)


def _scan_axis1(p, x):  # stacked layers on axis 1, as MaxText's param_scan_axis=1; scanned after a moveaxis
    return jax.lax.scan(lambda h, w: (h, h @ w), x, jnp.moveaxis(p["w"], 1, 0))[1].sum(0)


# name -> (params, fn(params, x)), every fn's output (8, 8): how a weight reaches its product
ROUTES = {
    "matmul": ({"w": _w((16, 8))}, lambda p, x: x @ p["w"]),
    "jnp.dot": ({"w": _w((16, 8))}, lambda p, x: jnp.dot(x, p["w"])),
    "jnp.matmul": ({"w": _w((16, 8))}, lambda p, x: jnp.matmul(x, p["w"])),
    "einsum": ({"w": _w((16, 8))}, lambda p, x: jnp.einsum("td,df->tf", x, p["w"])),
    "transposed (out, in)": ({"w": _w((8, 16))}, lambda p, x: jax.lax.dot_general(
        x, p["w"].T, (((1,), (0,)), ((), ())))),
    "weight on the left": ({"w": _w((8, 16))}, lambda p, x: (p["w"] @ x.T).T),
    "cast": ({"w": _w((16, 8))}, lambda p, x: x @ p["w"].astype(jnp.float16).astype(jnp.float32)),
    "reshape": ({"w": _w((16 * 8, 1))}, lambda p, x: x @ p["w"].reshape(16, 8)),
    "expand and squeeze": ({"w": _w((16, 8))}, lambda p, x: x @ jnp.squeeze(p["w"][None], 0)),
    "one layer of a stack": ({"w": _w((3, 16, 8))}, lambda p, x: x @ p["w"][1]),
    "remat": ({"w": _w((16, 8))}, lambda p, x: jax.checkpoint(lambda w: x @ w)(p["w"])),
    "cond": ({"w": _w((16, 8))}, lambda p, x: jax.lax.cond(x[0, 0] > 0, lambda: x @ p["w"],
                                                             lambda: 2 * (x @ p["w"]))),
    "fori_loop": ({"w": _w((16, 16))}, lambda p, x: jax.lax.fori_loop(0, 2, lambda i, h: h @ p["w"], x)[:, :8]),
    "vmap over tokens": ({"w": _w((16, 8))}, lambda p, x: jax.vmap(lambda x_D: x_D @ p["w"])(x)),
    "vmap over layers": ({"w": _w((2, 16, 8))}, lambda p, x: jax.vmap(jnp.matmul)(jnp.stack([x, -x]), p["w"]).sum(0)),
    "scan over layers": ({"w": _w((3, 16, 8))}, lambda p, x: jax.lax.scan(lambda h, w: (h, h @ w), x,
                                                                           p["w"])[1].sum(0)),
    "scan, layers on axis 1": ({"w": _w((16, 3, 8))}, _scan_axis1),
    "jit inside": ({"w": _w((16, 8))}, lambda p, x: jax.jit(lambda x, w: x @ w)(x, p["w"])),
}


def _variables(route, config=SparsityConfig(), seed=0):
    params, fn = ROUTES[route]
    sparse = sste_jax.sparsify_fn(fn, {"w": config}, seed=seed)
    return sparse, fn, sparse.init(params, X_TxD)


def _dense_at(variables):
    """The params with each sparse weight replaced by its forward weight W̃ (in the parameter's layout)."""
    forward = {n: w.forward() for n, w in sste_jax.sparse_weights(variables).items()}
    name = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)  # noqa: E731
    return jax.tree_util.tree_map_with_path(lambda p, x: forward.get(name(p), x), variables["params"])


@pytest.mark.parametrize("transform", ["call", "jit", "vmap"])
@pytest.mark.parametrize("route", list(ROUTES))
def test_forward_and_gradient_are_the_straight_through_product(route, transform):
    sparse, fn, variables = _variables(route)
    w_tilde = _dense_at(variables)
    loss = lambda v, x: jnp.sum(sparse(v, x) * C_TxF)  # noqa: E731
    ref_loss = lambda p, x: jnp.sum(fn(p, x) * C_TxF)  # noqa: E731
    if transform == "jit":
        loss, ref_loss = jax.jit(loss), jax.jit(ref_loss)
    elif transform == "vmap":  # a batch of inputs around the whole call
        xs = jnp.stack([X_TxD, 2 * X_TxD])
        loss_one, ref_one = loss, ref_loss
        loss = lambda v, x: jnp.sum(jax.vmap(lambda x: loss_one(v, x))(xs))  # noqa: E731
        ref_loss = lambda p, x: jnp.sum(jax.vmap(lambda x: ref_one(p, x))(xs))  # noqa: E731
    value, grads = jax.value_and_grad(loss)(variables, X_TxD)
    ref_value, ref_grads = jax.value_and_grad(ref_loss)(w_tilde, X_TxD)
    rtol = 2e-3 if route == "cast" else 1e-4  # the reference casts W̃ to float16 once more
    np.testing.assert_allclose(value, ref_value, rtol=rtol, atol=1e-4)  # the 2:4 forward, not the dense one
    assert abs(float(value) - float(ref_loss(variables["params"], X_TxD))) > 1e-3  # and it differs from dense
    # straight through: the dense weight gets the gradient of W̃ (no mask, no β factor), β none
    np.testing.assert_allclose(grads["params"]["w"], ref_grads["w"], rtol=1e-4, atol=1e-4)
    assert not np.any(grads["sparsity"]["w"].value)


@pytest.mark.parametrize("route", ["matmul", "transposed (out, in)", "reshape", "scan, layers on axis 1",
                                   "vmap over layers"])
def test_groups_are_n_of_m_along_the_contraction_axis_and_beta_is_fitted_per_layer(route):
    _, _, variables = _variables(route)
    w = sste_jax.sparse_weights(variables)["w"]
    operand = w.operand()  # (layers..., in, out) as the product sees it
    layers = operand.reshape((-1,) + operand.shape[-2:])
    betas = np.broadcast_to(np.ravel(w.beta), (len(layers),))
    for o, beta in zip(layers, betas):
        grouped = jnp.moveaxis(sste_jax.forward_weight(o, beta, w.config, w.axis), w.axis, -1)
        assert int((grouped.reshape(*grouped.shape[:-1], -1, 4) != 0).sum(-1).max()) == 2
        np.testing.assert_allclose(beta, sste_jax.fit_beta(o, axis=w.axis), rtol=1e-6)


def test_the_contraction_axis_is_taken_from_the_op_for_out_in_weights():
    _, _, variables = _variables("transposed (out, in)")
    w = sste_jax.sparse_weights(variables)["w"]
    w_tilde = w.forward()  # (8, 16) as stored: groups along the 16 inputs, axis 1
    assert int((w_tilde.reshape(8, 4, 4) != 0).sum(-1).max()) == 2
    np.testing.assert_allclose(w.beta, sste_jax.fit_beta(variables["params"]["w"], axis=1), rtol=1e-6)


@pytest.mark.parametrize("route", [
    "matmul", "transposed (out, in)", "one layer of a stack", "scan over layers", "vmap over layers"])
def test_mvue_and_fp8_act_on_every_route(route):
    _, _, plain = _variables(route)
    sparse, _, variables = _variables(route, SparsityConfig(mvue=True, fp8=True))
    y, y_plain = sparse(variables, X_TxD), _variables(route)[0](plain, X_TxD)
    assert not np.allclose(y, y_plain)  # FP8 rounds the product ...
    np.testing.assert_allclose(y, y_plain, rtol=0.15, atol=0.15 * float(jnp.abs(y_plain).max()))  # ... only a little
    grads = jax.grad(lambda v: jnp.sum(sparse(v, X_TxD) * C_TxF))(variables)["params"]["w"]
    plain_grads = jax.grad(lambda v: jnp.sum(_variables(route)[0](v, X_TxD) * C_TxF))(plain)["params"]["w"]
    assert np.all(np.isfinite(grads)) and not np.allclose(grads, plain_grads, rtol=0.05)  # MVUE sampled ĝ


# --- the rules -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "path, selected",
    [
        ("transformer/h/0/mlp/c_fc/kernel", True),
        ("transformer/h/0/attn/c_proj/kernel", False),
        ("layers/3/mlp/gate_proj/kernel", True),
        ("layer_0/mlp/gating_einsum", True),
        ("layer_0/mlp/linear", True),
        ("blocks/0/attn/linear", False),
        ("encoder/block/1/layer/1/DenseReluDense/wi/kernel", True),
        ("gpt_neox/layers/2/dense_h_to_4h/kernel", True),
        ("gpt_neox/layers/2/attention/dense/kernel", False),
        ("decoder/layers/mlp/wi_0/kernel", True),  # MaxText
        ("mlp/layers/0/weight", True),  # Equinox
        ("Block_1/fc1/kernel", True),
        ("fc1/kernel", False),
        ("wte/embedding", False),
        ("lm_head/kernel", False),
    ],
)
def test_feed_forward_rule_picks_the_feed_forward_weights(path, selected):
    assert bool(match_weight(check_rules(sste_jax.feed_forward(), "test"), path)) is selected


@pytest.mark.outside_annotations  # checks the library's own error for a dict that is not a config
def test_first_match_wins_and_bad_rules_raise():
    a, b = SparsityConfig(method="ste"), SparsityConfig()
    assert match_weight(check_rules({r".*mlp.*": a, r".*": b}, "test"), "h/0/mlp/c_fc/kernel")[1] is a
    with pytest.raises(ValueError, match="not a valid regex"):
        sste_jax.sparsify_fn(lambda p, x: x @ p["w"], {"(": a})
    with pytest.raises(TypeError, match=r"rules\['.\*'\].*SparsityConfig"):
        sste_jax.sparsify(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), {".*": {"method": "sste"}}, X_TxD)


def test_a_weight_whose_beta_cannot_be_fitted_is_named():
    zero = nnx.Linear(16, 8, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))  # weights to be loaded later
    with pytest.raises(ValueError, match=r"kernel: cannot fit S-STE's β .* all zero"):
        sste_jax.sparsify(zero, {"kernel": SparsityConfig()}, X_TxD)
    assert sste_jax.sparsify(zero, {"kernel": SparsityConfig(method="ste")}, X_TxD).sparsity.betas["kernel"][...] == 1


# --- refusals: never dense without a word ------------------------------------------------------------

@pytest.mark.parametrize("fn, what", [
    (lambda p, x: x @ (p["w"] * (jnp.abs(p["w"]) > 0.1)), "`mul` changed its values"),
    (lambda p, x: x @ (p["w"] + p["a"] @ p["b"]), "`add` changed its values"),  # a LoRA delta
    (lambda p, x: x @ p["w"][:, :4], "`slice` changed its values"),
    (lambda p, x: jax.lax.scan(lambda w, _: (w.T, x @ w), p["w"], None, length=2)[1].sum(0), "carried through a scan"),
])
def test_a_weight_changed_on_its_way_to_the_product_is_refused_by_name(fn, what):
    params = {"w": _w((16, 16)), "a": _w((16, 4), 1), "b": _w((4, 16), 2)}
    with pytest.raises(ValueError, match=f"^w: .*{what}"):
        sste_jax.sparsify_fn(fn, {"w": SparsityConfig()}).init(params, X_TxD)


def test_both_operands_weights_and_unused_rules_are_refused():
    params = {"w": _w((16, 16)), "v": _w((16, 16), 1)}
    with pytest.raises(ValueError, match="v and w: both operands"):
        sste_jax.sparsify_fn(lambda p, x: x @ (p["v"] @ p["w"]), {"v|w": SparsityConfig()}).init(params, X_TxD)
    with pytest.raises(ValueError, match=r"rules \['nowhere'\] match no weight"):
        sste_jax.sparsify_fn(lambda p, x: x @ p["w"], {"w": SparsityConfig(), "nowhere": SparsityConfig()}).init(
            params, X_TxD)


def test_contraction_length_and_group_axis_are_checked_when_made_sparse_naming_the_weight():
    bad = sste_jax.sparsify_fn(lambda p, x: x[:, :6] @ p["w"], {"w": SparsityConfig()})
    with pytest.raises(ValueError, match=r"^w: the contraction length 6 \(operand shape \(6, 8\)\) is not divisible"):
        bad.init({"w": _w((6, 8))}, X_TxD)
    six = sste_jax.sparsify_fn(lambda p, x: x @ p["w"], {"w": SparsityConfig(n=2, m=6)})
    with pytest.raises(ValueError, match="contraction length 16 .* not divisible by 6"):
        six.init({"w": _w((16, 8))}, X_TxD)
    axis = sste_jax.sparsify_fn(lambda p, x: x @ p["w"], {"w": SparsityConfig(group_axis=1)})
    with pytest.raises(ValueError, match=r"w: SparsityConfig\(group_axis=1\) is not a contraction axis"):
        axis.init({"w": _w((16, 8))}, X_TxD)


@pytest.mark.parametrize("n, m", [(1, 4), (2, 8)])
def test_n_m_rules_fit_beta_for_their_own_pattern(n, m):
    config = SparsityConfig(n=n, m=m)
    w = _w((16, 8))
    beta = sste_jax.sparsify_fn(lambda p, x: x @ p["w"], {"w": config}).init({"w": w}, X_TxD)["sparsity"]["w"]
    np.testing.assert_allclose(beta.value, sste_jax.fit_beta(w, n=n, m=m), rtol=1e-6)
    model = sste_jax.sparsify(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), {"kernel": config}, X_TxD)
    np.testing.assert_allclose(model.sparsity.betas["kernel"][...], sste_jax.fit_beta(model.kernel[...], n=n, m=m),
                               rtol=1e-6)


# --- several contraction axes ------------------------------------------------------------------------

class _AttentionOut(nn.Module):  # (heads, head_dim, embed), contracting heads and head_dim, as MaxText's out
    @nn.compact
    def __call__(self, x_BxTxHxK):
        return nn.DenseGeneral(16, axis=(-2, -1), name="out")(x_BxTxHxK)


@pytest.mark.parametrize("group_axis, grouped", [(None, 1), (0, 0), (-2, 1)])
def test_an_attention_output_projection_groups_along_one_contraction_axis(group_axis, grouped):
    model = sste_jax.sparsify(_AttentionOut(), {"out": SparsityConfig(group_axis=group_axis)})
    x = jax.random.normal(jax.random.key(3), (2, 4, 4, 8))
    variables = model.init(jax.random.key(0), x)
    beta, kernel = variables["sparsity"]["out/kernel"], variables["params"]["out"]["kernel"]
    assert beta.spec.axis == grouped  # the innermost (head_dim) by default
    w_tilde = beta.value * sste_jax.soft_threshold_24(kernel, axis=grouped)
    ref = lambda k: jnp.sum(_AttentionOut().apply(  # noqa: E731
        {"params": {"out": {"kernel": k, "bias": variables["params"]["out"]["bias"]}}}, x))
    np.testing.assert_allclose(jnp.sum(model.apply(variables, x)), ref(w_tilde), rtol=1e-5)
    grads = jax.grad(lambda v: jnp.sum(model.apply(v, x)))(variables)["params"]["out"]["kernel"]
    np.testing.assert_allclose(grads, jax.grad(ref)(w_tilde), rtol=1e-5, atol=1e-6)


# --- MVUE: library-owned keys ------------------------------------------------------------------------

def _identity_grad(seed, w):
    """The MVUE-sampled output gradient itself: with x = I, the weight's gradient xᵀĝ is ĝ."""
    sparse = sste_jax.sparsify_fn(lambda p, x: x @ p["w"], {"w": SparsityConfig(mvue=True)}, seed=seed)
    sparsity = sparse.init({"w": w}, jnp.eye(8))["sparsity"]
    loss = lambda p: jnp.sum(sparse({"params": p, "sparsity": sparsity}, jnp.eye(8)) * C_TxF)  # noqa: E731
    return jax.grad(loss)({"w": w})["w"]


def _inclusion(g_TxO):
    """MVUE's probability of keeping each entry of ``g`` (groups of 4 consecutive tokens), from its definition
    (``docs/algorithm.md#sparse-linear-transform``)."""
    a = np.abs(np.asarray(g_TxO, np.float64)).reshape(-1, 4, g_TxO.shape[1]) + np.finfo(np.float32).eps
    s = a.sum(1, keepdims=True)
    second = (a / s / (s - a)).sum(1, keepdims=True) - a / s / (s - a)  # sum over j != k of (a_j/S)/(S - a_j)
    return (a / s + a * second).reshape(g_TxO.shape)


def _assert_mean(draws, g):
    """The draws of MVUE(g) average to ``g``: each entry's error in units of its standard error (from MVUE's
    variance g²(1/p − 1)) is below 5, and their mean square (a chi-square over the entries, ~1 for an unbiased
    sampler and ~len(draws) for one that repeats its draw) below 2."""
    g = np.asarray(g, np.float64)
    var = g**2 * (1 / _inclusion(g) - 1)
    z2 = (draws.mean(0) - g) ** 2 / np.maximum(var / len(draws), 1e-30)
    assert np.sqrt(z2.max()) < 5 and z2.mean() < 2, (np.sqrt(z2.max()), z2.mean())


def test_mvue_is_unbiased_over_seeds_and_reproducible_from_the_seed():
    w = _w((8, 8))
    draws = np.stack([np.asarray(_identity_grad(seed, w)) for seed in range(64)])
    assert int((draws[0].reshape(2, 4, 8) != 0).sum(1).max()) == 2  # 2 of every 4 tokens kept
    np.testing.assert_array_equal(draws[0], _identity_grad(0, w))  # the seed decides
    _assert_mean(draws, C_TxF)


def test_mvue_draws_afresh_every_training_step_of_a_scan_that_keeps_no_rng_state():
    """Two stacked layers scanned (the layout where models drop RNG state after their scan), trained with SGD on
    one fixed batch: every step draws a new sample, so the steps' mean gradient converges to the true one."""
    fn = lambda p, x: jax.lax.scan(lambda h, w: (h, h @ w), x, p["w"])[1]  # noqa: E731
    c = jnp.stack([C_TxF, -C_TxF])
    sparse = sste_jax.sparsify_fn(fn, {"w": SparsityConfig(mvue=True)}, seed=0)
    variables = sparse.init({"w": _w((2, 8, 8))}, jnp.eye(8))
    grad = jax.jit(jax.grad(lambda p, s: jnp.sum(sparse({"params": p, "sparsity": s}, jnp.eye(8)) * c)))
    params, draws = variables["params"], []
    for _ in range(48):
        g = grad(params, variables["sparsity"])["w"]
        draws.append(np.asarray(g))
        params = {"w": params["w"] - 1e-3 * g}
    draws = np.stack(draws)
    assert all(not np.array_equal(a != 0, b != 0) for a, b in zip(draws, draws[1:]))
    for layer in range(2):
        _assert_mean(draws[:, layer], c[layer])


def test_inference_needs_no_key_and_runs_inside_a_raw_jax_loop():
    config = SparsityConfig(mvue=True, fp8=True)
    model = sste_jax.sparsify(_Net(nnx.Rngs(0)), sste_jax.feed_forward(config), X_TxD[:, :8])
    layer = sste_jax.nnx.SparseLinear(8, 8, config=config, rngs=nnx.Rngs(0))

    def decode(h_TxD):  # the model closed over by a plain JAX loop, as a sampler's decoding loop does
        return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(layer(model(h))), h_TxD)

    assert jax.jit(decode)(X_TxD[:3, :8]).shape == (3, 8)  # 3 tokens: MVUE's groups of 4 matter only to a gradient


# --- NNX -----------------------------------------------------------------------------------------------

class _MLP(nnx.Module):
    def __init__(self, d, rngs):
        self.fc = nnx.Linear(d, 4 * d, rngs=rngs)
        self.proj = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        return self.proj(jax.nn.gelu(self.fc(x)))


class _Block(nnx.Module):
    def __init__(self, d, rngs):
        self.attn = nnx.Linear(d, d, rngs=rngs)
        self.mlp = _MLP(d, rngs)

    def __call__(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class _Net(nnx.Module):
    def __init__(self, rngs, d=8, layers=2):
        self.blocks = nnx.List([_Block(d, rngs) for _ in range(layers)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class _TransposedCast(nnx.Module):  # a weight stored (out, in), transposed and cast on the way, as HF's Conv1D
    def __init__(self, rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (8, 16)))

    def __call__(self, x):
        return jax.lax.dot_general(x, self.kernel[...].T.astype(jnp.float32), (((1,), (0,)), ((), ())))


def test_nnx_grad_value_is_the_sparse_models_and_its_gradient_straight_through():
    model = sste_jax.sparsify(_TransposedCast(nnx.Rngs(0)), {"kernel": SparsityConfig()}, X_TxD)
    loss = lambda m: jnp.sum(m(X_TxD) * C_TxF)  # noqa: E731
    w_tilde = sste_jax.sparse_weights(model)["kernel"].forward()
    dense = _TransposedCast(nnx.Rngs(0))
    dense.kernel[...] = w_tilde
    value, grads = nnx.value_and_grad(loss)(model)
    ref_value, ref_grads = nnx.value_and_grad(loss)(dense)
    np.testing.assert_allclose([value, loss(model), nnx.jit(loss)(model)], [ref_value] * 3, rtol=1e-5)
    np.testing.assert_allclose(grads["kernel"][...], ref_grads["kernel"][...], rtol=1e-5, atol=1e-6)


def test_nnx_model_trains_with_beta_frozen_and_only_the_chosen_weights_sparse():
    x = X_TxD[:, :8]
    model = sste_jax.sparsify(_Net(nnx.Rngs(0)), sste_jax.feed_forward(SparsityConfig(mvue=True, fp8=True)), x)
    assert sorted(model.sparsity.betas) == [f"blocks/{i}/mlp/{n}/kernel" for i in (0, 1) for n in ("fc", "proj")]
    betas = {k: b[...] for k, b in model.sparsity.betas.items()}
    opt = nnx.Optimizer(model, sste_jax.freeze_beta(optax.adam(1e-2)), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - jnp.sin(x)) ** 2))(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0]
    assert all(np.array_equal(model.sparsity.betas[k][...], v) for k, v in betas.items())
    for w in sste_jax.sparse_weights(model).values():
        assert int((w.forward().reshape(-1, 4, w.kernel.shape[1]) != 0).sum(1).max()) <= 2


def test_nnx_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"rules \['nothing/here'\] match no weight"):
        sste_jax.sparsify(_Net(nnx.Rngs(0)), {"nothing/here": SparsityConfig()}, X_TxD[:, :8])
    with pytest.raises(TypeError, match="example inputs"):
        sste_jax.sparsify(_Net(nnx.Rngs(0)), sste_jax.feed_forward())
    model = sste_jax.sparsify(_Net(nnx.Rngs(0)), sste_jax.feed_forward(), X_TxD[:, :8])
    with pytest.raises(ValueError, match="sparse already"):
        sste_jax.sparsify(model, sste_jax.feed_forward(), X_TxD[:, :8])
    with pytest.raises(RuntimeError, match="call the model sparsify returned"):
        model.blocks[0].mlp.fc(X_TxD[:, :8])  # alone it would run dense
    with pytest.raises(ValueError, match="no sparse weights"):
        sste_jax.sparse_weights(_Net(nnx.Rngs(0)))


class _ScanMLP(nnx.Module):
    def __init__(self, rngs):
        self.up_proj = nnx.Linear(8, 32, rngs=rngs)
        self.down_proj = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return x + self.down_proj(jax.nn.gelu(self.up_proj(x)))


class _ScanNet(nnx.Module):
    def __init__(self, rngs, layers=3):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return _ScanMLP(rngs)

        self.mlp = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def body(x, layer):
            return layer(x)

        return body(x, self.mlp)


def test_nnx_scan_and_remat_one_beta_per_layer_pruned_once():
    x = X_TxD[:, :8]
    model = sste_jax.sparsify(_ScanNet(nnx.Rngs(0)), sste_jax.feed_forward(), x)
    beta = model.sparsity.betas["mlp/up_proj/kernel"][...]
    np.testing.assert_allclose(beta, [sste_jax.fit_beta(model.mlp.up_proj.kernel[i]) for i in range(3)], rtol=1e-6)
    assert "mlp/up_proj/bias" not in model.sparsity.betas  # stacked, under a matched path, feeds no product
    graph, state = nnx.split(model)
    grad = lambda s: nnx.grad(lambda m: jnp.sum(m(x)))(nnx.merge(graph, s))  # noqa: E731
    # 2 weights x one pruning x 4 abs in the scan body: the rematerialised forward reuses the saved W̃
    assert str(jax.make_jaxpr(grad)(state)).count(" abs ") == 2 * 4


# --- Linen ---------------------------------------------------------------------------------------------

class _LinenRoute(nn.Module):
    route: str

    @nn.compact
    def __call__(self, x):
        params, fn = ROUTES[self.route]
        p = {k: self.param(k, lambda _, v=v: v) for k, v in params.items()}
        return fn(p, x)


@pytest.mark.parametrize("route", ["matmul", "jnp.dot", "jnp.matmul", "einsum", "transposed (out, in)", "cast"])
def test_linen_products_written_any_way_are_sparse_under_grad(route):
    """Linen: the issue's minimal case (a weight transposed on its way) and ``@``/``jnp.dot``/``jnp.matmul``."""
    model = sste_jax.sparsify(_LinenRoute(route), {"w": SparsityConfig()})
    variables = model.init(jax.random.key(0), X_TxD)
    loss = lambda v: jnp.sum(model.apply(v, X_TxD) * C_TxF)  # noqa: E731
    w_tilde = _dense_at(variables)
    ref = lambda p: jnp.sum(_LinenRoute(route).apply({"params": p}, X_TxD) * C_TxF)  # noqa: E731
    value, grads = jax.value_and_grad(loss)(variables)
    rtol = 2e-3 if route == "cast" else 1e-5  # the reference casts W̃ to float16 once more
    np.testing.assert_allclose([value, loss(variables), jax.jit(loss)(variables)], [ref(w_tilde)] * 3, rtol=rtol)
    np.testing.assert_allclose(grads["params"]["w"], jax.grad(ref)(w_tilde)["w"], rtol=1e-4, atol=1e-5)


class _LinenLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.DenseGeneral(8, name="wo")(nn.relu(nn.DenseGeneral(32, name="wi")(x))), None


class _LinenDecoder(nn.Module):  # MaxText's default layout: scanned layers, parameters stacked on axis 1
    axis: int = 1

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(nn.remat(_LinenLayer), variable_axes={"params": self.axis}, split_rngs={"params": True},
                       length=3)
        return scan(name="layers")(x, None)[0]


@pytest.mark.parametrize("axis", [1, 0])
def test_linen_scanned_layers_with_the_layer_axis_anywhere(axis):
    model = sste_jax.sparsify(_LinenDecoder(axis), {"layers/w.*": SparsityConfig(mvue=True, fp8=True)})
    x = X_TxD[:, :8]
    variables = model.init(jax.random.key(0), x)
    assert sorted(variables["sparsity"]) == ["layers/wi/kernel", "layers/wo/kernel"]  # biases feed no product
    kernel = variables["params"]["layers"]["wi"]["kernel"]  # (8, 3, 32) or (3, 8, 32)
    beta = variables["sparsity"]["layers/wi/kernel"].value
    layers = [jnp.take(kernel, i, axis=axis) for i in range(3)]
    np.testing.assert_allclose(beta, [sste_jax.fit_beta(w) for w in layers], rtol=1e-6)
    plain = sste_jax.sparsify(_LinenDecoder(axis), {"layers/w.*": SparsityConfig()})
    plain_variables = plain.init(jax.random.key(0), x)
    w_tilde = _dense_at(plain_variables)
    ref = lambda p: jnp.sum(_LinenDecoder(axis).apply({"params": p}, x) ** 2)  # noqa: E731
    loss = lambda v: jnp.sum(plain.apply(v, x) ** 2)  # noqa: E731
    np.testing.assert_allclose(loss(plain_variables), ref(w_tilde), rtol=1e-5)
    grads = jax.jit(jax.grad(loss))(plain_variables)["params"]
    np.testing.assert_allclose(grads["layers"]["wi"]["kernel"], jax.grad(ref)(w_tilde)["layers"]["wi"]["kernel"],
                               rtol=1e-4, atol=1e-6)
    assert np.all(np.isfinite(jax.grad(lambda v: jnp.sum(model.apply(v, x) ** 2))(variables)["params"]["layers"]
                              ["wo"]["kernel"]))


def test_linen_fit_refits_loaded_weights_and_apply_refuses_variables_without_beta():
    model = sste_jax.sparsify(nn.Dense(8), {".*": SparsityConfig()})
    dense = nn.Dense(8).init(jax.random.key(3), X_TxD)  # e.g. loaded from a dense checkpoint
    variables = model.fit(dense, X_TxD)
    np.testing.assert_allclose(variables["sparsity"]["kernel"].value, sste_jax.fit_beta(dense["params"]["kernel"]),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="no 'sparsity' collection"):
        model.apply(dense, X_TxD)
    with pytest.raises(ValueError, match=r"rules \['nowhere'\] match no weight"):
        sste_jax.sparsify(nn.Dense(8), {"nowhere": SparsityConfig()}).init(jax.random.key(0), X_TxD)
    with pytest.raises(TypeError, match="no example inputs"):
        sste_jax.sparsify(nn.Dense(8), {".*": SparsityConfig()}, X_TxD)


# --- one record, read by everything --------------------------------------------------------------------

def _made_every_way():
    x = X_TxD[:, :8]
    nnx_model = sste_jax.sparsify(_Net(nnx.Rngs(0)), sste_jax.feed_forward(), x)
    linen_model = sste_jax.sparsify(_LinenDecoder(), {"layers/w.*": SparsityConfig()})
    fn_sparse, _, fn_variables = _variables("scan, layers on axis 1")
    layered = nnx.Sequential(sste_jax.nnx.SparseLinear(8, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 8, rngs=nnx.Rngs(1)))
    return {"sparsify (NNX)": nnx_model, "sparsify (Linen)": linen_model.init(jax.random.key(0), x),
            "sparsify_fn": fn_variables, "SparseLinear": layered}


def test_every_metric_mask_export_and_checkpoint_sees_every_sparse_weight(tmp_path):
    from sste_jax import checkpoint, serving

    expected = {
        "sparsify (NNX)": {f"blocks/{i}/mlp/{n}/kernel" for i in (0, 1) for n in ("fc", "proj")},
        "sparsify (Linen)": {"layers/wi/kernel", "layers/wo/kernel"},
        "sparsify_fn": {"w"},
        "SparseLinear": {"layers/0/kernel"},
    }
    for kind, model in _made_every_way().items():
        weights = sste_jax.sparse_weights(model)
        assert set(weights) == expected[kind], kind
        rates, _ = sste_jax.metrics.flip_rate(sste_jax.metrics.init_flip_state(weights), weights)
        assert set(rates) == {"flip_rate"} | {f"flip_rate/{n}" for n in expected[kind]}
        stats = sste_jax.metrics.to_host(sste_jax.metrics.sparsity_stats(weights))
        assert all(stats[f"zero_fraction/{n}"] >= 0.5 for n in expected[kind]), kind
        mask = sste_jax.optim.sparse_kernel_mask(model)
        marked = {"/".join(str(getattr(k, "key", k)) for k in p) for p, v in
                  jax.tree_util.tree_flatten_with_path(mask)[0] if v}
        assert {m.removesuffix("/value") for m in marked} == expected[kind], kind
        exported, sparse = serving.inference_weights(model)
        assert set(sparse) == expected[kind]
        for name in expected[kind]:
            np.testing.assert_array_equal(exported[name], weights[name].forward())
        state = nnx.state(model) if isinstance(model, nnx.Module) else model
        folder = tmp_path / kind.replace(" ", "_").replace("(", "").replace(")", "")
        checkpoint.save_checkpoint(folder, 1, state)
        record = json.loads((folder / "1" / "sste_checksums" / "checksums.json").read_text())["sparse_layers"]
        assert len(record) == len(expected[kind]), (kind, record)


def test_densify_bakes_w_tilde_into_the_models_own_parameters():
    x = X_TxD[:, :8]
    model = sste_jax.sparsify(_Net(nnx.Rngs(0)), sste_jax.feed_forward(), x)
    y = model(x)
    dense = sste_jax.nnx.densify_layers(model)
    assert type(dense) is _Net and not hasattr(dense, "sparsity")
    np.testing.assert_allclose(dense(x), y, rtol=1e-5, atol=1e-6)
    dense.blocks[0].mlp.fc(x)  # its layers run alone again


def test_a_checkpoint_refuses_a_target_sparsified_differently(tmp_path):
    from sste_jax import checkpoint

    x = X_TxD[:, :8]
    model = sste_jax.sparsify(_Net(nnx.Rngs(0)), sste_jax.feed_forward(), x)
    checkpoint.save_checkpoint(tmp_path, 1, nnx.state(model))
    same = sste_jax.sparsify(_Net(nnx.Rngs(5)), sste_jax.feed_forward(), x)
    nnx.update(same, checkpoint.restore_checkpoint(tmp_path, nnx.state(same)))
    np.testing.assert_array_equal(same.sparsity.betas["blocks/0/mlp/fc/kernel"][...],
                                  model.sparsity.betas["blocks/0/mlp/fc/kernel"][...])
    other = sste_jax.sparsify(_Net(nnx.Rngs(5)), sste_jax.feed_forward(SparsityConfig(method="ste")), x)
    with pytest.raises(checkpoint.CheckpointConfigError, match="blocks/0/mlp/fc/kernel: .*method='sste' in the check"):
        checkpoint.restore_checkpoint(tmp_path, nnx.state(other))
