"""Gradient accumulation that prunes each sparse weight once per optimizer step (`accumulate_gradients`).

The forward weights are pruned before the scan over micro-batches; each `SparseLinear` of a micro-batch's
model holds its own in its ``pruned`` attribute (a `sste_jax.PrunedWeight`) while that micro-batch's loss
runs, and its call uses it instead of pruning (``docs/kernels.md``).

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from sste_jax.nnx import SparseLinear
>>> layer = SparseLinear(8, 4, rngs=nnx.Rngs(0))
>>> loss, grads = accumulate_gradients(lambda m, x: jnp.mean(m(x) ** 2), layer, jnp.ones((2, 4, 8)))
>>> grads["kernel"][...].shape, layer.pruned is None
((8, 4), True)
"""

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sste_jax._linear import PrunedWeight, prune_weight
from sste_jax.nnx._layers import Path, SparseLinear

__all__ = ["accumulate_gradients"]


def _prune_layers(model: nnx.Module) -> dict[Path, PrunedWeight]:
    """``path -> PrunedWeight`` of every sparse `SparseLinear` with a 2-D kernel (stacked layers prune in the call)."""
    out = {}
    for path, layer in nnx.iter_graph(model):
        if isinstance(layer, SparseLinear) and layer.config.sparse and layer.kernel[...].ndim == 2:
            kernel = layer.kernel[...]
            kernel = kernel.astype(layer.dtype) if layer.dtype is not None else kernel  # as promote_dtype makes it
            out[path] = prune_weight(kernel, layer.beta[...], layer.config, layer.forward_mask())
    return out


@contextlib.contextmanager
def _pruned(model: nnx.Module, pruned: dict[Path, PrunedWeight]):
    """Within the block, the layers of ``model`` at the paths of ``pruned`` hold those in their ``pruned``
    attribute (and use them); after it, None again."""
    layers = [(layer, pruned[path]) for path, layer in nnx.iter_graph(model) if path in pruned]
    for layer, weight in layers:
        layer.pruned = nnx.data(weight)
    try:
        yield
    finally:
        for layer, _ in layers:
            layer.pruned = nnx.data(None)


def accumulate_gradients(loss_fn: Callable[..., jax.Array], model: nnx.Module, *micro_batches: Any):
    """``(loss, grads)`` of ``loss_fn(model, *micro_batch)`` averaged over the micro-batches (the leading axis
    of every array in ``micro_batches``, scanned with ``jax.lax.scan``), with each `SparseLinear`'s forward
    weight ``W̃`` (and its GEMM operands) computed once, before the scan, not once per micro-batch: each
    layer's ``pruned`` attribute holds its `sste_jax.PrunedWeight` while the micro-batch's loss runs.

    ``grads`` is the ``nnx.State`` of the ``nnx.Param`` variables, as ``nnx.grad`` gives it; each micro-batch's
    gradient is exactly the one ``nnx.grad`` computes for it (same straight-through rule, MVUE drawing afresh
    for each micro-batch's input), summed in order and divided by their number. The model's other variables
    (batch statistics, caches) are updated as after the last micro-batch. Layers inside ``nnx.scan`` or
    ``nnx.vmap`` (stacked kernels), and those whose kernel wider inputs promote to another dtype, still prune in
    their call. See ``docs/kernels.md``.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from sste_jax.nnx import SparseLinear, accumulate_gradients
    >>> layer = SparseLinear(8, 4, rngs=nnx.Rngs(0))
    >>> loss_fn = lambda model, x: jnp.mean(model(x) ** 2)
    >>> loss, grads = accumulate_gradients(loss_fn, layer, jnp.ones((3, 16, 8)))  # 3 micro-batches of 16
    >>> grads["kernel"][...].shape
    (8, 4)
    """
    if not micro_batches:
        raise ValueError("accumulate_gradients needs at least one micro-batch array (leading axis: micro-batches)")
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(micro_batches)}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ValueError(f"every micro-batch array needs the same leading axis (>= 1) of micro-batches, got {sizes}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pruned = _prune_layers(model)  # once per optimizer step: a constant of the scan below

    def loss(params, rest, batch):
        micro_model = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))  # fresh variables in this trace
        with _pruned(micro_model, pruned):
            value = loss_fn(micro_model, *batch)
        return value, nnx.split(micro_model, nnx.Param, ...)[2]

    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def micro(carry, batch):
        rest, total, loss_sum = carry
        (value, rest), g = grad_fn(params, rest, batch)
        return (rest, jax.tree.map(jnp.add, total, g), loss_sum + value), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    rest, total, loss_sum = jax.lax.scan(micro, (rest, zeros, jnp.zeros((), jnp.float32)), micro_batches)[0]
    nnx.update(model, rest)
    n = sizes.pop()
    return loss_sum / n, jax.tree.map(lambda g: g / n, total)
