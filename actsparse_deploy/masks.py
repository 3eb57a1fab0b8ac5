"""The masks container: what calibration produces and squashing consumes.

Saved as ``.safetensors``: one tensor per layer (``layer::i`` per selected
feature), with JSON metadata holding the recipe, each layer's mask shape,
achieved sparsity and input shape, the number of calibration samples and the
tool version.

    >>> import tempfile, torch
    >>> from actsparse_deploy.masks import LayerMask, Masks
    >>> masks = Masks({"fc": LayerMask(torch.tensor([1.0, 0.0, 1.0, 0.0]))}, num_samples=8)
    >>> path = tempfile.mkdtemp() + "/masks.safetensors"
    >>> masks.save(path)
    >>> Masks.load(path)["fc"].sparsity
    0.5
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from . import __version__
from .errors import MaskError
from .recipe import Recipe
from .serialize import SEP, check_format, load_safetensors, save_safetensors

__all__ = ["LayerMask", "Masks"]

FORMAT = "actsparse.masks"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LayerMask:
    """One layer's mask: a tensor that broadcasts against the layer input, or
    one tensor per selected feature along ``feature_dim``."""

    mask: torch.Tensor | tuple[torch.Tensor, ...]
    features: tuple[int, ...] | None = None
    feature_dim: int | None = None
    input_shape: tuple[int, ...] | None = None  # one sample's input, as seen in calibration

    def __post_init__(self) -> None:
        if (self.features is None) != isinstance(self.mask, torch.Tensor):
            raise MaskError("a per-feature mask needs its features (and a plain mask none)")
        if self.features is not None:
            if self.feature_dim is None or len(self.features) != len(self.mask):
                raise MaskError(f"{len(self.mask)} feature masks for {len(self.features)} features (feature_dim {self.feature_dim})")

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.mask,) if isinstance(self.mask, torch.Tensor) else tuple(self.mask)

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
        if self.input_shape is None or self.feature_dim is None:
            raise MaskError("a per-feature mask needs the layer's input shape to be made dense")
        full_shape = (1, *self.input_shape)  # batch axis first
        n = len(full_shape)
        if not -n <= self.feature_dim < n or self.feature_dim % n == 0:
            raise MaskError(f"feature_dim {self.feature_dim} must name a non-batch axis of an input of shape {list(self.input_shape)}")
        fd = self.feature_dim % n
        aligned = []
        for t in self.mask:
            if t.ndim > n:
                raise MaskError(f"a feature mask of shape {list(t.shape)} has more axes than the input {list(self.input_shape)}")
            aligned.append(t.reshape((1,) * (n - t.ndim) + tuple(t.shape)))
        shape = list(torch.broadcast_shapes(*(t.shape for t in aligned)))
        if shape[0] != 1:
            raise MaskError(f"feature masks of shape {shape} have a batch axis: they cannot be baked into the model")
        shape[fd] = full_shape[fd]
        full = torch.ones(shape, dtype=self.mask[0].dtype)
        for feature, t in zip(self.features or (), aligned):
            for position, index in enumerate(torch.tensor(feature).reshape(-1).tolist()):
                full.select(fd, index).mul_(t.select(fd, 0 if t.shape[fd] == 1 else position))
        while full.ndim > 1 and full.shape[0] == 1:
            full = full[0]
        return full

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

    @classmethod
    def from_sparsifier(cls, sparsifier: Any, model: str | None = None) -> "Masks":
        """The masks of a live sparsifier after ``step()``."""
        layers = {}
        for name, config in sparsifier.data_groups.items():
            mask = sparsifier.get_mask(name)
            shape = sparsifier.input_shape(name)
            features = config["features"]
            layers[name] = LayerMask(
                mask=mask.detach().clone() if features is None else tuple(m.detach().clone() for m in mask),
                features=tuple(features) if features is not None else None,
                feature_dim=config["feature_dim"] if features is not None else None,
                input_shape=tuple(shape[1:]) if shape is not None else None,
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
            }
            for name, lm in self.layers.items()
        ]

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
    def load(cls, path: str | Path) -> "Masks":
        path = Path(path)
        tensors, metadata = load_safetensors(path, "masks")
        check_format(metadata, FORMAT, FORMAT_VERSION, path)
        try:
            rows = json.loads(metadata["layers"])
            layers = {row["layer"]: _layer_from_row(row, tensors) for row in rows}
            recipe = Recipe.from_toml(metadata["recipe"], f"recipe in {path}") if metadata.get("recipe") else None
            masks = cls(
                layers=layers,
                recipe=recipe,
                num_samples=int(metadata["num_samples"]),
                num_batches=int(metadata.get("num_batches", "0")),
                model=metadata.get("model") or None,
                tool_version=metadata["tool_version"],
                extra=json.loads(metadata.get("extra", "{}")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise MaskError(f"masks file {path} is incomplete or malformed ({e!r})") from e
        expected = {f"{n}{SEP}{i}" if lm.features is not None else n for n, lm in layers.items() for i in range(len(lm.tensors))}
        if set(tensors) != expected:
            raise MaskError(f"masks file {path} holds tensors {sorted(set(tensors) ^ expected)} its metadata does not describe")
        return masks


def _layer_from_row(row: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LayerMask:
    name = row["layer"]
    features = row.get("features")
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
    return LayerMask(
        mask=mask,
        features=tuple(features) if features is not None else None,
        feature_dim=row.get("feature_dim"),
        input_shape=tuple(input_shape) if input_shape is not None else None,
    )
