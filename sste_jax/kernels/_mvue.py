"""MVUE 2:4 sampling fused with compression along the token axis, as a Pallas kernel.

The random bits are counter-based: each group's two uniforms are the threefry-2x32 hashes that
``jax.random.uniform(key, (2, T/4, N))`` draws, computed inside the kernel, so the result is
reproducible for a key and ``decompress_24(*mvue_compress_24(key, g)) == mvue_24(key, g)``.

>>> import jax, jax.numpy as jnp, sste_jax
>>> from sste_jax.kernels import mvue_compress_24
>>> g = jax.random.normal(jax.random.key(1), (8, 3))
>>> values, meta = mvue_compress_24(jax.random.key(0), g, interpret=True)
>>> bool((sste_jax.decompress_24(values, meta) == sste_jax.mvue_24(jax.random.key(0), g)).all())
True
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, PRNGKeyArray, UInt8

from sste_jax._sparsity import _EPS, check_groupable, decompress_24
from sste_jax._sparsity import _select as select
from sste_jax._sparsity import _threefry_uniform as _uniform

__all__ = ["mvue_compress_24", "pallas_mvue"]


def _draw(weights, r):
    """Same rule as ``sste_jax._sparsity._draw``, written with selects only."""
    index = jnp.zeros(r.shape, jnp.int32)
    cumulative = jnp.zeros_like(r)
    last_positive = jnp.full(r.shape, -1, jnp.int32)
    for k, wk in enumerate(weights):
        cumulative = cumulative + wk
        index = index + (r >= cumulative).astype(jnp.int32)
        last_positive = jnp.where(wk > 0, k, last_positive)
    picked_valid = select([w > 0 for w in weights], index)
    return jnp.where((index < 4) & picked_valid, index, last_positive)


def _mvue_kernel(key_ref, g_ref, values_ref, meta_ref, *, n_cols, n_groups, block):
    bg, bn = block
    x = [g_ref[:, k, :].astype(jnp.float32) for k in range(4)]
    rows = pl.program_id(0) * bg + jax.lax.broadcasted_iota(jnp.int32, (bg, bn), 0)
    cols = pl.program_id(1) * bn + jax.lax.broadcasted_iota(jnp.int32, (bg, bn), 1)
    counter = (rows * n_cols + cols).astype(jnp.uint32)
    k0, k1 = key_ref[0], key_ref[1]
    u1 = _uniform(k0, k1, counter)
    u2 = _uniform(k0, k1, counter + np.uint32(n_groups))
    a = [jnp.abs(xk) + _EPS for xk in x]
    total = a[0] + a[1] + a[2] + a[3]
    first = _draw(a, u1 * total)
    rest = [jnp.where(first == k, 0.0, a[k]) for k in range(4)]
    second = _draw(rest, u2 * (total - sum(jnp.where(first == k, a[k], 0.0) for k in range(4))))
    out = []
    for k in range(4):
        others = sum(a[j] / (total - a[j]) for j in range(4) if j != k)
        p_k = a[k] / total * (1.0 + others)
        chosen = (first == k) | (second == k)
        out.append(jnp.where(chosen, x[k] / p_k, 0.0).astype(values_ref.dtype))
    idx0, idx1 = jnp.minimum(first, second), jnp.maximum(first, second)
    values_ref[:, 0, :] = select(out, idx0)
    values_ref[:, 1, :] = select(out, idx1)
    meta_ref[...] = (idx0 | (idx1 << 2)).astype(jnp.uint8)


def mvue_compress_24(
    key: PRNGKeyArray,
    g: Float[Array, "T N"],
    *,
    block: tuple[int, int] = (8, 128),
    interpret: bool | None = None,
    num_warps: int | None = 4,
) -> tuple[Float[Array, "T/2 N"], UInt8[Array, "T/4 N"]]:
    """``compress``-layout MVUE sample of a ``(T, N)`` gradient, groups of 4 tokens along axis 0.

    Returns ``(values, meta)``: the two drawn entries of each group (``x_k / p_k``, index order) and
    ``idx0 | idx1 << 2`` of the drawn positions. Bit-identical to `sste_jax.mvue_24` with the same
    (threefry) key. ``block``, ``interpret`` and ``num_warps`` as in `prune_compress_24`.

    Args:
      key: a threefry PRNG key (typed, or its raw ``uint32[2]``).
      g: the ``(T, N)`` gradient, ``T`` divisible by 4.
      block, interpret, num_warps: as in `prune_compress_24`.

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> from sste_jax.kernels import mvue_compress_24
    >>> g, key = jax.random.normal(jax.random.key(0), (8, 16)), jax.random.key(1)
    >>> values, meta = mvue_compress_24(key, g)
    >>> bool(jnp.array_equal(sste_jax.decompress_24(values, meta), sste_jax.mvue_24(key, g)))
    True
    """
    if g.ndim != 2:
        raise ValueError(f"mvue_compress_24 needs a 2-D (tokens, features) array, got shape {g.shape}")
    check_groupable(g, 0)
    if 2 * g.size // 4 >= 2**32:
        raise ValueError(f"gradient of shape {g.shape} has too many groups for 32-bit counters")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if jax.random.key_impl(key) != jax.random.key_impl(jax.random.key(0)):
            raise ValueError(f"mvue_compress_24 needs a threefry key, got {jax.random.key_impl(key)}")
        key = jax.random.key_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(f"key must be a threefry PRNG key, got shape {key.shape} dtype {key.dtype}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _mvue_call(key, g, tuple(block), interpret, num_warps)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _mvue_call(key, g, block, interpret, num_warps):
    t, n = g.shape
    groups = t // 4
    bg, bn = block
    # counters follow the real (T/4, N) layout; padding to whole blocks only adds discarded lanes
    kernel = functools.partial(_mvue_kernel, n_cols=n, n_groups=groups * n, block=block)
    gp, n_pad = pl.cdiv(groups, bg) * bg, pl.cdiv(n, bn) * bn
    g = jnp.pad(g, ((0, 4 * (gp - groups)), (0, n_pad - n)))
    params = {}
    if num_warps is not None and not interpret:
        from jax.experimental.pallas import triton as pltriton

        params["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps, num_stages=1)
    values, meta = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((gp, 2, n_pad), g.dtype), jax.ShapeDtypeStruct((gp, n_pad), jnp.uint8)],
        grid=(gp // bg, n_pad // bn),
        in_specs=[pl.BlockSpec((2,), lambda i, j: (0,)), pl.BlockSpec((bg, 4, bn), lambda i, j: (i, 0, j))],
        out_specs=[pl.BlockSpec((bg, 2, bn), lambda i, j: (i, 0, j)), pl.BlockSpec((bg, bn), lambda i, j: (i, j))],
        interpret=interpret,
        **params,
    )(key, g.reshape(gp, 4, n_pad))
    return values[:groups, :, :n].reshape(t // 2, n), meta[:groups, :n]


def pallas_mvue(key, g_TxO):
    """``mvue_24(key, g, axis=0)`` through the fused MVUE kernel, bit for bit.

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> g, key = jax.random.normal(jax.random.key(0), (8, 16)), jax.random.key(1)
    >>> bool(jnp.array_equal(pallas_mvue(key, g), sste_jax.mvue_24(key, g)))
    True
    """
    return decompress_24(*mvue_compress_24(key, g_TxO))
