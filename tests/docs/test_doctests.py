"""Every module's docstring examples run and print what they show."""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import experiments
import sste_jax


def _modules(package) -> list[str]:
    return [package.__name__] + sorted(
        info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
    )


# modules whose examples need an optional extra (``serving``: PyTorch and the file formats)
_NEEDS = {"sste_jax.serving": ("torch", "safetensors", "compressed_tensors")}


@pytest.mark.parametrize("name", _modules(sste_jax) + _modules(experiments))
def test_module_doctests(name):
    for package in _NEEDS.get(name, ()):
        pytest.importorskip(package)
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} doctest examples failed"


def _public_names() -> list[str]:
    """The functions and classes of the public modules (no ``_`` in their path): their ``__all__``,
    else every non-underscore attribute."""
    names = set()
    for module_name in _modules(sste_jax):
        if any(part.startswith("_") for part in module_name.split(".")):
            continue
        module = importlib.import_module(module_name)
        public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        # functions and classes carry their own docstrings; constants are described by their module's
        documented = (n for n in public if inspect.isroutine(getattr(module, n)) or inspect.isclass(getattr(module, n)))
        names.update(f"{module_name}.{n}" for n in documented)
    return sorted(names)


@pytest.mark.parametrize("name", _public_names())
def test_every_public_name_has_an_example(name):
    module_name, attr = name.rsplit(".", 1)
    docstring = inspect.getdoc(getattr(importlib.import_module(module_name), attr)) or ""
    assert ">>> " in docstring, f"{name}'s docstring has no runnable example"
