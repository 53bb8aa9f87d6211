"""The command-line syntax every experiment shares: ``--config NAME`` (names listed in ``--help``),
``--set KEY=VALUE ...`` and ``--recipe KEY=VALUE ...`` (repeatable; a key given twice is refused),
``--methods a b ...``, ``--seeds 0 1 ...``, ``--jobs N`` and the multi-process flags.

Every flag's value is checked when the command line is parsed, by the argparse ``type`` helpers of
`experiments.common.flags`: a bad value stops the command before it starts anything.

>>> import argparse
>>> p = argparse.ArgumentParser()
>>> add_config_args(p, {"tiny": None, "small": None}, "tiny")
>>> p.parse_args(["--set", "lr=1e-3", "--set", "steps=5"]).set
['lr=1e-3', 'steps=5']
"""

import argparse
import sys

from experiments.common import cache, distributed, loop
from experiments.common.config import parse_fields
from experiments.common.flags import integer, parsed_by
from experiments.common.recipes import METHODS, Recipe
from experiments.common.records import BadFileError


def add_config_args(p: argparse.ArgumentParser, configs: dict, default: str) -> None:
    p.add_argument("--config", default=default, choices=sorted(configs), help=f"default {default}")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. lr=3e-3 steps=100 (or optim.lr=3e-3); repeatable")
    p.add_argument("--recipe", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="method recipe changes, e.g. refit_beta_every=20 (experiments.common.recipes.Recipe)")


def add_run_args(p: argparse.ArgumentParser, configs: dict, default: str) -> None:
    """The flags of a task's one-run command (``python -m experiments.<task>.train``)."""
    add_config_args(p, configs, default)
    p.add_argument("--method", default="sste", choices=sorted(METHODS))
    p.add_argument("--seed", type=integer(0), default=0)
    p.add_argument("--workdir", required=True)
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir (same settings only)")
    p.add_argument("--until", type=integer(1), help="stop (with a checkpoint) after this step")
    p.add_argument("--cache-dir", default=None, help="data cache (default $SSTE_CACHE or ~/.cache/sste_jax)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    """The multi-process flags of every training command (each defaults to the environment; see
    `experiments.common.distributed.initialize_from`)."""
    g = p.add_argument_group("multi-process (default: the environment; one process if unset)")
    g.add_argument("--coordinator", help="host:port of process 0 (env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=integer(1), help="number of processes (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=integer(0), help="this process's index (env JAX_PROCESS_ID)")
    g.add_argument("--local-devices", type=integer(1),
                   help="CPU only: devices per process (env SSTE_LOCAL_DEVICES; default 1)")
    g.add_argument("--mesh", type=parsed_by(distributed.parse_mesh),
                   help="data=D,fsdp=F (default: data = processes, fsdp = devices per process; "
                        "one process: one device)")


def add_jobs_arg(p: argparse.ArgumentParser) -> None:
    """``--jobs N`` of the commands that run many trainings (`experiments.common.runner`)."""
    p.add_argument("--jobs", type=integer(1), default=None, help="parallel runs (default: one per core)")


def train_or_exit(train):
    """``train()``; Ctrl-C or SIGTERM exits with 130 (a checkpoint was saved), the loop's refusals, a
    damaged run file and a cached input that cannot be rebuilt with their message."""
    try:
        return train()
    except KeyboardInterrupt:
        sys.exit(130)
    except (loop.NonFiniteError, loop.RunMismatchError, FileExistsError, BadFileError, cache.CacheError) as e:
        sys.exit(f"error: {e}")


def add_methods_args(p: argparse.ArgumentParser, default_methods, default_seeds) -> None:
    p.add_argument("--methods", nargs="+", default=list(default_methods), choices=sorted(METHODS), metavar="METHOD",
                   help=f"default: {' '.join(default_methods)}; any of {' '.join(METHODS)}")
    p.add_argument("--seeds", nargs="+", type=integer(0), default=list(default_seeds), help="default: %(default)s")


def parse_recipe(items) -> tuple[tuple[str, object], ...]:
    """``--recipe`` items as sorted ``(field, value)`` pairs."""
    return tuple(sorted(parse_fields(Recipe, items).items()))
