"""Layouts: how the weight operand of a sparse product is made from its parameter.

A layout is a tuple of steps applied to the parameter; the 2:4 groups, β and the masks live on the
result, ``(layer axes..., operand axes...)``. Every step is invertible, so the forward weight can be
put back in the parameter's shape (for metrics, checkpoints and export). The steps act on the
operand axes (those after the layer axes peeled so far):

* ``("transpose", perm)``: permute them;
* ``("reshape", old, new)``: reshape them from ``old`` to ``new``;
* ``("convert", dtype)``: cast (a dtype name);
* ``("layer", axis, size)``: operand axis ``axis`` (of length ``size``) becomes the next layer axis:
  a scan over stacked layers slices it, an index selects one layer, or a product batches over it.

>>> import jax.numpy as jnp
>>> w = jnp.zeros((8, 3, 16))  # (embed, layers, mlp) with the layers on axis 1
>>> layout = (("layer", 1, 3), ("transpose", (1, 0)))
>>> apply_layout(w, layout).shape, param_axis(layout, 1)
((3, 16, 8), 0)
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sste_jax._config import SparsityConfig

__all__ = ["SparseSpec", "SparsityBeta", "apply_layout", "undo_layout", "layer_shape", "param_axis", "operand_axis",
           "append"]

Layout = tuple[tuple, ...]


@dataclasses.dataclass(frozen=True)
class SparseSpec:
    """How one weight is made sparse: its ``config``, the ``layout`` from the parameter to the product's
    operand (``()``: the parameter itself) and the operand ``axis`` the groups run along. Every β
    carries one (as metadata), so that metrics, checkpoints and export know what each β scales.

    >>> import sste_jax
    >>> from sste_jax._layout import SparseSpec
    >>> SparseSpec(sste_jax.SparsityConfig(), axis=1).layout
    ()
    """

    config: SparsityConfig
    axis: int = 0
    layout: Layout = ()


@functools.partial(jax.tree_util.register_dataclass, data_fields=["value"], meta_fields=["spec"])
@dataclasses.dataclass(frozen=True)
class SparsityBeta:
    """The frozen β of one weight in a ``"sparsity"`` collection (`sparsify_fn`, Linen `sparsify`): its
    ``value`` (one per layer of a stacked weight) and its `SparseSpec` ``spec`` (static).

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> sparse = sste_jax.sparsify_fn(lambda p, x: x @ p["w"], {"w": sste_jax.SparsityConfig()})
    >>> beta = sparse.init({"w": jax.random.normal(jax.random.key(0), (8, 4))}, jnp.ones((2, 8)))["sparsity"]["w"]
    >>> beta.value.shape, beta.spec.axis
    ((), 0)
    """

    value: Any
    spec: SparseSpec


def _n_layers(layout: Layout) -> int:
    return sum(step[0] == "layer" for step in layout)


def layer_shape(layout: Layout) -> tuple[int, ...]:
    """The lengths of the layer axes (β's shape)."""
    return tuple(step[2] for step in layout if step[0] == "layer")


def apply_layout(w, layout: Layout):
    """``w`` (the parameter) as ``(layer axes..., operand axes...)``."""
    k = 0
    for step in layout:
        kind = step[0]
        if kind == "transpose":
            w = jnp.transpose(w, tuple(range(k)) + tuple(k + p for p in step[1]))
        elif kind == "reshape":
            w = w.reshape(w.shape[:k] + tuple(step[2]))
        elif kind == "convert":
            w = w.astype(step[1])
        else:
            w = jnp.moveaxis(w, k + step[1], k)
            k += 1
    return w


def undo_layout(a, layout: Layout, dtype):
    """The inverse of `apply_layout`: ``a`` of shape ``(layer axes..., operand axes...)`` in the
    parameter's shape and ``dtype``."""
    k = _n_layers(layout)
    for step in reversed(layout):
        kind = step[0]
        if kind == "transpose":
            inverse = [0] * len(step[1])
            for i, p in enumerate(step[1]):
                inverse[p] = i
            a = jnp.transpose(a, tuple(range(k)) + tuple(k + p for p in inverse))
        elif kind == "reshape":
            a = a.reshape(a.shape[:k] + tuple(step[1]))
        elif kind == "layer":
            k -= 1
            a = jnp.moveaxis(a, k, k + step[1])
    return a.astype(dtype)


def _unit_free(shape: Sequence[int]) -> list[int]:
    """Indices of the axes of ``shape`` longer than 1."""
    return [i for i, d in enumerate(shape) if d != 1]


def _through_reshape(axis: int, old: Sequence[int], new: Sequence[int]) -> int | None:
    """Where ``axis`` of ``old`` is after reshaping to ``new``, when the reshape only adds or drops unit
    axes; None otherwise (or for a unit axis)."""
    a, b = _unit_free(old), _unit_free(new)
    if [old[i] for i in a] != [new[i] for i in b] or axis not in a:
        return None
    return b[a.index(axis)]


def param_axis(layout: Layout, axis: int) -> int | None:
    """The parameter axis that operand axis ``axis`` is, or None when a reshape merges or splits it."""
    for step in reversed(layout):
        kind = step[0]
        if kind == "transpose":
            axis = step[1][axis]
        elif kind == "reshape":
            axis = _through_reshape(axis, step[2], step[1])
            if axis is None:
                return None
        elif kind == "layer":
            axis = axis if axis < step[1] else axis + 1
    return axis


def operand_axis(layout: Layout, axis: int) -> int | None:
    """The operand axis that parameter axis ``axis`` becomes, or None (a layer axis, or reshaped)."""
    for step in layout:
        kind = step[0]
        if kind == "transpose":
            axis = list(step[1]).index(axis)
        elif kind == "reshape":
            axis = _through_reshape(axis, step[1], step[2])
        elif kind == "layer":
            if axis == step[1]:
                return None
            axis = axis if axis < step[1] else axis - 1
        if axis is None:
            return None
    return axis


def append(layout: Layout, step: tuple) -> Layout:
    """``layout`` followed by ``step``, with consecutive transposes and reshapes merged and identities dropped
    (so that the same layout reached by two routes compares equal); casts are kept, each rounds."""
    kind = step[0]
    if kind == "transpose" and tuple(step[1]) == tuple(range(len(step[1]))):
        return layout
    if kind == "reshape" and tuple(step[1]) == tuple(step[2]):
        return layout
    if layout and layout[-1][0] == kind:
        last = layout[-1]
        if kind == "transpose":
            merged = tuple(last[1][p] for p in step[1])
            return append(layout[:-1], ("transpose", merged))
        if kind == "reshape":
            return append(layout[:-1], ("reshape", last[1], step[2]))
    return layout + (tuple(step),)
