"""The S-STE product for any ``dot_general`` or two-operand ``einsum`` whose one operand is a weight.

The 2:4 groups run along the weight's contraction axis, read from the op itself; the product is
`sste_jax.sparse_dense` (forward ``β·S(W)``, straight-through gradient, MVUE over tokens, FP8) on the
operands moved to ``(tokens, in) @ (in, out)`` and the result moved back to the op's layout.

>>> import jax, jax.numpy as jnp, sste_jax
>>> w_OxI = jax.random.normal(jax.random.key(0), (3, 8))  # an (out, in) weight, used as x @ w.T
>>> y = sste_jax.sparse_einsum("bi,oi->bo", jnp.ones((5, 8)), w_OxI, weight=1, beta=1.0)
>>> y.shape
(5, 3)
"""

import string
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from sste_jax._linear import FORWARD_WEIGHT, SparsityConfig, sparse_dense
from sste_jax._sparsity import initial_beta

__all__ = ["sparse_dot_general", "sparse_einsum", "weight_axis", "einsum_weight_axis", "remat_policy"]


def weight_axis(dimension_numbers, weight: int, name: str = "the product") -> int:
    """The weight operand's one contraction axis in ``dimension_numbers``; raises naming ``name`` when the
    weight has batch dimensions or several contraction axes (no single 2:4 axis)."""
    (contract_l, contract_r), (batch_l, batch_r) = dimension_numbers
    contract, batch = (contract_l, batch_l) if weight == 0 else (contract_r, batch_r)
    if len(batch):
        raise ValueError(f"{name}: the weight operand has batch dimensions {tuple(batch)}; it cannot be 2:4 sparse")
    if len(contract) != 1:
        raise ValueError(
            f"{name}: the weight operand contracts {len(contract)} axes {tuple(contract)}; 2:4 groups need exactly one"
        )
    return int(contract[0])


LAYOUT_PRESERVING = frozenset({"convert_element_type", "copy", "copy_p", "sharding_constraint", "reduce_precision"})
"""Primitives between a parameter and its product that keep its axes (besides ``transpose``)."""


def operand_beta(w: Array, axis: int, config: SparsityConfig, name: str) -> Float[Array, ""]:
    """The frozen β of a weight operand with 2:4 groups along ``axis``: `fit_beta` for ``"sste"`` (raising,
    naming ``name``, when it cannot be fitted), 1.0 for the other methods, which ignore it."""
    if config.method != "sste":
        return jnp.ones((), jnp.float32)
    return initial_beta(_to_matrix(jnp.asarray(w), axis), 0, name)


def remat_policy(policy: Callable[..., bool] | None = None) -> Callable[..., bool]:
    """A ``jax.checkpoint`` policy that saves the forward weights ``W̃`` (so a rematerialised layer prunes
    once per step) and whatever ``policy`` saves (nothing if None).

    >>> import jax, sste_jax
    >>> f = jax.checkpoint(lambda x, w: sste_jax.sparse_dense(x, w, 1.0), policy=sste_jax.remat_policy())
    """
    names = jax.checkpoint_policies.save_only_these_names(FORWARD_WEIGHT)
    return names if policy is None else jax.checkpoint_policies.save_from_both_policies(policy, names)


def _to_matrix(w: jax.Array, axis: int) -> jax.Array:
    """``w`` as ``(in, out)``: its contraction ``axis`` first, the other axes (in order) flattened."""
    moved = jnp.moveaxis(w, axis, 0)
    return moved.reshape(moved.shape[0], -1)


def _product(x, x_axis, w, w_axis, beta, key, config):
    """``x·w`` contracted over ``x_axis``/``w_axis``: shape ``(x's other axes, w's other axes)``."""
    x_TxI = jnp.moveaxis(x, x_axis, -1)
    y = sparse_dense(x_TxI, _to_matrix(w, w_axis), beta, key, config)
    w_rest = tuple(d for i, d in enumerate(w.shape) if i != w_axis)
    return y.reshape(x_TxI.shape[:-1] + w_rest)


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
    """``jax.lax.dot_general(lhs, rhs, dimension_numbers)`` with operand ``weight`` (0 or 1) made 2:4
    sparse along its contraction axis, by `sste_jax.sparse_dense`.

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> x, w = jnp.ones((3, 8)), jax.random.normal(jax.random.key(0), (8, 5))
    >>> y = sste_jax.sparse_dot_general(x, w, (((1,), (0,)), ((), ())), weight=1, beta=1.0)
    >>> bool(jnp.allclose(y, x @ sste_jax.soft_threshold_24(w)))
    True
    """
    if weight not in (0, 1):
        raise ValueError(f"{name}: weight must be 0 (lhs) or 1 (rhs), got {weight!r}")
    w_axis = weight_axis(dimension_numbers, weight, name)
    (contract_l, contract_r), _ = dimension_numbers
    x, w = (rhs, lhs) if weight == 0 else (lhs, rhs)
    x_axis = int((contract_r if weight == 0 else contract_l)[0])
    y = _product(jnp.asarray(x), x_axis, jnp.asarray(w), w_axis, beta, key, config)
    if weight == 0:  # dot_general's layout: lhs free axes first
        nx = x.ndim - 1
        y = jnp.moveaxis(y, tuple(range(nx)), tuple(range(y.ndim - nx, y.ndim)))
    return y


def _parse(equation: str, ndims: tuple[int, int]) -> tuple[str, str, str]:
    """``(lhs, rhs, out)`` letter strings of a two-operand einsum, ellipses spelled out."""
    eq = equation.replace(" ", "")
    inputs, arrow, out = eq.partition("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        raise ValueError(f"einsum {equation!r}: the sparse product takes exactly two operands")
    hidden = [nd - len(t.replace("...", "")) if "..." in t else 0 for t, nd in zip(terms, ndims)]
    spare = [c for c in string.ascii_letters if c not in eq]
    fill = "".join(spare[: max(hidden)])  # ellipsis axes broadcast from the right
    terms = [t.replace("...", fill[len(fill) - k:]) for t, k in zip(terms, hidden)]
    if arrow:
        out = out.replace("...", fill)
    else:
        both = terms[0] + terms[1]
        out = fill + "".join(sorted(c for c in set(both) if both.count(c) == 1 and c not in fill))
    for t, nd in zip(terms, ndims):
        if len(t) != nd:
            raise ValueError(f"einsum {equation!r}: operand term {t!r} does not match an operand of {nd} dimensions")
    return terms[0], terms[1], out


def sparse_einsum(
    equation: str,
    lhs: Array,
    rhs: Array,
    *,
    weight: int,
    beta: Float[Array, ""] | float,
    key: PRNGKeyArray | None = None,
    config: SparsityConfig = SparsityConfig(),
    name: str = "einsum",
) -> Array:
    """``jnp.einsum(equation, lhs, rhs)`` with operand ``weight`` (0 or 1) made 2:4 sparse along its
    one contraction axis, by `sste_jax.sparse_dense`. Raises, naming ``name``, when the weight has
    batch letters (kept in the output) or contracts several axes.

    >>> import jax, jax.numpy as jnp, sste_jax
    >>> x, w = jnp.ones((2, 3, 8)), jax.random.normal(jax.random.key(0), (5, 8))  # an (out, in) weight
    >>> y = sste_jax.sparse_einsum("btd,fd->btf", x, w, weight=1, beta=1.0)
    >>> y.shape, bool(jnp.allclose(y, x @ sste_jax.soft_threshold_24(w, axis=1).T))
    ((2, 3, 5), True)
    """
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    x_t, w_t, out, c = einsum_weight_axis(equation, (lhs.ndim, rhs.ndim), weight, name)
    x, w = (rhs, lhs) if weight == 0 else (lhs, rhs)
    y = _product(x, x_t.index(c), w, w_t.index(c), beta, key, config)
    y_t = x_t.replace(c, "") + w_t.replace(c, "")
    return jnp.transpose(y, [y_t.index(ch) for ch in out])


def einsum_weight_axis(equation: str, ndims: tuple[int, int], weight: int, name: str = "einsum"):
    """``(x letters, weight letters, output letters, contracted letter)`` of a two-operand einsum whose
    operand ``weight`` (0 or 1) is the weight; raises, naming ``name``, when the weight has batch letters
    (kept in the output) or does not contract exactly one axis."""
    if weight not in (0, 1):
        raise ValueError(f"{name}: weight must be 0 (lhs) or 1 (rhs), got {weight!r}")
    terms = _parse(equation, ndims)
    x_t, w_t, out = terms[1 - weight], terms[weight], terms[2]
    batch = [c for c in w_t if c in x_t and c in out]
    contract = [c for c in w_t if c in x_t and c not in out]
    summed = [c for c in x_t + w_t if (c in x_t) != (c in w_t) and c not in out]
    if batch:
        raise ValueError(f"{name}: einsum {equation!r} keeps the weight's letters {batch} as batch axes; no 2:4 axis")
    if len(contract) != 1 or summed:
        also = f" and sums {summed}" if summed else ""
        raise ValueError(
            f"{name}: einsum {equation!r} contracts the weight over {contract}{also}; 2:4 groups need exactly one "
            "contraction axis"
        )
    return x_t, w_t, out, contract[0]
