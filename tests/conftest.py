"""Strict test configuration: CPU only, float32 matmuls, NaN checks, fixed hypothesis profile."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_debug_nans", False)

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=40, print_blob=True)
settings.load_profile("ci")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow")
    on_gpu = os.environ.get("JAX_PLATFORMS", "") != "cpu" and _has_gpu()
    skip_slow = pytest.mark.skipif(not run_slow, reason="slow: pass --run-slow")
    skip_gpu = pytest.mark.skipif(not on_gpu, reason="needs an NVIDIA GPU (set JAX_PLATFORMS=cuda)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
