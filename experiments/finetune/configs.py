"""Fine-tuning configs by name, and the learning rates tuned per row.

- ``tiny``: CI, the ``tiny`` language model on the synthetic novels, seconds per run.
- ``capacity``: the ``capacity`` language models (2 layers, d 64, byte-level, 64-byte context)
  fine-tuned on Austen's novels: 1000 steps of 32 windows, ~30 s per run on one CPU core.

The model part must be the pre-trained language model's (``pretrained`` names that LM config).

>>> get_config("capacity").data.pretrained
'capacity'
"""

import dataclasses

from experiments.common.config import Config, LoopConfig, OptimConfig, override
from experiments.lm.configs import CONFIGS as LM_CONFIGS


@dataclasses.dataclass(frozen=True)
class FinetuneData:
    """``corpus``: ``austen`` or ``synthetic``; ``pretrained``: the LM config of the starting runs;
    ``val_every``: every so many chapters held out; ``eval_per_class``: validation windows per novel."""

    corpus: str = "austen"
    pretrained: str = "capacity"
    val_every: int = 5
    eval_per_class: int = 200

    def __post_init__(self):
        if self.corpus not in ("austen", "synthetic"):
            raise ValueError(f"corpus={self.corpus!r}: must be 'austen' or 'synthetic'")
        if self.pretrained not in LM_CONFIGS:
            raise ValueError(f"pretrained={self.pretrained!r}: must be one of {sorted(LM_CONFIGS)}")
        for name in ("val_every", "eval_per_class"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (2 if name == "val_every" else 1):
                raise ValueError(f"{name}={value!r}: must be an integer >= {2 if name == 'val_every' else 1}")


def _on(lm: str, data: FinetuneData, optim: OptimConfig, loop: LoopConfig) -> Config:
    return Config(LM_CONFIGS[lm].model, data, optim, loop)


CONFIGS = {
    "tiny": _on("tiny", FinetuneData("synthetic", "tiny", eval_per_class=4),
                OptimConfig(steps=6, batch_size=4, lr=1e-3, min_lr=1e-4, warmup=2, weight_decay=0.01),
                LoopConfig(log_every=2, eval_every=3, ckpt_every=3)),
    "capacity": _on("capacity", FinetuneData(),
                    OptimConfig(steps=1000, batch_size=32, lr=1e-3, min_lr=1e-4, warmup=50, weight_decay=0.01),
                    LoopConfig(log_every=50, eval_every=250, ckpt_every=1000)),
}

# Peak learning rate per row (min_lr keeps the config's ratio), from the grid in docs/results.md:
#   python -m experiments.finetune.compare --lrs 1e-4 3e-4 1e-3 3e-3 --seeds 0 1
TUNED_LR: dict[str, dict[str, float]] = {
    "capacity": {"dense": 1e-3, "ste": 1e-3, "srste": 1e-3, "sste": 1e-3, "sste_mvue_fp8": 1e-3, "scratch_dense": 3e-4}
}


def get_config(name: str, overrides=()) -> Config:
    """The config ``name`` with ``key=value`` overrides; the model must stay the pre-trained one's."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}: use one of {sorted(CONFIGS)}")
    cfg = override(CONFIGS[name], overrides)
    if cfg.model != LM_CONFIGS[cfg.data.pretrained].model:
        raise ValueError(f"the model must be the pre-trained {cfg.data.pretrained!r} config's: "
                         f"{LM_CONFIGS[cfg.data.pretrained].model}, got {cfg.model}")
    return cfg
