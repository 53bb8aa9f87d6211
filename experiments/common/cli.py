"""The command-line syntax every experiment shares: ``--config NAME`` (names listed in ``--help``),
``--set KEY=VALUE ...`` and ``--recipe KEY=VALUE ...`` (repeatable; a key given twice is refused),
``--methods a b ...`` and ``--seeds 0 1 ...``.

>>> import argparse
>>> p = argparse.ArgumentParser()
>>> add_config_args(p, {"tiny": None, "small": None}, "tiny")
>>> p.parse_args(["--set", "lr=1e-3", "--set", "steps=5"]).set
['lr=1e-3', 'steps=5']
"""

import argparse
import math
import sys

from experiments.common import loop
from experiments.common.config import parse_fields
from experiments.common.recipes import METHODS, Recipe


def add_config_args(p: argparse.ArgumentParser, configs: dict, default: str) -> None:
    p.add_argument("--config", default=default, choices=sorted(configs), help=f"default {default}")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. lr=3e-3 steps=100 (or optim.lr=3e-3); repeatable")
    p.add_argument("--recipe", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="method recipe changes, e.g. refit_beta_every=20 (experiments.common.recipes.Recipe)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_run_args(p: argparse.ArgumentParser, configs: dict, default: str) -> None:
    """The flags of a task's one-run command (``python -m experiments.<task>.train``)."""
    add_config_args(p, configs, default)
    p.add_argument("--method", default="sste", choices=sorted(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", required=True)
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir (same settings only)")
    p.add_argument("--until", type=_positive_int, help="stop (with a checkpoint) after this step")
    p.add_argument("--cache-dir", default=None, help="data cache (default $SSTE_CACHE or ~/.cache/sste_jax)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def train_or_exit(train):
    """``train()``; Ctrl-C or SIGTERM exits with 130 (a checkpoint was saved), the loop's refusals with
    their message."""
    try:
        return train()
    except KeyboardInterrupt:
        sys.exit(130)
    except (loop.NonFiniteError, loop.RunMismatchError, FileExistsError) as e:
        sys.exit(f"error: {e}")


def add_methods_args(p: argparse.ArgumentParser, default_methods, default_seeds) -> None:
    p.add_argument("--methods", nargs="+", default=list(default_methods), choices=sorted(METHODS), metavar="METHOD",
                   help=f"default: {' '.join(default_methods)}; any of {' '.join(METHODS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=list(default_seeds), help="default: %(default)s")


def parse_recipe(items) -> tuple[tuple[str, object], ...]:
    """``--recipe`` items as sorted ``(field, value)`` pairs."""
    return tuple(sorted(parse_fields(Recipe, items).items()))


def parse_float(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: must be a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{name}={text!r}: must be finite")
    return value
