"""The documentation (pages and the API reference built from the docstrings) builds without a warning, and
the reference holds every public name."""

import inspect
import pathlib
import subprocess
import sys

import pytest

import sste_jax
import sste_jax.metrics
import sste_jax.nnx
import sste_jax.optim

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_sphinx_build_has_no_warnings(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-E", "-b", "html", "docs", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout}{result.stderr}"
    api = (tmp_path / "api.html").read_text()
    for name in ("sste_jax.soft_threshold_24", "sste_jax.sparsify", "sste_jax.nnx.SparseLinear",
                 "sste_jax.checkpoint.save_checkpoint"):
        assert f'id="{name}"' in api, f"{name} is missing from the API reference"
    for module in (sste_jax, sste_jax.nnx, sste_jax.optim, sste_jax.metrics):  # every public name, as built
        for name in (n for n in module.__all__ if not inspect.ismodule(getattr(module, n))):
            assert f'id="{module.__name__}.{name}"' in api, f"{module.__name__}.{name} is missing from the reference"
