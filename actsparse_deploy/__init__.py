"""actsparse_deploy: calibrate activation masks, squash them into the model,
export a validated ONNX model.

    >>> from actsparse_deploy import ActivationSparsifier, calibrate, Recipe, Masks

The public API is imported on first use, so that ``import actsparse_deploy``
(and the command line's ``--version`` and ``--help``) does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base.version import __version__ as __version__

#: public name -> (module, attribute), by wing
_API = {
    "ActivationSparsifier": ("calibration.sparsifier", "ActivationSparsifier"),
    "Masks": ("calibration.masks", "Masks"),
    "Recipe": ("calibration.recipe", "Recipe"),
    "Statistics": ("calibration.stats", "Statistics"),
    "calibrate": ("calibration.calibrate", "calibrate"),
    "collect": ("calibration.calibrate", "collect"),
    "select": ("calibration.calibrate", "select"),
    "register_aggregate_fn": ("calibration.functions", "register_aggregate_fn"),
    "register_reduce_fn": ("calibration.functions", "register_reduce_fn"),
    "register_mask_fn": ("calibration.functions", "register_mask_fn"),
    "register_method": ("calibration.methods", "register_method"),
    "squash": ("bake.squash", "squash"),
    "squash_": ("bake.squash", "squash_"),
    "export_onnx": ("onnx.export", "export_onnx"),
    "validate": ("onnx.validate", "validate"),
    "load_builtin": ("models.zoo", "load_builtin"),
    "calibration_batches": ("models.zoo", "calibration_batches"),
    "heldout_batches": ("models.zoo", "heldout_batches"),
    "convert": ("app.pipeline", "convert"),
    "ConvertOptions": ("app.options", "ConvertOptions"),
    "LoadOptions": ("app.options", "LoadOptions"),
    "CalibrateOptions": ("app.options", "CalibrateOptions"),
    "SquashOptions": ("app.options", "SquashOptions"),
    "QuantizeOptions": ("app.options", "QuantizeOptions"),
    "ExportOptions": ("app.options", "ExportOptions"),
    "ValidateOptions": ("app.options", "ValidateOptions"),
    "use_threads": ("base.threads", "use_threads"),
}

__all__ = sorted([*_API, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
