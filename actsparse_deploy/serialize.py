"""Sparsifier state in a ``.safetensors`` file: no pickle involved.

Masks and statistics are tensors; defaults, per-layer configs and statistic
counts are JSON in the file's metadata. Only built-in (named) functions can be
saved, since a user callable has no portable name.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from actsparse_deploy import ActivationSparsifier
    >>> model = nn.Sequential(nn.Linear(3, 3))
    >>> sp = ActivationSparsifier(model, "sum_abs", "mean", "threshold", threshold=0.1)
    >>> sp.register_layer(model[0])
    >>> _ = model(torch.ones(2, 3))
    >>> path = tempfile.mkdtemp() + "/state.safetensors"
    >>> sp.save(path)
    >>> fresh = ActivationSparsifier(nn.Sequential(nn.Linear(3, 3)))
    >>> fresh.load(path); fresh.data_groups["0"]["data"].count
    2
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .version import __version__
from .errors import ConfigError, MaskError
from .files import atomic_output
from .functions import AGGREGATE_FNS, MASK_FNS, REDUCE_FNS, BuiltinFn, RunningStat

if TYPE_CHECKING:
    from .sparsifier import ActivationSparsifier

SEP = "::"
_REGISTRIES = {"aggregate_fn": AGGREGATE_FNS, "reduce_fn": REDUCE_FNS, "mask_fn": MASK_FNS}
FORMAT = "actsparse.sparsifier"
FORMAT_VERSION = 1


def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, but written by Python: a failed write (a
    full disk) is an ``OSError`` that :func:`atomic_output` reports, not the
    ``SafetensorError`` safetensors' own writer raises."""
    data = save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data)


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors and string metadata atomically."""
    contiguous = {key: t.detach().cpu().contiguous() for key, t in tensors.items()}
    with atomic_output(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def load_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file; a missing or corrupted file is a MaskError."""
    if not path.is_file():
        raise MaskError(f"{what} file {path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MaskError(f"{what} file {path} is not a readable .safetensors file ({e})") from e


def check_format(metadata: dict[str, str], fmt: str, version: int, path: Path) -> None:
    if metadata.get("format") != fmt:
        raise MaskError(f"{path} is not a {fmt} file (format: {metadata.get('format', 'none')})")
    raw = metadata.get("format_version")
    if raw is None:
        raise MaskError(f"{path} has no valid format_version: the file is corrupted")
    if not re.fullmatch(r"[0-9]{1,9}", raw) or int(raw) < 1:
        raise MaskError(f"{path}: format_version {raw[:40]!r} is not a positive integer: the file is corrupted")
    found = int(raw)
    if found > version:
        raise MaskError(
            f"{path} was written in format version {found} by a newer actsparse_deploy "
            f"({metadata.get('tool_version', '?')}); this version {__version__} reads up to {version}: upgrade"
        )


def fn_spec(fn: Any, where: str) -> Any:
    if fn is None:
        return None
    if not isinstance(fn, BuiltinFn):
        raise ConfigError(
            f"{where} is a user function ({getattr(fn, '__name__', fn)!r}); only built-in (named) "
            "functions can be saved to .safetensors: use state_dict() instead"
        )
    return fn.spec


def _encode(value: Any) -> Any:
    """JSON has no tuples: tag them so that a round trip is exact."""
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _config_json(config: dict[str, Any], where: str) -> dict[str, Any]:
    out = {key: fn_spec(config[key], f"{where} {key}") for key in _REGISTRIES}
    out["features"] = _encode(config["features"])
    out["feature_dim"] = config["feature_dim"]
    out["sparse_config"] = _encode(config["sparse_config"])
    return out


def _put(tensors: dict[str, torch.Tensor], prefix: str, value: Any) -> Any:
    """Store a tensor, RunningStat or list of them; return the JSON that says which."""
    if value is None:
        return None
    if isinstance(value, list):
        return [_put(tensors, f"{prefix}{SEP}{i}", v) for i, v in enumerate(value)]
    if isinstance(value, RunningStat):
        tensors[prefix] = value.value
        return {"count": value.count, "combine": value.combine}
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.to_dense()
        return "tensor"
    raise ConfigError(f"{prefix} holds a {type(value).__name__}, which cannot be saved")


def _get(tensors: dict[str, torch.Tensor], prefix: str, info: Any) -> Any:
    if info is None:
        return None
    if isinstance(info, list):
        return [_get(tensors, f"{prefix}{SEP}{i}", v) for i, v in enumerate(info)]
    tensor = tensors[prefix]
    if info == "tensor":
        return tensor
    return RunningStat(tensor, int(info["count"]), str(info["combine"]))


def save_sparsifier(sp: "ActivationSparsifier", path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, Any] = {}
    for name, config in sp.data_groups.items():
        entry = _config_json(config, f"layer {name!r}")
        entry["hook_state"] = config.get("hook_state")
        entry["data"] = _put(tensors, f"data{SEP}{name}", config.get("data"))
        entry["mask"] = _put(tensors, f"mask{SEP}{name}", sp.state.get(name, {}).get("mask"))
        entry["input_shape"] = sp.input_shape(name)
        groups[name] = entry
    state = {"defaults": _config_json(sp.defaults, "default"), "data_groups": groups}
    try:
        text = json.dumps(state)
    except TypeError as e:
        raise ConfigError(f"sparse_config must hold plain numbers, strings and lists to be saved ({e})") from e
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "tool_version": __version__,
        "state": text,
    }
    save_safetensors(path, tensors, metadata)


def _resolve(entry: dict[str, Any]) -> dict[str, Any]:
    out = {key: registry.resolve(entry[key]) for key, registry in _REGISTRIES.items()}
    out.update(features=_decode(entry["features"]), feature_dim=entry["feature_dim"], sparse_config=_decode(entry["sparse_config"]))
    return out


def load_sparsifier(path: Path) -> dict[str, Any]:
    """A ``state_dict``-shaped dict read from ``path`` (for ``load_state_dict``)."""
    tensors, metadata = load_safetensors(path, "sparsifier state")
    check_format(metadata, FORMAT, FORMAT_VERSION, path)
    try:
        state = json.loads(metadata["state"])
        data_groups, masks = {}, {}
        for name, entry in state["data_groups"].items():
            config = _resolve(entry)
            config["hook_state"] = entry["hook_state"]
            data = _get(tensors, f"data{SEP}{name}", entry["data"])
            if data is not None:
                config["data"] = data
            data_groups[name] = config
            masks[name] = {"mask": _get(tensors, f"mask{SEP}{name}", entry["mask"])}
            if entry.get("input_shape") is not None:
                masks[name]["input_shape"] = tuple(entry["input_shape"])
        defaults = _resolve(state["defaults"])
    except RecursionError as e:
        raise MaskError(f"sparsifier state in {path} is nested too deeply to read: it is corrupted or hostile") from e
    except (KeyError, TypeError, ValueError) as e:
        raise MaskError(f"sparsifier state in {path} is incomplete or malformed ({e!r})") from e
    return {"state": masks, "data_groups": data_groups, "defaults": defaults}
