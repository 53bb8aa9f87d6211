"""Experiment configs by name: `tiny` (tests), `small` (the README comparison on a 2-core CPU) and the
paper's GPT-2 sizes (SPEC §7, for GPUs).

>>> cfg = get_config("tiny", ["lr=1e-3", "batch_size=4"])
>>> cfg.lr, cfg.batch_size, cfg.d_model
(0.001, 4, 32)
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
    """Model, data and optimisation settings of one training run."""

    # model
    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    # data
    corpus: str = "shakespeare"
    tokenizer: str = "gpt2"
    # optimisation (SPEC §7: AdamW 0.9/0.95, wd 0.1, clip 1.0, warmup + cosine to min_lr)
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1.5e-4
    min_lr: float = 1e-5
    warmup: int = 100
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    clip: float = 1.0
    # bookkeeping
    log_every: int = 50
    eval_every: int = 200
    eval_batches: int = 8
    ckpt_every: int = 500
    keep_checkpoints: int = 3  # older checkpoints are deleted

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.d_model % 4:
            raise ValueError(f"d_model={self.d_model} must be divisible by 4 for 2:4 sparsity")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "ckpt_every", "seq_len",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


CONFIGS = {
    # CI: a 2-layer byte-level model on the synthetic corpus, seconds per run.
    "tiny": Config(
        n_layer=2, n_head=2, d_model=32, seq_len=16, corpus="synthetic", tokenizer="byte",
        steps=8, batch_size=4, lr=3e-3, min_lr=3e-4, warmup=2, log_every=2, eval_every=4,
        eval_batches=2, ckpt_every=4,
    ),
    # The README comparison: the SPEC §8 pilot shape (byte-level Shakespeare), sized so that
    # 7 methods x 2 seeds fit 15 minutes on 2 CPU cores (one single-threaded run per core).
    "small": Config(
        n_layer=4, n_head=4, d_model=128, seq_len=64, corpus="shakespeare", tokenizer="byte",
        steps=800, batch_size=16, lr=6e-3, min_lr=6e-4, warmup=80, log_every=20, eval_every=100,
        eval_batches=8, ckpt_every=400,
    ),
    # The paper's GPT-2 sizes (SPEC §7), for GPUs: 512 x 1024 tokens per step via accumulation.
    "gpt2_124m": Config(
        n_layer=12, n_head=12, d_model=768, seq_len=1024, steps=300_000, batch_size=32, grad_accum=16,
        lr=1.5e-4, min_lr=1e-5, warmup=3000, log_every=100, eval_every=2000, eval_batches=50,
        ckpt_every=5000,
    ),
    "gpt2_350m": Config(
        n_layer=24, n_head=16, d_model=1024, seq_len=1024, steps=300_000, batch_size=16, grad_accum=32,
        lr=1.5e-4, min_lr=1e-5, warmup=3000, log_every=100, eval_every=2000, eval_batches=50,
        ckpt_every=5000,
    ),
    "gpt2_774m": Config(
        n_layer=36, n_head=20, d_model=1280, seq_len=1024, steps=300_000, batch_size=8, grad_accum=64,
        lr=1.5e-4, min_lr=1e-5, warmup=3000, log_every=100, eval_every=2000, eval_batches=50,
        ckpt_every=5000,
    ),
}


def _parse(kind: type, key: str, text: str):
    if kind is int:
        value = float(text)
        if not value.is_integer():
            raise ValueError(f"override {key}={text}: {key} must be an integer")
        return int(value)
    return kind(text)


def parse_overrides(cls: type, overrides: list[str] | tuple[str, ...]) -> dict:
    """``{field: value}`` of ``key=value`` strings for the int/float/str fields of dataclass ``cls``."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.type in (int, float, str)}
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"bad override {item!r}: expected key=value with key in {sorted(fields)}")
        changes[key] = _parse(fields[key].type, key, value)
    return changes


def get_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config ``name`` with ``key=value`` overrides (e.g. ``["lr=3e-3", "steps=100"]``)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}: use one of {sorted(CONFIGS)}")
    return dataclasses.replace(CONFIGS[name], **parse_overrides(Config, overrides))
