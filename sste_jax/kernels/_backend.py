"""Which implementation `sste_jax.sparse_dense` uses for each of its four pieces, resolved in one place.

``resolve(config, platform)`` gives the prune (forward weight), MVUE, forward-product and weight-gradient
product functions that ``config.backend`` and ``config.matmul`` choose; ``None`` means the core's pure-JAX
code (`sste_jax.forward_weight`'s XLA path, a dense or FP8 ``dot_general``). The GEMM backends need an
NVIDIA GPU and raise here, naming it, on any other platform.

>>> import sste_jax
>>> from sste_jax.kernels._backend import resolve
>>> ops = resolve(sste_jax.SparsityConfig(backend="pallas"), "cpu")
>>> ops.prune.__name__, ops.forward is None
('pallas_forward_weight', True)
"""

from collections.abc import Callable
from typing import NamedTuple

import jax

from sste_jax._sparsity import mvue_24
from sste_jax.kernels import _auto, _dispatch

__all__ = ["Ops", "resolve"]

_GEMMS = {
    "cusparselt": ("cuSPARSELt", _dispatch.cusparselt_forward, _dispatch.cusparselt_weight_grad),
    "cutlass": ("CUTLASS sm90", _dispatch.cutlass_forward, _dispatch.cutlass_weight_grad),
}


class Ops(NamedTuple):
    """The pieces of the sparse product: ``prune(kernel_IxO, beta, method) -> W̃`` (2-D kernels, groups along
    axis 0), ``mvue(key, g_TxO) -> ĝ``, ``forward(x_TxI, w_IxO, fp8, dtype[, operands]) -> y``,
    ``weight_grad(x_TxI, g_hat_TxO, fp8, dtype) -> dW`` and ``emit(w_IxO, fp8) -> operands`` (the forward
    GEMM's operands from ``W̃``, which ``forward`` then takes); ``None`` where the core's pure-JAX code runs
    (or, for ``emit``, where the forward product takes ``W̃`` as is)."""

    prune: Callable | None
    mvue: Callable
    forward: Callable | None
    weight_grad: Callable | None
    emit: Callable | None = None


def resolve(config, platform: str | None = None, products: bool = True) -> Ops:
    """The `Ops` of ``config`` (a `sste_jax.SparsityConfig`) on ``platform`` (default: JAX's default backend).

    With ``products=False`` (computing a forward weight alone) the two products are left ``None`` and any
    platform serves; otherwise this raises `RuntimeError` for ``matmul="cusparselt"`` or ``"cutlass"`` off an
    NVIDIA GPU. The weight-gradient product is sparse only with ``mvue`` (its operand ``ĝ`` is then 2:4 along
    tokens); cuSPARSELt has no e5m2 operands, so with ``fp8`` its weight gradient stays on the dense FP8 product.

    >>> import sste_jax
    >>> from sste_jax.kernels._backend import resolve
    >>> resolve(sste_jax.SparsityConfig(), "cpu").mvue.__name__
    'mvue_24'
    """
    platform = platform or jax.default_backend()
    pallas = config.is_24 and _auto.resolve_backend(config.backend, platform) == "pallas"
    forward = weight_grad = emit = None
    if products and config.matmul == "cutlass":
        emit = _dispatch.cutlass_emit
    if products and config.matmul != "xla":
        name, forward, weight_grad = _GEMMS[config.matmul]
        if platform not in ("gpu", "cuda"):
            raise RuntimeError(
                f"SparsityConfig(matmul={config.matmul!r}) runs {name} 2:4 sparse GEMMs on an NVIDIA Hopper GPU; "
                f"JAX's backend here is {platform!r}. Use matmul='xla' on this platform"
            )
        if not config.mvue or (config.fp8 and config.matmul == "cusparselt"):
            weight_grad = None
    return Ops(
        prune=_dispatch.pallas_forward_weight if pallas else None,
        mvue=_dispatch.pallas_mvue if pallas else mvue_24,
        forward=forward,
        weight_grad=weight_grad,
        emit=emit,
    )
