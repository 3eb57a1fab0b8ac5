"""actsparse_deploy: calibrate activation masks, squash them into the model,
export a validated ONNX model.

    >>> from actsparse_deploy import ActivationSparsifier, calibrate, Recipe, Masks

The public API is imported on first use, so that ``import actsparse_deploy``
(and the command line's ``--version`` and ``--help``) does not pay for torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from .version import __version__

#: public name -> (submodule, attribute)
_API = {
    "ActivationSparsifier": ("sparsifier", "ActivationSparsifier"),
    "Masks": ("masks", "Masks"),
    "Recipe": ("recipe", "Recipe"),
    "Statistics": ("stats", "Statistics"),
    "calibrate": ("calibrate", "calibrate"),
    "collect": ("calibrate", "collect"),
    "select": ("calibrate", "select"),
    "squash": ("squash", "squash"),
    "squash_": ("squash", "squash_"),
}

__all__ = [
    "ActivationSparsifier",
    "Masks",
    "Recipe",
    "Statistics",
    "__version__",
    "calibrate",
    "collect",
    "select",
    "squash",
    "squash_",
]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


class _Package(types.ModuleType):
    """``calibrate`` and ``squash`` name both a stage module and its entry function:
    importing the module must not replace the function on the package (the import
    system sets the parent's attribute to the submodule)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return  # the module stays reachable as sys.modules[f"{__name__}.{name}"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
