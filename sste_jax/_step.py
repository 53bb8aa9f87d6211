"""STEP (Lu et al., 2023): dense Adam until the second-moment estimate settles, then frozen variance.

`scale_by_step` is Adam's scaling with an automatic switch. Each step it records
``mean|v_t − v_{t−1}|`` over all parameters (raw, not bias-corrected ``v``); the switch happens at
the first step ``t >= min_steps`` where the mean of the last ``window`` records is below
``threshold``, or at ``t == max_steps``. From the step after the switch on, ``v`` (and its bias
correction) stay frozen while the first moment keeps updating. The hard 2:4 STE forward of the
second phase is the training loop's concern (``SparsityConfig(method="ste")`` layers once
`step_switched` turns True).

>>> import jax.numpy as jnp, optax, sste_jax
>>> params = {"w": jnp.ones((4, 4))}
>>> tx = sste_jax.step_adam(0.1, threshold=0.0, max_steps=2)
>>> state = tx.init(params)
>>> for _ in range(2):
...     _, state = tx.update(params, state)
>>> bool(sste_jax.step_switched(state))
True
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int

__all__ = ["StepState", "scale_by_step", "step_adam", "step_state", "step_switched", "step_v_change"]


class StepState(NamedTuple):
    """STEP's Adam moments, the window of ``mean|v_t − v_{t−1}|`` records and the switch.

    >>> import jax.numpy as jnp, sste_jax
    >>> state = sste_jax.scale_by_step(window=4).init({"w": jnp.ones(3)})
    >>> type(state).__name__, state.diffs.shape, bool(state.switched)
    ('StepState', (4,), False)
    """

    count: Int[Array, ""]
    mu: Any
    nu: Any
    diffs: Float[Array, " window"]  # a ring buffer, slot ``(count − 1) % window``
    switched: Bool[Array, ""]
    switch_step: Int[Array, ""]  # the step at which ``v`` was frozen; 0 before the switch


def _check(name: str, value, low: int | float) -> None:
    if not value >= low:
        raise ValueError(f"scale_by_step: {name} must be >= {low}, got {value}")


def scale_by_step(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    threshold: float = 1e-8,
    window: int = 100,
    min_steps: int = 100,
    max_steps: int = 10_000,
) -> optax.GradientTransformation:
    """Adam's ``m̂ / (sqrt(v̂) + eps)`` whose ``v`` freezes once it settles (see the module docstring).

    >>> import jax.numpy as jnp, optax, sste_jax
    >>> params = {"w": jnp.ones(3)}
    >>> tx = optax.chain(sste_jax.scale_by_step(max_steps=3), optax.scale(-0.1))
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...     updates, state = tx.update(params, state)
    >>> bool(sste_jax.step_switched(state)), int(sste_jax.step_state(state).switch_step)
    (True, 3)
    """
    _check("window", window, 1)
    _check("min_steps", min_steps, 1)
    _check("max_steps", max_steps, 1)
    _check("threshold", threshold, 0.0)

    def init_fn(params):
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return StepState(
            count=jnp.zeros((), jnp.int32),
            mu=zeros,
            nu=zeros,
            diffs=jnp.full((window,), jnp.inf, jnp.float32),
            switched=jnp.zeros((), bool),
            switch_step=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        fresh = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        leaves = [jnp.abs(n - v).ravel() for n, v in zip(jax.tree.leaves(fresh), jax.tree.leaves(state.nu))]
        diff = jnp.mean(jnp.concatenate(leaves)) if leaves else jnp.zeros((), jnp.float32)
        diffs = state.diffs.at[(count - 1) % window].set(diff)
        settled = (count >= min_steps) & (jnp.mean(diffs) < threshold)  # inf until the window is full
        switched = state.switched | settled | (count >= max_steps)
        switch_step = jnp.where(state.switched, state.switch_step, jnp.where(switched, count, 0))
        # v is updated through the switching step itself, frozen from the next one on
        nu = jax.tree.map(lambda old, new: jnp.where(state.switched, old, new), state.nu, fresh)
        nu_count = jnp.where(state.switched, state.switch_step, count)
        mu_hat_scale = 1 / (1 - b1 ** count.astype(jnp.float32))
        nu_hat_scale = 1 / (1 - b2 ** nu_count.astype(jnp.float32))
        out = jax.tree.map(
            lambda g, m, v: (m * mu_hat_scale / (jnp.sqrt(v * nu_hat_scale) + eps)).astype(g.dtype), updates, mu, nu
        )
        return out, StepState(count, mu, nu, diffs, switched, switch_step)

    return optax.GradientTransformation(init_fn, update_fn)


def step_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    **switch,
) -> optax.GradientTransformation:
    """STEP's optimizer: `scale_by_step` (``threshold``, ``window``, ``min_steps``, ``max_steps``) then
    the learning rate; wrap it in `sste_jax.freeze_beta` for models with β.

    >>> import jax.numpy as jnp, sste_jax
    >>> tx = sste_jax.step_adam(1e-3, min_steps=10, max_steps=100)
    >>> bool(sste_jax.step_switched(tx.init({"w": jnp.ones(3)})))
    False
    """
    return optax.chain(scale_by_step(b1, b2, eps, **switch), optax.scale_by_learning_rate(learning_rate))


def step_state(opt_state: Any) -> StepState:
    """The single `StepState` inside ``opt_state`` (its ``switch_step`` says when ``v`` froze).

    >>> import jax.numpy as jnp, sste_jax
    >>> tx = sste_jax.freeze_beta(sste_jax.step_adam(1e-3))
    >>> type(sste_jax.step_state(tx.init({"w": jnp.ones(3)}))).__name__  # found inside the wrapper
    'StepState'
    """
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, StepState))
             if isinstance(s, StepState)]
    if len(found) != 1:
        raise ValueError(f"expected one StepState in the optimizer state, found {len(found)}")
    return found[0]


def step_switched(opt_state: Any) -> Bool[Array, ""]:
    """Whether the (single) `StepState` inside ``opt_state`` has switched to frozen variance.

    >>> import jax.numpy as jnp, sste_jax
    >>> params = {"w": jnp.ones(3)}
    >>> tx = sste_jax.step_adam(1e-3, max_steps=1)
    >>> _, state = tx.update(params, tx.init(params))
    >>> bool(sste_jax.step_switched(state))
    True
    """
    return step_state(opt_state).switched


def step_v_change(opt_state: Any) -> Float[Array, ""]:
    """The statistic the switch compares with ``threshold``: the mean of the last ``window`` records
    of ``mean|v_t − v_{t−1}|`` (``inf`` until ``window`` steps have run). Log it to choose a threshold.

    >>> import jax.numpy as jnp, sste_jax
    >>> params = {"w": jnp.ones(3)}
    >>> tx = sste_jax.step_adam(1e-3, window=2)
    >>> state = tx.init(params)
    >>> float(sste_jax.step_v_change(state))  # no full window yet
    inf
    """
    return jnp.mean(step_state(opt_state).diffs)
