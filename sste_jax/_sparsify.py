"""`sparsify` and `sparsify_fn`: the products of any model made N:M sparse with S-STE, in one call.

Rules ``{regex: SparsityConfig}`` pick weights: a regex fully matches a weight's path
(``"h/0/mlp/c_fc/kernel"``) or the path of the module holding it (``"h/0/mlp/c_fc"``); the first match
wins; `sste_jax.feed_forward` gives the paper's default. Each chosen weight's products are found in the
model's jaxpr and run as the S-STE product (`sste_jax._rewrite`), with the groups on the axis the
product contracts. β is fitted once, frozen, and kept beside the model (the NNX model's ``sparsity``
attribute, or the ``"sparsity"`` collection of the variables), each carrying its `SparseSpec`. The MVUE
keys come from ``seed``: one per weight and layer, freshened by the product's input and weight
(`sste_jax._linear.fresh_key`), so no RNG state has to survive the model's scans and inference needs
none. See ``docs/any_model.md``.

>>> import jax, jax.numpy as jnp, sste_jax
>>> from flax import nnx
>>> class Block(nnx.Module):
...     def __init__(self, rngs):
...         self.mlp = nnx.Sequential(nnx.Linear(8, 32, rngs=rngs), nnx.relu, nnx.Linear(32, 8, rngs=rngs))
...     def __call__(self, x):
...         return x + self.mlp(x)
>>> model = sste_jax.sparsify(Block(nnx.Rngs(0)), sste_jax.feed_forward(), jnp.ones((4, 8)))
>>> model(jnp.ones((4, 8))).shape, sorted(model.sparsity.betas)
((4, 8), ['mlp/layers/0/kernel', 'mlp/layers/2/kernel'])
"""

import contextvars
import dataclasses
import functools
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from sste_jax import _beta, _rewrite
from sste_jax._config import SparsityConfig
from sste_jax._layout import SparseSpec, SparsityBeta, apply_layout, layer_shape
from sste_jax._optim import key_name
from sste_jax._select import check_rules, match_weight
from sste_jax._sparsity import initial_beta

__all__ = ["sparsify", "sparsify_fn", "SparseFn", "SparseModule", "SparsityBeta", "SparsityState"]

_ACTIVE = contextvars.ContextVar("sste_sparsify_active", default=False)  # inside a rewritten call


# --- shared by the three front ends -----------------------------------------------------------------


def _is_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def _aval(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, weak_type=getattr(jax.typeof(x), "weak_type", False))


_TRACES: dict = {}  # (caller's key, input structure) -> (jaxpr, output tree); bounded below


def _trace(fn: Callable, weights: list, rest: Any, cache_key: Any = None):
    """``(jaxpr, output tree, array inputs)`` of ``fn(weights, rest)``: the weights are the jaxpr's first
    inputs (in order), then the array leaves of ``rest``; other leaves are constants."""
    leaves, treedef = jax.tree_util.tree_flatten(rest)
    arrays = [i for i, x in enumerate(leaves) if _is_array(x)]
    inputs = list(weights) + [leaves[i] for i in arrays]
    statics = tuple((i, x) for i, x in enumerate(leaves) if i not in set(arrays))
    avals = [_aval(x) for x in inputs]
    key = None
    if cache_key is not None:
        key = (cache_key, len(weights), treedef, tuple((a.shape, a.dtype, a.weak_type) for a in avals), statics)
        try:
            hit = _TRACES.get(key)
        except TypeError:  # an unhashable constant: trace every time
            key, hit = None, None
        if hit is not None:
            return hit[0], hit[1], inputs

    def flat_fn(*values):
        full = list(leaves)
        for i, v in zip(arrays, values[len(weights):]):
            full[i] = v
        return fn(list(values[:len(weights)]), jax.tree_util.tree_unflatten(treedef, full))

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)
    out_tree = jax.tree.structure(out_shape)
    if key is not None and not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
        if len(_TRACES) >= 64:
            _TRACES.pop(next(iter(_TRACES)))
        _TRACES[key] = (closed, out_tree)
    return closed, out_tree, inputs


def _candidates(checked, named: Mapping[str, Any]) -> dict[str, SparsityConfig]:
    """The floating weights (of rank >= 1) of ``named`` that a rule matches, with its config."""
    out = {}
    for path, value in named.items():
        if np.ndim(value) >= 1 and jnp.issubdtype(value.dtype, jnp.floating):
            rule = match_weight(checked, path)
            if rule is not None:
                out[path] = rule[1]
    return out


def _check_used(checked, found: Mapping[str, SparseSpec], where: str) -> None:
    used = {match_weight(checked, path)[0] for path in found}
    unused = [p for p, _, _ in checked if p not in used]
    if unused:
        raise ValueError(
            f"{where}: rules {unused} match no weight that feeds a product (a dot_general, einsum, @, jnp.dot or "
            "jnp.matmul); a rule fully matches a weight's path ('h/0/mlp/c_fc/kernel') or its module's ('h/0/mlp/c_fc')"
        )


def _check_configs(configs: Mapping[str, SparsityConfig], where: str) -> None:
    for path, config in configs.items():
        if config.method == "tsrste":
            raise ValueError(f"{where}: {path}: method='tsrste' keeps a mask refreshed between steps; build the layer "
                             "as sste_jax.nnx.SparseLinear for it")


def _discover(fn, named: Mapping[str, Any], rest: Any, checked, where: str) -> dict[str, SparseSpec]:
    """``{path: SparseSpec}`` of the weights in ``named`` that rules pick and that feed products of ``fn``."""
    configs = _candidates(checked, named)
    _check_configs(configs, where)
    paths = sorted(configs)  # the order the front ends take the weights out in
    closed, _, inputs = _trace(fn, [named[p] for p in paths], rest)
    found = _rewrite.discover(closed, [_aval(x) for x in inputs], {i: (p, configs[p]) for i, p in enumerate(paths)})
    _check_used(checked, found, where)
    return found


def _fit(value, spec: SparseSpec, path: str) -> jax.Array:
    """β of each layer of weight ``path`` (fitted to its current value), shaped like its layers."""
    if spec.config.method != "sste":
        return jnp.ones(layer_shape(spec.layout), jnp.float32)
    operand = apply_layout(jnp.asarray(value), spec.layout)
    shape = layer_shape(spec.layout)
    layers = operand.reshape((-1,) + operand.shape[len(shape):])
    names = [path] if not shape else [f"{path}[{i}]" for i in np.ndindex(shape)]
    betas = [initial_beta(w, spec.axis, name, n=spec.config.n, m=spec.config.m) for w, name in zip(layers, names)]
    return jnp.stack(betas).reshape(shape)


def _keys(path: str, spec: SparseSpec, seed: int):
    base = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()))
    return _rewrite.layer_keys(base, spec.layout)


def _evaluate(fn, named: Mapping[str, Any], rest: Any, betas: Mapping[str, tuple[Any, SparseSpec]], seed: int,
              cache_key: Any, where: str):
    """``fn(weights, rest)`` with the products of the weights in ``betas`` ({path: (β, spec)}) sparse."""
    missing = sorted(set(betas) - set(named))
    if missing:
        raise ValueError(f"{where}: no weight at {missing}, which the β were fitted for; pass the variables "
                         "this model was made sparse with")
    paths = sorted(betas)
    closed, out_tree, inputs = _trace(fn, [named[p] for p in paths], rest, cache_key)
    weights = {i: (p, betas[p][1], betas[p][0], _keys(p, betas[p][1], seed)) for i, p in enumerate(paths)}
    return jax.tree.unflatten(out_tree, _rewrite.evaluate(closed, inputs, weights))


def _path(key_path) -> str:
    return "/".join(str(key_name(k)) for k in key_path)


# --- NNX --------------------------------------------------------------------------------------------


class SparsityState(nnx.Module):
    """What `sparsify` adds to an NNX model, as its ``sparsity`` attribute: ``betas``, one
    `sste_jax.nnx.SparsityBeta` per weight (by path), and the MVUE ``seed``.

    >>> import jax.numpy as jnp, sste_jax
    >>> from flax import nnx
    >>> linear = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    >>> model = sste_jax.sparsify(linear, {".*": sste_jax.SparsityConfig()}, jnp.ones((2, 8)))
    >>> type(model.sparsity).__name__, list(model.sparsity.betas), model.sparsity.seed
    ('SparsityState', ['kernel'], 0)
    """

    def __init__(self, betas: Mapping[str, nnx.Variable], seed: int):
        self.betas = nnx.Dict(dict(betas))
        self.seed = seed


def _nnx_state(module: nnx.Module):
    graphdef, state = nnx.split(module)
    flat = list(nnx.to_flat_state(state))
    return graphdef, flat, {"/".join(map(str, p)): v for p, v in flat}


def _nnx_fn(graphdef, flat, weight_paths, method):
    """``fn(weights, (other values, args, kwargs)) -> (output, state after)`` over a split module."""
    index = {"/".join(map(str, p)): i for i, (p, _) in enumerate(flat)}
    where = [index[p] for p in weight_paths]
    others = [i for i in range(len(flat)) if i not in set(where)]

    def fn(weights, rest):
        values, args, kwargs = rest
        full = [None] * len(flat)
        for i, w in zip(where, weights):
            full[i] = w
        for i, v in zip(others, values):
            full[i] = v
        model = nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(x)) for (p, v), x in zip(flat, full)]))
        token = _ACTIVE.set(True)
        try:
            out = method(model, *args, **kwargs)
        finally:
            _ACTIVE.reset(token)
        return out, nnx.state(model)

    return fn, [flat[i][1].get_value() for i in others]


def _run_nnx(module: nnx.Module, method, args, kwargs):
    """``method(module, *args, **kwargs)`` with the rewrite; the variables the call changed or created (caches,
    sown intermediates, RNG counters) are updated in ``module``."""
    state: SparsityState = module.sparsity
    graphdef, flat, named = _nnx_state(module)
    betas = {p: (v.get_value(), v.get_metadata()["spec"]) for p, v in state.betas.items()}
    fn, others = _nnx_fn(graphdef, flat, sorted(betas), method)
    values = {p: v.get_value() for p, v in named.items()}
    out, after = _evaluate(fn, values, (others, args, kwargs), betas, state.seed, (graphdef, method),
                           type(module).__name__)
    changed = [(p, v) for p, v in nnx.to_flat_state(after)
               if "/".join(map(str, p)) not in values or v.get_value() is not values["/".join(map(str, p))]]
    if changed:
        nnx.update(module, nnx.from_flat_state(changed))
    return out


@functools.cache
def _sparse_class(cls: type) -> type:
    """``cls`` whose ``__call__`` runs through the rewrite (the class of a model `sparsify` returns)."""
    def __call__(self, *args, **kwargs):
        if _ACTIVE.get():
            return cls.__call__(self, *args, **kwargs)
        return _run_nnx(self, cls.__call__, args, kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__, "_sste_base": cls})


@functools.cache
def _guarded_class(cls: type) -> type:
    """``cls`` whose ``__call__`` refuses to run outside the sparsified model that holds it (it would be dense)."""
    def __call__(self, *args, **kwargs):
        if not _ACTIVE.get():
            raise RuntimeError(
                f"this {cls.__name__} holds weights made sparse by sste_jax.sparsify; call the model sparsify "
                "returned (called alone it would run dense)"
            )
        return cls.__call__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__, "_sste_base": cls})


def _sparsify_nnx(model: nnx.Module, checked, example_inputs, example_kwargs, seed: int) -> nnx.Module:
    if hasattr(type(model), "_sste_base") or isinstance(getattr(model, "sparsity", None), SparsityState):
        raise ValueError("sparsify: this model is sparse already (it has a `sparsity` attribute)")
    if hasattr(model, "sparsity"):
        raise ValueError("sparsify: the model has an attribute `sparsity`, where the β would go")
    if not example_inputs and not example_kwargs:
        raise TypeError("sparsify: an NNX model needs example inputs (one call's arguments) to find its products")
    model = nnx.clone(model)
    graphdef, flat, named = _nnx_state(model)
    params = {p: v.get_value() for p, v in named.items() if isinstance(v, nnx.Param)}
    paths = sorted(_candidates(checked, params))
    fn, others = _nnx_fn(graphdef, flat, paths, type(model).__call__)
    where = f"sparsify({type(model).__name__})"
    found = _discover(fn, {p: params[p] for p in paths}, (others, example_inputs, example_kwargs), checked, where)
    betas = {p: _beta.SparsityBeta(_fit(params[p], spec, p), spec=spec) for p, spec in sorted(found.items())}
    modules = {"/".join(map(str, p)): m for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)}
    for path in found:
        owner = modules[path.rpartition("/")[0]]
        if owner is not model and not hasattr(type(owner), "_sste_base"):
            object.__setattr__(owner, "__class__", _guarded_class(type(owner)))
    model.sparsity = SparsityState(betas, seed)
    object.__setattr__(model, "__class__", _sparse_class(type(model)))
    return model


def unsparsify(model: nnx.Module, weights: Mapping[str, Any]) -> nnx.Module:
    """Undoes `sparsify` on every model it made inside ``model`` (in place): the parameters at the paths of
    ``weights`` take those values (the forward weights ``W̃``, `sste_jax.nnx.densify_layers` gives them), the
    ``sparsity`` attributes are gone, the classes are the models' own."""
    roots = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)
             and isinstance(getattr(node, "sparsity", None), SparsityState)]
    params = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for name, value in weights.items():
        if name in params:
            params[name].set_value(value)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and hasattr(type(node), "_sste_base"):
            object.__setattr__(node, "__class__", type(node)._sste_base)
    for root in roots:
        del root.sparsity
    return model


# --- Linen ------------------------------------------------------------------------------------------


def _linen_params(variables: Mapping[str, Any]) -> dict[str, Any]:
    """``{path: array}`` of the ``"params"`` collection (Flax's boxes, e.g. partitioning, see through)."""
    params = variables.get("params", {})
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))[0]
    return {_path(p): (nn.meta.unbox(x) if isinstance(x, nn.meta.AxisMetadata) else x) for p, x in leaves}


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _split_tree(tree: Any, paths, is_leaf=None):
    """``(rebuild, {path: weight}, rest)``: the leaves of ``tree`` at ``paths`` taken out (a Flax box keeps its
    place, emptied) and ``rebuild(weights, rest)`` putting them back."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    order = [_path(k) for k, _ in leaves]
    chosen = set(paths)
    named, rest = {}, []
    for path, (_, leaf) in zip(order, leaves):
        if path in chosen:
            named[path] = nn.meta.unbox(leaf) if _is_box(leaf) else leaf
            leaf = leaf.replace_boxed(None) if _is_box(leaf) else None
        rest.append(leaf)

    def rebuild(weights, rest):
        given = dict(zip(paths, weights))
        full = [r if p not in given else r.replace_boxed(given[p]) if _is_box(r) else given[p]
                for p, r in zip(order, rest)]
        return jax.tree_util.tree_unflatten(treedef, full)

    return rebuild, named, rest


def _linen_fn(module: nn.Module, variables, paths, method, mutable):
    """``(fn, {path: weight}, rest)``: ``fn(weights, (rest, others, rngs, args, kwargs))`` is ``module.apply`` of
    the variables with those weights."""
    rebuild, named, rest = _split_tree(variables["params"], paths, _is_box)
    others = {k: v for k, v in variables.items() if k not in ("params", "sparsity")}

    def fn(weights, inputs):
        rest, others, rngs, args, kwargs = inputs
        full = {**others, "params": rebuild(weights, rest)}
        return module.apply(full, *args, rngs=rngs, method=method, mutable=mutable, **kwargs)

    return fn, named, (rest, others)


def _check_variables(variables, where: str) -> None:
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError(f"{where}: variables must be a dict with a 'params' collection, got "
                        f"{type(variables).__name__}")


def _betas(variables: Mapping[str, Any], where: str) -> dict[str, tuple[Any, SparseSpec]]:
    sparsity = variables.get("sparsity")
    if not isinstance(sparsity, Mapping) or not all(isinstance(b, SparsityBeta) for b in sparsity.values()):
        raise ValueError(f"{where}: the variables have no 'sparsity' collection of β; use the variables that "
                         "init (or fit) returned")
    return {p: (b.value, b.spec) for p, b in sparsity.items()}


@dataclasses.dataclass(frozen=True)
class SparseModule:
    """A Linen module whose chosen products are S-STE products; made by `sparsify`. ``init`` and ``apply``
    take Linen's arguments; the variables gain a ``"sparsity"`` collection of `SparsityBeta`.

    >>> import jax, jax.numpy as jnp, sste_jax, flax.linen as nn
    >>> sparse = sste_jax.sparsify(nn.Dense(4), {".*": sste_jax.SparsityConfig()})
    >>> variables = sparse.init(jax.random.key(0), jnp.ones((2, 8)))
    >>> list(variables["sparsity"]), sparse.apply(variables, jnp.ones((2, 8))).shape
    (['kernel'], (2, 4))
    """

    module: nn.Module
    rules: tuple[tuple[str, SparsityConfig], ...]
    seed: int = 0

    def init(self, rngs, *args, method=None, **kwargs) -> dict[str, Any]:
        """``module.init(rngs, ...)`` and β fitted to those weights (`fit`).

        Args:
          rngs: a PRNG key or a dict of them, as ``nn.Module.init`` takes.
          *args, **kwargs: one call's inputs, as ``nn.Module.init`` takes them.
          method: the module's method to trace (default ``__call__``).

        Returns:
          The module's variables and a ``"sparsity"`` collection ``{weight path: SparsityBeta}``.
        """
        variables = self.module.init(rngs, *args, method=method, **kwargs)
        rngs = rngs if isinstance(rngs, Mapping) else {"params": rngs}
        return self.fit(variables, *args, rngs=rngs, method=method, **kwargs)

    def fit(self, variables: Mapping[str, Any], *args, rngs=None, method=None, **kwargs) -> dict[str, Any]:
        """``variables`` (e.g. loaded from a dense checkpoint) with a ``"sparsity"`` collection: β fitted
        to their weights, from one abstract call with these arguments.

        Args:
          variables: the module's variables, with a ``"params"`` collection.
          *args, **kwargs: one call's inputs.
          rngs: the RNG streams the call needs (dropout, ...), as ``nn.Module.apply`` takes them.
          method: the module's method to trace (default ``__call__``).

        Returns:
          ``variables`` with ``"sparsity"`` (replaced if there was one).
        """
        where = f"sparsify({type(self.module).__name__})"
        _check_variables(variables, where)
        checked = check_rules(dict(self.rules), "sparsify")
        named = _linen_params(variables)
        paths = sorted(_candidates(checked, named))
        fn, chosen, (rest, others) = _linen_fn(self.module, variables, paths, method, True)
        found = _discover(fn, chosen, (rest, others, rngs, args, kwargs), checked, where)
        betas = {p: SparsityBeta(_fit(named[p], spec, p), spec) for p, spec in sorted(found.items())}
        return {**{k: v for k, v in variables.items() if k != "sparsity"}, "sparsity": betas}

    def apply(self, variables: Mapping[str, Any], *args, rngs=None, method=None, mutable=False, **kwargs):
        """``module.apply(variables, ...)`` with the chosen products sparse.

        Args:
          variables: what `init` or `fit` returned (their ``"sparsity"`` names the sparse weights).
          *args, **kwargs: the call's inputs.
          rngs, method, mutable: as ``nn.Module.apply`` takes them; no stream is needed for MVUE.

        Returns:
          What ``module.apply`` returns (with ``mutable``, the output and the updated collections).
        """
        where = f"{type(self.module).__name__}.apply"
        _check_variables(variables, where)
        betas = _betas(variables, where)
        fn, named, (rest, others) = _linen_fn(self.module, variables, sorted(betas), method, mutable)
        cache = (self.module, method, _hashable(mutable))
        return _evaluate(fn, named, (rest, others, rngs, args, kwargs), betas, self.seed, cache, where)


def _hashable(x):
    return tuple(x) if isinstance(x, list) else x


# --- the entry points -------------------------------------------------------------------------------


def sparsify(model, rules: Mapping[str, SparsityConfig], *example_inputs, seed: int = 0, **example_kwargs):
    """The model with every product of the weights ``rules`` pick made N:M sparse with S-STE.

    Args:
      model: an ``nnx.Module`` (returned as a sparsified copy: calling it runs the sparse products; β in its
        ``sparsity`` attribute) or a Linen ``nn.Module`` (returned as a `SparseModule`, whose ``init`` and
        ``apply`` take Linen's arguments; β in the ``"sparsity"`` collection).
      rules: ``{regex: SparsityConfig}``; a regex fully matches a weight's path (``"h/0/mlp/c_fc/kernel"``) or
        its module's (``"h/0/mlp/c_fc"``), the first match wins; `sste_jax.feed_forward` gives the paper's
        default. A rule that matches no weight feeding a product raises, naming it.
      example_inputs, example_kwargs: NNX only: one call's arguments, traced abstractly to find the products.
      seed: seeds the MVUE keys (one per weight and layer; ``docs/algorithm.md#mvue-keys``).

    Raises:
      ValueError: a chosen weight whose product cannot be made sparse (contraction length not divisible by
        ``m``, values changed on the way to the product, both operands weights), whose β cannot be fitted,
        or an unused rule; each names the weight.

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> from flax import nnx
    >>> class MLP(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.up, self.down = nnx.Linear(8, 32, rngs=rngs), nnx.Linear(32, 8, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.down(jax.nn.gelu(self.up(x)))
    >>> x = jnp.ones((4, 8))
    >>> model = sste_jax.sparsify(MLP(nnx.Rngs(0)), {"up|down": sste_jax.SparsityConfig()}, x)
    >>> model(x).shape
    (4, 8)
    """
    checked = check_rules(rules, "sparsify")
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool):
        raise TypeError(f"sparsify: seed must be an int, got {seed!r}")
    if isinstance(model, nn.Module):
        if example_inputs or example_kwargs:
            raise TypeError("sparsify: a Linen module takes no example inputs (β is fitted by its init or fit)")
        for _, _, config in checked:
            _check_configs({"rules": config}, "sparsify")
        return SparseModule(model, tuple(rules.items()), int(seed))
    if not isinstance(model, nnx.Module):
        raise TypeError(f"sparsify: model must be an nnx.Module or a Linen nn.Module, got {type(model).__name__} "
                        "(for other JAX code use sste_jax.sparsify_fn)")
    return _sparsify_nnx(model, checked, example_inputs, example_kwargs, int(seed))


@dataclasses.dataclass(frozen=True)
class SparseFn:
    """``fn`` with the chosen products S-STE products; made by `sparsify_fn`.

    ``init(params, *args)`` fits β once and returns ``{"params": params, "sparsity": {path: SparsityBeta}}``;
    ``self(variables, *args)`` runs ``fn(variables["params"], *args)`` with the sparse products.

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> sparse = sste_jax.sparsify_fn(lambda p, x: x @ p["w"], {"w": sste_jax.SparsityConfig()})
    >>> variables = sparse.init({"w": jax.random.normal(jax.random.key(0), (8, 4))}, jnp.ones((2, 8)))
    >>> type(sparse).__name__, sparse(variables, jnp.ones((2, 8))).shape
    ('SparseFn', (2, 4))
    """

    fn: Callable[..., Any]
    rules: tuple[tuple[str, SparsityConfig], ...]  # the rules' items, in order (hashable: jit-able)
    seed: int = 0

    def _split(self, params, paths):
        rebuild, named, rest = _split_tree(params, paths)

        def fn(weights, rest_and_args):
            rest, args = rest_and_args
            return self.fn(rebuild(weights, rest), *args)

        return fn, named, rest

    def init(self, params: Any, *args) -> dict[str, Any]:
        """``{"params": params, "sparsity": {path: SparsityBeta}}``, β fitted to the current ``params``."""
        checked = check_rules(dict(self.rules), "sparsify_fn")
        named = {_path(k): x for k, x in jax.tree_util.tree_flatten_with_path(params)[0] if _is_array(x)}
        paths = sorted(_candidates(checked, named))
        fn, chosen, rest = self._split(params, paths)
        found = _discover(fn, chosen, (rest, args), checked, "sparsify_fn")
        betas = {p: SparsityBeta(_fit(named[p], spec, p), spec) for p, spec in sorted(found.items())}
        return {"params": params, "sparsity": betas}

    def __call__(self, variables: Mapping[str, Any], *args):
        if not isinstance(variables, Mapping) or set(variables) != {"params", "sparsity"}:
            raise TypeError("SparseFn: pass the variables returned by .init(params, ...): {'params', 'sparsity'}")
        betas = _betas(variables, "SparseFn")
        fn, named, rest = self._split(variables["params"], sorted(betas))
        return _evaluate(fn, named, (rest, args), betas, self.seed, (self.fn, self.rules), "SparseFn")


def sparsify_fn(fn: Callable[..., Any], rules: Mapping[str, SparsityConfig], *, seed: int = 0) -> SparseFn:
    """``fn(params, *args)`` with every product of a weight that ``rules`` pick made N:M sparse with S-STE (a
    `SparseFn`: ``init`` fits β, calling it runs ``fn``). For JAX code that is not Flax: Equinox, pure JAX,
    ``model.apply`` of any library.

    Paths join the keys of ``params`` with ``/`` (``"mlp/layers/0/weight"``); rules are as in `sparsify`.

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
    checked = check_rules(rules, "sparsify_fn")
    for _, _, config in checked:
        _check_configs({"rules": config}, "sparsify_fn")
    if not callable(fn):
        raise TypeError(f"sparsify_fn: fn must be callable, got {type(fn).__name__}")
    return SparseFn(fn, tuple(rules.items()), int(seed))
