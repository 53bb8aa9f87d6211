"""S-STE for any JAX model, as a transform of its parameter pytree (no layer swapping).

``spec = sparsity_spec(params, where, config)`` picks the leaves to sparsify and, per leaf, its
contraction axis and frozen β (fitted now); ``apply_sparsity(params, spec)`` returns the params with
those leaves replaced by their forward weight ``W̃`` (``docs/algorithm.md#sparse-linear-transform``),
through a ``jax.custom_vjp`` whose gradient is straight through (SR-STE's decay added for
``"srste"``). The spec is a flat dict ``{"a/b/kernel": ParamSparsity}``: a pytree whose only array
leaves are the β's, named ``beta``, so `sste_jax.freeze_beta`, optax and `sste_jax.checkpoint` treat
it like the layer path's β.

MVUE (``mvue=True``), FP8 products and sparse matmul kernels act on the product ``x @ W̃`` itself;
a parameter transform never sees its output gradient, so they need the layer path.

>>> import jax, jax.numpy as jnp, sste_jax
>>> params = {"mlp": {"c_fc": {"kernel": jax.random.normal(jax.random.key(0), (16, 8))}}}  # (out, in)
>>> spec = sste_jax.sparsity_spec(params, where=sste_jax.select_kernels(axis=1))
>>> list(spec), spec["mlp/c_fc/kernel"].axis
(['mlp/c_fc/kernel'], 1)
>>> w = sste_jax.apply_sparsity(params, spec)["mlp"]["c_fc"]["kernel"]
>>> int((w.reshape(16, 2, 4) != 0).sum(-1).max())
2
"""

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike, Real

from sste_jax._decay import srste_term
from sste_jax._linear import SparsityConfig, check_config, forward_weight
from sste_jax._metrics import SparseWeight
from sste_jax._optim import key_name
from sste_jax._sparsity import initial_beta

__all__ = [
    "ParamSparsity",
    "sparsity_spec",
    "apply_sparsity",
    "spec_weights",
    "select_kernels",
    "select_paths",
    "einsum_axis",
]

Path = tuple[Any, ...]
Where = Callable[[Path, Any], int | None]


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["beta"], meta_fields=["axis", "config", "shape"]
)
@dataclasses.dataclass(frozen=True)
class ParamSparsity:
    """How one parameter leaf is sparsified: its frozen ``beta``, grouped ``axis`` (static), ``config``
    and the ``shape`` of the leaf it was made for (checked by `apply_sparsity`; None: not checked).

    >>> import jax, sste_jax
    >>> params = {"fc": {"kernel": jax.random.normal(jax.random.key(0), (16, 8))}}
    >>> s = sste_jax.sparsity_spec(params, where=sste_jax.select_kernels())["fc/kernel"]
    >>> s.axis, s.config.method, s.shape
    (0, 'sste', (16, 8))
    """

    beta: Any  # the frozen β, a float32 scalar; any leaf while a tree transform maps the spec
    axis: int
    config: SparsityConfig
    shape: tuple[int, ...] | None = None


def _names(key_path) -> Path:
    """Plain names (strings, indices) of a key path, as `sste_jax.optim.is_beta` sees them."""
    return tuple(key_name(k) for k in key_path)


def _path_str(path: Path) -> str:
    return "/".join(str(p) for p in path)


def _check_config(config: SparsityConfig) -> None:
    check_config(config, "sparsity_spec")
    layer_only = [f for f, on in (("mvue=True", config.mvue), ("fp8=True", config.fp8)) if on]
    if config.matmul != "xla":
        layer_only.append(f"matmul={config.matmul!r}")
    if config.method == "tsrste":
        raise ValueError(
            "method='tsrste' needs a mask refreshed between steps: use sste_jax.nnx.SparseLinear layers, or "
            "method='ste' with sste_jax.add_masked_decay on the parameter path"
        )
    if layer_only:
        raise ValueError(
            f"{', '.join(layer_only)} act on the product x @ W̃, which a parameter transform does not see; "
            "use the layer path (sste_jax.sparse_dense, sste_jax.linen / sste_jax.nnx) for those layers"
        )


def sparsity_spec(
    params: Any, where: Where, config: SparsityConfig = SparsityConfig(), *, beta: Real[ArrayLike, ""] | None = None
) -> dict[str, ParamSparsity]:
    """The spec of the leaves of ``params`` that ``where`` selects, β fitted to their current values.

    ``where(path, leaf)`` gets a leaf's path (a tuple of dict keys / attribute names / indices) and
    the leaf, and returns the leaf's contraction axis (the 2:4 groups run along it) or ``None`` to
    leave it dense; see `select_kernels`, `select_paths`. β is ``fit_beta(leaf, axis)`` for
    ``"sste"`` (or ``beta`` if given) and 1.0 for the other methods (which ignore it). Raises,
    naming every offending leaf, if a selected leaf is not a floating array, its axis is out of
    range, its length along the axis is not divisible by 4 or its β cannot be fitted (all zero,
    non-finite); and if nothing is selected. Merge specs made with different
    configs with ``{**spec_a, **spec_b}``.

    >>> import jax, sste_jax
    >>> params = {"attn": {"kernel": jax.random.normal(jax.random.key(0), (16, 16))},
    ...           "mlp": {"kernel": jax.random.normal(jax.random.key(1), (16, 64))}}
    >>> spec = sste_jax.sparsity_spec(params, where=sste_jax.select_kernels(path="mlp"))
    >>> list(spec), round(float(spec["mlp/kernel"].beta), 1)
    (['mlp/kernel'], 1.5)
    """
    _check_config(config)
    spec, problems, paths = {}, [], []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = _names(key_path)
        name = _path_str(path)
        paths.append(name)
        axis = where(path, leaf)
        if axis is None:
            continue
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"where must return an int axis or None; got {axis!r} for {name}")
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if shape is None or not jnp.issubdtype(dtype, jnp.floating):
            problems.append(f"{name}: not a floating array ({type(leaf).__name__} {dtype})")
        elif not -len(shape) <= axis < len(shape):
            problems.append(f"{name}: axis {axis} is out of range for shape {shape}")
        elif shape[axis] % config.m:
            problems.append(
                f"{name}: length {shape[axis]} of axis {axis % len(shape)} in shape {shape} is not divisible "
                f"by {config.m}"
            )
        elif name in spec:
            problems.append(f"{name}: two leaves have this path name")
        else:
            axis %= len(shape)
            try:
                b = (initial_beta(leaf, axis, name, beta, n=config.n, m=config.m) if config.method == "sste"
                     else jnp.ones((), jnp.float32))
            except ValueError as e:
                problems.append(str(e))
                continue
            spec[name] = ParamSparsity(b, axis, config, tuple(shape))
    if problems:
        raise ValueError(
            "cannot sparsify the leaves selected by `where`:\n  " + "\n  ".join(problems)
            + "\nleave them dense (return None from `where`, or narrow its path pattern)"
        )
    if not spec:
        raise ValueError(f"`where` selected no leaf; the leaves are {paths[:12]}{' ...' if len(paths) > 12 else ''}")
    return spec


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sparsify(config, axis, kernel, beta):
    return forward_weight(kernel, beta, config, axis)


def _sparsify_fwd(config, axis, kernel, beta):
    return forward_weight(kernel, beta, config, axis), (kernel if config.method == "srste" else None, beta)


def _sparsify_bwd(config, axis, residuals, g):
    kernel, beta = residuals
    if config.method == "srste":
        g = g + srste_term(kernel, config.srste_decay, axis, n=config.n, m=config.m)
    return g, jnp.zeros_like(beta)


_sparsify.defvjp(_sparsify_fwd, _sparsify_bwd)


def _matched(params: Any, spec: Mapping[str, ParamSparsity], fn: Callable[[str, Any, ParamSparsity], Any]) -> Any:
    """``params`` with ``fn(name, leaf, spec[name])`` at each spec'd leaf; raises on spec entries not found."""
    if not isinstance(spec, Mapping) or not all(isinstance(s, ParamSparsity) for s in spec.values()):
        raise TypeError("spec must be the dict returned by sste_jax.sparsity_spec")
    found = set()

    def one(key_path, leaf):
        name = _path_str(_names(key_path))
        if name not in spec:
            return leaf
        s = spec[name]
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) <= s.axis or shape[s.axis] % 4 or (s.shape is not None and shape != tuple(s.shape)):
            made = f", made for shape {tuple(s.shape)}" if s.shape is not None else ""
            raise ValueError(
                f"{name}: leaf of shape {shape} does not match its spec (2:4 groups along axis {s.axis}{made}); "
                "build the spec from these params"
            )
        found.add(name)
        return fn(name, leaf, s)

    out = jax.tree_util.tree_map_with_path(one, params)
    missing = sorted(set(spec) - found)
    if missing:
        more = " ..." if len(missing) > 8 else ""
        raise ValueError(f"the spec names leaves that params do not have: {missing[:8]}{more}")
    return out


def apply_sparsity(params: Any, spec: Mapping[str, ParamSparsity]) -> Any:
    """``params`` with every spec'd leaf ``W`` replaced by its forward weight ``W̃``
    (``docs/algorithm.md#sparse-linear-transform``).

    Differentiable: the gradient reaching ``W`` is ``∂L/∂W̃`` (plus ``λ·(1 − mask_24(W))⊙W`` for
    ``"srste"``) and β gets zero, so ``loss(apply_fn(apply_sparsity(params, spec), x))`` trains with
    S-STE. Other leaves pass through unchanged.

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> params = {"fc": {"kernel": jax.random.normal(jax.random.key(0), (16, 8))}}
    >>> spec = sste_jax.sparsity_spec(params, where=sste_jax.select_kernels())
    >>> loss = lambda p: jnp.sum(jnp.ones((2, 16)) @ sste_jax.apply_sparsity(p, spec)["fc"]["kernel"])
    >>> grads = jax.grad(loss)(params)  # straight through: dense, no mask
    >>> bool((grads["fc"]["kernel"] == 2.0).all())
    True
    """
    return _matched(params, spec, lambda name, leaf, s: _sparsify(s.config, s.axis, leaf, s.beta))


def spec_weights(params: Any, spec: Mapping[str, ParamSparsity]) -> dict[str, SparseWeight]:
    """``{path: SparseWeight}`` of the spec'd leaves, for `sste_jax.flip_rate` / `sste_jax.sparsity_stats`.

    >>> import jax, sste_jax
    >>> params = {"fc": {"kernel": jax.random.normal(jax.random.key(0), (16, 8))}}
    >>> spec = sste_jax.sparsity_spec(params, where=sste_jax.select_kernels())
    >>> stats = sste_jax.metrics.to_host(sste_jax.sparsity_stats(sste_jax.spec_weights(params, spec)))
    >>> stats["zero_fraction/fc/kernel"]
    0.5
    """
    weights = {}

    def collect(name, leaf, s):
        weights[name] = SparseWeight(leaf, s.beta, s.config, s.axis)
        return leaf

    _matched(params, spec, collect)
    return weights


def select_kernels(axis: int = 0, *, name: str = "kernel", ndim: int | None = 2, path: str | None = None) -> Where:
    """Selects leaves whose last key is ``name``, with ``ndim`` dimensions (any if None), grouped along ``axis``.

    ``path`` (a regex, `re.search` on the ``"a/b/c"`` path) narrows the choice, e.g. ``r"mlp|ffn"`` for
    the feed-forward layers only. Flax ``(in, out)`` kernels: ``axis=0`` (the default; ``axis=-2``
    with ``ndim=3`` for scanned layers); PyTorch-style ``(out, in)`` kernels applied as ``x @ W.T``
    (e.g. Hugging Face's Flax GPT-2 ``c_fc``): ``axis=1``.

    >>> import jax.numpy as jnp, sste_jax
    >>> where = sste_jax.select_kernels(axis=1, path="mlp")
    >>> where(("mlp", "kernel"), jnp.ones((8, 16))), where(("attn", "kernel"), jnp.ones((8, 16)))
    (1, None)
    """
    pattern = None if path is None else re.compile(path)

    def where(p: Path, leaf: Any) -> int | None:
        if not p or p[-1] != name or (ndim is not None and getattr(leaf, "ndim", None) != ndim):
            return None
        return axis if pattern is None or pattern.search(_path_str(p)) else None

    return where


def select_paths(patterns: Mapping[str, int]) -> Where:
    """Selects leaves by path: the first regex of ``patterns`` that `re.search` finds in the ``"a/b/c"``
    path gives the leaf's axis; leaves matching none stay dense. For einsum kernels, whose
    contraction axis depends on the equation: ``{r"mlp/gating_einsum": einsum_axis("BTD,GDF->GBTF")}``.

    >>> import jax.numpy as jnp, sste_jax
    >>> where = sste_jax.select_paths({r"mlp/gating": sste_jax.einsum_axis("BTD,GDF->GBTF")})
    >>> where(("mlp", "gating"), jnp.ones((2, 16, 64))), where(("attn", "q"), jnp.ones((16, 16)))
    (1, None)
    """
    compiled = [(re.compile(p), a) for p, a in patterns.items()]

    def where(p: Path, leaf: Any) -> int | None:
        name = _path_str(p)
        return next((a for pattern, a in compiled if pattern.search(name)), None)

    return where


def einsum_axis(equation: str, operand: int = 1) -> int:
    """The contraction axis of the weight ``operand`` (default the second) of a two-operand einsum.

    >>> einsum_axis("BTD,NDH->BTNH")
    1
    """
    eq = equation.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        raise ValueError(f"einsum_axis needs an explicit two-operand equation 'ab,bc->ac'; got {equation!r}")
    inputs, output = eq.split("->")
    terms = inputs.split(",")
    if operand not in (0, 1):
        raise ValueError(f"operand must be 0 or 1, got {operand}")
    weight, other = terms[operand], terms[1 - operand]
    if "." in weight:
        raise ValueError(f"the weight operand {weight!r} of {equation!r} has an ellipsis; give its axis explicitly")
    contracted = [i for i, c in enumerate(weight) if c in other and c not in output]
    if len(contracted) != 1:
        raise ValueError(
            f"the weight operand {weight!r} of {equation!r} contracts {len(contracted)} axes {contracted}; "
            "einsum_axis needs exactly one: give the axis explicitly"
        )
    return contracted[0]
