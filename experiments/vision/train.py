"""Trains the ViT with one sparsity method: metrics as JSON lines, orbax checkpoints, resumable.

    python -m experiments.vision.train --config small --method sste --workdir runs/vit_sste
    python -m experiments.vision.train --config small --set dataset=fashion --method sste --workdir runs/vit_f

Methods: the recipes of `experiments.common.recipes` (``--recipe KEY=VALUE`` changes a field). The
MLP linears of every block are 2:4 sparse; ``dense`` runs keep them as ``method="dense"`` layers so
their flip rate is logged as the reference. Data (`experiments.vision.data`): digits, or
Fashion-MNIST fetched into the cache (``--cache-dir``) unless ``--data-dir`` names its idx folder;
neither flag enters the run's identity. Batches are a pure function of (seed, step). Evaluations log
the test top-1 accuracy with the 2:4 forward weights; the final record adds the train top-1. The
loop is `experiments.common.loop.fit`: Ctrl-C or SIGTERM saves a checkpoint, ``--resume`` continues
bit-identically, and a work directory holding other settings is refused.
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.common import cli, loop
from experiments.common.config import Config
from experiments.common.recipes import Recipe, sparsify
from experiments.vision.configs import CONFIGS, get_config
from experiments.vision.data import DATASETS, load_data
from experiments.vision.model import ViT

N_CLASSES = 10


def make_run(cfg: Config, method: str, seed: int = 0, *, recipe_changes=()) -> loop.Run:
    """The `loop.Run` of one vision training."""
    return loop.Run("vision", method, seed, cfg, tuple(recipe_changes))


def build_model(cfg: Config, recipe: Recipe, seed: int) -> ViT:
    """The ViT of ``cfg`` for ``cfg.data.dataset``, its MLPs ``recipe``'s layers."""
    size, patch = DATASETS[cfg.data.dataset]
    return sparsify(ViT(cfg.model, size, patch, N_CLASSES, rngs=nnx.Rngs(params=seed)), recipe, seed=seed)


def classification_loss(model: ViT, x_BxSxS, y_B) -> jax.Array:
    """Mean cross entropy of the class logits (float32)."""
    return optax.softmax_cross_entropy_with_integer_labels(model(x_BxSxS).astype(jnp.float32), y_B).mean()


def _batch(x, y, index: int, batch_size: int, seed: int):
    """One micro-batch: ``batch_size`` indices drawn without replacement, a function of (seed, index)."""
    idx = np.random.default_rng([seed, index]).choice(len(y), batch_size, replace=False)
    return x[idx], y[idx]


@nnx.jit
def _predict(model: ViT, x_BxSxS):
    return jnp.argmax(model(x_BxSxS), -1)


def accuracy(model: ViT, x, y, chunk: int = 1000) -> float:
    """Top-1 accuracy in chunks of ``chunk`` images, the last one zero-padded (one compilation)."""
    x = np.concatenate([x, np.zeros((-len(y) % chunk, *x.shape[1:]), x.dtype)])
    preds = [_predict(model, x[i: i + chunk]) for i in range(0, len(x), chunk)]
    return float(np.mean(np.concatenate(jax.device_get(preds))[: len(y)] == y))


def make_task(cfg: Config, seed: int, data) -> loop.Task:
    """Batches ``(A, B, S, S), (A, B)`` as a function of (seed, step) (``A`` = ``grad_accum``, micro-batch
    ``a`` of step ``i + 1`` drawn with index ``i * A + a``); evaluation: ``test_top1``; final: ``train_top1``."""
    x_train, y_train, x_test, y_test = data
    o = cfg.optim
    if o.batch_size > len(y_train):
        raise ValueError(f"batch_size={o.batch_size}: the training split has only {len(y_train)} images")

    def batch_at(i):
        pairs = [_batch(x_train, y_train, i * o.grad_accum + a, o.batch_size, seed) for a in range(o.grad_accum)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    return loop.Task(classification_loss, batch_at, lambda model: {"test_top1": accuracy(model, x_test, y_test)},
                     finish=lambda model: {"train_top1": accuracy(model, x_train, y_train)})


def train(run: loop.Run, workdir, *, resume: bool = False, until: int | None = None, data=None, data_dir=None,
          cache_dir=None, progress: bool = True) -> dict:
    """Trains ``run`` in ``workdir`` (`loop.fit`) and returns the final training state. ``data``: the
    `load_data` arrays, if already loaded (else loaded from ``data_dir`` or the cache)."""
    cfg = run.config
    data = data if data is not None else load_data(cfg.data.dataset, data_dir, cache_dir)
    model = build_model(cfg, run.recipe(), run.seed)
    return loop.fit(run, workdir, make_task(cfg, run.seed, data), model, resume=resume, until=until,
                    progress=progress)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_run_args(p, CONFIGS, "small")
    p.add_argument("--data-dir", help="Fashion-MNIST's idx files (default: fetched into the cache)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        cfg = get_config(args.config, args.set)
        run = make_run(cfg, args.method, args.seed, recipe_changes=cli.parse_recipe(args.recipe))
        if args.data_dir and cfg.data.dataset != "fashion":
            raise ValueError("--data-dir is for dataset=fashion (--set dataset=fashion)")
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        data = load_data(cfg.data.dataset, args.data_dir, args.cache_dir)
    except (RuntimeError, OSError, ValueError) as e:  # a failed fetch names its command; a bad idx folder
        sys.exit(f"error: {e}")
    cli.train_or_exit(lambda: train(run, pathlib.Path(args.workdir), resume=args.resume, until=args.until, data=data,
                                progress=not args.quiet))


if __name__ == "__main__":
    main()
