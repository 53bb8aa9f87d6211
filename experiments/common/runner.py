"""Runs many training runs, one single-threaded process per core, with one progress bar for the whole job.

Each `Job` is a command (a task's train module) with its work directory; its output goes to
``<workdir>/log.txt``. Progress is the sum of the steps the runs have logged (read from the tail of
their metrics files). Ctrl-C or SIGTERM sends SIGTERM to the runs (each saves a checkpoint; rerun
the same command to resume them), waits for them and exits with status 130. A failed run does not
stop the others; at the end `RunsFailed` names every failed run and its log.

Single-threaded pinned processes are faster in total than multi-threaded ones on a few cores, and
their numbers do not depend on how many threads XLA would otherwise pick.
"""

import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

from tqdm import tqdm

from experiments.common import loop, report
from experiments.common.records import last_step

SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


class RunsFailed(RuntimeError):
    """One or more runs exited with an error."""


@dataclasses.dataclass(frozen=True)
class Job:
    """``python -m <module> <args>``, training ``steps`` steps in ``workdir``; ``name`` labels it."""

    name: str
    module: str
    args: tuple[str, ...]
    workdir: pathlib.Path
    steps: int


@dataclasses.dataclass(frozen=True)
class Planned:
    """One run of a comparison: its name (a method), seed, `loop.Run`, work directory, and the
    arguments of the task's train module that reproduce ``run`` (besides method, seed, workdir)."""

    name: str
    seed: int
    run: loop.Run
    workdir: pathlib.Path
    args: tuple[str, ...]


def execute(module: str, planned: list[Planned], parallel: int | None = None, progress: bool = True,
            single_thread: bool = True) -> None:
    """Trains the planned runs that have not finished with ``python -m module`` (a work directory
    holding other settings raises `loop.RunMismatchError` before anything starts)."""
    jobs = [
        Job(
            f"{p.name} seed {p.seed} ({p.workdir.name})",
            module,
            ("--method", p.name, "--seed", str(p.seed), "--workdir", str(p.workdir), "--quiet", "--resume", *p.args),
            p.workdir,
            p.run.config.optim.steps,
        )
        for p in planned
        if not loop.finished(p.workdir, p.run)
    ]
    run_jobs(jobs, parallel, single_thread=single_thread, progress=progress)


def load(planned: list[Planned]) -> report.Runs:
    """``{name: {seed: records}}`` of the planned runs."""
    workdirs: dict[str, dict[int, pathlib.Path]] = {}
    for p in planned:
        workdirs.setdefault(p.name, {})[p.seed] = p.workdir
    return report.load_runs(workdirs)


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _env(single_thread: bool) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    if single_thread:
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD}".strip()
    return env


def run_jobs(jobs: list[Job], parallel: int | None = None, *, single_thread: bool = True, progress: bool = True,
             poll: float = 0.5) -> None:
    """Runs ``jobs``, ``parallel`` at a time (default: one per available core), each pinned to a core."""
    if not jobs:
        return
    parallel = parallel or default_jobs()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(parallel))
    slots = [cores[i % len(cores)] for i in range(parallel)]
    queue, active, failed, done_steps = list(jobs), {}, [], 0
    bar = tqdm(total=sum(j.steps for j in jobs), disable=not progress, desc=f"{len(jobs)} runs", unit="step",
               dynamic_ncols=True, smoothing=0.05, mininterval=2.0)
    started = {j.name: last_step(j.workdir / "metrics.jsonl") for j in jobs}
    env = _env(single_thread)

    def launch(slot: int, job: Job) -> None:
        job.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", job.module, *job.args]
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", str(slots[slot]), *cmd]
        log = (job.workdir / "log.txt").open("a")
        active[slot] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), job, log)

    def stop_all() -> None:
        for proc, _, _ in active.values():
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 120
        for proc, _, log in active.values():
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()

    def on_term(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        while queue or active:
            for slot in range(parallel):
                if slot not in active and queue:
                    launch(slot, queue.pop(0))
            time.sleep(poll)
            for slot, (proc, job, log) in list(active.items()):
                if proc.poll() is not None:
                    log.close()
                    del active[slot]
                    done_steps += job.steps - started[job.name]
                    if proc.returncode:
                        failed.append(f"{job.name} (exit {proc.returncode}; log: {job.workdir / 'log.txt'})")
            running = sum(last_step(j.workdir / "metrics.jsonl") - started[j.name] for _, j, _ in active.values())
            finished = len(jobs) - len(queue) - len(active)
            bar.set_postfix_str(f"{finished}/{len(jobs)} done, {len(active)} running, {len(failed)} failed",
                                refresh=False)
            bar.update(min(bar.total, sum(started.values()) + done_steps + running) - bar.n)
    except KeyboardInterrupt as e:
        bar.close()
        print(f"\n{e or 'SIGINT'}: stopping the runs (each saves a checkpoint); rerun the same command to resume",
              file=sys.stderr)
        stop_all()
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, old)
    bar.close()
    if failed:
        raise RunsFailed(f"{len(failed)} of {len(jobs)} runs failed: " + "; ".join(failed))
