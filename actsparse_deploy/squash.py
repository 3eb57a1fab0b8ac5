"""Stage 2: bake masks into the model as fixed ops, no hooks left.

Modes, per layer:

- ``mul``: the layer is wrapped in :class:`MaskedInput`, which multiplies its
  input by a constant mask buffer; any mask that broadcasts against the input;
- ``fold``: a mask that only varies along the consuming layer's input-feature
  axis (``Linear``: last axis; ``ConvNd``: channel axis) is multiplied into the
  layer's weight: no extra op at all;
- ``auto`` (default): ``fold`` where it is exact, ``mul`` elsewhere.

    >>> import torch
    >>> from torch import nn
    >>> from actsparse_deploy import Recipe, calibrate, squash
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> masks = calibrate(model, Recipe.simple(layers=["2"], sparsity=0.5), [torch.randn(16, 4)])
    >>> result = squash(model, masks)
    >>> result.modes
    {'2': 'fold'}
    >>> int((result.model[2].weight == 0).all(dim=0).sum())   # 4 of 8 input columns zeroed
    4
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import MaskError
from .masks import LayerMask, Masks

__all__ = ["MODES", "MaskedInput", "SquashResult", "squash", "squash_"]

MODES = ("auto", "mul", "fold")


class MaskedInput(nn.Module):
    """``module(input * mask, *rest)``: a mask baked in as a constant buffer."""

    def __init__(self, module: nn.Module, mask: torch.Tensor) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.module(x * self.mask, *args, **kwargs)


@dataclass
class SquashResult:
    """The squashed model and, per layer, the mode it got and why."""

    model: nn.Module
    modes: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    sparsity: dict[str, float] = field(default_factory=dict)

    def report(self) -> list[dict[str, Any]]:
        return [
            {"layer": name, "mode": mode, "reason": self.reasons[name], "sparsity": round(self.sparsity[name], 6)}
            for name, mode in self.modes.items()
        ]


def _replace_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """``setattr(parent, child_name, new)``: the one place modules are swapped."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _feature_axis(layer: nn.Module) -> int | None:
    """The input-feature axis (negative, from the right) a fold would scale, or None."""
    if isinstance(layer, nn.Linear):
        return -1
    if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups == 1:
        return -(len(layer.kernel_size) + 1)
    return None


def _n_features(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels  # type: ignore[return-value]


def fold_vector(layer: nn.Module, mask: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """The per-input-feature scale a fold would apply, or None and why not."""
    axis = _feature_axis(layer)
    if axis is None:
        kind = type(layer).__name__ + (" with groups" if isinstance(layer, nn.modules.conv._ConvNd) else "")
        return None, f"{kind} has no weight to fold into"
    shape = (1,) * max(0, -axis - mask.ndim) + tuple(mask.shape)
    others = [size for i, size in enumerate(shape) if i != len(shape) + axis]
    if any(size != 1 for size in others):
        return None, f"mask of shape {list(mask.shape)} varies along more than the input-feature axis"
    n = _n_features(layer)
    vector = mask.reshape(-1)
    if vector.numel() not in (1, n):
        raise MaskError(f"mask of shape {list(mask.shape)} does not fit a layer with {n} input features")
    return vector.expand(n).clone(), "one value per input feature: folded into the weight"


def _fold(layer: nn.Module, vector: torch.Tensor) -> None:
    with torch.no_grad():
        weight = layer.weight
        v = vector.to(weight.dtype)
        if isinstance(layer, nn.Linear):
            weight.mul_(v)
        elif isinstance(layer, nn.modules.conv._ConvTransposeNd):
            weight.mul_(v.reshape(-1, *([1] * (weight.ndim - 1))))  # (in, out, *k)
        else:
            weight.mul_(v.reshape(1, -1, *([1] * (weight.ndim - 2))))  # (out, in, *k)


def _check_fits(name: str, layer: nn.Module, mask: torch.Tensor, lm: LayerMask) -> None:
    axis = _feature_axis(layer)
    if axis is not None and mask.ndim >= -axis and mask.shape[axis] not in (1, _n_features(layer)):
        raise MaskError(
            f"mask of layer {name!r} has shape {list(mask.shape)} but the layer takes {_n_features(layer)} "
            "input features: the masks come from another model"
        )
    if lm.input_shape is not None and mask.ndim > len(lm.input_shape) and mask.shape[0] != 1:
        raise MaskError(
            f"mask of layer {name!r} has shape {list(mask.shape)}, with a batch axis: it only fits one batch "
            "size and cannot be baked into the model (use built-in functions, whose masks have no batch axis)"
        )


def squash_(model: nn.Module, masks: Masks | Any, mode: str = "auto") -> SquashResult:
    """Bake ``masks`` (a :class:`Masks` or a live ``ActivationSparsifier`` after
    ``step()``) into ``model`` in place; returns the model and what each layer got."""
    if mode not in MODES:
        raise MaskError(f"unknown squash mode {mode!r}; known: {', '.join(MODES)}")
    if not isinstance(masks, Masks):
        masks = Masks.from_sparsifier(masks)
    modules = dict(model.named_modules())
    unknown = [name for name in masks if name not in modules]
    if unknown:
        raise MaskError(
            f"masks name layer(s) {', '.join(unknown)} that the model does not have: the masks come from another model"
        )
    result = SquashResult(model)
    for name in masks:
        lm = masks[name]
        layer = modules[name]
        mask = lm.dense().detach()
        _check_fits(name, layer, mask, lm)
        vector, why = fold_vector(layer, mask)
        if mode == "fold" and vector is None:
            raise MaskError(f"layer {name!r} cannot be folded: {why}; use --mode mul or auto")
        if mode != "mul" and vector is not None:
            _fold(layer, vector)
            result.modes[name], result.reasons[name] = "fold", why
        else:
            weight = next(layer.parameters(), None)
            dtype = weight.dtype if weight is not None and weight.is_floating_point() else mask.dtype
            _replace_module(model, name, MaskedInput(layer, mask.to(dtype).clone()))
            result.modes[name] = "mul"
            result.reasons[name] = "asked for mul" if mode == "mul" else why
        result.sparsity[name] = lm.sparsity
    return result


def squash(model: nn.Module, masks: Masks | Any, mode: str = "auto") -> SquashResult:
    """Like :func:`squash_` on a deep copy: ``model`` is left as it was."""
    return squash_(copy.deepcopy(model), masks, mode)
