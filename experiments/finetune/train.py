"""Fine-tunes one pre-trained language model on the Austen task with its own method: metrics as
JSON lines, orbax checkpoints, resumable.

    python -m experiments.finetune.train --method sste --init-from runs/lm_capacity/sste_lr0.0085_s0 \\
        --workdir runs/finetune_sste_s0
    python -m experiments.finetune.train --method dense --workdir runs/finetune_scratch_s0   # no pre-training

``--init-from`` names a finished language-model run (`experiments.lm.train`) of the same method and
of the config's ``pretrained`` LM config: its last checkpoint's weights and layer state (β, MVUE
keys) are restored, so a 2:4 model stays 2:4 with its own method (S-STE keeps its frozen β) and a
dense one dense. Without it the GPT starts from the initial weights of ``--seed``. A zero-initialised
linear head reads the mean of the GPT's final features (`experiments.finetune.model`). The run's
identity holds the starting run's folder and identity hash, so a folder trained from another
pre-training is refused. Evaluations log validation accuracy and loss on fixed windows of the
held-out chapters; the loop is `experiments.common.loop.fit` (Ctrl-C saves, ``--resume`` continues
bit-identically).
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
from experiments.common.config import Config, identity_hash
from experiments.common.recipes import make_optimizer
from experiments.finetune import data
from experiments.finetune.configs import CONFIGS, get_config
from experiments.finetune.model import Classifier
from experiments.lm import train as lm_train
from experiments.lm.configs import get_config as lm_config
from sste_jax import checkpoint

VOCAB = 256  # byte-level


def make_run(cfg: Config, method: str, seed: int = 0, *, init_from: str | pathlib.Path = "") -> loop.Run:
    """The `loop.Run` of one fine-tuning; ``init_from`` (checked to be a run of ``method`` on the
    config's model, without phases) and its identity hash are its options."""
    started = ""
    if init_from:
        stored = lm_train.stored_run(init_from)
        recipe = stored.recipe()
        if stored.method != method:
            raise ValueError(f"--init-from {init_from}: a {stored.method!r} run; fine-tune it with --method "
                             f"{stored.method}")
        if stored.config.model != cfg.model or recipe.optimizer != "adamw" or recipe.dense_finish:
            raise ValueError(f"--init-from {init_from}: its model ({stored.config.model}) or its method's phases "
                             f"(STEP, dense finish) cannot start this config ({cfg.model})")
        started = identity_hash(loop.read_identity(init_from))
    return loop.Run("finetune", method, seed, cfg, (), (("init_from", str(init_from or "")), ("init_hash", started)))


def pretrained_gpt(run: loop.Run) -> nnx.Module:
    """The GPT to fine-tune: the starting run's final weights and layer state (β, MVUE keys), or a
    fresh one of ``run.seed``."""
    init_from = dict(run.options)["init_from"]
    if not init_from:
        return lm_train.build_model(lm_train.make_run(lm_config(run.config.data.pretrained), run.method, run.seed),
                                    VOCAB)
    stored = lm_train.stored_run(init_from)
    model = lm_train.build_model(stored, VOCAB)
    tx = make_optimizer(stored.config.optim, model, stored.recipe(), stored.sparse_lr_scale)
    steps = stored.config.optim.steps
    folder = pathlib.Path(init_from) / "ckpt"
    if steps not in checkpoint.checkpoint_steps(folder):
        raise ValueError(f"--init-from {init_from}: no checkpoint of its last step {steps} (has it finished?)")
    state = checkpoint.restore_checkpoint(folder, loop.initial_state(model, tx), step=steps)
    nnx.update(model, state["params"], state["rest"])
    return model


def classification_loss(model: Classifier, x_BxL, y_B) -> jax.Array:
    """Mean cross entropy of the class logits (float32)."""
    return optax.softmax_cross_entropy_with_integer_labels(model(x_BxL).astype(jnp.float32), y_B).mean()


@jax.jit(static_argnums=0)
def _eval_sums(graphdef, state, x_BxL, y_B):
    """Summed loss and correct count of one chunk; rows labelled -1 (padding) count in neither."""
    logits_BxC = nnx.merge(graphdef, state)(x_BxL).astype(jnp.float32)
    loss_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, jnp.maximum(y_B, 0))
    return jnp.where(y_B >= 0, loss_B, 0.0).sum(), (jnp.argmax(logits_BxC, -1) == y_B).sum()


def make_task(cfg: Config, seed: int, split: data.Split) -> loop.Task:
    """Batches ``(A, B, L), (A, B)`` as a function of (seed, step); evaluation: ``val_acc`` and ``val_loss``
    on `data.eval_windows`, in chunks of the batch size (the last one padded)."""
    o, length = cfg.optim, cfg.model.seq_len
    x_NxL, y_N = data.eval_windows(split, length, cfg.data.eval_per_class)
    pad = -len(y_N) % o.batch_size
    x_NxL = np.concatenate([x_NxL, np.zeros((pad, length), np.int32)])
    y_padded = np.concatenate([y_N, np.full(pad, -1, np.int32)])

    def batch_at(i):
        pairs = [data.train_batch(split, i * o.grad_accum + a, o.batch_size, length, seed) for a in range(o.grad_accum)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def evaluate(model):
        graphdef, state = nnx.split(model)
        sums = jax.device_get([_eval_sums(graphdef, state, x_NxL[i:i + o.batch_size], y_padded[i:i + o.batch_size])
                               for i in range(0, len(y_padded), o.batch_size)])
        return {"val_acc": float(sum(s[1] for s in sums)) / len(y_N),
                "val_loss": float(sum(s[0] for s in sums)) / len(y_N)}

    return loop.Task(classification_loss, batch_at, evaluate)


def train(run: loop.Run, workdir, *, resume: bool = False, until: int | None = None, cache_dir=None,
          progress: bool = True) -> dict:
    """Fine-tunes ``run`` in ``workdir`` (`loop.fit`) and returns the final training state."""
    cfg = run.config
    split = data.split_chapters(data.load_novels(cfg.data.corpus, cache_dir), cfg.data.val_every)
    model = Classifier(pretrained_gpt(run), len(split.titles))
    return loop.fit(run, workdir, make_task(cfg, run.seed, split), model, resume=resume, until=until,
                    progress=progress)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_run_args(p, CONFIGS, "capacity")
    p.add_argument("--init-from", help="workdir of a finished language-model run of the same method")
    args = p.parse_args(argv)
    if args.recipe:
        p.error("--recipe: fine-tuning keeps the pre-trained run's method as it is")
    try:
        run = make_run(get_config(args.config, args.set), args.method, args.seed, init_from=args.init_from or "")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    cli.train_or_exit(lambda: train(run, args.workdir, resume=args.resume, until=args.until,
                                    cache_dir=args.cache_dir or data.cache_dir_default(), progress=not args.quiet))


if __name__ == "__main__":
    main()
