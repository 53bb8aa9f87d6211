"""Optax transforms: `freeze_beta` and the baselines' extra gradient terms.

The rules are in ``docs/algorithm.md#beta-and-the-optimizer`` and ``docs/algorithm.md#baselines``.

* `freeze_beta(inner)`: β leaves get a zero update and no optimizer state, whatever ``inner`` is.
* `add_srste_decay(mask, decay)`: SR-STE's ``λ·(1 − mask_24(W))⊙W`` added to the gradient of the
  selected kernels: the term ``SparsityConfig(method="srste")`` layers add in their backward pass,
  for ``method="ste"`` layers (select them with ``sste_jax.optim.sparse_kernel_mask(model, methods=("ste",))``).
* `add_masked_decay(decay)`: T-SR-STE's ``α·(1 − M)⊙W`` with ``M`` the forward mask of each ``"tsrste"``
  layer, which the layer owns (`sste_jax.nnx.refresh_masks` refreshes it) and the update is given
  (``masks=sste_jax.optim.forward_masks(model)``). Chain it after the gradient clipping, as T-SR-STE's
  authors do.

>>> import jax.numpy as jnp, optax, sste_jax
>>> params = {"fc": {"kernel": jnp.ones((4, 4)), "beta": jnp.float32(1.5)}}
>>> tx = sste_jax.freeze_beta(optax.adam(0.1))
>>> updates, _ = tx.update(params, tx.init(params), params)
>>> float(updates["fc"]["beta"]), round(float(updates["fc"]["kernel"][0, 0]), 4)
(0.0, -0.1)
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Int

from sste_jax._decay import masked_decay_term, srste_term

__all__ = ["freeze_beta", "is_beta", "add_srste_decay", "add_masked_decay", "AddMaskedDecayState"]

Predicate = Callable[[tuple[Any, ...], Any], bool]


def key_name(key) -> Any:
    """The plain name (dict key, attribute name or index) of one key-path entry."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def is_beta(path: tuple[Any, ...], leaf: Any) -> bool:
    """The default β rule: the last key is ``"beta"`` (NNX `SparseLinear` states) or the first key is
    ``"sparsity"`` (the Linen collection). ``path`` holds plain names (strings and indices).

    >>> import sste_jax
    >>> sste_jax.optim.is_beta(("fc", "beta"), 1.5), sste_jax.optim.is_beta(("fc", "kernel"), 1.5)
    (True, False)
    """
    return bool(path) and (path[-1] == "beta" or path[0] == "sparsity")


def _is_variable(x) -> bool:
    return hasattr(type(x), "get_metadata") and hasattr(x, "get_value")  # an nnx.Variable (no Flax import)


def _labels(params, is_frozen: Predicate):
    """``"frozen"`` / ``"train"`` per leaf; at init (typed NNX variables) also checks the rule."""
    def label(key_path, leaf):
        path = tuple(key_name(k) for k in key_path)
        where = "/".join(map(str, path))
        frozen = bool(is_frozen(path, leaf))
        if _is_variable(leaf):
            beta = getattr(type(leaf), "sste_frozen", False)
            if beta and not frozen:
                raise ValueError(f"freeze_beta: the β variable at {where} is not selected by is_frozen")
            if frozen and not beta and is_frozen is is_beta:
                raise ValueError(
                    f"freeze_beta: {where} is a {type(leaf).__name__}, not a SparsityBeta, "
                    "but is named like one; pass is_frozen= to say which leaves to freeze"
                )
        return "frozen" if frozen else "train"

    return jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_variable)


def freeze_beta(
    inner: optax.GradientTransformation, is_frozen: Predicate = is_beta
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that β leaves get a zero update and no optimizer state.

    Works for NNX states (``nnx.Optimizer(model, tx, wrt=...)`` with any filter: β leaves are the
    `SparsityBeta` variables, named ``beta``) and Linen variable dicts (the ``"sparsity"``
    collection), whatever ``inner`` does (weight decay and its mask included: ``inner`` only sees
    the other leaves). ``is_frozen(path, leaf)`` replaces the rule `is_beta`; ``path`` is a tuple of
    names. With typed NNX variables a `SparsityBeta` the rule misses, or a differently typed leaf
    the default rule would freeze, raises at ``init``.

    >>> import jax.numpy as jnp, optax, sste_jax
    >>> params = {"fc": {"kernel": jnp.ones((4, 4)), "beta": jnp.float32(1.5)}}
    >>> tx = sste_jax.freeze_beta(optax.adamw(0.1))
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> float(updates["fc"]["beta"])
    0.0
    """
    return optax.multi_transform(
        {"frozen": optax.set_to_zero(), "train": inner}, lambda params: _labels(params, is_frozen)
    )


def _check_kernel(w: jax.Array) -> None:
    if w.ndim != 2:
        raise ValueError(f"the decay applies to 2-D kernels (in, out); got a leaf of shape {w.shape}: fix the mask")


def _srste_term(decay: float) -> optax.GradientTransformation:
    def init_fn(params):
        del params
        return optax.EmptyState()  # SR-STE's term depends on the current weights only

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_srste_decay needs params: call update(updates, state, params)")

        def add(g, w):
            _check_kernel(w)
            return (g + srste_term(w, decay)).astype(g.dtype)

        return jax.tree.map(add, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def add_srste_decay(mask: Any, decay: float = 2e-4) -> optax.GradientTransformationExtraArgs:
    """Adds SR-STE's ``decay·(1 − mask_24(W))⊙W`` to the gradient of the kernels selected by ``mask``.

    ``mask`` is a boolean pytree like the params, or a callable returning one (as in
    ``optax.masked``), e.g. ``sste_jax.optim.sparse_kernel_mask(model)``. Chain it before the
    optimizer: ``optax.chain(add_srste_decay(mask), optax.adamw(...))``. Select ``method="ste"``
    layers only: ``SparsityConfig(method="srste")`` layers add the same term in their backward pass.

    >>> import jax.numpy as jnp, optax, sste_jax
    >>> params = {"kernel": jnp.array([[4.0], [3.0], [2.0], [1.0]])}
    >>> tx = sste_jax.optim.add_srste_decay({"kernel": True}, decay=0.5)
    >>> zero = {"kernel": jnp.zeros((4, 1))}
    >>> tx.update(zero, tx.init(params), params)[0]["kernel"].ravel().tolist()  # decays the pruned 2 and 1
    [0.0, 0.0, 1.0, 0.5]
    """
    if decay < 0:
        raise ValueError(f"decay must be >= 0, got {decay}")
    return optax.with_extra_args_support(optax.masked(_srste_term(decay), mask))


class AddMaskedDecayState(NamedTuple):
    """T-SR-STE's masked decay: the update count, which a ``decay`` schedule reads.

    >>> import jax.numpy as jnp, sste_jax
    >>> tx = sste_jax.optim.add_masked_decay()
    >>> state = tx.init({"kernel": jnp.ones((4, 4))})
    >>> type(state).__name__, int(state.count)
    ('AddMaskedDecayState', 0)
    """

    count: Int[Array, ""]


def add_masked_decay(decay: optax.ScalarOrSchedule = 6e-5) -> optax.GradientTransformationExtraArgs:
    """Adds T-SR-STE's masked decay ``decay·(1 − M)⊙W`` to the gradient of every weight whose forward mask ``M``
    the update is given.

    The masks are the layers' own: a ``"tsrste"`` `sste_jax.nnx.SparseLinear` keeps its transposable mask
    (`sste_jax.nnx.SparsityMask`, refreshed by `sste_jax.nnx.refresh_masks`, every 40 steps in the baseline),
    and each update reads the one the forward pass used, passed as the extra argument ``masks``: a tree like
    ``params`` (or a prefix of it) holding a weight's boolean mask where the decay applies and None elsewhere,
    as `sste_jax.optim.forward_masks` builds it:
    ``tx.update(grads, state, params, masks=sste_jax.optim.forward_masks(model))``, or
    ``optimizer.update(model, grads, masks=...)`` with an ``nnx.Optimizer``. ``decay`` may be a schedule of the
    update count (e.g. 0 during a dense finish). Chain it after `optax.clip_by_global_norm` and before the
    optimizer, as T-SR-STE's authors:
    ``optax.chain(optax.clip_by_global_norm(1.0), add_masked_decay(), optax.adamw(...))``.

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> params = {"kernel": jax.random.normal(jax.random.key(0), (8, 8)), "bias": jnp.ones(8)}
    >>> masks = {"kernel": sste_jax.transposable_mask_24(params["kernel"]), "bias": None}
    >>> tx = sste_jax.optim.add_masked_decay(decay=1.0)
    >>> zeros = jax.tree.map(jnp.zeros_like, params)
    >>> updates, state = tx.update(zeros, tx.init(params), params, masks=masks)
    >>> int((updates["kernel"] == 0).sum()), float(updates["bias"].sum())  # the kept half of W gets no decay
    (32, 0.0)
    """
    if not callable(decay) and decay < 0:
        raise ValueError(f"decay must be >= 0, got {decay}")

    def init_fn(params):
        del params
        return AddMaskedDecayState(jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, *, masks=None, **extra_args):
        del extra_args
        if params is None or masks is None:
            raise ValueError(
                "add_masked_decay needs params and the layers' forward masks: call "
                "update(updates, state, params, masks=sste_jax.optim.forward_masks(model))"
            )
        alpha = decay(state.count) if callable(decay) else decay

        def add(m: Bool[Array, "in out"] | None, g, w):
            if m is None:
                return g

            def one(g, w):
                if w.shape != m.shape:
                    raise ValueError(f"add_masked_decay: a mask of shape {m.shape} for a weight of shape {w.shape}")
                return (g + masked_decay_term(w, m, alpha)).astype(g.dtype)

            return jax.tree.map(one, g, w)  # g and w: the weight's array, or the variable holding it

        updates = jax.tree.map(add, masks, updates, params, is_leaf=lambda x: x is None)
        return updates, AddMaskedDecayState(optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
