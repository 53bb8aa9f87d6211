"""Tests of `sparse_dense`, `forward_weight` and `SparsityConfig` (docs/algorithm.md#sparse-linear-transform).

Every expected value is computed in the test with NumPy (float64) from the rules of
docs/algorithm.md#sparse-linear-transform: the forward weight per method, ``dx = g @ W̃ᵀ``,
``dW = xᵀ ĝ`` (+ ``λ(1 − mask)⊙W`` for SR-STE).
"""

import dataclasses
import itertools

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import sste_jax
from sste_jax import SparsityConfig

METHODS = ["dense", "ste", "srste", "sste"]
T, IN, OUT = 16, 8, 12
EPS32 = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------- NumPy reference (groups along axis 0)


def ref_keep_mask(w):
    """Top-2 |w| in each group of 4 consecutive rows; the higher index wins ties."""
    m = np.zeros(w.shape, bool)
    for g, col in itertools.product(range(w.shape[0] // 4), range(w.shape[1])):
        a = [abs(float(w[4 * g + k, col])) for k in range(4)]
        for k in sorted(range(4), key=lambda k: (a[k], k), reverse=True)[:2]:
            m[4 * g + k, col] = True
    return m


def ref_soft(w):
    out = np.zeros(w.shape)
    for g, col in itertools.product(range(w.shape[0] // 4), range(w.shape[1])):
        a = np.array([float(w[4 * g + k, col]) for k in range(4)])
        t = np.sort(np.abs(a))[1]
        out[4 * g : 4 * g + 4, col] = np.sign(a) * np.maximum(np.abs(a) - t, 0)
    return out


def ref_forward_weight(w, beta, method):
    w = np.asarray(w, np.float64)
    if method == "dense":
        return w
    if method in ("ste", "srste"):
        return np.where(ref_keep_mask(w), w, 0.0)
    return beta * ref_soft(w)


def ref_inclusion_and_pairs(x):
    """The MVUE draw (docs/algorithm.md#pure-functions) of one group: inclusion ``p_k``, joint ``pi[a, b]``."""
    a = np.abs(np.asarray(x, np.float64)) + EPS32
    s = a.sum()
    ordered = np.array([[a[i] / s * a[j] / (s - a[i]) if i != j else 0.0 for j in range(4)] for i in range(4)])
    pi = ordered + ordered.T
    p = pi.sum(1)
    np.fill_diagonal(pi, p)
    return p, pi


def _data(seed=0, t=T, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(t, IN)).astype(dtype)
    w = rng.normal(size=(IN, OUT)).astype(dtype)
    g = rng.normal(size=(t, OUT)).astype(dtype)
    return x, w, g


def _vjp(x, w, beta, g, config, key=None, variant=None):
    """``(y, dx, dw, dbeta)`` of `sparse_dense` for the cotangent ``g``, wrapped in ``variant`` if given."""

    def run(x, w, beta, g, key):
        y, pullback = jax.vjp(lambda x, w, b: sste_jax.sparse_dense(x, w, b, key, config), x, w, beta)
        return (y, *pullback(g))

    return (run if variant is None else variant(run))(x, w, beta, g, key)


_BETA = np.float32(1.3)


# ------------------------------------------ the rules of docs/algorithm.md#sparse-linear-transform


@pytest.mark.parametrize("method", METHODS)
def test_forward_and_gradients_follow_the_rules(method, variant):
    x, w, g = _data()
    cfg = SparsityConfig(method=method)
    y, dx, dw, dbeta = _vjp(jnp.asarray(x), jnp.asarray(w), jnp.float32(_BETA), jnp.asarray(g), cfg, variant=variant)
    wt = ref_forward_weight(w, float(_BETA), method)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    np.testing.assert_allclose(np.asarray(y), x64 @ wt, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), g64 @ wt.T, rtol=1e-5, atol=1e-5)
    dw_ref = x64.T @ g64  # straight through: no mask, no β factor, no soft-threshold Jacobian
    if method == "srste":
        dw_ref = dw_ref + 2e-4 * np.where(ref_keep_mask(w), 0.0, w)
    np.testing.assert_allclose(np.asarray(dw), dw_ref, rtol=1e-5, atol=1e-6)
    assert float(dbeta) == 0.0  # β is frozen
    chex.assert_type([y, dx, dw], jnp.float32)
    chex.assert_shape([y, dx, dw], [(T, OUT), (T, IN), (IN, OUT)])


def test_srste_decay_term_and_sste_has_no_beta_factor():
    # A large λ and β make the SR-STE term and a missing/extra β factor far above the tolerance.
    x, w, g = _data(seed=1)
    cfg = SparsityConfig(method="srste", srste_decay=0.5)
    _, _, dw, _ = _vjp(jnp.asarray(x), jnp.asarray(w), jnp.float32(1.0), jnp.asarray(g), cfg)
    decay = np.where(ref_keep_mask(w), 0.0, w.astype(np.float64))
    np.testing.assert_allclose(np.asarray(dw), x.T.astype(np.float64) @ g + 0.5 * decay, rtol=1e-5, atol=1e-6)
    _, _, dw, _ = _vjp(jnp.asarray(x), jnp.asarray(w), jnp.float32(3.0), jnp.asarray(g), SparsityConfig())
    np.testing.assert_allclose(np.asarray(dw), x.T.astype(np.float64) @ g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_forward_weight_has_exact_zeros(method, variant):
    _, w, _ = _data(seed=2)
    forward_weight = variant(sste_jax.forward_weight, static_argnums=2)
    wt = np.asarray(forward_weight(jnp.asarray(w), jnp.float32(_BETA), SparsityConfig(method=method)))
    np.testing.assert_allclose(wt, ref_forward_weight(w, float(_BETA), method), rtol=1e-6)
    zeros_per_group = (wt == 0.0).reshape(IN // 4, 4, OUT).sum(1)
    if method == "dense":
        assert (zeros_per_group == 0).all()
    else:
        assert (zeros_per_group >= 2).all()


def test_beta_is_ignored_by_non_sste_methods():
    x, w, _ = _data(seed=3)
    for method in ["dense", "ste", "srste"]:
        cfg = SparsityConfig(method=method)
        a = sste_jax.sparse_dense(jnp.asarray(x), jnp.asarray(w), 1.0, config=cfg)
        b = sste_jax.sparse_dense(jnp.asarray(x), jnp.asarray(w), 7.0, config=cfg)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.outside_annotations
def test_default_config():
    cfg = SparsityConfig()
    assert (cfg.method, cfg.mvue, cfg.fp8, cfg.srste_decay, cfg.backend) == ("sste", False, False, 2e-4, "xla")
    with pytest.raises(ValueError, match="bogus"):
        SparsityConfig(method="bogus")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.method = "ste"


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("srste_decay", float("nan"), ValueError),
        ("srste_decay", -1e-4, ValueError),
        ("masked_decay", float("inf"), ValueError),
        ("masked_decay", -float("inf"), ValueError),
        ("srste_decay", "0.1", TypeError),
        ("masked_decay", True, TypeError),
        ("mvue", "yes", TypeError),
        ("mvue", 1, TypeError),
        ("fp8", 1, TypeError),
        ("fp8", None, TypeError),
        ("method", None, TypeError),
        ("backend", 0, TypeError),
        ("matmul", ["xla"], TypeError),
    ],
)
def test_config_rejects_bad_fields_naming_them(field, value, error):
    with pytest.raises(error, match=field):
        SparsityConfig(**{field: value})


def test_config_accepts_numpy_scalars():
    cfg = SparsityConfig(mvue=np.bool_(True), srste_decay=np.float32(1e-3), masked_decay=0)
    assert cfg.mvue is True and cfg == SparsityConfig(mvue=True, srste_decay=np.float32(1e-3), masked_decay=0.0)
    hash(cfg)


# ---------------------------------------------------------------- MVUE


def test_mvue_weight_gradient_is_x_transpose_mvue_of_g(variant):
    x, w, g = _data(seed=4)
    key = jax.random.key(11)
    cfg = SparsityConfig(mvue=True)
    y, dx, dw, _ = _vjp(jnp.asarray(x), jnp.asarray(w), jnp.float32(_BETA), jnp.asarray(g), cfg, key, variant)
    g_hat = np.asarray(sste_jax.mvue_24(key, jnp.asarray(g), axis=0), np.float64)
    assert ((g_hat != 0).reshape(T // 4, 4, OUT).sum(1) == 2).all()  # groups of 4 tokens
    np.testing.assert_allclose(np.asarray(dw), x.T.astype(np.float64) @ g_hat, rtol=1e-5, atol=1e-5)
    # The input gradient and the output are unchanged by MVUE.
    dense_g = (jnp.asarray(x), jnp.asarray(w), jnp.float32(_BETA), jnp.asarray(g), SparsityConfig())
    y0, dx0, _, _ = _vjp(*dense_g, variant=variant)
    chex.assert_trees_all_equal((y, dx), (y0, dx0))


def test_mvue_weight_gradient_is_unbiased():
    n = 2000
    x, w, g = _data(seed=5)
    cfg = SparsityConfig(mvue=True)
    keys = jax.random.split(jax.random.key(0), n)
    dws = jax.vmap(lambda k: _vjp(jnp.asarray(x), jnp.asarray(w), jnp.float32(_BETA), jnp.asarray(g), cfg, k)[2])(keys)
    mean = np.asarray(dws, np.float64).mean(0)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    # Exact variance of dW[i, o] = Σ_t x[t, i] ĝ[t, o]: groups of 4 tokens are independent; within a
    # group Cov(ĝ_a, ĝ_b) = g_a g_b (π_ab / (p_a p_b) − 1) (Horvitz–Thompson, π_aa = p_a).
    var = np.zeros((IN, OUT))
    for grp, o in itertools.product(range(T // 4), range(OUT)):
        rows = slice(4 * grp, 4 * grp + 4)
        p, pi = ref_inclusion_and_pairs(g64[rows, o])
        cov = np.outer(g64[rows, o], g64[rows, o]) * (pi / np.outer(p, p) - 1)
        var[:, o] += np.einsum("ai,ab,bi->i", x64[rows], cov, x64[rows])
    se = np.sqrt(var / n)
    err = np.abs(mean - x64.T @ g64)
    assert (err <= 5 * se + 1e-5).all(), (err / se).max()


def test_mvue_bad_input():
    x, w, _ = _data(seed=6, t=6)
    cfg = SparsityConfig(mvue=True)
    with pytest.raises(ValueError, match="token count 6 must be divisible by 4"):
        jax.grad(lambda w: sste_jax.sparse_dense(jnp.asarray(x), w, 1.0, jax.random.key(0), cfg).sum())(jnp.asarray(w))
    x, w, _ = _data(seed=6)
    with pytest.raises((ValueError, TypeError), match="key"):
        sste_jax.sparse_dense(jnp.asarray(x), jnp.asarray(w), 1.0, None, cfg)


@pytest.mark.parametrize("tokens", [1, 3, 6])
def test_mvue_forward_takes_any_token_count(tokens):
    # MVUE acts only in the backward pass: inference (e.g. one token at a time) needs no multiple of 4.
    x, w, _ = _data(seed=6, t=tokens)
    x, w = jnp.asarray(x), jnp.asarray(w)
    y = sste_jax.sparse_dense(x, w, _BETA, jax.random.key(0), SparsityConfig(mvue=True))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(sste_jax.sparse_dense(x, w, _BETA)))


@pytest.mark.parametrize(
    "key, error, match",
    [
        (3, TypeError, "PRNG key.*int"),
        (np.uint32(5), TypeError, "uint32"),
        (jnp.zeros((3,), jnp.uint32), TypeError, r"uint32\[3\]"),
        (jax.random.split(jax.random.key(0), 3), ValueError, r"batch of keys of shape \(3,\)"),
    ],
)
@pytest.mark.outside_annotations
def test_bad_mvue_keys_fail_in_the_forward_call(key, error, match):
    x, w, _ = _data(seed=6)
    with pytest.raises(error, match=match):
        sste_jax.sparse_dense(jnp.asarray(x), jnp.asarray(w), 1.0, key, SparsityConfig(mvue=True))
    # A legacy raw uint32[2] key works, forward and backward.
    raw = jax.random.PRNGKey(0)
    jax.grad(lambda w: sste_jax.sparse_dense(jnp.asarray(x), w, 1.0, raw, SparsityConfig(mvue=True)).sum())(
        jnp.asarray(w)
    )


@pytest.mark.outside_annotations
def test_beta_must_be_a_scalar():
    x, w, _ = _data(seed=6)
    for beta in (jnp.ones(2), [1.0, 2.0], jnp.ones((1, 1))):
        with pytest.raises(ValueError, match=r"beta must be a scalar.*shape \("):
            sste_jax.sparse_dense(jnp.asarray(x), jnp.asarray(w), beta)
        with pytest.raises(ValueError, match="beta must be a scalar"):
            sste_jax.forward_weight(jnp.asarray(w), beta, SparsityConfig())


@pytest.mark.outside_annotations
def test_array_likes_are_accepted():
    x, w, _ = _data(seed=6)
    y = sste_jax.sparse_dense(x.tolist(), w.tolist(), 1.0)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(sste_jax.sparse_dense(jnp.asarray(x), jnp.asarray(w), 1.0)))


# ---------------------------------------------------------------- batch axes, transforms, dtypes


@pytest.mark.parametrize("mvue", [False, True])
def test_leading_batch_axes_are_flattened_into_tokens(mvue):
    x, w, g = _data(seed=7)
    key = jax.random.key(2) if mvue else None
    cfg = SparsityConfig(mvue=mvue)
    x3, g3 = x.reshape(2, 2, 4, IN), g.reshape(2, 2, 4, OUT)
    y3, dx3, dw3, _ = _vjp(jnp.asarray(x3), jnp.asarray(w), jnp.float32(_BETA), jnp.asarray(g3), cfg, key)
    y, dx, dw, _ = _vjp(jnp.asarray(x), jnp.asarray(w), jnp.float32(_BETA), jnp.asarray(g), cfg, key)
    chex.assert_shape([y3, dx3, dw3], [(2, 2, 4, OUT), x3.shape, w.shape])
    chex.assert_trees_all_close((y3.reshape(T, OUT), dx3.reshape(T, IN), dw3), (y, dx, dw), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["ste", "sste"])
def test_jit_grad_matches_eager(method):
    x, w, g = _data(seed=8)
    cfg = SparsityConfig(method=method, mvue=True)
    key = jax.random.key(3)

    def loss(x, w):
        return jnp.sum(sste_jax.sparse_dense(x, w, _BETA, key, cfg) * g)

    eager = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    jitted = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(w))
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-6)


def test_vmap_over_kernels_and_inputs():
    x, w, g = _data(seed=9)
    w2 = np.stack([w, -2 * w])
    cfg = SparsityConfig()

    def grads(x, w):
        return jax.grad(lambda x, w: jnp.sum(sste_jax.sparse_dense(x, w, _BETA, config=cfg) * g), argnums=(0, 1))(x, w)

    batched = jax.vmap(grads, in_axes=(None, 0))(jnp.asarray(x), jnp.asarray(w2))
    for i in range(2):
        one = grads(jnp.asarray(x), jnp.asarray(w2[i]))
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[i], batched), one, rtol=1e-6, atol=1e-6)
    x_4x4xI = jnp.asarray(x.reshape(4, 4, IN))
    ys = jax.vmap(lambda x: sste_jax.sparse_dense(x, jnp.asarray(w), _BETA, config=cfg))(x_4x4xI)
    y_ref = x.astype(np.float64) @ ref_forward_weight(w, float(_BETA), "sste")
    np.testing.assert_allclose(np.asarray(ys).reshape(T, OUT), y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16(method, variant):
    x, w, g = _data(seed=10, dtype=ml_dtypes.bfloat16)
    cfg = SparsityConfig(method=method, mvue=True)
    key = jax.random.key(4)
    y, dx, dw, _ = _vjp(jnp.asarray(x), jnp.asarray(w), jnp.float32(_BETA), jnp.asarray(g), cfg, key, variant)
    chex.assert_type([y, dx, dw], jnp.bfloat16)
    wt = ref_forward_weight(w.astype(np.float64), float(_BETA), method)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    # bf16 keeps 8 significant bits (unit roundoff 2^-9). W̃ is rounded once (β·S in f32, then bf16);
    # the product may accumulate in bf16 over IN = 8 terms: |error| <= 2^-9 (1 + 1 + IN) Σ|x||W̃|,
    # bounded here by 2^-5 Σ|x||W̃|. Same bound for the input gradient over OUT = 12 terms (2^-5 > 14·2^-9).
    err_y, err_dx = np.abs(np.asarray(y, np.float64) - x64 @ wt), np.abs(np.asarray(dx, np.float64) - g64 @ wt.T)
    np.testing.assert_array_less(err_y, 2**-5 * (np.abs(x64) @ np.abs(wt)) + 1e-30)
    np.testing.assert_array_less(err_dx, 2**-5 * (np.abs(g64) @ np.abs(wt.T)) + 1e-30)
    g_hat = np.asarray(sste_jax.mvue_24(key, jnp.asarray(g), axis=0), np.float64)
    dw_ref = x64.T @ g_hat
    if method == "srste":
        dw_ref = dw_ref + 2e-4 * np.where(ref_keep_mask(w), 0.0, w.astype(np.float64))
    # T = 16 terms, plus the decay term's rounding: 2^-9 (1 + 16 + 2) < 2^-4.
    bound = 2**-4 * (np.abs(x64.T) @ np.abs(g_hat) + 2e-4 * np.abs(w.astype(np.float64))) + 1e-30
    np.testing.assert_array_less(np.abs(np.asarray(dw, np.float64) - dw_ref), bound)


# ---------------------------------------------------------------- FP8


def _fp8_bound(a, b, mant_bits, fmax, subnormal):
    """Elementwise bound on |fp8(a)·fp8(b) − a·b| for per-tensor current scaling.

    Each operand entry t is scaled by s = fmax/amax, rounded to the nearest FP8 value and divided
    by s: its error is at most 2^-(m+1)|t| (m mantissa bits: e4m3 2^-4, e5m2 2^-3) for normal
    numbers, or half the subnormal spacing, subnormal/(2s), below the normal range. Then
    |qa·qb − a·b| <= δa|b| + |a|δb + δa δb per term, summed over the contraction. Float32
    accumulation and the f32 scaling add at most ~n·2^-24 relative, covered by the 1e-5 term.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)

    def delta(t):
        s = fmax / np.abs(t).max()
        return 2.0 ** -(mant_bits + 1) * np.abs(t) + subnormal / (2 * s)

    da, db = delta(a), delta(b)
    return da @ np.abs(b) + np.abs(a) @ db + da @ db + 1e-5 * (np.abs(a) @ np.abs(b))


E4M3 = dict(mant_bits=3, fmax=448.0, subnormal=2.0**-9)
E5M2 = dict(mant_bits=2, fmax=57344.0, subnormal=2.0**-16)


@pytest.mark.parametrize("method", ["sste", "dense"])
def test_fp8_far_beyond_448_has_no_nan_and_fp8_sized_error(method, variant):
    x, w, g = _data(seed=12, t=32)
    x, w, g = x * 1e4, w * 3e3, g * 1e5  # every tensor far beyond e4m3's 448
    beta = float(sste_jax.fit_beta(jnp.asarray(w))) if method == "sste" else 1.0
    cfg = SparsityConfig(method=method, fp8=True)
    y, dx, dw, _ = _vjp(jnp.asarray(x), jnp.asarray(w), jnp.float32(beta), jnp.asarray(g), cfg, variant=variant)
    chex.assert_tree_all_finite((y, dx, dw))
    chex.assert_type([y, dx, dw], jnp.float32)
    wt = np.asarray(sste_jax.forward_weight(jnp.asarray(w), jnp.float32(beta), cfg), np.float64)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    for got, a, b, fmt in [(y, x64, wt, E4M3), (dx, g64, wt.T, E5M2), (dw, x64.T, g64, E5M2)]:
        err = np.abs(np.asarray(got, np.float64) - a @ b)
        np.testing.assert_array_less(err, _fp8_bound(a, b, **fmt))
        assert err.max() > 0  # FP8 is really applied
    # The bound is FP8-sized: relative to Σ|a||b| it is about 2^-3 forward and 2^-2 backward.
    scale = 1e-3 * np.abs(x64).max() * np.abs(wt).max()
    assert (_fp8_bound(x64, wt, **E4M3) <= 0.14 * (np.abs(x64) @ np.abs(wt)) + scale).all()


def test_fp8_with_mvue_and_zero_input():
    x, w, g = _data(seed=13)
    cfg = SparsityConfig(fp8=True, mvue=True)
    key = jax.random.key(5)
    _, dx, dw, _ = _vjp(jnp.asarray(x), jnp.asarray(w), jnp.float32(_BETA), jnp.asarray(g), cfg, key)
    g_hat = np.asarray(sste_jax.mvue_24(key, jnp.asarray(g), axis=0), np.float64)  # MVUE before quantising
    err = np.abs(np.asarray(dw, np.float64) - x.T.astype(np.float64) @ g_hat)
    np.testing.assert_array_less(err, _fp8_bound(x.T, g_hat, **E5M2))
    y, dx, dw, _ = _vjp(jnp.zeros((T, IN)), jnp.asarray(w), jnp.float32(_BETA), jnp.zeros((T, OUT)), cfg, key)
    for t in (y, dx, dw):
        np.testing.assert_array_equal(np.asarray(t), 0.0)


def _ref_e5m2_dot(a, b):
    """``a @ b`` with both operands in e5m2 under per-tensor current scaling (NumPy and ml_dtypes)."""
    def quantize(t):
        t = np.asarray(t, np.float32)
        amax = np.abs(t).max()
        s = np.float32(57344.0) / amax if amax > 0 else np.float32(1.0)
        return np.clip(t * s, -57344.0, 57344.0).astype(ml_dtypes.float8_e5m2).astype(np.float64), np.float64(s)

    (qa, sa), (qb, sb) = quantize(a), quantize(b)
    return qa @ qb / (sa * sb), np.abs(qa) @ np.abs(qb) / (sa * sb)


@pytest.mark.parametrize("scale", [1e-9, 1e6])  # under float16's smallest subnormal; over its max
def test_fp8_fp16_grad_rounds_the_output_gradient_to_float16_first(scale):
    x, w, g = _data(seed=14)
    g = (g * scale).astype(np.float32)
    cfg = SparsityConfig(method="ste", fp8=True, fp8_fp16_grad=True)
    _, dx, dw, _ = _vjp(jnp.asarray(x), jnp.asarray(w), jnp.float32(1.0), jnp.asarray(g), cfg)
    g16 = np.clip(g, -65504.0, 65504.0).astype(np.float16).astype(np.float32)  # saturating, not inf
    wt = ref_forward_weight(w, 1.0, "ste")
    for got, (want, size) in ((dx, _ref_e5m2_dot(g16, wt.T)), (dw, _ref_e5m2_dot(x.T, g16))):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=1e-6 * size.max() + 1e-30)
        assert np.isfinite(np.asarray(got)).all()
    _, dx_plain, _, _ = _vjp(jnp.asarray(x), jnp.asarray(w), jnp.float32(1.0), jnp.asarray(g),
                             SparsityConfig(method="ste", fp8=True))
    if scale < 1:  # float16 flushes the whole gradient; the default path's per-tensor scale keeps it
        assert not np.asarray(dx).any() and np.asarray(dx_plain).all()
    else:
        assert np.abs(np.asarray(dx)).max() < 0.1 * np.abs(np.asarray(dx_plain)).max()
    with pytest.raises(ValueError, match="fp8_fp16_grad=True .* needs fp8=True"):
        SparsityConfig(fp8_fp16_grad=True)


# ---------------------------------------------------------------- bad input


@pytest.mark.outside_annotations
def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError) as info:
        sste_jax.sparse_dense(jnp.ones((4, 8)), jnp.ones((12, 4)), 1.0)
    assert "(4, 8)" in str(info.value) and "(12, 4)" in str(info.value)


def test_kernel_in_features_not_divisible_by_4():
    with pytest.raises(ValueError) as info:
        sste_jax.sparse_dense(jnp.ones((4, 6)), jnp.ones((6, 4)), 1.0)
    assert "(6, 4)" in str(info.value) and "axis" in str(info.value)
    y = sste_jax.sparse_dense(jnp.ones((4, 6)), jnp.ones((6, 4)), 1.0, config=SparsityConfig(method="dense"))
    np.testing.assert_array_equal(np.asarray(y), 6.0)


@pytest.mark.outside_annotations
def test_integer_kernel_raises_type_error():
    with pytest.raises(TypeError, match="int32"):
        sste_jax.sparse_dense(jnp.ones((4, 8)), jnp.ones((8, 4), jnp.int32), 1.0)


# ---------------------------------------------------------------- T-SR-STE: a given transposable mask


def test_tsrste_forward_is_masked_kernel_and_gradient_is_straight_through():
    x, w, g = _data(seed=7)
    w = w[:, :8]  # 8 x 8: a transposable mask needs both dimensions divisible by 4
    g = g[:, :8]
    mask = np.asarray(sste_jax.transposable_mask_24(jnp.asarray(w)))
    cfg = SparsityConfig(method="tsrste", masked_decay=0.25)  # large α: a term would be far above tolerance
    y, pullback = jax.vjp(lambda x, w: sste_jax.sparse_dense(x, w, 1.0, config=cfg, mask=jnp.asarray(mask)), x, w)
    dx, dw = pullback(jnp.asarray(g))
    wt, x64, g64 = np.where(mask, w, 0.0).astype(np.float64), x.astype(np.float64), g.astype(np.float64)
    np.testing.assert_allclose(np.asarray(y), x64 @ wt, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), g64 @ wt.T, rtol=1e-5, atol=1e-5)
    # the masked decay joins after clipping, in the optimizer (add_masked_decay), not here
    np.testing.assert_allclose(np.asarray(dw), x64.T @ g64, rtol=1e-5, atol=1e-6)
    # the mask used is the one given, not recomputed from the kernel: a stale mask stays in force
    stale = np.roll(mask, 1, axis=1)
    y_stale = sste_jax.sparse_dense(jnp.asarray(x), jnp.asarray(w), 1.0, config=cfg, mask=jnp.asarray(stale))
    np.testing.assert_allclose(np.asarray(y_stale), x64 @ np.where(stale, w, 0.0), rtol=1e-5, atol=1e-5)
    assert SparsityConfig().masked_decay == 6e-5  # T-SR-STE's α (docs/algorithm.md#baselines)


@pytest.mark.outside_annotations
def test_tsrste_mask_errors():
    x, w, _ = _data(seed=8)
    x, w = jnp.asarray(x), jnp.asarray(w)
    with pytest.raises(ValueError, match="needs its mask"):
        sste_jax.sparse_dense(x, w, 1.0, config=SparsityConfig(method="tsrste"))
    with pytest.raises(ValueError, match=r"bool of the kernel's shape \(8, 12\), got float32 \(8, 12\)"):
        sste_jax.sparse_dense(x, w, 1.0, config=SparsityConfig(method="tsrste"), mask=jnp.ones_like(w))
    with pytest.raises(ValueError, match=r"got bool \(4, 12\)"):
        sste_jax.sparse_dense(x, w, 1.0, config=SparsityConfig(method="tsrste"), mask=jnp.ones((4, 12), bool))
    with pytest.raises(ValueError, match="only used by method='tsrste'.*'ste'"):
        sste_jax.sparse_dense(x, w, 1.0, config=SparsityConfig(method="ste"), mask=jnp.ones(w.shape, bool))
    with pytest.raises(ValueError, match="masked_decay must be >= 0"):
        SparsityConfig(method="tsrste", masked_decay=-1.0)


def test_the_backend_is_resolved_once_per_product(monkeypatch):
    from sste_jax import _backend

    calls, resolve = [], _backend.resolve
    monkeypatch.setattr(_backend, "resolve", lambda *a, **k: calls.append(a) or resolve(*a, **k))
    config = SparsityConfig(mvue=True, backend="pallas")
    kernel = jax.random.normal(jax.random.key(0), (8, 4))
    jax.grad(lambda k: sste_jax.sparse_dense(jnp.ones((4, 8)), k, 1.0, jax.random.key(1), config).sum())(kernel)
    assert len(calls) == 1  # the forward weight, the forward product, MVUE and the weight gradient share it
