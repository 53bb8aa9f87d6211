"""CUTLASS sm90 sparse backend: operand emitter (vs `compress_24` and vs CUTLASS's layout, evaluated by a host
program), the FFI extension's sm_90a build, lowering and config checks here; numerics on a GPU (marked ``gpu``)."""

import ctypes
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sste_jax
from sste_jax.kernels import _toolchain, cutlass

HOST_SOURCE = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cutlass_sm90_compress_host.cu"
TYPES = {"bf16": jnp.bfloat16, "e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}


def _toolchain_or_skip():
    try:
        _toolchain.nvcc()
        _toolchain.cutlass_includes()
    except RuntimeError as e:
        pytest.skip(f"no CUDA/CUTLASS toolchain here (pip install 'sste_jax[cuda]'): {e}")


def _random_24(seed, m, k, dtype, max_kept=2):
    """An (m, k) matrix with 0..max_kept nonzeros in every group of 4 along k, positions and counts random."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k // 4, 4)).astype(np.float32) + np.sign(rng.standard_normal((m, k // 4, 4)))
    count = rng.integers(0, max_kept + 1, (m, k // 4, 1))
    keep = rng.random((m, k // 4, 4)).argsort(-1) < count
    return jnp.asarray(np.where(keep, x, 0).reshape(m, k)).astype(dtype)


def _codes(packed, m, k, dtype):
    """The (m, k/4) group codes back out of the metadata bytes (the inverse of the emitter's permutation)."""
    ak = cutlass.atom_k(dtype)
    mp, kp = -(-m // 64) * 64, -(-k // ak) * ak
    meta = packed.meta
    if jnp.dtype(dtype).itemsize == 2:
        b = meta.reshape(kp // ak, mp // 64, 4, 2, 8, ak // 32, 2, 2).transpose(1, 2, 6, 4, 0, 5, 3, 7)
    else:
        b = meta.reshape(kp // ak, mp // 64, 64, ak // 8).transpose(1, 2, 0, 3)
    b = b.reshape(mp, kp // 8)
    return jnp.stack([b & 15, b >> 4], -1).reshape(mp, kp // 4)[:m, : k // 4]


@pytest.mark.parametrize("name", ["bf16", "e4m3", "e5m2"])
def test_emitter_keeps_what_compress_24_keeps(name):
    dtype = TYPES[name]
    a = _random_24(0, 128, 256, dtype, max_kept=2)
    a = jnp.where(a == 0, jnp.ones((), dtype), a)  # every entry nonzero ...
    a = sste_jax.hard_threshold_24(a.astype(jnp.float32), axis=1).astype(dtype)  # ... then exactly 2 per group
    values, meta = sste_jax.compress_24(a, axis=1)
    packed = cutlass.emit_sm90(a)
    assert packed.values.dtype == jnp.dtype(dtype) and packed.meta.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(packed.values).view(np.uint8), np.asarray(values).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(_codes(packed, 128, 256, dtype)), np.asarray(meta))


def test_emitter_is_jittable_and_handles_empty_and_lone_groups():
    a = jnp.zeros((64, 64), jnp.bfloat16).at[0, :12].set(jnp.array([0, 0, 0, 5, 7, 0, 0, 0, 0, 0, 0, 0], jnp.bfloat16))
    packed = jax.jit(cutlass.emit_sm90)(a)
    assert packed.values[0, :6].tolist() == [0.0, 5.0, 7.0, 0.0, 0.0, 0.0]
    # lone last entry: (0, 3) -> 12; lone first entry: (0, 3) -> 12; empty group: 0
    assert np.asarray(_codes(packed, 64, 64, jnp.bfloat16))[0, :3].tolist() == [12, 12, 0]


@pytest.fixture(scope="module")
def host_reference(tmp_path_factory):
    _toolchain_or_skip()
    exe = tmp_path_factory.mktemp("cutlass_host") / "compress_host"
    cmd = [_toolchain.nvcc(), "-std=c++17", "-O1", "--expt-relaxed-constexpr",
           f"-I{_toolchain.cutlass_includes()[0]}", str(HOST_SOURCE), "-o", str(exe)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


@pytest.mark.integration
@pytest.mark.parametrize(
    "name,m,k",
    [("bf16", 128, 128), ("bf16", 100, 80), ("bf16", 192, 320), ("e4m3", 192, 256), ("e4m3", 64, 96),
     ("e5m2", 70, 160)],
)  # fmt: skip
def test_emitter_matches_cutlass_layout_byte_for_byte(host_reference, tmp_path, name, m, k):
    dtype = TYPES[name]
    a = _random_24(m * k, m, k, dtype)
    np.asarray(a).tofile(tmp_path / "a.bin")
    subprocess.run([host_reference, name, str(m), str(k), tmp_path / "a.bin", tmp_path / "out.bin"], check=True)
    ref = np.fromfile(tmp_path / "out.bin", np.uint8)
    packed = cutlass.emit_sm90(a)
    ours = np.concatenate([np.asarray(packed.values).view(np.uint8).ravel(), np.asarray(packed.meta)])
    assert ref.size == ours.size == packed.values.size * packed.values.dtype.itemsize + cutlass.meta_nbytes(m, k, dtype)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.integration
def test_extension_compiles_for_sm90a_and_exports_the_handlers(tmp_path, monkeypatch):
    _toolchain_or_skip()
    monkeypatch.setenv("SSTE_JAX_CACHE", str(tmp_path))
    path = cutlass.build()
    assert path.parent == tmp_path and path.exists()
    assert cutlass.build() == path  # cached
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:  # the CUDA runtime it links to may be absent on a CPU machine
        pytest.skip(f"built, but cannot be loaded here: {e}")
    for symbol in cutlass._SYMBOLS.values():
        assert hasattr(lib, symbol)


def test_jit_lowers_to_the_custom_call_for_cuda():
    def f(a, x):
        return cutlass.matmul(cutlass.emit_sm90(a), x, 0.5)

    args = (jax.ShapeDtypeStruct((256, 128), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((64, 128), jnp.float8_e4m3fn))
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.custom_call @sste_cutlass_sparse_e4m3" in text
    assert "tensor<64x256xbf16>" in text


@pytest.mark.outside_annotations  # the library's own errors for settings its annotations exclude
def test_bad_input_is_named_before_any_gpu_work():
    with pytest.raises(TypeError, match="float32"):
        cutlass.emit_sm90(jnp.ones((64, 64), jnp.float32))
    with pytest.raises(ValueError, match="multiple of 32"):
        cutlass.emit_sm90(jnp.ones((64, 48), jnp.float8_e4m3fn))
    packed = cutlass.emit_sm90(jnp.zeros((128, 64), jnp.bfloat16))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        cutlass.matmul(packed, jnp.ones((64, 64), jnp.float8_e4m3fn))
    with pytest.raises(ValueError, match="K=32"):
        cutlass.matmul(packed, jnp.ones((64, 32), jnp.bfloat16))
    with pytest.raises(ValueError, match="'N': 60"):
        cutlass.matmul(packed, jnp.ones((60, 64), jnp.bfloat16))
    with pytest.raises(ValueError, match="meta"):
        cutlass.matmul(packed._replace(meta=packed.meta[:-1]), jnp.ones((64, 64), jnp.bfloat16))


def test_missing_toolchain_is_named(monkeypatch):
    monkeypatch.setattr(_toolchain, "python_roots", lambda: [])
    with pytest.raises(RuntimeError, match="pip install nvidia-cutlass"):
        _toolchain.cutlass_includes()
    monkeypatch.setenv("NVCC", "/nonexistent/nvcc")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(_toolchain.os.path, "exists", lambda p: False)
    with pytest.raises(RuntimeError, match="nvcc not found"):
        _toolchain.nvcc()


def test_shared_cuda_runtime_is_linked_by_its_soname_from_the_wheel(tmp_path):
    wheel, toolkit = tmp_path / "nvidia" / "cu13", tmp_path / "cuda"
    for top, lib in ((wheel, "lib/libcudart.so.13"), (toolkit, "lib64/libcudart.so")):
        (top / lib).parent.mkdir(parents=True)
        (top / lib).touch()
    assert "-l:libcudart.so.13" in _toolchain.cudart_link(str(wheel / "bin" / "nvcc"))
    assert _toolchain.cudart_link(str(toolkit / "bin" / "nvcc")) == ["-lcudart"]


# ---------------------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name,m,k", [("bf16", 256, 512), ("bf16", 100, 80), ("e4m3", 192, 384), ("e5m2", 128, 256)])
def test_emitter_matches_cutlass_compressor_on_device(name, m, k):
    a = _random_24(7, m, k, TYPES[name])
    ref, ours = cutlass.compress_reference(a), cutlass.emit_sm90(a)
    np.testing.assert_array_equal(np.asarray(ours.values).view(np.uint8), np.asarray(ref.values).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(ours.meta), np.asarray(ref.meta))


@pytest.mark.gpu
@pytest.mark.parametrize("name,m,n,k", [("bf16", 256, 128, 512), ("e4m3", 256, 128, 512), ("e5m2", 384, 256, 256)])
def test_product_equals_dense_dot_of_the_pruned_matrix(name, m, n, k):
    dtype = TYPES[name]
    a = _random_24(1, m, k, dtype)
    b = jax.random.normal(jax.random.key(2), (n, k)).astype(dtype)
    y = cutlass.matmul(cutlass.emit_sm90(a), b, 0.5)
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    ref = 0.5 * b32 @ a32.T
    assert y.dtype == jnp.bfloat16 and y.shape == (n, m)
    # operands are exact in float32: the error is the bf16 rounding of the output (2^-8 relative) plus the
    # accumulation's, at most its unit times sum |b||a| (float32 for bf16; fewer bits for FP8 on Hopper,
    # measured ~6e-4 relative with cuSPARSELt, docs/kernels.md: 2^-10 allowed)
    acc_unit = 2.0**-20 if name == "bf16" else 2.0**-10
    bound = 2.0**-8 * np.abs(ref) + acc_unit * 0.5 * (np.abs(b32) @ np.abs(a32).T)
    assert np.all(np.abs(np.asarray(y, np.float32) - ref) <= bound)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_sparse_dense_with_cutlass_matches_xla(fp8):
    kernel = jax.random.normal(jax.random.key(0), (256, 128))
    x = jax.random.normal(jax.random.key(1), (128, 256)).astype(jnp.bfloat16)
    key = jax.random.key(2)

    def loss(config):
        return lambda x, k: (sste_jax.sparse_dense(x, k, 1.0, key, config).astype(jnp.float32) ** 2).sum()

    cfg = dict(mvue=True, fp8=fp8)
    ref = jax.grad(loss(sste_jax.SparsityConfig(**cfg)), argnums=(0, 1))(x, kernel)
    got = jax.grad(loss(sste_jax.SparsityConfig(matmul="cutlass", **cfg)), argnums=(0, 1))(x, kernel)
    # the CUTLASS path rounds W̃, ĝ and each product to bf16 (2^-9 relative each, a few in a row: under 0.02);
    # with FP8 both paths quantise alike but the XLA one keeps float32 products: e4m3/e5m2 steps (2^-4, 2^-3)
    # enter through the bf16 results' differing roundings of re-quantised gradients, bounded by 0.1
    for r, g in zip(ref, got):
        r, g = np.asarray(r, np.float32), np.asarray(g, np.float32)
        assert np.linalg.norm(g - r) <= (0.1 if fp8 else 0.02) * np.linalg.norm(r)


# ------------------------------------------------------------------------------------- backend resolution


def test_one_resolver_picks_every_piece():
    from sste_jax import _backend
    from sste_jax.kernels import _mvue, _products, _prune

    cfg = sste_jax.SparsityConfig
    ops = _backend.resolve(cfg(mvue=True, matmul="cutlass"), "gpu")
    assert (ops.forward, ops.weight_grad) == (_products.cutlass_forward, _products.cutlass_weight_grad)
    assert ops.prune is None and ops.mvue is sste_jax.mvue_24
    assert _backend.resolve(cfg(mvue=True, fp8=True, matmul="cutlass"), "gpu").weight_grad is not None  # e5m2
    assert _backend.resolve(cfg(mvue=True, fp8=True, matmul="cusparselt"), "gpu").weight_grad is None  # no e5m2
    assert _backend.resolve(cfg(matmul="cutlass"), "gpu").weight_grad is None  # ĝ dense without MVUE
    ops = _backend.resolve(cfg(mvue=True, backend="pallas", matmul="cutlass"), "gpu")
    assert (ops.prune, ops.mvue) == (_prune.pallas_forward_weight, _mvue.pallas_mvue)
    assert _backend.resolve(cfg(matmul="cutlass"), "cpu", products=False).forward is None


def test_cutlass_config_off_gpu_raises_naming_the_gpu_but_prunes():
    config = sste_jax.SparsityConfig(mvue=True, matmul="cutlass")
    kernel = jax.random.normal(jax.random.key(0), (64, 32))
    with pytest.raises(RuntimeError, match="matmul='cutlass'.*NVIDIA Hopper GPU.*'cpu'"):
        sste_jax.sparse_dense(jnp.ones((8, 64)), kernel, 1.0, jax.random.key(1), config)
    w = sste_jax.forward_weight(kernel, 1.0, config)  # the forward weight alone needs no GPU
    np.testing.assert_array_equal(w, sste_jax.forward_weight(kernel, 1.0, sste_jax.SparsityConfig()))
    with pytest.raises(ValueError, match="matmul='cutlass' needs a 2:4 method"):
        sste_jax.SparsityConfig(method="dense", matmul="cutlass")


@pytest.mark.parametrize("fp8,fwd,wgrad", [(False, "bf16", "bf16"), (True, "e4m3", "e5m2")])
def test_the_gemm_pieces_lower_both_products_to_the_cutlass_calls(fp8, fwd, wgrad):
    from sste_jax.kernels import _products

    x, w = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16), jax.ShapeDtypeStruct((256, 128), jnp.bfloat16)
    cuda = dict(lowering_platforms=("cuda",))
    f = jax.jit(lambda x, w: _products.cutlass_forward(x, w, fp8, jnp.bfloat16))
    text = f.trace(x, w).lower(**cuda).as_text()
    assert f"@sste_cutlass_sparse_{fwd}" in text and "tensor<512x128xbf16>" in text
    g = jax.ShapeDtypeStruct((512, 128), jnp.bfloat16)
    f = jax.jit(lambda x, g: _products.cutlass_weight_grad(x, g, fp8, jnp.float32))
    text = f.trace(x, g).lower(**cuda).as_text()
    assert f"@sste_cutlass_sparse_{wgrad}" in text and "tensor<256x128xbf16>" in text


@pytest.mark.parametrize("fp8,fwd,wgrad", [(False, "bf16", "bf16"), (True, "e4m3", "e5m2")])
def test_sparse_dense_training_step_lowers_to_both_cutlass_products(monkeypatch, fp8, fwd, wgrad):
    from types import SimpleNamespace

    from sste_jax import _backend

    monkeypatch.setattr(_backend, "jax", SimpleNamespace(default_backend=lambda: "gpu"))  # resolve as on a GPU
    config = sste_jax.SparsityConfig(mvue=True, fp8=fp8, matmul="cutlass")

    def loss(x, kernel):
        y = sste_jax.sparse_dense(x, kernel, 1.0, jax.random.key(0), config)
        return (y.astype(jnp.float32) ** 2).sum()

    args = (jax.ShapeDtypeStruct((2, 128, 256), jnp.bfloat16), jax.ShapeDtypeStruct((256, 384), jnp.float32))
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    calls = {f"stablehlo.custom_call @sste_cutlass_sparse_{t}" for t in (fwd, wgrad)}
    assert sum(text.count(c) for c in calls) == 2 and all(c in text for c in calls)  # forward, weight gradient
    assert "tensor<256x384xbf16>" in text  # the weight gradient's product: (in, out) from (N=in, M=out)



def test_remat_policy_saves_the_pruned_weight_and_its_cutlass_operands(monkeypatch, capsys):
    from types import SimpleNamespace

    from sste_jax import _backend

    monkeypatch.setattr(_backend, "jax", SimpleNamespace(default_backend=lambda: "gpu"))  # resolve as on a GPU
    config = sste_jax.SparsityConfig(mvue=True, matmul="cutlass")

    def loss(x, kernel):
        return (sste_jax.sparse_dense(x, kernel, 1.0, jax.random.key(0), config).astype(jnp.float32) ** 2).sum()

    step = jax.checkpoint(loss, policy=sste_jax.remat_policy())
    jax.ad_checkpoint.print_saved_residuals(step, jnp.ones((128, 256), jnp.bfloat16), jnp.ones((256, 384)))
    saved = [line for line in capsys.readouterr().out.splitlines() if "named 'sste_forward_weight'" in line]
    nbytes = cutlass.meta_nbytes(384, 256, jnp.bfloat16)
    assert [line.split()[0] for line in saved] == ["f32[256,384]", "bf16[384,128]", f"u8[{nbytes}]"]  # W̃, values, E
