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

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray, Real

from sste_jax import _backend, _fp8
from sste_jax._config import FORWARD_WEIGHT, SparsityConfig, check_config
from sste_jax._decay import srste_term
from sste_jax._fingerprint import digest
from sste_jax._sparsity import check_groupable, hard_threshold_nm, soft_threshold_nm

__all__ = ["sparse_dense", "forward_weight", "PrunedWeight", "prune_weight", "forward_product", "fresh_key"]

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

    Args:
      kernel: the dense weight ``W``.
      beta: the frozen scale (``"sste"`` only).
      config: a `SparsityConfig`.
      axis: the axis the groups run along.
      mask: ``"tsrste"`` only (required there): the forward mask.

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
    return _forward_weight(kernel, beta, config, axis, mask, _backend.resolve(config, products=False).prune)


def _forward_weight(kernel, beta, config: SparsityConfig, axis: int, mask, prune):
    """`forward_weight` without its checks, pruning with ``prune`` (the resolved backend's kernel) where it applies."""
    if config.method == "dense":
        return kernel
    if config.method == "tsrste":
        return jnp.where(mask, kernel, jnp.zeros((), kernel.dtype))
    if prune is not None and kernel.ndim == 2 and axis % 2 == 0:
        return prune(kernel, beta, config.method)
    if config.method in ("ste", "srste"):
        return hard_threshold_nm(kernel, config.n, config.m, axis)
    s = soft_threshold_nm(kernel.astype(jnp.float32), config.n, config.m, axis)  # one rounding, eager and jitted alike
    return (jnp.asarray(beta, jnp.float32) * s).astype(kernel.dtype)


class PrunedWeight(NamedTuple):
    """A weight pruned for its product: the forward weight ``W̃`` and what the product computes from the weight
    alone, computed once (`prune_weight`) and passed to `sparse_dense` as ``pruned=`` so that a loop over
    micro-batches neither prunes nor emits again.

    Attributes:
      weight: the forward weight ``W̃`` (`forward_weight`), ``(in, out)`` in the kernel's dtype.
      operands: the GEMM backend's operands emitted from ``W̃`` (``matmul="cutlass"``), else None.
      decay: the gradient's weight-only term (SR-STE's ``srste_decay·(1 − mask)⊙W``), else None.

    >>> import jax, sste_jax
    >>> kernel = jax.random.normal(jax.random.key(0), (8, 3))
    >>> pruned = sste_jax.prune_weight(kernel, 1.0, sste_jax.SparsityConfig(method="srste"))
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
) -> PrunedWeight:
    """``kernel`` pruned for its product (a `PrunedWeight`), which `sparse_dense` (``pruned=``) then reuses for
    every call with the same kernel: e.g. once per optimizer step outside a gradient-accumulation loop, as
    `sste_jax.nnx.accumulate_gradients` does. Gradients still reach ``kernel`` through `sparse_dense`'s rule;
    none flows through the `PrunedWeight` values.

    Args:
      kernel: the dense weight ``W``, ``(in, out)``.
      beta: the frozen scale (``"sste"`` only).
      config: the product's `SparsityConfig`.
      mask: ``"tsrste"`` only (required there): the forward mask.

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> kernel = jax.random.normal(jax.random.key(0), (8, 3))
    >>> pruned = sste_jax.prune_weight(kernel, 1.5, sste_jax.SparsityConfig())
    >>> y = sste_jax.sparse_dense(jnp.ones((4, 8)), kernel, 1.5, pruned=pruned)
    >>> bool(jnp.array_equal(y, sste_jax.sparse_dense(jnp.ones((4, 8)), kernel, 1.5)))
    True
    """
    check_config(config, "prune_weight")
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"prune_weight: kernel must be 2-D (in, out), got shape {kernel.shape}")
    check_mask(kernel, config, mask)
    check_beta(beta)
    ops = _backend.resolve(config)
    w_IxO = jax.lax.stop_gradient(_forward_weight(kernel, beta, config, 0, mask, ops.prune))
    operands = jax.lax.stop_gradient(ops.emit(w_IxO, config.fp8)) if ops.emit is not None else None
    decay = None
    if config.method == "srste":
        decay = jax.lax.stop_gradient(srste_term(kernel, config.srste_decay, n=config.n, m=config.m))
    return PrunedWeight(w_IxO, operands, decay)


def check_pruned(pruned: PrunedWeight, kernel: jax.Array, config: SparsityConfig) -> None:
    """Raises unless ``pruned`` is a `PrunedWeight` of ``kernel``'s shape and dtype made for ``config``."""
    if not isinstance(pruned, PrunedWeight):
        raise TypeError(
            f"pruned must be a PrunedWeight from prune_weight(kernel, beta, config), got {type(pruned).__name__}"
        )
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


def _forward(ops: _backend.Ops, config, x_TxI, w_IxO, dtype, operands=None):
    if operands is not None:
        return ops.forward(x_TxI, w_IxO, config.fp8, dtype, operands)
    if ops.forward is not None:
        return ops.forward(x_TxI, w_IxO, config.fp8, dtype)
    fmt = _fp8.FORWARD if config.fp8 else None
    return _product(x_TxI, w_IxO, (1, 0), fmt).astype(dtype)


def forward_product(x: Float[Array, "*batch in"], w_tilde: Float[Array, "in out"], fp8: bool = False):
    """``x @ W̃`` for a weight pruned already, computed as `sparse_dense`'s forward pass computes it (FP8 included,
    no gradient rule): the product of the inference layers that hold ``W̃``, equal to the sparse layer's bit for bit.

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> kernel = jax.random.normal(jax.random.key(0), (8, 3))
    >>> w_tilde = sste_jax.forward_weight(kernel, 1.5, sste_jax.SparsityConfig())
    >>> x = jnp.ones((2, 8))
    >>> bool(jnp.array_equal(forward_product(x, w_tilde), sste_jax.sparse_dense(x, kernel, 1.5)))
    True
    """
    x_TxI = x.reshape(-1, x.shape[-1])
    fmt = _fp8.FORWARD if fp8 else None
    y_TxO = _product(x_TxI, w_tilde, (1, 0), fmt).astype(jnp.result_type(x, w_tilde))
    return y_TxO.reshape(x.shape[:-1] + (w_tilde.shape[1],))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sparse_matmul(config, ops, x_TxI, kernel_IxO, beta, key, mask, pruned):
    return _sparse_matmul_fwd(config, ops, x_TxI, kernel_IxO, beta, key, mask, pruned)[0]


def _sparse_matmul_fwd(config, ops, x_TxI, kernel_IxO, beta, key, mask, pruned):
    if pruned is None:  # prune here (a GEMM backend emits its operands in the product)
        w_IxO = _forward_weight(kernel_IxO, beta, config, 0, mask, ops.prune)
        w_IxO = checkpoint_name(w_IxO, FORWARD_WEIGHT)
        operands = decay = None
    else:  # pruned once by the caller: no prune, no emit here
        w_IxO, operands, decay = pruned
    y_TxO = _forward(ops, config, x_TxI, w_IxO, jnp.result_type(x_TxI, kernel_IxO), operands)
    return y_TxO, (x_TxI, kernel_IxO, w_IxO, beta, key, mask, decay)


def _sparse_matmul_bwd(config, ops, residuals, g_TxO):
    x_TxI, kernel_IxO, w_IxO, beta, key, mask, decay = residuals
    if config.mvue:
        check_mvue_tokens(g_TxO.shape[0])
    fmt = _fp8.BACKWARD if config.fp8 else None
    if config.fp8_fp16_grad:
        g_TxO = _fp8.to_float16(g_TxO)
    dx_TxI = _product(g_TxO, w_IxO, (1, 1), fmt)
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
    pruned: PrunedWeight | None = None,
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
    ops = _backend.resolve(config)  # once per product: the forward and backward passes share it
    y_TxO = _sparse_matmul(config, ops, x_TxI, kernel, beta, key, mask, pruned)
    return y_TxO.reshape(x.shape[:-1] + (kernel.shape[1],))
