"""cuSPARSELt FFI extension: build and lowering here, numerics on a GPU (marked ``gpu``)."""

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sste_jax
from sste_jax import _fp8
from sste_jax.kernels import cusparselt


def _toolchain_or_skip():
    try:
        cusparselt._cusparselt_dir()
        cusparselt._nvcc()
    except RuntimeError as e:
        pytest.skip(f"no CUDA toolchain here: {e}")


@pytest.mark.integration
def test_build_compiles_and_exports_the_handlers(tmp_path, monkeypatch):
    _toolchain_or_skip()
    monkeypatch.setenv("SSTE_JAX_CACHE", str(tmp_path))
    path = cusparselt.build()
    assert path.parent == tmp_path and path.exists()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:  # the CUDA runtime libraries it links to may be absent on a CPU machine
        pytest.skip(f"built, but cannot be loaded here: {e}")
    for symbol in ("SsteCsltCompress", "SsteCsltMatmul", "sste_cslt_compressed_size"):
        assert hasattr(lib, symbol)


def test_jit_lowers_to_the_custom_call_for_cuda():
    f = jax.jit(lambda packed, x: cusparselt.matmul(packed, x, 256))
    args = (jax.ShapeDtypeStruct((4096,), jnp.uint8), jax.ShapeDtypeStruct((128, 512), jnp.bfloat16))
    text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.custom_call @sste_cslt_matmul" in text
    assert "tensor<128x256xbf16>" in text


@pytest.mark.outside_annotations  # the library's own errors for settings its annotations exclude
def test_bad_input_is_named_before_any_gpu_work():
    with pytest.raises(TypeError, match="float32"):
        cusparselt.compress(jnp.ones((32, 32), jnp.float32))
    with pytest.raises(ValueError, match=r"\(24, 32\)"):
        cusparselt.compress(jnp.ones((24, 32), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"\(8, 64\)"):
        cusparselt.matmul(jnp.zeros((64,), jnp.uint8), jnp.ones((8, 64), jnp.bfloat16), 32)
    with pytest.raises(ValueError, match="dense"):
        sste_jax.SparsityConfig(method="dense", matmul="cusparselt")
    with pytest.raises(ValueError, match="matmul"):
        sste_jax.SparsityConfig(matmul="cublas")


def _sparse_operand(key, m, k, dtype=jnp.bfloat16):
    w_KxM = jax.random.normal(key, (k, m), jnp.float32)
    return sste_jax.hard_threshold_24(w_KxM).T.astype(dtype)  # (M, K), 2:4 along K


def _rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(got - ref) / np.linalg.norm(ref)


# GPT-2 124M/350M FFN shapes (M, K) and odd-but-aligned ones; N = tokens.
SHAPES = [(3072, 768, 512), (768, 3072, 512), (4096, 1024, 256), (48, 80, 16), (16, 32, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_bf16_matches_dense(m, k, n):
    a = _sparse_operand(jax.random.key(m + k), m, k)
    x = jax.random.normal(jax.random.key(n), (n, k), jnp.bfloat16)
    ref = jnp.dot(x.astype(jnp.float32), a.astype(jnp.float32).T, precision="highest")
    got = jax.jit(cusparselt.sparse_linear)(x, a)
    assert got.dtype == jnp.bfloat16 and got.shape == (n, m)
    assert _rel_err(got, ref) < 4e-3  # bf16 output rounding: relative 2**-9 per entry at most
    with pytest.raises(TypeError, match="float32"):
        cusparselt.sparse_linear(x, a, jnp.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", SHAPES[:3])
def test_fp8_matches_dense_on_the_quantised_operands(m, k, n):
    a = _sparse_operand(jax.random.key(m), m, k, jnp.float32)
    x = jax.random.normal(jax.random.key(n), (n, k), jnp.float32)
    qa, _ = _fp8.quantize(a, jnp.float8_e4m3fn)
    qx, _ = _fp8.quantize(x, jnp.float8_e4m3fn)
    ref = jnp.dot(qx.astype(jnp.float32), qa.astype(jnp.float32).T, precision="highest")
    got = jax.jit(cusparselt.sparse_linear, static_argnums=2)(qx, qa, jnp.float32)
    # Exact products; the only error is Hopper's FP8 MMA accumulation, narrower than float32
    # (about 2**-13 relative per addition; 2e-4 to 6e-4 measured on an H100), far under e4m3's 2**-4.
    assert _rel_err(got, ref) < 2e-3


@pytest.mark.gpu
def test_unaligned_shapes_raise_clearly():
    with pytest.raises(ValueError, match=r"\(20, 64\)"):
        cusparselt.sparse_linear(jnp.ones((20, 64), jnp.bfloat16), _sparse_operand(jax.random.key(0), 32, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_sparse_dense_cusparselt_matches_xla(fp8):
    x = jax.random.normal(jax.random.key(0), (4, 128, 768), jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(1), (768, 3072), jnp.float32) * 0.02
    beta = sste_jax.fit_beta(kernel)
    key = jax.random.key(2)

    def loss(x, kernel, matmul):
        config = sste_jax.SparsityConfig(mvue=True, fp8=fp8, matmul=matmul)
        y = sste_jax.sparse_dense(x, kernel.astype(jnp.bfloat16), beta, key, config)
        return jnp.sum(jnp.tanh(y.astype(jnp.float32)))

    ref = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(x, kernel, "xla")
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(x, kernel, "cusparselt")
    tol = 3e-2 if fp8 else 1e-2
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        assert _rel_err(g, r) < tol
