"""Trains a GPT-2 with one sparsity method: metrics as JSON lines, orbax checkpoints, resumable.

    python -m experiments.lm.train --config capacity --method sste --workdir runs/sste

Methods: the recipes of `experiments.common.recipes` (``--recipe KEY=VALUE`` changes a field; STEP
starts from the config's piloted switch, `experiments.lm.configs.STEP_RECIPE`). The
feed-forward linears are 2:4 sparse (``--sparsify all``: every linear but the tied LM head);
``dense`` runs keep them as ``method="dense"`` layers so their top-2 flip rate is logged as the
reference. ``--sparse-lr-scale beta`` multiplies the sparse layers' learning rate by the mean β
S-STE would fit at initialisation (the β-matched dense control). ``--init-from DIR`` starts from the
weights of a dense run's last checkpoint, sparsified now (β fitted to them). The loop is
`experiments.common.loop.fit`: Ctrl-C or SIGTERM saves a checkpoint, ``--resume`` continues
bit-identically, and a work directory holding other settings is refused. Several processes
(``--num-processes``/``--coordinator``/``--process-id`` or the environment, see
`experiments.common.distributed`; ``python -m experiments.launch`` starts them locally) train one
model on a global mesh.
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sste_jax
from experiments.common import cache, cli, distributed, flags, loop
from experiments.common.config import Config, LoopConfig, ModelConfig, OptimConfig
from experiments.common.recipes import ALL, FEED_FORWARD, make_optimizer, sparsify
from experiments.common.records import BadFileError
from experiments.common.schedule import Schedule
from experiments.lm import data
from experiments.lm.configs import CONFIGS, LMData, get_config, recipe_defaults
from experiments.lm.model import GPT
from sste_jax import checkpoint

WHERE = {"ffn": FEED_FORWARD, "all": ALL}


def make_run(cfg: Config, method: str, seed: int = 0, *, sparsify_: str = "ffn", sparse_lr_scale: float = 1.0,
             recipe_changes=(), init_from: str = "") -> loop.Run:
    """The `loop.Run` of one LM training."""
    if sparsify_ not in WHERE:
        raise ValueError(f"sparsify={sparsify_!r}: use one of {sorted(WHERE)}")
    return loop.Run("lm", method, seed, cfg, tuple(recipe_changes),
                    (("sparsify", sparsify_), ("init_from", str(init_from or ""))), float(sparse_lr_scale))


def stored_run(workdir: str | pathlib.Path) -> loop.Run:
    """The `loop.Run` of the language-model run in ``workdir``, from its ``run.json``; `BadFileError`
    naming that file when it does not describe one."""
    identity = loop.read_identity(workdir)
    path = pathlib.Path(workdir) / "run.json"
    if identity["task"] != "lm":
        raise BadFileError(f"{path}: a {identity['task']!r} run, not a language model ('lm')")
    try:
        c, options = identity["config"], identity["options"]
        cfg = Config(ModelConfig(**c["model"]), LMData(**c["data"]), OptimConfig(**c["optim"]), LoopConfig(**c["loop"]))
        return make_run(cfg, identity["method"], identity["seed"], sparsify_=options["sparsify"],
                        sparse_lr_scale=identity["sparse_lr_scale"], recipe_changes=tuple(identity["recipe"].items()),
                        init_from=options["init_from"])
    except (TypeError, ValueError, KeyError) as e:
        raise BadFileError(f"{path}: not the identity of a language-model run ({type(e).__name__}: {e})") from None


def build_model(run: loop.Run, vocab_size: int, weights=None) -> nnx.Module:
    """The GPT of ``run.config`` with ``run.method`` layers; ``weights`` (an ``nnx.Param`` state)
    replaces the initial weights before sparsifying, so β is fitted to them."""
    m = run.config.model
    vocab = -(-vocab_size // 64) * 64  # pad the embedding as nanoGPT does (50257 -> 50304)
    model = GPT(vocab, m.n_layer, m.n_head, m.d_model, m.seq_len, rngs=nnx.Rngs(params=run.seed))
    if weights is not None:
        nnx.update(model, weights)
    return sparsify(model, run.recipe(), WHERE[dict(run.options)["sparsify"]], seed=run.seed)


def beta_lr_scale(cfg: Config, seed: int, vocab_size: int, sparsify_: str = "ffn") -> float:
    """The mean β S-STE fits to the initial model of ``seed``: the β-matched dense control's LR factor."""
    model = build_model(make_run(cfg, "dense", seed, sparsify_=sparsify_), vocab_size)
    return float(np.mean([sste_jax.fit_beta(w.kernel) for w in sste_jax.sparse_weights(model).values()]))


def load_run(workdir: str | pathlib.Path) -> tuple[GPT, data.Tokenizer, loop.Run]:
    """``(model, tokenizer, run)`` of a language-model run: its GPT holding the newest checkpoint that
    verifies, in the phase that checkpoint trains (e.g. STEP's hard 2:4 after its switch, dense for the
    last part of ``tsrste_df``)."""
    workdir = pathlib.Path(workdir)
    run = stored_run(workdir)
    cfg = run.config
    tokenizer = data.get_tokenizer(cfg.data.tokenizer)
    model = build_model(run, tokenizer.vocab_size)
    target = loop.initial_state(model, make_optimizer(cfg.optim, model, run.recipe(), run.sparse_lr_scale))
    _, state = checkpoint.restore_latest(workdir / "ckpt", target)
    return Schedule(model, run.recipe(), cfg.optim.steps).model(state), tokenizer, run


def lm_loss(model: nnx.Module, x_BxT, y_BxT) -> jax.Array:
    """Mean next-token cross entropy (float32 logits)."""
    logits_BTxV = model(x_BxT).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTxV, y_BxT.reshape(-1)).mean()


def make_task(cfg: Config, seed: int, train_tokens, val_tokens) -> loop.Task:
    """Batches a function of (seed, step); validation loss on fixed windows of the held-out works."""
    o = cfg.optim
    val = list(data.eval_batches(val_tokens, o.batch_size, cfg.model.seq_len, cfg.data.eval_batches))
    eval_loss = jax.jit(lambda graphdef, state, x, y: lm_loss(nnx.merge(graphdef, state), x, y), static_argnums=0)

    def batch_at(i):
        pairs = [data.batch_at(train_tokens, i * o.grad_accum + a, o.batch_size, cfg.model.seq_len, seed)
                 for a in range(o.grad_accum)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def evaluate(model):
        graphdef, state = nnx.split(model)
        return {"val_loss": float(jnp.mean(jnp.stack([eval_loss(graphdef, state, x, y) for x, y in val])))}

    return loop.Task(lm_loss, batch_at, evaluate, eval_dense_w=True)


def _dense_weights(init_from: pathlib.Path, run: loop.Run, vocab_size: int):
    """The ``nnx.Param`` state of the last checkpoint of the dense run in ``init_from``."""
    stored = stored_run(init_from)
    if stored.method != "dense":
        raise ValueError(f"--init-from {init_from}: that run's method is {stored.method!r}, not 'dense'")
    dense = make_run(run.config, "dense", run.seed, sparsify_=dict(stored.options)["sparsify"],
                     sparse_lr_scale=stored.sparse_lr_scale)
    model = build_model(dense, vocab_size)
    target = loop.initial_state(model, make_optimizer(run.config.optim, model, dense.recipe(), dense.sparse_lr_scale))
    return checkpoint.restore_checkpoint(init_from / "ckpt", target)["params"]


def train(run: loop.Run, workdir, *, resume: bool = False, until: int | None = None, cache_dir=None,
          progress: bool = True, mesh=None) -> dict:
    """Trains ``run`` in ``workdir`` (`loop.fit`, on ``mesh``) and returns the final training state."""
    cfg = run.config
    corpus = data.load_corpus(cfg.data.corpus, cache_dir)
    tokenizer = data.get_tokenizer(cfg.data.tokenizer, cache_dir)
    train_tokens, val_tokens = data.token_splits(corpus, tokenizer, cache_dir)
    init_from = dict(run.options)["init_from"]
    weights = _dense_weights(pathlib.Path(init_from), run, tokenizer.vocab_size) if init_from else None
    model = build_model(run, tokenizer.vocab_size, weights)
    task = make_task(cfg, run.seed, train_tokens, val_tokens)
    return loop.fit(run, workdir, task, model, resume=resume, until=until, progress=progress, mesh=mesh)


def _lr_scale(text: str) -> float | str:
    return text if text == "beta" else flags.number(above=0)(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_run_args(p, CONFIGS, "capacity")
    p.add_argument("--sparsify", default="ffn", choices=sorted(WHERE))
    p.add_argument("--sparse-lr-scale", type=_lr_scale, default=1.0, help="LR factor of the sparse layers, or 'beta'")
    p.add_argument("--init-from", help="workdir of a dense run whose last checkpoint to start from")
    cli.add_distributed_args(p)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        distributed.initialize_from(args)
        mesh = distributed.make_mesh(args.mesh)
        cfg = get_config(args.config, args.set)
        recipe = tuple(sorted({**dict(recipe_defaults(args.config, args.method)),
                               **dict(cli.parse_recipe(args.recipe))}.items()))
        if args.sparse_lr_scale == "beta":
            vocab_size = data.get_tokenizer(cfg.data.tokenizer, args.cache_dir).vocab_size
            scale = beta_lr_scale(cfg, args.seed, vocab_size, args.sparsify)
        else:
            scale = args.sparse_lr_scale
        run = make_run(cfg, args.method, args.seed, sparsify_=args.sparsify, sparse_lr_scale=scale,
                       recipe_changes=recipe, init_from=args.init_from or "")
    except ValueError as e:
        sys.exit(f"error: {e}")
    cli.train_or_exit(lambda: train(run, args.workdir, resume=args.resume, until=args.until,
                                cache_dir=args.cache_dir or cache.cache_dir_default(), progress=not args.quiet,
                                mesh=mesh))


if __name__ == "__main__":
    main()
