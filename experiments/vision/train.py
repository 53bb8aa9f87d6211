"""Vision (the paper's Table 5, scaled down): a small ViT on digits or Fashion-MNIST, 2:4 sparse MLPs.

    python -m experiments.vision --methods dense,srste,sste --steps 600 --seeds 0,1,2
    python -m experiments.vision --dataset fashion --methods dense,srste,sste --steps 1000 --seeds 0,1

Each method trains the same ViT (2×2 patches on digits, 4×4 on Fashion-MNIST, a class token,
pre-LN blocks) with its feed-forward linears as `sste_jax.nnx.SparseLinear` layers (``dense`` keeps
them dense, for the flip-rate reference). Methods, optimizer and train step are `experiments.methods`'
(AdamW or STEP, warmup + cosine, clipping, `freeze_beta`; flip rate logged), as for the LM.

Data: ``sklearn.datasets.load_digits()`` (no download), a fixed 80/20 split; or Fashion-MNIST's own
60k/10k split from the idx files of the Debian package ``dataset-fashion-mnist``, which `fetch_fashion`
unpacks into the cache (``$SSTE_CACHE`` or ``~/.cache/sste_jax``) with ``apt-get download`` +
``dpkg-deb -x`` (no root) unless ``--data-dir`` names the idx folder. Batches are a pure function of
(seed, step).

Writes ``results/vision_<dataset>_<config>/metrics.jsonl`` (one record per log step and one
``"final"`` record per run), ``table.md`` (top-1 test accuracy with the 2:4 forward weights, train
loss, late flip rate over dense's), ``top1.png`` and ``flip_rate.png`` (mean over seeds).
"""

import argparse
import dataclasses
import gzip
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float

from experiments import methods
from experiments.configs import Config
from experiments.data import cache_dir_default, fetch_debian
from experiments.report import append_record, format_spread, group_runs, plot_curves, read_records, summarize_finals

CONFIGS = {  # seq_len is set from the dataset (patches + the class token)
    # CI: seconds per method.
    "tiny": Config(n_layer=1, n_head=2, d_model=16, seq_len=17, corpus="digits", steps=6, batch_size=32,
                   lr=3e-3, min_lr=3e-4, warmup=2, weight_decay=0.05, log_every=3, eval_every=6),
    # The README table: ~20 s per method on digits, ~2.5 min on Fashion-MNIST (2 CPU cores).
    "small": Config(n_layer=2, n_head=4, d_model=64, seq_len=17, corpus="digits", steps=600, batch_size=64,
                    lr=2e-3, min_lr=1e-4, warmup=50, weight_decay=0.05, log_every=50, eval_every=100),
}


def load_digits_split(seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: images ``(N, 8, 8)`` standardised by train statistics."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_Nx8x8 = digits.images.astype(np.float32)
    y_N = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y_N))
    n_test = len(y_N) // 5
    test, train = order[:n_test], order[n_test:]
    mean, std = x_Nx8x8[train].mean(), x_Nx8x8[train].std()
    x_Nx8x8 = (x_Nx8x8 - mean) / std
    return x_Nx8x8[train], y_N[train], x_Nx8x8[test], y_N[test]


def _idx(path: pathlib.Path) -> np.ndarray:
    """An idx file (gzip): a big-endian header of dimension sizes, then uint8 data."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if raw[2] != 8 or data.size != np.prod(shape):
        raise ValueError(f"{path}: not a uint8 idx file of shape {shape} (type byte {raw[2]}, {data.size} values)")
    return data.reshape(shape)


def load_fashion_split(data_dir: str | pathlib.Path):
    """Fashion-MNIST's train/test split: images ``(N, 28, 28)`` standardised by train statistics."""
    d = pathlib.Path(data_dir)
    missing = [f for f in FASHION_FILES if not (d / f).exists()]
    if missing:
        raise FileNotFoundError(f"{d} lacks {missing}: see `python -m experiments.vision --help` for the data")
    x_train, x_test = (_idx(d / f"{s}-images-idx3-ubyte.gz").astype(np.float32) for s in ("train", "t10k"))
    y_train, y_test = (_idx(d / f"{s}-labels-idx1-ubyte.gz").astype(np.int32) for s in ("train", "t10k"))
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


FASHION_PACKAGE = "dataset-fashion-mnist"  # Debian; its idx files are in usr/share/datasets/fashion-mnist
FASHION_FILES = tuple(f"{split}-{kind}-ubyte.gz" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1"))


def fetch_fashion(cache_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Fashion-MNIST's idx folder, from the Debian package unpacked once into ``<cache>/dataset-fashion-mnist``."""
    target = pathlib.Path(cache_dir or cache_dir_default()) / FASHION_PACKAGE
    return fetch_debian(FASHION_PACKAGE, target, "usr/share/datasets/fashion-mnist", "Fashion-MNIST",
                        "pass --data-dir with the idx files, or use --dataset digits")


def load_data(dataset: str, data_dir: str | pathlib.Path | None = None, cache_dir: str | pathlib.Path | None = None):
    """``(x_train, y_train, x_test, y_test)`` of ``"digits"`` or ``"fashion"`` (from ``data_dir``, else fetched)."""
    if dataset == "digits":
        return load_digits_split()
    if dataset == "fashion":
        return load_fashion_split(data_dir or fetch_fashion(cache_dir))
    raise ValueError(f"unknown dataset {dataset!r}: use one of {sorted(DATASETS)}")


DATASETS = {"digits": (8, 2), "fashion": (28, 4)}  # image size, patch size


class Attention(nnx.Module):
    def __init__(self, n_head: int, d_model: int, rngs: nnx.Rngs):
        self.n_head = n_head
        self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
        self.proj = nnx.Linear(d_model, d_model, rngs=rngs)

    def __call__(self, x_BTxD: Float[Array, "BT d"], batch: int) -> Float[Array, "BT d"]:
        bt, d = x_BTxD.shape
        qkv_BxTx3xNxH = self.qkv(x_BTxD).reshape(batch, bt // batch, 3, self.n_head, d // self.n_head)
        q, k, v = (qkv_BxTx3xNxH[:, :, i] for i in range(3))
        return self.proj(jax.nn.dot_product_attention(q, k, v).reshape(bt, d))


class MLP(nnx.Module):
    def __init__(self, d_model: int, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.fc2 = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, x_BTxD: Float[Array, "BT d"]) -> Float[Array, "BT d"]:
        return self.fc2(jax.nn.gelu(self.fc1(x_BTxD)))


class Block(nnx.Module):
    def __init__(self, n_head: int, d_model: int, rngs: nnx.Rngs):
        self.ln_1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = Attention(n_head, d_model, rngs)
        self.ln_2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp = MLP(d_model, rngs)

    def __call__(self, x_BTxD: Float[Array, "BT d"], batch: int) -> Float[Array, "BT d"]:
        x_BTxD = x_BTxD + self.attn(self.ln_1(x_BTxD), batch)
        return x_BTxD + self.mlp(self.ln_2(x_BTxD))


class ViT(nnx.Module):
    """Returns class logits ``(B, n_classes)`` for square single-channel images ``(B, S, S)``."""

    def __init__(self, cfg: Config, image_size: int, patch: int, n_classes: int, *, rngs: nnx.Rngs):
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not divisible by the patch size {patch}")
        self.image_size, self.patch = image_size, patch
        n_tokens = (image_size // patch) ** 2 + 1
        if n_tokens != cfg.seq_len:
            raise ValueError(f"seq_len={cfg.seq_len} must be the patch count + 1 = {n_tokens}")
        self.embed = nnx.Linear(patch * patch, cfg.d_model, rngs=rngs)
        self.cls = nnx.Param(jnp.zeros((1, 1, cfg.d_model)))
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, n_tokens, cfg.d_model)))
        self.blocks = nnx.List([Block(cfg.n_head, cfg.d_model, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, n_classes, rngs=rngs)

    def __call__(self, x_BxSxS: Float[Array, "B S S"]) -> Float[Array, "B classes"]:
        batch, s, s2 = x_BxSxS.shape
        if (s, s2) != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got shape {x_BxSxS.shape}")
        g, p = s // self.patch, self.patch
        patches_BxPxQ = x_BxSxS.reshape(batch, g, p, g, p).transpose(0, 1, 3, 2, 4).reshape(batch, g * g, -1)
        tokens_BxPxD = self.embed(patches_BxPxQ)
        cls_Bx1xD = jnp.broadcast_to(self.cls[...], (batch, 1, tokens_BxPxD.shape[-1]))
        x_BxTxD = jnp.concatenate([cls_Bx1xD, tokens_BxPxD], axis=1) + self.pos[...]
        x_BTxD = x_BxTxD.reshape(batch * x_BxTxD.shape[1], -1)
        for block in self.blocks:
            x_BTxD = block(x_BTxD, batch)
        return self.head(self.ln_f(x_BTxD.reshape(batch, -1, x_BTxD.shape[-1])[:, 0]))


def dataset_config(cfg: Config, dataset: str) -> Config:
    """``cfg`` with ``seq_len`` (patches + class token) and ``corpus`` set for ``dataset``."""
    size, patch = DATASETS[dataset]
    return dataclasses.replace(cfg, seq_len=(size // patch) ** 2 + 1, corpus=dataset)


def build_model(cfg: Config, recipe: methods.Recipe, seed: int) -> ViT:
    """The ViT of ``cfg`` for ``cfg.corpus`` (see `dataset_config`), its MLPs ``recipe``'s layers."""
    size, patch = DATASETS[cfg.corpus]
    return methods.sparsify(ViT(cfg, size, patch, 10, rngs=nnx.Rngs(params=seed)), recipe, seed=seed)


def classification_loss(model: ViT, x_BxSxS, y_B) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x_BxSxS).astype(jnp.float32), y_B).mean()


def _batch(x, y, step: int, batch_size: int, seed: int):
    """One micro-batch ``(1, B, ...)``: indices drawn without replacement, a function of (seed, step)."""
    idx = np.random.default_rng([seed, step]).choice(len(y), batch_size, replace=False)
    return x[idx][None], y[idx][None]


@nnx.jit
def _predict(model: ViT, x_BxSxS):
    return jnp.argmax(model(x_BxSxS), -1)


def _accuracy(model: ViT, x, y, chunk: int = 1000) -> float:
    """Top-1 accuracy in chunks of ``chunk`` images, the last one zero-padded (one compilation)."""
    x = np.concatenate([x, np.zeros((-len(y) % chunk, *x.shape[1:]), x.dtype)])
    preds = [_predict(model, x[i: i + chunk]) for i in range(0, len(x), chunk)]
    return float(np.mean(np.concatenate(jax.device_get(preds))[: len(y)] == y))


def train(cfg: Config, method: str, seed: int, data, metrics_path: pathlib.Path, **recipe_changes) -> dict:
    """Trains one run, appends its records to ``metrics_path``; returns the final record.

    Every log step records the means of the train-step metrics (loss, flip rate, ...) since the last
    one, and the layers' mean β and zero fraction; every eval step also the test top-1.
    ``recipe_changes`` change fields of the method's `methods.Recipe` (e.g. ``refit_beta_every=23``).
    """
    x_train, y_train, x_test, y_test = data
    recipe = methods.get_recipe(method, **recipe_changes)
    model = build_model(cfg, recipe, seed)
    phases = methods.phases(model, recipe)
    tx = methods.make_optimizer(cfg, model, recipe)
    train_step = methods.make_train_step(classification_loss, phases, tx, recipe, cfg.steps)

    began, last = time.perf_counter(), {}

    def on_log(step, state, means):
        model = methods.current_model(phases, recipe, cfg.steps, state)
        record = {"method": method, "seed": seed, "step": step, **means, **methods.layer_means(model)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record["test_top1"] = _accuracy(model, x_test, y_test)
        append_record(metrics_path, record)
        last.update(record)

    state = methods.fit(train_step, methods.initial_state(model, tx),
                        lambda i: _batch(x_train, y_train, i, cfg.batch_size, seed), cfg.steps, cfg.log_every, on_log)
    model = methods.current_model(phases, recipe, cfg.steps, state)
    final = {"method": method, "seed": seed, "final": True, "steps": cfg.steps, "train_loss": last["train_loss"],
             "train_top1": _accuracy(model, x_train, y_train), "test_top1": last["test_top1"],
             "seconds": time.perf_counter() - began, **recipe_changes}
    append_record(metrics_path, final)
    return final


def summarize(runs: dict[str, dict[int, list[dict]]]) -> dict[str, dict[str, list[float]]]:
    """Per method, one value per seed: final test top-1 (%), train loss and the late flip rate over
    dense's (`experiments.report.summarize_finals`)."""
    out = summarize_finals(runs, ("test_top1", "train_loss"))
    for row in out.values():
        row["test_top1"] = [100 * a for a in row["test_top1"]]
    return out


def table(summary: dict[str, dict[str, list[float]]]) -> str:
    """The Markdown table of a `summarize` result, one row per key (method name or label)."""
    lines = ["| method | test top-1 (%) | per seed | final train loss | flip rate, last ¼ (× dense) |",
             "|---|---|---|---|---|"]
    for name, row in summary.items():
        seeds = ", ".join(f"{a:.1f}" for a in row["test_top1"])
        flips = format_spread(row["flip_ratio"], 3) if "flip_ratio" in row else ""
        lines.append(f"| {name} | {format_spread(row['test_top1'], 1)} | {seeds} | {format_spread(row['train_loss'], 4)} | {flips} |")
    return "\n".join(lines) + "\n\nMean ± half the range over seeds; flip-rate ratios are paired by seed (same batches).\n"


def epoch_steps(n_train: int, batch_size: int) -> int:
    """Steps per pass over ``n_train`` examples: the period of the β-recomputation ablation."""
    return math.ceil(n_train / batch_size)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="small", choices=sorted(CONFIGS))
    p.add_argument("--dataset", default="digits", choices=sorted(DATASETS))
    p.add_argument("--data-dir", help="Fashion-MNIST's idx files (default: fetched into the cache)")
    p.add_argument("--cache-dir", help="data cache (default $SSTE_CACHE or ~/.cache/sste_jax)")
    p.add_argument("--methods", default="dense,srste,sste", help="comma-separated, from " + ",".join(methods.METHODS))
    p.add_argument("--steps", type=int, help="training steps (overrides the config)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--out", help="output directory (default results/vision_<dataset>_<config>)")
    args = p.parse_args(argv)
    names = args.methods.split(",")
    unknown = [m for m in names if m not in methods.METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}: use some of {list(methods.METHODS)}")
    if args.data_dir and args.dataset != "fashion":
        p.error("--data-dir is for --dataset fashion")
    cfg = dataset_config(CONFIGS[args.config], args.dataset)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    data = load_data(args.dataset, args.data_dir, args.cache_dir)
    out = pathlib.Path(args.out or f"results/vision_{args.dataset}_{args.config}")
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    finals = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in names:
            finals.append(train(cfg, method, seed, data, metrics_path))
            print(f"{method} seed {seed}: test top-1 {100 * finals[-1]['test_top1']:.1f}% "
                  f"in {finals[-1]['seconds']:.0f} s", flush=True)
    runs = group_runs(read_records(metrics_path))
    command = "python -m experiments.vision " + " ".join(argv if argv is not None else sys.argv[1:])
    title = f"ViT on {args.dataset}, config `{args.config}`, {cfg.steps} steps. Command: `{command}`\n\n"
    text = table(summarize(runs))
    (out / "table.md").write_text(title + text)
    caption = f"ViT on {args.dataset}, mean over seeds {args.seeds}"
    plot_curves(runs, "test_top1", out / "top1.png", "test top-1 accuracy (2:4 weights)", title=caption)
    plot_curves(runs, "flip_rate", out / "flip_rate.png", "mask flip rate per step", log=True, title=caption)
    print(text)
    return finals


if __name__ == "__main__":
    main()
