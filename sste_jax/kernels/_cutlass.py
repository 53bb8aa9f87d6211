"""CUTLASS sm90 2:4 sparse GEMMs on Hopper through an XLA FFI custom call, and their operand emitters. Optional.

``D = α·A @ Bᵀ`` with ``A`` ``(M, K)`` 2:4 sparse along ``K`` and ``B`` ``(N, K)``, the result given
as ``(N, M)`` (the "linear" layout of `sste_jax.kernels.cusparselt`). ``A`` enters compressed, as
`emit_sm90` writes it in pure JAX: the kept values ``(M, K/2)`` row-major and the metadata bytes
``E`` in the layout of CUTLASS's ``Sm90GemmSparseConfig::fill_layoutE`` (docs/kernels.md). Operand
types: bf16 (tile 128×128×64), e4m3 and e5m2 (tile 128×256×128); float32 accumulation, bf16 out.
The extension is compiled on first use with ``nvcc`` for ``sm_90a`` against the ``nvidia-cutlass``
wheel's headers; without them `build` raises a `RuntimeError` saying what is missing.

>>> import jax.numpy as jnp
>>> from sste_jax.kernels import cutlass
>>> a_MxK = jnp.tile(jnp.array([1.0, 0.0, 0.0, 2.0], jnp.bfloat16), (64, 16))
>>> packed = cutlass.emit_sm90(a_MxK)
>>> packed.values.shape, packed.meta.shape, packed.meta.dtype
((64, 32), (512,), dtype('uint8'))
"""

import ctypes
import functools
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Shaped, UInt8

from sste_jax.kernels import _toolchain

__all__ = ["Sm90Sparse", "emit_sm90", "atom_k", "meta_nbytes", "build", "compress_reference", "matmul", "sparse_linear"]

_SOURCE = pathlib.Path(__file__).parent / "csrc" / "cutlass_sm90_sparse.cu"
ATOM_M = 64  # rows of one metadata atom (four 16-row WGMMA metadata blocks)
# Operand dtype (both operands share it) -> the FFI targets' suffix. The 8-bit kernels use tile K 128.
_SUFFIX = {jnp.dtype(jnp.bfloat16): "bf16", jnp.dtype(jnp.float8_e4m3fn): "e4m3", jnp.dtype(jnp.float8_e5m2): "e5m2"}
_SYMBOLS = {f"sste_cutlass_{op}_{t}": f"SsteCutlass{op.capitalize()}{t.capitalize()}"
            for op in ("sparse", "compress") for t in _SUFFIX.values()}  # fmt: skip


class Sm90Sparse(NamedTuple):
    """A 2:4 matrix ``(M, K)`` in CUTLASS sm90's compressed form: ``values`` ``(M, K/2)`` (kept entries of
    each group of 4 in index order, row-major) and ``meta`` (the ``E`` bytes, flat, padded to whole atoms)."""

    values: Shaped[Array, "M Khalf"]
    meta: UInt8[Array, " nbytes"]


def _check_dtype(dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if dtype not in _SUFFIX:
        raise TypeError(f"the CUTLASS sm90 path takes bfloat16, float8_e4m3fn or float8_e5m2 operands, got {dtype}")
    return dtype


def atom_k(dtype) -> int:
    """Logical ``K`` of one metadata atom for ``dtype``: the kernel's tile K (64 for bf16, 128 for 8-bit types).

    >>> import jax.numpy as jnp
    >>> from sste_jax.kernels import cutlass
    >>> cutlass.atom_k(jnp.bfloat16), cutlass.atom_k(jnp.float8_e4m3fn)
    (64, 128)
    """
    return 64 if _check_dtype(dtype).itemsize == 2 else 128


def meta_nbytes(m: int, k: int, dtype) -> int:
    """Bytes of the metadata ``E`` of an ``(m, k)`` 2:4 matrix: 4 bits per group, ``m`` and ``k`` padded to
    whole atoms (64 rows by `atom_k` columns).

    >>> import jax.numpy as jnp
    >>> from sste_jax.kernels import cutlass
    >>> cutlass.meta_nbytes(100, 64, jnp.bfloat16)  # 128 padded rows x 64 columns / 8 columns per byte
    1024
    """
    ak = atom_k(dtype)
    return -(-m // ATOM_M) * ATOM_M * -(-k // ak) * ak // 8


def _nibbles(a_MxK):
    """CUTLASS's compressor rule per group of 4: kept values (nonzero entries in order, a lone one padded with
    a zero, in slot 1 when it is entry 3) and the 4-bit code ``idx0 | idx1 << 2``."""
    m, k = a_MxK.shape
    g = a_MxK.reshape(m, k // 4, 4)
    nz = g != 0  # -0.0 counts as zero, as in CUTLASS's compressor
    count = nz.sum(-1)
    pos = jnp.arange(4).reshape(1, 1, 4)
    # first and second nonzero index (4 when absent)
    first = jnp.min(jnp.where(nz, pos, 4), -1)
    second = jnp.min(jnp.where(nz & (pos > first[..., None]), pos, 4), -1)
    lone_last = (count == 1) & (first == 3)
    idx0 = jnp.where(count == 0, 0, jnp.where(lone_last, 0, first))
    idx1 = jnp.where(count == 0, 0, jnp.where(count == 1, 3, second))
    zero = jnp.zeros((), a_MxK.dtype)
    v0 = jnp.where((count == 0) | lone_last, zero, jnp.take_along_axis(g, jnp.minimum(first, 3)[..., None], -1)[..., 0])
    v1 = jnp.where(count == 2, jnp.take_along_axis(g, jnp.minimum(second, 3)[..., None], -1)[..., 0],
                   jnp.where(lone_last, g[..., 3], zero))  # fmt: skip
    values = jnp.stack([v0, v1], -1).reshape(m, k // 2)
    return values, (idx0 | (idx1 << 2)).astype(jnp.uint8)


def emit_sm90(a: Shaped[Array, "M K"]) -> Sm90Sparse:
    """Compresses ``a`` (2:4 along ``K``: at most 2 nonzeros in every group of 4) into `Sm90Sparse`, byte for byte
    what CUTLASS's sm90 compressor (``SM90StructuredSparseCompressor``) writes for the kernels of this module.

    ``K`` must be a multiple of 16 (bf16) or 32 (8-bit types); ``M`` and ``K`` need not fill whole atoms (the
    metadata pads with zero).
    Pure JAX: runs anywhere, jitted or not.

    >>> import jax.numpy as jnp
    >>> from sste_jax.kernels import cutlass
    >>> a = jnp.zeros((64, 64), jnp.bfloat16).at[0, :4].set(jnp.array([0, 5, 0, 7], jnp.bfloat16))
    >>> packed = cutlass.emit_sm90(a)
    >>> packed.values[0, :2].tolist(), int(packed.meta[0])  # kept indices 1, 3: 1 | 3 << 2 = 13
    ([5.0, 7.0], 13)
    """
    a = jnp.asarray(a)
    dtype = _check_dtype(a.dtype)
    if a.ndim != 2:
        raise ValueError(f"A must be 2-D (M, K), got shape {a.shape}")
    m, k = a.shape
    k_align = 16 if dtype.itemsize == 2 else 32  # 16 bytes of kept values per row segment (TMA); CUTLASS pads rows
    if k % k_align:
        raise ValueError(f"A's K (axis 1) must be a multiple of {k_align} for {dtype} sm90 sparse operands: {a.shape}")
    values, codes = _nibbles(a)
    ak = atom_k(dtype)
    mp, kp = -(-m // ATOM_M) * ATOM_M, -(-k // ak) * ak
    codes = jnp.pad(codes, ((0, mp - m), (0, (kp - k) // 4)))
    byte_MxKb = codes[:, 0::2] | (codes[:, 1::2] << 4)  # two groups per byte, the first in the low nibble
    kt, kb = kp // ak, ak // 8
    if dtype.itemsize == 2:  # atom ((8,2,4),(16,2,NumK)) ordered (m1, k2, m0, k1, m2) after the 16 contiguous k
        nk = ak // 32
        b = byte_MxKb.reshape(mp // 64, 4, 2, 8, kt, nk, 2, 2)  # (mt, m2, m1, m0, kt, k2, k1, kb)
        meta = b.transpose(4, 0, 1, 6, 3, 5, 2, 7)
    else:  # 8-bit atom: (64, tile K) row-major
        meta = byte_MxKb.reshape(mp // 64, 64, kt, kb).transpose(2, 0, 1, 3)
    return Sm90Sparse(values, meta.reshape(-1))


def build(force: bool = False) -> pathlib.Path:
    """Compiles the FFI extension for ``sm_90a`` (once per source and toolchain) and returns its path.

    >>> from sste_jax.kernels import cutlass
    >>> path = cutlass.build()  # doctest: +SKIP
    """
    return _toolchain.compile_extension(_SOURCE, "sste_cutlass_sm90", force=force)


@functools.cache
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    for name, symbol in _SYMBOLS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="CUDA")
    return lib


def compress_reference(a: Shaped[Array, "M K"]) -> Sm90Sparse:
    """CUTLASS's own sm90 compressor (``SM90StructuredSparseCompressor``, on the GPU) for the kernels of this
    module: the golden reference `emit_sm90` is checked against byte for byte. Needs CUDA.

    >>> import jax.numpy as jnp
    >>> from sste_jax.kernels import cutlass
    >>> ref = cutlass.compress_reference(jnp.ones((64, 64), jnp.bfloat16).at[:, ::2].set(0))  # doctest: +SKIP
    """
    dtype = _check_dtype(a.dtype)
    if a.ndim != 2 or a.shape[1] % (16 if dtype.itemsize == 2 else 32):
        raise ValueError(f"A must be (M, K) with K a multiple of {16 if dtype.itemsize == 2 else 32}, got {a.shape}")
    m, k = a.shape
    if jax.default_backend() == "gpu":
        _library()
    out = (jax.ShapeDtypeStruct((m, k // 2), dtype), jax.ShapeDtypeStruct((meta_nbytes(m, k, dtype),), jnp.uint8))
    values, meta = jax.ffi.ffi_call(f"sste_cutlass_compress_{_SUFFIX[dtype]}", out)(a, m=np.int64(m), k=np.int64(k))
    return Sm90Sparse(values, meta)


def matmul(
    packed: Sm90Sparse, b: Shaped[Array, "N K"], alpha: Float[Array, ""] | float = 1.0
) -> Float[Array, "N M"]:
    """``α · b @ Aᵀ`` in bf16 for the ``(M, K)`` matrix ``A`` that `emit_sm90` packed (``M`` = rows of
    ``packed.values``). ``b`` has ``A``'s dtype; ``α`` a float32 scalar
    (for FP8, the inverse of the two per-tensor scales).

    >>> import jax.numpy as jnp
    >>> from sste_jax.kernels import cutlass
    >>> packed = cutlass.emit_sm90(jnp.ones((128, 64), jnp.bfloat16).at[:, 1::2].set(0))
    >>> y = cutlass.matmul(packed, jnp.ones((256, 64), jnp.bfloat16))  # doctest: +SKIP
    """
    values, meta = packed
    dtype = _check_dtype(values.dtype)
    if jnp.dtype(b.dtype) != dtype:
        raise TypeError(f"a {dtype} sparse operand multiplies a {dtype} dense operand, got {b.dtype}")
    if b.ndim != 2 or values.ndim != 2:
        raise ValueError(f"values must be (M, K/2) and b (N, K); got {values.shape} and {b.shape}")
    (m, half), (n, k) = values.shape, b.shape
    if 2 * half != k:
        raise ValueError(f"values {values.shape} hold K={2 * half} columns, b {b.shape} has K={k}")
    need = {"M": (m, 8), "N": (n, 8), "K": (k, ATOM_M if dtype.itemsize == 2 else 128)}
    bad = {d: v for d, (v, mult) in need.items() if v % mult}
    if bad:
        raise ValueError(f"the CUTLASS sm90 kernels need M, N divisible by 8 and K by a multiple of the tile K: {bad}")
    if meta.shape != (meta_nbytes(m, k, dtype),) or meta.dtype != jnp.uint8:
        raise ValueError(f"meta must be uint8[{meta_nbytes(m, k, dtype)}] for ({m}, {k}), got {meta.dtype}{meta.shape}")
    if jax.default_backend() == "gpu":
        _library()
    call = jax.ffi.ffi_call(f"sste_cutlass_sparse_{_SUFFIX[dtype]}", jax.ShapeDtypeStruct((n, m), jnp.bfloat16))
    alpha = jnp.asarray(alpha, jnp.float32)
    return call(values, meta, b, alpha, m=np.int64(m), n=np.int64(n), k=np.int64(k))


def sparse_linear(x: Shaped[Array, "N K"], a: Shaped[Array, "M K"], alpha: Float[Array, ""] | float = 1.0):
    """``α · x @ aᵀ`` on sparse tensor cores through CUTLASS; ``a`` 2:4 along ``K``, emitted in the same call.

    >>> import jax.numpy as jnp
    >>> from sste_jax.kernels import cutlass
    >>> a = jnp.ones((128, 64), jnp.bfloat16).at[:, 1::2].set(0)
    >>> y = cutlass.sparse_linear(jnp.ones((256, 64), jnp.bfloat16), a)  # doctest: +SKIP
    """
    return matmul(emit_sm90(a), x, alpha)
