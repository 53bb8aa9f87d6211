"""The public surface: the old top-level names warn and return the same objects, nothing in the repository
uses them, and ``import sste_jax`` reaches the framework submodules."""

import pathlib
import re
import subprocess
import sys

import pytest

import sste_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]

RENAMED = {
    "StepState": sste_jax.ScaleByStepState,
    "MaskedDecayState": sste_jax.AddMaskedDecayState,
    "step_state": sste_jax.optim.step_state,
    "step_switched": sste_jax.optim.step_switched,
    "step_v_change": sste_jax.optim.step_v_change,
    "is_beta": sste_jax.optim.is_beta,
    "to_host": sste_jax.metrics.to_host,
}


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_an_old_name_warns_and_is_the_same_object(old):
    with pytest.warns(DeprecationWarning, match=rf"sste_jax\.{old} is deprecated .* use sste_jax\."):
        value = getattr(sste_jax, old)
    assert value is RENAMED[old]
    assert old not in sste_jax.__all__ and old not in dir(sste_jax)


def test_from_import_of_an_old_name_warns():
    with pytest.warns(DeprecationWarning, match="use sste_jax.ScaleByStepState"):
        from sste_jax import StepState
    assert StepState is sste_jax.ScaleByStepState


def test_every_name_in_all_exists():
    for name in sste_jax.__all__:
        assert getattr(sste_jax, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'step_adamw'"):
        sste_jax.step_adamw  # noqa: B018


def _uses_of_old_names(text: str) -> list[str]:
    old = "|".join(RENAMED)
    found = re.findall(rf"\bsste_jax\.({old})\b", text)
    for names in re.findall(r"from sste_jax import ([^\n]+)", text):
        found += [n for n in re.findall(r"\w+", names) if n in RENAMED]
    return found


def test_nothing_in_the_repository_uses_an_old_name():
    skip = {ROOT / "sste_jax" / "__init__.py", ROOT / "docs" / "api.md", pathlib.Path(__file__).resolve()}
    files = [
        p
        for folder in ("sste_jax", "experiments", "tests", "docs", "notebooks", "benchmarks")
        for p in (ROOT / folder).rglob("*")
        if p.suffix in (".py", ".md", ".ipynb") and p not in skip and "_build" not in p.parts
    ]
    used = {str(p.relative_to(ROOT)): _uses_of_old_names(p.read_text()) for p in files + [ROOT / "README.md"]}
    assert not {p: u for p, u in used.items() if u}
    assert _uses_of_old_names("x = sste_jax.to_host(m)\nfrom sste_jax import SparsityConfig, StepState") == [
        "to_host",
        "StepState",
    ]


def test_import_reaches_the_framework_modules_without_deprecation_warnings():
    code = (
        "import warnings; warnings.filterwarnings('error', 'sste_jax', DeprecationWarning)\n"
        "import sste_jax\n"
        "print(sste_jax.nnx.SparseLinear.__name__, sste_jax.linen.SparseDense.__name__,"
        " sste_jax.checkpoint.Checkpointer.__name__, sste_jax.sparsify.__name__)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env={"JAX_PLATFORMS": "cpu"}
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["SparseLinear", "SparseDense", "Checkpointer", "sparsify"]
