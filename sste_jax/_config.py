"""How a product is made sparse: `SparsityConfig`, its check, and the names of the product's residuals.

A pure module (no JAX transforms, no Flax): the product (`sste_jax._linear`), the kernels
(`sste_jax.kernels`) and the layers all read it.

>>> import sste_jax
>>> sste_jax.SparsityConfig(method="ste").sparse
True
"""

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Literal

import numpy as np

from sste_jax._sparsity import check_nm

__all__ = ["SparsityConfig", "check_config", "Method", "FORWARD_WEIGHT"]

Method = Literal["dense", "ste", "srste", "tsrste", "sste"]
_METHODS = ("dense", "ste", "srste", "tsrste", "sste")
_BACKENDS = ("xla", "pallas", "auto")
_MATMULS = ("xla", "cusparselt", "cutlass")
# the checkpoint name of W̃ and of its GEMM operands: a remat policy that saves them prunes once
FORWARD_WEIGHT = "sste_forward_weight"


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """How a linear layer is made 2:4 (or N:M) sparse.

    Attributes:
      method: ``"sste"`` (β·soft-threshold forward, identity gradient), ``"ste"`` (hard top-2, straight
        through), ``"srste"`` (hard top-2 plus ``srste_decay·(1 − mask)⊙W`` on the gradient),
        ``"tsrste"`` (``W⊙M`` with a given transposable mask ``M``, straight through) or ``"dense"``.
      mvue: sparsify the weight-gradient product's output gradient with `mvue_24` over tokens.
      fp8: run the three products in FP8 (e4m3fn forward, e5m2 backward), float32 accumulation.
      fp8_fp16_grad: with ``fp8``, round the output gradient to float16 before the backward products
        (and MVUE), as the S-STE authors' code does: entries under ~6e-8 flush to zero, and ours
        saturate at ±65504 where theirs overflow to inf (then NaN). Off by default: the gradient goes
        from its own dtype straight to the per-tensor scaled e5m2, which keeps those small entries.
      n, m: keep ``n`` of every ``m`` consecutive weights along the contraction axis (default 2:4).
      group_axis: which of the weight's axes the groups run along when a product contracts several
        (`sste_jax.sparsify` on an attention output projection ``(heads, head_dim, embed)``), counted in
        the parameter's own axes; None (default) takes the innermost contraction axis. Products with one
        contraction axis (`sparse_dense`, `SparseLinear`) always group along it.
        Outside 2:4 (e.g. 1:4, 2:8), MVUE, ``"tsrste"``, the Pallas backend and cuSPARSELt raise:
        they are 2:4 only.
      srste_decay: SR-STE's λ.
      masked_decay: T-SR-STE's α. Its term ``α·(1 − M)⊙W`` joins the gradient after clipping, as its
        authors', so the optimizer adds it (`sste_jax.optim.add_masked_decay`), not the layer; the layer
        records α (in β's metadata and checkpoints) for the recipe that builds that optimizer.
      backend: how the pruning is computed: ``"xla"`` (pure JAX), ``"pallas"`` (fused kernels of
        `sste_jax.kernels`, bit-identical) or ``"auto"`` (the faster one measured on the platform).
      matmul: ``"xla"`` (dense products), ``"cusparselt"`` (forward and MVUE weight-gradient products
        on Hopper's sparse tensor cores, bf16 or e4m3 forward) or ``"cutlass"`` (the same through CUTLASS's
        sm90 sparse GEMMs, also the e5m2 weight-gradient product with ``fp8``); both need an NVIDIA Hopper
        GPU and raise on other platforms when the product runs, see `sste_jax.kernels`.

    >>> import sste_jax
    >>> config = sste_jax.SparsityConfig(method="srste")
    >>> config.sparse, config.srste_decay
    (True, 0.0002)
    """

    method: Method = "sste"
    mvue: bool | np.bool_ = False  # stored as bool
    fp8: bool | np.bool_ = False  # stored as bool
    srste_decay: numbers.Real = 2e-4
    masked_decay: numbers.Real = 6e-5
    backend: Literal["xla", "pallas", "auto"] = "xla"
    matmul: Literal["xla", "cusparselt", "cutlass"] = "xla"
    fp8_fp16_grad: bool = False
    n: int = 2
    m: int = 4
    group_axis: int | None = None

    def __post_init__(self):
        for name in ("method", "backend", "matmul"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"SparsityConfig.{name} must be a string, got {getattr(self, name)!r}")
        for name in ("mvue", "fp8", "fp8_fp16_grad"):
            value = getattr(self, name)
            if not isinstance(value, bool | np.bool_):
                raise TypeError(f"SparsityConfig.{name} must be True or False, got {value!r} ({type(value).__name__})")
            object.__setattr__(self, name, bool(value))
        for name in ("srste_decay", "masked_decay"):
            value = getattr(self, name)
            if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
                raise TypeError(f"SparsityConfig.{name} must be a real number, got {value!r} ({type(value).__name__})")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"SparsityConfig.{name} must be >= 0 and finite, got {value!r}")
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {self.method!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.matmul not in _MATMULS:
            raise ValueError(f"matmul must be one of {_MATMULS}, got {self.matmul!r}")
        check_nm(self.n, self.m)
        if self.group_axis is not None and (isinstance(self.group_axis, bool) or not isinstance(self.group_axis, int)):
            raise TypeError(f"SparsityConfig.group_axis must be an int or None, got {self.group_axis!r}")
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "m", int(self.m))
        if not self.is_24:
            only_24 = [f for f, on in (("mvue=True", self.mvue), ("method='tsrste'", self.method == "tsrste"),
                                       (f"backend={self.backend!r}", self.backend == "pallas"),
                                       (f"matmul={self.matmul!r}", self.matmul != "xla")) if on]
            if only_24:
                raise ValueError(f"SparsityConfig(n={self.n}, m={self.m}): {', '.join(only_24)} exist for 2:4 only")
        if self.fp8_fp16_grad and not self.fp8:
            raise ValueError("SparsityConfig.fp8_fp16_grad=True rounds the gradient before FP8: it needs fp8=True")
        if self.matmul != "xla" and self.method == "dense":
            raise ValueError(f"matmul={self.matmul!r} needs a 2:4 method, got method='dense'")

    @property
    def sparse(self) -> bool:
        """Whether the forward weight is N:M sparse."""
        return self.method != "dense"

    @property
    def is_24(self) -> bool:
        """Whether the pattern is 2:4 (the hardware format and every kernel's)."""
        return (self.n, self.m) == (2, 4)


def check_config(config, where: str, argument: str = "config") -> None:
    """Raises `TypeError` unless ``config`` is a `SparsityConfig`; ``where`` and ``argument`` name the
    call and its argument. A dict (e.g. read from JSON) is the usual mistake: the message shows the fix."""
    if isinstance(config, SparsityConfig):
        return
    if isinstance(config, Mapping):
        fix = f"build it with sste_jax.SparsityConfig(**d), here SparsityConfig(**{dict(config)!r})"
    else:
        fix = "build one with sste_jax.SparsityConfig(method=..., ...)"
    got = f"{type(config).__name__} {dict(config) if isinstance(config, Mapping) else config!r}"
    raise TypeError(f"{where}: {argument} must be a sste_jax.SparsityConfig, got {got[:200]}; {fix[:300]}")
