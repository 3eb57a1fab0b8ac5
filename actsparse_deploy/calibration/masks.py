"""The masks container: what calibration produces and squashing consumes.

Saved as ``.safetensors``: one tensor per layer (``layer::i`` per selected
feature), with JSON metadata holding the recipe, each layer's mask shape,
achieved sparsity and input shape, the number of calibration samples and the
tool version. A layer whose mask came from a selection method may carry edits
of its own parameters (compensation: :mod:`actsparse_deploy.calibration.compensate`), saved
as tensors ``layer::weight`` / ``layer::bias`` (the weight as ``(out, in,
*kernel)`` whatever the layer's own layout: GPT-2's ``Conv1D`` keeps ``(in,
out)``, its kind turns one into the other; the row says ``weight_layout =
"out-in"``, and a row without it, written by 0.1.0 before the layout was shared,
is read in the layer's own layout), with the ``method``, ``compensate`` and
``damping`` that made them.

    >>> import tempfile, torch
    >>> from actsparse_deploy.calibration.masks import LayerMask, Masks
    >>> masks = Masks({"fc": LayerMask(torch.tensor([1.0, 0.0, 1.0, 0.0]))}, num_samples=8)
    >>> path = tempfile.mkdtemp() + "/masks.safetensors"
    >>> masks.save(path)
    >>> Masks.load(path)["fc"].sparsity
    0.5
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..base.errors import CalibrationError, MaskError, RecipeError
from ..base.serialize import SEP, check_format, load_safetensors, save_safetensors
from ..base.version import __version__
from .fields import MAX_DENSE_VALUES, feature_indices, is_int, layer_name_in_file, model_name_in_file, skipped_in_file
from .recipe import Recipe

__all__ = ["LayerMask", "Masks", "checked_layer_mask"]

FORMAT = "actsparse.masks"
#: how a masks file stores a layer's new weight (see LayerMask.weight_layout)
WEIGHT_LAYOUTS = ("out-in", "native")
FORMAT_VERSION = 1


def broadcast_shape(*shapes: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape ``shapes`` broadcast to (numpy / torch rules), None where they do
    not. Plain Python: ``torch.broadcast_shapes`` imports sympy on first use
    (0.4 s of every command's start).

    >>> broadcast_shape((3, 1), (1, 4)), broadcast_shape((2, 3), (3, 2))
    ((3, 4), None)
    """
    ndim = max((len(shape) for shape in shapes), default=0)
    out = []
    for sizes in zip(*[(1,) * (ndim - len(shape)) + tuple(shape) for shape in shapes]):
        others = {size for size in sizes if size != 1}
        if len(others) > 1:
            return None
        out.append(others.pop() if others else 1)
    return tuple(out)

@dataclass(frozen=True)
class LayerMask:
    """One layer's mask: a tensor that broadcasts against the layer input, or
    one tensor per selected feature along ``feature_dim``."""

    mask: torch.Tensor | tuple[torch.Tensor, ...]
    features: tuple[int, ...] | None = None
    feature_dim: int | None = None
    input_shape: tuple[int, ...] | None = None  # one sample's input, as seen in calibration
    #: the layer's new parameters (compensation), applied before the mask in every squash mode
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    method: str | None = None  # the selection method that chose the mask
    compensate: str | None = None  # the compensation applied ("none", "bias", "lstsq")
    damping: float | None = None
    note: str | None = None  # why the compensation applied differs from the recipe's
    #: the weight's layout: ``out-in`` is ``(out, in, *kernel)`` whatever the layer's;
    #: ``native``, the layer's own, is how masks files without a layout stored it
    weight_layout: str = "out-in"

    def __post_init__(self) -> None:
        if (self.features is None) != isinstance(self.mask, torch.Tensor):
            raise MaskError("a per-feature mask needs its features (and a plain mask none)")
        if self.features is not None:
            if self.feature_dim is None or len(self.features) != len(self.mask):
                raise MaskError(f"{len(self.mask)} feature masks for {len(self.features)} features (feature_dim {self.feature_dim})")

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.mask,) if isinstance(self.mask, torch.Tensor) else tuple(self.mask)

    def check(self, name: str) -> None:
        """Raise :class:`MaskError` naming layer ``name`` where the mask cannot be
        used: values not floating point or bool (an integer mask would be cast
        silently, a complex one has no meaning), NaN / Inf, malformed features or
        feature_dim, an input shape that is not positive integers or that would
        make a dense mask of more than ``MAX_DENSE_VALUES`` values."""
        for t in self.tensors:
            if not isinstance(t, torch.Tensor):
                raise MaskError(f"mask of layer {name!r} is a {type(t).__name__}, not a tensor")
            if not (t.is_floating_point() or t.dtype == torch.bool):
                raise MaskError(
                    f"mask of layer {name!r} is {str(t.dtype).removeprefix('torch.')}: masks must be floating point "
                    "or bool (1 keeps, 0 zeroes); convert it with .float()"
                )
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise MaskError(f"mask of layer {name!r} holds NaN or Inf: the masks are corrupted; calibrate again")
        if self.input_shape is not None and not (
            isinstance(self.input_shape, (tuple, list)) and all(is_int(n) and n >= 1 for n in self.input_shape)
        ):
            raise MaskError(f"input shape of layer {name!r} must be positive integers, got {self.input_shape!r}")
        self._check_edits(name)
        if self.features is None:
            return
        if not is_int(self.feature_dim):
            raise MaskError(f"feature_dim of layer {name!r} must be an integer, got {self.feature_dim!r}")
        indices = feature_indices(self.features, name)
        if self.input_shape is None:
            if self.feature_dim == 0:
                raise MaskError(f"feature_dim 0 of layer {name!r} is the batch axis: the masks are corrupted")
            return
        n = len(self.input_shape) + 1
        if not -n <= self.feature_dim < n or self.feature_dim % n == 0:
            raise MaskError(
                f"feature_dim {self.feature_dim} of layer {name!r} must name a non-batch axis of an input of "
                f"shape {list(self.input_shape)}: the masks are corrupted"
            )
        size = self.input_shape[self.feature_dim % n - 1]
        for index in indices:
            if index >= size:
                raise MaskError(
                    f"feature {index} of layer {name!r} is out of range: its input shape {list(self.input_shape)} "
                    f"has {size} along feature_dim {self.feature_dim}"
                )
        values = math.prod(self._dense_shape())
        if values > MAX_DENSE_VALUES:
            raise MaskError(
                f"mask of layer {name!r}: its input shape {list(self.input_shape)} would make a dense mask of "
                f"{values} values, more than {MAX_DENSE_VALUES}: the masks are corrupted or not for this model"
            )

    def _check_edits(self, name: str) -> None:
        """The method metadata well formed; the edits finite floating point
        tensors, the weight ``(out, in, *kernel)`` with ``in`` the mask's (and the
        input's) feature count, the bias ``(out,)``."""
        from .compensate import COMPENSATIONS

        if self.method is not None and not (isinstance(self.method, str) and 0 < len(self.method) <= 64):
            raise MaskError(f"method {str(self.method)[:40]!r} of layer {name!r} is not a method name")
        if self.compensate is not None and self.compensate not in COMPENSATIONS:
            raise MaskError(f"compensate {str(self.compensate)[:40]!r} of layer {name!r} is not one of {', '.join(COMPENSATIONS)}")
        if self.damping is not None and not (
            isinstance(self.damping, (int, float)) and not isinstance(self.damping, bool) and math.isfinite(self.damping) and self.damping >= 0
        ):
            raise MaskError(f"damping {self.damping!r} of layer {name!r} must be a finite number >= 0")
        if self.note is not None and not isinstance(self.note, str):
            raise MaskError(f"note of layer {name!r} must be text")
        if self.weight_layout not in WEIGHT_LAYOUTS:
            raise MaskError(f"weight layout {str(self.weight_layout)[:40]!r} of layer {name!r} is not one of {', '.join(WEIGHT_LAYOUTS)}")
        for what, t in (("weight", self.weight), ("bias", self.bias)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise MaskError(f"{what} of layer {name!r} is a {type(t).__name__}, not a tensor")
            if not t.is_floating_point():
                raise MaskError(f"{what} of layer {name!r} is {str(t.dtype).removeprefix('torch.')}: it must be floating point")
            if not bool(torch.isfinite(t).all()):
                raise MaskError(f"{what} of layer {name!r} holds NaN or Inf: the masks are corrupted; calibrate again")
        if self.features is not None and (self.weight is not None or self.bias is not None):
            raise MaskError(f"layer {name!r}: per-feature masks carry no weight edits")
        weight, bias = self.weight, self.bias
        if weight is not None and self.weight_layout == "out-in":
            if weight.ndim < 2:
                raise MaskError(f"weight of layer {name!r} has shape {list(weight.shape)}: it must be (out, in, *kernel)")
            width = int(weight.shape[1])
            axis = -1 if weight.ndim == 2 else -(weight.ndim - 1)  # the input's feature axis
            sizes = [("mask", list(self.mask.shape))] if isinstance(self.mask, torch.Tensor) else []
            sizes += [("input", list(self.input_shape))] if self.input_shape is not None else []
            for what, shape in sizes:
                if len(shape) < -axis or shape[axis] != width:
                    raise MaskError(
                        f"weight of layer {name!r} has {width} input features, its {what} of shape {shape} does not: "
                        "the masks are corrupted or not for this model"
                    )
        if bias is not None:
            out = int(weight.shape[0]) if weight is not None and self.weight_layout == "out-in" else None
            if bias.ndim != 1 or (out is not None and bias.shape[0] != out):
                raise MaskError(f"bias of layer {name!r} has shape {list(bias.shape)}: it must be ({out if out is not None else 'out'},)")

    def _dense_shape(self) -> list[int]:
        """The shape :meth:`dense` makes for per-feature masks, with a batch axis
        first, computed without making anything."""
        if self.input_shape is None or self.feature_dim is None:
            raise MaskError("a per-feature mask needs the layer's input shape to be made dense")
        full_shape = (1, *self.input_shape)  # batch axis first
        n = len(full_shape)
        if not -n <= self.feature_dim < n or self.feature_dim % n == 0:
            raise MaskError(f"feature_dim {self.feature_dim} must name a non-batch axis of an input of shape {list(self.input_shape)}")
        aligned = []
        for t in self.tensors:
            if t.ndim > n:
                raise MaskError(f"a feature mask of shape {list(t.shape)} has more axes than the input {list(self.input_shape)}")
            aligned.append((1,) * (n - t.ndim) + tuple(t.shape))
        together = broadcast_shape(*aligned)
        if together is None:
            raise MaskError(f"feature masks of shapes {[list(s) for s in aligned]} do not broadcast together")
        shape = list(together)
        if shape[0] != 1:
            raise MaskError(f"feature masks of shape {shape} have a batch axis: they cannot be baked into the model")
        shape[self.feature_dim % n] = full_shape[self.feature_dim % n]
        return shape

    @property
    def sparsity(self) -> float:
        """The fraction of mask entries that are zero."""
        total = sum(t.numel() for t in self.tensors)
        zeros = sum(int((t == 0).sum()) for t in self.tensors)
        return zeros / total if total else 0.0

    def dense(self) -> torch.Tensor:
        """One tensor with the same effect, broadcasting against the layer input.

        A plain mask is returned as is. Per-feature masks (upstream semantics:
        ``index_select(input, feature_dim, [f]) * mask[i]``) become one tensor
        that is 1 at unselected features, using the input size recorded at
        calibration; leading size-1 axes are dropped.
        """
        if isinstance(self.mask, torch.Tensor):
            return self.mask
        shape = self._dense_shape()
        if math.prod(shape) > MAX_DENSE_VALUES:
            raise MaskError(
                f"a per-feature mask over an input of shape {list(self.input_shape or ())} would make a dense mask "
                f"of {math.prod(shape)} values, more than {MAX_DENSE_VALUES}"
            )
        n = len(shape)
        fd = self.feature_dim % n  # type: ignore[operator]
        aligned = [t.reshape((1,) * (n - t.ndim) + tuple(t.shape)) for t in self.mask]
        full = torch.ones(shape, dtype=self.mask[0].dtype)
        for feature, t in zip(self.features or (), aligned):
            for position, index in enumerate(torch.tensor(feature).reshape(-1).tolist()):
                full.select(fd, index).mul_(t.select(fd, 0 if t.shape[fd] == 1 else position))
        while full.ndim > 1 and full.shape[0] == 1:
            full = full[0]
        return full

    def method_row(self) -> dict[str, Any]:
        """The method metadata and the edits' shapes, for a layer that has them (else nothing)."""
        row: dict[str, Any] = {}
        for key in ("method", "compensate", "damping", "note"):
            if getattr(self, key) is not None:
                row[key] = getattr(self, key)
        for key in ("weight", "bias"):
            t = getattr(self, key)
            if t is not None:
                row[f"{key}_shape"] = list(t.shape)
        if self.weight is not None:
            row["weight_layout"] = self.weight_layout
        return row

    @property
    def shape(self) -> list[int] | list[list[int]]:
        if isinstance(self.mask, torch.Tensor):
            return list(self.mask.shape)
        return [list(t.shape) for t in self.mask]


@dataclass
class Masks:
    """Layer name -> :class:`LayerMask`, with where they came from."""

    layers: dict[str, LayerMask]
    recipe: Recipe | None = None
    num_samples: int = 0
    num_batches: int = 0
    model: str | None = None
    tool_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Check every layer's mask (:meth:`LayerMask.check`); squash calls it
        again, since the tensors may have changed since construction."""
        for name, lm in self.layers.items():
            if not isinstance(lm, LayerMask):
                raise MaskError(f"the mask of layer {name!r} is a {type(lm).__name__}, not a LayerMask")
            lm.check(name)

    @classmethod
    def from_sparsifier(cls, sparsifier: Any, model: str | None = None) -> Masks:
        """The masks of a live sparsifier after ``step()``, checked as calibration
        checks them (finite, floating point or bool, broadcasting against the input)."""
        layers = {}
        for name, config in sparsifier.data_groups.items():
            layers[name] = checked_layer_mask(
                name, sparsifier.get_mask(name), config["features"], config["feature_dim"], sparsifier.input_shape(name)
            )
        return cls(layers=layers, model=model)

    def __getitem__(self, name: str) -> LayerMask:
        try:
            return self.layers[name]
        except KeyError:
            raise MaskError(f"no mask for layer {name!r}; masked layers: {', '.join(self.layers)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def summary(self) -> list[dict[str, Any]]:
        """One row per layer: name, mask shape, input shape, achieved sparsity."""
        return [
            {
                "layer": name,
                "mask_shape": lm.shape,
                "input_shape": list(lm.input_shape) if lm.input_shape is not None else None,
                "features": list(lm.features) if lm.features is not None else None,
                "feature_dim": lm.feature_dim,
                "sparsity": round(lm.sparsity, 6),
                **lm.method_row(),
            }
            for name, lm in self.layers.items()
        ]

    def notes(self) -> list[str]:
        """One line per selected layer left out (``extra["skipped"]``: the forward
        pass never called it), per layer note, and per layer whose mask zeroes
        100 % of its input: the model no longer depends on that input (a constant
        downstream). Not errors (the masks are what the recipe asked for) but
        worth telling the user."""
        skipped = self.extra.get("skipped")
        out = [f"layer {name!r}: {why}" for name, why in skipped.items()] if isinstance(skipped, dict) else []
        for name, lm in self.layers.items():
            if lm.note:
                out.append(f"layer {name!r}: {lm.note}")
            if _zeroes_everything(lm):
                out.append(
                    f"layer {name!r}: its mask zeroes 100% of its input, so the model's output does not depend on "
                    "its input there (sparsity 1.0): lower the sparsity or mask fewer features"
                )
        return out

    def overall_sparsity(self) -> float:
        total = sum(t.numel() for lm in self.layers.values() for t in lm.tensors)
        zeros = sum(int((t == 0).sum()) for lm in self.layers.values() for t in lm.tensors)
        return zeros / total if total else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "tool_version": self.tool_version,
            "num_samples": self.num_samples,
            "num_batches": self.num_batches,
            "overall_sparsity": round(self.overall_sparsity(), 6),
            "layers": self.summary(),
            "recipe": self.recipe.to_dict() if self.recipe is not None else None,
            "notes": self.notes(),
        }

    # --- files -------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write atomically (an existing file is replaced: check before calling)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, lm in self.layers.items():
            if isinstance(lm.mask, torch.Tensor):
                tensors[name] = lm.mask
            else:
                tensors.update({f"{name}{SEP}{i}": t for i, t in enumerate(lm.mask)})
            for key in ("weight", "bias"):
                if getattr(lm, key) is not None:
                    tensors[f"{name}{SEP}{key}"] = getattr(lm, key)
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "tool_version": self.tool_version,
            "model": self.model or "",
            "num_samples": str(self.num_samples),
            "num_batches": str(self.num_batches),
            "recipe": self.recipe.dumps() if self.recipe is not None else "",
            "layers": json.dumps(self.summary()),
            "extra": json.dumps(self.extra),
        }
        save_safetensors(Path(path), tensors, metadata)

    @classmethod
    def load(cls, path: str | Path) -> Masks:
        """Read and check a masks file: every tensor finite and floating point (or
        bool), every layer's features, feature_dim and input shape well formed."""
        path = Path(path)
        tensors, metadata = load_safetensors(path, "masks")
        check_format(metadata, FORMAT, FORMAT_VERSION, path)
        try:
            rows = json.loads(metadata["layers"])
            if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
                raise MaskError(f"masks file {path}: 'layers' must be a list of tables, one per layer")
            layers: dict[str, LayerMask] = {}
            for row in rows:
                if layer_name_in_file(row.get("layer")) in layers:
                    raise MaskError(f"masks file {path}: layer {row['layer']!r} is listed twice")
                layers[row["layer"]] = _layer_from_row(row, tensors)
            recipe = Recipe.from_toml(metadata["recipe"], f"recipe in {path}") if metadata.get("recipe") else None
            num_samples, num_batches = int(metadata["num_samples"]), int(metadata.get("num_batches", "0"))
            if num_samples < 0 or num_batches < 0:
                raise MaskError(f"masks file {path}: negative sample count {num_samples} or batch count {num_batches}")
            extra = json.loads(metadata.get("extra", "{}"))
            if not isinstance(extra, dict):
                raise MaskError(f"masks file {path}: 'extra' must be a table")
            if "skipped" in extra:
                extra["skipped"] = skipped_in_file(extra["skipped"], layers)
            masks = cls(
                layers=layers,
                recipe=recipe,
                num_samples=num_samples,
                num_batches=num_batches,
                model=model_name_in_file(metadata.get("model") or None),
                tool_version=metadata["tool_version"],
                extra=extra,
            )
        except MaskError as e:
            raise MaskError(f"masks file {path}: {e}" if str(path) not in str(e) else str(e)) from e
        except RecipeError as e:  # the recipe is part of the masks file: exit code 8, not 3
            raise MaskError(str(e)) from e
        except RecursionError as e:
            raise MaskError(f"masks file {path} holds metadata nested too deeply to read: it is corrupted or hostile") from e
        except (KeyError, TypeError, ValueError) as e:
            raise MaskError(f"masks file {path} is incomplete or malformed ({e!r})") from e
        expected = {f"{n}{SEP}{i}" if lm.features is not None else n for n, lm in layers.items() for i in range(len(lm.tensors))}
        expected |= {f"{n}{SEP}{key}" for n, lm in layers.items() for key in ("weight", "bias") if getattr(lm, key) is not None}
        if set(tensors) != expected:
            raise MaskError(f"masks file {path} holds tensors {sorted(set(tensors) ^ expected)} its metadata does not describe")
        return masks


def _zeroes_everything(lm: LayerMask) -> bool:
    """Every value of the layer's input is multiplied by 0."""
    if not lm.tensors or any(bool((t != 0).any()) for t in lm.tensors):
        return False
    if lm.features is None:
        return sum(t.numel() for t in lm.tensors) > 0
    if lm.input_shape is None or lm.feature_dim is None:
        return False
    size = lm.input_shape[lm.feature_dim % (len(lm.input_shape) + 1) - 1]
    return set(feature_indices(lm.features, "?")) == set(range(size))


def checked_layer_mask(
    name: str,
    mask: Any,
    features: list[Any] | None,
    feature_dim: int | None,
    input_shape: tuple[int, ...] | None,
) -> LayerMask:
    """A sparsifier's mask for layer ``name`` as a :class:`LayerMask`, refused
    (:class:`CalibrationError`) where it is not a finite floating point (or bool)
    tensor that broadcasts against the layer's input (``input_shape``: batched)."""
    sample_shape = tuple(input_shape[1:]) if input_shape else None
    tensors = [mask] if isinstance(mask, torch.Tensor) else list(mask)
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise CalibrationError(f"the mask function of layer {name!r} returned {type(t).__name__}, not a tensor")
        if not (t.is_floating_point() or t.dtype == torch.bool):
            raise CalibrationError(
                f"the mask of layer {name!r} is {str(t.dtype).removeprefix('torch.')}: a mask function must return "
                "floating point or bool masks (1 keeps, 0 zeroes)"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CalibrationError(f"the mask of layer {name!r} holds NaN or Inf")
    if input_shape is not None:
        full = list(input_shape)
        if features is not None and feature_dim is not None:
            full[feature_dim] = 1
        for t in tensors:
            if broadcast_shape(tuple(t.shape), tuple(full)) != tuple(full):
                raise CalibrationError(
                    f"the mask of layer {name!r} has shape {tuple(t.shape)}, which does not broadcast "
                    f"against the layer's input {tuple(full)}: check the recipe's reduce and mask functions"
                )
    if features is None:
        return LayerMask(mask=tensors[0].detach().clone(), input_shape=sample_shape)
    return LayerMask(
        mask=tuple(t.detach().clone() for t in tensors),
        features=tuple(features),
        feature_dim=feature_dim,
        input_shape=sample_shape,
    )


def _layer_from_row(row: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LayerMask:
    name = row["layer"]
    features = row.get("features")
    if features is not None:
        feature_indices(features, name)  # before they name tensors
    if features is None:
        mask: Any = tensors[name]
        shapes = [list(mask.shape)]
        expected_shapes = [row["mask_shape"]]
    else:
        mask = tuple(tensors[f"{name}{SEP}{i}"] for i in range(len(features)))
        shapes = [list(t.shape) for t in mask]
        expected_shapes = row["mask_shape"]
    if shapes != expected_shapes:
        raise MaskError(f"mask of layer {name!r} has shape {shapes}, its metadata says {expected_shapes}")
    input_shape = row.get("input_shape")
    if input_shape is not None and not isinstance(input_shape, list):
        raise MaskError(f"input shape of layer {name!r} must be a list of positive integers, got {input_shape!r}")
    edits: dict[str, Any] = {}
    for key in ("weight", "bias"):
        declared = row.get(f"{key}_shape")
        tensor = tensors.get(f"{name}{SEP}{key}")
        if declared is None:
            continue  # a tensor the row does not declare is refused with the others
        if tensor is None:
            raise MaskError(f"{key} of layer {name!r} is declared but tensor {name}{SEP}{key!s} is missing")
        if list(tensor.shape) != declared:
            raise MaskError(f"{key} of layer {name!r} has shape {list(tensor.shape)}, its metadata says {str(declared)[:80]}")
        edits[key] = tensor
    damping = row.get("damping")
    return LayerMask(
        mask=mask,
        features=tuple(features) if features is not None else None,
        feature_dim=row.get("feature_dim"),
        input_shape=tuple(input_shape) if input_shape is not None else None,
        method=row.get("method"),
        compensate=row.get("compensate"),
        damping=damping,
        note=row.get("note"),
        # a weight without a layout was stored in the layer's own (the files of 0.1.0)
        weight_layout=row.get("weight_layout", "native" if "weight" in edits else "out-in"),
        **edits,
    )
