"""The public surface: the top level is curated, names that moved to a submodule or were removed are gone
from it (no shims) and nothing in the repository uses them, the API reference documents exactly the public
names, and ``import sste_jax`` reaches the submodules."""

import importlib
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

import sste_jax
import sste_jax.metrics
import sste_jax.nnx
import sste_jax.optim

ROOT = pathlib.Path(__file__).resolve().parents[2]

MOVED = {  # a former top-level name -> what it is now
    "StepState": sste_jax.optim.ScaleByStepState,
    "MaskedDecayState": sste_jax.optim.AddMaskedDecayState,
    "step_state": sste_jax.optim.step_state,
    "step_switched": sste_jax.optim.step_switched,
    "step_v_change": sste_jax.optim.step_v_change,
    "is_beta": sste_jax.optim.is_beta,
    "to_host": sste_jax.metrics.to_host,
    "add_srste_decay": sste_jax.optim.add_srste_decay,
    "add_masked_decay": sste_jax.optim.add_masked_decay,
    "AddMaskedDecayState": sste_jax.optim.AddMaskedDecayState,
    "scale_by_step": sste_jax.optim.scale_by_step,
    "step_adam": sste_jax.optim.step_adam,
    "ScaleByStepState": sste_jax.optim.ScaleByStepState,
    "FlipState": sste_jax.metrics.FlipState,
    "init_flip_state": sste_jax.metrics.init_flip_state,
    "flip_rate": sste_jax.metrics.flip_rate,
    "sparsity_stats": sste_jax.metrics.sparsity_stats,
    "check_sharding": sste_jax.metrics.check_sharding,
}

REMOVED = {  # module -> names it no longer has
    "sste_jax": ["sparsity_spec", "apply_sparsity", "ParamSparsity", "spec_weights", "select_kernels", "select_paths",
                 "einsum_axis", "sparse_einsum", "match_rule", "FEED_FORWARD", "linen", "anymodel", "Pruned"],
    "sste_jax.nnx": ["sparsify", "all_linear", "feed_forward", "sparse_kernel_mask", "Packed24"],
    "sste_jax.serving": ["linen_inference_weights", "import_weights", "to_backend", "CusparseltLinear", "BACKENDS"],
    "sste_jax.checkpoint": ["export_compressed", "load_compressed", "compress_layers", "densify_layers",
                            "CompressedLinear", "Packed24"],
    "sste_jax.kernels": ["Pruned24"],
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_moved_name_is_gone_from_the_top_level(old):
    with pytest.raises(AttributeError, match=f"no attribute {old!r}"):
        getattr(sste_jax, old)
    assert old not in sste_jax.__all__ and old not in dir(sste_jax)
    home = importlib.import_module(MOVED[old].__module__)  # where it is defined
    assert MOVED[old] is getattr(home, MOVED[old].__name__)


def test_from_import_of_an_old_name_fails():
    with pytest.raises(ImportError, match="StepState"):
        from sste_jax import StepState  # noqa: F401


@pytest.mark.parametrize("module", sorted(REMOVED))
def test_removed_names_are_gone(module):
    if module == "sste_jax.serving":
        pytest.importorskip("torch")
    mod = importlib.import_module(module)
    for name in REMOVED[module]:
        assert not hasattr(mod, name), f"{module}.{name}"
    for gone in ("sste_jax.linen", "sste_jax.anymodel"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(gone)


def test_every_name_in_all_exists():
    for module in (sste_jax, sste_jax.nnx, sste_jax.optim, sste_jax.metrics):
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"
    with pytest.raises(AttributeError, match="no attribute 'step_adamw'"):
        sste_jax.step_adamw  # noqa: B018


def _uses_of_old_names(text: str) -> list[str]:
    old = "|".join(MOVED)
    found = re.findall(rf"\bsste_jax\.({old})\b", text)
    for names in re.findall(r"from sste_jax import ([^\n]+)", text):
        found += [n for n in re.findall(r"\w+", names) if n in MOVED]
    return found


def _uses_of_removed_names(text: str) -> list[str]:
    top = "|".join(REMOVED["sste_jax"])
    nnx = "|".join(REMOVED["sste_jax.nnx"])
    serving = "|".join(REMOVED["sste_jax.serving"])
    ckpt = "|".join(REMOVED["sste_jax.checkpoint"])
    patterns = [rf"\bsste_jax\.({top})\b", rf"\b(?:sste_jax\.nnx|sparse_nnx)\.({nnx})\b",
                rf"\bserving\.({serving})\b", rf"\bcheckpoint\.({ckpt})\b", r"\b(Pruned24|Packed24)\b",
                r"\bfrom sste_jax import (linen|anymodel)\b"]
    return [m for pattern in patterns for m in re.findall(pattern, text)]


def _repository_files() -> list[pathlib.Path]:
    skip = {pathlib.Path(__file__).resolve()}
    files = [
        p
        for folder in ("sste_jax", "experiments", "tests", "docs", "notebooks", "benchmarks")
        for p in (ROOT / folder).rglob("*")
        if p.suffix in (".py", ".md", ".ipynb") and p not in skip and "_build" not in p.parts
    ]
    return files + [ROOT / "README.md"]


def test_nothing_in_the_repository_uses_an_old_name():
    used = {str(p.relative_to(ROOT)): _uses_of_old_names(p.read_text()) for p in _repository_files()}
    assert not {p: u for p, u in used.items() if u}
    assert _uses_of_old_names("x = sste_jax.to_host(m)\nfrom sste_jax import SparsityConfig, StepState") == [
        "to_host",
        "StepState",
    ]
    assert _uses_of_old_names("sste_jax.metrics.flip_rate(s, w); sste_jax.optim.step_adam(1e-3)") == []


def test_nothing_in_the_repository_uses_a_removed_name():
    used = {str(p.relative_to(ROOT)): _uses_of_removed_names(p.read_text()) for p in _repository_files()}
    assert not {p: u for p, u in used.items() if u}
    assert _uses_of_removed_names(
        "sste_jax.sparsity_spec(p); sparse_nnx.sparsify(m); serving.linen_inference_weights(v); sste_jax.sparsify(m)"
    ) == ["sparsity_spec", "sparsify", "linen_inference_weights"]
    text = "checkpoint.export_compressed(d, m); serving.to_backend(m, b); sparse_nnx.to_backend(m)"
    assert _uses_of_removed_names(text) == ["to_backend", "export_compressed"]


def _documented() -> set[str]:
    text = (ROOT / "docs" / "api.md").read_text()
    return set(re.findall(r"^\.\. auto(?:function|class|data|exception)::\s+(\S+)", text, re.M))


def test_the_api_reference_documents_exactly_the_public_names():
    documented = _documented()
    for module in (sste_jax, sste_jax.nnx, sste_jax.optim, sste_jax.metrics):
        public = {f"{module.__name__}.{n}" for n in module.__all__ if not inspect.ismodule(getattr(module, n))}
        missing = public - documented
        assert not missing, f"docs/api.md does not document {sorted(missing)}"
        prefix = f"{module.__name__}."
        stale = {d for d in documented if d.startswith(prefix) and "." not in d[len(prefix):]} - public
        assert not stale, f"docs/api.md documents {sorted(stale)}, not in {module.__name__}.__all__"
    for name in documented:  # the other modules' entries exist
        module, _, attr = name.rpartition(".")
        if module == "sste_jax.serving":
            pytest.importorskip("torch")
        assert hasattr(importlib.import_module(module), attr), name


def test_import_reaches_the_submodules_without_deprecation_warnings():
    code = (
        "import warnings; warnings.filterwarnings('error', 'sste_jax', DeprecationWarning)\n"
        "import sste_jax\n"
        "print(sste_jax.nnx.SparseLinear.__name__, sste_jax.optim.step_adam.__name__,"
        " sste_jax.metrics.flip_rate.__name__, sste_jax.checkpoint.Checkpointer.__name__,"
        " sste_jax.sparsify.__name__, sste_jax.SparseModule.__name__)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env={"JAX_PLATFORMS": "cpu"}
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["SparseLinear", "step_adam", "flip_rate", "Checkpointer", "sparsify", "SparseModule"]
