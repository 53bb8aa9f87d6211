import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sste_jax
from sste_jax._step import ScaleByStepState, scale_by_step


def _run(tx, grads):
    """Feeds the gradients (dicts of arrays, or arrays for a single leaf ``w``) in order."""
    grads = [g if isinstance(g, dict) else {"w": g} for g in grads]
    state = tx.init(jax.tree.map(jnp.zeros_like, grads[0]))
    update = jax.jit(tx.update)
    outs, states = [], []
    for g in grads:
        u, state = update(g, state)
        outs.append(u)
        states.append(state)
    return outs, states


def _switch_step(states) -> int:
    flags = [bool(sste_jax.optim.step_switched(s)) for s in states]
    assert flags == sorted(flags), "the switch must be permanent"
    return flags.index(True) + 1 if any(flags) else -1


def _reference(grads, sparse, b1, b2, eps, t_min, t_max, option):
    """The authors' AdamW_STEP (lr 1, no weight decay) in NumPy, float64: the update added to each
    parameter per step and the step at whose end it switched (-1 if never)."""
    t_omega = int(1 / (1 - b2))
    m = {k: np.zeros_like(v, np.float64) for k, v in grads[0].items()}
    v = {k: np.zeros_like(x) for k, x in m.items()}
    frozen, window, mode, switched_at, deltas = {}, [], "dense", -1, []
    for t, g in enumerate(grads, start=1):
        changes, delta = [], {}
        for k in g:
            gk = np.asarray(g[k], np.float64)
            last = v[k].copy()
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk * gk
            if k in sparse and mode == "dense":
                changes.append((v[k] - last).ravel())
            if k in sparse and mode == "sparse":
                denom = np.sqrt(frozen[k]) + math.sqrt(eps) * math.sqrt(math.sqrt(eps))
            else:
                denom = np.sqrt(v[k]) / math.sqrt(1 - b2**t) + eps
            delta[k] = -(m[k] / (1 - b1**t)) / denom
        deltas.append(delta)
        if mode == "dense":
            c = np.abs(np.concatenate(changes))
            window.append(c.mean() if option == 1 else np.exp(np.mean(np.log(c))))
            window = window[-t_omega:]
            if t > t_max or (np.mean(window) < eps and t > t_min):
                mode, switched_at = "sparse", t
                frozen = {k: v[k].copy() for k in sparse}
    return deltas, switched_at


def _settling_grads(steps, key):
    """Sparse weight ``w``: gradients whose scale shrinks geometrically (v settles); dense leaf
    ``emb``: large noisy gradients (its v never settles)."""
    kw, ke = jax.random.split(key)
    w = np.asarray(jax.random.normal(kw, (steps, 8, 4))) * (0.7 ** np.arange(steps))[:, None, None]
    e = 3.0 * np.asarray(jax.random.normal(ke, (steps, 6)))
    return [{"w": w[i].astype(np.float32), "emb": e[i].astype(np.float32)} for i in range(steps)]


@pytest.mark.parametrize("statistic,option", [("mean", 1), ("geometric", 2)])
def test_matches_the_authors_optimizer_through_the_switch(statistic, option):
    b1, b2, eps, t_min, t_max, steps = 0.9, 0.9, 3e-3, 5, 40, 45
    grads = _settling_grads(steps, jax.random.key(0))
    ref, ref_switch = _reference(grads, {"w"}, b1, b2, eps, t_min, t_max, option)
    tx = scale_by_step(b1, b2, eps, sparse={"w": True, "emb": False}, min_steps=t_min, max_steps=t_max,
                       statistic=statistic)
    outs, states = _run(tx, grads)
    assert t_min < ref_switch < steps - 5  # the threshold fires, well before T_max, with steps to compare after
    assert _switch_step(states) == ref_switch
    for ours, theirs in zip(outs, ref):
        for k in ("w", "emb"):
            np.testing.assert_allclose(-np.asarray(ours[k]), theirs[k], rtol=2e-5, atol=1e-7)


def test_window_is_int_of_one_over_one_minus_b2():
    # the authors' int(1/(1 − b2)) truncates the float: 0.95 gives 19, not 20
    assert scale_by_step(b2=0.9).init({"w": jnp.zeros(2)}).diffs.shape == (10,)
    assert scale_by_step(b2=0.95).init({"w": jnp.zeros(2)}).diffs.shape == (19,)


def test_statistic_counts_the_sparse_weights_only():
    grads = _settling_grads(45, jax.random.key(1))
    kw = {"b1": 0.9, "b2": 0.9, "eps": 3e-3, "min_steps": 5, "max_steps": 1000}
    _, sparse_only = _run(scale_by_step(sparse={"w": True, "emb": False}, **kw), grads)
    _, everything = _run(scale_by_step(**kw), grads)
    assert 5 < _switch_step(sparse_only) < 45
    assert _switch_step(everything) == -1  # the noisy dense leaf keeps the mean of all |Δv| high


def test_partial_window_and_strict_min_steps():
    # b2 = 0.5: window 2. g = 1 then 0: v = 0.5, 0.25, ...; Z = 0.5, 0.25, 0.125, ...
    grads = [jnp.ones((4,))] + [jnp.zeros((4,))] * 9
    _, states = _run(scale_by_step(b2=0.5, threshold=0.4, min_steps=1), grads)
    # step 1: the one-record window 0.5 is not below 0.4; step 2: mean(0.5, 0.25) = 0.375 < 0.4 and 2 > 1
    assert _switch_step(states) == 2
    np.testing.assert_allclose(float(sste_jax.optim.step_v_change(states[0])), 0.5)
    _, states = _run(scale_by_step(b2=0.5, threshold=0.4, min_steps=2), grads)
    assert _switch_step(states) == 3  # t > T_min is strict


def test_max_steps_is_strict():
    grads = list(jax.random.normal(jax.random.key(0), (40, 16)))  # noisy: never below a zero threshold
    _, states = _run(scale_by_step(threshold=0.0, min_steps=1, max_steps=25), grads)
    assert _switch_step(states) == 26


def test_matches_adam_before_the_switch():
    grads = list(jax.random.normal(jax.random.key(1), (15, 6)))
    outs, states = _run(scale_by_step(b1=0.9, b2=0.99, threshold=0.0, max_steps=100), grads)
    ref, _ = _run(optax.scale_by_adam(b1=0.9, b2=0.99), grads)
    assert not bool(sste_jax.optim.step_switched(states[-1]))
    np.testing.assert_allclose(np.stack([o["w"] for o in outs]), np.stack([r["w"] for r in ref]), rtol=1e-5, atol=1e-7)


def test_variance_is_frozen_uncorrected_after_the_switch():
    b1, b2, eps, k = 0.9, 0.99, 1e-8, 10
    key1, key2 = jax.random.split(jax.random.key(2))
    grads = list(jax.random.normal(key1, (k, 6))) + list(100.0 * jax.random.normal(key2, (5, 6)))
    outs, states = _run(scale_by_step(b1, b2, eps, threshold=0.0, max_steps=k - 1), grads)
    assert _switch_step(states) == k
    nu_k = states[k - 1].nu["w"]
    for i in range(k, len(grads)):
        np.testing.assert_array_equal(states[i].nu["w"], nu_k)
        m_hat = states[i].mu["w"] / (1 - b1 ** (i + 1))
        np.testing.assert_allclose(outs[i]["w"], m_hat / (jnp.sqrt(nu_k) + eps**0.75), rtol=1e-5)
    assert float(jnp.max(states[-1].mu["w"] ** 2)) > 100 * float(jnp.max(nu_k))


def test_step_adam_with_freeze_beta_and_helper():
    params = {"fc": {"kernel": jnp.ones((4, 4)), "beta": jnp.float32(1.3)}}
    tx = sste_jax.freeze_beta(sste_jax.optim.step_adam(0.1, threshold=0.0, max_steps=2))
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(params, state, params)
        assert float(updates["fc"]["beta"]) == 0.0
    assert bool(sste_jax.optim.step_switched(state))
    with pytest.raises(ValueError, match="found 0"):
        sste_jax.optim.step_switched(optax.adam(0.1).init(params))


def test_sparse_mask_inside_freeze_beta():
    params = {"fc": {"kernel": jnp.ones((4, 4)), "beta": jnp.float32(1.3)}, "emb": jnp.ones((3,))}
    sparse = {"fc": {"kernel": True, "beta": False}, "emb": False}
    tx = sste_jax.freeze_beta(sste_jax.optim.step_adam(0.1, sparse=sparse, threshold=0.0, max_steps=1))
    state = tx.init(params)
    for _ in range(2):
        _, state = tx.update(params, state, params)
    assert bool(sste_jax.optim.step_switched(state))


@pytest.mark.outside_annotations
@pytest.mark.parametrize("kw", [{"min_steps": -1}, {"max_steps": 1.5}, {"threshold": -1.0}, {"b2": 1.0},
                                {"statistic": "median"}])
def test_bad_settings_raise(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        scale_by_step(**kw)


def test_a_mask_selecting_nothing_raises():
    with pytest.raises(ValueError, match="selects no parameter"):
        scale_by_step(sparse={"w": False}).init({"w": jnp.zeros(2)})


def test_state_is_a_namedtuple_with_switched():
    state = scale_by_step().init({"w": jnp.zeros((2,))})
    assert isinstance(state, ScaleByStepState) and state.switched.dtype == jnp.bool_
