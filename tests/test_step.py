import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sste_jax
from sste_jax import _step
from sste_jax._step import StepState, scale_by_step


def _run(tx, grads):
    """Feeds the gradients in order; returns the updates and states after each step."""
    params = {"w": jnp.zeros_like(grads[0])}
    state = tx.init(params)
    update = jax.jit(tx.update)
    outs, states = [], []
    for g in grads:
        u, state = update({"w": g}, state)
        outs.append(u["w"])
        states.append(state)
    return outs, states


def _switch_step(states) -> int:
    flags = [bool(sste_jax.step_switched(s)) for s in states]
    assert flags == sorted(flags), "the switch must be permanent"
    return flags.index(True) + 1 if any(flags) else -1


def test_switches_when_constructed_v_settles():
    # b2=0 makes v_t = g_t²: |Δv| is 4, then 3 while g alternates 2, 1, ..., then 0 from step 11 on
    g = [2.0 if t % 2 else 1.0 for t in range(1, 11)] + [1.0] * 10
    grads = [jnp.full((3, 4), x) for x in g]
    _, states = _run(scale_by_step(b2=0.0, threshold=0.5, window=3, min_steps=1, max_steps=1000), grads)
    assert _switch_step(states) == 13  # the first window of three zero records: steps 11, 12, 13
    assert int(states[-1].switch_step) == 13


def test_switch_step_matches_analytic_v_with_constant_gradient():
    # constant g: v_t = g²(1 − b2^t), so |Δv_t| = g²(1 − b2) b2^(t−1)
    b2, window, threshold, g = 0.9, 4, 1e-3, 1.5
    t = np.arange(1, 200)
    dv = g**2 * (1 - b2) * b2 ** (t - 1)
    means = np.array([dv[max(0, i - window + 1): i + 1].mean() if i + 1 >= window else np.inf for i in range(len(t))])
    expected = int(t[np.argmax(means < threshold)])
    grads = [jnp.full((8,), g)] * 120
    _, states = _run(scale_by_step(b2=b2, threshold=threshold, window=window, min_steps=1, max_steps=1000), grads)
    assert 10 < expected < 120
    assert _switch_step(states) == expected


def test_min_steps_delays_a_settled_switch():
    grads = [jnp.ones((4,))] * 30  # b2=0: |Δv| is 1 at step 1, then 0
    _, states = _run(scale_by_step(b2=0.0, threshold=0.1, window=2, min_steps=20, max_steps=1000), grads)
    assert _switch_step(states) == 20


def test_max_steps_fallback():
    key = jax.random.key(0)
    grads = list(jax.random.normal(key, (40, 16)))  # noisy: never below a zero threshold
    _, states = _run(scale_by_step(threshold=0.0, window=5, min_steps=1, max_steps=25), grads)
    assert _switch_step(states) == 25


def test_matches_adam_before_the_switch():
    grads = list(jax.random.normal(jax.random.key(1), (15, 6)))
    outs, states = _run(scale_by_step(b1=0.9, b2=0.99, threshold=0.0, max_steps=100), grads)
    ref, _ = _run(optax.scale_by_adam(b1=0.9, b2=0.99), grads)
    assert not bool(sste_jax.step_switched(states[-1]))
    np.testing.assert_allclose(np.stack(outs), np.stack(ref), rtol=1e-5, atol=1e-7)


def test_variance_is_frozen_after_the_switch():
    b1, b2, eps, k = 0.9, 0.99, 1e-8, 10
    key1, key2 = jax.random.split(jax.random.key(2))
    grads = list(jax.random.normal(key1, (k, 6))) + list(100.0 * jax.random.normal(key2, (5, 6)))
    outs, states = _run(scale_by_step(b1, b2, eps, threshold=0.0, min_steps=1, max_steps=k), grads)
    assert _switch_step(states) == k
    nu_k = states[k - 1].nu["w"]
    for i in range(k, len(grads)):
        np.testing.assert_array_equal(states[i].nu["w"], nu_k)
        t = i + 1
        m_hat = states[i].mu["w"] / (1 - b1**t)
        v_hat = nu_k / (1 - b2**k)  # the bias correction is frozen with v
        np.testing.assert_allclose(outs[i], m_hat / (jnp.sqrt(v_hat) + eps), rtol=1e-5)
    # the huge late gradients would have moved a live v by orders of magnitude
    assert float(jnp.max(states[-1].mu["w"] ** 2)) > 100 * float(jnp.max(nu_k))


def test_step_adam_with_freeze_beta_and_helper():
    params = {"fc": {"kernel": jnp.ones((4, 4)), "beta": jnp.float32(1.3)}}
    tx = sste_jax.freeze_beta(sste_jax.step_adam(0.1, threshold=0.0, min_steps=1, max_steps=3))
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(params, state, params)
        assert float(updates["fc"]["beta"]) == 0.0
    assert bool(sste_jax.step_switched(state))
    with pytest.raises(ValueError, match="found 0"):
        sste_jax.step_switched(optax.adam(0.1).init(params))


@pytest.mark.parametrize("kw", [{"window": 0}, {"min_steps": 0}, {"max_steps": 0}, {"threshold": -1.0}])
def test_bad_settings_raise(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        scale_by_step(**kw)


def test_state_is_a_namedtuple_with_switched():
    state = scale_by_step().init({"w": jnp.zeros((2,))})
    assert isinstance(state, StepState) and state.switched.dtype == jnp.bool_


def test_module_doctests():
    assert doctest.testmod(_step).failed == 0
