"""Strict test configuration: CPU only, float32 matmuls, runtime-checked annotations, fixed hypothesis profile;
tests marked ``integration`` run with ``--integration``, ``slow`` ones with ``--run-slow``; a persistent compilation
cache shared by the xdist workers and the processes the tests start."""
import os

from experiments.common.cache import cache_dir_default  # the inputs' cache folder: stdlib only

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # xdist workers share a GPU where there is one

# One persistent XLA compilation cache for the suite, shared through the environment by the xdist workers and
# every process a test starts: a rerun compiles nothing it compiled before (the inner loop's main cost). JAX keys
# each entry by the program, the compile options and the jax/jaxlib/XLA versions, so a hit returns the executable
# the same compilation made. Unbounded (JAX's size limit stats every entry on each write): delete the folder
# to reclaim its space.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir_default() / "xla-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import chex  # noqa: E402
import jax  # noqa: E402
import jaxtyping  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Every jaxtyping annotation in the package is checked at run time (shapes and dtypes), as equinox's
# tests do; the hook must be installed before the first import of sste_jax.
jaxtyping.install_import_hook("sste_jax", "beartype.beartype")

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_debug_nans", False)

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=40, print_blob=True)
settings.load_profile("ci")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")
    parser.addoption("--integration", action="store_true",
                     help="run tests marked integration (the README's test command and CI do)")


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    run_slow, integration = config.getoption("--run-slow"), config.getoption("--integration")
    on_gpu = os.environ.get("JAX_PLATFORMS", "") != "cpu" and _has_gpu()
    skip_slow = pytest.mark.skipif(not run_slow, reason="slow: pass --run-slow")
    skip_gpu = pytest.mark.skipif(not on_gpu, reason="needs an NVIDIA GPU (set JAX_PLATFORMS=cuda)")
    skip_integration = pytest.mark.skipif(not integration, reason="integration: pass --integration")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip_integration)
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=[False, True], ids=["with_jit", "without_jit"])
def variant(request):
    """Runs a test twice, as ``chex.variants(with_jit=True, without_jit=True)`` does for TestCases.

    The test wraps the code under test in ``variant(fn, static_argnames=...)``, i.e. `jax.jit`: the
    first run compiles it, the second runs it op by op inside `chex.fake_jit`.
    """
    with chex.fake_jit(enable_patching=request.param):
        yield jax.jit


@pytest.fixture(autouse=True)
def _runtime_type_checks(request):
    """Tests marked ``outside_annotations`` call with arguments the annotations exclude (wrong dtypes,
    shapes, types) to test the library's own error messages, which users see: the runtime type
    checker is off for them."""
    if request.node.get_closest_marker("outside_annotations") is None:
        yield
        return
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)
