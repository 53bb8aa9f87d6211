"""The sparse GEMMs of `sste_jax.sparse_dense` on Hopper: its forward and weight-gradient products through
cuSPARSELt and CUTLASS, and CUTLASS's operands emitted from ``W̃``.

Each computes what the core's dense ``dot_general`` computes, up to the bf16/fp8 rounding of another GEMM;
`sste_jax._backend` decides which runs where.

>>> import jax, jax.numpy as jnp
>>> x, w = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16), jax.ShapeDtypeStruct((256, 128), jnp.bfloat16)
>>> f = jax.jit(lambda x, w: cutlass_forward(x, w, False, jnp.bfloat16))
>>> "sste_cutlass_sparse_bf16" in f.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
True
"""

import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from sste_jax import _fp8
from sste_jax._config import FORWARD_WEIGHT
from sste_jax.kernels import _cusparselt as cusparselt
from sste_jax.kernels import _cutlass as cutlass

__all__ = ["cusparselt_forward", "cusparselt_weight_grad", "cutlass_forward", "cutlass_weight_grad", "cutlass_emit"]


def cusparselt_forward(x_TxI, w_IxO, fp8: bool, out_dtype):
    """``x @ W̃`` as ``(W̃ᵀ xᵀ)ᵀ`` on sparse tensor cores (bf16, or e4m3 with per-tensor scales)."""
    w_OxI = w_IxO.T
    if fp8:
        qx, sx = _fp8.quantize(x_TxI, _fp8.FORWARD)
        qw, sw = _fp8.quantize(w_OxI, _fp8.FORWARD)
        y = cusparselt.matmul(cusparselt.compress(qw), qx, w_OxI.shape[0], jnp.float32)
        return (y / (sx * sw)).astype(out_dtype)
    return cusparselt.sparse_linear(x_TxI.astype(jnp.bfloat16), w_OxI.astype(jnp.bfloat16)).astype(out_dtype)


def cusparselt_weight_grad(x_TxI, g_hat_TxO, fp8: bool, out_dtype):
    """``xᵀ ĝ`` with ``ĝ`` 2:4 along tokens: ``(ĝᵀ x)ᵀ``, i.e. A = ``ĝᵀ`` with K = tokens (bf16; cuSPARSELt has
    no e5m2 operands, so `sste_jax._backend` never picks it with ``fp8``)."""
    if fp8:
        raise ValueError("cuSPARSELt has no e5m2 operands: the FP8 weight gradient runs on the dense FP8 product")
    x_IxT = x_TxI.T.astype(jnp.bfloat16)
    g_OxT = g_hat_TxO.T.astype(jnp.bfloat16)
    return cusparselt.sparse_linear(x_IxT, g_OxT).astype(out_dtype)


def cutlass_emit(w_IxO, fp8: bool):
    """The CUTLASS forward operands of ``W̃``: ``(packed W̃ᵀ, scale)``, sm90 values + metadata in bf16 (scale None)
    or e4m3 with its per-tensor scale, named like ``W̃`` so that `sste_jax.remat_policy` saves them too and a
    rematerialised layer neither prunes nor emits again."""
    w_OxI = w_IxO.T
    if fp8:
        qw, sw = _fp8.quantize(w_OxI, _fp8.FORWARD)
        return checkpoint_name((cutlass.emit_sm90(qw), sw), FORWARD_WEIGHT)
    return checkpoint_name(cutlass.emit_sm90(w_OxI.astype(jnp.bfloat16)), FORWARD_WEIGHT), None


def cutlass_forward(x_TxI, w_IxO, fp8: bool, out_dtype, operands=None):
    """``x @ W̃`` as ``(W̃ᵀ xᵀ)ᵀ`` through CUTLASS: ``W̃ᵀ`` emitted once by `cutlass_emit` (or given as its
    ``operands``), with the e4m3 per-tensor scales folded into the epilogue's α."""
    packed, sw = cutlass_emit(w_IxO, fp8) if operands is None else operands
    if fp8:
        qx, sx = _fp8.quantize(x_TxI, _fp8.FORWARD)
        return cutlass.matmul(packed, qx, 1.0 / (sx * sw)).astype(out_dtype)
    return cutlass.matmul(packed, x_TxI.astype(jnp.bfloat16)).astype(out_dtype)


def cutlass_weight_grad(x_TxI, g_hat_TxO, fp8: bool, out_dtype):
    """``xᵀ ĝ`` with ``ĝ`` 2:4 along tokens: ``(ĝᵀ x)ᵀ``, A = ``ĝᵀ`` emitted with K = tokens (bf16, or both
    operands e5m2 with per-tensor scales, as the FP8 backward products of the core)."""
    x_IxT, g_OxT = x_TxI.T, g_hat_TxO.T
    if fp8:
        qg, sg = _fp8.quantize(g_OxT, _fp8.BACKWARD)
        qx, sx = _fp8.quantize(x_IxT, _fp8.BACKWARD)
        return cutlass.matmul(cutlass.emit_sm90(qg), qx, 1.0 / (sg * sx)).astype(out_dtype)
    return cutlass.sparse_linear(x_IxT.astype(jnp.bfloat16), g_OxT.astype(jnp.bfloat16)).astype(out_dtype)
