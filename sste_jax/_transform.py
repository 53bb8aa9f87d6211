"""`sparsify_fn`: S-STE for any JAX function ``fn(params, *args)`` by transforming its jaxpr.

Every ``dot_general`` one of whose operands is a parameter leaf whose path (``"a/b/kernel"``) fully
matches a rule (up to transposes and casts) becomes `sste_jax.sparse_dot_general`, with the 2:4 groups
on the weight's contraction axis as the op states it. The transform sees the products after ``vmap``
(a per-token ``vmap`` arrives as one batched product, so MVUE and FP8 see all tokens), inside ``jit``,
``jax.checkpoint`` and ``jax.lax.scan`` (stacked weights: one β per layer).

>>> import jax, jax.numpy as jnp, sste_jax
>>> def fn(params, x):
...     return jax.nn.relu(x @ params["mlp"]["w1"]) @ params["mlp"]["w2"]
>>> w1, w2 = jax.random.normal(jax.random.key(0), (8, 32)), jax.random.normal(jax.random.key(1), (32, 8))
>>> params = {"mlp": {"w1": w1, "w2": w2}}
>>> sparse = sste_jax.sparsify_fn(fn, sste_jax.feed_forward())
>>> variables = sparse.init(params, jnp.ones((4, 8)))
>>> sorted(variables["sparsity"]), sparse(variables, jnp.ones((4, 8))).shape
(['mlp/w1', 'mlp/w2'], (4, 8))
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from sste_jax._linear import SparsityConfig, check_key
from sste_jax._optim import key_name
from sste_jax._product import LAYOUT_PRESERVING, operand_beta, remat_policy, sparse_dot_general, weight_axis
from sste_jax._select import check_rules, match_rule

__all__ = ["sparsify_fn", "SparseFn"]

_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr"}


@dataclasses.dataclass(frozen=True)
class _Weight:
    """A value derived from parameter ``path``: its axis ``i`` is axis ``perm[i]`` of one layer of the
    parameter, which has ``depth`` leading layer axes sliced off by enclosing scans."""

    path: str
    config: SparsityConfig
    perm: tuple[int, ...]
    depth: int = 0


@dataclasses.dataclass
class _Context:
    found: dict | None  # discovery: {path: (axis, config, depth)}
    betas: Mapping[str, Any]
    keys: Mapping[str, Any]


def _read(env, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _bind(eqn, invals):
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return out if eqn.primitive.multiple_results else [out]


def _product(eqn, invals, weights, ctx):
    (index, w), = weights
    w_axis = weight_axis(eqn.params["dimension_numbers"], index, w.path)
    if ctx.found is not None:
        ctx.found[w.path] = (w.perm[w_axis], w.config, w.depth)
        return _bind(eqn, invals)
    if w.path not in ctx.betas:
        raise ValueError(f"SparseFn: no β for {w.path}; make the variables with .init(params, ...)")
    y = sparse_dot_general(*invals, eqn.params["dimension_numbers"], weight=index, beta=ctx.betas[w.path],
                           key=ctx.keys.get(w.path), config=w.config, name=w.path)
    return [y.astype(eqn.outvars[0].aval.dtype)]


def _scan(eqn, invals, infos, ctx):
    p = eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    if any(infos[n_consts:n_consts + n_carry]):
        raise ValueError(f"sparsify_fn: parameter {next(i for i in infos if i).path} is a scan carry; unsupported")
    body_infos = list(infos[:n_consts + n_carry])
    stacked = {}
    for info in infos[n_consts + n_carry:]:
        if info is not None and info.perm[0] != 0:
            raise ValueError(f"sparsify_fn: {info.path} is scanned over its axis {info.perm[0]}; scan over axis 0")
        if info is not None:
            info = dataclasses.replace(info, perm=tuple(a - 1 for a in info.perm[1:]), depth=info.depth + 1)
            stacked[info.path] = info
        body_infos.append(info)
    consts, carry, xs = invals[:n_consts], invals[n_consts:n_consts + n_carry], invals[n_consts + n_carry:]
    betas = {} if ctx.found is not None else {k: ctx.betas[k] for k in stacked}

    def body(carry, ext):
        xs, layer_betas, i = ext
        keys = {k: jax.random.fold_in(v, i) for k, v in ctx.keys.items()}  # a different MVUE draw per layer
        sub = _Context(ctx.found, {**ctx.betas, **layer_betas}, keys)
        outs = _run(p["jaxpr"].jaxpr, p["jaxpr"].consts, [*consts, *carry, *xs], body_infos, sub)
        return outs[:n_carry], outs[n_carry:]

    carry, ys = jax.lax.scan(body, carry, (xs, betas, jnp.arange(p["length"])), length=p["length"],
                             reverse=p["reverse"], unroll=p["unroll"])
    return [*carry, *ys]


def _run(jaxpr, consts, args, infos, ctx) -> list:
    """Evaluates ``jaxpr`` with the products fed by the tracked parameters made sparse."""
    env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))
    info = {v: i for v, i in zip(jaxpr.invars, infos) if i is not None}
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        in_infos = [None if isinstance(v, jcore.Literal) else info.get(v) for v in eqn.invars]
        name = eqn.primitive.name
        if not any(in_infos):
            outs = _bind(eqn, invals)
        elif name == "dot_general":
            weights = [(i, w) for i, w in enumerate(in_infos) if w is not None]
            if len(weights) > 1:
                raise ValueError(f"sparsify_fn: both operands of a product are parameters ({weights[0][1].path})")
            outs = _product(eqn, invals, weights, ctx)
        elif name in LAYOUT_PRESERVING or name == "transpose":
            outs = _bind(eqn, invals)
            w = in_infos[0]
            perm = tuple(w.perm[a] for a in eqn.params["permutation"]) if name == "transpose" else w.perm
            info[eqn.outvars[0]] = dataclasses.replace(w, perm=perm)
        elif name in _CALLS:
            inner = eqn.params[_CALLS[name]]
            outs = _run(inner.jaxpr, inner.consts, invals, in_infos, ctx)
        elif name in ("remat2", "checkpoint"):
            inner, policy = eqn.params["jaxpr"], eqn.params["policy"]
            outs = jax.checkpoint(lambda *a, j=inner, i=in_infos: _run(j, (), a, i, ctx), policy=remat_policy(policy),
                                  prevent_cse=eqn.params["prevent_cse"])(*invals)
        elif name == "scan":
            outs = _scan(eqn, invals, in_infos, ctx)
        elif list(jcore.jaxprs_in_params(eqn.params)):
            w = next(i for i in in_infos if i)
            raise ValueError(
                f"sparsify_fn: parameter {w.path} flows into `{name}`; only jit, checkpoint and scan are followed "
                "(leave this parameter out of the rules)"
            )
        else:  # any other use (a bias add, a norm scale): not a product, no longer followed
            outs = _bind(eqn, invals)
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [_read(env, v) for v in jaxpr.outvars]


def _is_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray)


@dataclasses.dataclass(frozen=True)
class SparseFn:
    """``fn`` with S-STE products; made by `sparsify_fn`.

    ``init(params, *args)`` fits β once and returns ``{"params": params, "sparsity": {path: β}}``;
    ``self(variables, *args, key=None)`` runs ``fn(variables["params"], *args)`` with the sparse
    products (``key`` seeds MVUE; fold in the step).

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> sparse = sste_jax.sparsify_fn(lambda p, x: x @ p["w"], {"w": sste_jax.SparsityConfig()})
    >>> variables = sparse.init({"w": jax.random.normal(jax.random.key(0), (8, 4))}, jnp.ones((2, 8)))
    >>> type(sparse).__name__, sparse(variables, jnp.ones((2, 8))).shape
    ('SparseFn', (2, 4))
    """

    fn: Callable[..., Any]
    rules: tuple[tuple[str, SparsityConfig], ...]  # the rules' items, in order (hashable: jit-able)

    def _trace(self, params, args):
        checked = check_rules(dict(self.rules), "sparsify_fn")
        leaves, treedef = jax.tree_util.tree_flatten_with_path((params, args))
        arrays = [i for i, (_, x) in enumerate(leaves) if _is_array(x)]
        n_params = len(jax.tree_util.tree_leaves(params))
        infos = []
        for i in arrays:
            path = "/".join(str(key_name(k)) for k in leaves[i][0][1:])
            rule = match_rule(checked, path) if i < n_params else None
            ok = rule is not None and jnp.issubdtype(leaves[i][1].dtype, jnp.floating)
            infos.append(_Weight(path, rule[1], tuple(range(leaves[i][1].ndim))) if ok else None)

        def flat_fn(*values):
            full = [x for _, x in leaves]
            for i, v in zip(arrays, values):
                full[i] = v
            p, a = jax.tree_util.tree_unflatten(treedef, full)
            return self.fn(p, *a)

        shapes = [jax.ShapeDtypeStruct(np.shape(leaves[i][1]), leaves[i][1].dtype) for i in arrays]
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*shapes)
        values = [leaves[i][1] for i in arrays]
        return closed, values, infos, jax.tree.structure(out_shape), checked

    def init(self, params: Any, *args) -> dict[str, Any]:
        """``{"params": params, "sparsity": {path: β}}``, β fitted to the current ``params``."""
        closed, values, infos, _, checked = self._trace(params, args)
        ctx = _Context({}, {}, {})
        jax.eval_shape(lambda v: _run(closed.jaxpr, closed.consts, v, infos, ctx), values)
        unused = [p for p, _, _ in checked if not any(match_rule(checked, q)[0] == p for q in ctx.found)]
        if unused:
            raise ValueError(f"sparsify_fn: rules {unused} match no parameter that feeds a product")
        named = {"/".join(str(key_name(k)) for k in kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
        betas = {}
        for path, (axis, config, depth) in ctx.found.items():
            value = jnp.asarray(named[path])
            layers = value.reshape((-1,) + value.shape[depth:])
            names = [path] if depth == 0 else [f"{path}[{i}]" for i in range(layers.shape[0])]
            fitted = [operand_beta(w, axis, config, name) for w, name in zip(layers, names)]
            betas[path] = jnp.stack(fitted).reshape(value.shape[:depth])
        return {"params": params, "sparsity": betas}

    def __call__(self, variables: Mapping[str, Any], *args, key=None):
        if not isinstance(variables, Mapping) or set(variables) != {"params", "sparsity"}:
            raise TypeError("SparseFn: pass the variables returned by .init(params, ...): {'params', 'sparsity'}")
        closed, values, infos, out_tree, _ = self._trace(variables["params"], args)
        betas = variables["sparsity"]
        keys = {}
        if key is not None:
            check_key(key)
            keys = {path: jax.random.fold_in(key, i) for i, path in enumerate(sorted(betas))}
        ctx = _Context(None, betas, keys)
        out = _run(closed.jaxpr, closed.consts, values, infos, ctx)
        return jax.tree.unflatten(out_tree, out)


def sparsify_fn(fn: Callable[..., Any], rules: Mapping[str, SparsityConfig]) -> SparseFn:
    """``fn(params, *args)`` with every product fed by a parameter whose path matches a rule made 2:4
    sparse with S-STE (a `SparseFn`: ``init`` fits β, calling it runs ``fn``).

    Paths join the keys of ``params`` with ``/`` (``"mlp/layers/0/weight"``); a regex must match a
    whole path, the first match wins; `sste_jax.feed_forward` gives the paper's default.

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> def mlp(params, x):
    ...     return jax.nn.gelu(x @ params["fc"]) @ params["proj"]
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> params = {"fc": jax.random.normal(k1, (8, 32)), "proj": jax.random.normal(k2, (32, 8))}
    >>> sparse = sste_jax.sparsify_fn(mlp, {"fc|proj": sste_jax.SparsityConfig()})
    >>> variables = sparse.init(params, jnp.ones((4, 8)))
    >>> sorted(variables["sparsity"]), sparse(variables, jnp.ones((4, 8))).shape
    (['fc', 'proj'], (4, 8))
    """
    check_rules(rules, "sparsify_fn")
    return SparseFn(fn, tuple(rules.items()))
