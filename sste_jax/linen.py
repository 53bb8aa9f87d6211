"""Flax Linen: `SparseDense`, a 2:4 sparse ``nn.Dense``, and `sparsify_dense` for unmodified models.

Both keep ``nn.Dense``'s parameters (``kernel``, ``bias``) and put the frozen β in the
``"sparsity"`` collection: it is created (fitted to the kernel) only while that collection is
mutable, i.e. at ``init`` or by `fit_sparsity` for weights loaded from a dense checkpoint, and is
read-only in ``apply``. Each β is boxed in `SparsityBeta` (Flax's ``AxisMetadata``, like
``nn.Partitioned``): ``apply`` unboxes it, ``nn.unbox(variables)`` gives bare arrays, and the box
names the layer's method, MVUE, FP8, decay and N:M pattern, so that a checkpoint knows what it
holds. MVUE keys come from the ``"sparsity"`` rng stream (``rngs={"sparsity": key}`` in ``apply``;
Flax folds in each module's path, so layers differ).

>>> import jax, jax.numpy as jnp
>>> layer = SparseDense(4)
>>> variables = layer.init(jax.random.key(0), jnp.ones((2, 8)))
>>> sorted(variables), sorted(variables["params"]), layer.apply(variables, jnp.ones((2, 8))).shape
(['params', 'sparsity'], ['bias', 'kernel'], (2, 4))
"""

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, no_type_check

import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from jaxtyping import Array, ArrayLike, Float, Real

from sste_jax._linear import SparsityConfig, check_config, forward_weight, sparse_dense
from sste_jax._select import check_rules, match_rule
from sste_jax._select import feed_forward as _feed_forward_rules
from sste_jax._sparsity import initial_beta

__all__ = [
    "SparseDense",
    "SparsityBeta",
    "sparsify_dense",
    "fit_sparsity",
    "all_dense",
    "feed_forward",
    "sparse_kernel_mask",
]

Where = Callable[[tuple[str, ...], nn.Dense], bool]
_FEED_FORWARD_RULES = check_rules(_feed_forward_rules(), "feed_forward")


class SparsityBeta(struct.PyTreeNode, nn.meta.AxisMetadata):
    """A Linen layer's β (``value``) with what the layer trains: ``sparse_method``, ``sparse_mvue``,
    ``sparse_fp8``, ``sparse_decay`` (the SR-STE or T-SR-STE decay, else 0), ``sparse_n``, ``sparse_m``.

    >>> import jax, jax.numpy as jnp
    >>> variables = SparseDense(4).init(jax.random.key(0), jnp.ones((2, 8)))
    >>> box = variables["sparsity"]["beta"]
    >>> box.sparse_method, nn.unbox(variables)["sparsity"]["beta"].shape
    ('sste', ())
    """

    value: Any
    sparse_method: str = struct.field(pytree_node=False)
    sparse_mvue: bool = struct.field(pytree_node=False)
    sparse_fp8: bool = struct.field(pytree_node=False)
    sparse_decay: float = struct.field(pytree_node=False)
    sparse_n: int = struct.field(pytree_node=False, default=2)
    sparse_m: int = struct.field(pytree_node=False, default=4)

    def unbox(self) -> Any:
        return self.value

    def replace_boxed(self, val: Any) -> "SparsityBeta":
        return self.replace(value=val)

    def add_axis(self, index: int, params: dict[Any, Any]) -> "SparsityBeta":
        return self  # a scalar: nn.scan/vmap stack it without axis names

    def remove_axis(self, index: int, params: dict[Any, Any]) -> "SparsityBeta":
        return self

    @classmethod
    def of(cls, value, config: SparsityConfig) -> "SparsityBeta":
        decay = {"srste": config.srste_decay, "tsrste": config.masked_decay}.get(config.method, 0.0)
        return cls(value, config.method, bool(config.mvue), bool(config.fp8), float(decay), config.n, config.m)


def _check(module: nn.Dense, in_features: int, config: SparsityConfig) -> None:
    name = "/".join(module.path) or type(module).__name__
    check_config(config, name)
    if config.method == "tsrste":
        raise ValueError(f"{name}: method='tsrste' keeps a refreshed mask; use sste_jax.nnx.SparseLinear for it")
    if config.sparse and in_features % config.m:
        raise ValueError(f"{name}: the contraction length {in_features} is not divisible by {config.m}, "
                         f"cannot be {config.n}:{config.m} sparse")
    if module.dot_general is not None or module.dot_general_cls is not None:
        raise ValueError(f"{name}: a custom dot_general cannot be combined with the sparse product")
    if module.precision is not None:
        raise ValueError(f"{name}: a per-layer precision is not supported; use jax.default_matmul_precision")


def _sparse_call(module: nn.Dense, inputs: Float[Array, "*batch in"], config: SparsityConfig, fixed_beta=None):
    """``nn.Dense.__call__`` with the product replaced by `sparse_dense`; runs in ``module``'s scope.

    β is created (fitted, or ``fixed_beta``) only while ``"sparsity"`` is mutable; a kernel whose β
    cannot be fitted raises there, naming the layer.
    """
    _check(module, inputs.shape[-1], config)
    kernel = module.param("kernel", module.kernel_init, (inputs.shape[-1], module.features), module.param_dtype)
    bias = module.param("bias", module.bias_init, (module.features,), module.param_dtype) if module.use_bias else None
    name = "/".join(module.path) or type(module).__name__
    if config.method == "sste":
        initial = lambda: initial_beta(kernel, 0, name, fixed_beta, n=config.n, m=config.m)  # noqa: E731
    else:
        initial = lambda: jnp.ones((), jnp.float32)  # noqa: E731
    beta = module.variable("sparsity", "beta", lambda: SparsityBeta.of(initial(), config))
    inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
    key = module.make_rng("sparsity") if config.mvue else None
    y = sparse_dense(inputs, kernel, beta.value, key, config)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


# Runtime type checkers cannot check the fields inherited from nn.Dense (``promote_dtype`` is a
# non-runtime-checkable Protocol); the call's shapes are checked in `_sparse_call`.
@no_type_check
class SparseDense(nn.Dense):
    """Drop-in ``nn.Dense`` with a 2:4 sparse forward weight (`sste_jax.sparse_dense`).

    Same fields as ``nn.Dense`` plus ``config`` and ``beta``; same ``params``; β in ``"sparsity"/beta``
    (1.0 for methods other than ``"sste"``, which ignore it), fitted to the initial kernel unless
    ``beta`` is given (an all-zero or non-finite kernel cannot be fitted and raises).

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> from sste_jax.linen import SparseDense
    >>> variables = SparseDense(4).init(jax.random.key(0), jnp.ones((2, 8)))
    >>> bool(variables["sparsity"]["beta"].value == sste_jax.fit_beta(variables["params"]["kernel"]))
    True
    """

    config: SparsityConfig = SparsityConfig()
    beta: float | None = None

    @nn.compact
    def __call__(self, inputs: Float[Array, "*batch in"]) -> Float[Array, "*batch out"]:
        return _sparse_call(self, inputs, self.config, self.beta)

    def forward_weight(self) -> Float[Array, "in out"]:
        """The forward weight ``W̃`` (β·S(W) for ``"sste"``) of the bound layer, for inspection and export:
        ``layer.apply(variables, method="forward_weight")``.

        >>> import jax, jax.numpy as jnp
        >>> layer = SparseDense(4)
        >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 8)))
        >>> layer.apply(variables, method="forward_weight").shape
        (8, 4)
        """
        kernel, beta = self.get_variable("params", "kernel"), self.get_variable("sparsity", "beta")
        if kernel is None or beta is None:
            missing = [n for n, v in (("params/kernel", kernel), ("sparsity/beta", beta)) if v is None]
            raise ValueError(
                f"{'/'.join(self.path) or 'SparseDense'}: the variables lack {missing}; pass the ones init made"
            )
        return forward_weight(kernel, nn.unbox(beta), self.config)  # β as init made it: a SparsityBeta box


def all_dense(path: tuple[str, ...], module: nn.Dense) -> bool:
    """Every ``nn.Dense`` (layers whose contraction length is not divisible by 4 raise when called).

    >>> import flax.linen as nn
    >>> from sste_jax.linen import all_dense
    >>> all_dense(("head",), nn.Dense(4))
    True
    """
    return True


def feed_forward(path: tuple[str, ...], module: nn.Dense) -> bool:
    """The feed-forward ``nn.Dense`` layers of transformer blocks: the module path matches
    `sste_jax.FEED_FORWARD` (the paper's default; one rule set for every path).

    >>> import flax.linen as nn
    >>> from sste_jax.linen import feed_forward
    >>> feed_forward(("Block_0", "mlp", "Dense_0"), nn.Dense(4)), feed_forward(("head",), nn.Dense(4))
    (True, False)
    """
    return bool(match_rule(_FEED_FORWARD_RULES, "/".join(path)))


@contextlib.contextmanager
def sparsify_dense(
    config: SparsityConfig = SparsityConfig(), where: Where = feed_forward, *, beta: Real[ArrayLike, ""] | None = None
) -> Iterator[None]:
    """Within this context, the ``nn.Dense`` calls selected by ``where(module.path, module)`` are 2:4 sparse.

    An unmodified Linen model gets `SparseDense`'s behaviour and variables (β in ``"sparsity"``):
    wrap both its ``init`` (or `fit_sparsity`) and every ``apply`` in the context. A selected layer
    that cannot be sparsified (contraction length not divisible by 4, or a kernel whose β cannot be
    fitted) raises, naming it; ``beta`` sets every new β instead of fitting it.

    >>> import jax, jax.numpy as jnp
    >>> model = nn.Sequential([nn.Dense(8), nn.Dense(4)])
    >>> with sparsify_dense(where=all_dense):
    ...     variables = model.init(jax.random.key(0), jnp.ones((2, 8)))
    ...     y = model.apply(variables, jnp.ones((2, 8)))
    >>> sorted(variables["sparsity"])
    ['layers_0', 'layers_1']
    """
    check_config(config, "sparsify_dense")

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (
            context.method_name != "__call__"
            or type(module) is not nn.Dense
            or not where(tuple(module.path), module)
        ):
            return next_fun(*args, **kwargs)
        if kwargs or len(args) != 1:
            raise TypeError(f"{'/'.join(module.path)}: nn.Dense takes one positional input")
        return _sparse_call(module, args[0], config, beta)

    with nn.intercept_methods(interceptor):
        yield


def fit_sparsity(model: nn.Module, params: Any, *args, rngs: Any = None, **kwargs) -> Any:
    """The ``"sparsity"`` collection (β) fitted to ``params``, e.g. weights loaded from a dense checkpoint.

    Runs ``model.apply({"params": params}, *args, **kwargs)`` once with ``"sparsity"`` mutable; call
    it inside `sparsify_dense` for an unmodified model. Returns ``{"params": params, "sparsity": β}``.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from sste_jax.linen import all_dense, fit_sparsity, sparsify_dense
    >>> model, x = nn.Dense(4), jnp.ones((2, 8))
    >>> dense_params = model.init(jax.random.key(0), x)["params"]  # e.g. from a dense checkpoint
    >>> with sparsify_dense(where=all_dense):
    ...     variables = fit_sparsity(model, dense_params, x)
    >>> sorted(variables), bool(variables["sparsity"]["beta"].value > 0)
    (['params', 'sparsity'], True)
    """
    _, state = model.apply({"params": params}, *args, rngs=rngs, mutable=["sparsity"], **kwargs)
    return {"params": params, "sparsity": state["sparsity"]}


def sparse_kernel_mask(variables: Any) -> Any:
    """A boolean tree like ``variables["params"]``: True at the kernels of layers with a β in ``"sparsity"``.

    Use it as the ``mask`` of `sste_jax.add_srste_decay` (for ``"ste"`` layers: ``"srste"`` layers add
    that term themselves) or `sste_jax.add_masked_decay` on params.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from sste_jax.linen import SparseDense, sparse_kernel_mask
    >>> model = nn.Sequential([SparseDense(8), nn.Dense(4)])
    >>> variables = model.init(jax.random.key(0), jnp.ones((2, 8)))
    >>> sparse_kernel_mask(variables)
    {'layers_0': {'kernel': True, 'bias': False}, 'layers_1': {'kernel': False, 'bias': False}}
    """
    sparse = set()

    def collect(prefix, tree):
        for name, sub in tree.items():
            if name == "beta" and not isinstance(sub, Mapping):
                sparse.add(prefix)
            elif isinstance(sub, Mapping):
                collect(prefix + (name,), sub)

    def mark(prefix, tree):
        return {
            name: mark(prefix + (name,), sub) if isinstance(sub, Mapping) else (name == "kernel" and prefix in sparse)
            for name, sub in tree.items()
        }

    collect((), dict(variables.get("sparsity", {})))
    return mark((), dict(variables["params"]))
