"""Configs in parts (model shape, task data, optimisation, loop bookkeeping) and ``key=value`` overrides.

Every task's config is a `Config` of four frozen dataclasses; each part validates its own fields at
construction, so a bad value fails when the command line is parsed, naming the field. Overrides name
a field by its own name when that is unique across the parts (``lr=3e-3``) or by ``part.field``
(``optim.lr=3e-3``); a field given twice is refused.

>>> cfg = Config(ModelConfig(2, 2, 64, 64), None, OptimConfig(steps=100, lr=3e-3, min_lr=3e-4), LoopConfig())
>>> override(cfg, ["lr=6e-3", "loop.log_every=10"]).optim.lr
0.006
>>> with_lr(cfg, 6e-3).optim.min_lr
0.0006
>>> sets_lr(cfg, ["optim.lr=6e-3"]), sets_lr(cfg, ["min_lr=1e-4"])
(True, False)
"""

import dataclasses
import hashlib
import json
import math
from typing import Any


def _require(ok: bool, field: str, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r}: {rule}")


def _positive_ints(obj, names) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A pre-LN Transformer's shape: ``seq_len`` is the context (LM), the token count (ViT) or the
    cap on the pair length (translation)."""

    n_layer: int
    n_head: int
    d_model: int
    seq_len: int

    def __post_init__(self):
        _positive_ints(self, ("n_layer", "n_head", "d_model", "seq_len"))
        _require(self.d_model % self.n_head == 0, "d_model", self.d_model, f"must be divisible by n_head={self.n_head}")
        _require(self.d_model % 4 == 0, "d_model", self.d_model, "must be divisible by 4 (2:4 groups)")
        _require(self.seq_len <= 1 << 16, "seq_len", self.seq_len, "must be <= 65536")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW (or STEP) with global-norm clipping, linear warmup and cosine decay to ``min_lr``."""

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

    def __post_init__(self):
        _positive_ints(self, ("steps", "batch_size", "grad_accum"))
        _require(_finite(self.lr) and self.lr > 0, "lr", self.lr, "must be a finite number > 0")
        _require(_finite(self.min_lr) and 0 <= self.min_lr <= self.lr, "min_lr", self.min_lr,
                 f"must be finite and in [0, lr={self.lr}]")
        _require(isinstance(self.warmup, int) and 0 <= self.warmup <= self.steps, "warmup", self.warmup,
                 f"must be an integer in [0, steps={self.steps}]")
        for name in ("b1", "b2"):
            value = getattr(self, name)
            _require(_finite(value) and 0 <= value < 1, name, value, "must be in [0, 1)")
        _require(_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay,
                 "must be a finite number >= 0")
        _require(_finite(self.clip) and self.clip > 0, "clip", self.clip, "must be a finite number > 0")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How often the loop logs train metrics, evaluates and checkpoints (in steps); checkpoints kept."""

    log_every: int = 50
    eval_every: int = 200
    ckpt_every: int = 500
    keep_checkpoints: int = 3

    def __post_init__(self):
        _positive_ints(self, ("log_every", "eval_every", "ckpt_every", "keep_checkpoints"))


@dataclasses.dataclass(frozen=True)
class Config:
    """One task's settings: ``data`` is the task's own dataclass (or None)."""

    model: ModelConfig
    data: Any
    optim: OptimConfig
    loop: LoopConfig

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PARTS = ("model", "data", "optim", "loop")
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _fields(cfg: Config) -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """``{field name: [(part, field), ...]}`` of the overridable (int/float/str/bool) fields."""
    out: dict[str, list] = {}
    for part in PARTS:
        obj = getattr(cfg, part)
        for f in dataclasses.fields(obj) if dataclasses.is_dataclass(obj) else ():
            kind = f.type if isinstance(f.type, type) else _TYPES.get(str(f.type))
            if kind in (int, float, str, bool):
                out.setdefault(f.name, []).append((part, f))
    return out


def _parse(kind: type, key: str, text: str):
    kind = kind if isinstance(kind, type) else _TYPES[str(kind)]
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if kind is int:
            value = float(text)
            if not value.is_integer():
                raise ValueError
            return int(value)
        return kind(text)
    except ValueError:
        raise ValueError(f"{key}={text!r}: {key} must be {'an' if kind is int else 'a'} {kind.__name__}") from None


def parse_overrides(cfg: Config, items) -> dict[tuple[str, str], Any]:
    """``{(part, field): value}`` of ``key=value`` strings; unknown, ambiguous or repeated keys raise."""
    fields = _fields(cfg)
    changes: dict[tuple[str, str], Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        part, _, name = key.rpartition(".")
        candidates = [(p, f) for p, f in fields.get(name, []) if not part or p == part]
        if not sep:
            raise ValueError(f"bad override {item!r}: expected key=value")
        if not candidates:
            raise ValueError(f"unknown setting {key!r} in {item!r}: use one of {sorted(fields)} (or part.field)")
        if len(candidates) > 1:
            raise ValueError(f"{name!r} is a field of {[p for p, _ in candidates]}: write part.{name}")
        (p, f), = candidates
        if (p, f.name) in changes:
            raise ValueError(f"{p}.{f.name} is set twice ({item!r}): give each setting once")
        changes[(p, f.name)] = _parse(f.type, key, text)
    return changes


def override(cfg: Config, items) -> Config:
    """``cfg`` with ``key=value`` overrides (each part re-validated)."""
    by_part: dict[str, dict] = {}
    for (part, name), value in parse_overrides(cfg, items).items():
        by_part.setdefault(part, {})[name] = value
    return dataclasses.replace(cfg, **{p: dataclasses.replace(getattr(cfg, p), **v) for p, v in by_part.items()})


def with_lr(cfg: Config, lr: float) -> Config:
    """``cfg`` with peak learning rate ``lr`` and ``min_lr`` scaled by the same factor."""
    optim = cfg.optim
    return dataclasses.replace(cfg, optim=dataclasses.replace(optim, lr=lr, min_lr=lr * (optim.min_lr / optim.lr)))


def sets_lr(cfg: Config, items) -> bool:
    """Whether the ``key=value`` overrides ``items`` set the peak learning rate (``lr=`` or ``optim.lr=``)."""
    return ("optim", "lr") in parse_overrides(cfg, items)


def identity_hash(identity: dict) -> str:
    """A short SHA-256 of ``identity`` in canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differing_fields(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the entries where nested dicts ``a`` and ``b`` differ, with both values."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differing_fields(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} != {vb!r}")
    return out


def parse_fields(cls: type, items) -> dict[str, Any]:
    """``{field: value}`` of ``key=value`` strings for the int/float/str/bool fields of dataclass
    ``cls`` (e.g. a recipe); unknown or repeated keys raise, naming them."""
    fields = {f.name: f for f in dataclasses.fields(cls)
              if (f.type if isinstance(f.type, type) else _TYPES.get(str(f.type))) in (int, float, str, bool)}
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"bad setting {item!r}: expected key=value with key in {sorted(fields)}")
        if key in changes:
            raise ValueError(f"{key} is set twice ({item!r}): give each setting once")
        changes[key] = _parse(fields[key].type, key, text)
    return changes
