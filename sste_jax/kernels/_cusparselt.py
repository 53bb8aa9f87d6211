"""cuSPARSELt 2:4 sparse GEMMs on Hopper through an XLA FFI custom call. Optional.

``C = B @ Aᵀ`` with ``A`` ``(M, K)`` 2:4 sparse along ``K`` (the "linear" layout: ``y = x @ Wᵀ`` for
an ``(out, in)`` weight). The extension is compiled on first use with ``nvcc`` against the
``nvidia-cusparselt-cu13`` wheel and ``jax.ffi.include_dir()``, into ``$SSTE_JAX_CACHE`` (default
``~/.cache/sste_jax``); without CUDA, `build` raises a `RuntimeError` saying what is missing.

>>> import jax, jax.numpy as jnp
>>> from sste_jax.kernels import cusparselt  # doctest: +SKIP
>>> a_MxK = jnp.ones((256, 512), jnp.bfloat16).at[:, 1::2].set(0)  # doctest: +SKIP
>>> y = cusparselt.sparse_linear(jnp.ones((128, 512), jnp.bfloat16), a_MxK)  # doctest: +SKIP
"""

import ctypes
import functools
import glob
import hashlib
import os
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, UInt8

from sste_jax.kernels import _toolchain

__all__ = ["build", "compress", "matmul", "sparse_linear", "compressed_nbytes"]

_SOURCE = pathlib.Path(__file__).parent / "csrc" / "cusparselt_ffi.cc"
_CUDA_TYPES = {jnp.dtype(jnp.bfloat16): 14, jnp.dtype(jnp.float8_e4m3fn): 28}  # cudaDataType values
# Output types cuSPARSELt offers per input type (TN layout, float32 compute).
_OUT_DTYPES = {
    jnp.dtype(jnp.bfloat16): (jnp.dtype(jnp.bfloat16),),
    jnp.dtype(jnp.float8_e4m3fn): (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)),
}


def _cusparselt_dir() -> pathlib.Path:
    for root in _toolchain.python_roots():
        for header in glob.glob(str(root / "nvidia" / "**" / "cusparseLt.h"), recursive=True):
            base = pathlib.Path(header).parent.parent
            if list((base / "lib").glob("libcusparseLt.so*")):
                return base
    raise RuntimeError(
        "cuSPARSELt not found: install the wheel with `pip install nvidia-cusparselt-cu13` "
        "(looked for nvidia/**/cusparseLt.h and lib/libcusparseLt.so* under the Python paths)"
    )


def _nvcc() -> str:
    return _toolchain.nvcc()


def build(force: bool = False) -> pathlib.Path:
    """Compiles the FFI extension (once per source and toolchain) and returns the shared library's path."""
    lt = _cusparselt_dir()
    nvcc = _nvcc()
    lib = sorted((lt / "lib").glob("libcusparseLt.so*"))[0]
    tag = hashlib.sha256(
        _SOURCE.read_bytes() + str(lt).encode() + jax.__version__.encode() + nvcc.encode()
    ).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("SSTE_JAX_CACHE", pathlib.Path.home() / ".cache" / "sste_jax"))
    out = cache / f"sste_cusparselt_{tag}.so"
    if out.exists() and not force:
        return out
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [
        nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
        f"-I{jax.ffi.include_dir()}", f"-I{lt / 'include'}", str(_SOURCE),
        f"-L{lib.parent}", f"-l:{lib.name}", f"-Xlinker=-rpath,{lib.parent}", *_toolchain.cudart_link(nvcc),
        "-o", str(out) + ".tmp",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"building the cuSPARSELt extension failed:\n{' '.join(cmd)}\n{proc.stderr}")
    os.replace(str(out) + ".tmp", out)
    return out


@functools.cache
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    for name, symbol in (("sste_cslt_compress", lib.SsteCsltCompress), ("sste_cslt_matmul", lib.SsteCsltMatmul)):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="CUDA")
    lib.sste_cslt_compressed_size.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
    return lib


def _check_dtype(dtype) -> int:
    dtype = jnp.dtype(dtype)
    if dtype not in _CUDA_TYPES:
        raise TypeError(f"cuSPARSELt path takes bfloat16 or float8_e4m3fn operands, got {dtype}")
    return _CUDA_TYPES[dtype]


def _check_dims(name: str, shape, multiple: int = 16):
    bad = [d for d in shape if d % multiple]
    if bad:
        raise ValueError(f"cuSPARSELt needs every dimension of {name} divisible by {multiple}; got shape {shape}")


@functools.cache
def compressed_nbytes(m: int, k: int, dtype) -> int:
    """Bytes of cuSPARSELt's compressed form of an ``(M, K)`` 2:4 matrix (needs a GPU)."""
    size = ctypes.c_int64(0)
    status = _library().sste_cslt_compressed_size(m, k, _check_dtype(dtype), ctypes.byref(size))
    if status:
        raise RuntimeError(f"cuSPARSELt rejected an ({m}, {k}) {jnp.dtype(dtype)} structured matrix")
    return size.value


def compress(a: Float[Array, "M K"]) -> UInt8[Array, " nbytes"]:
    """cuSPARSELt-compresses ``a`` (2:4 along K; entries outside the pattern must be zero)."""
    _check_dtype(a.dtype)
    if a.ndim != 2:
        raise ValueError(f"A must be 2-D (M, K), got shape {a.shape}")
    _check_dims("A (M, K)", a.shape)
    nbytes = compressed_nbytes(*a.shape, a.dtype)
    return jax.ffi.ffi_call("sste_cslt_compress", jax.ShapeDtypeStruct((nbytes,), jnp.uint8))(a)


def matmul(
    a_compressed: UInt8[Array, " nbytes"], b: Float[Array, "N K"], m: int, out_dtype=jnp.bfloat16
) -> Float[Array, "N M"]:
    """``b @ Aᵀ`` for the ``(m, K)`` matrix ``A`` that `compress` packed into ``a_compressed``."""
    a_type = _check_dtype(b.dtype)
    allowed = _OUT_DTYPES[jnp.dtype(b.dtype)]
    if jnp.dtype(out_dtype) not in allowed:
        raise TypeError(
            f"cuSPARSELt gives {[str(d) for d in allowed]} outputs for {b.dtype} inputs, not {jnp.dtype(out_dtype)}"
        )
    if b.ndim != 2:
        raise ValueError(f"B must be 2-D (N, K), got shape {b.shape}")
    _check_dims("B (N, K)", b.shape)
    _check_dims("A (M, K)", (m,))
    if jax.default_backend() == "gpu":
        _library()
    call = jax.ffi.ffi_call("sste_cslt_matmul", jax.ShapeDtypeStruct((b.shape[0], m), out_dtype))
    return call(a_compressed, b, m=np.int64(m), k=np.int64(b.shape[1]), a_type=np.int64(a_type))


def sparse_linear(
    x: Float[Array, "N K"], a: Float[Array, "M K"], out_dtype=jnp.bfloat16
) -> Float[Array, "N M"]:
    """``x @ aᵀ`` on sparse tensor cores; ``a`` 2:4 along K, compressed in the same call."""
    if x.dtype != a.dtype:
        raise TypeError(f"x ({x.dtype}) and a ({a.dtype}) must share a dtype")
    return matmul(compress(a), x, a.shape[0], out_dtype)
