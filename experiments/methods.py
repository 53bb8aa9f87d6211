"""Training methods as recipes, and the optimizer and jitted train step that every experiment shares.

A `Recipe` says what the sparse layers compute and what changes during training: STEP's switch from
dense Adam to hard 2:4 with frozen variance, T-SR-STE's mask refresh and optional dense finish, and
the ablations' β rules and β recomputation. `METHODS` names the recipes the experiments accept.

>>> from experiments.configs import get_config
>>> from experiments.model import GPT
>>> from flax import nnx
>>> cfg = get_config("tiny")
>>> model = sparsify(GPT(256, 2, 2, 32, 16, rngs=nnx.Rngs(0)), METHODS["tsrste"], seed=0)
>>> phases(model, METHODS["tsrste_df"]).names
('tsrste', 'dense')
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sste_jax
from experiments.configs import Config
from sste_jax import nnx as sparse_nnx

DENSE = sste_jax.SparsityConfig(method="dense")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One training method.

    Attributes:
      config: the sparse layers' `SparsityConfig` (STEP: its dense first phase).
      optimizer: ``"adamw"``, or ``"step"``: `sste_jax.scale_by_step` in place of Adam's scaling, whose
        switch turns the layers into ``then`` from the next step on.
      then: STEP's second-phase layers (hard 2:4 STE).
      dense_finish: the last fraction of the steps is trained with dense layers (T-SR-STE's "DF").
      mask_refresh: ``"tsrste"``: steps between `sste_jax.nnx.refresh_masks` (SPEC §7: 40).
      beta_rule: ``"sste"`` β at sparsification: ``"mse"`` (`fit_beta`, the method), ``"l1"`` (match
        ``Σ|W|``) or ``"none"`` (1.0); the last two are ablations (the paper's Table 2).
      refit_beta_every: > 0 recomputes β with ``beta_rule`` every so many steps: the failure mode of
        SPEC §4, as an ablation (Figure 4).
      switch_min, switch_max, switch_window: STEP's ``min_steps``, ``max_steps`` and ``window`` as
        fractions of the run's steps.
      switch_threshold: STEP's threshold on the windowed ``mean|v_t − v_{t−1}|``. The default is from
        a pilot of the ``small`` LM config (`sste_jax.step_v_change`, logged as ``step_v_change``, falls from 5.5e-8 to a plateau of ~2.2e-8
        by step ~250 of 800); other tasks need their own (``--recipe switch_threshold=...``).
    """

    config: sste_jax.SparsityConfig
    optimizer: str = "adamw"
    then: sste_jax.SparsityConfig | None = None
    dense_finish: float = 0.0
    mask_refresh: int = 40
    beta_rule: str = "mse"
    refit_beta_every: int = 0
    switch_min: float = 0.1
    switch_max: float = 0.5
    switch_window: float = 0.05
    switch_threshold: float = 3e-8

    def __post_init__(self):
        if self.optimizer not in ("adamw", "step"):
            raise ValueError(f"optimizer must be 'adamw' or 'step', got {self.optimizer!r}")
        if (self.optimizer == "step") != (self.then is not None):
            raise ValueError("a 'step' recipe needs `then` (its second-phase layers), and only it does")
        if not 0.0 <= self.dense_finish < 1.0:
            raise ValueError(f"dense_finish must be in [0, 1), got {self.dense_finish}")
        if self.beta_rule not in BETA_RULES:
            raise ValueError(f"beta_rule must be one of {sorted(BETA_RULES)}, got {self.beta_rule!r}")
        if self.mask_refresh < 1 or self.refit_beta_every < 0:
            raise ValueError(f"mask_refresh must be >= 1 and refit_beta_every >= 0, got "
                             f"{self.mask_refresh}, {self.refit_beta_every}")


def _l1_beta(w: jax.Array) -> jax.Array:
    s = jnp.abs(sste_jax.soft_threshold_24(w.astype(jnp.float32))).sum()
    return jnp.where(s > 0, jnp.abs(w.astype(jnp.float32)).sum() / jnp.where(s > 0, s, 1.0), 1.0)


BETA_RULES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "mse": sste_jax.fit_beta,
    "l1": _l1_beta,
    "none": lambda w: jnp.ones((), jnp.float32),
}

_SSTE = sste_jax.SparsityConfig(method="sste")
METHODS: dict[str, Recipe] = {
    "dense": Recipe(DENSE),
    "ste": Recipe(sste_jax.SparsityConfig(method="ste")),
    "srste": Recipe(sste_jax.SparsityConfig(method="srste")),
    "tsrste": Recipe(sste_jax.SparsityConfig(method="tsrste")),
    "tsrste_df": Recipe(sste_jax.SparsityConfig(method="tsrste"), dense_finish=0.1),
    "step": Recipe(DENSE, optimizer="step", then=sste_jax.SparsityConfig(method="ste")),
    "sste": Recipe(_SSTE),
    "sste_mvue": Recipe(sste_jax.SparsityConfig(method="sste", mvue=True)),
    "sste_fp8": Recipe(sste_jax.SparsityConfig(method="sste", fp8=True)),
    "sste_mvue_fp8": Recipe(sste_jax.SparsityConfig(method="sste", mvue=True, fp8=True)),
    # ablations (Table 2: β; Figure 4: β recomputed; the period is the experiment's "epoch")
    "sste_beta_none": Recipe(_SSTE, beta_rule="none"),
    "sste_beta_l1": Recipe(_SSTE, beta_rule="l1"),
    "sste_beta_refit": Recipe(_SSTE, refit_beta_every=50),
}


def get_recipe(name: str, **changes) -> Recipe:
    """``METHODS[name]`` with ``changes`` (e.g. ``refit_beta_every=20``)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use one of {sorted(METHODS)}")
    return dataclasses.replace(METHODS[name], **changes)


def sparsify(model: nnx.Module, recipe: Recipe, where=sparse_nnx.feed_forward, *, seed: int) -> nnx.Module:
    """``model`` with the layers ``where`` selects as ``recipe.config`` layers, β by ``recipe.beta_rule``."""
    sparse_nnx.sparsify(model, recipe.config, where, rngs=nnx.Rngs(sparsity=seed))
    if recipe.beta_rule != "mse":  # refit_beta sets the β of "sste" layers only
        sparse_nnx.refit_beta(model, BETA_RULES[recipe.beta_rule])
    return model


class Phases(NamedTuple):
    """The graphs a run switches between (same state): index 0 first, then 1 (STEP, dense finish)."""

    graphdefs: tuple[Any, ...]
    names: tuple[str, ...]


def _with_layers(model: nnx.Module, config: sste_jax.SparsityConfig):
    clone = nnx.clone(model)
    for _, layer in nnx.iter_graph(clone):
        if isinstance(layer, sparse_nnx.SparseLinear):
            layer.config = config
    return nnx.split(clone, nnx.Param, ...)[0]


def phases(model: nnx.Module, recipe: Recipe) -> Phases:
    """The first-phase graph of ``model`` and, for STEP or a dense finish, the second one."""
    first = nnx.split(model, nnx.Param, ...)[0]
    if recipe.then is not None:
        return Phases((first, _with_layers(model, recipe.then)), (recipe.config.method, recipe.then.method))
    if recipe.dense_finish:
        return Phases((first, _with_layers(model, DENSE)), (recipe.config.method, "dense"))
    return Phases((first,), (recipe.config.method,))


def dense_finish_step(recipe: Recipe, steps: int) -> int:
    """The first step (1-based) trained dense under ``recipe.dense_finish``."""
    return steps - int(round(recipe.dense_finish * steps)) + 1


def dense_w_graphdef(model: nnx.Module):
    """The graph of ``model`` with every sparse layer evaluating its dense ``W`` (same state)."""
    return _with_layers(model, DENSE)


def _switch(recipe: Recipe, steps: int) -> dict:
    fractions = {"min_steps": recipe.switch_min, "max_steps": recipe.switch_max, "window": recipe.switch_window}
    return {**{k: max(1, int(round(f * steps))) for k, f in fractions.items()}, "threshold": recipe.switch_threshold}


def make_optimizer(cfg: Config, model: nnx.Module, recipe: Recipe, scale: float = 1.0) -> optax.GradientTransformation:
    """AdamW (SPEC §7: decay on >=2-D params only) or STEP, warmup + cosine, clip, in `freeze_beta`;
    ``scale`` multiplies the sparse kernels' learning rate (the β-matched dense control)."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup, max(cfg.steps, cfg.warmup + 1), end_value=cfg.min_lr
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    if recipe.optimizer == "step":
        inner = [sste_jax.scale_by_step(cfg.b1, cfg.b2, **_switch(recipe, cfg.steps)),
                 optax.add_decayed_weights(cfg.weight_decay, decay_mask), optax.scale_by_learning_rate(schedule)]
    else:
        inner = [optax.adamw(schedule, cfg.b1, cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)]
    parts = [optax.clip_by_global_norm(cfg.clip), *inner]
    if scale != 1.0:
        parts.append(optax.masked(optax.scale(scale), sparse_nnx.sparse_kernel_mask(model)))
    return sste_jax.freeze_beta(optax.chain(*parts))


LossFn = Callable[..., jax.Array]  # (model, *micro_batch arrays) -> scalar loss


def _loss(loss_fn: LossFn, graphdef, params, rest, batch):
    rest = jax.tree.map(lambda v: v, rest)  # fresh variables in this trace: MVUE advances its key counters
    model = nnx.merge(graphdef, params, rest)
    return loss_fn(model, *batch), nnx.split(model, nnx.Param, ...)[2]


def phase_index(recipe: Recipe, steps: int, step, opt_state):
    """0 or 1: the graph that trains step ``step + 1`` (traced or concrete)."""
    if recipe.then is not None:
        return sste_jax.step_switched(opt_state).astype(jnp.int32)
    if recipe.dense_finish:
        return (step + 1 >= dense_finish_step(recipe, steps)).astype(jnp.int32)
    return jnp.zeros((), jnp.int32)


def _refresh(graphdef, params, rest, step, every: int, update: Callable[[nnx.Module], Any]):
    """``rest`` after ``update(model)`` when ``step % every == 0``, else unchanged."""
    def apply(rest):
        model = nnx.merge(graphdef, params, rest)
        update(model)
        return nnx.split(model, nnx.Param, ...)[2]

    return jax.lax.cond(step % every == 0, apply, lambda r: r, rest)


def make_train_step(loss_fn: LossFn, phases_: Phases, tx, recipe: Recipe, steps: int):
    """``train_step(state, *batch_A)`` → ``(state, metrics)``: one optimizer step averaged over the
    ``A`` micro-batches of the leading axis, the recipe's graph switch, mask refresh and β refit."""
    graphdefs = phases_.graphdefs

    @jax.jit
    def train_step(state, *batch_A):
        def grads(graphdef):
            grad_fn = jax.value_and_grad(lambda p, r, b: _loss(loss_fn, graphdef, p, r, b), has_aux=True)

            def micro(carry, batch):
                rest, total, loss_sum = carry
                (loss, rest), g = grad_fn(state["params"], rest, batch)
                return (rest, jax.tree.map(jnp.add, total, g), loss_sum + loss), None

            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            return jax.lax.scan(micro, (state["rest"], zeros, jnp.zeros((), jnp.float32)), batch_A)[0]

        phase = phase_index(recipe, steps, state["step"], state["opt"])
        if len(graphdefs) == 1:
            rest, total, loss_sum = grads(graphdefs[0])
        else:
            rest, total, loss_sum = jax.lax.switch(phase, [lambda g=g: grads(g) for g in graphdefs])
        n = batch_A[0].shape[0]
        total = jax.tree.map(lambda g: g / n, total)
        updates, opt = tx.update(total, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        step = state["step"] + 1
        if recipe.config.method == "tsrste":
            rest = _refresh(graphdefs[0], params, rest, step, recipe.mask_refresh, sparse_nnx.refresh_masks)
        if recipe.refit_beta_every:
            refit = lambda m: sparse_nnx.refit_beta(m, BETA_RULES[recipe.beta_rule])  # noqa: E731
            rest = _refresh(graphdefs[0], params, rest, step, recipe.refit_beta_every, refit)
        weights = sste_jax.sparse_weights(nnx.merge(graphdefs[0], params, rest))
        rates, flip = sste_jax.flip_rate(state["flip"], weights)
        metrics = {"train_loss": loss_sum / n, "flip_rate": rates["flip_rate"], "grad_norm": optax.tree.norm(total),
                   "phase": phase.astype(jnp.float32)}
        if recipe.optimizer == "step":
            metrics["step_v_change"] = sste_jax.step_v_change(opt)
        return {"params": params, "rest": rest, "opt": opt, "flip": flip, "step": step}, metrics

    return train_step


def initial_state(model: nnx.Module, tx) -> dict:
    """The training state of ``model`` at step 0: params, the other variables, optimizer, flip masks."""
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return {
        "params": params,
        "rest": rest,
        "opt": tx.init(params),
        "flip": sste_jax.init_flip_state(sste_jax.sparse_weights(model)),
        "step": jnp.zeros((), jnp.int32),
    }


def current_phase(recipe: Recipe, steps: int, state) -> int:
    """The phase the state is in now, to pick the graph that evaluates it (waits on the device)."""
    return int(np.asarray(phase_index(recipe, steps, state["step"] - 1, state["opt"])))


def fit(train_step, state, batch_at: Callable[[int], tuple], steps: int, log_every: int,
        on_log: Callable[[int, Any, dict], None], start: int = 0):
    """Runs steps ``start + 1 .. steps``; every ``log_every`` steps (and the last) calls
    ``on_log(step, state, means)`` with the logged metrics averaged since the last call.

    ``batch_at(i)`` gives the micro-batches of the step after ``i`` steps. The host waits on the device
    only there: the metrics stay on the device until a log step. Returns the final state.
    """
    pending = []
    for step in range(start + 1, steps + 1):
        state, metrics = train_step(state, *batch_at(step - 1))
        pending.append(metrics)
        if step % log_every == 0 or step == steps:
            logged = jax.device_get(pending)
            on_log(step, state, {k: float(np.mean([m[k] for m in logged])) for k in logged[0]})
            pending = []
    return state


def second_phase_from(recipe: Recipe, steps: int, state) -> int | None:
    """The first step trained with the second graph (STEP's switch, a dense finish), or None if the
    run has none or has not reached it (waits on the device)."""
    if recipe.then is not None:
        switch = sste_jax.step_state(state["opt"])
        return int(switch.switch_step) + 1 if bool(switch.switched) else None
    start = dense_finish_step(recipe, steps)
    return start if recipe.dense_finish and int(state["step"]) >= start else None


def current_model(phases_: Phases, recipe: Recipe, steps: int, state) -> nnx.Module:
    """The model of ``state`` with the graph of its current phase (see `current_phase`)."""
    return nnx.merge(phases_.graphdefs[current_phase(recipe, steps, state)], state["params"], state["rest"])


def layer_means(model: nnx.Module) -> dict[str, float]:
    """The sparse layers' mean β and mean fraction of exact zeros in the forward weights, on the host."""
    stats = sste_jax.to_host(sste_jax.sparsity_stats(sste_jax.sparse_weights(model)))
    return {name: float(np.mean([v for k, v in stats.items() if k.startswith(prefix)]))
            for name, prefix in (("beta_mean", "beta/"), ("zero_fraction", "zero_fraction/"))}
