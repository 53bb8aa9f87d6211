"""Language-model configs by name, and the learning rates tuned per method.

- ``tiny``: CI, a 2-layer byte-level model on the synthetic corpus, seconds per run.
- ``capacity``: the comparison (the main job): 2 layers, d 64, byte-level Shakespeare, 3000 steps.
  A model this small is capacity-limited, so removing half of its feed-forward weights costs
  accuracy and the methods separate; ~1 minute per run on one CPU core.
- ``capacity_d128``, ``capacity_d256``: ``capacity`` at widths 128 and 256 (head size 32 throughout),
  the same tokens: the width-scaling comparison.
- ``small``: 4 layers, d 128, 800 steps: every method lands within the seed spread of dense.
- ``gpt2_124m``, ``gpt2_350m``, ``gpt2_774m``: the paper's GPT-2 sizes (512 x 1024 tokens per step), for GPUs.

>>> get_config("capacity", ["lr=6e-3"]).optim.lr
0.006
"""

import dataclasses

from experiments.common.config import Config, LoopConfig, ModelConfig, OptimConfig, override
from experiments.common.recipes import METHODS


@dataclasses.dataclass(frozen=True)
class LMData:
    """``corpus``: ``shakespeare`` or ``synthetic``; ``tokenizer``: ``gpt2`` or ``byte``;
    ``eval_batches``: validation batches per evaluation (fixed windows spread over the split)."""

    corpus: str = "shakespeare"
    tokenizer: str = "gpt2"
    eval_batches: int = 8

    def __post_init__(self):
        if self.corpus not in ("shakespeare", "synthetic"):
            raise ValueError(f"corpus={self.corpus!r}: must be 'shakespeare' or 'synthetic'")
        if self.tokenizer not in ("gpt2", "byte"):
            raise ValueError(f"tokenizer={self.tokenizer!r}: must be 'gpt2' or 'byte'")
        if not isinstance(self.eval_batches, int) or self.eval_batches < 1:
            raise ValueError(f"eval_batches={self.eval_batches!r}: must be an integer >= 1")


def _gpt2(n_layer: int, n_head: int, d_model: int, batch_size: int, grad_accum: int) -> Config:
    return Config(ModelConfig(n_layer, n_head, d_model, 1024), LMData(eval_batches=50),
                  OptimConfig(steps=300_000, batch_size=batch_size, grad_accum=grad_accum, lr=1.5e-4, min_lr=1e-5,
                              warmup=3000),
                  LoopConfig(log_every=100, eval_every=2000, ckpt_every=5000))


def _width(cfg: Config, d_model: int) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=d_model, n_head=d_model // 32))


CONFIGS = {
    "tiny": Config(ModelConfig(2, 2, 32, 16), LMData("synthetic", "byte", eval_batches=2),
                   OptimConfig(steps=8, batch_size=4, lr=3e-3, min_lr=3e-4, warmup=2),
                   LoopConfig(log_every=2, eval_every=4, ckpt_every=4)),
    "capacity": Config(ModelConfig(2, 2, 64, 64), LMData("shakespeare", "byte", eval_batches=32),
                       OptimConfig(steps=3000, batch_size=16, lr=3e-3, min_lr=3e-4, warmup=100),
                       LoopConfig(log_every=100, eval_every=500, ckpt_every=1000)),
    "small": Config(ModelConfig(4, 4, 128, 64), LMData("shakespeare", "byte"),
                    OptimConfig(steps=800, batch_size=16, lr=6e-3, min_lr=6e-4, warmup=80),
                    LoopConfig(log_every=20, eval_every=100, ckpt_every=400)),
    "gpt2_124m": _gpt2(12, 12, 768, 32, 16),
    "gpt2_350m": _gpt2(24, 16, 1024, 16, 32),
    "gpt2_774m": _gpt2(36, 20, 1280, 8, 64),
}
CONFIGS |= {f"capacity_d{d}": _width(CONFIGS["capacity"], d) for d in (128, 256)}

# Peak learning rate per method (min_lr keeps the config's ratio), from the sweeps in docs/results.md: a
# factor-2 grid on 2 seeds, then a factor-√2 grid around its picks on 5 seeds:
#   python -m experiments.lm.sweep --config capacity
#   python -m experiments.lm.sweep --config capacity --methods dense ste srste step sste sste_mvue sste_mvue_fp8 \
#       --lrs 0.006 0.0085 0.012 --seeds 0 1 2 3 4
#   python -m experiments.lm.sweep --config capacity --methods tsrste_df --lrs 0.0021 0.003 0.0042 --seeds 0 1 2 3 4
# (its grid extends twice, up to 8.3e-3)
# T-SR-STE with MVUE trains at T-SR-STE's rate. The S-STE ablations (experiments.ablate) train at
# S-STE's rate: each changes one thing of it.
_ABLATIONS = ("sste_fp8", "sste_beta_none", "sste_beta_l1", "sste_beta_refit")
TUNED_LR: dict[str, dict[str, float]] = {
    "capacity": {
        "dense": 1.2e-2,
        "ste": 8.5e-3,
        "srste": 8.5e-3,
        "tsrste_df": 5.9e-3,
        "tsrste_df_mvue": 5.9e-3,
        "step": 8.5e-3,
        "sste": 8.5e-3,
        "sste_mvue": 6e-3,
        "sste_mvue_fp8": 8.5e-3,
        **{name: 8.5e-3 for name in _ABLATIONS},
    },
    # python -m experiments.lm.sweep --config capacity_d128 --methods dense ste srste sste sste_mvue_fp8 \
    #     --lrs 0.003 0.006 0.012 --extend 0 --seeds 0 1 --final-seeds 0 1
    # and the same with --lrs 0.0042 0.006 0.0085 (factor √2): the best of both grids
    "capacity_d128": {"dense": 6e-3, "ste": 4.2e-3, "srste": 6e-3, "sste": 4.2e-3, "sste_mvue_fp8": 4.2e-3},
    # python -m experiments.lm.sweep --config capacity_d256 --methods dense ste srste sste sste_mvue_fp8 \
    #     --lrs 0.0015 0.003 0.006 --extend 1 --seeds 0 1 --final-seeds 0 1
    "capacity_d256": {"dense": 1.5e-3, "ste": 1.5e-3, "srste": 1.5e-3, "sste": 3e-3, "sste_mvue_fp8": 1.5e-3},
}

# STEP's switch per config (recipe fields), from `python -m experiments.lm.step_pilot --config capacity` (0,
# switching at T_max, had the lowest mean loss; the candidates from the statistic's quantiles fired at T_min).
STEP_RECIPE: dict[str, dict[str, float]] = {"capacity": {"switch_threshold": 0.0}}


def recipe_defaults(config: str, method: str) -> tuple[tuple[str, float], ...]:
    """The recipe changes a ``method`` run of ``config`` starts from: STEP's piloted switch, else none."""
    is_step = method in METHODS and METHODS[method].optimizer == "step"
    return tuple(sorted(STEP_RECIPE.get(config, {}).items())) if is_step else ()


def get_config(name: str, overrides=()) -> Config:
    """The config ``name`` with ``key=value`` overrides (e.g. ``["lr=3e-3", "steps=100"]``)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}: use one of {sorted(CONFIGS)}")
    return override(CONFIGS[name], overrides)
