"""One-pass prune + scale + compress of a 2:4 weight as a Pallas kernel.

Groups are 4 consecutive rows of a ``(K, N)`` kernel (axis 0, ``docs/algorithm.md#layout``). The kernel reads the weight
once and writes the compressed forward weight, the metadata of `compress_24` and the hard-mask bits.

>>> import jax, jax.numpy as jnp
>>> from sste_jax.kernels import prune_compress_24
>>> w = jnp.array([[1.0], [-4.0], [3.0], [2.0]])
>>> out = prune_compress_24(w, beta=1.0, method="sste", interpret=True)
>>> out.values.ravel().tolist(), out.meta.ravel().tolist(), out.mask_bits.ravel().tolist()
([-2.0, 1.0], [9], [6])
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, ArrayLike, Float, Real, UInt8

from sste_jax._sparsity import _select as select
from sste_jax._sparsity import _threshold, _top2_flags, check_groupable, decompress_24

__all__ = ["Compressed24", "prune_compress_24", "pallas_forward_weight"]

_METHODS = ("sste", "ste", "srste")


class Compressed24(NamedTuple):
    """A pruned 2:4 weight in compressed form, as `prune_compress_24` writes it for a ``(K, N)`` weight
    (``transpose=False``): the kept values and their metadata (`sste_jax.compress_24`'s layout) and the
    hard mask's bits.

    Attributes:
      values: ``(K/2, N)``, the two kept entries of each group of the forward weight, in index order.
      meta: ``(K/4, N)`` uint8, ``idx0 | idx1 << 2`` with the positions of ``mask_24(w)``.
      mask_bits: ``(K/4, N)`` uint8, bit ``k`` set when member ``k`` of the group is kept (flip rate).

    With ``transpose=True`` every array is transposed: ``(N, K/2)``, ``(N, K/4)``, ``(N, K/4)``.

    >>> import jax.numpy as jnp
    >>> from sste_jax.kernels import prune_compress_24
    >>> out = prune_compress_24(jnp.ones((8, 16)), method="ste")
    >>> out.values.shape, out.meta.shape, out.mask_bits.shape
    ((4, 16), (2, 16), (2, 16))
    """

    values: Float[Array, "..."]
    meta: UInt8[Array, "..."]
    mask_bits: UInt8[Array, "..."]


def _prune_kernel(beta_ref, w_ref, values_ref, meta_ref, bits_ref, *, method, transpose):
    parts = [w_ref[:, k, :] for k in range(4)]  # (BG, BN) each: member k of every group
    mags = [jnp.abs(p) for p in parts]
    keep = _top2_flags(mags)
    idx0 = jnp.where(keep[0], 0, jnp.where(keep[1], 1, 2))
    idx1 = jnp.where(keep[3], 3, jnp.where(keep[2], 2, 1))
    if method == "sste":
        # S(W) in float32 and β·S(W) rounded once, as `forward_weight` does.
        t = _threshold(*mags).astype(jnp.float32)
        beta = beta_ref[0]
        wide = [p.astype(jnp.float32) for p in parts]
        parts = [(beta * (p - jnp.minimum(jnp.maximum(p, -t), t))).astype(w_ref.dtype) for p in wide]
    v0, v1 = select(parts, idx0), select(parts, idx1)
    meta = (idx0 | (idx1 << 2)).astype(jnp.uint8)
    bits = sum(keep[k].astype(jnp.int32) << k for k in range(4)).astype(jnp.uint8)
    if transpose:
        v0, v1, meta, bits = v0.T, v1.T, meta.T, bits.T
        values_ref[:, :, 0] = v0
        values_ref[:, :, 1] = v1
    else:
        values_ref[:, 0, :] = v0
        values_ref[:, 1, :] = v1
    meta_ref[...] = meta
    bits_ref[...] = bits


def prune_compress_24(
    w: Float[Array, "K N"],
    beta: Real[ArrayLike, ""] | None = None,
    method: str = "sste",
    *,
    transpose: bool = False,
    block: tuple[int, int] = (8, 512),
    interpret: bool | None = None,
    num_warps: int | None = 4,
) -> Compressed24:
    """Prunes a ``(K, N)`` kernel 2:4 along K and compresses it in one pass.

    Equals ``compress_24``'s layout applied to ``forward_weight(w, beta, method)`` with the kept
    positions of ``mask_24(w)``: ``decompress_24(values, meta) == forward_weight(w, beta)`` bit for bit.

    Args:
      w: the dense weight, float32/bfloat16/float16; ``K`` divisible by 4.
      beta: the frozen scale, required for ``"sste"`` (ignored otherwise).
      method: ``"sste"`` (values ``β·S(W)``) or ``"ste"``/``"srste"`` (values the kept entries).
      transpose: emit the outputs for ``wᵀ`` (``(N, K/2)`` etc.), the layout of an ``(out, in)``
        sparse GEMM operand.
      block: ``(groups, columns)`` per program; powers of two for the GPU. Any shape is accepted:
        a ragged weight is zero-padded to whole blocks and the outputs cut back (an extra copy).
        The default was the fastest measured on an H100 (docs/kernels.md).
      interpret: run the kernel in the Pallas interpreter (default: on CPU).
      num_warps: Triton warps per program on GPU (default: Pallas's choice).

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> from sste_jax.kernels import prune_compress_24
    >>> w = jax.random.normal(jax.random.key(0), (8, 16))
    >>> out = prune_compress_24(w, beta=1.5)
    >>> dense = sste_jax.decompress_24(out.values, out.meta)
    >>> bool(jnp.array_equal(dense, sste_jax.forward_weight(w, 1.5, sste_jax.SparsityConfig())))
    True
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if w.ndim != 2:
        raise ValueError(f"prune_compress_24 needs a 2-D (K, N) weight, got shape {w.shape}")
    check_groupable(w, 0)
    if method == "sste" and beta is None:
        raise ValueError("method='sste' needs beta (the frozen scale from fit_beta)")
    beta = jnp.asarray(1.0 if beta is None else beta, jnp.float32).reshape(1)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _prune_call(w, beta, method, transpose, tuple(block), interpret, num_warps)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _prune_call(w, beta, method, transpose, block, interpret, num_warps):
    k, n = w.shape
    bg, bn = block
    g = pl.cdiv(k // 4, bg) * bg
    n = pl.cdiv(n, bn) * bn
    real = w.shape
    w = jnp.pad(w, ((0, 4 * g - k), (0, n - real[1])))  # a no-op for whole blocks
    k = 4 * g
    grid = (g // bg, n // bn)
    in_specs = [pl.BlockSpec((1,), lambda i, j: (0,)), pl.BlockSpec((bg, 4, bn), lambda i, j: (i, 0, j))]
    if transpose:
        out_shape = [
            jax.ShapeDtypeStruct((n, g, 2), w.dtype),
            jax.ShapeDtypeStruct((n, g), jnp.uint8),
            jax.ShapeDtypeStruct((n, g), jnp.uint8),
        ]
        out_specs = [
            pl.BlockSpec((bn, bg, 2), lambda i, j: (j, i, 0)),
            pl.BlockSpec((bn, bg), lambda i, j: (j, i)),
            pl.BlockSpec((bn, bg), lambda i, j: (j, i)),
        ]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((g, 2, n), w.dtype),
            jax.ShapeDtypeStruct((g, n), jnp.uint8),
            jax.ShapeDtypeStruct((g, n), jnp.uint8),
        ]
        out_specs = [
            pl.BlockSpec((bg, 2, bn), lambda i, j: (i, 0, j)),
            pl.BlockSpec((bg, bn), lambda i, j: (i, j)),
            pl.BlockSpec((bg, bn), lambda i, j: (i, j)),
        ]
    params = {}
    if num_warps is not None and not interpret:
        from jax.experimental.pallas import triton as pltriton

        params["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps, num_stages=1)
    values, meta, bits = pl.pallas_call(
        functools.partial(_prune_kernel, method=method, transpose=transpose),
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=interpret,
        **params,
    )(beta, w.reshape(g, 4, n))
    kg, kn = real[0] // 4, real[1]
    if transpose:
        return Compressed24(values[:kn, :kg].reshape(kn, 2 * kg), meta[:kn, :kg], bits[:kn, :kg])
    return Compressed24(values[:kg, :, :kn].reshape(2 * kg, kn), meta[:kg, :kn], bits[:kg, :kn])


def pallas_forward_weight(kernel_IxO, beta, method: str):
    """`sste_jax.forward_weight` for ``"ste"``/``"srste"``/``"sste"`` through the fused prune kernel, bit for bit.

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> w = jax.random.normal(jax.random.key(0), (8, 4))
    >>> bool(jnp.array_equal(pallas_forward_weight(w, 1.5, "sste"),
    ...                      sste_jax.forward_weight(w, 1.5, sste_jax.SparsityConfig())))
    True
    """
    compressed = prune_compress_24(kernel_IxO, beta, method)
    return decompress_24(compressed.values, compressed.meta)
