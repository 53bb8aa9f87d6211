"""Trains a GPT-2 with one sparsity method; metrics as JSON lines, orbax checkpoints, resumable.

    python -m experiments.train_lm --config small --method sste --steps 600 --workdir runs/sste

Methods: the recipes of `experiments.methods` (``dense``, ``ste``, ``srste``, ``tsrste``,
``tsrste_df``, ``step``, ``sste``, ``sste_mvue``, ``sste_fp8``, ``sste_mvue_fp8`` and the β ablations;
``--recipe KEY=VALUE`` changes a field, e.g. ``refit_beta_every=20``). The feed-forward
linears are 2:4 sparse (``--sparsify all``: every linear but the tied LM head); ``dense`` runs keep
them as ``method="dense"`` layers so that their top-2 flip rate is logged as the reference (SPEC §8).
``--ffn-lr-scale beta`` multiplies the sparse layers' learning rate by the mean β S-STE would fit at
initialisation: the β-matched dense control. ``--init-from DIR`` starts from the weights of a dense
run's last checkpoint, sparsified now (β fitted to them). Ctrl-C saves a checkpoint and exits;
``--resume`` continues bit-identically (batches are a pure function of (seed, step)).

The workdir holds ``run.json`` (the settings), ``metrics.jsonl`` and ``ckpt/<step>``.
"""

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import sste_jax
from experiments import data, methods
from experiments.configs import Config, get_config, parse_overrides
from experiments.model import GPT
from experiments.report import append_record
from sste_jax import checkpoint
from sste_jax import nnx as sparse_nnx

WHERE = {"ffn": sparse_nnx.feed_forward, "all": sparse_nnx.all_linear}


@dataclasses.dataclass(frozen=True)
class Run:
    """What a training run is, besides its `Config`."""

    method: str = "sste"
    seed: int = 0
    sparsify: str = "ffn"
    ffn_lr_scale: float | str = 1.0  # a factor, or "beta": the mean β fitted at initialisation
    recipe_changes: tuple[tuple[str, Any], ...] = ()  # fields of the method's `methods.Recipe`

    def __post_init__(self):
        self.recipe()  # validates the method and the changes
        if self.sparsify not in WHERE:
            raise ValueError(f"unknown --sparsify {self.sparsify!r}: use one of {sorted(WHERE)}")
        if self.ffn_lr_scale != "beta" and not float(self.ffn_lr_scale) > 0:
            raise ValueError(f"ffn_lr_scale must be 'beta' or a positive number, got {self.ffn_lr_scale!r}")

    def recipe(self) -> methods.Recipe:
        return methods.get_recipe(self.method, **dict(self.recipe_changes))


def build_model(cfg: Config, vocab_size: int, run: Run, weights=None) -> nnx.Module:
    """The GPT of ``cfg`` with ``run.method`` layers; ``weights`` (an ``nnx.Param`` state) replaces
    the initial weights before sparsifying, so β is fitted to them."""
    vocab = -(-vocab_size // 64) * 64  # pad the embedding as nanoGPT does (50257 -> 50304)
    model = GPT(vocab, cfg.n_layer, cfg.n_head, cfg.d_model, cfg.seq_len, rngs=nnx.Rngs(params=run.seed))
    if weights is not None:
        nnx.update(model, weights)
    return methods.sparsify(model, run.recipe(), WHERE[run.sparsify], seed=run.seed)


def lr_scale(run: Run, model: nnx.Module) -> float:
    """``run.ffn_lr_scale`` as a number; ``"beta"``: mean β of S-STE on this initial model."""
    if run.ffn_lr_scale != "beta":
        return float(run.ffn_lr_scale)
    weights = sste_jax.sparse_weights(model)
    return float(np.mean([sste_jax.fit_beta(w.kernel) for w in weights.values()]))


def lm_loss(model: nnx.Module, x_BxT, y_BxT) -> jax.Array:
    """Mean next-token cross entropy (float32 logits)."""
    logits_BTxV = model(x_BxT).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTxV, y_BxT.reshape(-1)).mean()


def make_eval(graphdef):
    @jax.jit
    def eval_loss(params, rest, x_BxT, y_BxT):
        return lm_loss(nnx.merge(graphdef, params, rest), x_BxT, y_BxT)

    return eval_loss


class Programs(NamedTuple):
    """The optimizer and jitted functions of a (config, run) pair, shared by runs in one process."""

    phases: methods.Phases
    tx: optax.GradientTransformation
    train_step: Any
    eval_fns: tuple[Any, ...]  # per phase
    eval_dense_fn: Any  # the dense-W evaluation of S-STE runs, else None


@functools.lru_cache(maxsize=8)
def programs(cfg: Config, vocab_size: int, run: Run, scale: float) -> Programs:
    model = nnx.eval_shape(lambda: build_model(cfg, vocab_size, run))
    recipe = run.recipe()
    phases = methods.phases(model, recipe)
    tx = methods.make_optimizer(cfg, model, recipe, scale)
    dense_eval = make_eval(methods.dense_w_graphdef(model)) if recipe.config.method == "sste" else None
    return Programs(phases, tx, methods.make_train_step(lm_loss, phases, tx, recipe, cfg.steps),
                    tuple(map(make_eval, phases.graphdefs)), dense_eval)


def initial_state(cfg: Config, vocab_size: int, run: Run, weights=None):
    """``(programs, state, model)`` at step 0."""
    model = build_model(cfg, vocab_size, run, weights)
    prog = programs(cfg, vocab_size, dataclasses.replace(run, seed=0), lr_scale(run, model))
    return prog, methods.initial_state(model, prog.tx), model


def _dense_weights(init_from: pathlib.Path, cfg: Config, vocab_size: int, sparsify: str):
    """The ``nnx.Param`` state of the last checkpoint of the dense run in ``init_from``."""
    info = json.loads((init_from / "run.json").read_text()) if (init_from / "run.json").exists() else {}
    if info.get("method", "dense") != "dense":
        raise ValueError(f"--init-from {init_from}: that run's method is {info['method']!r}, not 'dense'")
    dense = Run(method="dense", sparsify=info.get("sparsify", sparsify), ffn_lr_scale=info.get("ffn_lr_scale", 1.0))
    _, target, _ = initial_state(cfg, vocab_size, dense)
    return checkpoint.restore_checkpoint(init_from / "ckpt", target)["params"]


def _keep_until(path: pathlib.Path, step: int) -> None:
    """Drops metric records after ``step`` (a resumed run writes them again)."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def _batch(tokens, step: int, cfg: Config, seed: int):
    pairs = [data.batch_at(tokens, step * cfg.grad_accum + a, cfg.batch_size, cfg.seq_len, seed)
             for a in range(cfg.grad_accum)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def evaluate(prog: Programs, run: Run, state, val, cfg: Config) -> dict:
    """Validation loss with the forward weights of the current phase (2:4 for sparse methods), for
    S-STE also with the dense ``W``, and the layers' `sste_jax.sparsity_stats`."""
    batches = list(data.eval_batches(val, cfg.batch_size, cfg.seq_len, cfg.eval_batches))
    phase = methods.current_phase(run.recipe(), cfg.steps, state)
    eval_fn = prog.eval_fns[phase]
    out = {"val_loss": jnp.mean(jnp.stack([eval_fn(state["params"], state["rest"], x, y) for x, y in batches]))}
    if prog.eval_dense_fn is not None:
        out["val_loss_dense_w"] = jnp.mean(
            jnp.stack([prog.eval_dense_fn(state["params"], state["rest"], x, y) for x, y in batches])
        )
    model = nnx.merge(prog.phases.graphdefs[phase], state["params"], state["rest"])
    out.update(sste_jax.sparsity_stats(sste_jax.sparse_weights(model)))
    return out


def train(
    cfg: Config,
    run: Run,
    workdir: str | pathlib.Path,
    *,
    resume: bool = False,
    init_from: str | pathlib.Path | None = None,
    until: int | None = None,
    cache_dir: str | pathlib.Path | None = None,
    progress: bool = True,
):
    """Trains ``cfg.steps`` steps (or up to ``until``) and returns the final training state."""
    workdir = pathlib.Path(workdir)
    ckpt_dir, metrics_path = workdir / "ckpt", workdir / "metrics.jsonl"
    if not resume and (checkpoint.checkpoint_steps(ckpt_dir) or metrics_path.exists()):
        raise FileExistsError(f"{workdir} already holds a run: pass --resume, or choose another --workdir")
    corpus = data.load_corpus(cfg.corpus, cache_dir)
    tokenizer = data.get_tokenizer(cfg.tokenizer)
    train_tokens, val_tokens = data.token_splits(corpus, tokenizer, cache_dir)
    weights = _dense_weights(pathlib.Path(init_from), cfg, tokenizer.vocab_size, run.sparsify) if init_from else None
    prog, state, model = initial_state(cfg, tokenizer.vocab_size, run, weights)
    if resume and checkpoint.checkpoint_steps(ckpt_dir):
        state = checkpoint.restore_checkpoint(ckpt_dir, state)
    start = int(state["step"])
    workdir.mkdir(parents=True, exist_ok=True)
    _keep_until(metrics_path, start)
    settings = {"config": dataclasses.asdict(cfg), **dataclasses.asdict(run), "sparse_lr_scale": lr_scale(run, model),
                "init_from": str(init_from or "")}
    (workdir / "run.json").write_text(json.dumps(settings, indent=1) + "\n")

    stop = min(cfg.steps, until) if until is not None else cfg.steps
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    pending, tick, paused, last_saved = [], time.perf_counter(), 0.0, start
    bar = tqdm(total=stop, initial=start, disable=not progress, desc=run.method, dynamic_ncols=True)
    step = start
    try:
        for step in range(start + 1, stop + 1):
            state, metrics = prog.train_step(state, *_batch(train_tokens, step - 1, cfg, run.seed))
            pending.append(metrics)
            bar.update()
            if step % cfg.log_every == 0 or step == stop:
                logged = jax.device_get(pending)  # the loop's only wait on the device, with evaluation
                now = time.perf_counter()
                record = {"step": step, **{k: float(np.mean([m[k] for m in logged])) for k in logged[0]},
                          "tokens_per_s": len(logged) * tokens_per_step / (now - tick - paused)}
                append_record(metrics_path, record)
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                pending = []
                if step % cfg.eval_every == 0 or step == stop:
                    evals = sste_jax.to_host(evaluate(prog, run, state, val_tokens, cfg))
                    betas = [v for k, v in evals.items() if k.startswith("beta/")]
                    append_record(metrics_path, {"step": step, **evals, "beta_mean": float(np.mean(betas))})
                tick, paused = time.perf_counter(), 0.0
            if step % cfg.ckpt_every == 0 or step == stop:
                began = time.perf_counter()
                checkpoint.save_checkpoint(ckpt_dir, step, state, max_to_keep=cfg.keep_checkpoints)
                last_saved, paused = step, paused + time.perf_counter() - began
    except KeyboardInterrupt:
        done = int(state["step"])
        if done > last_saved:
            checkpoint.save_checkpoint(ckpt_dir, done, state, max_to_keep=cfg.keep_checkpoints)
        bar.close()
        print(f"\ninterrupted: saved step {done} in {ckpt_dir}; continue with --resume", file=sys.stderr)
        raise
    bar.close()
    return state


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="small")
    p.add_argument("--method", default="sste", choices=sorted(methods.METHODS))
    p.add_argument("--recipe", nargs="*", default=[], metavar="KEY=VALUE",
                   help="method recipe changes, e.g. refit_beta_every=20 (see experiments.methods.Recipe)")
    p.add_argument("--steps", type=int, help="training steps (overrides the config)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. lr=3e-3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", choices=["shakespeare", "synthetic"])
    p.add_argument("--tokenizer", choices=["gpt2", "byte"])
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--sparsify", default="ffn", choices=sorted(WHERE))
    p.add_argument("--ffn-lr-scale", default="1.0", help="LR factor of the sparse layers, or 'beta'")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-from", help="workdir of a dense run whose last checkpoint to start from")
    p.add_argument("--until", type=int, help="stop (with a checkpoint) after this step")
    p.add_argument("--cache-dir", default=None, help="data cache (default $SSTE_CACHE or ~/.cache/sste_jax)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    overrides = list(args.set)
    for key, value in (("steps", args.steps), ("corpus", args.corpus), ("tokenizer", args.tokenizer),
                       ("grad_accum", args.grad_accum)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = get_config(args.config, overrides)
    scale = args.ffn_lr_scale if args.ffn_lr_scale == "beta" else float(args.ffn_lr_scale)
    changes = tuple(parse_overrides(methods.Recipe, args.recipe).items())
    run = Run(method=args.method, seed=args.seed, sparsify=args.sparsify, ffn_lr_scale=scale, recipe_changes=changes)
    cache = args.cache_dir or data.cache_dir_default()
    try:
        train(cfg, run, args.workdir, resume=args.resume, init_from=args.init_from, until=args.until,
              cache_dir=cache, progress=not args.quiet)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
