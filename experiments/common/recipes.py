"""Training methods as recipes: what the sparse layers compute and what changes during training.

A `Recipe` names the layers' `sste_jax.SparsityConfig` and the run's phases: STEP's switch from
dense Adam to hard 2:4 with frozen variance, T-SR-STE's mask refresh and optional dense finish, the
ablations' β rules and β recomputation (`experiments.common.schedule.Schedule` carries them out).
`METHODS` names the recipes every experiment accepts; `make_optimizer` is the one optimizer.

>>> sorted(METHODS)[:4]
['dense', 'srste', 'sste', 'sste_beta_l1']
>>> get_recipe("tsrste_df", dense_finish=0.2).dense_finish
0.2
"""

import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import sste_jax
from experiments.common.config import OptimConfig
from sste_jax import nnx as sparse_nnx

DENSE = sste_jax.SparsityConfig(method="dense")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One training method.

    Attributes:
      config: the sparse layers' `SparsityConfig` (STEP: its dense first phase).
      optimizer: ``"adamw"``, or ``"step"``: `sste_jax.optim.scale_by_step` in place of Adam's scaling, whose
        switch turns the layers into ``then`` from the next step on.
      then: STEP's second-phase layers (hard 2:4 STE).
      dense_finish: the last fraction of the steps is trained with dense layers (T-SR-STE's "DF": its
        authors' last 1/6, steps 250k to 300k).
      mask_refresh: ``"tsrste"``: steps between `sste_jax.nnx.refresh_masks` (40, as its authors).
      beta_rule: ``"sste"`` β at sparsification: ``"mse"`` (`fit_beta`, the method), ``"l1"`` (match
        ``Σ|W|``) or ``"none"`` (1.0); the last two are ablations (the paper's Table 2).
      refit_beta_every: > 0 recomputes β with ``beta_rule`` every so many steps: the failure mode the
        paper warns of, as an ablation (Figure 4).
      switch_min, switch_max: STEP's ``min_steps`` and ``max_steps`` (``T_min``, ``T_max``) as fractions
        of the run's steps; its window is ``int(1/(1 − b2))`` steps, as its authors'.
      switch_threshold: STEP's threshold on the windowed ``mean|v_t − v_{t−1}|`` of the sparse
        kernels. The default came from a pilot of the ``small`` LM config with the older statistic
        (over every parameter, a full window: `sste_jax.optim.step_v_change`, logged as ``step_v_change``,
        fell from 5.5e-8 to a plateau of ~2.2e-8 by step ~250 of 800); it has not been re-piloted for
        the sparse-kernel statistic. Other tasks need their own (``--recipe switch_threshold=...``).
      switch_statistic: ``"mean"`` or ``"geometric"`` (the authors' option 2).
      n, m: the N:M pattern of ``config`` and ``then`` (``--recipe n=1 m=4``); default 2:4.
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
    switch_threshold: float = 3e-8
    switch_statistic: str = "mean"
    n: int = 2
    m: int = 4

    def __post_init__(self):
        for name in ("config", "then"):
            layers = getattr(self, name)
            if layers is not None and (layers.n, layers.m) != (self.n, self.m):
                object.__setattr__(self, name, dataclasses.replace(layers, n=self.n, m=self.m))
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
    "tsrste_df": Recipe(sste_jax.SparsityConfig(method="tsrste"), dense_finish=1 / 6),  # 250k of 300k sparse
    "tsrste_df_mvue": Recipe(sste_jax.SparsityConfig(method="tsrste", mvue=True), dense_finish=1 / 6),  # as its authors
    "step": Recipe(DENSE, optimizer="step", then=sste_jax.SparsityConfig(method="ste")),
    "sste": Recipe(_SSTE),
    "sste_mvue": Recipe(sste_jax.SparsityConfig(method="sste", mvue=True)),
    "sste_fp8": Recipe(sste_jax.SparsityConfig(method="sste", fp8=True)),
    "sste_mvue_fp8": Recipe(sste_jax.SparsityConfig(method="sste", mvue=True, fp8=True)),  # the paper's S-STE
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


FEED_FORWARD = next(iter(sste_jax.feed_forward()))  # the paper's choice: the feed-forward linears
ALL = ".*"  # every linear whose contraction length divides into groups


def sparsify(model: nnx.Module, recipe: Recipe, where: str = FEED_FORWARD, *, seed: int) -> nnx.Module:
    """``model`` with its ``nnx.Linear`` layers whose path fully matches ``where`` (``"blocks/0/mlp/c_fc"``)
    replaced in place by ``recipe.config`` `sste_jax.nnx.SparseLinear` layers holding the same variables;
    β by ``recipe.beta_rule``. With `ALL`, layers whose contraction length is not divisible by the group
    size stay dense."""
    rngs = nnx.Rngs(sparsity=seed)
    pattern = re.compile(where)
    chosen = [(path, layer) for path, layer in nnx.iter_graph(model) if type(layer) is nnx.Linear
              and pattern.fullmatch("/".join(map(str, path)))
              and (where != ALL or layer.in_features % recipe.config.m == 0)]
    if not chosen:
        raise ValueError(f"no nnx.Linear layer of {type(model).__name__} matches {where!r}")
    for path, layer in chosen:
        parent = model
        for name in path[:-1]:
            parent = parent[name] if isinstance(name, int) else getattr(parent, name)
        sparse = sparse_nnx.SparseLinear.from_linear(layer, recipe.config, rngs=rngs)
        if isinstance(path[-1], int):
            parent[path[-1]] = sparse
        else:
            setattr(parent, path[-1], sparse)
    if recipe.beta_rule != "mse":  # refit_beta sets the β of "sste" layers only
        sparse_nnx.refit_beta(model, BETA_RULES[recipe.beta_rule])
    return model


def _switch(recipe: Recipe, steps: int, model: nnx.Module) -> dict:
    """STEP's switch settings in steps (the recipe holds fractions of the run), over the sparse kernels."""
    fractions = {"min_steps": recipe.switch_min, "max_steps": recipe.switch_max}
    return {**{k: round(f * steps) for k, f in fractions.items()}, "threshold": recipe.switch_threshold,
            "statistic": recipe.switch_statistic, "sparse": sste_jax.optim.sparse_kernel_mask(model)}


def dense_finish_from(recipe: Recipe, steps: int) -> int | None:
    """The first step (1-based) of ``recipe``'s dense finish in a run of ``steps``, or None."""
    return steps - round(recipe.dense_finish * steps) + 1 if recipe.dense_finish else None


def _masked_decay(recipe: Recipe, steps: int) -> optax.GradientTransformation:
    """T-SR-STE's masked decay on the ``"tsrste"`` kernels (their layers' masks, given to each update), off during
    the dense finish."""
    alpha, start = recipe.config.masked_decay, dense_finish_from(recipe, steps)
    decay = alpha if start is None else lambda count: jnp.where(count + 1 < start, alpha, 0.0)
    return sste_jax.optim.add_masked_decay(decay)


def make_optimizer(
    cfg: OptimConfig, model: nnx.Module, recipe: Recipe, scale: float = 1.0
) -> optax.GradientTransformation:
    """AdamW (decay on >=2-D params only) or STEP, warmup + cosine, clip, in `freeze_beta`; T-SR-STE's
    masked decay joins the clipped gradient before AdamW, as its authors'; ``scale`` multiplies the
    sparse kernels' learning rate (the β-matched dense control)."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup, max(cfg.steps, cfg.warmup + 1), end_value=cfg.min_lr
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    if recipe.optimizer == "step":
        inner = [sste_jax.optim.scale_by_step(cfg.b1, cfg.b2, **_switch(recipe, cfg.steps, model)),
                 optax.add_decayed_weights(cfg.weight_decay, decay_mask), optax.scale_by_learning_rate(schedule)]
    else:
        inner = [optax.adamw(schedule, cfg.b1, cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)]
    parts = [optax.clip_by_global_norm(cfg.clip), *inner]
    if recipe.config.method == "tsrste":
        parts.insert(1, _masked_decay(recipe, cfg.steps))
    if scale != 1.0:
        parts.append(optax.masked(optax.scale(scale), sste_jax.optim.sparse_kernel_mask(model)))
    return sste_jax.freeze_beta(optax.chain(*parts))
