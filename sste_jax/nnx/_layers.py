"""The training layer: `SparseLinear`, its variables, and what changes them between steps.

A `SparseLinear` is an ``nnx.Linear`` (same constructor, same ``kernel`` and ``bias``) whose product is
`sste_jax.sparse_dense`. Its β lives in a `SparsityBeta` variable, its MVUE key in an `MVUEKey`, a
``"tsrste"`` layer's forward mask in a `SparsityMask` (refreshed by `refresh_masks`); none is an
``nnx.Param``. Its ``pruned`` attribute, None unless set (by `sste_jax.nnx.accumulate_gradients` around
each micro-batch), holds a `sste_jax.PrunedWeight` the call uses instead of pruning.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> layer = SparseLinear(8, 4, rngs=nnx.Rngs(0))
>>> layer(jnp.ones((2, 8))).shape, layer.pruned is None
((2, 4), True)
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype
from jaxtyping import Array, ArrayLike, Bool, Float, Real

from sste_jax._beta import SparsityBeta
from sste_jax._config import SparsityConfig, check_config
from sste_jax._layout import SparseSpec
from sste_jax._linear import forward_weight, fresh_key, sparse_dense
from sste_jax._sparsity import fit_beta, initial_beta, transposable_mask_24

__all__ = ["SparsityBeta", "SparsityMask", "MVUEKey", "SparseLinear", "refresh_masks", "refit_beta",
           "linear_like", "set_child", "path_str"]

Path = tuple[Any, ...]


class MVUEKey(nnx.Variable):
    """The MVUE key of a `SparseLinear` with ``mvue=True``: drawn once, never advanced (each draw folds in
    the product's input and weight: `sste_jax._linear.fresh_key`); not an ``nnx.Param``.

    >>> import jax, sste_jax
    >>> from flax import nnx
    >>> from sste_jax import nnx as sparse_nnx
    >>> layer = sparse_nnx.SparseLinear(8, 4, config=sste_jax.SparsityConfig(mvue=True), rngs=nnx.Rngs(0))
    >>> isinstance(layer.mvue_key, sparse_nnx.MVUEKey), layer.mvue_key[...].shape
    (True, ())
    """


class SparsityMask(nnx.Variable):
    """The forward mask of a ``"tsrste"`` `SparseLinear` (bool, the kernel's shape); not an ``nnx.Param``.

    Set to `transposable_mask_24` of the kernel when the layer is built and by `refresh_masks`.

    >>> from flax import nnx
    >>> import sste_jax
    >>> from sste_jax import nnx as sparse_nnx
    >>> layer = sparse_nnx.SparseLinear(8, 8, config=sste_jax.SparsityConfig(method="tsrste"), rngs=nnx.Rngs(0))
    >>> layer.mask[...].sum(0).tolist()  # two kept per column and per row of each 4×4 block
    [4, 4, 4, 4, 4, 4, 4, 4]
    """


def _mvue_key(rngs: nnx.Rngs | nnx.RngStream | None, config: SparsityConfig, name: str):
    if not config.mvue:
        return nnx.data(None)
    if isinstance(rngs, nnx.Rngs):
        return MVUEKey(rngs["sparsity"]())
    if isinstance(rngs, nnx.RngStream):
        return MVUEKey(rngs())
    raise ValueError(f"{name}: SparsityConfig(mvue=True) needs rngs (an nnx.Rngs or nnx.RngStream) for its key")


class SparseLinear(nnx.Linear):
    """``nnx.Linear`` whose forward weight is 2:4 sparse (`sste_jax.sparse_dense`).

    Same constructor and parameters (``kernel``, ``bias``) as ``nnx.Linear``, plus ``config``; the
    frozen scale ``beta`` (`SparsityBeta`) is fitted to the initial kernel (1.0 for methods other than
    ``"sste"``, which ignore it), or given as ``beta=`` (e.g. for a zero-initialised kernel, whose β
    cannot be fitted and raises). With ``config.mvue`` the layer draws its `MVUEKey` from ``rngs``
    (``"sparsity"``, else ``"default"``). Products use the global ``jax.default_matmul_precision``; a
    per-layer ``precision``, ``dot_general`` or ``preferred_element_type`` is rejected. While its ``pruned``
    attribute holds a `sste_jax.PrunedWeight` of its kernel (`sste_jax.nnx.accumulate_gradients` sets it
    around each micro-batch), the call uses that instead of pruning; it is None otherwise.

    Args:
      in_features, out_features: as ``nnx.Linear``'s.
      config: a `sste_jax.SparsityConfig`.
      beta: β, instead of fitting it to the initial kernel.
      **kwargs: ``nnx.Linear``'s (``rngs`` required; ``use_bias``, ``dtype``, ``param_dtype``, the initialisers).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = SparseLinear(8, 4, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((3, 8))).shape, bool((layer.forward_weight() != 0).reshape(2, 4, 4).sum(1).max() <= 2)
    ((3, 4), True)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        config: SparsityConfig = SparsityConfig(),
        beta: Real[ArrayLike, ""] | None = None,
        **kwargs,
    ):
        name = f"SparseLinear({in_features}, {out_features})"
        check_config(config, name)
        super().__init__(in_features, out_features, **kwargs)
        self._become_sparse(config, beta, kwargs["rngs"], name)

    def _become_sparse(self, config: SparsityConfig, beta, rngs, name: str) -> None:
        reason = _unsupported(self, config)
        if reason:
            raise ValueError(f"{name}: {reason}")
        self.config = config
        value = initial_beta(self.kernel[...], 0, name, beta, n=config.n, m=config.m) if config.method == "sste" \
            else jnp.ones((), jnp.float32)
        self.beta = SparsityBeta(value, spec=SparseSpec(config))
        tsrste = config.method == "tsrste"
        self.mask = SparsityMask(transposable_mask_24(self.kernel[...])) if tsrste else nnx.data(None)
        self.mvue_key = _mvue_key(rngs, config, name)
        self.pruned = nnx.data(None)  # a PrunedWeight to use instead of pruning, while one is set

    @classmethod
    def from_linear(
        cls,
        linear: nnx.Linear,
        config: SparsityConfig = SparsityConfig(),
        *,
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        beta: Real[ArrayLike, ""] | None = None,
    ) -> "SparseLinear":
        """A `SparseLinear` holding ``linear``'s own ``kernel`` and ``bias`` variables (same arrays, names and
        metadata), β fitted to the kernel now (or ``beta``); ``rngs`` draws the MVUE key.

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> dense = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
        >>> sparse = SparseLinear.from_linear(dense)
        >>> sparse.kernel is dense.kernel, sparse(jnp.ones((2, 8))).shape
        (True, (2, 4))
        """
        if type(linear) is not nnx.Linear:
            raise TypeError(f"from_linear takes a plain nnx.Linear, got {type(linear).__name__}")
        name = f"SparseLinear.from_linear({linear.in_features}, {linear.out_features})"
        check_config(config, name)
        reason = _unsupported(linear, config)
        if reason:
            raise ValueError(f"{name}: {reason}")
        sparse = cls(
            linear.in_features,
            linear.out_features,
            use_bias=linear.use_bias,
            dtype=linear.dtype,
            param_dtype=linear.param_dtype,
            kernel_init=lambda *_: linear.kernel[...],
            bias_init=lambda *_: linear.bias[...],
            promote_dtype=linear.promote_dtype,
            config=SparsityConfig(method="dense"),  # no β fit, no key: both are set below
            rngs=nnx.Rngs(0),
        )
        sparse.kernel = linear.kernel
        if linear.use_bias:
            sparse.bias = linear.bias
        sparse._become_sparse(config, beta, rngs, name)
        return sparse

    def to_linear(self) -> nnx.Linear:
        """An ``nnx.Linear`` (same dtypes, bias) whose kernel is this layer's forward weight ``W̃``: the layer
        for inference, which needs nothing from sste_jax to run.

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = SparseLinear(8, 4, rngs=nnx.Rngs(0))
        >>> bool(jnp.allclose(layer.to_linear()(jnp.ones((2, 8))), layer(jnp.ones((2, 8)))))
        True
        """
        return linear_like(self, self.forward_weight())

    def forward_weight(self) -> Float[Array, "in out"]:
        """The forward weight ``W̃`` (β·S(W) for ``"sste"``), for inspection and export."""
        return forward_weight(self.kernel[...], self.beta[...], self.config, mask=self.forward_mask())

    def forward_mask(self) -> Bool[Array, "in out"] | None:
        """The mask the product uses: a ``"tsrste"`` layer's `SparsityMask`, None for other methods (a layer
        switched to another method keeps its mask variable, unused)."""
        return self.mask[...] if self.config.method == "tsrste" else None

    def __call__(self, inputs: Float[Array, "*batch in"], out_sharding=None) -> Float[Array, "*batch out"]:
        if out_sharding is not None:
            raise NotImplementedError("SparseLinear does not take out_sharding; constrain the output instead")
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        key = fresh_key(self.mvue_key[...], inputs, kernel) if self.config.mvue else None
        pruned = self.pruned
        if pruned is not None and pruned.weight.dtype != kernel.dtype:  # promoted by wider inputs: prune here
            pruned = None
        y = sparse_dense(inputs, kernel, self.beta[...], key, self.config, self.forward_mask(), pruned=pruned)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


def _unsupported(layer: nnx.Linear, config: SparsityConfig) -> str | None:
    """Why ``layer`` cannot become a `SparseLinear` with ``config``, or None."""
    if config.group_axis not in (None, 0, -2):
        return f"a linear layer groups along its kernel's axis 0; got SparsityConfig(group_axis={config.group_axis})"
    if config.sparse and layer.in_features % config.m:
        shape = layer.kernel.shape
        return f"the contraction length in_features={layer.in_features} (kernel {shape}) is not divisible by {config.m}"
    if config.method == "tsrste" and layer.out_features % 4:
        shape = layer.kernel.shape
        return f"a transposable mask needs out_features={layer.out_features} (kernel {shape}) divisible by 4 too"
    if layer.dot_general is not jax.lax.dot_general:
        return f"a custom dot_general ({layer.dot_general!r}) cannot be combined with the sparse product"
    if layer.preferred_element_type is not None:
        return "preferred_element_type is not supported (the product accumulates in float32)"
    if layer.precision is not None:
        return "a per-layer precision is not supported; use jax.default_matmul_precision"
    return None


def path_str(path: Path) -> str:
    """``"a/0/b"`` for a graph path (``"<root>"`` for the model itself)."""
    return "/".join(str(p) for p in path) or "<root>"


def set_child(model: nnx.Module, path: Path, child: nnx.Module) -> None:
    """Puts ``child`` at ``path`` of ``model`` (an attribute or a list index), in place."""
    parent = model
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    if isinstance(path[-1], int):
        parent[path[-1]] = child
    else:
        setattr(parent, path[-1], child)


def _layers(model: nnx.Module, method: str) -> list[SparseLinear]:
    return [
        node for _, node in nnx.iter_graph(model) if isinstance(node, SparseLinear) and node.config.method == method
    ]


def refresh_masks(model: nnx.Module) -> int:
    """Sets the mask of every ``"tsrste"`` layer to `transposable_mask_24` of its current kernel.

    T-SR-STE refreshes every 40 steps (``docs/algorithm.md#baselines``); call it inside the jitted step under a
    ``jax.lax.cond`` on the step, or between steps. Returns the number of layers refreshed.

    >>> from flax import nnx
    >>> import sste_jax
    >>> from sste_jax import nnx as sparse_nnx
    >>> model = nnx.Sequential(sparse_nnx.SparseLinear(8, 8, config=sste_jax.SparsityConfig(method="tsrste"),
    ...                                                rngs=nnx.Rngs(0)))
    >>> sparse_nnx.refresh_masks(model)
    1
    """
    layers = _layers(model, "tsrste")
    for layer in layers:
        layer.mask[...] = transposable_mask_24(layer.kernel[...])
    return len(layers)


def refit_beta(model: nnx.Module, rule: Callable[[jax.Array], jax.Array] | None = None) -> int:
    """Sets β of every ``"sste"`` layer to ``rule(kernel)`` (default `fit_beta` with the layer's N:M);
    returns the count.

    β is fitted once, by `sparsify` (``docs/algorithm.md#beta-and-the-optimizer``). This is for
    ablations: another rule at initialisation, or recomputing β during training (the documented failure mode).

    >>> from flax import nnx
    >>> import sste_jax
    >>> from sste_jax import nnx as sparse_nnx
    >>> model = nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0)))
    >>> sparse_nnx.refit_beta(model, rule=lambda kernel: 1.0), float(model.layers[0].beta[...])
    (1, 1.0)
    """
    layers = _layers(model, "sste")
    for layer in layers:
        kernel, config = layer.kernel[...], layer.config
        value = fit_beta(kernel, n=config.n, m=config.m) if rule is None else rule(kernel)
        layer.beta[...] = jnp.asarray(value, jnp.float32)
    return len(layers)


def linear_like(layer, kernel: jax.Array) -> nnx.Linear:
    """An ``nnx.Linear`` like ``layer`` (same dtypes, bias) holding ``kernel``."""
    linear = nnx.Linear(
        *kernel.shape,
        use_bias=layer.bias is not None,
        dtype=layer.dtype,
        param_dtype=getattr(layer, "param_dtype", kernel.dtype),
        precision=getattr(layer, "precision", None),
        promote_dtype=getattr(layer, "promote_dtype", promote_dtype),
        rngs=nnx.Rngs(0),
    )
    linear.kernel[...] = kernel
    if layer.bias is not None:
        linear.bias[...] = layer.bias[...]
    return linear
