"""The sparsifier's state in a ``.safetensors`` file: the codec behind
``ActivationSparsifier.save`` / ``load``, no pickle involved.

It works on ``state_dict()``-shaped data (``{"state", "data_groups",
"defaults"}``): masks and statistics become tensors, defaults, per-layer configs
and statistic counts JSON metadata, in the generic container of
:mod:`actsparse_deploy.base.serialize`. Only built-in (named) functions can be saved,
since a user callable has no portable name.

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
from pathlib import Path
from typing import Any

import torch

from ..base.errors import ConfigError, MaskError
from ..base.serialize import SEP, read_container, write_container
from .functions import (
    AGGREGATE_FNS,
    MASK_FNS,
    REDUCE_FNS,
    BuiltinFn,
    Registry,
    RunningStat,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "load_state", "save_state"]

FORMAT = "actsparse.sparsifier"
FORMAT_VERSION = 1
_REGISTRIES: dict[str, Registry[Any]] = {"aggregate_fn": AGGREGATE_FNS, "reduce_fn": REDUCE_FNS, "mask_fn": MASK_FNS}
#: per-layer entries of ``state`` kept besides the mask (all optional on load)
_STATE_KEYS = ("input_shape", "num_samples", "num_batches")


def fn_spec(fn: Any, where: str) -> Any:
    """A built-in's serialisable spec; a user function cannot be saved."""
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
    if isinstance(value, (list, tuple)):
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


def save_state(state_dict: dict[str, Any], path: Path) -> None:
    """Write a sparsifier's ``state_dict()`` to ``path`` (atomically)."""
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, Any] = {}
    for name, config in state_dict["data_groups"].items():
        entry = _config_json(config, f"layer {name!r}")
        entry["hook_state"] = config.get("hook_state")
        entry["data"] = _put(tensors, f"data{SEP}{name}", config.get("data"))
        layer_state = state_dict["state"].get(name, {})
        entry["mask"] = _put(tensors, f"mask{SEP}{name}", layer_state.get("mask"))
        for key in _STATE_KEYS:
            entry[key] = layer_state.get(key)
        groups[name] = entry
    state = {"defaults": _config_json(state_dict["defaults"], "default"), "data_groups": groups}
    try:
        text = json.dumps(state)
    except TypeError as e:
        raise ConfigError(f"sparse_config must hold plain numbers, strings and lists to be saved ({e})") from e
    write_container(path, FORMAT, FORMAT_VERSION, tensors, {"state": text})


def _resolve(entry: dict[str, Any]) -> dict[str, Any]:
    out = {key: registry.resolve(entry[key]) for key, registry in _REGISTRIES.items()}
    out.update(features=_decode(entry["features"]), feature_dim=entry["feature_dim"], sparse_config=_decode(entry["sparse_config"]))
    return out


def load_state(path: Path) -> dict[str, Any]:
    """A ``state_dict``-shaped dict read from ``path`` (for ``load_state_dict``)."""
    tensors, metadata = read_container(path, FORMAT, FORMAT_VERSION, "sparsifier state")
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
                masks[name]["input_shape"] = tuple(int(n) for n in entry["input_shape"])
            for key in ("num_samples", "num_batches"):
                if entry.get(key) is not None:
                    masks[name][key] = int(entry[key])
        defaults = _resolve(state["defaults"])
    except RecursionError as e:
        raise MaskError(f"sparsifier state in {path} is nested too deeply to read: it is corrupted or hostile") from e
    except (KeyError, TypeError, ValueError) as e:
        raise MaskError(f"sparsifier state in {path} is incomplete or malformed ({e!r})") from e
    return {"state": masks, "data_groups": data_groups, "defaults": defaults}
