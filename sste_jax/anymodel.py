"""`sparsify`: S-STE for any Flax model (NNX instance or Linen module) in one call, built on Qwix.

Qwix (Google's quantization library) intercepts ``jax.lax.dot_general`` and ``jnp.einsum`` inside
the model's modules; here every intercepted product whose module path fully matches a rule and one of
whose operands is a parameter of that module becomes the S-STE product (`sste_jax.sparse_dot_general`):
forward ``β·S(W)``, straight-through weight gradient, MVUE over tokens, FP8, with the 2:4 groups on
the weight's contraction axis as the op states it. β is fitted once from the live weights and kept in
model state next to the weight, as ``beta`` beside a ``kernel`` (else ``<param>_beta``): an NNX
`sste_jax.nnx.SparsityBeta` attribute
(fitted by `sparsify`), or a Linen variable in the ``"sparsity"`` collection (fitted at ``init``).
MVUE keys come from the ``"sparsity"`` RNG stream.

>>> import jax, jax.numpy as jnp, sste_jax
>>> from flax import nnx
>>> class Block(nnx.Module):
...     def __init__(self, rngs):
...         self.mlp = nnx.Sequential(nnx.Linear(8, 32, rngs=rngs), nnx.relu, nnx.Linear(32, 8, rngs=rngs))
...     def __call__(self, x):
...         return x + self.mlp(x)
>>> model = sste_jax.sparsify(Block(nnx.Rngs(0)), sste_jax.feed_forward(), jnp.ones((4, 8)))
>>> model(jnp.ones((4, 8))).shape, model.mlp.layers[0].beta.shape
((4, 8), ())
"""

import contextlib
import itertools
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import linen as nn
from flax import nnx
from qwix._src.utils import flax_util

from sste_jax._linear import SparsityConfig
from sste_jax._product import (
    LAYOUT_PRESERVING,
    einsum_weight_axis,
    operand_beta,
    remat_policy,
    sparse_dot_general,
    sparse_einsum,
    weight_axis,
)
from sste_jax._select import check_rules
from sste_jax.nnx import SparsityBeta, _beta_variable

__all__ = ["sparsify"]

_STREAM = "sparsity_rngs"


def _beta_name(param: str) -> str:
    """Where a weight's β is kept: ``beta`` beside a ``kernel`` (as in the layer path), else ``<param>_beta``."""
    return "beta" if param == "kernel" else f"{param}_beta"


def _params(module) -> dict[str, Any]:
    """The current module's own parameters, ``{name: array}``."""
    if isinstance(module, nn.Module):
        own = module.variables.get("params", {})
        return {n: nn.meta.unbox(v) for n, v in own.items() if not isinstance(v, Mapping)}
    return {n: v.get_value() for n, v in vars(module).items() if isinstance(v, nnx.Param)}


def _trace_to_param(x, params: dict[str, Any]) -> tuple[str, list[int]] | None:
    """``(name, perm)`` when ``x`` is parameter ``name`` up to transposes and casts, axis ``i`` of ``x``
    being axis ``perm[i]`` of the parameter; else None."""
    ids = {id(v): n for n, v in params.items()}
    perm, node = list(range(np.ndim(x))), x
    while True:
        if id(node) in ids:
            return ids[id(node)], perm
        parent = getattr(node, "parent", None) if isinstance(node, jax.core.Tracer) else None
        if parent is None or len(parent.in_tracers) != 1:
            break
        name = parent.primitive.name
        if name == "transpose":
            perm = [parent.params["permutation"][p] for p in perm]
        elif name not in LAYOUT_PRESERVING:
            break
        node = parent.in_tracers[0]
    if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
        return None
    for name, value in params.items():  # eager: a transposed or cast copy of a parameter
        if not isinstance(value, jax.Array) or isinstance(value, jax.core.Tracer):
            continue
        if value.ndim != x.ndim or sorted(value.shape) != sorted(x.shape):
            continue
        for p in itertools.permutations(range(x.ndim)):
            if tuple(value.shape[i] for i in p) == x.shape and bool(
                jnp.array_equal(jnp.transpose(value, p).astype(x.dtype), x)
            ):
                return name, list(p)
    return None


class _SparsityProvider(qwix.QuantizationProvider):
    """Turns the matched weight products into S-STE products; see `sparsify`."""

    def __init__(self, rules: Mapping[str, SparsityConfig]):
        self._checked = check_rules(rules, "sparsify")
        super().__init__([qwix.QuantizationRule(module_path=p) for p, _, _ in self._checked])
        self.products: dict[str, set[str]] = {p: set() for p, _, _ in self._checked}
        self.discovered: dict | None = None  # NNX: filled by the discovery pass of `sparsify`
        self.created = False  # Linen: a β was created in this call (init)

    def get_intercept_map(self):
        return super().get_intercept_map() | {
            "jax.lax.dot_general": self._dot_general,
            "jax.numpy.einsum": self._einsum,
            "jax.checkpoint": self._checkpoint,
            "jax.remat": self._checkpoint,  # its alias, which Linen's nn.remat calls
        }

    def _checkpoint(self, fun, *args, policy=None, **kwargs):
        """``jax.checkpoint`` that also saves the forward weights: a rematerialised layer prunes once."""
        return jax.checkpoint(fun, *args, policy=remat_policy(policy), **kwargs)

    def process_model_inputs(self, model, model_args, model_kwargs):
        return model, model_args, model_kwargs  # no per-call op counters

    def process_model_output(self, method_name, model_output):
        if self.created:  # Linen init: every rule must have found a product
            self.created = False
            self.check_used()
        return super().process_model_output(method_name, model_output)

    def check_used(self) -> None:
        unused = [p for p, found in self.products.items() if not found]
        if unused:
            raise ValueError(
                f"sparsify: rules {unused} match no weight product (a dot_general or einsum with a parameter "
                "of the matched module as an operand); the module paths are joined with '/', e.g. 'h/0/mlp/c_fc'"
            )

    def _config(self, op: str) -> tuple[str, SparsityConfig] | None:
        rule, _ = self._get_current_rule_and_op_id(op, only_rule=True)
        if rule is None:
            return None
        return next((p, c) for p, _, c in self._checked if p == rule.module_path)

    def _weight(self, operands, op: str):
        """``(module, path, matched pattern, config, operand index, param name, perm)`` or None."""
        matched = self._config(op)
        if matched is None:
            return None
        module = flax_util.get_current_module()
        path = "/".join(map(str, flax_util.get_current_module_path()))
        params = _params(module)
        found = [(i, t) for i, x in enumerate(operands) if (t := _trace_to_param(x, params)) is not None]
        if not found:
            return None
        if len(found) > 1:
            raise ValueError(f"{path}: both operands of a {op} are parameters; cannot tell which one is the weight")
        (index, (name, perm)), = found
        return module, path, matched[0], matched[1], index, name, perm

    def _product(self, op, operands, w_axis_of, compute, dense):
        hit = self._weight(operands, op)
        if hit is None:
            return dense()
        module, path, pattern, config, index, name, perm = hit
        where = f"{path}/{name}"
        w_axis = w_axis_of(index, where)
        self.products[pattern].add(where)
        if self.discovered is not None:
            self.discovered[(path, name)] = (perm[w_axis], config, np.ndim(operands[index]))
            return dense()
        beta = self._beta(module, name, operands[index], w_axis, config, where)
        key = self._key(module, config, where)
        return compute(index, beta, key, config, where)

    def _beta(self, module, name, operand, w_axis, config, where):
        if isinstance(module, nnx.Module):
            beta = getattr(module, _beta_name(name), None)
            if not isinstance(beta, SparsityBeta):
                raise ValueError(f"{where}: no β; this product was not seen when the model was sparsified")
            return beta[...]
        if not module.has_variable("sparsity", _beta_name(name)):
            if not module.is_mutable_collection("sparsity"):
                raise ValueError(f"{where}: no β in the 'sparsity' collection; init the model returned by sparsify")
            self.created = True
        fit = lambda: operand_beta(operand, w_axis, config, where)  # noqa: E731
        return module.variable("sparsity", _beta_name(name), fit).value

    def _key(self, module, config, where):
        if not config.mvue:
            return None
        if isinstance(module, nn.Module):
            return module.make_rng("sparsity")
        stream = getattr(module, _STREAM, None)
        if stream is None:
            raise ValueError(f"{where}: mvue=True needs the key stream set by sparsify(..., rngs=nnx.Rngs(...))")
        return stream()

    def _dot_general(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
        def dense():
            return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs)

        def compute(index, beta, key, config, where):
            y = sparse_dot_general(
                lhs, rhs, dimension_numbers, weight=index, beta=beta, key=key, config=config, name=where
            )
            return y.astype(preferred_element_type) if preferred_element_type is not None else y

        return self._product(
            "dot_general", (lhs, rhs), lambda i, where: weight_axis(dimension_numbers, i, where), compute, dense
        )

    def _einsum(self, equation, *operands, **kwargs):
        def dense():
            return jnp.einsum(equation, *operands, **kwargs)

        if not isinstance(equation, str) or len(operands) != 2:
            return dense()
        lhs, rhs = operands

        def w_axis_of(index, where):
            _, w_t, _, c = einsum_weight_axis(equation, (np.ndim(lhs), np.ndim(rhs)), index, where)
            return w_t.index(c)

        def compute(index, beta, key, config, where):
            y = sparse_einsum(equation, lhs, rhs, weight=index, beta=beta, key=key, config=config, name=where)
            dtype = kwargs.get("preferred_element_type")
            return y.astype(dtype) if dtype is not None else y

        return self._product("einsum", (lhs, rhs), w_axis_of, compute, dense)


@contextlib.contextmanager
def _quiet_qwix():
    with warnings.catch_warnings():  # Qwix walks NNX models with a method Flax deprecates
        warnings.filterwarnings(
            "ignore", message=r".*iter_modules\(\)' method is deprecated", category=DeprecationWarning
        )
        yield


def sparsify(model, rules: Mapping[str, SparsityConfig], *example_inputs, rngs: nnx.Rngs | None = None):
    """The model with every weight product selected by ``rules`` made 2:4 sparse with S-STE.

    Args:
      model: an ``nnx.Module`` instance (returned as a sparsified copy) or a Linen ``nn.Module``
        (returned as a module whose ``init`` also fits β into the ``"sparsity"`` collection and whose
        ``apply`` takes the MVUE keys from ``rngs={"sparsity": key}``).
      rules: ``{regex: SparsityConfig}``; a regex fully matches a module path (``"h/0/mlp/c_fc"``), the
        first match wins; `sste_jax.feed_forward` gives the paper's default. A rule that matches no
        weight product raises, naming it.
      example_inputs: NNX only: inputs of one call, run abstractly to find the products and fit β.
      rngs: NNX only: an ``nnx.Rngs`` whose ``"sparsity"`` stream seeds the MVUE keys (needed when a
        rule has ``mvue=True``).

    Raises:
      ValueError: a matched product whose weight has batch axes or several contraction axes, whose
        contraction length is not divisible by 4, or whose β cannot be fitted; unused rules.

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
    provider = _SparsityProvider(rules)
    if isinstance(model, nn.Module):
        if example_inputs or rngs is not None:
            raise TypeError("sparsify: a Linen module takes no example inputs or rngs (β is fitted at init)")
        return qwix.quantize_model(model, provider)
    if not isinstance(model, nnx.Module):
        raise TypeError(f"sparsify: model must be an nnx.Module or a Linen nn.Module, got {type(model).__name__}")
    if not example_inputs:
        raise TypeError("sparsify: an NNX model needs example inputs (one call's arguments) to find its products")
    if rngs is not None and not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"sparsify: rngs must be an nnx.Rngs, got {type(rngs).__name__}")
    if rngs is None and any(c.mvue for _, _, c in provider._checked):
        raise ValueError("sparsify: SparsityConfig(mvue=True) needs rngs=nnx.Rngs(...) for its 'sparsity' key stream")
    with _quiet_qwix():
        model = qwix.quantize_model(model, provider, *example_inputs, skip_nnx_init=True)
    provider.discovered = {}
    try:
        nnx.eval_shape(lambda m: m(*example_inputs), model)
        found = provider.discovered
    finally:
        provider.discovered = None
    provider.check_used()
    modules = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model)}
    fitted = []
    for (path, name), (axis, config, ndim) in found.items():
        module = modules[path]
        value = getattr(module, name).get_value()
        stacked = value.ndim - ndim
        where = f"{path}/{name}"
        taken = getattr(module, _beta_name(name), None)
        if taken is not None and not isinstance(taken, SparsityBeta):
            raise ValueError(f"{where}: the module already has an attribute {_beta_name(name)!r}, where β would go")
        if stacked not in (0, 1):
            raise ValueError(f"{where}: parameter of shape {value.shape} is used as a {ndim}-D operand")
        if stacked:
            beta = jnp.stack([operand_beta(w, axis, config, f"{where}[{i}]") for i, w in enumerate(value)])
        else:
            beta = operand_beta(value, axis, config, where)
        fitted.append((module, name, config, beta, value.shape[0] if stacked else None))
    for module, name, config, beta, layers in fitted:
        setattr(module, _beta_name(name), _beta_variable(beta, config))
        if config.mvue and not isinstance(getattr(module, _STREAM, None), nnx.RngStream):
            stream = rngs["sparsity"]
            setattr(module, _STREAM, stream.fork() if layers is None else stream.split(layers))
    return model
