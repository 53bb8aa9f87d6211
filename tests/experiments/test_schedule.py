"""experiments.common.{recipes,schedule,loop}: recipes, STEP's switch, T-SR-STE's mask refresh and dense
finish, β rules and refit, run through the shared train step on a tiny GPT."""

import dataclasses

import chex
import jax
import numpy as np
import optax
import pytest
from flax import nnx

import sste_jax
from experiments.common import loop
from experiments.common import recipes as methods
from experiments.common.schedule import Schedule
from experiments.lm.configs import get_config
from experiments.lm.model import GPT
from experiments.lm.train import lm_loss
from sste_jax import nnx as sparse_nnx

FULL = get_config("tiny", ["steps=10"])
CFG, M = FULL.optim, FULL.model


def _gpt():
    return GPT(64, M.n_layer, M.n_head, M.d_model, M.seq_len, rngs=nnx.Rngs(0))


def _setup(name, **changes):
    recipe = methods.get_recipe(name, **changes)
    model = methods.sparsify(_gpt(), recipe, seed=0)
    phases = Schedule(model, recipe, CFG.steps)
    tx = methods.make_optimizer(CFG, model, recipe)
    step = loop.make_train_step(lm_loss, phases, tx)
    return recipe, phases, step, loop.initial_state(model, tx)


def _batch(i):
    rng = np.random.default_rng(i)
    x = rng.integers(0, 64, (1, CFG.batch_size, M.seq_len), dtype=np.int32)
    return x, np.roll(x, -1, axis=-1)


def _layers(phases, state, phase=0):
    model = nnx.merge(phases.graphdefs[phase], state["params"], state["rest"])
    return {"/".join(map(str, p)): m for p, m in nnx.iter_graph(model) if isinstance(m, sparse_nnx.SparseLinear)}


def test_step_switches_to_hard_24_the_step_after_max_steps():
    # threshold 0: only the fallback t > max_steps = round(0.3 * 10) = 3 switches, at the end of step 4
    recipe, phases, train_step, state = _setup("step", switch_threshold=0.0, switch_max=0.3, switch_min=0.1)
    assert phases.names == ("dense", "ste")
    logged = []
    for i in range(6):
        state, metrics = train_step(state, *_batch(i))
        logged.append(metrics)
    assert [float(m["phase"]) for m in logged] == [0, 0, 0, 0, 1, 1]  # steps 1-4 dense, then hard 2:4
    assert int(sste_jax.optim.step_switched(state["opt"])) and phases.current_phase(state) == 1
    assert int(sste_jax.optim.step_state(state["opt"]).switch_step) == 4
    assert phases.second_phase_from(state) == 5
    for layer in _layers(phases, state, 1).values():
        assert layer.config.method == "ste"
        np.testing.assert_array_equal(layer.forward_weight(), sste_jax.hard_threshold_24(layer.kernel[...]))
    assert all(np.isfinite(float(m["step_v_change"])) and float(m["step_v_change"]) > 0 for m in logged)


def test_step_gradient_in_the_second_phase_is_the_ste_one():
    # After the switch the loss is computed with hard 2:4 weights: a different loss than dense on the same batch.
    _, phases, train_step, state = _setup("step", switch_threshold=0.0, switch_min=0.0, switch_max=0.0)
    state, first = train_step(state, *_batch(0))  # t = 1 > max_steps = 0: switches at the end of step 1
    dense_loss = lm_loss(nnx.merge(phases.graphdefs[0], state["params"], state["rest"]), *(b[0] for b in _batch(1)))
    ste_loss = lm_loss(nnx.merge(phases.graphdefs[1], state["params"], state["rest"]), *(b[0] for b in _batch(1)))
    _, second = train_step(state, *_batch(1))
    assert float(first["phase"]) == 0 and float(second["phase"]) == 1
    assert float(second["train_loss"]) == pytest.approx(float(ste_loss), rel=1e-6)
    assert abs(float(ste_loss) - float(dense_loss)) > 1e-4


def test_tsrste_mask_refreshes_every_k_steps_from_the_updated_kernel():
    _, phases, train_step, state = _setup("tsrste", mask_refresh=3)
    name = "blocks/0/mlp/c_fc"
    masks, kernels = [np.asarray(_layers(phases, state)[name].mask[...])], []
    for i in range(6):
        state, _ = train_step(state, *_batch(i))
        layer = _layers(phases, state)[name]
        masks.append(np.asarray(layer.mask[...]))
        kernels.append(layer.kernel[...])
    for step in (1, 2):
        np.testing.assert_array_equal(masks[step], masks[0])
    np.testing.assert_array_equal(masks[3], sste_jax.transposable_mask_24(kernels[2]))  # refreshed after step 3
    np.testing.assert_array_equal(masks[4], masks[3])
    np.testing.assert_array_equal(masks[6], sste_jax.transposable_mask_24(kernels[5]))
    assert (masks[6] != masks[0]).any()  # lr 3e-3 moves the kernel enough to change some 4x4 choices


def test_tsrste_dense_finish_switches_the_last_sixth_to_dense():
    recipe, phases, train_step, state = _setup("tsrste_df")
    assert recipe.dense_finish == 1 / 6  # the authors' 250k sparse steps of 300k
    assert phases.names == ("tsrste", "dense") and phases.dense_finish_from == 9  # round(10 / 6) = 2 dense steps
    phases_seen = []
    for i in range(CFG.steps):
        state, metrics = train_step(state, *_batch(i))
        phases_seen.append(int(metrics["phase"]))
    assert phases_seen == [0] * 8 + [1] * 2
    assert phases.current_phase(state) == 1
    assert phases.second_phase_from(state) == 9


def test_tsrste_masked_decay_joins_the_clipped_gradient_before_adamw():
    # NumPy AdamW over clip(g) + α(1 − M)⊙W, two steps; the other order, clip(g + α(1 − M)⊙W), is far off
    alpha, lr, wd = 0.5, 1e-2, 0.1
    cfg = dataclasses.replace(CFG, lr=lr, min_lr=lr, warmup=0, weight_decay=wd)
    recipe = methods.get_recipe("tsrste", config=sste_jax.SparsityConfig(method="tsrste", masked_decay=alpha))
    model = methods.sparsify(_gpt(), recipe, seed=0)
    tx = methods.make_optimizer(cfg, model, recipe)
    params = nnx.split(model, nnx.Param, ...)[1]
    names = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)]
    tsrste = [n.endswith(("mlp/c_fc/kernel", "mlp/c_proj/kernel")) for n in names]
    assert sum(tsrste) == 2 * M.n_layer
    leaves = jax.tree.leaves(params)
    masks = [np.asarray(sste_jax.transposable_mask_24(w)) if t else None for w, t in zip(leaves, tsrste)]
    keys = jax.random.split(jax.random.key(9), 2 * len(leaves))
    grads = [[100.0 * np.asarray(jax.random.normal(keys[2 * i + s], w.shape)) for i, w in enumerate(leaves)]
             for s in range(2)]  # a global norm far above clip = 1

    def reference(decay_after_clip):
        w = [np.asarray(x, np.float64) for x in leaves]
        m, v, updates = [np.zeros_like(x) for x in w], [np.zeros_like(x) for x in w], []
        for t, g in enumerate(grads, start=1):
            decay = [alpha * np.where(mk, 0.0, x) if mk is not None else 0.0 for x, mk in zip(w, masks)]
            if not decay_after_clip:
                g = [gi + d for gi, d in zip(g, decay)]
            norm = np.sqrt(sum(np.sum(gi.astype(np.float64) ** 2) for gi in g))
            g = [gi * cfg.clip / max(norm, cfg.clip) for gi in g]
            if decay_after_clip:
                g = [gi + d for gi, d in zip(g, decay)]
            step = []
            for i, gi in enumerate(g):
                m[i] = cfg.b1 * m[i] + (1 - cfg.b1) * gi
                v[i] = cfg.b2 * v[i] + (1 - cfg.b2) * gi**2
                u = (m[i] / (1 - cfg.b1**t)) / (np.sqrt(v[i] / (1 - cfg.b2**t)) + 1e-8)
                step.append(-lr * (u + (wd * w[i] if w[i].ndim >= 2 else 0.0)))
            w = [x + u for x, u in zip(w, step)]
            updates.append(step)
        return updates

    state, update = tx.init(params), jax.jit(tx.update)
    current, layer_masks = params, sste_jax.optim.forward_masks(model)  # the layers' masks: M of the initial W
    ours = []
    for g in grads:
        g_tree = jax.tree.unflatten(jax.tree.structure(params), [np.asarray(x, np.float32) for x in g])
        u, state = update(g_tree, state, current, masks=layer_masks)
        current = optax.apply_updates(current, u)
        ours.append(jax.tree.leaves(u))
    after, before = reference(True), reference(False)
    for step in range(2):
        for i, t in enumerate(tsrste):
            np.testing.assert_allclose(ours[step][i], after[step][i], rtol=1e-4, atol=1e-7)
    gap = max(np.max(np.abs(a - b)) for a, b, t in zip(after[1], before[1], tsrste) if t)
    assert gap > 100 * 1e-4 * lr


def test_tsrste_masked_decay_is_off_during_the_dense_finish():
    recipe = methods.get_recipe("tsrste_df", config=sste_jax.SparsityConfig(method="tsrste", masked_decay=0.5))
    model = methods.sparsify(_gpt(), recipe, seed=0)
    steps = 12  # dense from step 11 (1-based): counts 10 and 11
    assert methods.dense_finish_from(recipe, steps) == 11
    tx = methods._masked_decay(recipe, steps)
    params = nnx.split(model, nnx.Param, ...)[1]
    state, zeros = tx.init(params), jax.tree.map(np.zeros_like, params)
    for count in range(steps):
        updates, state = tx.update(zeros, state, params, masks=sste_jax.optim.forward_masks(model))
        total = sum(float(np.abs(u).sum()) for u in jax.tree.leaves(updates))
        assert (total > 0) == (count < 10), count


@pytest.mark.parametrize("rule", ["none", "l1", "mse"])
def test_beta_rules_at_sparsification(rule):
    _, phases, _, state = _setup({"none": "sste_beta_none", "l1": "sste_beta_l1", "mse": "sste"}[rule])
    for layer in _layers(phases, state).values():
        w = np.asarray(layer.kernel[...], np.float64)
        s = np.asarray(sste_jax.soft_threshold_24(layer.kernel[...]), np.float64)
        expected = {"none": 1.0, "l1": np.abs(w).sum() / np.abs(s).sum(), "mse": (w * s).sum() / (s * s).sum()}[rule]
        assert float(layer.beta[...]) == pytest.approx(expected, rel=1e-5)


def test_beta_refit_every_k_steps_and_frozen_otherwise():
    _, phases, train_step, state = _setup("sste_beta_refit", refit_beta_every=4)
    _, frozen_phases, frozen_step, frozen = _setup("sste")
    name = "blocks/1/mlp/c_proj"
    initial = float(_layers(phases, state)[name].beta[...])
    betas = []
    for i in range(8):
        state, _ = train_step(state, *_batch(i))
        frozen, _ = frozen_step(frozen, *_batch(i))
        layer = _layers(phases, state)[name]
        betas.append(float(layer.beta[...]))
        if (i + 1) % 4 == 0:
            assert betas[-1] == pytest.approx(float(sste_jax.fit_beta(layer.kernel[...])), rel=1e-6)
    assert betas[:3] == [initial] * 3 and betas[3] != initial and betas[4:7] == [betas[3]] * 3
    assert float(_layers(frozen_phases, frozen)[name].beta[...]) == initial  # the method: β never changes


def test_recipe_validation():
    with pytest.raises(ValueError, match="needs `then`"):
        methods.Recipe(methods.DENSE, optimizer="step")
    with pytest.raises(ValueError, match="dense_finish must be in"):
        methods.get_recipe("tsrste", dense_finish=1.0)
    with pytest.raises(ValueError, match="beta_rule must be one of"):
        methods.get_recipe("sste", beta_rule="l2")
    with pytest.raises(ValueError, match="unknown method 'sr-ste'"):
        methods.get_recipe("sr-ste")
    assert dataclasses.replace(methods.METHODS["tsrste"]).mask_refresh == 40  # as T-SR-STE's authors


def test_step_optimizer_equals_adamw_before_the_switch():
    # STEP's first phase is AdamW itself (same moments, bias correction, decay and schedule).
    _, _, step_a, state_a = _setup("step", switch_threshold=0.0, switch_max=0.9)
    recipe = methods.get_recipe("dense")
    model = methods.sparsify(_gpt(), recipe, seed=0)
    tx = methods.make_optimizer(CFG, model, recipe)
    step_b = loop.make_train_step(lm_loss, Schedule(model, recipe, CFG.steps), tx)
    state_b = loop.initial_state(model, tx)
    for i in range(3):
        state_a, _ = step_a(state_a, *_batch(i))
        state_b, _ = step_b(state_b, *_batch(i))
    chex.assert_trees_all_close(state_a["params"], state_b["params"], rtol=2e-5, atol=1e-6)
    assert optax.tree.norm(state_a["params"]) > 0


def test_srste_takes_a_sparse_learning_rate_scale():
    # SR-STE layers add their decay themselves; the per-layer LR factor selects kernels and nothing else
    recipe = methods.get_recipe("srste")
    model = methods.sparsify(_gpt(), recipe, seed=0)
    params = nnx.split(model, nnx.Param, ...)[1]
    grads = jax.tree.map(lambda p: np.full(p.shape, 0.01, np.float32), params)
    cfg = dataclasses.replace(CFG, warmup=0)
    (base, _), (scaled, _) = [
        tx.update(grads, tx.init(params), params)
        for tx in (methods.make_optimizer(cfg, model, recipe), methods.make_optimizer(cfg, model, recipe, 2.0))
    ]
    sparse = nnx.to_flat_state(sste_jax.optim.sparse_kernel_mask(model))
    for (path, is_sparse), b, s in zip(sparse, jax.tree.leaves(base), jax.tree.leaves(scaled)):
        assert np.abs(np.asarray(b)).max() > 0, path
        np.testing.assert_array_equal(np.asarray(s), 2 * np.asarray(b) if is_sparse else np.asarray(b))
