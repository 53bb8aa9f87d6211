"""Which implementation runs each piece of the sparse product (`sste_jax.sparse_dense`), decided in one place.

`resolve` gives the prune (forward weight), MVUE, forward-product, weight-gradient-product and operand-emit
functions that ``config.backend`` and ``config.matmul`` choose on a platform; ``None`` means the core's
pure-JAX code (`sste_jax.forward_weight`'s XLA path, a dense or FP8 ``dot_general``). The kernels
(`sste_jax.kernels`, which import Pallas) are imported only when chosen. ``backend="auto"`` reads `FASTER`,
measured by ``benchmarks/bench_kernels.py`` (raw output in ``benchmarks/results/``, docs/kernels.md); a
platform missing from it uses XLA.

>>> import sste_jax
>>> ops = resolve(sste_jax.SparsityConfig(backend="pallas"), "cpu")
>>> ops.prune.__name__, ops.forward is None
('pallas_forward_weight', True)
"""

from collections.abc import Callable
from typing import NamedTuple

import jax

from sste_jax._config import SparsityConfig
from sste_jax._sparsity import mvue_24

__all__ = ["Ops", "resolve", "resolve_backend", "FASTER"]

# cpu: the Pallas kernels only run interpreted there (~5x slower than XLA at 256x512).
# gpu (H100, benchmarks/results/*_NVIDIA-H100-80GB-HBM3_run3/4): the kernels alone beat XLA (prune
# 1.9x, MVUE 1.6x), but inside sparse_dense the extra decompress pass costs more: S-STE FFN
# fwd+bwd 0.838-0.874 ms with Pallas vs 0.754-0.773 ms with XLA; GPT-2 124M step within noise.
FASTER = {"cpu": "xla", "gpu": "xla"}

_GEMMS = {"cusparselt": "cuSPARSELt", "cutlass": "CUTLASS sm90"}


class Ops(NamedTuple):
    """The pieces of one sparse product.

    Attributes:
      prune: ``prune(kernel_IxO, beta, method) -> W̃`` (2-D kernels, groups along axis 0).
      mvue: ``mvue(key, g_TxO) -> ĝ``.
      forward: ``forward(x_TxI, w_IxO, fp8, dtype[, operands]) -> y``.
      weight_grad: ``weight_grad(x_TxI, g_hat_TxO, fp8, dtype) -> dW``.
      emit: ``emit(w_IxO, fp8) -> operands``, the forward GEMM's operands from ``W̃`` (which ``forward``
        then takes); None where the forward product takes ``W̃`` as is.

    A piece that is None runs the core's pure-JAX code.

    >>> import sste_jax
    >>> resolve(sste_jax.SparsityConfig(), "cpu").weight_grad is None
    True
    """

    prune: Callable | None
    mvue: Callable
    forward: Callable | None
    weight_grad: Callable | None
    emit: Callable | None = None


def resolve_backend(backend: str, platform: str | None = None) -> str:
    """``"xla"`` or ``"pallas"``: ``backend`` itself, or for ``"auto"`` the measured winner on ``platform``.

    >>> resolve_backend("auto", "cpu")
    'xla'
    """
    if backend != "auto":
        return backend
    return FASTER.get(platform or jax.default_backend(), "xla")


def resolve(config: SparsityConfig, platform: str | None = None, products: bool = True) -> Ops:
    """The `Ops` of ``config`` on ``platform`` (default: JAX's default backend).

    With ``products=False`` (computing a forward weight alone) the two products are left ``None`` and any
    platform serves; otherwise this raises `RuntimeError` for ``matmul="cusparselt"`` or ``"cutlass"`` off an
    NVIDIA GPU. The weight-gradient product is sparse only with ``mvue`` (its operand ``ĝ`` is then 2:4 along
    tokens); cuSPARSELt has no e5m2 operands, so with ``fp8`` its weight gradient stays on the dense FP8 product.

    >>> import sste_jax
    >>> resolve(sste_jax.SparsityConfig(), "cpu").mvue.__name__
    'mvue_24'
    """
    platform = platform or jax.default_backend()
    prune, mvue = None, mvue_24
    if config.is_24 and resolve_backend(config.backend, platform) == "pallas":
        from sste_jax.kernels._mvue import pallas_mvue
        from sste_jax.kernels._prune import pallas_forward_weight

        prune, mvue = pallas_forward_weight, pallas_mvue
    forward = weight_grad = emit = None
    if products and config.matmul != "xla":
        if platform not in ("gpu", "cuda"):
            raise RuntimeError(
                f"SparsityConfig(matmul={config.matmul!r}) runs {_GEMMS[config.matmul]} 2:4 sparse GEMMs on an "
                f"NVIDIA Hopper GPU; JAX's backend here is {platform!r}. Use matmul='xla' on this platform"
            )
        from sste_jax.kernels import _products

        forward = getattr(_products, f"{config.matmul}_forward")
        weight_grad = getattr(_products, f"{config.matmul}_weight_grad")
        emit = _products.cutlass_emit if config.matmul == "cutlass" else None
        if not config.mvue or (config.fp8 and config.matmul == "cusparselt"):
            weight_grad = None
    return Ops(prune=prune, mvue=mvue, forward=forward, weight_grad=weight_grad, emit=emit)
