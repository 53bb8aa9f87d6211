"""Finding the CUDA toolchain and compiling the FFI extensions on demand, in one place.

``nvcc`` is ``$NVCC``, else the ``nvidia-cuda-nvcc`` wheel's (``pip install "sste_jax[cuda]"``), else the
one on ``PATH`` or in ``/usr/local/cuda``. Extensions go to ``$SSTE_JAX_CACHE`` (default
``~/.cache/sste_jax``), named by a hash of the source, the toolchain and the flags.

>>> from sste_jax.kernels import _toolchain
>>> sorted(_toolchain.SM90A)
['-gencode', 'arch=compute_90a,code=sm_90a']
"""

import glob
import hashlib
import os
import pathlib
import shutil
import site
import subprocess
import sys

import jax

__all__ = ["SM90A", "python_roots", "nvcc", "cudart_link", "cutlass_includes", "compile_extension"]

SM90A = ("-gencode", "arch=compute_90a,code=sm_90a")  # Hopper's wgmma/sparse instructions need the "a" target


def python_roots() -> list[pathlib.Path]:
    """The site-packages folders and ``sys.path`` entries, where the NVIDIA wheels install."""
    return [pathlib.Path(p) for p in site.getsitepackages() + [site.getusersitepackages()] + sys.path if p]


def nvcc() -> str:
    """The ``nvcc`` to use; raises `RuntimeError` naming what to install when there is none."""
    wheel = [str(r / "nvidia" / "cu13" / "bin" / "nvcc") for r in python_roots()]
    for cand in (os.environ.get("NVCC"), *wheel, shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    raise RuntimeError(
        "nvcc not found: `pip install nvidia-cuda-nvcc nvidia-cuda-cccl nvidia-cuda-runtime` "
        "(the sste_jax[cuda] extra), set $NVCC, or put the CUDA toolkit's bin/ on PATH"
    )


def _missing_cccl(nvcc_path: str) -> bool:
    """Whether ``nvcc_path`` is the pip wheel's nvcc without the CCCL headers (a separate wheel) beside it."""
    top = pathlib.Path(nvcc_path).parent.parent
    return top.parts[-2:] == ("nvidia", "cu13") and not (top / "include" / "cccl" / "cuda" / "std").is_dir()


def cudart_link(nvcc_path: str) -> list[str]:
    """nvcc arguments linking the shared CUDA runtime beside ``nvcc_path`` (the one JAX loads): the pip wheel ships
    only ``libcudart.so.13``, so it is named with its soname; a toolkit's ``-lcudart`` resolves by itself."""
    for lib in (pathlib.Path(nvcc_path).parent.parent / d for d in ("lib", "lib64")):
        versioned = sorted(lib.glob("libcudart.so.*"))
        if versioned and not (lib / "libcudart.so").exists():
            return ["-cudart", "none", f"-L{lib}", f"-l:{versioned[0].name}", f"-Xlinker=-rpath,{lib}"]
    return ["-lcudart"]


def cutlass_includes() -> list[pathlib.Path]:
    """The ``nvidia-cutlass`` wheel's header folders (CUTLASS/CuTe and its ``tools/util``); raises when absent."""
    for root in python_roots():
        for hit in glob.glob(str(root / "cutlass_library" / "source" / "include" / "cutlass" / "cutlass.h")):
            source = pathlib.Path(hit).parent.parent.parent
            return [source / "include", source / "tools" / "util" / "include"]
    raise RuntimeError(
        "CUTLASS headers not found: `pip install nvidia-cutlass` (the sste_jax[cuda] extra; "
        "looked for cutlass_library/source/include/cutlass/cutlass.h under the Python paths)"
    )


def compile_extension(
    source: pathlib.Path, stem: str, flags: tuple[str, ...] = (), libs: tuple[str, ...] = (), force: bool = False
) -> pathlib.Path:
    """Compiles ``source`` into ``$SSTE_JAX_CACHE/{stem}_{hash}.so`` (once) for ``sm_90a`` with the XLA FFI and
    CUTLASS headers; ``flags`` and ``libs`` are extra nvcc arguments. Raises `RuntimeError` with the command and
    nvcc's errors when it fails."""
    compiler = nvcc()
    if _missing_cccl(compiler):
        raise RuntimeError(f"{compiler} has no CCCL headers (cuda/std): `pip install nvidia-cuda-cccl`")
    includes = [f"-I{jax.ffi.include_dir()}"] + [f"-I{p}" for p in cutlass_includes()]
    cmd = [compiler, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "-DNDEBUG",
           *SM90A, *includes, *flags, str(source), *libs, *cudart_link(compiler)]  # fmt: skip
    tag = hashlib.sha256(source.read_bytes() + " ".join(cmd).encode() + jax.__version__.encode()).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("SSTE_JAX_CACHE", pathlib.Path.home() / ".cache" / "sste_jax"))
    out = cache / f"{stem}_{tag}.so"
    if out.exists() and not force:
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    proc = subprocess.run([*cmd, "-o", tmp], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"building {source.name} failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    os.replace(tmp, out)
    return out
