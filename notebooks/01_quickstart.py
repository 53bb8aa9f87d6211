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
# # sste_jax quickstart: make an NNX model 2:4 sparse with S-STE
#
# S-STE (Hu, Zhu, Chen, NeurIPS 2024) trains a network whose linear layers run with 2:4 sparse
# weights (2 non-zeros in every group of 4 consecutive inputs, what sparse tensor cores multiply
# twice as fast). The optimizer keeps updating the **dense** weight `W`; the forward pass uses
#
# $$\tilde W = \beta \cdot S(W), \qquad S(a)_i = \operatorname{sign}(a_i)\,\max(|a_i| - t, 0)$$
#
# where `t` is the 2nd-smallest magnitude of each group of 4 (so two entries survive, shrunk by `t`)
# and `β` is a per-tensor scale fitted **once**, when the model is sparsified, and then frozen.
# The gradient of `W` is the gradient of `W̃` (straight through).
#
# This notebook: build a small NNX model, sparsify it, look at `W`, `S(W)`, `β·S(W)` and the mask,
# train it under `jax.jit`, watch the loss and the mask flip rate, and export the 2:4-compressed
# weights.
#
# Set `NOTEBOOK_SCALE=toy` for a seconds-long smoke run (CI does) and `NOTEBOOK_OUT=DIR` to choose
# where the figures go (default `docs/figures` of the repository).

# %%
import os
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import sste_jax
from sste_jax import checkpoint
from sste_jax import nnx as sparse_nnx

SCALE = os.environ.get("NOTEBOOK_SCALE", "full")
if SCALE not in ("toy", "full"):
    raise ValueError(f"NOTEBOOK_SCALE must be 'toy' or 'full', got {SCALE!r}")
ROOT = pathlib.Path.cwd().parent if pathlib.Path.cwd().name == "notebooks" else pathlib.Path.cwd()
OUT = pathlib.Path(os.environ.get("NOTEBOOK_OUT", ROOT / "docs" / "figures"))
OUT.mkdir(parents=True, exist_ok=True)
TOY = SCALE == "toy"
HIDDEN, STEPS, BATCH = (64, 30, 32) if TOY else (512, 400, 128)
print(f"scale={SCALE}: hidden={HIDDEN}, steps={STEPS}, batch={BATCH}; figures -> {OUT}")


# %% [markdown]
# ## A model, and its sparse version
#
# Any NNX model with `nnx.Linear` layers works. `SparseLinear.from_linear` turns a layer into a
# `SparseLinear` holding the same kernel and bias variables (same parameter names, so dense checkpoints
# still load) and computes its β from its current weights. Here we sparsify the two hidden layers and keep
# the read-out dense, as the paper keeps embeddings and the LM head dense. (For a model whose code you
# do not want to touch, `sste_jax.sparsify` makes the chosen products sparse instead.) Kernels are
# `(in, out)`, and the groups of 4 run along `in`, the contraction axis.

# %%
class MLP(nnx.Module):
    def __init__(self, din: int, hidden: int, dout: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(din, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.gelu(self.fc2(nnx.gelu(self.fc1(x)))))


DIN, DOUT = 32, 8
teacher = MLP(DIN, 4 * DIN, DOUT, rngs=nnx.Rngs(1))  # the function to learn, dense


def make_student(seed: int = 0) -> MLP:
    model = MLP(DIN, HIDDEN, DOUT, rngs=nnx.Rngs(seed))
    config = sste_jax.SparsityConfig(method="sste")
    model.fc1 = sparse_nnx.SparseLinear.from_linear(model.fc1, config)
    model.fc2 = sparse_nnx.SparseLinear.from_linear(model.fc2, config)
    return model


model = make_student()
print(type(model.fc1).__name__, type(model.fc2).__name__, type(model.head).__name__)
print("beta:", {name: round(float(w.beta), 3) for name, w in sste_jax.sparse_weights(model).items()})

# %% [markdown]
# β is about 1.5 at initialisation (1.48 for Gaussian weights, a little more for Flax's truncated
# normal): the soft threshold removes `t` from both survivors, and β restores the lost scale (it
# minimises `‖W − β·S(W)‖²`).
#
# ## What the forward pass uses
#
# A 16×16 corner of `fc2`'s kernel. Each column holds 4 groups of 4 consecutive rows; in every group
# the mask keeps the 2 largest magnitudes, and `S(W)` keeps the same two, shrunk towards zero.

# %%
w = model.fc2.kernel[...][:16, :16]
beta = model.fc2.beta[...]
panels = {
    "W (dense weight)": w,
    "S(W) (soft threshold)": sste_jax.soft_threshold_24(w),
    "β·S(W) (forward weight)": beta * sste_jax.soft_threshold_24(w),
    "mask_24(W) (top-2 of 4)": sste_jax.mask_24(w).astype(jnp.float32),
}
fig, axes = plt.subplots(1, 4, figsize=(13, 3.6), layout="constrained")
vmax = float(jnp.max(jnp.abs(panels["β·S(W) (forward weight)"])))
for ax, (title, a) in zip(axes, panels.items()):
    is_mask = title.startswith("mask")
    im = ax.imshow(
        np.asarray(a), cmap="Greys" if is_mask else "RdBu_r", vmin=0 if is_mask else -vmax, vmax=1 if is_mask else vmax
    )
    if not is_mask:
        values = im
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("out")
    ax.set_yticks(np.arange(3.5, 15, 4), labels=[])
    ax.set_xticks([])
    ax.grid(axis="y", color="k", linewidth=1.2)
axes[0].set_ylabel("in (groups of 4 between the lines)")
fig.colorbar(values, ax=axes[:3], shrink=0.8)
fig.savefig(OUT / "quickstart_weights.png", dpi=100, bbox_inches="tight")
plt.show()

# %%
w_tilde = sste_jax.forward_weight(model.fc2.kernel[...], model.fc2.beta[...], model.fc2.config)
nonzeros_per_group = (w_tilde != 0).reshape(-1, 4, w_tilde.shape[1]).sum(axis=1)
print("max non-zeros per group of 4:", int(nonzeros_per_group.max()))
assert int(nonzeros_per_group.max()) <= 2

# %% [markdown]
# ## Training, jitted
#
# The optimizer updates the dense `W` of every `nnx.Param`; β is an `nnx.Variable` that is not a
# `Param`, and `freeze_beta` guarantees it gets no update and no optimizer state whatever filter is
# used. The flip rate is the fraction of top-2 mask entries that changed since the previous step; its
# state is the previous masks, packed into bits.

# %%
def batches(key, steps, batch):
    for k in jax.random.split(key, steps):
        x = jax.random.normal(k, (batch, DIN))
        yield x, teacher(x)


def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def train_step(model, optimizer, flips, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    rates, flips = sste_jax.metrics.flip_rate(flips, sste_jax.sparse_weights(model))
    return loss, rates["flip_rate"], flips


optimizer = nnx.Optimizer(model, sste_jax.freeze_beta(optax.adamw(3e-3, weight_decay=0.1)), wrt=nnx.Param)
flips = sste_jax.metrics.init_flip_state(sste_jax.sparse_weights(model))
beta_before = model.fc2.beta[...]
history = []
for x, y in batches(jax.random.key(2), STEPS, BATCH):
    loss, flip, flips = train_step(model, optimizer, flips, x, y)
    history.append((loss, flip))
losses, flip_rates = (np.asarray(jax.device_get(v)) for v in zip(*history))
print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; β unchanged: {bool(model.fc2.beta[...] == beta_before)}")
assert losses[-5:].mean() < losses[:5].mean()
assert bool(model.fc2.beta[...] == beta_before)

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
ax1.plot(losses)
ax1.set(xlabel="step", ylabel="train MSE", yscale="log", title="loss")
ax2.plot(np.arange(1, len(flip_rates) + 1), flip_rates)
ax2.set(xlabel="step", ylabel="fraction of mask entries flipped", yscale="log", title="flip rate")
fig.tight_layout()
fig.savefig(OUT / "quickstart_training.png", dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## Export the 2:4-compressed weights
#
# `export_compressed` stores each sparse layer's `W̃` as the two kept values of every group plus one
# uint8 of positions per group (`compress_24`): half the weight bytes plus a sixteenth for
# metadata (in float32). `load_compressed` loads it into a freshly built, sparsified model; its outputs equal
# the trained model's bit for bit.

# %%
def tree_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    checkpoint.save_checkpoint(tmp / "dense", 0, nnx.state(model, nnx.Param))
    sparse_nnx.export_compressed(tmp / "compressed", model)
    dense_bytes, compressed_bytes = tree_bytes(tmp / "dense"), tree_bytes(tmp / "compressed")
    restored = sparse_nnx.load_compressed(tmp / "compressed", make_student(seed=123))

sparse_kernel_bytes = sum(w.kernel.nbytes for w in sste_jax.sparse_weights(model).values())
packed = [sste_jax.compress_24(w.forward()) for w in sste_jax.sparse_weights(model).values()]
packed_bytes = sum(v.nbytes + m.nbytes for v, m in packed)
print(
    f"sparse kernels: {sparse_kernel_bytes:,} B dense -> {packed_bytes:,} B packed "
    f"({packed_bytes / sparse_kernel_bytes:.3f}x)"
)
print(
    f"on disk: dense parameters {dense_bytes:,} B, compressed export {compressed_bytes:,} B "
    f"({compressed_bytes / dense_bytes:.2f}x)"
)
x = jax.random.normal(jax.random.key(3), (4, DIN))
same = bool(jnp.all(restored(x) == model(x)))
print("restored model reproduces the outputs exactly:", same)
assert packed_bytes / sparse_kernel_bytes == 0.5625 and same
