"""Models, weights and data from users, loaded safely.

A model is a built-in name or ``package.module:factory`` (a callable returning an
``nn.Module``) plus optional weights: ``.safetensors``, or a ``.pt`` / ``.pth``
state dict read with ``torch.load(weights_only=True)``: no pickle from a user's
file is ever executed. Data is a ``.npy`` / ``.npz`` / ``.safetensors`` / ``.pt``
file of input tensors (several named arrays become dict batches, passed to the
model as keyword arguments), cut into batches; or ``module:function`` returning
an iterable of batches.

    >>> import numpy as np, tempfile
    >>> from actsparse_deploy.loading import load_data
    >>> path = tempfile.mkdtemp() + "/x.npy"
    >>> np.save(path, np.zeros((10, 4), dtype=np.float32))
    >>> [tuple(b.shape) for b in load_data(path, batch_size=4)]
    [(4, 4), (4, 4), (2, 4)]
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from . import zoo
from .calibrate import Batch
from .errors import DataError, ModelLoadError, WeightsError

__all__ = ["LoadedModel", "load_data", "load_model", "load_state_dict_file"]

#: key prefix of the inputs of a .pt data file holding a list (positional inputs)
POSITIONAL = "input #"


@dataclass
class LoadedModel:
    """A model ready for calibration, and where it came from."""

    module: nn.Module
    name: str
    builtin: bool


def _import_attr(spec: str, what: str, error: type[Exception]) -> Any:
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


def load_model(spec: str, weights: str | Path | None = None) -> LoadedModel:
    """A built-in name, or ``package.module:factory`` with optional weights."""
    if ":" not in spec:
        if weights is not None:
            module = zoo.get_builtin(spec).factory()
            load_state_dict_file(module, Path(weights))
            return LoadedModel(module.eval(), spec, builtin=True)
        return LoadedModel(zoo.load_builtin(spec), spec, builtin=True)
    factory = _import_attr(spec, "model factory", ModelLoadError)
    try:
        module = factory()
    except Exception as e:
        raise ModelLoadError(f"model factory {spec!r} failed: {type(e).__name__}: {e}") from e
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"model factory {spec!r} returned a {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_state_dict_file(module, Path(weights))
    return LoadedModel(module.eval(), spec, builtin=False)


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"weights file {path} is not a readable .safetensors file ({e})") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise WeightsError(
                f"weights file {path} holds Python objects other than tensors, which are refused "
                "(loading them could run code): save model.state_dict() instead, ideally as .safetensors"
            ) from e
        raise WeightsError(f"weights file {path} is corrupted or not a torch file") from e
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise WeightsError(f"weights file {path} is corrupted or not a torch file ({e})") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    return obj


def load_state_dict_file(module: nn.Module, path: Path) -> None:
    """Load weights strictly; missing / unexpected keys and shape mismatches are named."""
    state = _read_state_dict(path)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch {_few(wrong)}")
    if problems:
        raise WeightsError(f"weights file {path} does not fit the model: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True)


def _few(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


# --- data ------------------------------------------------------------------------


def _to_tensor(name: str, array: Any, source: str) -> torch.Tensor:
    if array.ndim == 0:
        raise DataError(f"array {name!r} in {source} is a scalar: it needs a batch axis first")
    if not isinstance(array, torch.Tensor):
        if array.dtype.kind not in "biuf":
            raise DataError(f"array {name!r} in {source} has dtype {array.dtype}, which a model cannot take")
        array = torch.from_numpy(np.ascontiguousarray(array))
    t = array
    if t.dtype == torch.float64:
        t = t.to(torch.float32)  # numpy's default; models here run in float32
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.uint8):
        raise DataError(f"array {name!r} in {source} has dtype {t.dtype}, which a model cannot take")
    if t.shape[0] == 0:
        raise DataError(f"array {name!r} in {source} is empty (0 samples)")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise DataError(f"array {name!r} in {source} holds NaN or Inf")
    return t


def _read_arrays(path: Path) -> dict[str, torch.Tensor] | torch.Tensor:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return _to_tensor("array", np.load(path, allow_pickle=False), str(path))
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                raw = {k: npz[k] for k in npz.files}
        elif suffix == ".safetensors":
            raw = load_file(str(path))
        elif suffix in (".pt", ".pth"):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(obj, torch.Tensor):
                return _to_tensor("tensor", obj, str(path))
            if isinstance(obj, (list, tuple)):  # positional inputs: tuple batches
                obj = {f"{POSITIONAL}{i}": t for i, t in enumerate(obj)}
            if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                raise DataError(f"data file {path} must hold a tensor, a list of tensors or a dict of tensors")
            raw = dict(obj)
        else:
            raise DataError(f"data file {path}: unsupported type {suffix or '(none)'}; use .npy, .npz, .safetensors or .pt")
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, SafetensorError, RuntimeError, pickle.UnpicklingError) as e:
        raise DataError(f"data file {path} is corrupted or unreadable ({type(e).__name__}: {e})") from e
    if not raw:
        raise DataError(f"data file {path} holds no arrays")
    tensors = {k: _to_tensor(k, v, str(path)) for k, v in raw.items()}
    lengths = {k: t.shape[0] for k, t in tensors.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"arrays in {path} differ in their number of samples: {lengths}")
    return next(iter(tensors.values())) if len(tensors) == 1 else tensors


def load_data(source: str | Path, batch_size: int = 32) -> list[Batch] | Iterable[Batch]:
    """Batches from a data file, or the iterable a ``module:function`` returns."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    text = str(source)
    if ":" in text and not Path(text).exists() and not (len(text) > 1 and text[1] == ":"):
        fn: Callable[[], Iterable[Batch]] = _import_attr(text, "data function", DataError)
        try:
            return fn()
        except Exception as e:
            raise DataError(f"data function {text!r} failed: {type(e).__name__}: {e}") from e
    arrays = _read_arrays(Path(source))
    if isinstance(arrays, torch.Tensor):
        return list(torch.split(arrays, batch_size))
    n = next(iter(arrays.values())).shape[0]
    if all(k.startswith(POSITIONAL) for k in arrays):  # a list of tensors: model(*batch)
        return [tuple(t[i : i + batch_size] for t in arrays.values()) for i in range(0, n, batch_size)]
    return [{k: t[i : i + batch_size] for k, t in arrays.items()} for i in range(0, n, batch_size)]
