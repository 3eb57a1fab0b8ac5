"""The public API: every documented name importable from ``actsparse_deploy``."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import actsparse_deploy

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_resolves():
    for name in actsparse_deploy.__all__:
        assert getattr(actsparse_deploy, name) is not None, name
    assert set(actsparse_deploy.__all__) <= set(dir(actsparse_deploy))


def test_the_readme_imports_only_what_the_package_offers():
    """Each ``from actsparse_deploy import ...`` of the README names public names."""
    text = (ROOT / "README.md").read_text()
    for found in re.finditer(r"from actsparse_deploy import (?:\(([^)]*)\)|([^\n]*))", text):
        names = [n.strip() for n in (found[1] or found[2]).split(",") if n.strip()]
        missing = [n for n in names if n not in actsparse_deploy.__all__]
        assert not missing, found[0]


def test_names_that_are_also_stages_are_the_functions():
    """``calibrate``, ``squash``, ``validate``, ``convert`` are the functions, never a module."""
    for name in ("calibrate", "squash", "validate", "convert"):
        value = getattr(actsparse_deploy, name)
        assert inspect.isfunction(value) and value.__name__ == name
