"""The S-STE product for any ``dot_general`` whose one operand is a weight.

The N:M groups run along one of the weight's contraction axes, read from the op itself: the only one,
or with several (an attention output projection ``(heads, head_dim, embed)`` contracting both
``heads`` and ``head_dim``) the innermost unless ``config.group_axis`` names another. The product is
`sste_jax.sparse_dense` (forward ``β·S(W)``, straight-through gradient, MVUE over tokens, FP8) on the
operands moved to ``(tokens, in) @ (in, out)`` and the result moved back to the op's layout.

>>> import jax, jax.numpy as jnp, sste_jax
>>> w_OxI = jax.random.normal(jax.random.key(0), (3, 8))  # an (out, in) weight, used as x @ w.T
>>> y = sste_jax.sparse_dot_general(jnp.ones((5, 8)), w_OxI, (((1,), (1,)), ((), ())), weight=1, beta=1.0)
>>> y.shape
(5, 3)
"""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from sste_jax._config import FORWARD_WEIGHT, SparsityConfig, check_config
from sste_jax._linear import sparse_dense

__all__ = ["sparse_dot_general", "group_axis", "remat_policy"]


def group_axis(dimension_numbers, weight: int, ndim: int, config: SparsityConfig, name: str) -> int:
    """The weight operand's axis that the N:M groups run along: its contraction axis, or among several
    the innermost (``config.group_axis`` picks another). Raises naming ``name`` when there is none, when
    ``config.group_axis`` is not one of them, or when the weight has batch axes."""
    (contract_l, contract_r), (batch_l, batch_r) = dimension_numbers
    contract = tuple(int(a) for a in (contract_l if weight == 0 else contract_r))
    batch = batch_l if weight == 0 else batch_r
    if len(batch):
        raise ValueError(f"{name}: the weight operand has batch dimensions {tuple(batch)}; it cannot be 2:4 sparse")
    if not contract:
        raise ValueError(f"{name}: the product contracts no axis of the weight; nothing to group")
    if config.group_axis is None:
        return max(contract)
    axis = config.group_axis % ndim if -ndim <= config.group_axis < ndim else None
    if axis not in contract:
        raise ValueError(
            f"{name}: SparsityConfig(group_axis={config.group_axis}) is not a contraction axis of this product "
            f"(the weight of {ndim} dimensions contracts axes {contract})"
        )
    return axis


def remat_policy(policy: Callable[..., bool] | None = None) -> Callable[..., bool]:
    """A ``jax.checkpoint`` policy that saves the forward weights ``W̃`` (so a rematerialised layer prunes
    once per step) and whatever ``policy`` saves (nothing if None).

    >>> import jax, sste_jax
    >>> f = jax.checkpoint(lambda x, w: sste_jax.sparse_dense(x, w, 1.0), policy=sste_jax.remat_policy())
    """
    names = jax.checkpoint_policies.save_only_these_names(FORWARD_WEIGHT)
    return names if policy is None else jax.checkpoint_policies.save_from_both_policies(policy, names)


def contract(
    x: Array,
    w: Array,
    x_axes: Sequence[int],
    w_axes: Sequence[int],
    w_group: int,
    beta,
    key,
    config: SparsityConfig,
) -> Array:
    """``x·w`` contracted over the paired ``x_axes``/``w_axes``, the N:M groups along ``w_group`` (one of
    ``w_axes``); shape ``(x's other axes, w's other axes)``."""
    pairs = [(a, b) for a, b in zip(x_axes, w_axes) if b != w_group]
    pairs.append(next((a, b) for a, b in zip(x_axes, w_axes) if b == w_group))  # the grouped axis innermost
    x_contract, w_contract = [a for a, _ in pairs], [b for _, b in pairs]
    x_free = [a for a in range(x.ndim) if a not in x_contract]
    w_free = [a for a in range(w.ndim) if a not in w_contract]
    x_TxI = jnp.transpose(x, x_free + x_contract)
    x_TxI = x_TxI.reshape(x_TxI.shape[: len(x_free)] + (-1,))
    w_moved = jnp.transpose(w, w_contract + w_free)
    w_IxO = w_moved.reshape(x_TxI.shape[-1], -1)
    y = sparse_dense(x_TxI, w_IxO, beta, key, config)
    return y.reshape(x_TxI.shape[:-1] + w_moved.shape[len(w_contract):])


def sparse_dot_general(
    lhs: Array,
    rhs: Array,
    dimension_numbers,
    *,
    weight: int,
    beta: Float[Array, ""] | float,
    key: PRNGKeyArray | None = None,
    config: SparsityConfig = SparsityConfig(),
    name: str = "dot_general",
) -> Array:
    """``jax.lax.dot_general(lhs, rhs, dimension_numbers)`` with operand ``weight`` (0 or 1) made N:M
    sparse along its contraction axis (the innermost of several, or ``config.group_axis``), by
    `sste_jax.sparse_dense`. Raises, naming ``name``, when the weight has batch dimensions.

    Args:
      lhs, rhs: the operands, as ``jax.lax.dot_general`` takes them.
      dimension_numbers: ``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))``.
      weight: which operand is the weight (0 or 1); it may not have batch dimensions.
      beta: the weight's frozen scale.
      key: the MVUE key (``config.mvue`` only).
      config: a `SparsityConfig`.
      name: names the product in errors.

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> x, w = jnp.ones((3, 8)), jax.random.normal(jax.random.key(0), (8, 5))
    >>> y = sste_jax.sparse_dot_general(x, w, (((1,), (0,)), ((), ())), weight=1, beta=1.0)
    >>> bool(jnp.allclose(y, x @ sste_jax.soft_threshold_24(w)))
    True
    """
    check_config(config, name)
    if weight not in (0, 1):
        raise ValueError(f"{name}: weight must be 0 (lhs) or 1 (rhs), got {weight!r}")
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    x, w = (rhs, lhs) if weight == 0 else (lhs, rhs)
    (contract_l, contract_r), _ = dimension_numbers
    w_axes, x_axes = (contract_l, contract_r) if weight == 0 else (contract_r, contract_l)
    g = group_axis(dimension_numbers, weight, w.ndim, config, name)
    y = contract(x, w, [int(a) for a in x_axes], [int(a) for a in w_axes], g, beta, key,
                 _without_group_axis(config))
    if weight == 0:  # dot_general's layout: lhs free axes first
        nx = x.ndim - len(x_axes)
        y = jnp.moveaxis(y, tuple(range(nx)), tuple(range(y.ndim - nx, y.ndim)))
    return y


def _without_group_axis(config: SparsityConfig) -> SparsityConfig:
    """``config`` for the 2-D product, whose groups run along ``in`` once the operands are moved."""
    return config if config.group_axis is None else dataclasses.replace(config, group_axis=None)
