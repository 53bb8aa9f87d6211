"""The record of a model's sparse weights, and the training metrics read from it.

`sparse_weights` is the one finder: it returns every sparse weight of a model however it was made
sparse (`SparseLinear` layers, `sste_jax.sparsify` on NNX or Linen, `sste_jax.sparsify_fn`) as
``{weight path: SparseWeight}``: the dense weight, its β, config, layout and grouped axis. Metrics,
optimizer masks, checkpoints and export read it. The metrics' rules are in ``docs/algorithm.md#metrics``:
mask flip rate, β, zero fraction, relative error. The previous masks live in a `FlipState` as packed
bits: 1 bit per weight.

>>> import jax, sste_jax
>>> w = {"fc": sste_jax.SparseWeight(jax.random.normal(jax.random.key(0), (8, 4)))}
>>> state = sste_jax.metrics.init_flip_state(w)
>>> rates, state = sste_jax.metrics.flip_rate(state, w)
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

from sste_jax._config import SparsityConfig
from sste_jax._layout import SparseSpec, apply_layout, layer_shape, param_axis, undo_layout
from sste_jax._linear import forward_weight
from sste_jax._sparsity import mask_nm

if TYPE_CHECKING:
    from flax import nnx

__all__ = [
    "SparseWeight",
    "sparse_weights",
    "sparse_kernel_mask",
    "forward_masks",
    "FlipState",
    "init_flip_state",
    "flip_rate",
    "sparsity_stats",
    "to_host",
    "check_sharding",
]


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["kernel", "beta", "mask"], meta_fields=["config", "axis", "layout"]
)
@dataclasses.dataclass(frozen=True)
class SparseWeight:
    """One sparse weight: the dense ``kernel`` (the parameter as stored), its frozen ``beta`` (one per
    layer of a stacked weight), the config, the ``layout`` that makes the product's operand from the
    kernel (``()``: the kernel itself, see `sste_jax._layout`), the operand ``axis`` the groups run
    along and (``"tsrste"`` only) the forward ``mask``.

    >>> import jax, sste_jax
    >>> w = sste_jax.SparseWeight(jax.random.normal(jax.random.key(0), (8, 4)), beta=1.5)
    >>> int((w.forward() != 0).sum())  # at most 2 of every 4 along axis 0
    16
    """

    kernel: Float[Array, "..."] | jax.ShapeDtypeStruct  # a ShapeDtypeStruct: for `check_sharding` only
    beta: Real[ArrayLike, "*layers"] = 1.0
    config: SparsityConfig = SparsityConfig()
    axis: int = 0
    mask: Bool[Array, "..."] | None = None
    layout: tuple = ()

    @property
    def param_axis(self) -> int | None:
        """The kernel's axis the groups run along (None when the product reshapes it into another)."""
        return param_axis(self.layout, self.axis)

    def operand(self) -> Float[Array, "..."]:
        """The kernel as the product sees it: ``(layers..., operand axes...)``."""
        return apply_layout(self.kernel, self.layout)

    def forward(self) -> Float[Array, "..."]:
        """The forward weight ``W̃`` (`forward_weight` of each layer), in the kernel's shape and dtype."""
        def one(w, beta, mask):
            return forward_weight(w, beta, self.config, self.axis, mask)

        for _ in layer_shape(self.layout):
            one = jax.vmap(one)
        mask = None if self.mask is None else apply_layout(self.mask, self.layout)
        w_tilde = one(self.operand(), jnp.broadcast_to(jnp.asarray(self.beta, jnp.float32),
                                                       layer_shape(self.layout)), mask)
        return undo_layout(w_tilde, self.layout, self.kernel.dtype)


def sparse_modules(model: "nnx.Module") -> list[tuple[tuple, "nnx.Module"]]:
    """``(path, module)`` of every `SparseLinear`-like module: ``kernel``, ``beta``, a `SparsityConfig` ``config``."""
    from flax import nnx  # the layer level: keeps ``import sste_jax`` free of Flax

    return [
        (path, node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Module)
        and isinstance(getattr(node, "config", None), SparsityConfig)
        and hasattr(node, "beta")
        and hasattr(node, "kernel")
    ]


def _join(*parts) -> str:
    return "/".join(str(p) for part in parts for p in (part if isinstance(part, tuple) else (part,)) if p != "")


def _nnx_weights(model: "nnx.Module") -> dict[str, SparseWeight]:
    from flax import nnx

    from sste_jax._sparsify import SparsityState

    out = {}
    values = {_join(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, SparsityState):  # the `sparsity` attribute of the model it made sparse
            for weight, beta in node.betas.items():
                spec: SparseSpec = beta.get_metadata()["spec"]
                name = _join(path[:-1], weight)
                out[name] = SparseWeight(values[name], beta.get_value(), spec.config, spec.axis, layout=spec.layout)
    for path, layer in sparse_modules(model):
        kernel = layer.kernel[...]
        stacked = (("layer", 0, kernel.shape[0]),) if kernel.ndim == 3 else ()  # made by nnx.vmap
        mask = layer.mask[...] if layer.config.method == "tsrste" else None
        out[_join(path, "kernel")] = SparseWeight(kernel, layer.beta[...], layer.config, mask=mask, layout=stacked)
    return out


def _variables_weights(variables: Mapping[str, Any]) -> dict[str, SparseWeight]:
    from sste_jax._sparsify import SparsityBeta, _linen_params

    params = _linen_params(variables)
    out = {}
    for path, beta in variables["sparsity"].items():
        if not isinstance(beta, SparsityBeta) or path not in params:
            raise ValueError(f"variables['sparsity'][{path!r}] is not the β of a weight in variables['params']")
        spec = beta.spec
        out[path] = SparseWeight(params[path], beta.value, spec.config, spec.axis, layout=spec.layout)
    return out


def sparse_weights(model: Any) -> dict[str, SparseWeight]:
    """``{weight path: SparseWeight}`` of every sparse weight of ``model``: an NNX model (`SparseLinear`
    layers, or made sparse by `sste_jax.sparsify`) or the variables of `sste_jax.sparsify`'s Linen module
    or of `sste_jax.sparsify_fn` (``{"params", "sparsity"}``). Raises when there is none.

    Paths join attribute names, keys and indices with ``/`` (``"blocks/0/mlp/fc/kernel"``). Weights with
    ``method="dense"`` are included: their top-2 flip rate is the reference rate (``docs/algorithm.md#metrics``).

    >>> from flax import nnx
    >>> import sste_jax
    >>> from sste_jax import nnx as sparse_nnx
    >>> model = nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0)), nnx.relu)
    >>> list(sste_jax.sparse_weights(model))
    ['layers/0/kernel']
    """
    found = find_weights(model)
    if not found:
        raise ValueError("sparse_weights: this model has no sparse weights (make it sparse with sste_jax.sparsify, "
                         "or build it with sste_jax.nnx.SparseLinear)")
    return found


def find_weights(model: Any) -> dict[str, SparseWeight]:
    """`sparse_weights` without the check that there is one."""
    if isinstance(model, Mapping) and "sparsity" in model and "params" in model:
        return _variables_weights(model)
    if _is_nnx(model):
        return _nnx_weights(model)
    raise TypeError(f"sparse_weights takes an NNX model or the variables {{'params', 'sparsity'}} of a sparsified "
                    f"Linen module or function, got {type(model).__name__}")


def _is_nnx(model) -> bool:
    from flax import nnx

    return isinstance(model, nnx.Module)


def sparse_kernel_mask(model: Any, wrt: Any = None, methods: tuple[str, ...] | None = None) -> Any:
    """A boolean tree shaped like the trainable parameters: True at the sparse weights (those whose
    method is in ``methods``, if given). For an NNX model, shaped like ``nnx.state(model, wrt)`` (default
    ``nnx.Param``); for variables ``{"params", "sparsity"}``, like ``variables["params"]``.

    Use it as the ``mask`` of `sste_jax.optim.add_masked_decay` (``methods=("tsrste",)``), of
    `sste_jax.optim.add_srste_decay` (``methods=("ste",)``: ``"srste"`` weights add that term themselves),
    of `sste_jax.optim.scale_by_step`'s ``sparse``, or of a per-weight learning rate.

    >>> from flax import nnx
    >>> import sste_jax
    >>> from sste_jax import nnx as sparse_nnx
    >>> model = nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 4, rngs=nnx.Rngs(1)))
    >>> mask = sste_jax.optim.sparse_kernel_mask(model)
    >>> bool(mask["layers"][0]["kernel"]), bool(mask["layers"][1]["kernel"])
    (True, False)
    """
    chosen = {name for name, w in sparse_weights(model).items() if methods is None or w.config.method in methods}
    return _params_like(model, wrt, lambda name: name in chosen)


def forward_masks(model: Any, wrt: Any = None) -> Any:
    """A tree shaped like the trainable parameters (as `sparse_kernel_mask`'s) holding the forward mask of each
    ``"tsrste"`` weight, its layer's `sste_jax.nnx.SparsityMask`, and None elsewhere: the ``masks`` that
    `sste_jax.optim.add_masked_decay` reads at each update, so that the layer is the masks' one owner.

    >>> from flax import nnx
    >>> import sste_jax
    >>> from sste_jax import nnx as sparse_nnx
    >>> layer = sparse_nnx.SparseLinear(8, 8, config=sste_jax.SparsityConfig(method="tsrste"), rngs=nnx.Rngs(0))
    >>> masks = sste_jax.optim.forward_masks(nnx.Sequential(layer, nnx.Linear(8, 8, rngs=nnx.Rngs(1))))
    >>> masks["layers"][0]["kernel"] is layer.mask[...], masks["layers"][1]["kernel"] is None
    (True, True)
    """
    masks = {name: w.mask for name, w in sparse_weights(model).items() if w.config.method == "tsrste"}
    return _params_like(model, wrt, masks.get)


def _params_like(model: Any, wrt: Any, value_of) -> Any:
    """A tree shaped like the trainable parameters of ``model`` holding ``value_of(weight path)`` at each."""
    if isinstance(model, Mapping):
        from sste_jax._sparsify import _is_box, _path

        def mark(path, leaf):  # a Flax box (partitioning) keeps its place, holding the value
            return leaf.replace_boxed(value_of(_path(path))) if _is_box(leaf) else value_of(_path(path))

        return jax.tree_util.tree_map_with_path(mark, model["params"], is_leaf=_is_box)
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model, nnx.Param if wrt is None else wrt))
    return nnx.from_flat_state([(path, value_of(_join(path))) for path, _ in flat])


class FlipState(NamedTuple):
    """The previous step's hard mask (`mask_nm` of its layer's N:M) of every layer, ``jnp.packbits`` of it.

    >>> import jax, sste_jax
    >>> w = sste_jax.SparseWeight(jax.random.normal(jax.random.key(0), (64, 4)))
    >>> state = sste_jax.metrics.init_flip_state({"fc": w})
    >>> state.masks["fc"].dtype, state.masks["fc"].shape  # 256 mask bits in 32 bytes
    (dtype('uint8'), (32,))
    """

    masks: dict[str, UInt8[Array, " packed"]]


def _packed_mask(w: SparseWeight) -> UInt8[Array, " packed"]:
    layers = len(layer_shape(w.layout))
    return jnp.packbits(mask_nm(w.operand(), w.config.n, w.config.m, layers + w.axis).ravel())


def init_flip_state(weights: Mapping[str, SparseWeight]) -> FlipState:
    """The masks of ``weights`` now (call it when the model is sparsified, or after loading).

    >>> import jax, sste_jax
    >>> weights = {"fc": sste_jax.SparseWeight(jax.random.normal(jax.random.key(0), (8, 4)))}
    >>> list(sste_jax.metrics.init_flip_state(weights).masks)
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
    >>> rates, state = sste_jax.metrics.flip_rate(sste_jax.metrics.init_flip_state(before), after)
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
    """Per weight: ``beta/<name>`` (the mean over a stacked weight's layers), ``zero_fraction/<name>`` (exact
    zeros in W̃) and
    ``rel_error/<name>`` (``‖W − W̃‖ / ‖W‖``, 0 for an all-zero W). Jittable.

    >>> import jax.numpy as jnp, sste_jax
    >>> weights = {"fc": sste_jax.SparseWeight(jnp.array([[4.0], [3.0], [2.0], [1.0]]), beta=1.0)}
    >>> stats = sste_jax.metrics.to_host(sste_jax.metrics.sparsity_stats(weights))
    >>> stats["beta/fc"], stats["zero_fraction/fc"]
    (1.0, 0.5)
    """
    out = {}
    for name, w in weights.items():
        kernel = w.kernel.astype(jnp.float32)
        w_tilde = w.forward().astype(jnp.float32)
        norm = jnp.linalg.norm(kernel)
        out[f"beta/{name}"] = jnp.mean(jnp.asarray(w.beta, jnp.float32))  # over the layers of a stacked weight
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
    >>> sste_jax.metrics.check_sharding({"fc": sste_jax.SparseWeight(kernel)}) is None  # 8-row shards: groups intact
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
        axis = param_axis(w.layout, w.axis)
        if axis is None:
            raise ValueError(f"weight {name!r}: its groups run along an axis its product reshapes; a sharding of "
                             "the parameter cannot be checked against them")
        if local[axis] % w.config.m:
            raise ValueError(
                f"weight {name!r}: sharding {spec} cuts the kernel of shape {shape} into shards of shape "
                f"{local}, splitting {w.config.n}:{w.config.m} groups along axis {axis} (shard length "
                f"{local[axis]} is not a multiple of {w.config.m}); shard that axis fewer ways or shard another axis"
            )
