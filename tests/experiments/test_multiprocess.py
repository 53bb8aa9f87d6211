"""Multi-process training on CPU: several local processes joined by `jax.distributed` (gloo
collectives), started by ``experiments.launch``, against one process with as many devices.

Both layouts use the same ``data=2, fsdp=2`` mesh, so they run the same partitioned program; they
differ only in how the all-reduce adds partial sums (gloo across processes, in-process otherwise),
a last-bit difference per sum: values agree to 1e-5 relative and the 2:4 masks exactly. Runs on the
same layout (straight vs. stopped and resumed) are bit-identical. The runs use S-STE without MVUE: MVUE's
keys fold in the bits of each product's input and weight, so on another layout it draws other (equally
distributed) samples after the first step; its resume on one layout is bit-identical (tests/experiments/test_loop.py).
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sste_jax
from experiments.common import loop
from experiments.lm import train as lm_train
from experiments.lm.configs import get_config
from sste_jax import checkpoint

pytestmark = pytest.mark.integration  # every test starts processes

ROOT = pathlib.Path(__file__).resolve().parents[2]
SETTINGS = ["--config", "tiny", "--method", "sste", "--quiet", "--mesh", "data=2,fsdp=2"]
TIMEOUT = 600  # seconds for one launch (two cold JAX processes compiling on 2 shared cores)


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no 8 fake devices here
    return dict(env, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")


def _train(workdir, *extra, processes=2, local_devices=2, timeout=TIMEOUT):
    train = [sys.executable, "-m", "experiments.lm.train", *SETTINGS, "--workdir", str(workdir), *extra]
    if processes == 1:
        command = [*train, "--local-devices", str(local_devices)]
    else:
        command = [sys.executable, "-m", "experiments.launch", "--processes", str(processes),
                   "--local-devices", str(local_devices), "--", *train]
    out = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _records(workdir, kind=None):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["kind"] == kind]


def _losses(workdir):
    return [(r["kind"], r["step"], r.get("train_loss", r.get("val_loss"))) for r in _records(workdir)
            if r["kind"] in ("train", "eval")]


def _final_state(workdir):
    """The last checkpoint of a run, restored here (one process, one device: another layout)."""
    run = lm_train.make_run(get_config("tiny"), "sste")
    model = lm_train.build_model(run, 256)
    target = loop.initial_state(model, lm_train.make_optimizer(run.config.optim, model, run.recipe(), 1.0))
    return checkpoint.restore_checkpoint(pathlib.Path(workdir) / "ckpt", target)


def _leaves(state):
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The same 8-step run on 2 processes x 2 devices and on 1 process x 4 devices."""
    root = tmp_path_factory.mktemp("straight")
    _train(root / "two")
    _train(root / "one", processes=1, local_devices=4)
    return root


def test_two_processes_train_like_one_process_with_as_many_devices(straight):
    two, one = _losses(straight / "two"), _losses(straight / "one")
    assert [(k, s) for k, s, _ in two] == [(k, s) for k, s, _ in one] and len(two) == 6
    np.testing.assert_allclose([v for *_, v in two], [v for *_, v in one], rtol=1e-5)
    assert _records(straight / "two", "final") and (straight / "two" / "run.json").exists()
    a, b = _leaves(_final_state(straight / "two")), _leaves(_final_state(straight / "one"))
    assert a.keys() == b.keys()
    for name in a:
        if np.issubdtype(a[name].dtype, np.floating):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
        else:  # steps, flip masks (packed bits of the top-2 masks)
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    kernels = [n for n in a if n.startswith("['params']") and "c_fc" in n and "kernel" in n]
    assert kernels and all(
        np.array_equal(sste_jax.mask_24(jnp.asarray(a[n])), sste_jax.mask_24(jnp.asarray(b[n]))) for n in kernels
    )


def test_a_checkpoint_of_two_processes_resumes_on_two_and_on_one(straight, tmp_path):
    _train(tmp_path / "split", "--until", "4")
    assert checkpoint.checkpoint_steps(tmp_path / "split" / "ckpt") == [4]
    shutil.copytree(tmp_path / "split", tmp_path / "on_one")
    _train(tmp_path / "split", "--resume")
    assert _losses(tmp_path / "split") == _losses(straight / "two")  # bit-identical on the same layout
    a, b = _leaves(_final_state(tmp_path / "split")), _leaves(_final_state(straight / "two"))
    assert all(np.array_equal(a[n], b[n]) for n in a)
    _train(tmp_path / "on_one", "--resume", processes=1, local_devices=4)
    resumed = _losses(tmp_path / "on_one")
    assert [(k, s) for k, s, _ in resumed] == [(k, s) for k, s, _ in _losses(straight / "one")]
    np.testing.assert_allclose([v for *_, v in resumed], [v for *_, v in _losses(straight / "one")], rtol=1e-5)


def test_sigterm_stops_every_process_at_the_same_step_with_a_checkpoint(tmp_path):
    workdir = tmp_path / "long"
    train = [sys.executable, "-m", "experiments.lm.train", *SETTINGS, "--set", "steps=2000", "ckpt_every=1000",
             "eval_every=1000", "--workdir", str(workdir)]
    launcher = subprocess.Popen([sys.executable, "-m", "experiments.launch", "--processes", "2", "--local-devices",
                                 "2", "--", *train], cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while not (workdir / "metrics.jsonl").exists() or not _records(workdir, "train"):
        assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before it was signalled"
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    err = launcher.communicate(timeout=TIMEOUT)[1]
    assert launcher.returncode == 130, err[-3000:]
    saved = checkpoint.checkpoint_steps(workdir / "ckpt")
    last = _records(workdir, "train")[-1]["step"]
    assert saved == [last] and 0 < last < 2000  # one checkpoint, written together at the same step
    assert "SIGTERM" in err and "continue with --resume" in err


def test_a_failing_process_stops_the_others_with_an_error_naming_it(tmp_path):
    marker = f"sste-orphan-check-{os.getpid()}"
    script = (
        "import os, signal, sys, time\n"
        "if os.environ['JAX_PROCESS_ID'] == '1':\n"
        "    time.sleep(1); sys.exit(3)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a process stuck in a collective ignores it\n"
        f"time.sleep(600)  # {marker}\n"
    )
    began = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "experiments.launch", "--processes", "2", "--grace", "2", "--",
                          sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 3
    assert "process 1 of 2 failed (exit status 3)" in out.stderr
    assert "process 0 did not stop within 2 s: killed" in out.stderr
    assert time.monotonic() - began < 60
    alive = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    assert alive.stdout.strip() == ""  # nothing left behind


def test_the_launcher_refuses_a_missing_command():
    out = subprocess.run([sys.executable, "-m", "experiments.launch", "--processes", "2"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "usage" in out.stderr
