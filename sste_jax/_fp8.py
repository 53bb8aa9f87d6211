"""FP8 products with per-tensor current scaling (``docs/algorithm.md#fp8-products``).

Each operand is scaled by ``s = FP8_MAX / amax(|t|)`` (``s = 1`` when ``amax = 0``), clipped to
``±FP8_MAX`` (an out-of-range e4m3fn cast is NaN), cast, multiplied with float32 accumulation and
divided by ``s_a·s_b``. On Hopper, XLA lowers the FP8 dot to cuBLASLt's FP8 GEMM; on CPU it is a
faithful simulation.

>>> import jax.numpy as jnp
>>> from sste_jax._fp8 import fp8_dot
>>> fp8_dot(jnp.full((2, 4), 1e4), jnp.ones((4, 3)), jnp.float8_e4m3fn)[0, 0].item()
40000.0
"""

import jax
import jax.numpy as jnp

FORWARD = jnp.float8_e4m3fn
BACKWARD = jnp.float8_e5m2


def quantize(t: jax.Array, fmt) -> tuple[jax.Array, jax.Array]:
    """Returns ``(q, s)`` with ``q = cast(clip(t·s))`` in ``fmt`` and the float32 scale ``s``."""
    fmax = float(jnp.finfo(fmt).max)
    t = t.astype(jnp.float32)
    amax = jnp.max(jnp.abs(t))
    s = jnp.where(amax > 0, fmax / jnp.where(amax > 0, amax, 1.0), 1.0)
    return jnp.clip(t * s, -fmax, fmax).astype(fmt), s


def to_float16(t: jax.Array) -> jax.Array:
    """``t`` rounded to float16, saturating at ±65504 (a plain cast overflows to inf)."""
    fmax = float(jnp.finfo(jnp.float16).max)
    return jnp.clip(t.astype(jnp.float32), -fmax, fmax).astype(jnp.float16)


def fp8_dot(a: jax.Array, b: jax.Array, fmt, contract: tuple[int, int] = (1, 0)) -> jax.Array:
    """``a·b`` contracting ``a``'s axis ``contract[0]`` with ``b``'s ``contract[1]``, both operands in ``fmt``.

    Returns float32.
    """
    qa, sa = quantize(a, fmt)
    qb, sb = quantize(b, fmt)
    dims = (((contract[0],), (contract[1],)), ((), ()))
    out = jax.lax.dot_general(qa, qb, dims, preferred_element_type=jnp.float32)
    return out / (sa * sb)
