"""Sphinx configuration: the API reference is built from the docstrings (autodoc + napoleon), the
pages from Markdown (MyST). ``python -m sphinx -W -b html docs docs/_build`` builds it."""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "sste_jax"
author = "sste_jax authors"
copyright = "2026, sste_jax authors"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

default_role = "py:obj"  # `name` in a docstring links to that object when the reference has it
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # dataclass "Attributes:" sections, without duplicating autodoc's fields

myst_heading_anchors = 3  # "docs/algorithm.md#layout" links work inside the built pages too
myst_enable_extensions = ["dollarmath"]

html_theme = "alabaster"
html_title = "sste_jax"
