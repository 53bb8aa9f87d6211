"""Vision configs by name; ``model.seq_len`` follows the dataset (patches + the class token).

- ``tiny``: CI, one block of width 16, seconds per method.
- ``small``: the README table, two blocks of width 64, 600 steps: ~20 s per method on digits,
  ~2.5 min on Fashion-MNIST (one CPU core each).

>>> cfg = get_config("small", ["dataset=fashion", "lr=1e-3"])
>>> cfg.data.dataset, cfg.model.seq_len, cfg.optim.lr
('fashion', 50, 0.001)
"""

import dataclasses

from experiments.common.config import Config, LoopConfig, ModelConfig, OptimConfig, override, parse_overrides
from experiments.vision.data import DATASETS


@dataclasses.dataclass(frozen=True)
class VisionData:
    """``dataset``: ``digits`` (8x8, 2x2 patches) or ``fashion`` (Fashion-MNIST, 28x28, 4x4 patches)."""

    dataset: str = "digits"

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset={self.dataset!r}: must be one of {sorted(DATASETS)}")


def tokens(dataset: str) -> int:
    """The ViT's sequence length on ``dataset``: its patch count + 1 (the class token)."""
    size, patch = DATASETS[dataset]
    return (size // patch) ** 2 + 1


CONFIGS = {
    "tiny": Config(ModelConfig(1, 2, 16, tokens("digits")), VisionData(),
                   OptimConfig(steps=6, batch_size=32, lr=3e-3, min_lr=3e-4, warmup=2, weight_decay=0.05),
                   LoopConfig(log_every=3, eval_every=6)),
    "small": Config(ModelConfig(2, 4, 64, tokens("digits")), VisionData(),
                    OptimConfig(steps=600, batch_size=64, lr=2e-3, min_lr=1e-4, warmup=50, weight_decay=0.05),
                    LoopConfig(log_every=50, eval_every=100)),
}


def get_config(name: str, overrides=()) -> Config:
    """The config ``name`` with ``key=value`` overrides (e.g. ``["dataset=fashion", "steps=100"]``) and
    ``model.seq_len`` set for its dataset."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}: use one of {sorted(CONFIGS)}")
    cfg = override(CONFIGS[name], overrides)
    n = tokens(cfg.data.dataset)
    if ("model", "seq_len") in parse_overrides(CONFIGS[name], overrides) and cfg.model.seq_len != n:
        raise ValueError(f"seq_len={cfg.model.seq_len}: on {cfg.data.dataset} it is the patch count + 1 = {n} "
                         "(leave it unset)")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, seq_len=n))
