"""sste_jax.sparsify: any NNX or Linen model through Qwix; sparse_dot_general / sparse_einsum; the rules."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import sste_jax
from sste_jax import SparsityConfig
from sste_jax import linen as sparse_linen
from sste_jax import nnx as sparse_nnx

pytest.importorskip("qwix")


def _groups_ok(w, axis):
    """At most 2 non-zeros in every group of 4 consecutive entries along ``axis``."""
    moved = jnp.moveaxis(w, axis, 0)
    return bool(((moved.reshape(moved.shape[0] // 4, 4, -1) != 0).sum(1) <= 2).all())


# --- the product -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "equation, x_shape, w_shape, w_axis",
    [
        ("btd,df->btf", (2, 4, 8), (8, 12), 0),
        ("btd,fd->bft", (2, 4, 8), (12, 8), 1),
        ("btd,gdf->gbtf", (2, 4, 8), (3, 8, 4), 1),
    ],
)
def test_sparse_einsum_is_the_product_with_groups_on_the_contraction_axis(equation, x_shape, w_shape, w_axis):
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape)
    beta = 1.3
    y = sste_jax.sparse_einsum(equation, x, w, weight=1, beta=beta)
    w_tilde = beta * sste_jax.soft_threshold_24(w, axis=w_axis)
    assert _groups_ok(w_tilde, w_axis)
    np.testing.assert_allclose(y, jnp.einsum(equation, x, w_tilde), rtol=1e-5, atol=1e-5)


def test_sparse_dot_general_weight_on_either_side():
    x = jax.random.normal(jax.random.key(0), (5, 8))
    w = jax.random.normal(jax.random.key(1), (8, 6))
    w_tilde = sste_jax.soft_threshold_24(w)
    dn = (((1,), (0,)), ((), ()))
    np.testing.assert_allclose(sste_jax.sparse_dot_general(x, w, dn, weight=1, beta=1.0), x @ w_tilde, rtol=1e-6)
    dn_left = (((0,), (1,)), ((), ()))  # w^T-style: (8, 6) weight on the left, contracting axis 0 with x's 1
    np.testing.assert_allclose(
        sste_jax.sparse_dot_general(w, x, dn_left, weight=0, beta=1.0), w_tilde.T @ x.T, rtol=1e-5, atol=1e-6
    )


def test_sparse_product_refuses_batch_and_multi_contraction_weights():
    x, w = jnp.ones((2, 4, 8)), jnp.ones((2, 8, 4))
    with pytest.raises(ValueError, match="blk/w: .*batch"):
        sste_jax.sparse_einsum("btd,bdf->btf", x, w, weight=1, beta=1.0, name="blk/w")
    with pytest.raises(ValueError, match="exactly one contraction"):
        sste_jax.sparse_einsum("bnh,nhd->bd", jnp.ones((2, 4, 8)), jnp.ones((4, 8, 4)), weight=1, beta=1.0, name="o")
    with pytest.raises(ValueError, match="batch dimensions"):
        sste_jax.sparse_dot_general(x, w, (((2,), (1,)), ((0,), (0,))), weight=1, beta=1.0)


# --- the rules ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "path, selected",
    [
        ("transformer/h/0/mlp/c_fc", True),
        ("transformer/h/0/mlp/c_proj/kernel", True),
        ("transformer/h/0/attn/c_proj", False),
        ("layers/3/mlp/gate_proj", True),
        ("layer_0/mlp", True),
        ("layer_0/mlp/linear", True),
        ("blocks/0/attn/linear", False),
        ("encoder/block/1/layer/1/DenseReluDense/wi", True),
        ("gpt_neox/layers/2/dense_h_to_4h", True),
        ("gpt_neox/layers/2/attention/dense", False),
        ("Block_1/fc1", True),
        ("fc1", False),
        ("wte", False),
        ("lm_head", False),
    ],
)
def test_feed_forward_rule(path, selected):
    assert bool(sste_jax.match_rule(sste_jax.feed_forward(), path)) is selected


def test_the_old_selectors_agree_with_the_rule():
    layer = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    for path in [("blocks", 0, "mlp", "fc"), ("blocks", 0, "dense_h_to_4h"), ("blocks", 0, "attn", "proj"), ("fc",)]:
        expected = bool(sste_jax.match_rule(sste_jax.feed_forward(), "/".join(map(str, path))))
        assert sparse_nnx.feed_forward(path, layer) is expected
        linen_path = tuple(f"Block_{p}" if isinstance(p, int) else p for p in path)
        assert sparse_linen.feed_forward(linen_path, nn.Dense(4)) is expected


@pytest.mark.outside_annotations  # checks the library's own error for a dict that is not a config
def test_first_match_wins_and_bad_rules_raise():
    a, b = SparsityConfig(method="ste"), SparsityConfig()
    assert sste_jax.match_rule({r".*mlp.*": a, r".*": b}, "h/0/mlp/c_fc")[1] is a
    with pytest.raises(ValueError, match="not a valid regex"):
        sste_jax.match_rule({"(": a}, "x")
    with pytest.raises(TypeError, match=r"rules\['.\*'\].*SparsityConfig"):
        sste_jax.match_rule({".*": {"method": "sste"}}, "x")


# --- NNX ---------------------------------------------------------------------------------------

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


def _train_nnx(model, x, y, steps, rngs_seed=0):
    opt = nnx.Optimizer(model, sste_jax.freeze_beta(optax.adam(1e-2)), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, grads)
        return loss

    return [float(step(model, opt)) for _ in range(steps)]


@pytest.mark.parametrize("config", [SparsityConfig(), SparsityConfig(mvue=True, fp8=True)])
def test_nnx_equals_the_layer_path(config):
    x = jax.random.normal(jax.random.key(1), (16, 8))
    y = jnp.sin(x)
    layered = sparse_nnx.sparsify(_Net(nnx.Rngs(0)), config, rngs=nnx.Rngs(sparsity=5))
    anymodel = sste_jax.sparsify(_Net(nnx.Rngs(0)), sste_jax.feed_forward(config), x, rngs=nnx.Rngs(sparsity=5))
    for i in range(2):
        for name in ("fc", "proj"):
            assert float(anymodel.blocks[i].mlp.__dict__[name].beta[...]) == float(
                layered.blocks[i].mlp.__dict__[name].beta[...])
        assert not hasattr(anymodel.blocks[i].attn, "beta")
    np.testing.assert_allclose(anymodel(x), layered(x), rtol=1e-6, atol=1e-6)
    loss_a = _train_nnx(anymodel, x, y, 5)
    loss_l = _train_nnx(layered, x, y, 5)
    np.testing.assert_allclose(loss_a, loss_l, rtol=1e-5)
    np.testing.assert_allclose(
        anymodel.blocks[1].mlp.fc.kernel[...], layered.blocks[1].mlp.fc.kernel[...], rtol=1e-5, atol=1e-6
    )


def test_nnx_trains_with_mvue_fp8_and_beta_stays_frozen():
    x = jax.random.normal(jax.random.key(1), (32, 8))
    y = jnp.sin(x)
    model = sste_jax.sparsify(_Net(nnx.Rngs(0)), sste_jax.feed_forward(SparsityConfig(mvue=True, fp8=True)), x,
                              rngs=nnx.Rngs(sparsity=1))
    beta = float(model.blocks[0].mlp.fc.beta[...])
    attn = np.asarray(model.blocks[0].attn.kernel[...])
    losses = _train_nnx(model, x, y, 60)
    assert losses[-1] < 0.5 * losses[0]
    assert float(model.blocks[0].mlp.fc.beta[...]) == beta
    assert not np.array_equal(attn, model.blocks[0].attn.kernel[...])  # attention trains, dense


def test_nnx_unmatched_rule_and_missing_inputs_raise():
    x = jnp.ones((4, 8))
    with pytest.raises(ValueError, match=r"rules \['nothing/here'\] match no weight product"):
        sste_jax.sparsify(_Net(nnx.Rngs(0)), {"nothing/here": SparsityConfig()}, x)
    with pytest.raises(TypeError, match="example inputs"):
        sste_jax.sparsify(_Net(nnx.Rngs(0)), sste_jax.feed_forward())
    with pytest.raises(ValueError, match="rngs"):
        sste_jax.sparsify(_Net(nnx.Rngs(0)), sste_jax.feed_forward(SparsityConfig(mvue=True)), x)


class _BatchedWeight(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (2, 8, 4)))

    def __call__(self, x):
        return jnp.einsum("btd,bdf->btf", x, self.w[...])


class _Outer(nnx.Module):
    def __init__(self, rngs):
        self.mlp = _BatchedWeight(rngs)

    def __call__(self, x):
        return self.mlp(x)


def test_nnx_weight_with_batch_axes_raises_naming_the_module():
    with pytest.raises(ValueError, match="mlp/w: .*batch"):
        sste_jax.sparsify(_Outer(nnx.Rngs(0)), {"mlp": SparsityConfig()}, jnp.ones((2, 4, 8)))


# --- Linen -------------------------------------------------------------------------------------

class _LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + nn.Dense(x.shape[-1], name="attn")(x)
        w_FxD = self.param("c_fc", nn.initializers.lecun_normal(in_axis=1, out_axis=0), (4 * x.shape[-1], x.shape[-1]))
        h = jnp.einsum("td,fd->tf", x, w_FxD)  # (out, in) weight: 2:4 along axis 1
        return x + nn.Dense(x.shape[-1], name="c_proj")(nn.gelu(h))


class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = _LinenBlock(name=f"h_{i}")(x)
        return x


def test_linen_beta_at_init_axes_from_the_op_and_training():
    config = SparsityConfig(mvue=True, fp8=True)
    model = sste_jax.sparsify(_LinenNet(), {r"h_\d+": config, r"h_\d+/c_proj": config})
    x = jax.random.normal(jax.random.key(1), (32, 8))
    y = jnp.sin(x)
    variables = model.init(jax.random.key(0), x)
    assert set(variables["sparsity"]["h_0"]) == {"c_fc_beta", "c_proj"}
    w = variables["params"]["h_0"]["c_fc"]
    beta = variables["sparsity"]["h_0"]["c_fc_beta"]
    np.testing.assert_allclose(beta, sste_jax.fit_beta(w, axis=1), rtol=1e-6)  # up to summation order
    assert "attn" not in variables["sparsity"]["h_0"]
    tx = sste_jax.freeze_beta(optax.adam(1e-2))
    state = tx.init(variables)

    @jax.jit
    def step(variables, state, key):
        loss, g = jax.value_and_grad(
            lambda v: jnp.mean((model.apply(v, x, rngs={"sparsity": key}) - y) ** 2))(variables)
        updates, state = tx.update(g, state, variables)
        return optax.apply_updates(variables, updates), state, loss

    losses = []
    for i in range(60):
        variables, state, loss = step(variables, state, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    assert float(variables["sparsity"]["h_0"]["c_fc_beta"]) == float(beta)


def test_linen_forward_is_the_2_4_product():
    model = sste_jax.sparsify(_LinenNet(), {r"h_\d+": SparsityConfig()})
    x = jax.random.normal(jax.random.key(1), (8, 8))
    variables = model.init(jax.random.key(0), x)
    beta = variables["sparsity"]["h_0"]["c_fc_beta"]
    w_tilde = beta * sste_jax.soft_threshold_24(variables["params"]["h_0"]["c_fc"], axis=1)
    params = jax.tree.map(lambda a: a, variables["params"])
    params["h_0"]["c_fc"] = w_tilde
    params["h_1"]["c_fc"] = variables["sparsity"]["h_1"]["c_fc_beta"] * sste_jax.soft_threshold_24(
        variables["params"]["h_1"]["c_fc"], axis=1)
    np.testing.assert_allclose(
        model.apply(variables, x), _LinenNet().apply({"params": params}, x), rtol=1e-5, atol=1e-6
    )


def test_linen_unmatched_rule_raises_at_init_and_apply_needs_beta():
    model = sste_jax.sparsify(_LinenNet(), {r"h_\d+": SparsityConfig(), "nowhere": SparsityConfig()})
    with pytest.raises(ValueError, match=r"\['nowhere'\] match no weight product"):
        model.init(jax.random.key(0), jnp.ones((4, 8)))
    model = sste_jax.sparsify(_LinenNet(), {r"h_\d+": SparsityConfig()})
    params = _LinenNet().init(jax.random.key(0), jnp.ones((4, 8)))["params"]
    with pytest.raises(ValueError, match="h_0/c_fc: no β"):
        model.apply({"params": params}, jnp.ones((4, 8)))


# --- control flow: scan over layers, remat (pruned once), jit -----------------------------------

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


def _abs_count(fn, *args):
    """How many ``abs`` ops the gradient's jaxpr holds: 4 per soft-threshold pruning of a weight."""
    return str(jax.make_jaxpr(jax.grad(fn))(*args)).count(" abs ")


def test_nnx_scan_and_remat_one_beta_per_layer_pruned_once():
    x = jax.random.normal(jax.random.key(1), (32, 8))
    y = jnp.sin(x)
    model = sste_jax.sparsify(_ScanNet(nnx.Rngs(0)), sste_jax.feed_forward(SparsityConfig(mvue=True, fp8=True)), x,
                              rngs=nnx.Rngs(sparsity=0))
    beta = model.mlp.up_proj.beta[...]
    assert beta.shape == (3,)
    np.testing.assert_allclose(beta, [sste_jax.fit_beta(model.mlp.up_proj.kernel[i]) for i in range(3)], rtol=1e-6)
    graph, state = nnx.split(sste_jax.sparsify(_ScanNet(nnx.Rngs(0)), sste_jax.feed_forward(), x))  # no MVUE/FP8 abs
    grad = lambda s: nnx.grad(lambda m: jnp.sum(m(x)))(nnx.merge(graph, s))  # noqa: E731
    # 2 weights x 1 pruning x 4 abs in the scan body: the rematerialised forward reuses the saved W̃
    assert str(jax.make_jaxpr(grad)(state)).count(" abs ") == 2 * 4
    losses = _train_nnx(model, x, y, 40)
    assert losses[-1] < 0.5 * losses[0]
    np.testing.assert_array_equal(model.mlp.up_proj.beta[...], beta)


class _LinenScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(8, name="wo")(nn.relu(nn.Dense(32, name="wi")(x))), None


class _LinenScanNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(nn.remat(_LinenScanBlock), variable_axes={"params": 0, "sparsity": 0},
                       split_rngs={"params": True, "sparsity": True}, length=3)
        return scan(name="layers_0")(x, None)[0]


def test_linen_scan_and_remat_one_beta_per_layer_pruned_once():
    model = sste_jax.sparsify(_LinenScanNet(), sste_jax.feed_forward(SparsityConfig(mvue=True, fp8=True)))
    x = jax.random.normal(jax.random.key(1), (32, 8))
    variables = model.init(jax.random.key(0), x)
    beta = variables["sparsity"]["layers_0"]["wi"]["beta"]
    kernel = variables["params"]["layers_0"]["wi"]["kernel"]
    np.testing.assert_allclose(beta, [sste_jax.fit_beta(kernel[i]) for i in range(3)], rtol=1e-6)
    loss = lambda v: jnp.sum(model.apply(v, x, rngs={"sparsity": jax.random.key(0)}) ** 2)  # noqa: E731
    plain = sste_jax.sparsify(_LinenScanNet(), sste_jax.feed_forward())  # no MVUE/FP8 abs in the count
    assert _abs_count(lambda v: jnp.sum(plain.apply(v, x) ** 2), variables) == 2 * 4  # pruned once per layer
    grads = jax.jit(jax.grad(loss))(variables)
    assert grads["params"]["layers_0"]["wi"]["kernel"].shape == (3, 8, 32)
    assert not np.any(grads["sparsity"]["layers_0"]["wi"]["beta"])


def test_remat_policy_prunes_once_on_the_layer_path():
    x, w = jnp.ones((16, 8)), jax.random.normal(jax.random.key(0), (8, 12))
    loss = lambda w, policy: jnp.sum(jnp.tanh(jax.checkpoint(  # noqa: E731
        lambda w: sste_jax.sparse_dense(x, w, 1.5), policy=policy)(w)))
    assert _abs_count(lambda w: loss(w, None), w) == 2 * 4  # recomputed in the backward pass
    assert _abs_count(lambda w: loss(w, sste_jax.remat_policy()), w) == 4


def test_module_doctests():
    import doctest

    from sste_jax import _product, _select, _transform, anymodel

    for module in (_product, _select, _transform, anymodel):
        assert doctest.testmod(module).failed == 0, module.__name__


class _GatedFFN(nn.Module):
    """A Gemma-style feed-forward: one gating weight for gate and up, in either layout, and ``linear``."""

    transpose: bool

    @nn.compact
    def __call__(self, x):
        shape = (2, 32, 8) if self.transpose else (2, 8, 32)
        gating = self.param("gating_einsum", nn.initializers.normal(0.3), shape)
        gate, up = jnp.einsum("btf,nhf->nbth" if self.transpose else "btf,nfh->nbth", x, gating)
        linear = self.param("linear", nn.initializers.normal(0.2), (32, 8))
        return jnp.einsum("bth,hf->btf", jax.nn.gelu(gate) * up, linear)


class _GatedNet(nn.Module):
    transpose: bool

    @nn.compact
    def __call__(self, x):
        return x + _GatedFFN(self.transpose, name="mlp")(x)


@pytest.mark.parametrize("transpose", [False, True])
def test_gated_einsum_layouts_take_the_axis_from_the_equation(transpose):
    model = sste_jax.sparsify(_GatedNet(transpose), {"layer_0/mlp|mlp": SparsityConfig()})
    x = jax.random.normal(jax.random.key(1), (2, 4, 8))
    variables = model.init(jax.random.key(0), x)
    params, betas = variables["params"]["mlp"], variables["sparsity"]["mlp"]
    axis = 2 if transpose else 1  # the F (model width) axis, contracted, in each layout
    np.testing.assert_allclose(betas["gating_einsum_beta"], sste_jax.fit_beta(params["gating_einsum"], axis=axis),
                               rtol=1e-6)
    sparse_params = {"mlp": {
        "gating_einsum": betas["gating_einsum_beta"] * sste_jax.soft_threshold_24(params["gating_einsum"], axis=axis),
        "linear": betas["linear_beta"] * sste_jax.soft_threshold_24(params["linear"], axis=0),
    }}
    expected = _GatedNet(transpose).apply({"params": sparse_params}, x)
    np.testing.assert_allclose(model.apply(variables, x), expected, rtol=1e-5, atol=1e-6)


def test_checkpoints_see_the_betas_like_the_layer_paths(tmp_path):
    from sste_jax import checkpoint

    x = jax.random.normal(jax.random.key(1), (8, 8))
    model = sste_jax.sparsify(_Net(nnx.Rngs(0)), sste_jax.feed_forward(), x)
    checkpoint.save_checkpoint(tmp_path, 1, nnx.state(model))
    same = sste_jax.sparsify(_Net(nnx.Rngs(5)), sste_jax.feed_forward(), x)
    restored = checkpoint.restore_checkpoint(tmp_path, nnx.state(same))
    nnx.update(same, restored)
    np.testing.assert_array_equal(same.blocks[0].mlp.fc.beta[...], model.blocks[0].mlp.fc.beta[...])
    other = sste_jax.sparsify(_Net(nnx.Rngs(5)), sste_jax.feed_forward(SparsityConfig(method="ste")), x)
    with pytest.raises(checkpoint.CheckpointConfigError, match="blocks/0/mlp/fc: method='sste' in the checkpoint"):
        checkpoint.restore_checkpoint(tmp_path, nnx.state(other))
