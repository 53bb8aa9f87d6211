"""The phases of one training run, in one object: which graph trains each step (STEP's switch to
hard 2:4, T-SR-STE's dense finish) and what changes between steps (T-SR-STE's mask refresh, the β
recomputation ablation).

>>> from flax import nnx
>>> from experiments.common.recipes import METHODS, sparsify
>>> from experiments.lm.model import GPT
>>> model = sparsify(GPT(256, 1, 2, 32, 16, rngs=nnx.Rngs(0)), METHODS["tsrste_df"], seed=0)
>>> schedule = Schedule(model, METHODS["tsrste_df"], steps=100)
>>> schedule.names, schedule.dense_finish_from
(('tsrste', 'dense'), 84)
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sste_jax
from experiments.common.recipes import BETA_RULES, DENSE, Recipe, dense_finish_from
from sste_jax import nnx as sparse_nnx


def _graph_with_layers(model: nnx.Module, config: sste_jax.SparsityConfig):
    clone = nnx.clone(model)
    for _, layer in nnx.iter_graph(clone):
        if isinstance(layer, sparse_nnx.SparseLinear):
            layer.config = config
    return nnx.split(clone, nnx.Param, ...)[0]


def _every(graphdef, params, rest, step, every: int, update: Callable[[nnx.Module], Any]):
    """``rest`` after ``update(model)`` when ``step % every == 0``, else unchanged (traced)."""
    def apply(rest):
        model = nnx.merge(graphdef, params, rest)
        update(model)
        return nnx.split(model, nnx.Param, ...)[2]

    return jax.lax.cond(step % every == 0, apply, lambda r: r, rest)


class Schedule:
    """The graphs a run trains with (same state: params and other variables) and when each is used.

    Attributes:
      graphdefs: index 0 first; index 1 after STEP's switch (hard 2:4 STE) or for the dense finish.
      names: the layers' method in each phase.
      dense_w: the graph whose sparse layers evaluate their dense ``W`` (S-STE's dense-W loss).
      dense_finish_from: the first step (1-based) trained dense, or None.
    """

    def __init__(self, model: nnx.Module, recipe: Recipe, steps: int):
        self.recipe, self.steps = recipe, steps
        first = nnx.split(model, nnx.Param, ...)[0]
        second = recipe.then if recipe.then is not None else DENSE if recipe.dense_finish else None
        self.graphdefs = (first,) if second is None else (first, _graph_with_layers(model, second))
        self.names = (recipe.config.method,) + (() if second is None else (second.method,))
        self.dense_w = _graph_with_layers(model, DENSE)
        self.dense_finish_from = dense_finish_from(recipe, steps)

    def phase(self, step, opt_state) -> jax.Array:
        """0 or 1: the graph that trains step ``step + 1`` (traced or concrete)."""
        if self.recipe.then is not None:
            return sste_jax.optim.step_switched(opt_state).astype(jnp.int32)
        if self.dense_finish_from is not None:
            return (step + 1 >= self.dense_finish_from).astype(jnp.int32)
        return jnp.zeros((), jnp.int32)

    def after_update(self, params, rest, step):
        """The non-parameter variables after optimizer step ``step`` (traced): T-SR-STE's mask refresh
        every ``mask_refresh`` steps, β recomputed every ``refit_beta_every`` steps."""
        recipe = self.recipe
        if recipe.config.method == "tsrste":
            rest = _every(self.graphdefs[0], params, rest, step, recipe.mask_refresh, sparse_nnx.refresh_masks)
        if recipe.refit_beta_every:
            refit = lambda m: sparse_nnx.refit_beta(m, BETA_RULES[recipe.beta_rule])  # noqa: E731
            rest = _every(self.graphdefs[0], params, rest, step, recipe.refit_beta_every, refit)
        return rest

    def current_phase(self, state) -> int:
        """The phase the training state is in now (waits on the device)."""
        return int(np.asarray(self.phase(state["step"] - 1, state["opt"])))

    def model(self, state, dense_w: bool = False) -> nnx.Module:
        """The model of ``state`` in its current phase (``dense_w``: sparse layers use their dense ``W``)."""
        graphdef = self.dense_w if dense_w else self.graphdefs[self.current_phase(state)]
        return nnx.merge(graphdef, state["params"], state["rest"])

    def second_phase_from(self, state) -> int | None:
        """The first step trained with the second graph, or None if the run has none or has not
        reached it (waits on the device)."""
        if self.recipe.then is not None:
            switch = sste_jax.optim.step_state(state["opt"])
            return int(switch.switch_step) + 1 if bool(switch.switched) else None
        start = self.dense_finish_from
        return start if start is not None and int(state["step"]) >= start else None
