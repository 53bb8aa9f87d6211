"""The one training loop of every experiment: jitted train step, checkpoints, resume, metrics,
evaluation, progress, and the guards that keep a run's good state.

A task gives the loop a `Task` (its loss, its batches as a pure function of the step, its
evaluation); the run's identity is a `Run`. `fit` then:

- writes ``run.json`` (the identity and its hash) and refuses a work directory that holds a
  different run, naming the differing fields, or a ``run.json`` / ``metrics.jsonl`` it cannot read
  (`BadFileError` naming the file, the line or field); refuses to start over a run unless ``resume``; refuses
  to resume when metrics exist without a checkpoint (restarting would discard them);
- trains with the recipe's `Schedule` (STEP's switch, dense finish, mask refresh, β refit), logs the
  means of the step metrics every ``log_every`` steps (the host waits on the device only there),
  evaluates every ``eval_every`` steps and at the end, checkpoints every ``ckpt_every`` steps (one
  `sste_jax.checkpoint.Checkpointer` writes them in the background while training goes on);
- stops with `NonFiniteError` on a non-finite loss or gradient norm, before any checkpoint of that
  state is written, so the rotation never replaces finite checkpoints with diverged ones;
- on Ctrl-C or SIGTERM writes the pending metrics, saves a checkpoint and re-raises
  `KeyboardInterrupt` (a second signal while saving only prints a note);
- resumes bit-identically from the newest checkpoint that verifies (a damaged newer one is skipped,
  with a warning naming it): batches are a function of the step, and the checkpoint holds the
  parameters, the layers' state (β, masks, MVUE key counters), the optimizer and the flip masks.

Several processes (`experiments.common.distributed`) run the same loop on one global mesh: the
state is sharded, each process feeds its own rows of every batch, process 0 alone writes
``run.json`` and the metrics, and every process writes its shards of each checkpoint. A signal
to any process stops all of them at the same step: it is noted at once and acted on at the next
logging step, where the processes agree (one small collective) to save and stop together.

Records: see `experiments.common.records`.
"""

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import sste_jax
from experiments.common import distributed
from experiments.common.config import Config, differing_fields, identity_hash
from experiments.common.recipes import Recipe, get_recipe, make_optimizer
from experiments.common.records import BadFileError, append_record, keep_until, read_json, read_records
from experiments.common.schedule import Schedule
from sste_jax import checkpoint
from sste_jax.nnx import accumulate_gradients

LossFn = Callable[..., jax.Array]  # (model, *micro_batch arrays) -> scalar loss


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient norm; nothing of that state was saved."""


class RunMismatchError(ValueError):
    """A work directory holds a run with other settings than the one asked for."""


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything that determines one training run besides the code: its identity.

    ``options`` are the task's own settings (e.g. which layers are sparse); ``sparse_lr_scale``
    multiplies the sparse kernels' learning rate (the β-matched dense control).
    """

    task: str
    method: str
    seed: int
    config: Config
    recipe_changes: tuple[tuple[str, Any], ...] = ()
    options: tuple[tuple[str, Any], ...] = ()
    sparse_lr_scale: float = 1.0

    def __post_init__(self):
        self.recipe()  # validates the method and the changes
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r}: must be an integer >= 0")
        if not (math.isfinite(self.sparse_lr_scale) and self.sparse_lr_scale > 0):
            raise ValueError(f"sparse_lr_scale={self.sparse_lr_scale!r}: must be a finite number > 0")

    def recipe(self) -> Recipe:
        return get_recipe(self.method, **dict(self.recipe_changes))

    def identity(self) -> dict:
        """The run's settings as plain JSON values, with the library version."""
        ident = {"task": self.task, "method": self.method, "seed": self.seed, "config": self.config.to_dict(),
                 "recipe": dict(self.recipe_changes), "options": dict(self.options),
                 "sparse_lr_scale": self.sparse_lr_scale, "version": sste_jax.__version__}
        return json.loads(json.dumps(ident, default=str))


@dataclasses.dataclass(frozen=True)
class Task:
    """What a task gives the loop.

    Attributes:
      loss_fn: ``(model, *micro_batch) -> scalar``.
      batch_at: ``i -> micro-batches`` of step ``i + 1``, each array with a leading axis of ``grad_accum``.
      evaluate: ``model -> {name: float}``, the model in its current phase (2:4 forward weights).
      finish: ``model -> dict`` of extra fields for the final record (e.g. BLEU).
      eval_dense_w: S-STE runs also evaluate their dense ``W`` (keys suffixed ``_dense_w``).
    """

    loss_fn: LossFn
    batch_at: Callable[[int], tuple]
    evaluate: Callable[[nnx.Module], dict]
    finish: Callable[[nnx.Module], dict] = lambda model: {}
    eval_dense_w: bool = False


def make_train_step(loss_fn: LossFn, schedule: Schedule, tx: optax.GradientTransformation):
    """``train_step(state, *batch_A)`` → ``(state, metrics)``: one optimizer step averaged over the
    ``A`` micro-batches of the leading axis (`sste_jax.nnx.accumulate_gradients`: each sparse layer prunes
    once per step), with the schedule's graph switch and between-step updates."""
    graphdefs = schedule.graphdefs

    @jax.jit
    def train_step(state, *batch_A):
        def grads(graphdef):
            model = nnx.merge(graphdef, state["params"], jax.tree.map(lambda v: v, state["rest"]))  # fresh variables
            loss, total = accumulate_gradients(loss_fn, model, *batch_A)
            return nnx.split(model, nnx.Param, ...)[2], total, loss

        phase = schedule.phase(state["step"], state["opt"])
        if len(graphdefs) == 1:
            rest, total, loss = grads(graphdefs[0])
        else:
            rest, total, loss = jax.lax.switch(phase, [lambda g=g: grads(g) for g in graphdefs])
        extra = {}
        if schedule.recipe.config.method == "tsrste":  # T-SR-STE's decay reads the masks its layers hold
            extra["masks"] = sste_jax.optim.forward_masks(nnx.merge(graphdefs[0], state["params"], rest))
        updates, opt = tx.update(total, state["opt"], state["params"], **extra)
        params = optax.apply_updates(state["params"], updates)
        step = state["step"] + 1
        rest = schedule.after_update(params, rest, step)
        weights = sste_jax.sparse_weights(nnx.merge(graphdefs[0], params, rest))
        rates, flip = sste_jax.metrics.flip_rate(state["flip"], weights)
        metrics = {"train_loss": loss, "flip_rate": rates["flip_rate"], "grad_norm": optax.tree.norm(total),
                   "phase": phase.astype(jnp.float32)}
        if schedule.recipe.optimizer == "step":
            metrics["step_v_change"] = sste_jax.optim.step_v_change(opt)
        return {"params": params, "rest": rest, "opt": opt, "flip": flip, "step": step}, metrics

    return train_step


def initial_state(model: nnx.Module, tx: optax.GradientTransformation) -> dict:
    """The training state of ``model`` at step 0: params, the other variables, optimizer, flip masks."""
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return {"params": params, "rest": rest, "opt": tx.init(params),
            "flip": sste_jax.metrics.init_flip_state(sste_jax.sparse_weights(model)), "step": jnp.zeros((), jnp.int32)}


@jax.jit(static_argnums=0)
def _sparsity_stats(graphdef, variables):
    return sste_jax.metrics.sparsity_stats(sste_jax.sparse_weights(nnx.merge(graphdef, variables)))


def layer_stats(model: nnx.Module) -> dict[str, float]:
    """Per sparse layer: β, zero fraction and relative error of the forward weights; their means.
    One jitted computation (so sharded weights on several processes reduce in one program)."""
    stats = sste_jax.metrics.to_host(_sparsity_stats(*nnx.split(model)))
    for name in ("beta", "zero_fraction"):
        values = [v for k, v in stats.items() if k.startswith(name + "/")]
        stats[f"{name}_mean"] = float(np.mean(values)) if values else float("nan")
    return stats


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=pathlib.Path(__file__).parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_IDENTITY_FIELDS = {"task": str, "method": str, "seed": int, "config": dict, "recipe": dict, "options": dict,
                    "sparse_lr_scale": (int, float)}


def read_identity(workdir: str | pathlib.Path) -> dict:
    """The `Run.identity` stored in ``workdir/run.json``; `BadFileError` naming the file and the field
    when the file is missing, not JSON, or not what `fit` writes."""
    path = pathlib.Path(workdir) / "run.json"
    if not path.is_file():
        raise BadFileError(f"{workdir} is not a training run: {path} is missing")
    info = read_json(path)
    identity = info.get("identity") if isinstance(info, dict) else None
    if not isinstance(identity, dict):
        raise BadFileError(f"{path}: no 'identity' object (the file holds {json.dumps(info)[:80]})")
    for field, kind in _IDENTITY_FIELDS.items():
        if field not in identity:
            raise BadFileError(f"{path}: identity.{field} is missing")
        if not isinstance(identity[field], kind) or isinstance(identity[field], bool):
            raise BadFileError(f"{path}: identity.{field} is {identity[field]!r}, not of type "
                               f"{getattr(kind, '__name__', 'number')}")
    for part in ("model", "optim", "loop"):
        if not isinstance(identity["config"].get(part), dict):
            raise BadFileError(f"{path}: identity.config.{part} is {identity['config'].get(part)!r}, not an object")
    return identity


def _check_workdir(workdir: pathlib.Path, run: Run, resume: bool) -> None:
    info_path, metrics_path = workdir / "run.json", workdir / "metrics.jsonl"
    if info_path.exists():
        stored = read_identity(workdir)
        diff = differing_fields(stored, run.identity())
        if diff:
            raise RunMismatchError(f"{workdir} holds a run with other settings (stored != asked): " + "; ".join(diff)
                                   + ". Choose another --workdir, or delete that one.")
    holds_run = info_path.exists() or metrics_path.exists() or bool(checkpoint.checkpoint_steps(workdir / "ckpt"))
    if holds_run and not resume:
        raise FileExistsError(f"{workdir} already holds a run: pass --resume, or choose another --workdir")
    if (
        resume
        and metrics_path.exists()
        and read_records(metrics_path)
        and not checkpoint.checkpoint_steps(workdir / "ckpt")
    ):
        raise RuntimeError(f"{workdir} has metrics but no checkpoint: resuming would restart at step 0 and discard "
                           f"them. Delete {workdir} to start over, or point --workdir elsewhere.")


def finished(workdir: str | pathlib.Path, run: Run) -> bool:
    """Whether ``workdir`` holds ``run`` (same identity) completed; a different run there raises."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "run.json").exists():
        return False
    _check_workdir(workdir, run, resume=True)
    path = workdir / "metrics.jsonl"
    return path.exists() and any(r.get("kind") == "final" for r in read_records(path))


@contextlib.contextmanager
def _signals(handler):
    """SIGINT and SIGTERM call ``handler`` inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _wait_note(signum, frame):
    print(f"\n{signal.Signals(signum).name} while saving: finishing the checkpoint first", file=sys.stderr)


def _finite(record: dict) -> bool:
    return all(math.isfinite(record[k]) for k in ("train_loss", "grad_norm") if k in record)


def fit(run: Run, workdir: str | pathlib.Path, task: Task, model: nnx.Module, *, resume: bool = False,
        until: int | None = None, progress: bool = True, mesh: jax.sharding.Mesh | None = None) -> dict:
    """Trains ``model`` (built and sparsified for ``run``) for ``run.config.optim.steps`` steps, or up
    to ``until``, in ``workdir``; returns the final training state, laid on ``mesh`` (default:
    `distributed.make_mesh`). See the module docstring."""
    cfg, loop = run.config, run.config.loop
    steps = cfg.optim.steps
    if until is not None and not 1 <= until:
        raise ValueError(f"until={until}: must be >= 1")
    workdir = pathlib.Path(workdir)
    ckpt_dir, metrics_path = workdir / "ckpt", workdir / "metrics.jsonl"
    _check_workdir(workdir, run, resume)
    main, several = distributed.is_main(), jax.process_count() > 1
    distributed.barrier("checked the work directory")  # before process 0 writes into it
    workdir.mkdir(parents=True, exist_ok=True)
    if main and not (workdir / "run.json").exists():
        info = {"identity": run.identity(), "hash": identity_hash(run.identity()), "git_commit": _git_commit()}
        tmp = workdir / "run.json.tmp"
        tmp.write_text(json.dumps(info, indent=1) + "\n")
        os.replace(tmp, workdir / "run.json")

    recipe = run.recipe()
    schedule = Schedule(model, recipe, steps)
    tx = make_optimizer(cfg.optim, model, recipe, run.sparse_lr_scale)
    train_step = make_train_step(task.loss_fn, schedule, tx)
    mesh = mesh if mesh is not None else distributed.make_mesh()
    state = distributed.place(initial_state(model, tx), mesh)
    sste_jax.metrics.check_sharding(sste_jax.sparse_weights(schedule.model(state)))
    if resume and checkpoint.checkpoint_steps(ckpt_dir):
        with warnings.catch_warnings(record=True) as skipped:
            warnings.simplefilter("always")
            restored, state = checkpoint.restore_latest(ckpt_dir, state)
        for w in skipped:
            print(f"warning: {w.message}", file=sys.stderr)
        distributed.barrier("restored")  # every process read the newer steps before they move
        for newer in (p for p in ckpt_dir.iterdir() if main and p.name.isdigit() and int(p.name) > restored):
            newer.rename(newer.with_name(f"{newer.name}.damaged"))  # kept for inspection, never restored
            print(f"warning: moved the damaged checkpoint {newer} to {newer.name}.damaged", file=sys.stderr)
    start = int(state["step"])
    if start >= steps and metrics_path.exists() and any(r.get("kind") == "final" for r in read_records(metrics_path)):
        return state
    resumed_at_end = start >= steps  # interrupted after its last checkpoint, before its final record
    kept = keep_until(metrics_path, start, drop_eval_at_step=resumed_at_end) if main else []
    record = append_record if main else lambda path, rec: None  # process 0 writes the metrics
    tag = {"method": run.method, "seed": run.seed}
    stop = steps if until is None else min(steps, until)

    ckpt = checkpoint.Checkpointer(ckpt_dir, max_to_keep=loop.keep_checkpoints)  # writes in the background

    def save(step):
        ckpt.save(step, state)

    def flush(step):
        """Writes the train record of the pending steps; raises NonFiniteError if it is not finite."""
        logged = jax.device_get(pending)
        now = time.perf_counter()
        train = {
            **tag,
            "step": step,
            "kind": "train",
            **{k: float(np.mean([m[k] for m in logged])) for k in logged[0]},
            "steps_per_s": len(logged) / max(now - clock["tick"] - clock["paused"], 1e-9),
        }
        record(metrics_path, train)
        pending.clear()
        clock.update(tick=now, paused=0.0, last_train=train)
        if not _finite(train):
            kept = ckpt.steps()  # the pending save committed first
            raise NonFiniteError(
                f"{workdir}: step {step}: train_loss={train['train_loss']}, grad_norm={train['grad_norm']}. "
                f"Stopped without saving; the newest checkpoint ({kept[-1] if kept else 'none'}) holds the last "
                f"finite state. Lower the learning rate or check the data, then --resume.")
        return train

    def evaluate(step):
        began = time.perf_counter()
        current = schedule.model(state)
        ev = {**tag, "step": step, "kind": "eval", **task.evaluate(current), **layer_stats(current)}
        if task.eval_dense_w and recipe.config.method == "sste":
            ev.update({f"{k}_dense_w": v for k, v in task.evaluate(schedule.model(state, dense_w=True)).items()})
        record(metrics_path, ev)
        clock["paused"] += time.perf_counter() - began
        return ev

    pending: list = []
    last_train = next((r for r in reversed(kept) if r.get("kind") == "train"), {})  # final record's if none follows
    clock = {"tick": time.perf_counter(), "paused": 0.0, "last_train": last_train}
    began, last_eval, last_saved = time.perf_counter(), {}, start
    bar = tqdm(total=stop, initial=start, disable=not (progress and main), desc=f"{run.method} s{run.seed}",
               dynamic_ncols=True)
    signalled: list[str] = []  # several processes: a signal is noted here and acted on at the next log step

    def note(signum, frame):
        signalled.append(signal.Signals(signum).name)

    try:
        with _signals(note if several else _interrupt):
            for step in range(start + 1, stop + 1):
                state, metrics = train_step(state, *distributed.global_batch(mesh, task.batch_at(step - 1)))
                pending.append(metrics)
                bar.update()
                is_ckpt = step % loop.ckpt_every == 0 or step == stop
                if step % loop.log_every == 0 or is_ckpt or step == stop:
                    bar.set_postfix(loss=f"{flush(step)['train_loss']:.3f}")
                    if several and distributed.any_process(bool(signalled)):
                        raise KeyboardInterrupt(signalled[0] if signalled else "another process was signalled")
                if step % loop.eval_every == 0 or step == steps:
                    last_eval = evaluate(step)
                if is_ckpt:
                    paused = time.perf_counter()
                    save(step)
                    last_saved = step
                    clock["paused"] += time.perf_counter() - paused
    except KeyboardInterrupt as e:
        bar.close()
        with _signals(_wait_note):
            done = int(state["step"])
            if pending:
                flush(done)  # raises NonFiniteError (nothing saved) if the pending steps diverged
            if done > last_saved:
                save(done)
            ckpt.close()  # every save committed before the interrupt propagates
        print(f"\ninterrupted ({e or 'SIGINT'}): saved step {done} in {ckpt_dir}; continue with --resume",
              file=sys.stderr)
        raise
    finally:
        ckpt.close()  # waits for the last save; a failed write raises here
    bar.close()
    if stop == steps:
        if resumed_at_end:  # nothing trained in this call: evaluate the restored last step
            last_eval = evaluate(steps)
        final_model = schedule.model(state)
        record(metrics_path, {
            **tag, "step": steps, "kind": "final", "steps": steps,
            "train_loss": clock["last_train"].get("train_loss", float("nan")),
            **{k: v for k, v in last_eval.items() if k not in ("method", "seed", "step", "kind")},
            "second_phase_from": schedule.second_phase_from(state), "seconds": time.perf_counter() - began,
            **task.finish(final_model)})
    return state
