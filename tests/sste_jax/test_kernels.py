"""Pallas kernels (interpreted on CPU): bit-for-bit equal to the pure functions (docs/algorithm.md#pure-functions)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sste_jax
from sste_jax._backend import resolve_backend
from sste_jax.kernels import mvue_compress_24, prune_compress_24

BLOCK = (2, 16)  # small blocks: several programs per test array, ragged edges


def _bits(x):
    """Raw bit patterns, so that -0.0 != 0.0 and NaN payloads count."""
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _special(dtype):
    """A (K=24, N=20) weight whose first columns hold ties, zeros, -0.0 and huge values."""
    big = float(jnp.finfo(dtype).max)
    groups = [
        [1.0, 1.0, 1.0, 1.0],  # all tied
        [0.0, -0.0, 0.0, -0.0],  # zeros of both signs
        [-0.0, 3.0, -3.0, 0.0],  # tie among the kept pair
        [2.0, -1.0, 2.0, 1.0],  # tie at the threshold
        [big, -big, big / 2, -big],  # huge, ties in magnitude
        [5.0, -2.0, 2.0, -2.0],  # three-way tie below the top
    ]
    w = np.array(jax.random.normal(jax.random.key(3), (24, 20)), np.float32)
    w[:, 0] = np.concatenate(groups)
    w[:, 1] = -np.concatenate(groups[::-1])
    return jnp.asarray(w, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("method", ["sste", "ste"])  # srste runs the ste branch of the kernel
@pytest.mark.parametrize("shape", [(16, 32), (20, 37), None])
def test_prune_compress_matches_pure_functions(dtype, method, shape):
    w = _special(dtype) if shape is None else jax.random.normal(jax.random.key(0), shape, dtype)
    beta = jnp.float32(1.5)  # fit_beta overflows on the huge entries
    out = prune_compress_24(w, beta, method, block=BLOCK, interpret=True)
    ref_values, ref_meta = sste_jax.compress_24(w)
    np.testing.assert_array_equal(out.meta, ref_meta)
    bits = np.asarray(out.mask_bits)[:, None, :] >> np.arange(4)[None, :, None] & 1
    np.testing.assert_array_equal(bits.reshape(w.shape).astype(bool), sste_jax.mask_24(w))
    # Under jit, as sparse_dense runs it: XLA keeps S(W) in float32 there (excess precision), so
    # β·S(W) is rounded once; eager bfloat16 execution rounds S(W) first (1 ulp apart).
    w_tilde = jax.jit(sste_jax.forward_weight, static_argnums=2)(w, beta, sste_jax.SparsityConfig(method=method))
    np.testing.assert_array_equal(_bits(sste_jax.decompress_24(out.values, out.meta)), _bits(w_tilde))
    if method != "sste":
        np.testing.assert_array_equal(_bits(out.values), _bits(ref_values))
    assert out.values.dtype == w.dtype and out.values.shape == (w.shape[0] // 2, w.shape[1])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_prune_compress_transposed_is_the_transpose(dtype):
    w = _special(dtype)
    beta = jnp.float32(1.5)  # fit_beta overflows on the huge entries
    out = prune_compress_24(w, beta, block=BLOCK, interpret=True)
    out_t = prune_compress_24(w, beta, transpose=True, block=BLOCK, interpret=True)
    assert out_t.values.shape == (w.shape[1], w.shape[0] // 2)
    np.testing.assert_array_equal(out_t.meta, out.meta.T)
    np.testing.assert_array_equal(out_t.mask_bits, out.mask_bits.T)
    w_tilde_t = sste_jax.decompress_24(out_t.values, out_t.meta, axis=1)
    np.testing.assert_array_equal(_bits(w_tilde_t), _bits(sste_jax.decompress_24(out.values, out.meta).T))


@pytest.mark.outside_annotations
def test_prune_compress_rejects_bad_input():
    w = jnp.ones((6, 8))
    with pytest.raises(ValueError, match=r"\(6, 8\)"):
        prune_compress_24(w, 1.0)
    with pytest.raises(TypeError, match="int32"):
        prune_compress_24(jnp.ones((8, 8), jnp.int32), 1.0)
    with pytest.raises(ValueError, match="beta"):
        prune_compress_24(jnp.ones((8, 8)))
    with pytest.raises(ValueError, match="2-D"):
        prune_compress_24(jnp.ones((8, 8, 2)), 1.0)
    with pytest.raises(ValueError, match="method"):
        prune_compress_24(jnp.ones((8, 8)), 1.0, method="dense")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mvue_compress_is_mvue_24_bit_for_bit(dtype):
    g = jax.random.normal(jax.random.key(1), (44, 37), dtype) * jnp.asarray(3.0, dtype)
    g = g.at[:8, 0].set(0.0).at[8:12, 1].set(-0.0)  # all-zero groups
    for seed in range(3):
        key = jax.random.key(seed)
        values, meta = mvue_compress_24(key, g, block=BLOCK, interpret=True)
        dense = sste_jax.decompress_24(values, meta)
        np.testing.assert_array_equal(_bits(dense), _bits(sste_jax.mvue_24(key, g)))
        idx0, idx1 = np.asarray(meta) & 3, np.asarray(meta) >> 2
        assert (idx0 < idx1).all()


def test_mvue_compress_is_reproducible_and_key_dependent():
    g = jax.random.normal(jax.random.key(1), (16, 24))
    a = mvue_compress_24(jax.random.key(7), g, block=BLOCK, interpret=True)
    b = mvue_compress_24(jax.random.key(7), g, block=BLOCK, interpret=True)
    c = mvue_compress_24(jax.random.key(8), g, block=BLOCK, interpret=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert (np.asarray(a[1]) != np.asarray(c[1])).any()
    raw = mvue_compress_24(jax.random.key_data(jax.random.key(7)), g, block=BLOCK, interpret=True)
    np.testing.assert_array_equal(raw[0], a[0])


def test_mvue_compress_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(10, 4\)"):
        mvue_compress_24(jax.random.key(0), jnp.ones((10, 4)))
    with pytest.raises(ValueError, match="threefry"):
        mvue_compress_24(jax.random.key(0, impl="rbg"), jnp.ones((8, 4)))


@pytest.mark.parametrize("method", ["sste"])
def test_sparse_dense_pallas_backend_is_bit_identical(method):
    x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    kernel = jax.random.normal(jax.random.key(1), (16, 12))
    beta = sste_jax.fit_beta(kernel)
    key = jax.random.key(2)

    def loss(x, kernel, backend):
        config = sste_jax.SparsityConfig(method=method, mvue=True, backend=backend)
        return jnp.sum(jnp.sin(sste_jax.sparse_dense(x, kernel, beta, key, config)))

    ref = jax.value_and_grad(loss, argnums=(0, 1))(x, kernel, "xla")
    got = jax.value_and_grad(loss, argnums=(0, 1))(x, kernel, "pallas")
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_array_equal(_bits(g), _bits(r))


def test_auto_backend_uses_xla_where_pallas_only_interprets():
    assert resolve_backend("auto", "cpu") == "xla"
    assert resolve_backend("auto", "some_new_platform") == "xla"
    assert resolve_backend("pallas", "cpu") == "pallas"


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(768, 3072), (100, 300)])
def test_compiled_kernels_match_pure_functions_on_gpu(dtype, shape):
    w = jax.random.normal(jax.random.key(0), shape, dtype)
    beta = jnp.float32(1.48)
    out = prune_compress_24(w, beta)
    # β·S(W) with S(W) in float32 and one rounding (what the kernel promises on every platform).
    s = sste_jax.soft_threshold_24(w.astype(jnp.float32))
    w_tilde = (beta * s).astype(dtype)
    np.testing.assert_array_equal(out.meta, sste_jax.compress_24(w)[1])
    np.testing.assert_array_equal(_bits(sste_jax.decompress_24(out.values, out.meta)), _bits(w_tilde))
    out_t = prune_compress_24(w, beta, transpose=True)
    np.testing.assert_array_equal(
        _bits(out_t.values), _bits(out.values.reshape(-1, 2, shape[1]).transpose(2, 0, 1).reshape(shape[1], -1))
    )
    key = jax.random.key(3)
    values, meta = mvue_compress_24(key, w)
    ref = jax.jit(sste_jax.mvue_24)(key, w)
    got = sste_jax.decompress_24(values, meta)
    np.testing.assert_array_equal(meta, mvue_compress_24(key, w)[1])  # reproducible
    mismatch = np.mean(_bits(got) != _bits(ref))
    assert mismatch == 0, f"{mismatch:.2e} of the MVUE entries differ from mvue_24"
