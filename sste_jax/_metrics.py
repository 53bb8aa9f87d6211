"""Training metrics of 2:4 sparse layers: mask flip rate, β, zero fraction, relative error.

The rules are in ``docs/algorithm.md#metrics``.

Everything works on a flat mapping ``{layer name: SparseWeight}`` (a plain pytree, so it is jittable
and shared by the layer and parameter paths); `sparse_weights` builds it from an NNX model. The
previous masks live in a `FlipState` as packed bits: 1 bit per weight, ``n/8`` bytes for ``n``
weights, a 32nd of a float32 copy of the old weights and half of ``compress_24``'s uint8 metadata.

>>> import jax, sste_jax
>>> w = {"fc": sste_jax.SparseWeight(jax.random.normal(jax.random.key(0), (8, 4)))}
>>> state = sste_jax.init_flip_state(w)
>>> rates, state = sste_jax.flip_rate(state, w)
>>> sste_jax.metrics.to_host(rates)
{'flip_rate': 0.0, 'flip_rate/fc': 0.0}
"""

import dataclasses
import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Real, UInt8

from sste_jax._linear import SparsityConfig, forward_weight
from sste_jax._sparsity import mask_nm

if TYPE_CHECKING:
    from flax import nnx

__all__ = [
    "SparseWeight",
    "sparse_weights",
    "FlipState",
    "init_flip_state",
    "flip_rate",
    "sparsity_stats",
    "to_host",
    "check_sharding",
]


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["kernel", "beta", "mask"], meta_fields=["config", "axis"]
)
@dataclasses.dataclass(frozen=True)
class SparseWeight:
    """One sparse weight: the dense ``kernel``, its frozen ``beta``, the config, the grouped axis and
    (``"tsrste"`` only) the forward ``mask``.

    >>> import jax, sste_jax
    >>> w = sste_jax.SparseWeight(jax.random.normal(jax.random.key(0), (8, 4)), beta=1.5)
    >>> int((w.forward() != 0).sum())  # at most 2 of every 4 along axis 0
    16
    """

    kernel: Float[Array, "..."] | jax.ShapeDtypeStruct  # a ShapeDtypeStruct: for `check_sharding` only
    beta: Real[ArrayLike, ""] = 1.0
    config: SparsityConfig = SparsityConfig()
    axis: int = 0
    mask: Bool[Array, "..."] | None = None

    def forward(self) -> Float[Array, "..."]:
        """The forward weight ``W̃`` (`forward_weight`)."""
        return forward_weight(self.kernel, self.beta, self.config, self.axis, self.mask)


def sparse_modules(model: "nnx.Module") -> list[tuple[tuple, "nnx.Module"]]:
    """``(path, module)`` of every module with ``kernel``, ``beta`` and a `SparsityConfig` ``config``."""
    from flax import nnx  # the layer level: keeps ``import sste_jax`` free of Flax

    return [
        (path, node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Module)
        and isinstance(getattr(node, "config", None), SparsityConfig)
        and hasattr(node, "beta")
        and hasattr(node, "kernel")
    ]


def _mask(layer):
    return layer.mask[...] if layer.config.method == "tsrste" else None


def sparse_weights(model: "nnx.Module") -> dict[str, SparseWeight]:
    """``{path: SparseWeight}`` for every sparse layer of an NNX model (see `sparse_modules`).

    Paths join attribute names and indices with ``/`` (``"blocks/0/mlp/fc1"``). Layers with
    ``method="dense"`` are included: their top-2 flip rate is the reference rate (``docs/algorithm.md#metrics``).

    >>> from flax import nnx
    >>> import sste_jax
    >>> from sste_jax import nnx as sparse_nnx
    >>> model = nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0)), nnx.relu)
    >>> list(sste_jax.sparse_weights(model))
    ['layers/0']
    """
    return {
        "/".join(str(p) for p in path): SparseWeight(
            layer.kernel[...], layer.beta[...], layer.config, mask=_mask(layer)
        )
        for path, layer in sparse_modules(model)
    }


class FlipState(NamedTuple):
    """The previous step's hard mask (`mask_nm` of its layer's N:M) of every layer, ``jnp.packbits`` of it.

    >>> import jax, sste_jax
    >>> state = sste_jax.init_flip_state({"fc": sste_jax.SparseWeight(jax.random.normal(jax.random.key(0), (64, 4)))})
    >>> state.masks["fc"].dtype, state.masks["fc"].shape  # 256 mask bits in 32 bytes
    (dtype('uint8'), (32,))
    """

    masks: dict[str, UInt8[Array, " packed"]]


def _packed_mask(w: SparseWeight) -> UInt8[Array, " packed"]:
    return jnp.packbits(mask_nm(w.kernel, w.config.n, w.config.m, w.axis).ravel())


def init_flip_state(weights: Mapping[str, SparseWeight]) -> FlipState:
    """The masks of ``weights`` now (call it when the model is sparsified, or after loading).

    >>> import jax, sste_jax
    >>> weights = {"fc": sste_jax.SparseWeight(jax.random.normal(jax.random.key(0), (8, 4)))}
    >>> list(sste_jax.init_flip_state(weights).masks)
    ['fc']
    """
    return FlipState({name: _packed_mask(w) for name, w in weights.items()})


def flip_rate(
    state: FlipState, weights: Mapping[str, SparseWeight]
) -> tuple[dict[str, Float[Array, ""]], FlipState]:
    """Fraction of mask entries that changed since ``state``: global (element-weighted) and per layer.

    Returns ``({"flip_rate": r, "flip_rate/<name>": r_name, ...}, new_state)``; call it once per
    optimizer step with the updated weights. Jittable.

    >>> import jax.numpy as jnp, sste_jax
    >>> before = {"fc": sste_jax.SparseWeight(jnp.array([[4.0], [3.0], [2.0], [1.0]]))}
    >>> after = {"fc": sste_jax.SparseWeight(jnp.array([[4.0], [1.0], [2.0], [3.0]]))}
    >>> rates, state = sste_jax.flip_rate(sste_jax.init_flip_state(before), after)
    >>> sste_jax.metrics.to_host(rates)  # index 1 left the mask, index 3 joined: 2 of 4 entries flipped
    {'flip_rate': 0.5, 'flip_rate/fc': 0.5}
    """
    if set(state.masks) != set(weights):
        raise ValueError(
            f"flip state has layers {sorted(state.masks)} but the weights have {sorted(weights)}"
        )
    new = init_flip_state(weights)
    rates, flipped, total = {}, jnp.int32(0), 0
    for name, w in weights.items():
        if new.masks[name].shape != state.masks[name].shape:
            raise ValueError(
                f"layer {name!r}: kernel of shape {w.kernel.shape} does not match the flip state "
                f"({state.masks[name].shape[0]} packed bytes)"
            )
        count = jnp.sum(jax.lax.population_count(new.masks[name] ^ state.masks[name]), dtype=jnp.int32)
        rates[f"flip_rate/{name}"] = count.astype(jnp.float32) / w.kernel.size
        flipped, total = flipped + count, total + w.kernel.size
    rates = {"flip_rate": flipped.astype(jnp.float32) / max(total, 1), **rates}
    return rates, new


def sparsity_stats(weights: Mapping[str, SparseWeight]) -> dict[str, Float[Array, ""]]:
    """Per layer: ``beta/<name>``, ``zero_fraction/<name>`` (exact zeros in W̃) and
    ``rel_error/<name>`` (``‖W − W̃‖ / ‖W‖``, 0 for an all-zero W). Jittable.

    >>> import jax.numpy as jnp, sste_jax
    >>> weights = {"fc": sste_jax.SparseWeight(jnp.array([[4.0], [3.0], [2.0], [1.0]]), beta=1.0)}
    >>> stats = sste_jax.metrics.to_host(sste_jax.sparsity_stats(weights))
    >>> stats["beta/fc"], stats["zero_fraction/fc"]
    (1.0, 0.5)
    """
    out = {}
    for name, w in weights.items():
        kernel = w.kernel.astype(jnp.float32)
        w_tilde = w.forward().astype(jnp.float32)
        norm = jnp.linalg.norm(kernel)
        out[f"beta/{name}"] = jnp.asarray(w.beta, jnp.float32)
        out[f"zero_fraction/{name}"] = jnp.mean(w_tilde == 0, dtype=jnp.float32)
        out[f"rel_error/{name}"] = jnp.where(
            norm > 0, jnp.linalg.norm(kernel - w_tilde) / jnp.where(norm > 0, norm, 1.0), 0.0
        )
    return out


def to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
    """One device-to-host transfer of a flat metrics dict; values become Python floats.

    >>> import jax.numpy as jnp, sste_jax
    >>> sste_jax.metrics.to_host({"loss": jnp.float32(0.5)})
    {'loss': 0.5}
    """
    return {name: float(value) for name, value in jax.device_get(dict(metrics)).items()}


def check_sharding(weights: Mapping[str, SparseWeight]) -> None:
    """Raises `ValueError` naming the layer if a kernel's sharding would split a group of 4.

    Works on placed arrays and on ``jax.ShapeDtypeStruct`` kernels carrying a ``sharding`` (to check
    a plan before placing anything): every shard's length along the grouped axis must be a multiple
    of 4. Call it on ``sparse_weights(model)`` after ``jax.device_put`` (or ``nnx.eval_shape``).

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> kernel = jax.device_put(jnp.ones((8, 4)), jax.NamedSharding(mesh, jax.P("fsdp", None)))
    >>> sste_jax.check_sharding({"fc": sste_jax.SparseWeight(kernel)}) is None  # shards of 8 rows: groups intact
    True
    """
    for name, w in weights.items():
        sharding, shape = getattr(w.kernel, "sharding", None), w.kernel.shape
        if sharding is None:
            continue
        spec = getattr(sharding, "spec", sharding)
        try:
            local = sharding.shard_shape(shape)
        except ValueError as e:
            raise ValueError(
                f"layer {name!r}: sharding {spec} does not divide the kernel of shape {shape}: {e}"
            ) from None
        if local[w.axis] % 4:
            raise ValueError(
                f"layer {name!r}: sharding {spec} cuts the kernel of shape {shape} into shards of shape "
                f"{local}, splitting 2:4 groups along axis {w.axis} (shard length {local[w.axis]} is not "
                "a multiple of 4); shard that axis fewer ways or shard another axis"
            )
