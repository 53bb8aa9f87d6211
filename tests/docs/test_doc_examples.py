"""The examples of docs/any_model.md run, in order, in one namespace, and print exactly what the page shows
under each (a ```python block followed by a ```text block); the other blocks are recipes for models that do
not install here (they run in tests/third_party/test_third_party.py)."""

import pathlib
import re

import jax
import pytest

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "any_model.md"


@pytest.fixture(autouse=True)
def _default_precision():
    """The page's numbers come from the library's defaults, not the suite's float32 matmuls."""
    with jax.default_matmul_precision("default"):
        yield


@pytest.mark.integration  # trains the page's models, as the notebooks do
def test_any_model_examples_run_as_printed(capsys):
    examples = re.findall(r"^```python\n(.*?)^```\n\n^```text\n(.*?)^```", DOC.read_text(), re.S | re.M)
    assert len(examples) == 4
    namespace = {"__name__": "any_model"}
    for code, expected in examples:
        exec(compile(code, str(DOC), "exec"), namespace)
        assert capsys.readouterr().out == expected
