"""The rewrite behind `sste_jax.sparsify` and `sste_jax.sparsify_fn`: a function's jaxpr evaluated with
the products of chosen weights made N:M sparse (``docs/any_model.md``).

The function is traced once to a jaxpr whose inputs are its weights (and everything else it reads).
Walking it, each weight is followed through the ops that only move or cast it (transpose, reshape,
cast, sharding, the slice of one stacked layer, a scan over stacked layers, calls, remat, cond,
while) to every ``dot_general`` it feeds — ``@``, ``jnp.dot``, ``jnp.matmul`` and ``jnp.einsum`` all
become one. *Discovery* records, per weight, that route (its `sste_jax._layout` layout) and the
operand axis the groups run along; *evaluation* runs every such product as the S-STE product
(`sste_jax._product.contract`: forward ``β·S(W)``, straight-through gradient, MVUE, FP8) and every
other op as is. The rewrite happens when the function is called, under whatever transformation
(``grad``, ``vmap``, ``jit``) the caller applies, so the gradient is always the S-STE one.

A weight that reaches a product after an op that changes its values (a mask, a LoRA delta, a slice of
part of it) or through a primitive the walk cannot enter raises, naming it: it is never run dense.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from sste_jax._config import SparsityConfig
from sste_jax._layout import SparseSpec, append, layer_shape, operand_axis
from sste_jax._linear import fresh_key
from sste_jax._product import contract, remat_policy

__all__ = ["discover", "evaluate", "layer_keys"]

_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}
_KEEP = frozenset({"copy", "copy_p", "sharding_constraint", "reduce_precision", "mesh_cast", "reshard"})
_SELECT = frozenset({"slice", "dynamic_slice", "gather", "concatenate", "pad", "rev", "dynamic_update_slice",
                     "select_n", "broadcast_in_dim", "scatter", "scatter-add"})


@dataclasses.dataclass(frozen=True)
class Tracked:
    """A value on its way from weight ``path`` to a product: the ``layout`` so far; ``altered`` names the
    op that changed its values (the value can no longer be made sparse as the weight)."""

    path: str
    layout: tuple = ()
    altered: str | None = None


@dataclasses.dataclass
class _Context:
    configs: Mapping[str, SparsityConfig]  # the weights to follow and their configs
    ndims: Mapping[str, int]  # their parameters' ranks (for config.group_axis)
    found: dict[str, SparseSpec] | None  # discovery: filled here; evaluation: None
    records: Mapping[str, SparseSpec]  # evaluation: what discovery found


def _read(env, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _bind(eqn, invals):
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return out if eqn.primitive.multiple_results else [out]


def _closed(jaxpr) -> tuple[Any, Sequence]:
    """``(jaxpr, consts)`` of a closed or open jaxpr."""
    return (jaxpr.jaxpr, jaxpr.consts) if hasattr(jaxpr, "consts") else (jaxpr, ())


def _refuse(t: Tracked, why: str):
    raise ValueError(f"{t.path}: {why}; it cannot be made sparse there (leave it out of the rules)")


# --- ops that only move a weight ---------------------------------------------------------------------


def _layout_step(eqn) -> tuple | None:
    """The layout step of a single-operand op that moves or casts its operand without changing values."""
    name, params = eqn.primitive.name, eqn.params
    old = tuple(eqn.invars[0].aval.shape)
    new = tuple(eqn.outvars[0].aval.shape)
    if name == "transpose":
        return ("transpose", tuple(int(p) for p in params["permutation"]))
    if name == "reshape" and params.get("dimensions") is None or name == "squeeze":
        return ("reshape", old, new)
    if name == "broadcast_in_dim" and [d for d in new if d != 1] == [d for d in old if d != 1]:
        dims = tuple(params["broadcast_dimensions"])
        if list(dims) == sorted(dims) and all(new[d] == s for d, s in zip(dims, old)):
            return ("reshape", old, new)  # expand_dims
    if name == "convert_element_type":
        return ("convert", np.dtype(params["new_dtype"]).name)
    if name in _KEEP:
        return ("convert", np.dtype(eqn.outvars[0].aval.dtype).name)
    return None


def _layer_index(eqn, invals) -> list[tuple[int, Any]] | None:
    """``[(axis, index), ...]`` when a ``slice``/``dynamic_slice`` picks one entry of some axes (stacked layers)
    and keeps the others whole."""
    name, params, shape = eqn.primitive.name, eqn.params, eqn.invars[0].aval.shape
    if name == "slice" and (params["strides"] is None or all(s == 1 for s in params["strides"])):
        sizes = [b - a for a, b in zip(params["start_indices"], params["limit_indices"])]
        starts = params["start_indices"]
    elif name == "dynamic_slice":
        sizes, starts = params["slice_sizes"], invals[1:]
    else:
        return None
    if any(s not in (1, n) for n, s in zip(shape, sizes)):
        return None
    return [(a, starts[a]) for a, (n, s) in enumerate(zip(shape, sizes)) if s == 1 and n > 1]


def _index(a, index):
    return None if a is None else jax.lax.dynamic_index_in_dim(a, index, 0, keepdims=False)


# --- the product -------------------------------------------------------------------------------------


def _peel_batch(layout, shape, batch, contract_axes):
    """The layout with the weight's batch axes peeled as layers (in order), and the contraction axes
    renumbered among the remaining ones."""
    remaining = list(range(len(shape)))
    for b in batch:
        pos = remaining.index(int(b))
        layout = append(layout, ("layer", pos, shape[b]))
        remaining.pop(pos)
    return layout, [remaining.index(int(c)) for c in contract_axes], [shape[a] for a in remaining]


def _group(t: Tracked, layout, contract_axes, op_shape, ctx) -> int:
    config, ndim = ctx.configs[t.path], ctx.ndims[t.path]
    if config.group_axis is None:
        axis = max(contract_axes)
    else:
        if not -ndim <= config.group_axis < ndim:
            raise ValueError(f"{t.path}: SparsityConfig(group_axis={config.group_axis}) is out of range for "
                             f"a parameter of {ndim} dimensions")
        axis = operand_axis(layout, config.group_axis % ndim)
        if axis not in contract_axes:
            raise ValueError(f"{t.path}: SparsityConfig(group_axis={config.group_axis}) is not a contraction "
                             f"axis of its product (operand shape {tuple(op_shape)}, contracted {contract_axes})")
    if config.sparse and op_shape[axis] % config.m:
        raise ValueError(f"{t.path}: the contraction length {op_shape[axis]} (operand shape {tuple(op_shape)}) is "
                         f"not divisible by {config.m}; it cannot be {config.n}:{config.m} sparse")
    return axis


def _product(eqn, invals, index, t: Tracked, extra, ctx):
    (cl, cr), (bl, br) = eqn.params["dimension_numbers"]
    w_contract, w_batch = (cl, bl) if index == 0 else (cr, br)
    if not len(w_contract):  # an elementwise scale written as a product (a norm's): not a weight product
        return _bind(eqn, invals)
    x_contract, x_batch = (cr, br) if index == 0 else (cl, bl)
    w_shape = tuple(eqn.invars[index].aval.shape)
    layout, contract_axes, op_shape = _peel_batch(t.layout, w_shape, w_batch, w_contract)
    axis = _group(t, layout, contract_axes, op_shape, ctx)
    found = SparseSpec(ctx.configs[t.path], axis, layout)
    if ctx.found is not None:
        if ctx.found.setdefault(t.path, found) != found:
            raise ValueError(f"{t.path}: feeds products in two layouts ({ctx.found[t.path].layout} and {layout}); "
                             "one β cannot serve both")
        return _bind(eqn, invals)
    if ctx.records[t.path] != found:
        raise ValueError(f"{t.path}: reaches a product in layout {layout} (groups on operand axis {axis}), not in "
                         f"the one its β was fitted for ({ctx.records[t.path].layout}, axis "
                         f"{ctx.records[t.path].axis}); sparsify the model again for this call")
    w, x = invals[index], invals[1 - index]
    w = jnp.moveaxis(w, [int(b) for b in w_batch], list(range(len(w_batch))))
    x = jnp.moveaxis(x, [int(b) for b in x_batch], list(range(len(x_batch))))
    x_rest = [a for a in range(np.ndim(invals[1 - index])) if a not in x_batch]
    x_axes = [x_rest.index(int(c)) for c in x_contract]
    config = dataclasses.replace(found.config, group_axis=None)

    def one(x, w, beta, key):
        key = None if key is None else fresh_key(key, x, w)
        return contract(x, w, x_axes, contract_axes, axis, beta, key, config)

    fn = one
    for _ in w_batch:
        fn = jax.vmap(fn)
    beta, key = extra
    y = fn(x, w, beta, key if config.mvue else None)
    if index == 0:  # dot_general's layout: batch axes, lhs free axes, rhs free axes
        nb, nx = len(w_batch), len(x_rest) - len(x_axes)
        y = jnp.moveaxis(y, tuple(range(nb, nb + nx)), tuple(range(y.ndim - nx, y.ndim)))
    return [y.astype(eqn.outvars[0].aval.dtype)]


# --- control flow ------------------------------------------------------------------------------------
# A sub-jaxpr (scan body, branch, remat) runs through `_run` too; the β and key arrays of the weights
# entering it go in beside them, flattened: sliced with a scan's stacked weights, passed to a remat.


def _flat(tracked, extras) -> list:
    return [a for t, e in zip(tracked, extras) if t is not None for a in e]


def _unflat(tracked, flat) -> list:
    it = iter(flat)
    return [(next(it), next(it)) if t is not None else None for t in tracked]


def _sub(jaxpr, consts, ctx, tracked, extras, captured):
    """``(*args) -> outs``: ``jaxpr`` with the rewrite; ``captured`` receives its outputs' tracking."""
    def fn(*args):
        outs, out_tracked, _ = _run(jaxpr, consts, list(args), tracked, extras, ctx)
        captured[:] = out_tracked
        return outs
    return fn


def _leaving(captured, what):
    """A weight leaving a control-flow op is no longer followed: a product of it raises."""
    return [None if t is None else dataclasses.replace(t, altered=what) for t in captured]


def _scan(eqn, invals, tracked, extras, ctx):
    p = eqn.params
    n = p["num_consts"] + p["num_carry"]
    carried = next((t for t in tracked[p["num_consts"]:n] if t is not None), None)
    if carried is not None:
        _refuse(carried, "is carried through a scan")
    inner = list(tracked[:n]) + [None if t is None else
                                 dataclasses.replace(t, layout=append(t.layout, ("layer", 0, p["length"])))
                                 for t in tracked[n:]]
    jaxpr, consts = _closed(p["jaxpr"])
    captured: list = []

    def body(carry, stacked):
        xs, xs_extras = stacked
        fn = _sub(jaxpr, consts, ctx, inner, list(extras[:n]) + _unflat(tracked[n:], xs_extras), captured)
        outs = fn(*invals[:p["num_consts"]], *carry, *xs)
        return outs[:p["num_carry"]], outs[p["num_carry"]:]

    carry, ys = jax.lax.scan(body, list(invals[p["num_consts"]:n]), (list(invals[n:]), _flat(tracked[n:], extras[n:])),
                             length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    return [*carry, *ys], _leaving(captured, "scan")


def _cond(eqn, invals, tracked, extras, ctx):
    captured: list = []
    branches = [_sub(*_closed(b), ctx, tracked[1:], extras[1:], captured) for b in eqn.params["branches"]]
    return jax.lax.switch(invals[0], branches, *invals[1:]), _leaving(captured, "cond")


def _while(eqn, invals, tracked, extras, ctx):
    p = eqn.params
    nc, n = p["cond_nconsts"], p["cond_nconsts"] + p["body_nconsts"]
    carried = next((t for t in tracked[n:] if t is not None), None)
    if carried is not None:
        _refuse(carried, "is carried through a while loop")
    free = [None] * (len(invals) - n)
    captured: list = []
    cond = _sub(*_closed(p["cond_jaxpr"]), ctx, tracked[:nc] + free, extras[:nc] + free, captured)
    body = _sub(*_closed(p["body_jaxpr"]), ctx, tracked[nc:n] + free, extras[nc:n] + free, captured)
    out = jax.lax.while_loop(lambda c: cond(*invals[:nc], *c)[0], lambda c: body(*invals[nc:n], *c), list(invals[n:]))
    return out, [None] * len(out)


def _remat(eqn, invals, tracked, extras, ctx):
    jaxpr, consts = _closed(eqn.params["jaxpr"])
    captured: list = []
    n = len(invals)

    def fn(*args):
        return _sub(jaxpr, consts, ctx, tracked, _unflat(tracked, args[n:]), captured)(*args[:n])

    policy = remat_policy(eqn.params["policy"])
    outs = jax.checkpoint(fn, policy=policy, prevent_cse=eqn.params["prevent_cse"])(*invals, *_flat(tracked, extras))
    return outs, _leaving(captured, "remat")


_CONTROL = {"scan": _scan, "cond": _cond, "while": _while, "checkpoint": _remat, "remat2": _remat}


# --- the walk ----------------------------------------------------------------------------------------


def _follow(eqn, invals, ins, extras_in):
    """Outputs and their tracking for an op that is not a product or control flow."""
    name = eqn.primitive.name
    t = next(t for t in ins if t is not None)
    if t is ins[0] and (len(eqn.invars) == 1 or name == "dynamic_slice"):
        step = _layout_step(eqn)
        if step is not None:  # moves or casts: an altered value stays altered
            moved = t if t.altered else dataclasses.replace(t, layout=append(t.layout, step))
            return _bind(eqn, invals), [moved], [extras_in[0]]
        picked = _layer_index(eqn, invals) if t.altered is None else None
        if picked is not None:  # one layer of a stacked weight
            shape, layout, extra = list(eqn.invars[0].aval.shape), t.layout, extras_in[0]
            for peeled, (axis, index) in enumerate(picked):
                layout = append(layout, ("layer", axis - peeled, shape[axis]))
                extra = None if extra is None else (_index(extra[0], index), _index(extra[1], index))
            kept = tuple(d for a, d in enumerate(shape) if a not in {axis for axis, _ in picked})
            layout = append(layout, ("reshape", kept, tuple(eqn.outvars[0].aval.shape)))
            return _bind(eqn, invals), [dataclasses.replace(t, layout=layout)], [extra]
    outs = _bind(eqn, invals)
    out_tracked = []
    for v in eqn.outvars:
        keeps = [s for s, var in zip(ins, eqn.invars) if s is not None and len(var.aval.shape) >= 2
                 and (name in _SELECT or tuple(v.aval.shape) == tuple(var.aval.shape))]
        out_tracked.append(dataclasses.replace(keeps[0], altered=keeps[0].altered or name) if keeps else None)
    return outs, out_tracked, [None] * len(outs)


def _run(jaxpr, consts, args, tracked, extras, ctx):
    """Evaluates ``jaxpr`` on ``args`` with the rewrite; returns the outputs, their tracking and extras."""
    env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))
    info = {v: (t, e) for v, t, e in zip(jaxpr.invars, tracked, extras) if t is not None}
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        ins = [None if isinstance(v, jcore.Literal) or v not in info else info[v][0] for v in eqn.invars]
        ex = [None if t is None else info[v][1] for t, v in zip(ins, eqn.invars)]
        name = eqn.primitive.name
        out_tracked = out_extras = None
        if not any(ins):
            outs = _bind(eqn, invals)
        elif name == "dot_general":
            clean = [(i, t) for i, t in enumerate(ins) if t is not None and t.altered is None]
            if len(clean) > 1:
                raise ValueError(f"{clean[0][1].path} and {clean[1][1].path}: both operands of a product are "
                                 "weights to make sparse; cannot tell which one is the weight")
            if not clean:
                t = next(t for t in ins if t is not None)
                _refuse(t, f"reaches a product after `{t.altered}` changed its values (only transposes, reshapes, "
                           "casts and the slicing of stacked layers may sit between a weight and its product)")
            (i, t), = clean
            outs = _product(eqn, invals, i, t, ex[i], ctx)
        elif name in _CALLS:
            inner, inner_consts = _closed(eqn.params[_CALLS[name]])
            outs, out_tracked, out_extras = _run(inner, inner_consts, invals, ins, ex, ctx)
        elif name in _CONTROL:
            outs, out_tracked = _CONTROL[name](eqn, invals, ins, ex, ctx)
        elif list(jcore.jaxprs_in_params(eqn.params)):
            _refuse(next(t for t in ins if t is not None), f"flows into `{name}`, which the rewrite cannot enter")
        else:
            outs, out_tracked, out_extras = _follow(eqn, invals, ins, ex)
        out_tracked = out_tracked or [None] * len(outs)
        out_extras = out_extras or [None] * len(outs)
        for v, o, t, e in zip(eqn.outvars, outs, out_tracked, out_extras):
            env[v] = o
            if t is not None:
                info[v] = (t, e)
    outs = [_read(env, v) for v in jaxpr.outvars]
    out_info = [None if isinstance(v, jcore.Literal) else info.get(v, (None, None)) for v in jaxpr.outvars]
    return outs, [i[0] if i else None for i in out_info], [i[1] if i else None for i in out_info]


def discover(closed, avals: Sequence, weights: Mapping[int, tuple[str, SparsityConfig]]) -> dict[str, SparseSpec]:
    """``{path: SparseSpec}`` of the weights (input index -> (path, config)) that feed products of ``closed``."""
    configs = {path: config for path, config in weights.values()}
    ndims = {path: len(avals[i].shape) for i, (path, _) in weights.items()}
    ctx = _Context(configs, ndims, {}, {})
    tracked = [Tracked(weights[i][0]) if i in weights else None for i in range(len(avals))]
    extras = [(None, None) if t is not None else None for t in tracked]
    jax.eval_shape(lambda args: _run(closed.jaxpr, closed.consts, args, tracked, extras, ctx)[0], list(avals))
    return ctx.found


def evaluate(closed, args: Sequence, weights: Mapping[int, tuple[str, SparseSpec, Any, Any]]) -> list:
    """``closed`` on ``args`` with the products of the weights (input index -> (path, SparseSpec, β, key)) sparse;
    ``β`` and ``key`` (None without MVUE) have the weight's layer shape."""
    configs = {path: found.config for path, found, _, _ in weights.values()}
    ndims = {path: np.ndim(args[i]) for i, (path, _, _, _) in weights.items()}
    records = {path: found for path, found, _, _ in weights.values()}
    ctx = _Context(configs, ndims, None, records)
    tracked = [Tracked(weights[i][0]) if i in weights else None for i in range(len(args))]
    extras = [(weights[i][2], weights[i][3]) if i in weights else None for i in range(len(args))]
    return _run(closed.jaxpr, closed.consts, list(args), tracked, extras, ctx)[0]


def layer_keys(key, layout) -> Any:
    """One key per layer of a weight: ``key`` with the layer's flat index folded in."""
    shape = layer_shape(layout)
    count = int(np.prod(shape, dtype=int))
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(count, dtype=jnp.uint32))
    return keys.reshape(shape + keys.shape[1:])

