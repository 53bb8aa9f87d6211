"""Flax NNX layers: `SparseLinear`, a 2:4 sparse ``nnx.Linear`` for models you write yourself.

A `SparseLinear` fits its frozen β to its initial kernel (``docs/algorithm.md#beta-and-the-optimizer``);
`SparseLinear.from_linear` makes one from an existing ``nnx.Linear`` (same kernel and bias variables).
β lives in a `SparsityBeta` variable, not an ``nnx.Param``: an ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
never sees it (and `sste_jax.freeze_beta` protects it under any other filter). For a model you did not
write, use `sste_jax.sparsify`.

For inference, `densify_layers` and `compress_layers` swap each sparse layer, in place, for an
``nnx.Linear`` holding its forward weight or a `CompressedLinear` holding it packed by
`sste_jax.compress_24`; both ask the layer (``layer.forward_weight()``), so every method, T-SR-STE's
masked layers included, converts.

MVUE (``SparsityConfig(mvue=True)``) takes its key from the layer's `MVUEKey`, drawn once from
``rngs`` (the ``"sparsity"`` stream, else ``"default"``) and never advanced: each draw folds in the
product's input and weight (``docs/algorithm.md#mvue-keys``), so it is fresh every step without RNG
state that a scan or a decoding loop would have to carry, and inference needs no key.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from sste_jax import nnx as sparse_nnx
>>> class Block(nnx.Module):
...     def __init__(self, rngs):
...         self.up = sparse_nnx.SparseLinear(8, 32, rngs=rngs)
...         self.down = sparse_nnx.SparseLinear(32, 8, rngs=rngs)
...     def __call__(self, x):
...         return x + self.down(nnx.relu(self.up(x)))
>>> Block(nnx.Rngs(0))(jnp.ones((2, 8))).shape
(2, 8)
"""

import contextlib
import contextvars
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype
from jaxtyping import Array, ArrayLike, Float, Real, Shaped, UInt8

from sste_jax._config import SparsityConfig, check_config
from sste_jax._layout import SparseSpec
from sste_jax._linear import PrunedWeight, forward_weight, fresh_key, prune_weight, sparse_dense
from sste_jax._metrics import sparse_modules
from sste_jax._sparsity import compress_24, decompress_24, fit_beta, initial_beta, transposable_mask_24

__all__ = [
    "SparsityBeta",
    "SparsityMask",
    "MVUEKey",
    "SparseLinear",
    "refresh_masks",
    "refit_beta",
    "Packed24",
    "CompressedLinear",
    "compress_layers",
    "densify_layers",
    "decompress_layers",
    "accumulate_gradients",
]

Path = tuple[Any, ...]


class SparsityBeta(nnx.Variable):
    """A frozen S-STE scale β (float32; one per layer of a stacked weight); not an ``nnx.Param``.

    Its metadata ``spec`` (a `SparseSpec`: config, grouped axis, layout) says what the weight trains, so
    that metrics, checkpoints and export know each β's weight. `SparseLinear` and `sste_jax.sparsify`
    keep their β in it.

    >>> from flax import nnx
    >>> import sste_jax
    >>> from sste_jax import nnx as sparse_nnx
    >>> layer = sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0))
    >>> isinstance(layer.beta, nnx.Param), layer.beta.spec.config.method
    (False, 'sste')
    """

    sste_frozen = True  # tells `sste_jax.freeze_beta` (which does not import Flax) what this is


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
    per-layer ``precision``, ``dot_general`` or ``preferred_element_type`` is rejected.

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
        return _dense_linear(self, self.forward_weight())

    def forward_weight(self) -> Float[Array, "in out"]:
        """The forward weight ``W̃`` (β·S(W) for ``"sste"``), for inspection and export."""
        return forward_weight(self.kernel[...], self.beta[...], self.config, mask=self._mask())

    def _mask(self):
        """The mask for the product: only ``"tsrste"`` uses it (a layer switched to another method keeps it)."""
        return self.mask[...] if self.config.method == "tsrste" else None

    def __call__(self, inputs: Float[Array, "*batch in"], out_sharding=None) -> Float[Array, "*batch out"]:
        if out_sharding is not None:
            raise NotImplementedError("SparseLinear does not take out_sharding; constrain the output instead")
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        key = fresh_key(self.mvue_key[...], inputs, kernel) if self.config.mvue else None
        pruned = _PRUNED.get().get(id(self))
        if pruned is not None and pruned.weight.dtype != kernel.dtype:  # promoted by wider inputs: prune here
            pruned = None
        y = sparse_dense(inputs, kernel, self.beta[...], key, self.config, self._mask(), pruned=pruned)
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


def _path_str(path: Path) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def _set_child(model: nnx.Module, path: Path, child: nnx.Module) -> None:
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


class Packed24(nnx.Variable):
    """2:4-compressed weight data of a `CompressedLinear` (kept values or uint8 metadata); not a Param.

    >>> from flax import nnx
    >>> from sste_jax import nnx as sparse_nnx
    >>> model = nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0)))
    >>> layer = sparse_nnx.compress_layers(model).layers[0]
    >>> isinstance(layer.meta, sparse_nnx.Packed24), layer.meta[...].dtype, isinstance(layer.meta, nnx.Param)
    (True, dtype('uint8'), False)
    """


class CompressedLinear(nnx.Module):
    """Inference layer holding ``W̃`` as `sste_jax.compress_24` values + metadata: half the weight
    bytes, plus one uint8 per group of 4. It decompresses once per call (a jitted model folds that
    into the compiled program) and its output equals the sparse layer's bit for bit (same product,
    same forward weight).

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> w = sste_jax.hard_threshold_24(jax.random.normal(jax.random.key(0), (8, 4)))
    >>> layer = CompressedLinear(*sste_jax.compress_24(w))
    >>> bool(jnp.array_equal(layer(jnp.ones((2, 8))), jnp.ones((2, 8)) @ w)), layer.forward_weight().shape
    (True, (8, 4))
    """

    def __init__(
        self,
        values: Shaped[Array, "half out"],
        meta: UInt8[Array, "groups out"],
        bias: Float[Array, " out"] | None = None,
        *,
        fp8: bool = False,
        dtype: Any = None,
        promote_dtype: Any = promote_dtype,
    ):
        self.values = Packed24(values)
        self.meta = Packed24(meta)
        self.bias = nnx.Param(bias) if bias is not None else None
        self.fp8, self.dtype, self.promote_dtype = fp8, dtype, promote_dtype

    def forward_weight(self) -> Float[Array, "in out"]:
        """The dense forward weight ``W̃`` (`sste_jax.decompress_24` of the stored data)."""
        return decompress_24(self.values[...], self.meta[...])

    def __call__(self, x: Float[Array, "*batch in"]) -> Float[Array, "*batch out"]:
        kernel = self.forward_weight()
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        y = sparse_dense(x, kernel, 1.0, config=SparsityConfig(method="dense", fp8=self.fp8))
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


def _dense_linear(layer, kernel: jax.Array) -> nnx.Linear:
    """An ``nnx.Linear`` like ``layer`` (same dtypes, bias) holding ``kernel``."""
    linear = nnx.Linear(
        *kernel.shape,
        use_bias=layer.bias is not None,
        dtype=layer.dtype,
        param_dtype=getattr(layer, "param_dtype", kernel.dtype),
        precision=getattr(layer, "precision", None),
        promote_dtype=layer.promote_dtype,
        rngs=nnx.Rngs(0),
    )
    linear.kernel[...] = kernel
    if layer.bias is not None:
        linear.bias[...] = layer.bias[...]
    return linear


def _forward_weights(model: nnx.Module) -> list[tuple[Path, nnx.Module, jax.Array]]:
    """``(path, layer, W̃)`` of every sparse layer, each ``W̃`` from the layer's own ``forward_weight()``
    (so a layer that keeps a mask, e.g. T-SR-STE's, applies it); raises naming a layer that has none."""
    out = []
    for path, layer in sparse_modules(model):
        if not callable(getattr(layer, "forward_weight", None)):
            raise TypeError(f"{_path_str(path)}: {type(layer).__name__} has no forward_weight() to export")
        out.append((path, layer, layer.forward_weight()))
    return out


def densify_layers(model: nnx.Module) -> nnx.Module:
    """Bakes every sparse weight's ``W̃`` (β·S(W)) into the model, in place; returns ``model``. `SparseLinear`
    and `CompressedLinear` layers become ``nnx.Linear``; a model `sste_jax.sparsify` made holds ``W̃`` in
    its own parameters and is its own class again, without ``sparsity``. The result needs nothing from
    sste_jax to run.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sste_jax import nnx as sparse_nnx
    >>> model = nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0)))
    >>> x = jnp.ones((2, 8))
    >>> y = model(x)
    >>> dense = sparse_nnx.densify_layers(model)
    >>> type(dense.layers[0]).__name__, bool(jnp.allclose(dense(x), y))
    ('Linear', True)
    """
    from sste_jax._sparsify import densify_sparsified

    for path, layer, w_tilde in _forward_weights(model):
        _set_child(model, path, _dense_linear(layer, w_tilde))
    for path, node in list(nnx.iter_graph(model)):
        if isinstance(node, CompressedLinear):
            _set_child(model, path, _dense_linear(node, node.forward_weight()))
    return densify_sparsified(model)


def compress_layers(model: nnx.Module) -> nnx.Module:
    """Replaces, in place, every 2:4 layer by a `CompressedLinear` of its ``W̃`` (layers with
    ``method="dense"`` by an ``nnx.Linear``); returns ``model``.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sste_jax import nnx as sparse_nnx
    >>> model = nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0)))
    >>> x = jnp.ones((2, 8))
    >>> y = model(x)
    >>> compressed = sparse_nnx.compress_layers(model)
    >>> type(compressed.layers[0]).__name__, bool(jnp.array_equal(compressed(x), y))
    ('CompressedLinear', True)
    """
    for path, layer, w_tilde in _forward_weights(model):
        if layer.config.sparse:
            bias = layer.bias[...] if layer.bias is not None else None
            new = CompressedLinear(
                *compress_24(w_tilde), bias, fp8=layer.config.fp8, dtype=layer.dtype, promote_dtype=layer.promote_dtype
            )
        else:
            new = _dense_linear(layer, w_tilde)
        _set_child(model, path, new)
    return model


def decompress_layers(model: nnx.Module) -> nnx.Module:
    """Replaces, in place, every `CompressedLinear` (except FP8 ones, whose product is FP8) by an
    ``nnx.Linear`` holding its decompressed weight; returns ``model``. Call it once on a served model
    (e.g. inside a jitted generation function, before its decoding loop) so the weights are
    decompressed once, not on every call; the outputs are the same, bit for bit.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sste_jax import nnx as sparse_nnx
    >>> model = sparse_nnx.compress_layers(nnx.Sequential(sparse_nnx.SparseLinear(8, 4, rngs=nnx.Rngs(0))))
    >>> x = jnp.ones((2, 8))
    >>> y = model(x)
    >>> served = sparse_nnx.decompress_layers(model)
    >>> type(served.layers[0]).__name__, bool(jnp.array_equal(served(x), y))
    ('Linear', True)
    """
    for path, node in list(nnx.iter_graph(model)):
        if isinstance(node, CompressedLinear) and not node.fp8:
            _set_child(model, path, _dense_linear(node, node.forward_weight()))
    return model


# ``id(layer) -> PrunedWeight`` of the layers whose forward weight `accumulate_gradients` computed once for this step.
_PRUNED: contextvars.ContextVar[dict[int, PrunedWeight]] = contextvars.ContextVar("sste_pruned", default={})


def _prune_layers(model: nnx.Module) -> dict[Path, PrunedWeight]:
    """``path -> PrunedWeight`` of every sparse `SparseLinear` with a 2-D kernel (stacked layers prune in the call)."""
    out = {}
    for path, layer in nnx.iter_graph(model):
        if isinstance(layer, SparseLinear) and layer.config.sparse and layer.kernel[...].ndim == 2:
            kernel = layer.kernel[...]
            kernel = kernel.astype(layer.dtype) if layer.dtype is not None else kernel  # as promote_dtype makes it
            out[path] = prune_weight(kernel, layer.beta[...], layer.config, layer._mask())
    return out


@contextlib.contextmanager
def _using(model: nnx.Module, pruned: dict[Path, PrunedWeight]):
    """Within the block, the layers of ``model`` at the paths of ``pruned`` use those forward weights."""
    by_id = {id(layer): pruned[path] for path, layer in nnx.iter_graph(model) if path in pruned}
    token = _PRUNED.set({**_PRUNED.get(), **by_id})
    try:
        yield
    finally:
        _PRUNED.reset(token)


def accumulate_gradients(loss_fn: Callable[..., jax.Array], model: nnx.Module, *micro_batches: Any):
    """``(loss, grads)`` of ``loss_fn(model, *micro_batch)`` averaged over the micro-batches (the leading axis
    of every array in ``micro_batches``, scanned with ``jax.lax.scan``), with each `SparseLinear`'s forward
    weight ``W̃`` (and its GEMM operands) computed once, before the scan, not once per micro-batch.

    ``grads`` is the ``nnx.State`` of the ``nnx.Param`` variables, as ``nnx.grad`` gives it; each micro-batch's
    gradient is exactly the one ``nnx.grad`` computes for it (same straight-through rule, MVUE drawing a fresh
    key per micro-batch), summed in order and divided by their number. The model's other variables (MVUE key
    counters, batch statistics) are updated as after the last micro-batch. Layers inside ``nnx.scan`` or
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
        with _using(micro_model, pruned):
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
