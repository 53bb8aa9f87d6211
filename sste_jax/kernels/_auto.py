"""Which pruning backend ``SparsityConfig(backend="auto")`` uses on each platform, from measurements.

Source: ``benchmarks/bench_kernels.py`` (raw output in ``benchmarks/results/``; see docs/kernels.md).
A platform missing from the table, or one where Pallas cannot lower, uses XLA.

>>> from sste_jax.kernels._auto import resolve_backend
>>> resolve_backend("auto", "cpu")
'xla'
"""

import jax

__all__ = ["FASTER", "resolve_backend"]

# cpu: the Pallas kernels only run interpreted there (~5x slower than XLA at 256x512).
# gpu (H100, benchmarks/results/*_NVIDIA-H100-80GB-HBM3_run3/4): the kernels alone beat XLA (prune
# 1.9x, MVUE 1.6x), but inside sparse_dense the extra decompress pass costs more: S-STE FFN
# fwd+bwd 0.838-0.874 ms with Pallas vs 0.754-0.773 ms with XLA; GPT-2 124M step within noise.
FASTER = {"cpu": "xla", "gpu": "xla"}


def resolve_backend(backend: str, platform: str | None = None) -> str:
    """``"xla"`` or ``"pallas"``: ``backend`` itself, or for ``"auto"`` the measured winner on ``platform``."""
    if backend != "auto":
        return backend
    return FASTER.get(platform or jax.default_backend(), "xla")
