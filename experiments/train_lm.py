"""Trains a GPT-2 with one sparsity method; metrics as JSON lines, orbax checkpoints, resumable.

    python -m experiments.train_lm --config small --method sste --steps 600 --workdir runs/sste

Methods: ``dense``, ``ste``, ``srste``, ``sste``, ``sste_mvue``, ``sste_mvue_fp8``. The feed-forward
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
from experiments import data
from experiments.configs import Config, get_config
from experiments.model import GPT
from sste_jax import checkpoint
from sste_jax import nnx as sparse_nnx

METHODS = {
    "dense": sste_jax.SparsityConfig(method="dense"),
    "ste": sste_jax.SparsityConfig(method="ste"),
    "srste": sste_jax.SparsityConfig(method="srste"),
    "sste": sste_jax.SparsityConfig(method="sste"),
    "sste_mvue": sste_jax.SparsityConfig(method="sste", mvue=True),
    "sste_mvue_fp8": sste_jax.SparsityConfig(method="sste", mvue=True, fp8=True),
}
WHERE = {"ffn": sparse_nnx.feed_forward, "all": sparse_nnx.all_linear}


@dataclasses.dataclass(frozen=True)
class Run:
    """What a training run is, besides its `Config`."""

    method: str = "sste"
    seed: int = 0
    sparsify: str = "ffn"
    ffn_lr_scale: float | str = 1.0  # a factor, or "beta": the mean β fitted at initialisation

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: use one of {sorted(METHODS)}")
        if self.sparsify not in WHERE:
            raise ValueError(f"unknown --sparsify {self.sparsify!r}: use one of {sorted(WHERE)}")
        if self.ffn_lr_scale != "beta" and not float(self.ffn_lr_scale) > 0:
            raise ValueError(f"ffn_lr_scale must be 'beta' or a positive number, got {self.ffn_lr_scale!r}")


def build_model(cfg: Config, vocab_size: int, run: Run, weights=None) -> nnx.Module:
    """The GPT of ``cfg`` with ``run.method`` layers; ``weights`` (an ``nnx.Param`` state) replaces
    the initial weights before sparsifying, so β is fitted to them."""
    vocab = -(-vocab_size // 64) * 64  # pad the embedding as nanoGPT does (50257 -> 50304)
    model = GPT(vocab, cfg.n_layer, cfg.n_head, cfg.d_model, cfg.seq_len, rngs=nnx.Rngs(params=run.seed))
    if weights is not None:
        nnx.update(model, weights)
    return sparse_nnx.sparsify(model, METHODS[run.method], WHERE[run.sparsify], rngs=nnx.Rngs(sparsity=run.seed))


def lr_scale(run: Run, model: nnx.Module) -> float:
    """``run.ffn_lr_scale`` as a number; ``"beta"``: mean β of S-STE on this initial model."""
    if run.ffn_lr_scale != "beta":
        return float(run.ffn_lr_scale)
    weights = sste_jax.sparse_weights(model)
    return float(np.mean([sste_jax.fit_beta(w.kernel) for w in weights.values()]))


def make_optimizer(cfg: Config, model: nnx.Module, scale: float) -> optax.GradientTransformation:
    """AdamW (SPEC §7: decay on >=2-D params only), warmup + cosine, clip, in `freeze_beta`."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup, max(cfg.steps, cfg.warmup + 1), end_value=cfg.min_lr
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    parts = [
        optax.clip_by_global_norm(cfg.clip),
        optax.adamw(schedule, cfg.b1, cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
    ]
    if scale != 1.0:
        parts.append(optax.masked(optax.scale(scale), sparse_nnx.sparse_kernel_mask(model)))
    return sste_jax.freeze_beta(optax.chain(*parts))


def _loss(graphdef, params, rest, x_BxT, y_BxT):
    rest = jax.tree.map(lambda v: v, rest)  # fresh variables in this trace: MVUE advances its key counters
    model = nnx.merge(graphdef, params, rest)
    logits_BTxV = model(x_BxT).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BTxV, y_BxT.reshape(-1)).mean()
    return loss, nnx.split(model, nnx.Param, ...)[2]


def make_train_step(graphdef, tx):
    """One optimizer step over ``(accum, B, T)`` micro-batches; returns the new state and metrics."""

    @jax.jit
    def train_step(state, x_AxBxT, y_AxBxT):
        grad_fn = jax.value_and_grad(lambda p, r, x, y: _loss(graphdef, p, r, x, y), has_aux=True)

        def micro(carry, xy):
            rest, grads, loss_sum = carry
            (loss, rest), g = grad_fn(state["params"], rest, *xy)
            return (rest, jax.tree.map(jnp.add, grads, g), loss_sum + loss), None

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        carry = (state["rest"], zeros, jnp.zeros((), jnp.float32))
        (rest, grads, loss_sum), _ = jax.lax.scan(micro, carry, (x_AxBxT, y_AxBxT))
        n = x_AxBxT.shape[0]
        grads = jax.tree.map(lambda g: g / n, grads)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        weights = sste_jax.sparse_weights(nnx.merge(graphdef, params, rest))
        rates, flip = sste_jax.flip_rate(state["flip"], weights)
        metrics = {"train_loss": loss_sum / n, "flip_rate": rates["flip_rate"], "grad_norm": optax.tree.norm(grads)}
        return {"params": params, "rest": rest, "opt": opt, "flip": flip, "step": state["step"] + 1}, metrics

    return train_step


def make_eval(graphdef):
    @jax.jit
    def eval_loss(params, rest, x_BxT, y_BxT):
        return _loss(graphdef, params, rest, x_BxT, y_BxT)[0]

    return eval_loss


def dense_w_graphdef(model: nnx.Module):
    """The graph of ``model`` with every sparse layer evaluating its dense ``W`` (same state)."""
    clone = nnx.clone(model)
    for _, layer in sste_jax._metrics.sparse_modules(clone):
        layer.config = sste_jax.SparsityConfig(method="dense")
    return nnx.split(clone, nnx.Param, ...)[0]


class Programs(NamedTuple):
    """The optimizer and jitted functions of a (config, method) pair, shared by runs in one process."""

    graphdef: Any
    tx: optax.GradientTransformation
    train_step: Any
    eval_fn: Any
    eval_dense_fn: Any  # the dense-W evaluation of S-STE runs, else None


@functools.lru_cache(maxsize=8)
def programs(cfg: Config, vocab_size: int, method: str, sparsify: str, scale: float) -> Programs:
    model = nnx.eval_shape(lambda: build_model(cfg, vocab_size, Run(method=method, sparsify=sparsify)))
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    tx = make_optimizer(cfg, model, scale)
    dense_eval = make_eval(dense_w_graphdef(model)) if METHODS[method].method == "sste" else None
    return Programs(graphdef, tx, make_train_step(graphdef, tx), make_eval(graphdef), dense_eval)


def initial_state(cfg: Config, vocab_size: int, run: Run, weights=None):
    """``(programs, state, model)`` at step 0."""
    model = build_model(cfg, vocab_size, run, weights)
    prog = programs(cfg, vocab_size, run.method, run.sparsify, lr_scale(run, model))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    state = {
        "params": params,
        "rest": rest,
        "opt": prog.tx.init(params),
        "flip": sste_jax.init_flip_state(sste_jax.sparse_weights(model)),
        "step": jnp.zeros((), jnp.int32),
    }
    return prog, state, model


def _dense_weights(init_from: pathlib.Path, cfg: Config, vocab_size: int, sparsify: str):
    """The ``nnx.Param`` state of the last checkpoint of the dense run in ``init_from``."""
    info = json.loads((init_from / "run.json").read_text()) if (init_from / "run.json").exists() else {}
    if info.get("method", "dense") != "dense":
        raise ValueError(f"--init-from {init_from}: that run's method is {info['method']!r}, not 'dense'")
    dense = Run(method="dense", sparsify=info.get("sparsify", sparsify), ffn_lr_scale=info.get("ffn_lr_scale", 1.0))
    _, target, _ = initial_state(cfg, vocab_size, dense)
    return checkpoint.restore_checkpoint(init_from / "ckpt", target)["params"]


def _append(path: pathlib.Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _keep_until(path: pathlib.Path, step: int) -> None:
    """Drops metric records after ``step`` (a resumed run writes them again)."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def _batch(tokens, step: int, cfg: Config, seed: int):
    pairs = [data.batch_at(tokens, step * cfg.grad_accum + a, cfg.batch_size, cfg.seq_len, seed)
             for a in range(cfg.grad_accum)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def evaluate(prog: Programs, state, val, cfg: Config) -> dict:
    """Validation loss with the 2:4 forward weights (and, for S-STE, with the dense ``W``)."""
    batches = list(data.eval_batches(val, cfg.batch_size, cfg.seq_len, cfg.eval_batches))
    out = {"val_loss": jnp.mean(jnp.stack([prog.eval_fn(state["params"], state["rest"], x, y) for x, y in batches]))}
    if prog.eval_dense_fn is not None:
        out["val_loss_dense_w"] = jnp.mean(
            jnp.stack([prog.eval_dense_fn(state["params"], state["rest"], x, y) for x, y in batches])
        )
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
                _append(metrics_path, record)
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                pending = []
                if step % cfg.eval_every == 0 or step == stop:
                    stats = sste_jax.sparsity_stats(sste_jax.sparse_weights(nnx.merge(prog.graphdef, state["params"], state["rest"])))
                    evals = sste_jax.to_host({**evaluate(prog, state, val_tokens, cfg), **stats})
                    betas = [v for k, v in evals.items() if k.startswith("beta/")]
                    _append(metrics_path, {"step": step, **evals, "beta_mean": float(np.mean(betas))})
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
    p.add_argument("--method", default="sste", choices=sorted(METHODS))
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
    run = Run(method=args.method, seed=args.seed, sparsify=args.sparsify, ffn_lr_scale=scale)
    cache = args.cache_dir or data.cache_dir_default()
    try:
        train(cfg, run, args.workdir, resume=args.resume, init_from=args.init_from, until=args.until,
              cache_dir=cache, progress=not args.quiet)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
