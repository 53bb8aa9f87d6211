"""The parameter-pytree path: `sparsity_spec` / `apply_sparsity` on models that never use sparse layers."""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sste_jax
from sste_jax import checkpoint
from sste_jax.linen import all_dense, fit_sparsity, sparsify_dense

DOC = pathlib.Path(__file__).parent.parent / "docs" / "any_model.md"


def is_24(w, axis):
    """At most 2 non-zeros in every group of 4 along ``axis``."""
    w = jnp.moveaxis(w, axis, 0)
    return bool(((w.reshape(w.shape[0] // 4, 4, -1) != 0).sum(1) <= 2).all())


class EinsumMLP(nn.Module):
    """Gemma-like: a stacked gate/up `nn.Einsum` (kernel (2, D, F), contracted on axis 1) and a
    `DenseGeneral` down projection over (2, F) (kernel (2, F, D), 2:4 along F, axis 1)."""

    @nn.compact
    def __call__(self, x_BxD):
        gate_up_Bx2xF = nn.Einsum((2, 8, 16), "bd,edf->bef", name="gating_einsum")(x_BxD)
        h_Bx2xF = gate_up_Bx2xF * jax.nn.sigmoid(gate_up_Bx2xF)
        return nn.DenseGeneral(8, axis=(-2, -1), name="linear")(h_Bx2xF)


class TransposedMLP(nn.Module):
    """GPT-2-like: ``(out, in)`` kernels applied as ``x @ W.T``."""

    @nn.compact
    def __call__(self, x_BxD):
        init = nn.initializers.lecun_normal(in_axis=1, out_axis=0)
        c_fc_FxD = self.param("c_fc", lambda k: {"kernel": init(k, (16, 8))})["kernel"]
        c_proj_DxF = self.param("c_proj", lambda k: {"kernel": init(k, (8, 16))})["kernel"]
        return jax.nn.gelu(x_BxD @ c_fc_FxD.T) @ c_proj_DxF.T


def _data():
    x_BxD = jax.random.normal(jax.random.key(1), (32, 8))
    y_BxD = jnp.tanh(x_BxD @ jax.random.normal(jax.random.key(2), (8, 8)))
    return x_BxD, y_BxD


def _train(model, where, axes, steps=15):
    x_BxD, y_BxD = _data()
    params = model.init(jax.random.key(0), x_BxD)["params"]
    state = {"params": params, "spec": sste_jax.sparsity_spec(params, where)}
    assert {n: s.axis for n, s in state["spec"].items()} == axes
    beta0 = {n: np.asarray(s.beta) for n, s in state["spec"].items()}
    tx = sste_jax.freeze_beta(optax.adamw(3e-3, weight_decay=0.1))

    def loss_fn(state):
        w = sste_jax.apply_sparsity(state["params"], state["spec"])
        return jnp.mean((model.apply({"params": w}, x_BxD) - y_BxD) ** 2)

    @jax.jit
    def step(state, opt_state, flips):
        loss, grads = jax.value_and_grad(loss_fn)(state)
        updates, opt_state = tx.update(grads, opt_state, state)
        state = optax.apply_updates(state, updates)
        rates, flips = sste_jax.flip_rate(flips, sste_jax.spec_weights(state["params"], state["spec"]))
        return state, opt_state, flips, loss, rates

    opt_state, flips = tx.init(state), sste_jax.init_flip_state(sste_jax.spec_weights(params, state["spec"]))
    losses, moved = [], False
    for _ in range(steps):
        state, opt_state, flips, loss, rates = step(state, opt_state, flips)
        losses.append(float(loss))
        moved |= sste_jax.metrics.to_host(rates)["flip_rate"] > 0
    w = sste_jax.apply_sparsity(state["params"], state["spec"])
    for name, s in state["spec"].items():
        leaf = w
        for k in name.split("/"):
            leaf = leaf[k]
        assert is_24(leaf, s.axis), name
        other = (s.axis + 1) % leaf.ndim
        assert leaf.shape[other] % 4 or not is_24(leaf, other), f"{name}: also 2:4 along axis {other}"
        np.testing.assert_array_equal(np.asarray(s.beta), beta0[name])
    stats = sste_jax.metrics.to_host(sste_jax.sparsity_stats(sste_jax.spec_weights(state["params"], state["spec"])))
    assert all(stats[f"zero_fraction/{name}"] >= 0.5 for name in state["spec"]), stats
    assert losses[-1] < 0.8 * losses[0], losses
    assert moved, "the masks never changed: the dense weights were not trained"
    return state, beta0


def test_einsum_and_dense_general_kernels_train_24_along_axis_1():
    where = sste_jax.select_paths({r"gating_einsum/kernel": sste_jax.einsum_axis("bd,edf->bef"), r"linear/kernel": 1})
    _train(EinsumMLP(), where, {"gating_einsum/kernel": 1, "linear/kernel": 1})


def test_out_in_kernels_train_24_along_axis_1():
    _train(TransposedMLP(), sste_jax.select_kernels(axis=1), {"c_fc/kernel": 1, "c_proj/kernel": 1})


def test_beta_moves_without_freeze_beta():
    """Control for the β assertions above: the same optimizer, unwrapped, does decay β."""
    params = {"fc": {"kernel": jax.random.normal(jax.random.key(0), (8, 4))}}
    state = {"params": params, "spec": sste_jax.sparsity_spec(params, sste_jax.select_kernels())}
    grads = jax.jit(jax.grad(lambda s: jnp.sum(sste_jax.apply_sparsity(s["params"], s["spec"])["fc"]["kernel"])))(state)
    assert float(grads["spec"]["fc/kernel"].beta) == 0.0
    adamw = optax.adamw(1e-2, weight_decay=0.1)
    for tx, moves in ((adamw, True), (sste_jax.freeze_beta(adamw), False)):
        updates, _ = tx.update(grads, tx.init(state), state)
        assert (float(updates["spec"]["fc/kernel"].beta) != 0.0) == moves


class DenseMLP(nn.Module):
    @nn.compact
    def __call__(self, x_BxD):
        return nn.Dense(8, name="fc2")(jax.nn.relu(nn.Dense(16, name="fc1")(x_BxD)))


@pytest.mark.parametrize("method", ["sste", "ste", "srste", "dense"])
def test_matches_layer_path_on_dense_model(method):
    config = sste_jax.SparsityConfig(method=method, srste_decay=0.05)
    model = DenseMLP()
    x_BxD, y_BxD = _data()
    params = model.init(jax.random.key(0), x_BxD)["params"]
    spec = sste_jax.sparsity_spec(params, sste_jax.select_kernels(), config)
    with sparsify_dense(config, where=all_dense):
        variables = fit_sparsity(model, params, x_BxD)
    for layer in ("fc1", "fc2"):
        s = spec[f"{layer}/kernel"]
        np.testing.assert_array_equal(s.beta, nn.unbox(variables["sparsity"][layer]["beta"]))
        np.testing.assert_array_equal(
            sste_jax.apply_sparsity(params, spec)[layer]["kernel"],
            sste_jax.forward_weight(params[layer]["kernel"], s.beta, config),
        )

    def param_loss(p):
        return jnp.mean((model.apply({"params": sste_jax.apply_sparsity(p, spec)}, x_BxD) - y_BxD) ** 2)

    def layer_loss(p):
        with sparsify_dense(config, where=all_dense):
            return jnp.mean((model.apply({**variables, "params": p}, x_BxD) - y_BxD) ** 2)

    g_param, g_layer = jax.jit(jax.grad(param_loss))(params), jax.jit(jax.grad(layer_loss))(params)
    jax.tree.map(np.testing.assert_array_equal, g_param, g_layer)
    assert float(jnp.abs(g_param["fc1"]["kernel"]).sum()) > 0


def test_srste_gradient_adds_decay_along_axis():
    kernel = jax.random.normal(jax.random.key(3), (3, 8))
    config = sste_jax.SparsityConfig(method="srste", srste_decay=0.5)
    spec = sste_jax.sparsity_spec({"w": kernel}, sste_jax.select_paths({"w": 1}), config)
    g = jax.jit(jax.grad(lambda p: jnp.sum(sste_jax.apply_sparsity(p, spec)["w"])))({"w": kernel})["w"]
    expected = 1.0 + 0.5 * jnp.where(sste_jax.mask_24(kernel, axis=1), 0.0, kernel)
    np.testing.assert_array_equal(g, expected)


def test_bfloat16_leaves_keep_their_dtype():
    kernel = jax.random.normal(jax.random.key(4), (8, 4), jnp.bfloat16)
    spec = sste_jax.sparsity_spec({"w": kernel}, sste_jax.select_paths({"w": 0}))
    w, vjp = jax.vjp(lambda p: sste_jax.apply_sparsity(p, spec), {"w": kernel})
    assert w["w"].dtype == jnp.bfloat16 and spec["w"].beta.dtype == jnp.float32
    np.testing.assert_array_equal(w["w"], sste_jax.forward_weight(kernel, spec["w"].beta, spec["w"].config))
    (g,) = vjp({"w": jnp.full((8, 4), 3.0, jnp.bfloat16)})
    assert g["w"].dtype == jnp.bfloat16 and bool((g["w"] == 3.0).all())


def test_spec_survives_orbax_round_trip(tmp_path):
    params = TransposedMLP().init(jax.random.key(0), jnp.ones((2, 8)))["params"]
    spec = sste_jax.sparsity_spec(params, sste_jax.select_kernels(axis=1))
    checkpoint.save_checkpoint(tmp_path, 1, {"spec": spec})
    other = jax.tree.map(jnp.zeros_like, spec)
    restored = checkpoint.restore_checkpoint(tmp_path, {"spec": other})["spec"]
    assert jax.tree.structure(restored) == jax.tree.structure(spec)
    for name, s in spec.items():
        assert (restored[name].axis, restored[name].config) == (s.axis, s.config)
        np.testing.assert_array_equal(restored[name].beta, s.beta)
        assert restored[name].beta.dtype == jnp.float32


def _normal(*shape):
    return jax.random.normal(jax.random.key(0), shape)  # all-ones kernels have S(W) = 0: no β to fit


def test_selectors():
    params = {
        "wte": {"embedding": jnp.ones((12, 8))},
        "h_0": {"attn": {"kernel": _normal(8, 8)}, "mlp": {"kernel": _normal(8, 16), "bias": jnp.ones((16,))}},
        "scan": {"mlp": {"kernel": _normal(2, 8, 16)}},
    }
    spec = sste_jax.sparsity_spec(params, sste_jax.select_kernels())
    assert sorted(spec) == ["h_0/attn/kernel", "h_0/mlp/kernel"]
    spec = sste_jax.sparsity_spec(params, sste_jax.select_kernels(path=r"mlp"))
    assert sorted(spec) == ["h_0/mlp/kernel"]
    spec = sste_jax.sparsity_spec(params, sste_jax.select_kernels(axis=-2, ndim=3))
    assert {n: s.axis for n, s in spec.items()} == {"scan/mlp/kernel": 1}
    spec = sste_jax.sparsity_spec(params, sste_jax.select_paths({r"attn|scan": 1, r"kernel$": 0}))
    assert {n: s.axis for n, s in spec.items()} == {"h_0/attn/kernel": 1, "h_0/mlp/kernel": 0, "scan/mlp/kernel": 1}
    assert sste_jax.einsum_axis("BTD,NDH->BTNH") == 1
    assert sste_jax.einsum_axis("df,btf->btd", operand=0) == 1
    for bad in ("BTD,NDH", "BTNH,NHD->BTD", "...D,D...->..."):
        with pytest.raises(ValueError, match=re.escape(bad.split("->")[0].split(",")[0][:2])):
            sste_jax.einsum_axis(bad)


def test_errors_name_the_leaf():
    params = {
        "a": {"kernel": jnp.ones((6, 8))},
        "b": {"kernel": _normal(8, 8)},
        "n": {"kernel": jnp.ones((8, 8), jnp.int32)},
    }
    with pytest.raises(ValueError, match=r"a/kernel: length 6 of axis 0 in shape \(6, 8\)") as e:
        sste_jax.sparsity_spec(params, sste_jax.select_kernels())
    assert "n/kernel: not a floating array" in str(e.value) and "b/kernel" not in str(e.value)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        sste_jax.sparsity_spec(params, sste_jax.select_paths({"b": 2}))
    with pytest.raises(TypeError, match="int axis or None"):
        sste_jax.sparsity_spec(params, lambda path, leaf: True)
    with pytest.raises(ValueError, match="selected no leaf"):
        sste_jax.sparsity_spec(params, sste_jax.select_kernels(name="weight"))
    for config, what in (
        (sste_jax.SparsityConfig(mvue=True), "mvue=True"),
        (sste_jax.SparsityConfig(fp8=True), "fp8=True"),
    ):
        with pytest.raises(ValueError, match=re.escape(what) + ".*layer path"):
            sste_jax.sparsity_spec(params, sste_jax.select_paths({"b": 0}), config)
    spec = sste_jax.sparsity_spec(params, sste_jax.select_paths({"b": 1}))
    with pytest.raises(ValueError, match=r"params do not have: \['b/kernel'\]"):
        sste_jax.apply_sparsity({"c": params["b"]}, spec)
    with pytest.raises(ValueError, match=r"b/kernel: leaf of shape \(8, 6\) does not match"):
        sste_jax.apply_sparsity({"b": {"kernel": jnp.ones((8, 6))}}, spec)


def test_docs_examples_run_as_printed(capsys):
    """docs/any_model.md: each code block prints exactly the text block that follows it (run in order)."""
    pytest.importorskip("qwix")
    pytest.importorskip("equinox")
    pairs = re.findall(r"```python\n(.*?)```\n\n(?:prints\n\n)?```text\n(.*?)```", DOC.read_text(), re.S)
    assert len(pairs) == 5
    namespace = {"__name__": "any_model"}
    for code, expected in pairs:
        exec(compile(code, str(DOC), "exec"), namespace)
        assert capsys.readouterr().out == expected


def test_spec_refuses_leaves_whose_beta_cannot_be_fitted():
    params = {"a": {"kernel": jnp.zeros((8, 4))}, "b": {"kernel": jnp.ones((8, 4)).at[0, 0].set(jnp.nan)},
              "c": {"kernel": jax.random.normal(jax.random.key(0), (8, 4))}}
    with pytest.raises(ValueError) as info:
        sste_jax.sparsity_spec(params, sste_jax.select_kernels())
    msg = str(info.value)
    assert "a/kernel" in msg and "all zero" in msg and "b/kernel" in msg and "NaN" in msg and "pass beta" in msg, msg
    spec = sste_jax.sparsity_spec(params, sste_jax.select_kernels(path="a"), beta=1.5)
    assert float(spec["a/kernel"].beta) == 1.5
    spec = sste_jax.sparsity_spec(params, sste_jax.select_kernels(), sste_jax.SparsityConfig(method="ste"))
    assert sorted(spec) == ["a/kernel", "b/kernel", "c/kernel"]


def test_apply_sparsity_refuses_a_spec_made_for_other_shapes():
    params = {"a": {"kernel": _normal(8, 16)}}
    spec = sste_jax.sparsity_spec(params, sste_jax.select_kernels())
    assert spec["a/kernel"].shape == (8, 16)
    with pytest.raises(ValueError, match=r"a/kernel: leaf of shape \(16, 16\).*made for shape \(8, 16\)"):
        sste_jax.apply_sparsity({"a": {"kernel": _normal(16, 16)}}, spec)
    with pytest.raises(ValueError, match=r"made for shape \(8, 16\)"):
        sste_jax.spec_weights({"a": {"kernel": _normal(8, 8)}}, spec)
    sste_jax.apply_sparsity(params, spec)
