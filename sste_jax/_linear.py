"""The sparse linear transform ``x @ W̃`` as one ``jax.custom_vjp`` (``docs/algorithm.md#sparse-linear-transform``).

``method`` picks the forward weight ``W̃`` and the dense weight's gradient rule; ``mvue`` sparsifies
the output gradient of the weight-gradient product along tokens; ``fp8`` runs every product in FP8.
``"tsrste"`` (the T-SR-STE baseline) takes its forward mask as an argument: a `transposable_mask_24`
that the caller refreshes every few steps (`sste_jax.nnx.refresh_masks`); its gradient is straight
through, and its masked decay is the optimizer's (`sste_jax.optim.add_masked_decay`, after clipping).

>>> import jax, jax.numpy as jnp, sste_jax
>>> kernel = jax.random.normal(jax.random.key(0), (8, 3))
>>> beta = sste_jax.fit_beta(kernel)
>>> y = sste_jax.sparse_dense(jnp.ones((5, 8)), kernel, beta)
>>> y.shape
(5, 3)
"""

import dataclasses
import functools
import math
import numbers
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray, Real

from sste_jax import _fp8
from sste_jax._decay import srste_term
from sste_jax._fingerprint import digest
from sste_jax._sparsity import check_groupable, check_nm, hard_threshold_nm, soft_threshold_nm

__all__ = ["SparsityConfig", "sparse_dense", "forward_weight", "Pruned", "prune_weight"]

Method = Literal["dense", "ste", "srste", "tsrste", "sste"]
_METHODS = ("dense", "ste", "srste", "tsrste", "sste")
_BACKENDS = ("xla", "pallas", "auto")
_MATMULS = ("xla", "cusparselt", "cutlass")
FORWARD_WEIGHT = "sste_forward_weight"  # checkpoint name of W̃: a remat policy that saves it prunes once


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


def forward_weight(
    kernel: Float[Array, "*shape"],
    beta: Real[ArrayLike, ""],
    config: SparsityConfig,
    axis: int = 0,
    mask: Bool[Array, "*shape"] | None = None,
) -> Float[Array, "*shape"]:
    """The forward weight ``W̃`` of ``config.method`` (no custom gradient), in the kernel's dtype.

    For ``"sste"`` it is ``β·soft_threshold_nm(W, n, m)``, the product taken in float32 and rounded once;
    for ``"tsrste"`` it is ``W⊙mask`` (``mask`` required, see `check_mask`).

    >>> import jax, sste_jax
    >>> kernel = jax.random.normal(jax.random.key(0), (8, 3))
    >>> w = sste_jax.forward_weight(kernel, 1.5, sste_jax.SparsityConfig(method="ste"))
    >>> (w != 0).reshape(2, 4, 3).sum(1).tolist()
    [[2, 2, 2], [2, 2, 2]]
    """
    check_config(config, "forward_weight")
    kernel = jnp.asarray(kernel)
    check_mask(kernel, config, mask)
    check_beta(beta)
    if config.method == "dense":
        return kernel
    if config.method == "tsrste":
        return jnp.where(mask, kernel, jnp.zeros((), kernel.dtype))
    prune = _ops(config, products=False).prune
    if prune is not None and kernel.ndim == 2 and axis % 2 == 0:
        return prune(kernel, beta, config.method)
    if config.method in ("ste", "srste"):
        return hard_threshold_nm(kernel, config.n, config.m, axis)
    s = soft_threshold_nm(kernel.astype(jnp.float32), config.n, config.m, axis)  # one rounding, eager and jitted alike
    return (jnp.asarray(beta, jnp.float32) * s).astype(kernel.dtype)


class Pruned(NamedTuple):
    """What a sparse product computes from its weight alone, computed once (`prune_weight`) and passed to
    `sparse_dense` as ``pruned=`` so that a loop over micro-batches neither prunes nor emits again.

    Attributes:
      weight: the forward weight ``W̃`` (`forward_weight`), ``(in, out)`` in the kernel's dtype.
      operands: the GEMM backend's operands emitted from ``W̃`` (``matmul="cutlass"``), else None.
      decay: the gradient's weight-only term (SR-STE's ``srste_decay·(1 − mask)⊙W``), else None.

    >>> import jax, sste_jax
    >>> from sste_jax._linear import prune_weight
    >>> kernel = jax.random.normal(jax.random.key(0), (8, 3))
    >>> pruned = prune_weight(kernel, 1.0, sste_jax.SparsityConfig(method="srste"))
    >>> pruned.weight.shape, pruned.operands is None, pruned.decay.shape
    ((8, 3), True, (8, 3))
    """

    weight: Array
    operands: Any = None
    decay: Array | None = None


def prune_weight(
    kernel: Float[Array, "in out"],
    beta: Real[ArrayLike, ""],
    config: SparsityConfig,
    mask: Bool[Array, "in out"] | None = None,
) -> Pruned:
    """The `Pruned` weight of ``kernel``, which `sparse_dense` (``pruned=``) then reuses for every call with the
    same kernel: e.g. once per optimizer step outside a gradient-accumulation loop, as
    `sste_jax.nnx.accumulate_gradients` does. Gradients still reach ``kernel`` through `sparse_dense`'s rule;
    none flows through the `Pruned` values.

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> from sste_jax._linear import prune_weight
    >>> kernel = jax.random.normal(jax.random.key(0), (8, 3))
    >>> pruned = prune_weight(kernel, 1.5, sste_jax.SparsityConfig())
    >>> y = sste_jax.sparse_dense(jnp.ones((4, 8)), kernel, 1.5, pruned=pruned)
    >>> bool(jnp.array_equal(y, sste_jax.sparse_dense(jnp.ones((4, 8)), kernel, 1.5)))
    True
    """
    check_config(config, "prune_weight")
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"prune_weight: kernel must be 2-D (in, out), got shape {kernel.shape}")
    w_IxO = jax.lax.stop_gradient(forward_weight(kernel, beta, config, mask=mask))
    emit = _ops(config).emit if config.sparse else None
    operands = jax.lax.stop_gradient(emit(w_IxO, config.fp8)) if emit is not None else None
    decay = None
    if config.method == "srste":
        decay = jax.lax.stop_gradient(srste_term(kernel, config.srste_decay, n=config.n, m=config.m))
    return Pruned(w_IxO, operands, decay)


def check_pruned(pruned: Pruned, kernel: jax.Array, config: SparsityConfig) -> None:
    """Raises unless ``pruned`` is a `Pruned` of ``kernel``'s shape and dtype made for ``config``."""
    if not isinstance(pruned, Pruned):
        raise TypeError(f"pruned must be a Pruned from prune_weight(kernel, beta, config), got {type(pruned).__name__}")
    w = pruned.weight
    if w.shape != kernel.shape or w.dtype != kernel.dtype:
        raise ValueError(
            f"pruned.weight is {w.dtype}{list(w.shape)} but the kernel is {kernel.dtype}{list(kernel.shape)}: "
            "prune the kernel the product uses"
        )
    emitted = config.sparse and config.matmul == "cutlass"
    if (pruned.decay is not None) != (config.method == "srste") or (pruned.operands is not None) != emitted:
        raise ValueError(
            f"pruned was not made for method={config.method!r}, matmul={config.matmul!r}: "
            "prune_weight with the product's config"
        )


def check_mask(kernel: jax.Array, config: SparsityConfig, mask: jax.Array | None) -> None:
    """Raises unless ``mask`` is given exactly for ``"tsrste"``, boolean and shaped like ``kernel``."""
    if config.method != "tsrste":
        if mask is not None:
            raise ValueError(f"a mask is only used by method='tsrste', got one for method={config.method!r}")
        return
    if mask is None:
        raise ValueError(
            "method='tsrste' needs its mask: pass mask=transposable_mask_24(kernel), refreshed as you choose"
        )
    if mask.shape != kernel.shape or mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be bool of the kernel's shape {kernel.shape}, got {mask.dtype} {mask.shape}")


def check_beta(beta) -> None:
    """Raises unless ``beta`` is a scalar (β is one number per weight)."""
    shape = np.shape(beta)
    if shape != ():
        raise ValueError(f"beta must be a scalar (one per kernel), got an array of shape {tuple(shape)}")


def check_key(key) -> None:
    """Raises unless ``key`` is one PRNG key: a typed key of shape ``()`` or a raw uint32 key of shape ``(2,)``."""
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ValueError(
                f"the MVUE key must be a single PRNG key, got a batch of keys of shape {shape}; "
                "fold the step and layer into one key instead"
            )
        return
    if dtype != jnp.uint32 or shape != (2,):
        what = f"{dtype}{list(shape)}" if dtype is not None else type(key).__name__
        raise TypeError(
            f"the MVUE key must be a PRNG key (jax.random.key(seed)) or a raw uint32[2] key, got {what} {key!r}"[:300]
        )


def fresh_key(key: PRNGKeyArray, x: Array, kernel: Array) -> PRNGKeyArray:
    """``key`` with the digests of a product's input ``x`` and weight ``kernel`` folded in: the MVUE key
    of a library-owned product (``docs/algorithm.md#mvue-keys``).

    A layer keeps one key, drawn from its seed when it is made sparse, and never advances it: the draw is
    fresh whenever the product's input or weight changed (every micro-batch, every optimizer step), with
    no RNG state for a scan or a decoding loop to lose, and reproducible from the seed and the data (the
    bits of ``x`` and ``kernel``: another reduction order, e.g. another device layout, draws otherwise).
    Only the backward pass uses it, so under ``jit`` a forward pass computes none of it.

    >>> import jax, jax.numpy as jnp
    >>> key, w = jax.random.key(0), jnp.ones((8, 4))
    >>> a, b = fresh_key(key, jnp.ones((2, 8)), w), fresh_key(key, jnp.zeros((2, 8)), w)
    >>> bool((jax.random.key_data(a) != jax.random.key_data(b)).any())
    True
    """
    for a in (x, kernel):
        words = digest(jax.lax.stop_gradient(a))
        key = jax.random.fold_in(jax.random.fold_in(key, words[0]), words[1])
    return key


def check_mvue_tokens(tokens: int) -> None:
    """Raises unless the token count suits MVUE, which groups 4 consecutive tokens of the output gradient."""
    if tokens % 4:
        raise ValueError(
            f"MVUE (SparsityConfig(mvue=True)) groups 4 consecutive tokens of the output gradient: the token "
            f"count {tokens} must be divisible by 4 to differentiate (the forward pass takes any count); pad the "
            "batch or differentiate with mvue=False"
        )


def _product(a, b, contract, fp8_format):
    """``a·b`` over the given axes, in FP8 when ``fp8_format`` is set (float32 result), else as is."""
    if fp8_format is not None:
        return _fp8.fp8_dot(a, b, fp8_format, contract)
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims)


def _ops(config, products=True):
    """The implementations ``config`` chooses, resolved in one place: `sste_jax.kernels._backend.resolve`
    (imported on first use, as the kernels import Pallas)."""
    from sste_jax.kernels import _backend

    return _backend.resolve(config, products=products)


def _forward(config, x_TxI, w_IxO, dtype, operands=None):
    forward = _ops(config).forward
    if operands is not None:
        return forward(x_TxI, w_IxO, config.fp8, dtype, operands)
    if forward is not None:
        return forward(x_TxI, w_IxO, config.fp8, dtype)
    fmt = _fp8.FORWARD if config.fp8 else None
    return _product(x_TxI, w_IxO, (1, 0), fmt).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_matmul(config, x_TxI, kernel_IxO, beta, key, mask, pruned):
    return _sparse_matmul_fwd(config, x_TxI, kernel_IxO, beta, key, mask, pruned)[0]


def _sparse_matmul_fwd(config, x_TxI, kernel_IxO, beta, key, mask, pruned):
    if pruned is None:  # prune here (a GEMM backend emits its operands in the product)
        w_IxO = checkpoint_name(forward_weight(kernel_IxO, beta, config, mask=mask), FORWARD_WEIGHT)
        operands = decay = None
    else:  # pruned once by the caller: no prune, no emit here
        w_IxO, operands, decay = pruned
    y_TxO = _forward(config, x_TxI, w_IxO, jnp.result_type(x_TxI, kernel_IxO), operands)
    return y_TxO, (x_TxI, kernel_IxO, w_IxO, beta, key, mask, decay)


def _sparse_matmul_bwd(config, residuals, g_TxO):
    x_TxI, kernel_IxO, w_IxO, beta, key, mask, decay = residuals
    if config.mvue:
        check_mvue_tokens(g_TxO.shape[0])
    fmt = _fp8.BACKWARD if config.fp8 else None
    if config.fp8_fp16_grad:
        g_TxO = _fp8.to_float16(g_TxO)
    dx_TxI = _product(g_TxO, w_IxO, (1, 1), fmt)
    ops = _ops(config)
    g_hat_TxO = ops.mvue(key, g_TxO) if config.mvue else g_TxO
    if ops.weight_grad is not None:
        dw_IxO = ops.weight_grad(x_TxI, g_hat_TxO, config.fp8, kernel_IxO.dtype)
    else:
        dw_IxO = _product(x_TxI, g_hat_TxO, (0, 0), fmt).astype(kernel_IxO.dtype)
    if config.method == "srste":
        if decay is None:
            decay = srste_term(kernel_IxO, config.srste_decay, n=config.n, m=config.m)
        dw_IxO = dw_IxO + decay
    return dx_TxI.astype(x_TxI.dtype), dw_IxO, jnp.zeros_like(beta), None, None, None  # nothing flows to `pruned`


_sparse_matmul.defvjp(_sparse_matmul_fwd, _sparse_matmul_bwd)


def sparse_dense(
    x: Float[Array, "*batch in"],
    kernel: Float[Array, "in out"],
    beta: Real[ArrayLike, ""],
    key: PRNGKeyArray | None = None,
    config: SparsityConfig = SparsityConfig(),
    mask: Bool[Array, "in out"] | None = None,
    *,
    pruned: Pruned | None = None,
) -> Float[Array, "*batch out"]:
    """``x @ W̃`` with the gradient rule of ``config.method`` (no bias).

    Args:
      x: inputs ``(..., in)``; leading axes are flattened into the token axis.
      kernel: the dense weight ``W``, ``(in, out)``; 2:4 groups run along ``in``.
      beta: the frozen scale (used by ``"sste"`` only).
      key: PRNG key for MVUE (required when ``config.mvue``); fold in the step and the layer. MVUE
        acts in the backward pass only, which needs the token count divisible by 4.
      config: a `SparsityConfig`.
      mask: ``"tsrste"`` only (required there): the forward mask, e.g. ``transposable_mask_24(kernel)``.
      pruned: ``W̃`` (and the GEMM operands) computed beforehand by `prune_weight` from this kernel, β, config and
        mask, reused instead of pruning here; the kernel's gradient is the same.

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> kernel = jax.random.normal(jax.random.key(0), (8, 3))
    >>> config = sste_jax.SparsityConfig(mvue=True)
    >>> loss = lambda k: sste_jax.sparse_dense(jnp.ones((4, 8)), k, 1.5, jax.random.key(1), config).sum()
    >>> jax.grad(loss)(kernel).shape
    (8, 3)
    """
    check_config(config, "sparse_dense")
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be 2-D (in, out), got shape {kernel.shape}")
    if x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"x of shape {x.shape} does not match kernel of shape {kernel.shape} (in features)")
    if config.group_axis not in (None, 0, -2):
        raise ValueError(
            f"sparse_dense groups along the kernel's axis 0 (in); got SparsityConfig(group_axis={config.group_axis})"
        )
    if config.sparse:
        check_groupable(kernel, 0, config.m)
    check_mask(kernel, config, mask)
    check_beta(beta)
    x_TxI = x.reshape(-1, x.shape[-1])
    if config.mvue:
        if key is None:
            raise ValueError("SparsityConfig(mvue=True) needs a PRNG key: pass key=...")
        check_key(key)
    else:
        key = None
    beta = jnp.asarray(beta, jnp.float32)
    if pruned is not None:
        check_pruned(pruned, kernel, config)
        if not config.sparse:
            pruned = None  # nothing to prune
    y_TxO = _sparse_matmul(config, x_TxI, kernel, beta, key, mask, pruned)
    return y_TxO.reshape(x.shape[:-1] + (kernel.shape[1],))
