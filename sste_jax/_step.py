"""STEP (Lu et al., 2023): dense AdamW until the sparse weights' second moment settles, then frozen variance.

`scale_by_step` is Adam's scaling with the automatic switch of the authors' ``AdamW_STEP``. Each
step ``t`` (1-based) it records ``Z_t = mean|v_t − v_{t−1}|`` over the **sparse weights** (raw,
uncorrected ``v``; ``statistic="geometric"``: the geometric mean of the same), keeps the last
``T_ω = int(1/(1 − b2))`` records (a partial window from step 1 on), and switches at the end of step
``t`` when ``t > max_steps``, or when the window's mean is below ``threshold`` (default ``eps``) and
``t > min_steps``. From the next step on, each sparse weight updates with
``m̂ / (sqrt(v_switch) + eps^0.75)``: ``v_switch`` is its uncorrected ``v`` frozen at the switch, ``m̂``
keeps updating and bias-correcting. The other parameters stay Adam throughout. The hard 2:4 STE
forward of the second phase is the training loop's concern (``SparsityConfig(method="ste")`` layers
once `sste_jax.optim.step_switched` turns True).

>>> import jax.numpy as jnp, optax, sste_jax
>>> params = {"w": jnp.ones((4, 4))}
>>> tx = sste_jax.optim.step_adam(0.1, threshold=0.0, max_steps=1)
>>> state = tx.init(params)
>>> for _ in range(2):
...     _, state = tx.update(params, state)
>>> bool(sste_jax.optim.step_switched(state)), int(sste_jax.optim.step_state(state).switch_step)
(True, 2)
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int

__all__ = ["ScaleByStepState", "scale_by_step", "step_adam", "step_state", "step_switched", "step_v_change"]

_STATISTICS = ("mean", "geometric")


class ScaleByStepState(NamedTuple):
    """STEP's Adam moments, the window of ``Z_t`` records and the switch.

    >>> import jax.numpy as jnp, sste_jax
    >>> state = sste_jax.optim.scale_by_step(b2=0.75).init({"w": jnp.ones(3)})  # a window of 1/(1 − 0.75) = 4
    >>> type(state).__name__, state.diffs.shape, bool(state.switched)
    ('ScaleByStepState', (4,), False)
    """

    count: Int[Array, ""]
    mu: Any
    nu: Any  # the sparse weights' entries stop updating at the switch: they are ``v_switch``
    diffs: Float[Array, " window"]  # a ring buffer of ``Z_t``, slot ``(t − 1) % window``; frozen at the switch
    switched: Bool[Array, ""]
    switch_step: Int[Array, ""]  # the step at whose end ``v`` was frozen; 0 before the switch


def _check_steps(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"scale_by_step: {name} must be None or an int >= 0, got {value!r}")


def _flag_tree(sparse: Any, tree: Any) -> Any:
    """True/False per leaf of ``tree``: the sparse weights (``sparse``: None for all, a boolean
    pytree prefix of ``tree``, or a callable returning one, as in ``optax.masked``)."""
    if sparse is None:
        return jax.tree.map(lambda _: True, tree)
    flags = sparse(tree) if callable(sparse) else sparse
    return jax.tree.map(lambda f, sub: jax.tree.map(lambda _: bool(f), sub), flags, tree)


def scale_by_step(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    sparse: Any = None,
    threshold: float | None = None,
    min_steps: int | None = None,
    max_steps: int | None = None,
    statistic: str = "mean",
) -> optax.GradientTransformation:
    """Adam's ``m̂ / (sqrt(v̂) + eps)`` with STEP's switch to frozen variance (see the module docstring).

    Args:
      b1, b2, eps: Adam's; the window is ``int(1/(1 − b2))`` records.
      sparse: which leaves are the sparse weights (None: all), e.g.
        ``sste_jax.optim.sparse_kernel_mask(model)``: the statistic and the frozen variance apply to them only.
      threshold: the switch threshold on the window's mean (None: ``eps``, as the authors).
      min_steps, max_steps: ``T_min`` and ``T_max`` (None: no bound); the authors suggest 10% and 50%
        of the run.
      statistic: ``"mean"`` (the authors' option 1) or ``"geometric"`` (option 2,
        ``exp(mean(log|v_t − v_{t−1}|))``).

    >>> import jax.numpy as jnp, optax, sste_jax
    >>> params = {"w": jnp.ones(3)}
    >>> tx = optax.chain(sste_jax.optim.scale_by_step(threshold=0.0, max_steps=3), optax.scale(-0.1))
    >>> state = tx.init(params)
    >>> for _ in range(4):
    ...     updates, state = tx.update(params, state)
    >>> bool(sste_jax.optim.step_switched(state)), int(sste_jax.optim.step_state(state).switch_step)  # ends step 4 > 3
    (True, 4)
    """
    if not 0.0 <= b2 < 1.0:
        raise ValueError(f"scale_by_step: b2 must be in [0, 1), got {b2}")
    if not eps >= 0.0:
        raise ValueError(f"scale_by_step: eps must be >= 0, got {eps}")
    if threshold is not None and not threshold >= 0.0:
        raise ValueError(f"scale_by_step: threshold must be >= 0, got {threshold}")
    _check_steps("min_steps", min_steps)
    _check_steps("max_steps", max_steps)
    if statistic not in _STATISTICS:
        raise ValueError(f"scale_by_step: statistic must be one of {_STATISTICS}, got {statistic!r}")
    window = max(1, int(1 / (1 - b2)))
    threshold = eps if threshold is None else threshold
    frozen_eps = eps**0.75

    def init_fn(params):
        if not any(jax.tree.leaves(_flag_tree(sparse, params))):
            raise ValueError("scale_by_step: `sparse` selects no parameter; STEP's statistic needs the sparse weights")
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return ScaleByStepState(
            count=jnp.zeros((), jnp.int32),
            mu=zeros,
            nu=zeros,
            diffs=jnp.zeros((window,), jnp.float32),
            switched=jnp.zeros((), bool),
            switch_step=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None):
        del params
        flags = _flag_tree(sparse, updates)
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        fresh = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        changes = [jnp.abs(n - v).ravel() for n, v, f in
                   zip(jax.tree.leaves(fresh), jax.tree.leaves(state.nu), jax.tree.leaves(flags)) if f]
        change = jnp.concatenate(changes)
        z = jnp.mean(change) if statistic == "mean" else jnp.exp(jnp.mean(jnp.log(change)))
        diffs = jnp.where(state.switched, state.diffs, state.diffs.at[(count - 1) % window].set(z))
        mean_z = jnp.sum(diffs) / jnp.minimum(count, window).astype(jnp.float32)
        fire = jnp.zeros((), bool) if max_steps is None else count > max_steps
        settled = mean_z < threshold
        fire = fire | (settled if min_steps is None else settled & (count > min_steps))
        switched = state.switched | fire
        switch_step = jnp.where(state.switched, state.switch_step, jnp.where(fire, count, 0))
        # a sparse weight's v updates through the switching step itself, frozen from the next one on
        nu = jax.tree.map(lambda old, new, f: jnp.where(state.switched & f, old, new), state.nu, fresh, flags)
        mu_hat_scale = 1 / (1 - b1 ** count.astype(jnp.float32))
        nu_hat_scale = 1 / (1 - b2 ** count.astype(jnp.float32))

        def scale(g, m, v, f):
            adam = m * mu_hat_scale / (jnp.sqrt(v * nu_hat_scale) + eps)
            if f:
                adam = jnp.where(state.switched, m * mu_hat_scale / (jnp.sqrt(v) + frozen_eps), adam)
            return adam.astype(g.dtype)

        out = jax.tree.map(scale, updates, mu, nu, flags)
        return out, ScaleByStepState(count, mu, nu, diffs, switched, switch_step)

    return optax.GradientTransformation(init_fn, update_fn)


def step_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    **switch,
) -> optax.GradientTransformation:
    """STEP's optimizer: `scale_by_step` (``sparse``, ``threshold``, ``min_steps``, ``max_steps``,
    ``statistic``) then the learning rate; wrap it in `sste_jax.freeze_beta` for models with β.

    Args:
      learning_rate: a float or a schedule.
      b1, b2, eps: Adam's.
      **switch: `scale_by_step`'s ``sparse``, ``threshold``, ``min_steps``, ``max_steps``, ``statistic``.

    >>> import jax.numpy as jnp, sste_jax
    >>> tx = sste_jax.optim.step_adam(1e-3, min_steps=10, max_steps=100)
    >>> bool(sste_jax.optim.step_switched(tx.init({"w": jnp.ones(3)})))
    False
    """
    return optax.chain(scale_by_step(b1, b2, eps, **switch), optax.scale_by_learning_rate(learning_rate))


def step_state(opt_state: Any) -> ScaleByStepState:
    """The single `ScaleByStepState` inside ``opt_state`` (its ``switch_step`` says when ``v`` froze).

    >>> import jax.numpy as jnp, sste_jax
    >>> tx = sste_jax.freeze_beta(sste_jax.optim.step_adam(1e-3))
    >>> type(sste_jax.optim.step_state(tx.init({"w": jnp.ones(3)}))).__name__  # found inside the wrapper
    'ScaleByStepState'
    """
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ScaleByStepState))
             if isinstance(s, ScaleByStepState)]
    if len(found) != 1:
        raise ValueError(f"expected one ScaleByStepState in the optimizer state, found {len(found)}")
    return found[0]


def step_switched(opt_state: Any) -> Bool[Array, ""]:
    """Whether the (single) `ScaleByStepState` inside ``opt_state`` has switched to frozen variance.

    >>> import jax.numpy as jnp, sste_jax
    >>> params = {"w": jnp.ones(3)}
    >>> tx = sste_jax.optim.step_adam(1e-3, max_steps=1)
    >>> _, state = tx.update(params, tx.init(params))
    >>> bool(sste_jax.optim.step_switched(state))  # the switch needs step t > max_steps
    False
    >>> _, state = tx.update(params, state)
    >>> bool(sste_jax.optim.step_switched(state))
    True
    """
    return step_state(opt_state).switched


def step_v_change(opt_state: Any) -> Float[Array, ""]:
    """The statistic the switch compares with ``threshold``: the mean of the window of ``Z_t`` records
    (a partial window early on; frozen at the switch; 0 before the first step). Log it to choose a threshold.

    >>> import jax.numpy as jnp, sste_jax
    >>> params = {"w": jnp.ones(3)}
    >>> tx = sste_jax.optim.step_adam(1e-3, b2=0.5)  # a window of int(1/(1 − b2)) = 2 records
    >>> state = tx.init(params)
    >>> float(sste_jax.optim.step_v_change(state))  # no record yet
    0.0
    >>> for _ in range(2):
    ...     _, state = tx.update(params, state)
    >>> float(sste_jax.optim.step_v_change(state))  # v: 0 → 0.5 → 0.75, so Z_1 = 0.5 and Z_2 = 0.25
    0.375
    """
    state = step_state(opt_state)
    records = jnp.where(state.switched, state.switch_step, state.count)
    return jnp.sum(state.diffs) / jnp.maximum(jnp.minimum(records, state.diffs.shape[0]), 1).astype(jnp.float32)
