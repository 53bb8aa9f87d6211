"""A 64-bit digest of an array's values, the same however the array is split over devices.

Two sums modulo 2**32 over the elements' bits: one weighted by an odd number per position (a change
of any one element, e.g. one flipped bit, always changes it), one of a mixing hash of (bits,
position) (other damage passes both with probability ~2**-64). Sums commute, so the result does not
depend on how the array is sharded. Checkpoints checksum their arrays with `fingerprint` (hex digits
of the digest); the MVUE key of a product folds in the digests of its input and weight
(`sste_jax._linear.fresh_key`).

>>> import jax.numpy as jnp
>>> a = jnp.arange(4.0)
>>> bool((digest(a) != digest(a.at[3].set(3.0000002))).any())
True
"""

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Shaped, UInt32

__all__ = ["digest", "fingerprint", "start_fingerprints", "to_hex"]


def _as_words(a: jax.Array) -> jax.Array:
    """The bits of ``a`` as uint32 words, one per element (two per 64-bit element)."""
    if a.dtype == jnp.bool_:
        return a.astype(jnp.uint32)
    size = a.dtype.itemsize
    if size in (4, 8):  # a 64-bit element becomes two words (a trailing axis of 2)
        return jax.lax.bitcast_convert_type(a, jnp.uint32)
    return jax.lax.bitcast_convert_type(a, {2: jnp.uint16, 1: jnp.uint8}[size]).astype(jnp.uint32)


def _mix(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: every input bit moves every output bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _halving_sum(terms: jax.Array, stop: int = 2**16) -> jax.Array:
    """``sum(terms)`` modulo 2**32 by adding halves until ``stop`` remain: XLA on CPU vectorises the
    elementwise adds but not an integer reduction (about 3x faster there); the temporaries take up
    to half of ``terms``."""
    size = max(stop, 1 << (terms.size - 1).bit_length())
    terms = jnp.pad(terms, (0, size - terms.size))
    while terms.size > stop:
        half = terms.size // 2
        terms = terms[:half] + terms[half:]
    return jnp.sum(terms, dtype=jnp.uint32)


def _sum(terms: jax.Array) -> jax.Array:
    """``sum(terms)`` modulo 2**32: halving on CPU, one reduction (no temporaries) elsewhere."""
    return jax.lax.platform_dependent(
        terms, cpu=_halving_sum, default=lambda t: jnp.sum(t, dtype=jnp.uint32)
    )


def digest(a: Shaped[Array, "..."]) -> UInt32[Array, "2"]:
    """The two 32-bit sums of ``a`` (see the module docstring)."""
    words = _as_words(a).reshape(-1)
    index = jax.lax.iota(jnp.uint32, words.size)
    weighted = _sum(words * (index * jnp.uint32(0x9E3779B1) | jnp.uint32(1)))
    mixed = _sum(_mix(words ^ _mix(index + jnp.uint32(0x7F4A7C15))))
    return jnp.stack([weighted, mixed])


@jax.jit
def digests(flat: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """`digest` of every array of ``flat``, in one jitted call."""
    return {name: digest(a) for name, a in flat.items()}


def start_fingerprints(arrays: dict[str, Any]) -> dict[str, jax.Array]:
    """Starts computing the digests of ``arrays`` (JAX dispatches asynchronously); `to_hex` waits for them."""
    return digests({n: jnp.asarray(a) for n, a in arrays.items()})  # host leaves as JAX stores them


def to_hex(sums: dict[str, jax.Array]) -> dict[str, str]:
    """``{name: 16 hex digits}`` of the digests `start_fingerprints` dispatched (waits for them)."""
    return {n: f"{int(v[0]):08x}{int(v[1]):08x}" for n, v in jax.device_get(sums).items()}


def fingerprint(arrays: dict[str, Any]) -> dict[str, str]:
    """``{name: 16 hex digits}``: a 64-bit checksum of each array's values, the same for any sharding.

    Two sums modulo 2**32 over the elements' bits: one weighted by an odd number per position (a
    change of any one element, e.g. one flipped bit, always changes it), one of a mixing hash of
    (bits, position) (other damage passes both with probability ~2**-64). Sums commute, so the
    result does not depend on how the array is split over devices or processes, and it is computed
    where the array lives (one jitted call; every process calls it for sharded arrays).

    >>> import jax.numpy as jnp
    >>> from sste_jax import checkpoint
    >>> a = jnp.arange(4.0)
    >>> checkpoint.fingerprint({"a": a}) == checkpoint.fingerprint({"a": a.at[3].set(3.0000002)})
    False
    """
    return to_hex(start_fingerprints(arrays))
