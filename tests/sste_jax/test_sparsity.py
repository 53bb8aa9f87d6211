"""Tests of the pure 2:4 functions (docs/algorithm.md#layout, #pure-functions) against an independent NumPy reference.
The reference below loops over groups explicitly; it shares no code with ``sste_jax._sparsity``.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sste_jax

DTYPES = [np.float32, ml_dtypes.bfloat16]
# (shape, axis): both axes of 2-D inputs, every axis of a 3-D input, and negative axes.
CASES = [
    ((8, 12), 0),
    ((8, 12), 1),
    ((4, 8, 12), 0),
    ((4, 8, 12), 1),
    ((4, 8, 12), 2),
    ((4, 8, 12), -2),
]
EPS32 = float(np.finfo(np.float32).eps)
_mvue = jax.jit(sste_jax.mvue_24, static_argnames="axis")

# ---------------------------------------------------------------- independent NumPy reference

def _groups(shape, axis):
    """Yields ``(rest, g, positions)``: the 4 index tuples of group ``g`` at the other indices ``rest``."""
    axis %= len(shape)
    others = [range(n) for i, n in enumerate(shape) if i != axis]
    for rest in itertools.product(*others):
        for g in range(shape[axis] // 4):
            yield rest, g, [_at(rest, axis, 4 * g + k) for k in range(4)]

def _at(rest, axis, pos):
    return tuple(rest[:axis]) + (pos,) + tuple(rest[axis:])

def ref_soft(w, axis):
    out = np.zeros(w.shape, w.dtype)
    for _, _, pos in _groups(w.shape, axis):
        a = np.array([float(w[p]) for p in pos])
        t = sorted(abs(a))[1]
        for p, v in zip(pos, a):
            # f32 subtraction then rounding, as any dtype-faithful implementation does.
            mag = max(np.float32(abs(v)) - np.float32(t), np.float32(0))
            out[p] = np.float32(np.sign(v) * mag)
    return out

def ref_keep(a):
    """Indices of the two largest magnitudes; the higher index wins ties."""
    return sorted(sorted(range(4), key=lambda k: (abs(a[k]), k), reverse=True)[:2])

def ref_mask(w, axis):
    out = np.zeros(w.shape, bool)
    for _, _, pos in _groups(w.shape, axis):
        a = [float(w[p]) for p in pos]
        for k in ref_keep(a):
            out[pos[k]] = True
    return out

def ref_hard(w, axis):
    return np.where(ref_mask(w, axis), w, np.zeros((), w.dtype)).astype(w.dtype)

def ref_fit_beta(w, axis):
    s = ref_soft(w, axis).astype(np.float64)
    den = float((s * s).sum())
    return 1.0 if den == 0 else float((w.astype(np.float64) * s).sum()) / den

def ref_pair_probs(x):
    """``P[i, j]``: probability that the ordered MVUE draw (docs/algorithm.md#pure-functions) is ``i``, ``j``."""
    a = np.abs(np.asarray(x, np.float64)) + EPS32
    s = a.sum()
    p = np.zeros((4, 4))
    for i in range(4):
        for j in range(4):
            if i != j:
                p[i, j] = a[i] / s * a[j] / (s - a[i])
    return p

def ref_inclusion(x):
    """``p_k``: sum of the probabilities of all ordered draws containing ``k``."""
    pair = ref_pair_probs(x)
    return pair.sum(0) + pair.sum(1)

def ref_compress(w, axis):
    ax = axis % w.ndim
    vshape = list(w.shape)
    vshape[ax] //= 2
    mshape = list(w.shape)
    mshape[ax] //= 4
    values, meta = np.zeros(vshape, w.dtype), np.zeros(mshape, np.uint8)
    for rest, g, pos in _groups(w.shape, ax):
        i0, i1 = ref_keep([float(w[p]) for p in pos])
        values[_at(rest, ax, 2 * g)] = w[pos[i0]]
        values[_at(rest, ax, 2 * g + 1)] = w[pos[i1]]
        meta[_at(rest, ax, g)] = i0 + 4 * i1
    return values, meta

def ref_decompress(values, meta, axis):
    ax = axis % values.ndim
    shape = list(values.shape)
    shape[ax] *= 2
    out = np.zeros(shape, values.dtype)
    for rest, g, pos in _groups(shape, ax):
        code = int(meta[_at(rest, ax, g)])
        out[pos[code % 4]] = values[_at(rest, ax, 2 * g)]
        out[pos[code // 4]] = values[_at(rest, ax, 2 * g + 1)]
    return out

def all_transposable_patterns():
    """Every 4x4 0/1 matrix with exactly two ones in each row and each column."""
    rows = [np.isin(np.arange(4), c).astype(int) for c in itertools.combinations(range(4), 2)]
    pats = [np.stack(r) for r in itertools.product(rows, repeat=4)]
    return np.stack([p for p in pats if (p.sum(0) == 2).all()])

def _rand(shape, dtype, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)

def _per_group_counts(m, axis):
    """Number of True per group of 4 along ``axis``."""
    m = np.moveaxis(np.asarray(m), axis, -1)
    return m.reshape(m.shape[:-1] + (m.shape[-1] // 4, 4)).sum(-1)

# ---------------------------------------------------------------- against the reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_soft_threshold_matches_reference(shape, axis, dtype, variant):
    w = _rand(shape, dtype)
    out = variant(sste_jax.soft_threshold_24, static_argnames="axis")(jnp.asarray(w), axis=axis)
    chex.assert_shape(out, w.shape)
    chex.assert_type(out, w.dtype)
    np.testing.assert_array_equal(np.asarray(out), ref_soft(w, axis))

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_mask_and_hard_threshold_match_reference(shape, axis, dtype, variant):
    w = _rand(shape, dtype, seed=1)
    m = variant(sste_jax.mask_24, static_argnames="axis")(jnp.asarray(w), axis=axis)
    h = variant(sste_jax.hard_threshold_24, static_argnames="axis")(jnp.asarray(w), axis=axis)
    chex.assert_type([m, h], [jnp.bool_, w.dtype])
    chex.assert_equal_shape([m, h, w])
    np.testing.assert_array_equal(np.asarray(m), ref_mask(w, axis))
    np.testing.assert_array_equal(np.asarray(h), ref_hard(w, axis))

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_fit_beta_matches_reference(shape, axis, dtype, variant):
    w = _rand(shape, dtype, seed=2)
    beta = variant(sste_jax.fit_beta, static_argnames="axis")(jnp.asarray(w), axis=axis)
    chex.assert_shape(beta, ())
    chex.assert_type(beta, jnp.float32)
    np.testing.assert_allclose(float(beta), ref_fit_beta(w, axis), rtol=1e-5)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_compress_decompress_match_reference(shape, axis, dtype, variant):
    w = _rand(shape, dtype, seed=3)
    values, meta = variant(sste_jax.compress_24, static_argnames="axis")(jnp.asarray(w), axis=axis)
    ref_values, ref_meta = ref_compress(w, axis)
    chex.assert_type([values, meta], [w.dtype, jnp.uint8])
    np.testing.assert_array_equal(np.asarray(values), ref_values)
    np.testing.assert_array_equal(np.asarray(meta), ref_meta)
    dense = variant(sste_jax.decompress_24, static_argnames="axis")(values, meta, axis=axis)
    np.testing.assert_array_equal(np.asarray(dense), ref_decompress(ref_values, ref_meta, axis))
    np.testing.assert_array_equal(np.asarray(dense), ref_hard(w, axis))

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_mvue_values_match_reference(shape, axis, dtype, variant):
    g = _rand(shape, dtype, seed=4)
    out = variant(sste_jax.mvue_24, static_argnames="axis")(jax.random.key(0), jnp.asarray(g), axis=axis)
    chex.assert_type(out, g.dtype)
    out = np.asarray(out).astype(np.float64)
    rtol = 1e-5 if dtype == np.float32 else 2**-7  # bf16 keeps 8 significant bits: 2 roundings of 2^-9
    for _, _, pos in _groups(shape, axis):
        x = np.array([float(g[p]) for p in pos])
        p = ref_inclusion(x)
        got = np.array([out[q] for q in pos])
        kept = np.flatnonzero(got)
        assert len(kept) == 2, (x, got)
        np.testing.assert_allclose(got[kept], x[kept] / p[kept], rtol=rtol)

@pytest.mark.parametrize("dtype", DTYPES)
def test_transposable_mask_matches_brute_force(dtype):
    patterns = all_transposable_patterns()
    assert len(patterns) == 90
    w = _rand((8, 12), dtype, seed=5)
    m = np.asarray(sste_jax.transposable_mask_24(jnp.asarray(w)))
    assert m.dtype == bool and m.shape == w.shape
    assert (_per_group_counts(m, 0) == 2).all() and (_per_group_counts(m.T, 0) == 2).all()
    aw = np.abs(w.astype(np.float64))
    for r in range(0, 8, 4):
        for c in range(0, 12, 4):
            block = aw[r : r + 4, c : c + 4]
            best = max((block * p).sum() for p in patterns)
            np.testing.assert_allclose((block * m[r : r + 4, c : c + 4]).sum(), best, rtol=1e-12)


def ref_transposable_authors(w):
    """T-SR-STE's authors' choice per 4x4 block of an (in, out) kernel: their weight is (out, in), their
    90 patterns run in descending order of the 16 entries read row by row (as a 16-bit number), and
    the first maximum of the score wins."""
    codes = [c for c in range(2**16 - 1, -1, -1)
             if ((p := np.array([(c >> (15 - k)) & 1 for k in range(16)]).reshape(4, 4)).sum(0) == 2).all()
             and (p.sum(1) == 2).all()]
    pats = [np.array([(c >> (15 - k)) & 1 for k in range(16)]).reshape(4, 4) for c in codes]
    assert len(pats) == 90
    theirs = np.abs(np.asarray(w, np.float64)).T  # (out, in)
    out = np.zeros(theirs.shape, bool)
    for r in range(0, theirs.shape[0], 4):
        for c in range(0, theirs.shape[1], 4):
            scores = [(theirs[r : r + 4, c : c + 4] * p).sum() for p in pats]
            out[r : r + 4, c : c + 4] = pats[scores.index(max(scores))] > 0
    return out.T


def test_transposable_mask_ties_follow_the_authors_order():
    # small integers: every score is exact, so ties are real ties; 512 blocks with many of them
    w = np.random.default_rng(11).integers(0, 3, (64, 128)).astype(np.float32)
    w *= np.random.default_rng(12).choice([-1.0, 1.0], w.shape).astype(np.float32)
    got = np.asarray(sste_jax.transposable_mask_24(jnp.asarray(w)))
    np.testing.assert_array_equal(got, ref_transposable_authors(w))
    # the kernel's orientation matters on ties (their rows are our columns)
    assert not np.array_equal(got, ref_transposable_authors(w.T).T)
    zero = np.asarray(sste_jax.transposable_mask_24(jnp.zeros((4, 4), jnp.float32)))
    np.testing.assert_array_equal(zero.astype(int), [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])

# ---------------------------------------------------------------- layout convention

def test_default_axis_is_0_contraction_axis_of_kernel():
    # An (in, out) = (8, 4) kernel whose row-groups and column-groups give different answers.
    w = _rand((8, 4), np.float32, seed=6)
    for fn, ref in [
        (sste_jax.soft_threshold_24, ref_soft),
        (sste_jax.mask_24, ref_mask),
        (sste_jax.hard_threshold_24, ref_hard),
    ]:
        out = np.asarray(fn(jnp.asarray(w)))
        np.testing.assert_array_equal(out, ref(w, 0))
        assert not np.array_equal(out, ref(w, 1))
    # Groups are 4 consecutive rows: exactly 2 kept in each of w[0:4, j] and w[4:8, j].
    m = np.asarray(sste_jax.mask_24(jnp.asarray(w)))
    assert (m.reshape(2, 4, 4).sum(1) == 2).all()
    np.testing.assert_allclose(float(sste_jax.fit_beta(jnp.asarray(w))), ref_fit_beta(w, 0), rtol=1e-5)
    values, meta = sste_jax.compress_24(jnp.asarray(w))
    assert values.shape == (4, 4) and meta.shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(sste_jax.decompress_24(values, meta)), ref_hard(w, 0))
    out = np.asarray(_mvue(jax.random.key(0), jnp.asarray(w)))
    assert (_per_group_counts(out != 0, 0) == 2).all()
    assert not (_per_group_counts(out != 0, 1) == 2).all()

# ---------------------------------------------------------------- properties
# XLA:CPU flushes subnormals to zero; keep magnitudes >= 1e-30 so every difference |a| - t is normal.
_ELEMENTS = st.one_of(
    st.floats(-4, 4, width=32).filter(lambda v: abs(v) >= 1e-30),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, -2.0]),  # ties and signed zeros
)
_W = hnp.arrays(np.float32, (8, 8), elements=_ELEMENTS)
_soft = jax.jit(sste_jax.soft_threshold_24, static_argnames="axis")
_mask = jax.jit(sste_jax.mask_24, static_argnames="axis")
_compress = jax.jit(sste_jax.compress_24, static_argnames="axis")
_decompress = jax.jit(sste_jax.decompress_24, static_argnames="axis")

@given(_W, st.sampled_from([0, 1]))
def test_soft_threshold_keeps_exactly_the_entries_above_threshold(w, axis):
    out = np.asarray(_soft(w, axis=axis))
    assert (_per_group_counts(out != 0, axis) <= 2).all()
    for _, _, pos in _groups(w.shape, axis):
        a = np.abs([w[p] for p in pos])
        t = np.sort(a)[1]
        # Non-zero exactly where |a| > t: 2 non-zeros, or 3+ zeros on a tie at the threshold.
        np.testing.assert_array_equal([out[p] != 0 for p in pos], a > t)

@given(_W, st.sampled_from([0, 1]))
def test_soft_threshold_preserves_sign(w, axis):
    out = np.asarray(_soft(w, axis=axis))
    assert (out * w >= 0).all()
    nz = out != 0
    np.testing.assert_array_equal(np.sign(out[nz]), np.sign(w[nz]))
    assert (np.abs(out) <= np.abs(w)).all()

@given(_W, hnp.arrays(np.float32, (8, 8), elements=st.floats(-1 / 128, 1 / 128, width=32)))
def test_soft_threshold_is_lipschitz_in_max_norm(w, d):
    # Per entry, S_k(w) = soft(w_k, t(w)) with soft(u, t) = sign(u)·max(|u| − t, 0) and t(w) the
    # 2nd-smallest |w_j| of the group. soft is 1-Lipschitz in u and in t; the order statistic t is
    # 1-Lipschitz in the max norm. Hence |S(w+d) − S(w)|_inf <= |d|_inf + |d|_inf = 2·|d|_inf.
    # (Tight: w = (0, 1, 1, 3), d = (0, −δ, −δ, +δ) moves the last entry by 2δ.)
    w2 = (w + d).astype(np.float32)
    diff = np.abs(np.asarray(_soft(w2, axis=0), np.float64) - np.asarray(_soft(w, axis=0), np.float64))
    d_eff = np.abs(w2.astype(np.float64) - w.astype(np.float64)).max()  # d after rounding w + d
    slack = 4 * EPS32 * max(np.abs(w).max(), np.abs(w2).max())  # f32 rounding of |a| − t, twice
    assert diff.max() <= 2 * d_eff + slack

def test_lipschitz_bound_is_tight():
    delta = 1e-3
    w = np.array([[0.0], [1.0], [1.0], [3.0]], np.float32)
    d = np.array([[0.0], [-delta], [-delta], [delta]], np.float32)
    diff = np.abs(np.asarray(_soft(w + d, axis=0)) - np.asarray(_soft(w, axis=0))).max()
    np.testing.assert_allclose(diff, 2 * delta, rtol=1e-3)

@given(_W, st.sampled_from([0, 1]))
def test_mask_keeps_two_largest_higher_index_on_ties(w, axis):
    m = np.asarray(_mask(w, axis=axis))
    assert (_per_group_counts(m, axis) == 2).all()
    np.testing.assert_array_equal(m, ref_mask(w, axis))

def test_mask_ties_constructed():
    groups = {
        (1.0, 1.0, 1.0, 1.0): (2, 3),
        (2.0, 1.0, 1.0, 1.0): (0, 3),
        (1.0, -1.0, 1.0, 0.0): (1, 2),
        (0.0, -0.0, 0.0, -0.0): (2, 3),
        (-3.0, 3.0, 1.0, 1.0): (0, 1),
        (1.0, 5.0, -1.0, 1.0): (1, 3),
        (-2.0, 1.0, 2.0, 0.5): (0, 2),
    }
    w = np.array(list(groups), np.float32).T  # each group is a column: groups along axis 0
    m = np.asarray(sste_jax.mask_24(jnp.asarray(w)))
    for col, kept in enumerate(groups.values()):
        assert tuple(np.flatnonzero(m[:, col])) == kept, (list(groups)[col], m[:, col])
    values, meta = sste_jax.compress_24(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(meta)[0], [i0 | i1 << 2 for i0, i1 in groups.values()])

def test_soft_threshold_ties_at_threshold_give_three_zeros():
    w = np.array([[1.0, 2.0, -2.0, 3.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 5.0]], np.float32).T
    out = np.asarray(sste_jax.soft_threshold_24(jnp.asarray(w)))
    np.testing.assert_array_equal(out[:, 0], [0, 0, 0, 1])
    np.testing.assert_array_equal(out[:, 1], [0, 0, 0, 0])
    np.testing.assert_array_equal(out[:, 2], [0, 0, 0, 5])

@given(_W)
def test_fit_beta_minimises_mse(w):
    beta = float(sste_jax.fit_beta(jnp.asarray(w)))
    s = ref_soft(w, 0).astype(np.float64)
    if not s.any():
        assert beta == 1.0
        return
    def mse(b):
        return ((w.astype(np.float64) - b * s) ** 2).sum()

    # mse is a parabola in b with curvature |S|²; β has f32 error ~1e-7·β, far below the 1e-3 nudge.
    assert mse(beta * (1 + 1e-3)) > mse(beta) and mse(beta * (1 - 1e-3)) > mse(beta)

def test_fit_beta_all_zero_soft_threshold_is_one():
    for w in [np.zeros((8, 4), np.float32), np.ones((8, 4), np.float32)]:  # ties: S(W) = 0
        beta = sste_jax.fit_beta(jnp.asarray(w))
        assert beta.dtype == jnp.float32 and float(beta) == 1.0

def test_fit_beta_gaussian_is_about_1_48():
    # β ≈ 1.48 for Gaussian weights (the min-MSE value).
    w = _rand((768, 256), np.float32, seed=7)
    assert abs(float(sste_jax.fit_beta(jnp.asarray(w))) - 1.48) < 0.02

@given(_W, st.sampled_from([0, 1]))
def test_compress_roundtrip_and_positions_from_mask(w, axis):
    w24 = ref_hard(w, axis)  # a 2:4-sparse input, with signed zeros and ties from _ELEMENTS
    values, meta = _compress(w24, axis=axis)
    meta = np.asarray(meta)
    back = np.asarray(_decompress(values, jnp.asarray(meta), axis=axis))
    np.testing.assert_array_equal(back, w24)
    assert meta.dtype == np.uint8
    idx0, idx1 = meta & 3, meta >> 2
    assert (idx0 < idx1).all() and (idx1 < 4).all()
    # The kept positions are mask_24's, whatever the values (zeros among them).
    m = np.asarray(_mask(w24, axis=axis))
    for rest, g, pos in _groups(w.shape, axis):
        code = meta[_at(rest, axis % 2, g)]
        assert [k for k in range(4) if m[pos[k]]] == [code & 3, code >> 2]

def test_compress_uses_mask_positions_with_signed_zeros():
    w = np.array([[5.0, -0.0, 0.0, 0.0], [5.0, 0.0, 0.0, -0.0], [0.0, -0.0, 0.0, 0.0]], np.float32).T
    values, meta = sste_jax.compress_24(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(meta)[0], [0 | 3 << 2, 0 | 3 << 2, 2 | 3 << 2])
    values = np.asarray(values)
    np.testing.assert_array_equal(values, [[5.0, 5.0, 0.0], [0.0, 0.0, 0.0]])
    assert list(np.signbit(values[1])) == [False, True, False]  # the kept -0.0 stays -0.0
    back = np.asarray(sste_jax.decompress_24(jnp.asarray(values), meta))
    assert np.signbit(back[3, 1]) and not np.signbit(back[1, 0])

# ---------------------------------------------------------------- mvue_24

_N_KEYS = 4000

def _mvue_many(g, axis, n=_N_KEYS, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    return np.asarray(jax.vmap(lambda k: sste_jax.mvue_24(k, jnp.asarray(g), axis=axis))(keys), np.float64)

def _mvue_input():
    rng = np.random.default_rng(8)
    g = rng.normal(size=(8, 8)) * np.exp(rng.normal(size=(8, 8)))  # spread of magnitudes
    g[4:8, 0] = 0.0  # an all-zero group
    g[0, 1] = 0.0  # a group with a single zero
    return g.astype(np.float32)

@pytest.mark.parametrize("axis", [0, 1])
def test_mvue_is_unbiased(axis):
    g = _mvue_input()
    if axis == 1:
        g = g.T.copy()
    draws = _mvue_many(g, axis)
    p = np.zeros(g.shape)
    for _, _, pos in _groups(g.shape, axis):
        pk = ref_inclusion([g[q] for q in pos])
        for q, v in zip(pos, pk):
            p[q] = v
    # One entry's estimator is x/p with probability p, else 0: Var = x²(1 − p)/p exactly.
    var = g.astype(np.float64) ** 2 * (1 - p) / p
    se = np.sqrt(var / _N_KEYS)
    err = np.abs(draws.mean(0) - g)
    assert (err <= 5 * se + 1e-6 * np.abs(g)).all(), (err / np.maximum(se, 1e-30)).max()

@pytest.mark.parametrize("axis", [0, 1])
def test_mvue_inclusion_frequencies_match_p(axis):
    g = _mvue_input()
    if axis == 1:
        g = g.T.copy()
    freq = (_mvue_many(g, axis, seed=1) != 0).mean(0)
    for _, _, pos in _groups(g.shape, axis):
        x = np.array([g[q] for q in pos])
        if not x.any():
            continue
        p = ref_inclusion(x)
        f = np.array([freq[q] for q in pos])
        se = np.sqrt(p * (1 - p) / _N_KEYS)  # binomial standard error
        assert (np.abs(f - p) <= 5 * se + 1e-12).all(), (x, f, p)

def test_mvue_exactly_two_nonzeros_and_zero_groups_stay_zero():
    g = _mvue_input()
    draws = _mvue_many(g, 0, n=64, seed=2)
    assert np.isfinite(draws).all()
    counts = (draws != 0).reshape(64, 2, 4, 8).sum(2)
    full = np.abs(g).reshape(2, 4, 8).min(1) > 0
    assert (counts[:, full] == 2).all()
    assert (draws[:, 4:8, 0] == 0).all()
    assert (counts <= 2).all()

def test_mvue_same_key_same_output_and_dtype():
    g = _mvue_input()
    for dtype in DTYPES:
        x = jnp.asarray(g.astype(dtype))
        a = _mvue(jax.random.key(5), x)
        b = _mvue(jax.random.key(5), x)
        c = _mvue(jax.random.key(6), x)
        assert a.dtype == dtype and a.shape == x.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(a), np.asarray(c))

def test_mvue_under_jit():
    g = jnp.asarray(_mvue_input())
    a = _mvue(jax.random.key(1), g, axis=1)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(sste_jax.mvue_24(jax.random.key(1), g, axis=1)))

# ---------------------------------------------------------------- bad input
_FNS = {
    "soft_threshold_24": lambda w, axis: sste_jax.soft_threshold_24(w, axis=axis),
    "mask_24": lambda w, axis: sste_jax.mask_24(w, axis=axis),
    "hard_threshold_24": lambda w, axis: sste_jax.hard_threshold_24(w, axis=axis),
    "fit_beta": lambda w, axis: sste_jax.fit_beta(w, axis=axis),
    "mvue_24": lambda w, axis: sste_jax.mvue_24(jax.random.key(0), w, axis=axis),
    "compress_24": lambda w, axis: sste_jax.compress_24(w, axis=axis),
}

@pytest.mark.parametrize("name", list(_FNS))
def test_axis_not_divisible_by_4_raises_naming_shape_and_axis(name):
    w = jnp.ones((4, 6, 8), jnp.float32)
    for axis in (1, -2):
        with pytest.raises(ValueError) as info:
            _FNS[name](w, axis)
        msg = str(info.value)
        assert "(4, 6, 8)" in msg and "axis" in msg and ("1" in msg.replace("(4, 6, 8)", "")), msg

@pytest.mark.outside_annotations
@pytest.mark.parametrize("name", list(_FNS))
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_, jnp.uint8])
def test_integer_and_bool_dtypes_raise_type_error(name, dtype):
    with pytest.raises(TypeError, match=jnp.dtype(dtype).name):
        _FNS[name](jnp.ones((8, 4), dtype), 0)

@pytest.mark.outside_annotations
def test_transposable_mask_bad_input():
    with pytest.raises(ValueError, match=r"\(8, 6\)"):
        sste_jax.transposable_mask_24(jnp.ones((8, 6), jnp.float32))
    with pytest.raises(ValueError, match=r"\(6, 8\)"):
        sste_jax.transposable_mask_24(jnp.ones((6, 8), jnp.float32))
    with pytest.raises(ValueError, match=r"\(4, 4, 4\)"):
        sste_jax.transposable_mask_24(jnp.ones((4, 4, 4), jnp.float32))
    with pytest.raises(TypeError):
        sste_jax.transposable_mask_24(jnp.ones((4, 4), jnp.int32))

@pytest.mark.outside_annotations
def test_decompress_bad_meta():
    values = jnp.ones((4, 4), jnp.float32)
    with pytest.raises(TypeError, match="uint8"):
        sste_jax.decompress_24(values, jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        sste_jax.decompress_24(values, jnp.zeros((3, 4), jnp.uint8))

@pytest.mark.parametrize("name", ["soft_threshold_24", "mask_24", "hard_threshold_24", "compress_24"])
def test_vmap(name):
    w = _rand((3, 8, 4), np.float32, seed=9)
    fn = lambda x: _FNS[name](x, 0)  # noqa: E731
    batched = jax.vmap(fn)(jnp.asarray(w))
    for i in range(3):
        chex.assert_trees_all_equal(jax.tree.map(lambda a: a[i], batched), fn(jnp.asarray(w[i])))

def test_mvue_draws_are_jax_random_uniform_bit_for_bit():
    # mvue_24's fused threefry must give exactly jax.random.uniform's stream (the Pallas MVUE kernel
    # reproduces that stream); other key kinds fall back to jax.random itself.
    from sste_jax._sparsity import _uniform

    keys = [jax.random.key(3), jax.random.fold_in(jax.random.key(1), 2**31 + 7), jax.random.key(0, impl="rbg")]
    for key in keys + [jax.random.PRNGKey(4)]:
        want = jax.random.uniform(key, (2, 3, 5))
        np.testing.assert_array_equal(np.asarray(_uniform(key, (2, 3, 5))), np.asarray(want))
    batch = jax.random.split(jax.random.key(5), 3)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(jax.vmap(lambda k: _uniform(k, (2, 4, 8))))(batch)),
        np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (2, 4, 8)))(batch)),
    )

# ---------------------------------------------------------------- β edge cases

def _old_fit_beta(w, axis=0):
    """`fit_beta` without its rescaling: the normal-range result must not change by a bit."""
    s = sste_jax.soft_threshold_24(w, axis)
    s = jax.lax.reduce_precision(s.astype(jnp.float32), jnp.finfo(s.dtype).nexp, jnp.finfo(s.dtype).nmant)
    w = w.astype(jnp.float32)
    ss = jnp.vdot(s, s)
    return jnp.where(ss > 0, jnp.vdot(w, s) / jnp.where(ss > 0, ss, 1.0), 1.0)

@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("shape, axis", [((8, 4), 0), ((768, 256), 0), ((256, 96), 1), ((3, 16, 8), 1)])
def test_fit_beta_is_bit_identical_to_the_unscaled_formula(shape, axis, dtype):
    jitted = jax.jit(sste_jax.fit_beta, static_argnums=1)
    old_jitted = jax.jit(_old_fit_beta, static_argnums=1)
    for seed, scale in enumerate([1e-3, 0.02, 1.0, 30.0]):
        w = jnp.asarray((_rand(shape, np.float32, seed) * scale).astype(dtype))
        assert np.asarray(sste_jax.fit_beta(w, axis)).tobytes() == np.asarray(_old_fit_beta(w, axis)).tobytes()
        assert np.asarray(jitted(w, axis)).tobytes() == np.asarray(old_jitted(w, axis)).tobytes()

@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_fit_beta_is_scale_invariant_and_finite(dtype):
    w = jnp.asarray(_rand((768, 256), np.float32, seed=7).astype(dtype))
    beta = float(sste_jax.fit_beta(w))
    for k in (-100, -66, -40, -20, 20, 40, 63, 100):  # powers of 2 scale exactly: β must not move
        assert float(sste_jax.fit_beta(w * jnp.asarray(2.0**k, dtype))) == beta, k
    for scale in (1e-20, 1e-30, 1e19, 1e30):
        b = float(sste_jax.fit_beta(w.astype(jnp.float32) * np.float32(scale)))
        assert abs(b - beta) < 1e-5 * beta, (scale, b)

def test_fit_beta_non_finite_is_nan():
    w = jnp.asarray(_rand((8, 4), np.float32))
    for bad in (np.nan, np.inf, -np.inf):
        assert np.isnan(float(sste_jax.fit_beta(w.at[3, 1].set(bad))))
    assert np.isnan(float(jax.jit(sste_jax.fit_beta)(w.at[0, 0].set(np.nan))))

def test_beta_problem_names_the_reason():
    from sste_jax._sparsity import beta_problem, initial_beta

    w = jnp.asarray(_rand((8, 4), np.float32))
    assert beta_problem(w) is None
    assert "all zero" in beta_problem(jnp.zeros((8, 4)))
    assert "S(W)" in beta_problem(jnp.ones((8, 4)))
    assert "1 of its 32" in beta_problem(w.at[0, 0].set(np.nan))
    with pytest.raises(ValueError, match=r"blocks/0/fc1.*all zero.*load the weights first, or pass beta"):
        initial_beta(jnp.zeros((8, 4)), 0, "blocks/0/fc1")
    assert float(initial_beta(jnp.zeros((8, 4)), 0, "x", beta=1.5)) == 1.5
    with pytest.raises(ValueError, match="finite scalar"):
        initial_beta(w, 0, "x", beta=float("nan"))
    # Traced: cannot raise, so an unfittable kernel gives a NaN β (never a silent 1.0).
    assert np.isnan(float(jax.jit(lambda k: initial_beta(k, 0, "x"))(jnp.zeros((8, 4)))))
    traced = jax.jit(lambda k: initial_beta(k, 0, "x"))(w)
    assert float(traced) == float(sste_jax.fit_beta(w))

# ---------------------------------------------------------------- unclear inputs made clear

@pytest.mark.outside_annotations
@pytest.mark.parametrize("name", list(_FNS))
def test_python_lists_are_accepted(name):
    w = _rand((8, 4), np.float32, seed=3)
    for got, want in zip(jax.tree.leaves(_FNS[name](w.tolist(), 0)), jax.tree.leaves(_FNS[name](jnp.asarray(w), 0))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(
        np.asarray(sste_jax.transposable_mask_24(w[:4].tolist())), np.asarray(sste_jax.transposable_mask_24(w[:4]))
    )

@pytest.mark.outside_annotations
@pytest.mark.parametrize("name", list(_FNS))
@pytest.mark.parametrize("axis", [None, 0.0, True])
def test_axis_must_be_an_int(name, axis):
    with pytest.raises(TypeError, match="axis must be an int"):
        _FNS[name](jnp.ones((8, 4), jnp.float32), axis)

@pytest.mark.outside_annotations
def test_decompress_bad_shapes_and_axis():
    with pytest.raises(ValueError, match=r"out of range.*shape \(\)"):
        sste_jax.decompress_24(jnp.float32(1.0), jnp.uint8(4))
    with pytest.raises(ValueError, match="out of range"):
        sste_jax.decompress_24(jnp.ones((4, 4)), jnp.full((2, 4), 4, jnp.uint8), axis=2)
    with pytest.raises(TypeError, match="axis must be an int"):
        sste_jax.decompress_24(jnp.ones((4, 4)), jnp.full((2, 4), 4, jnp.uint8), axis=None)

def test_decompress_validates_meta_bytes():
    w = jnp.asarray(_rand((8, 12), np.float32, seed=4))
    values, meta = sste_jax.compress_24(w)
    assert set(np.unique(np.asarray(meta)).tolist()) <= {4, 8, 9, 12, 13, 14}
    for bad in (0, 5, 6, 7, 15, 255):
        broken = meta.at[1, 2].set(bad)
        with pytest.raises(ValueError, match=rf"1 invalid byte.*first: {bad} at index \(1, 2\)"):
            sste_jax.decompress_24(values, broken)
        # Traced: the groups of invalid bytes come out NaN, every other group exactly.
        out = np.asarray(jax.jit(sste_jax.decompress_24)(values, broken))
        want = np.asarray(sste_jax.decompress_24(values, meta))
        assert np.isnan(out[4:8, 2]).all() and not np.isnan(np.delete(out, 2, axis=1)).any()
        np.testing.assert_array_equal(out[:4], want[:4])
    np.testing.assert_array_equal(np.asarray(jax.jit(sste_jax.decompress_24)(values, meta)),
                                  np.asarray(sste_jax.hard_threshold_24(w)))


# ---------------------------------------------------------------- N:M


def ref_nm(w, n, m, axis):
    """Per group of m consecutive entries along axis: the top-n mask (ties: higher index) and the soft
    threshold by the (n+1)-th largest magnitude, in w's dtype (one rounding of |a| − t, as the rule)."""
    moved = np.moveaxis(np.asarray(w), axis, -1)
    mask, soft = np.zeros(moved.shape, bool), np.zeros(moved.shape, moved.dtype)
    for idx in np.ndindex(moved.shape[:-1]):
        for g in range(moved.shape[-1] // m):
            a = moved[idx][g * m : (g + 1) * m]
            order = sorted(range(m), key=lambda k: (abs(a[k]), k), reverse=True)
            for k in order[:n]:
                mask[idx + (g * m + k,)] = True
            t = sorted(np.abs(a), reverse=True)[n]
            soft[idx][g * m : (g + 1) * m] = np.sign(a) * np.maximum(np.abs(a) - t, np.zeros((), a.dtype))
    return np.moveaxis(mask, -1, axis), np.moveaxis(soft, -1, axis)


@pytest.mark.parametrize("n,m", [(1, 4), (2, 8), (1, 2), (3, 8), (4, 8)])
@pytest.mark.parametrize("axis", [0, 1])
def test_nm_mask_and_soft_threshold_match_reference(n, m, axis):
    w = _rand((16, 8), np.float32, seed=21)
    w[:, 0] = np.round(w[:, 0])  # integers: ties inside groups along both axes
    w[0, :] = np.round(w[0, :])
    mask = np.asarray(sste_jax.mask_nm(jnp.asarray(w), n, m, axis))
    soft = np.asarray(sste_jax.soft_threshold_nm(jnp.asarray(w), n, m, axis))
    ref_mask, ref_soft = ref_nm(w, n, m, axis)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(soft, ref_soft)
    hard = np.asarray(sste_jax.hard_threshold_nm(jnp.asarray(w), n, m, axis))
    np.testing.assert_array_equal(hard, np.where(ref_mask, w, 0.0))
    counts = np.moveaxis(mask, axis, -1).reshape(-1, m).sum(-1)
    assert (counts == n).all()


def test_nm_24_is_the_24_functions():
    w = jnp.asarray(_rand((8, 12), np.float32, seed=22))
    np.testing.assert_array_equal(sste_jax.mask_nm(w, 2, 4), sste_jax.mask_24(w))
    np.testing.assert_array_equal(sste_jax.soft_threshold_nm(w, 2, 4), sste_jax.soft_threshold_24(w))
    assert float(sste_jax.fit_beta(w, n=2, m=4)) == float(sste_jax.fit_beta(w))


@pytest.mark.parametrize("n,m", [(1, 4), (2, 8)])
def test_nm_fit_beta_is_the_least_squares_scale(n, m):
    w = _rand((16, 8), np.float32, seed=23)
    s = ref_nm(w, n, m, 0)[1].astype(np.float64)
    want = (w.astype(np.float64) * s).sum() / (s * s).sum()
    assert float(sste_jax.fit_beta(jnp.asarray(w), n=n, m=m)) == pytest.approx(want, rel=1e-5)


@pytest.mark.outside_annotations
def test_nm_bad_input():
    w = jnp.ones((12, 4), jnp.float32)
    with pytest.raises(
        ValueError, match=r"N:M groups of 8 need the length of axis 0 to be divisible by 8; got shape \(12, 4\)"
    ):
        sste_jax.mask_nm(w, 2, 8)
    with pytest.raises(ValueError, match="need 1 <= n < m, got n=4, m=4"):
        sste_jax.soft_threshold_nm(w, 4, 4)
    with pytest.raises(ValueError, match="need 1 <= n < m, got n=0, m=4"):
        sste_jax.mask_nm(w, 0, 4)
    with pytest.raises(TypeError, match="m must be an int, got 4.0"):
        sste_jax.mask_nm(w, 2, 4.0)
    with pytest.raises(TypeError, match="floating-point"):
        sste_jax.mask_nm(jnp.ones((8, 4), jnp.int32), 1, 8)
