"""Starts N local processes of one training command, joined through `jax.distributed`: a try-out of
multi-host training on one machine, and what the tests use.

    python -m experiments.launch --processes 2 --local-devices 2 -- \\
        python -m experiments.lm.train --config tiny --method sste --workdir runs/mp

Each process gets ``JAX_COORDINATOR_ADDRESS`` (127.0.0.1 and a free port), ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID`` and, with ``--local-devices``, ``SSTE_LOCAL_DEVICES`` (CPU devices per process).
Ctrl-C or SIGTERM is passed on to every process (they save a checkpoint at the same step and stop);
when one process fails, the others are stopped and the error names it. Processes still running
``--grace`` seconds after being asked to stop are killed, so nothing is left behind. Exit status: 0
when all succeed, 130 after an interrupt, else the failed process's status (1 if it was a signal).
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from experiments.common import flags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environments(processes: int, local_devices: int | None, port: int) -> list[dict[str, str]]:
    """The environment of each process."""
    envs = []
    for i in range(processes):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                   JAX_PROCESS_ID=str(i))
        if local_devices is not None:
            env["SSTE_LOCAL_DEVICES"] = str(local_devices)
        envs.append(env)
    return envs


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM to the running processes, then SIGKILL to those still running after ``grace`` seconds."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            print(f"launch: process {procs.index(p)} did not stop within {grace:g} s: killed", file=sys.stderr)


def launch(command: list[str], processes: int, local_devices: int | None = None, grace: float = 60.0,
           poll: float = 0.2) -> int:
    """Runs ``command`` as ``processes`` joined processes; returns the exit status (see the module)."""
    if processes < 1:
        raise ValueError(f"processes={processes}: must be >= 1")
    if not command:
        raise ValueError("no command to launch (put it after --)")
    # Own sessions: a terminal's Ctrl-C reaches the launcher alone, which passes it on once.
    procs = [subprocess.Popen(command, env=env, start_new_session=True)
             for env in environments(processes, local_devices, free_port())]
    interrupted: list[str] = []

    def on_signal(signum, frame):
        interrupted.append(signal.Signals(signum).name)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if interrupted:
                _stop(procs, grace)
                print(f"launch: {interrupted[0]}: stopped {processes} process(es)", file=sys.stderr)
                return 130
            if failed:
                i = failed[0]
                print(f"launch: process {i} of {processes} failed (exit status {codes[i]}); stopping the others",
                      file=sys.stderr)
                _stop(procs, grace)
                return codes[i] if codes[i] > 0 else 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p in procs:  # never leave one behind, whatever happened above
            if p.poll() is None:
                p.kill()
                p.wait()


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("usage: python -m experiments.launch --processes N [--local-devices D] [--grace S] -- COMMAND ...")
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=flags.integer(1), required=True)
    p.add_argument("--local-devices", type=flags.integer(1), help="CPU devices per process")
    p.add_argument("--grace", type=flags.number(minimum=0), default=60.0,
                   help="seconds to wait for a stopped process (default 60)")
    args = p.parse_args(argv[:split])
    try:
        code = launch(argv[split + 1:], args.processes, args.local_devices, args.grace)
    except ValueError as e:
        sys.exit(f"error: {e}")
    sys.exit(code)


if __name__ == "__main__":
    main()
