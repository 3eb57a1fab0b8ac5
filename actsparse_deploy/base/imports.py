"""A ``module:attribute`` spec imported: a model factory, a data function, a budget metric.

The module is found on ``sys.path`` with the working directory first (as ``python -m``
would), and every failure is one :class:`~actsparse_deploy.base.errors.ActsparseError`
line of the caller's class.

    >>> import_attr("math:sqrt", "function", ValueError)(4.0)
    2.0
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

__all__ = ["import_attr"]


def import_attr(spec: str, what: str, error: type[Exception]) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise error(f"{what} {spec!r} must look like package.module:name")
    # as `python -m` would, the user's project is importable, but only while their
    # module is imported: no later import may pick up a file from the current directory
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module may fail in any way
        raise error(f"cannot import {module_name!r} for {what} {spec!r}: {type(e).__name__}: {e}") from e
    finally:
        if added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise error(f"{module_name!r} has no attribute {attr!r} ({what} {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise error(f"{what} {spec!r} is a {type(target).__name__}, not a callable")
    return target
