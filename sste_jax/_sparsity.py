"""Pure 2:4 functions: pruning, masks, the frozen scale β, MVUE sampling and compression; and their N:M
generalisation (`mask_nm`, `soft_threshold_nm`, `hard_threshold_nm`, `fit_beta`'s ``n``, ``m``).

Groups are 4 (N:M: ``m``) consecutive elements along ``axis`` (default 0, the contraction axis of a
Flax ``(in_features, out_features)`` kernel). Every function is jit- and vmap-able.

>>> import jax.numpy as jnp, sste_jax
>>> w = jnp.array([[1.0], [-4.0], [3.0], [2.0]])
>>> sste_jax.soft_threshold_24(w).ravel().tolist()
[0.0, -2.0, 1.0, 0.0]
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray, Real, Shaped, UInt8

__all__ = [
    "soft_threshold_24",
    "mask_24",
    "hard_threshold_24",
    "fit_beta",
    "mvue_24",
    "compress_24",
    "decompress_24",
    "transposable_mask_24",
    "mask_nm",
    "soft_threshold_nm",
    "hard_threshold_nm",
]

_EPS = float(np.finfo(np.float32).eps)


def check_groupable(x: jax.Array, axis: int, m: int = 4) -> int:
    """Validates ``x`` for grouping by ``m`` along ``axis``; returns the axis as a non-negative index."""
    check_axis(axis)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"2:4 functions need a floating-point array, got dtype {x.dtype} (shape {x.shape})")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for an array of shape {x.shape}")
    axis %= x.ndim
    if x.shape[axis] % m:
        raise ValueError(
            f"{'2:4 groups' if m == 4 else f'N:M groups of {m}'} need the length of axis {axis} to be divisible "
            f"by {m}; got shape {x.shape}"
        )
    return axis


def check_nm(n, m) -> None:
    """Raises unless ``n`` and ``m`` are ints with ``1 <= n < m`` (N of every M kept)."""
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool | np.bool_) or not isinstance(v, int | np.integer):
            raise TypeError(f"N:M sparsity: {name} must be an int, got {v!r} ({type(v).__name__})")
    if not 1 <= n < m:
        raise ValueError(f"N:M sparsity keeps n of every m: need 1 <= n < m, got n={n}, m={m}")


def check_axis(axis) -> None:
    """Raises unless ``axis`` is an integer (not None, not a bool)."""
    if isinstance(axis, bool | np.bool_) or not isinstance(axis, int | np.integer):
        raise TypeError(f"axis must be an int, got {axis!r} ({type(axis).__name__})")


def _split(x: jax.Array, axis: int) -> tuple[jax.Array, ...]:
    """The 4 members of every group, each of shape ``x.shape`` with ``axis`` divided by 4."""
    grouped = x.reshape(x.shape[:axis] + (x.shape[axis] // 4, 4) + x.shape[axis + 1 :])
    return tuple(jnp.take(grouped, k, axis=axis + 1) for k in range(4))


def _merge(parts, axis: int) -> jax.Array:
    """Inverse of `_split`: interleaves per-member arrays back into groups of 4 along ``axis``."""
    stacked = jnp.stack(parts, axis=axis + 1)
    shape = stacked.shape[:axis] + (stacked.shape[axis] * len(parts),) + stacked.shape[axis + 2 :]
    return stacked.reshape(shape)


def _threshold(a0, a1, a2, a3):
    """2nd-smallest of four magnitudes by a min/max network (no sort)."""
    lo01, hi01 = jnp.minimum(a0, a1), jnp.maximum(a0, a1)
    lo23, hi23 = jnp.minimum(a2, a3), jnp.maximum(a2, a3)
    return jnp.minimum(jnp.maximum(lo01, lo23), jnp.minimum(hi01, hi23))


def _broadcast_group(t: jax.Array, axis: int, length: int) -> jax.Array:
    """Repeats a per-group value 4 times along ``axis``."""
    return jnp.repeat(t, 4, axis=axis, total_repeat_length=length)


def soft_threshold_24(w: Float[Array, "..."], axis: int = 0) -> Float[Array, "..."]:
    """S-STE's continuous 2:4 pruning: ``sign(a)·max(|a| − t, 0)``, t the 2nd-smallest ``|a|`` per group.

    >>> import jax.numpy as jnp, sste_jax
    >>> w = jnp.array([[0.5], [-2.0], [1.0], [0.25]])  # one group of 4 along axis 0
    >>> sste_jax.soft_threshold_24(w).ravel().tolist()
    [0.0, -1.5, 0.5, 0.0]
    """
    w = jnp.asarray(w)
    axis = check_groupable(w, axis)
    t = _threshold(*(jnp.abs(p) for p in _split(w, axis)))
    t = _broadcast_group(t, axis, w.shape[axis])
    return w - jnp.clip(w, -t, t)


def _top2_flags(a) -> tuple[jax.Array, ...]:
    """Per member, whether its magnitude ``a[k]`` is among the group's top 2 (ties: higher index wins).
    Elementwise on the four member arrays only, so the Pallas kernels use it as is."""
    beaten = [0, 0, 0, 0]
    for i, j in itertools.combinations(range(4), 2):
        j_wins = a[j] >= a[i]  # i < j: on a tie the higher index wins
        beaten[i] = beaten[i] + j_wins.astype(jnp.int32)
        beaten[j] = beaten[j] + (~j_wins).astype(jnp.int32)
    return tuple(b < 2 for b in beaten)


def _keep_flags(w: jax.Array, axis: int) -> tuple[jax.Array, ...]:
    """Per member of each group, whether it is among the top-2 magnitudes (ties: higher index wins)."""
    return _top2_flags([jnp.abs(p) for p in _split(w, axis)])


def mask_24(w: Float[Array, "..."], axis: int = 0) -> Bool[Array, "..."]:
    """Hard top-2-by-magnitude mask, exactly 2 ``True`` per group; ties go to the higher index.

    >>> import jax.numpy as jnp, sste_jax
    >>> sste_jax.mask_24(jnp.array([1.0, -3.0, 2.0, 2.0])).tolist()  # the tie goes to index 3
    [False, True, False, True]
    """
    w = jnp.asarray(w)
    axis = check_groupable(w, axis)
    return _merge(_keep_flags(w, axis), axis)


def hard_threshold_24(w: Float[Array, "..."], axis: int = 0) -> Float[Array, "..."]:
    """``w * mask_24(w)``: the forward weight of hard STE and SR-STE.

    >>> import jax.numpy as jnp, sste_jax
    >>> sste_jax.hard_threshold_24(jnp.array([1.0, -3.0, 2.0, 0.5])).tolist()
    [0.0, -3.0, 2.0, 0.0]
    """
    w = jnp.asarray(w)
    return jnp.where(mask_24(w, axis), w, jnp.zeros((), w.dtype))


def _member_last(x: jax.Array, axis: int, m: int) -> jax.Array:
    """``x`` with ``axis`` split into groups of ``m``, the members last: ``(..., groups, m)``."""
    moved = jnp.moveaxis(x, axis, -1)
    return moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))


def _member_back(grouped: jax.Array, axis: int) -> jax.Array:
    """Inverse of `_member_last`."""
    return jnp.moveaxis(grouped.reshape(grouped.shape[:-2] + (-1,)), -1, axis)


def mask_nm(w: Float[Array, "..."], n: int = 2, m: int = 4, axis: int = 0) -> Bool[Array, "..."]:
    """Hard top-``n``-by-magnitude mask per group of ``m``, exactly ``n`` ``True``; ties go to the higher
    index. ``mask_nm(w, 2, 4)`` is `mask_24`.

    Args:
      w: the weight.
      n, m: keep ``n`` of every ``m`` consecutive entries.
      axis: the axis the groups run along.

    >>> import jax.numpy as jnp, sste_jax
    >>> sste_jax.mask_nm(jnp.array([1.0, -3.0, 2.0, 0.5, 0.0, 0.0, 0.0, 0.0]), n=1, m=4).tolist()
    [False, True, False, False, False, False, False, True]
    """
    check_nm(n, m)
    if (n, m) == (2, 4):
        return mask_24(w, axis)
    w = jnp.asarray(w)
    axis = check_groupable(w, axis, m)
    a = jnp.abs(_member_last(w, axis, m))
    index = jnp.broadcast_to(jnp.arange(m), a.shape)
    beaten = jnp.zeros(a.shape, jnp.int32)  # per member, how many members rank above it
    for j in range(m):
        aj = a[..., j : j + 1]
        beaten = beaten + ((aj > a) | ((aj == a) & (j > index))).astype(jnp.int32)
    return _member_back(beaten < n, axis)


def soft_threshold_nm(w: Float[Array, "..."], n: int = 2, m: int = 4, axis: int = 0) -> Float[Array, "..."]:
    """S-STE's continuous N:M pruning: ``sign(a)·max(|a| − t, 0)``, ``t`` the ``(n+1)``-th largest ``|a|``
    of each group of ``m``. ``soft_threshold_nm(w, 2, 4)`` is `soft_threshold_24`.

    Args:
      w: the weight.
      n, m: keep ``n`` of every ``m`` consecutive entries.
      axis: the axis the groups run along.

    >>> import jax.numpy as jnp, sste_jax
    >>> sste_jax.soft_threshold_nm(jnp.array([1.0, -3.0, 2.0, 0.5]), n=1, m=4).tolist()  # t = 2
    [0.0, -1.0, 0.0, 0.0]
    """
    check_nm(n, m)
    if (n, m) == (2, 4):
        return soft_threshold_24(w, axis)
    w = jnp.asarray(w)
    axis = check_groupable(w, axis, m)
    t = jnp.sort(jnp.abs(_member_last(w, axis, m)), axis=-1)[..., m - n - 1 : m - n]
    t = _member_back(jnp.broadcast_to(t, t.shape[:-1] + (m,)), axis)
    return w - jnp.clip(w, -t, t)


def hard_threshold_nm(w: Float[Array, "..."], n: int = 2, m: int = 4, axis: int = 0) -> Float[Array, "..."]:
    """``w * mask_nm(w, n, m)``: the N:M forward weight of hard STE and SR-STE.

    Args:
      w: the weight.
      n, m: keep ``n`` of every ``m`` consecutive entries.
      axis: the axis the groups run along.

    >>> import jax.numpy as jnp, sste_jax
    >>> sste_jax.hard_threshold_nm(jnp.array([1.0, -3.0, 2.0, 0.5, 0.1, 0.2, 0.3, 0.4]), n=2, m=8).tolist()
    [0.0, -3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    """
    w = jnp.asarray(w)
    return jnp.where(mask_nm(w, n, m, axis), w, jnp.zeros((), w.dtype))


# Within this range of max|S(W)| the float32 dot products neither overflow nor lose S(W)'s mass to
# underflow, and `fit_beta` computes them unscaled; outside it both operands are scaled by a power of 2.
_BETA_RANGE = (2.0**-40, 2.0**40)


def fit_beta(w: Float[Array, "..."], axis: int = 0, *, n: int = 2, m: int = 4) -> Float[Array, ""]:
    """β minimising ``‖W − β·S(W)‖²``: ``<W, S(W)> / <S(W), S(W)>`` in float32, ``S`` = `soft_threshold_nm`.

    Scale-invariant: weights far from 1 (``1e-20``, ``1e30``) are rescaled by a power of 2 (exact)
    before the products. 1.0 if S(W) = 0 (e.g. all-zero weights); NaN if ``w`` has a NaN or ±inf.

    Args:
      w: the dense weight.
      axis: the axis the groups run along.
      n, m: keep ``n`` of every ``m`` (default 2:4).

    Returns:
      β, a float32 scalar.

    >>> import jax, sste_jax
    >>> w = jax.random.normal(jax.random.key(0), (256, 64))
    >>> round(float(sste_jax.fit_beta(w)), 1)  # about 1.48 for Gaussian weights
    1.5
    """
    w = jnp.asarray(w)
    s = soft_threshold_nm(w, n, m, axis)
    # S(W) rounded to W's dtype, as it is eagerly: under jit XLA may otherwise keep it in float32.
    info = jnp.finfo(s.dtype)
    s = jax.lax.reduce_precision(s.astype(jnp.float32), info.nexp, info.nmant)
    w = w.astype(jnp.float32)
    s_max = jnp.max(jnp.abs(s))
    _, exponent = jnp.frexp(s_max)
    unscaled = (s_max >= _BETA_RANGE[0]) & (s_max <= _BETA_RANGE[1])
    # 2**-exponent in two exact factors (one alone can leave float32's normal range); 1 in range.
    half = jnp.where(unscaled, 0, -exponent // 2)
    rest = jnp.where(unscaled, 0, -exponent - half)
    s_scaled = s * jnp.ldexp(jnp.float32(1), half) * jnp.ldexp(jnp.float32(1), rest)
    w_scaled = w * jnp.ldexp(jnp.float32(1), half) * jnp.ldexp(jnp.float32(1), rest)
    ss = jnp.vdot(s_scaled, s_scaled)
    beta = jnp.where(ss > 0, jnp.vdot(w_scaled, s_scaled) / jnp.where(ss > 0, ss, 1.0), 1.0)
    return jnp.where(jnp.all(jnp.isfinite(w)), beta, jnp.float32(jnp.nan))


def beta_problem(w: jax.Array, axis: int = 0, *, n: int = 2, m: int = 4) -> str | None:
    """Why `fit_beta` cannot fit a meaningful β to ``w`` (non-finite, all zero, S(W) = 0), or None.

    Only concrete arrays are checked; a traced ``w`` gives None.
    """
    if isinstance(w, jax.core.Tracer):
        return None
    w = jnp.asarray(w)
    bad = int(w.size - jnp.sum(jnp.isfinite(w)))
    if bad:
        return f"{bad} of its {w.size} entries are NaN or infinite"
    if not bool(jnp.any(w != 0)):
        return "it is all zero"
    if not bool(jnp.any(soft_threshold_nm(w, n, m, axis) != 0)):
        return (f"its soft threshold S(W) is all zero (in every group of {m} the {n + 1} largest magnitudes tie)")
    return None


def initial_beta(
    w: jax.Array, axis: int, name: str, beta: Real[ArrayLike, ""] | None = None, *, n: int = 2, m: int = 4
) -> jax.Array:
    """The frozen β of a layer or leaf ``name``: ``beta`` if given, else `fit_beta` of ``w``.

    Raises ValueError naming ``name`` when β cannot be fitted (see `beta_problem`) or ``beta`` is not a
    finite scalar. Under tracing, an unfittable ``w`` gives a NaN β instead (it cannot raise there).
    """
    if beta is not None:
        value = jnp.asarray(beta, jnp.float32)
        if value.shape != () or not (isinstance(value, jax.core.Tracer) or bool(jnp.isfinite(value))):
            raise ValueError(f"{name}: beta must be a finite scalar, got {beta!r}")
        return value
    reason = beta_problem(w, axis, n=n, m=m)
    if reason:
        raise ValueError(
            f"{name}: cannot fit S-STE's β to this kernel of shape {tuple(w.shape)}: {reason}; "
            "load the weights first, or pass beta=... explicitly"
        )
    fitted = fit_beta(w, axis, n=n, m=m)
    if isinstance(fitted, jax.core.Tracer):
        fitted = jnp.where(jnp.any(soft_threshold_nm(w, n, m, axis) != 0), fitted, jnp.float32(jnp.nan))
    return fitted


def mvue_24(key: PRNGKeyArray, g: Float[Array, "..."], axis: int = 0) -> Float[Array, "..."]:
    """Unbiased 2:4 sparsification: two draws without replacement ∝ ``|g| + eps``, Horvitz–Thompson scaled.

    ``E[mvue_24(key, g)] == g`` over keys. The draws use two uniforms per group.

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> g = jnp.array([1.0, -2.0, 3.0, 4.0])
    >>> out = sste_jax.mvue_24(jax.random.key(0), g)
    >>> int((out != 0).sum())
    2
    >>> keys = jax.random.split(jax.random.key(1), 20000)
    >>> mean = jax.vmap(lambda k: sste_jax.mvue_24(k, g))(keys).mean(0)
    >>> bool(jnp.allclose(mean, g, rtol=0.1))
    True
    """
    g = jnp.asarray(g)
    axis = check_groupable(g, axis)
    x = [p.astype(jnp.float32) for p in _split(g, axis)]
    a = [jnp.abs(xk) + _EPS for xk in x]
    total = a[0] + a[1] + a[2] + a[3]
    u1, u2 = _uniform(key, (2,) + total.shape)
    # Every a_k > 0, so the draw can only overshoot (rounding past the total): then take slot 3.
    first = jnp.minimum(_draw(a, u1 * total), 3)
    # Second draw among the other three: skip the first index's mass. Cumulating over a zeroed slot
    # never stops on it, so only an overshoot needs the last remaining slot.
    rest = [jnp.where(first == k, 0.0, a[k]) for k in range(4)]
    second = _draw(rest, u2 * (total - sum(jnp.where(first == k, a[k], 0.0) for k in range(4))))
    second = jnp.where(second > 3, jnp.where(first == 3, 2, 3), second)
    ratio = [a[j] / (total - a[j]) for j in range(4)]
    out = []
    for k in range(4):
        others = sum(ratio[j] for j in range(4) if j != k)
        p_k = a[k] / total * (1.0 + others)
        chosen = (first == k) | (second == k)
        out.append(jnp.where(chosen, x[k] / p_k, 0.0).astype(g.dtype))
    return _merge(out, axis)


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _uniform(key: PRNGKeyArray, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.uniform(key, shape)`` bit for bit; for threefry keys written out so that it fuses.

    XLA:CPU runs jax's threefry as a rolled loop over whole arrays (about 4x slower than the same 20
    rounds unrolled, which fuse into `mvue_24`'s single loop). Other key kinds go to jax.random.
    """
    size = int(np.prod(shape))
    if not (
        jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        and str(jax.random.key_impl(key)) == "threefry2x32"
        and jax.config.jax_threefry_partitionable
        and size < 2**32
    ):
        return jax.random.uniform(key, shape, jnp.float32)
    k0, k1 = jax.random.key_data(key)
    return _threefry_uniform(k0, k1, jax.lax.iota(jnp.uint32, size).reshape(shape))


def _threefry_uniform(k0, k1, counter):
    """``jax.random.uniform``'s float32 in [0, 1) at uint32 ``counter`` (partitionable threefry-2x32 of the
    counter pair ``(0, counter)``, 20 rounds) for the raw key ``(k0, k1)``; elementwise, Pallas uses it too."""
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0, x1 = jnp.zeros_like(counter) + ks[0], counter + ks[1]
    for step in range(5):
        for r in _ROTATIONS[step % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
        x0 = x0 + ks[(step + 1) % 3]
        x1 = x1 + ks[(step + 2) % 3] + np.uint32(step + 1)
    mantissa = ((x0 ^ x1) >> np.uint32(9)) | np.uint32(0x3F800000)
    return jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0


def _draw(weights, r):
    """Index ``i`` with ``sum(weights[:i]) <= r < sum(weights[:i+1])`` (4 if ``r`` overshoots the sum).

    A comparison chain, no gather: a zero weight adds nothing to the sum, so it is never returned.
    """
    index = jnp.zeros(r.shape, jnp.int32)
    cumulative = jnp.zeros_like(r)
    for wk in weights:
        cumulative = cumulative + wk
        index = index + (r >= cumulative).astype(jnp.int32)
    return index


def _kept_indices(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Per group, the two kept positions ``idx0 < idx1`` of `mask_24` (int32)."""
    keep = _keep_flags(w, axis)
    idx0 = jnp.where(keep[0], 0, jnp.where(keep[1], 1, 2))
    idx1 = jnp.where(keep[3], 3, jnp.where(keep[2], 2, 1))
    return idx0.astype(jnp.int32), idx1.astype(jnp.int32)


def _select(parts, index):
    out = parts[0]
    for k in range(1, 4):
        out = jnp.where(index == k, parts[k], out)
    return out


def compress_24(
    w: Float[Array, "..."], axis: int = 0
) -> tuple[Float[Array, "..."], UInt8[Array, "..."]]:
    """Packs the 2 entries per group kept by `mask_24`.

    Returns ``values`` (half the length along ``axis``, kept entries in index order) and ``meta``
    (one uint8 per group: ``idx0 | idx1 << 2``).

    >>> import jax.numpy as jnp, sste_jax
    >>> values, meta = sste_jax.compress_24(jnp.array([1.0, -3.0, 2.0, 0.5]))
    >>> values.tolist(), meta.tolist()  # kept indices 1 and 2: 1 | 2 << 2 = 9
    ([-3.0, 2.0], [9])
    """
    w = jnp.asarray(w)
    axis = check_groupable(w, axis)
    idx0, idx1 = _kept_indices(w, axis)
    parts = _split(w, axis)
    values = _merge((_select(parts, idx0), _select(parts, idx1)), axis)
    meta = (idx0 | (idx1 << 2)).astype(jnp.uint8)
    return values, meta


def decompress_24(
    values: Shaped[Array, "..."], meta: UInt8[Array, "..."], axis: int = 0
) -> Shaped[Array, "..."]:
    """Exact inverse of `compress_24` for 2:4-sparse input.

    Every ``meta`` byte must be a code `compress_24` writes (``idx0 | idx1 << 2``, ``idx0 < idx1``):
    otherwise this raises (eagerly) or, under tracing, puts NaN in the groups of invalid bytes.

    >>> import jax.numpy as jnp, sste_jax
    >>> sste_jax.decompress_24(jnp.array([-3.0, 2.0]), jnp.array([9], jnp.uint8)).tolist()
    [0.0, -3.0, 2.0, 0.0]
    """
    values, meta = jnp.asarray(values), jnp.asarray(meta)
    if meta.dtype != jnp.uint8:
        raise TypeError(f"meta must be uint8, got {meta.dtype}")
    check_axis(axis)
    if not -values.ndim <= axis < values.ndim:
        raise ValueError(f"axis {axis} is out of range for values of shape {values.shape}")
    axis %= values.ndim
    expected = values.shape[:axis] + (values.shape[axis] // 2,) + values.shape[axis + 1 :]
    if values.shape[axis] % 2 or meta.shape != expected:
        raise ValueError(
            f"values of shape {values.shape} and meta of shape {meta.shape} do not match along axis "
            f"{axis}: meta must have shape {expected}"
        )
    pairs = values.reshape(values.shape[:axis] + (meta.shape[axis], 2) + values.shape[axis + 1 :])
    v0, v1 = (jnp.take(pairs, k, axis=axis + 1) for k in range(2))
    idx0, idx1 = (meta & 3).astype(jnp.int32), (meta >> 2).astype(jnp.int32)
    zero = jnp.zeros((), values.dtype)
    parts = [jnp.where(idx0 == k, v0, jnp.where(idx1 == k, v1, zero)) for k in range(4)]
    valid = valid_meta(meta)
    if not isinstance(valid, jax.core.Tracer):
        if not bool(jnp.all(valid)):
            bad = np.argwhere(~np.asarray(valid))
            first = tuple(int(i) for i in bad[0])
            raise ValueError(
                f"meta has {len(bad)} invalid byte(s) (first: {int(np.asarray(meta)[first])} at index {first}); "
                f"compress_24 writes only idx0 | idx1 << 2 with idx0 < idx1, i.e. {list(_META_CODES)}"
            )
    elif jnp.issubdtype(values.dtype, jnp.inexact):
        nan = jnp.full((), jnp.nan, values.dtype)
        parts = [jnp.where(valid, p, nan) for p in parts]
    return _merge(parts, axis)


_META_CODES = tuple(i | j << 2 for i, j in itertools.combinations(range(4), 2))


def valid_meta(meta: jax.Array) -> jax.Array:
    """Where ``meta`` holds a code `compress_24` writes (two distinct positions of a group of 4, in order)."""
    valid = meta == _META_CODES[0]
    for code in _META_CODES[1:]:
        valid = valid | (meta == code)
    return valid


def _transposable_patterns() -> np.ndarray:
    """The 90 4×4 0/1 patterns with exactly two ones in every row and every column, in T-SR-STE's
    authors' order: descending lexicographic over the 16 entries of their PyTorch ``(out, in)``
    weight block, read row by row. Our kernel is ``(in, out)``, so each pattern is stored transposed."""
    rows = [r for r in itertools.product((1, 0), repeat=4) if sum(r) == 2]  # 1100, 1010, ..., 0011
    patterns = [
        np.array(p) for p in itertools.product(rows, repeat=4) if all(c == 2 for c in np.sum(p, axis=0))
    ]
    return np.stack(patterns).transpose(0, 2, 1).astype(np.float32)


_PATTERNS = _transposable_patterns()


def transposable_mask_24(w: Float[Array, "rows cols"]) -> Bool[Array, "rows cols"]:
    """Per 4×4 block, the 2:4-in-both-directions pattern maximising ``Σ|w|·pattern`` (T-SR-STE).

    Ties go to the first maximum in the authors' pattern order (for an ``(in, out)`` kernel, as their
    ``(out, in)`` weight): an all-zero block keeps rows ``1100/1100/0011/0011``.

    >>> import jax, sste_jax
    >>> m = sste_jax.transposable_mask_24(jax.random.normal(jax.random.key(0), (8, 8)))
    >>> m.sum(0).tolist(), m.sum(1).tolist()  # per 4×4 block: two per row and two per column
    ([4, 4, 4, 4, 4, 4, 4, 4], [4, 4, 4, 4, 4, 4, 4, 4])
    """
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"transposable_mask_24 needs a 2-D array, got shape {w.shape}")
    check_groupable(w, 0)
    check_groupable(w, 1)
    r, c = w.shape
    blocks = jnp.abs(w.astype(jnp.float32)).reshape(r // 4, 4, c // 4, 4)
    patterns = jnp.asarray(_PATTERNS)
    scores = jnp.einsum("aibj,pij->abp", blocks, patterns, precision=jax.lax.Precision.HIGHEST)
    best = patterns[jnp.argmax(scores, axis=-1)]  # the first maximum; (r/4, c/4, 4, 4)
    return best.transpose(0, 2, 1, 3).reshape(r, c) > 0
