"""Tests of the FP8 products (docs/algorithm.md#fp8-products): per-tensor current scaling, clip before cast,
float32 accumulation.

The reference quantises with NumPy and ml_dtypes, independently of ``sste_jax._fp8``.
"""

import chex
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sste_jax import _fp8

FORMATS = {
    "e4m3fn": (jnp.float8_e4m3fn, ml_dtypes.float8_e4m3fn, 448.0),
    "e5m2": (jnp.float8_e5m2, ml_dtypes.float8_e5m2, 57344.0),
}


def ref_quantize(t, np_fmt, fmax):
    """``s = FP8_MAX / amax(|t|)`` (1 when amax = 0); clip to ±FP8_MAX, then cast."""
    t = np.asarray(t, np.float32)
    amax = np.abs(t).max()
    s = np.float32(fmax) / amax if amax > 0 else np.float32(1.0)
    return np.clip(t * s, -fmax, fmax).astype(np_fmt), np.float32(s)


def test_formats_are_e4m3fn_forward_and_e5m2_backward():
    assert _fp8.FORWARD == jnp.float8_e4m3fn and _fp8.BACKWARD == jnp.float8_e5m2
    assert float(jnp.finfo(_fp8.FORWARD).max) == 448.0 and float(jnp.finfo(_fp8.BACKWARD).max) == 57344.0


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4, 1e30])
def test_quantize_matches_reference(name, scale, variant):
    fmt, np_fmt, fmax = FORMATS[name]
    t = (np.random.default_rng(0).normal(size=(16, 8)) * scale).astype(np.float32)
    q, s = variant(_fp8.quantize, static_argnums=1)(jnp.asarray(t), fmt)
    q_ref, s_ref = ref_quantize(t, np_fmt, fmax)
    chex.assert_type([q, s], [fmt, jnp.float32])
    chex.assert_shape([q, s], [t.shape, ()])
    np.testing.assert_allclose(float(s), float(s_ref), rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(q).astype(np.float32), q_ref.astype(np.float32))
    assert np.isfinite(np.asarray(q).astype(np.float32)).all()
    assert np.abs(np.asarray(q).astype(np.float32)).max() == fmax  # the amax lands on FP8_MAX


@pytest.mark.parametrize("name", list(FORMATS))
def test_quantize_zero_tensor(name):
    fmt = FORMATS[name][0]
    q, s = _fp8.quantize(jnp.zeros((4, 4)), fmt)
    assert float(s) == 1.0
    np.testing.assert_array_equal(np.asarray(q).astype(np.float32), 0.0)


def test_quantize_clips_before_cast(variant):
    # t·s rounds in float32 and can land just above 448; an unclipped e4m3fn cast of that is NaN.
    t = np.array([[448.0 * 3, -3.0000002 * 448, 1.0]], np.float32)
    q, _ = variant(_fp8.quantize, static_argnums=1)(jnp.asarray(t), jnp.float8_e4m3fn)
    q = np.asarray(q).astype(np.float32)
    assert np.isfinite(q).all() and np.abs(q).max() <= 448.0


@pytest.mark.parametrize("name", list(FORMATS))
def test_fp8_dot_matches_reference_and_is_float32(name, variant):
    fmt, np_fmt, fmax = FORMATS[name]
    rng = np.random.default_rng(1)
    a = (rng.normal(size=(8, 16)) * 1e4).astype(np.float32)  # far beyond e4m3's 448
    b = (rng.normal(size=(16, 12)) * 3e-2).astype(np.float32)
    out = variant(_fp8.fp8_dot, static_argnums=2)(jnp.asarray(a), jnp.asarray(b), fmt)
    chex.assert_type(out, jnp.float32)
    chex.assert_shape(out, (8, 12))
    chex.assert_tree_all_finite(out)
    qa, sa = ref_quantize(a, np_fmt, fmax)
    qb, sb = ref_quantize(b, np_fmt, fmax)
    qa, qb = qa.astype(np.float64), qb.astype(np.float64)
    ref = qa @ qb / (float(sa) * float(sb))
    # Products of FP8 values are exact in float32; only the f32 accumulation and the division round.
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-6 * (np.abs(qa) @ np.abs(qb)).max() / (sa * sb))
    # And within FP8 rounding of the exact product: 2^-(m+1) per operand entry (m = 3 or 2 mantissa
    # bits) plus half the subnormal spacing, see tests/sste_jax/test_linear.py::_fp8_bound.
    m, sub = (3, 2.0**-9) if name == "e4m3fn" else (2, 2.0**-16)
    da = 2.0 ** -(m + 1) * np.abs(a) + sub / (2 * sa)
    db = 2.0 ** -(m + 1) * np.abs(b) + sub / (2 * sb)
    bound = da @ np.abs(b) + np.abs(a) @ db + da @ db
    np.testing.assert_array_less(np.abs(np.asarray(out, np.float64) - a.astype(np.float64) @ b), bound)


def test_fp8_dot_contract_axes():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(16, 8)).astype(np.float32)  # contract a's axis 0 with b's axis 0: aᵀ b
    b = rng.normal(size=(16, 12)).astype(np.float32)
    out = np.asarray(_fp8.fp8_dot(jnp.asarray(a), jnp.asarray(b), jnp.float8_e5m2, (0, 0)))
    ref = np.asarray(_fp8.fp8_dot(jnp.asarray(a.T), jnp.asarray(b), jnp.float8_e5m2))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    assert out.shape == (8, 12)
    c = rng.normal(size=(12, 16)).astype(np.float32)  # a @ cᵀ
    out = np.asarray(_fp8.fp8_dot(jnp.asarray(a.T), jnp.asarray(c), jnp.float8_e4m3fn, (1, 1)))
    ref = np.asarray(_fp8.fp8_dot(jnp.asarray(a.T), jnp.asarray(c.T), jnp.float8_e4m3fn))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_fp8_dot_bfloat16_inputs_and_zero_operand():
    a = jnp.ones((4, 8), jnp.bfloat16) * 1000
    out = _fp8.fp8_dot(a, jnp.zeros((8, 4), jnp.bfloat16), jnp.float8_e4m3fn)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    out = _fp8.fp8_dot(a, jnp.ones((8, 4), jnp.bfloat16), jnp.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(out), 8000.0)  # exact: every operand entry is its amax
