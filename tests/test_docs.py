"""The documentation (pages and the API reference built from the docstrings) builds without a warning."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sphinx_build_has_no_warnings(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-E", "-b", "html", "docs", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout}{result.stderr}"
    api = (tmp_path / "api.html").read_text()
    for name in ("sste_jax.soft_threshold_24", "sste_jax.nnx.sparsify", "sste_jax.checkpoint.save_checkpoint"):
        assert f'id="{name}"' in api, f"{name} is missing from the API reference"
