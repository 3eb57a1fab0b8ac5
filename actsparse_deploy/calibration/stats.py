"""Calibration statistics: what *collect* gathers and *select* turns into masks.

Per layer a :class:`LayerStats` holds the running statistic (a built-in
aggregate's :class:`~actsparse_deploy.calibration.functions.RunningStat`, one per selected
feature where ``features`` is set; or a user aggregate's raw tensor), its sample
count, one sample's input shape and dtype, how batches combine (``"sum"``,
``"max"``; ``None`` for a user aggregate, which cannot be merged), the
aggregate's spec and the layer's types. :class:`Statistics` holds the layers
with the recipe, model name, sample / batch counts and the calibration runs it
holds; it merges associatively (statistics of two batch sets merged equal those
collected over both; the same run or identical statistics twice are refused)
and saves to ``.safetensors`` with JSON metadata (no pickle).

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from actsparse_deploy import Recipe, Statistics, collect, select
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> recipe = Recipe.simple(layers=["2"], sparsity=0.5)
    >>> a = collect(model, recipe, [torch.randn(4, 8)])
    >>> b = collect(model, recipe, [torch.randn(4, 8), torch.randn(2, 8)])
    >>> both = a.merge(b)
    >>> both.num_samples, both["2"].count, both["2"].combine
    (10, 10, 'sum')
    >>> path = tempfile.mkdtemp() + "/stats.safetensors"
    >>> both.save(path)
    >>> select(Statistics.load(path))["2"].sparsity
    0.5
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base.errors import CalibrationError, ConfigError, MaskError, RecipeError, first_line
from ..base.serialize import SEP, read_container, write_container
from ..base.version import __version__
from ..nn.modules import resident
from .fields import MAX_DENSE_VALUES, feature_indices, is_int, layer_name_in_file, model_name_in_file, skipped_in_file
from .functions import AGGREGATE_FNS, MAX_COUNT, STAT_DTYPE, Aggregate, LayerStats, RunningStat, same_statistic, stat_tensor
from .recipe import LayerSettings, Recipe, ResolvedLayer

__all__ = [
    "Statistics", "dtype_named", "layer_from_row", "layer_row", "layer_statistics_bytes", "model_fingerprint", "new_run_id", "part_keys",
    "part_shapes", "selection_bytes", "statistics_bytes", "type_names",
]

FORMAT = "actsparse.statistics"
FORMAT_VERSION = 1
#: input dtypes a statistics file may declare (the dtype of the layer's masks)
_DTYPES = {
    str(dt).removeprefix("torch."): dt
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)
}
#: the most calibration runs one statistics file may merge
_MAX_RUNS = 100_000
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_TOOL_VERSION = re.compile(r"[0-9A-Za-z.+-]{1,64}")


def new_run_id() -> str:
    """The id of one calibration run (random): statistics record the runs they hold."""
    return uuid.uuid4().hex


def dtype_named(name: Any) -> torch.dtype | None:
    """The dtype a statistics file or a rank names (``"float32"``), or None for any other name."""
    return _DTYPES.get(name) if isinstance(name, str) else None


def type_names(layer: nn.Module) -> tuple[str, ...]:
    """The qualified names of the layer's classes (its MRO), which a recipe's
    ``type`` rule matches by short or qualified name."""
    return tuple(f"{c.__module__}.{c.__qualname__}" for c in type(layer).__mro__)


def matches_type(wanted: tuple[str, ...], types: tuple[str, ...]) -> bool:
    names = set(types) | {t.rsplit(".", 1)[-1] for t in types}
    return any(t in names for t in wanted)


def statistics_bytes(model: nn.Module, layers: Mapping[str, ResolvedLayer]) -> int:
    """About what the statistics of ``layers`` (a recipe's selection of ``model``) take while they are
    collected, in float64: a layer with a method or a compensation its inputs' Gram matrix (``(n + 1)^2``
    values for ``n`` input features), any other a few vectors of its features.

    >>> from actsparse_deploy.calibration.recipe import Recipe
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    >>> statistics_bytes(model, Recipe.simple(layers=["1"], sparsity=0.5).select(model))
    96
    >>> statistics_bytes(model, Recipe.simple(layers=["1"], sparsity=0.5).with_method("obs", "lstsq").select(model))
    128
    """
    return sum(layer_statistics_bytes(model, name, config) for name, config in layers.items())


#: what choosing one layer's mask with a method (and its refit) holds beside its statistics, in its Gram matrices:
#: the damped inverse, the weight columns in float64, the refit's eigenvectors (measured 4.3-5.2 for 2816 and 5632
#: features: ``tools/measure_select_memory.py``)
SELECT = 5.5


def selection_bytes(model: nn.Module, layers: Mapping[str, ResolvedLayer]) -> int:
    """About what choosing the masks of ``layers`` holds at most beside their statistics (one layer at a time:
    :data:`SELECT` times the largest Gram matrix of a layer with a method or a compensation; 0 where none has one).

    >>> from actsparse_deploy.calibration.recipe import Recipe
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    >>> selection_bytes(model, Recipe.simple(layers=["1"], sparsity=0.5).with_method("obs", "lstsq").select(model))
    704
    """
    grams = [layer_statistics_bytes(model, name, config) for name, config in layers.items()
             if config.method is not None or config.compensate != "none"]
    return int(SELECT * max(grams, default=0))


def layer_statistics_bytes(model: nn.Module, name: str, config: ResolvedLayer) -> int:
    """:func:`statistics_bytes` of one layer."""
    from ..nn.layers import WeightedKind, layer_kind

    kind = layer_kind(module := model.get_submodule(name))
    width = kind.in_features(module) if isinstance(kind, WeightedKind) else max(1, len(config.features or ()))
    gram = config.method is not None or config.compensate != "none"
    return 8 * ((width + 1) ** 2 if gram else 4 * width)


def model_fingerprint(model: nn.Module, layers: Iterable[str]) -> str:
    """A digest of ``model``'s architecture (every module's name and class, every
    parameter's and buffer's name, shape and dtype) and of the weights of
    ``layers`` (the layers the statistics are of; one the model lacks counts as
    missing): statistics with different fingerprints come from different models
    and do not merge."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        digest.update(f"m {name} {type(module).__module__}.{type(module).__qualname__}\n".encode())
    for kind, items in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, tensor in items:
            digest.update(f"{kind} {name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
    modules = dict(model.named_modules())
    for layer in sorted(layers):
        if layer not in modules:  # statistics of a layer this model does not have: another model
            digest.update(f"missing {layer}\n".encode())
            continue
        with resident(modules[layer]):  # weights that wait on disk: read for the digest
            for name, tensor in sorted(modules[layer].named_parameters(recurse=False)):
                digest.update(f"w {layer}.{name}\n".encode())
                digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype: bfloat16 too
    return digest.hexdigest()[:32]


# --- one layer's layout: a statistics file's metadata row and tensors, and what the ranks exchange -----------------


def layer_row(ls: LayerStats) -> dict[str, Any]:
    """``ls`` without its values, in JSON types: a statistics file's metadata row
    of the layer (less its name) and what a rank tells the others of it
    (:mod:`~actsparse_deploy.calibration.distributed`). ``count`` is every part's;
    ``stat_shape`` is a list of shapes, one per part, where ``features`` is set
    (:func:`part_shapes`)."""
    return {
        "aggregate": ls.aggregate,
        "combine": ls.combine,
        "count": ls.count,
        "stat_shape": ls.stat_shape,
        "input_shape": list(ls.input_shape),
        "input_dtype": str(ls.input_dtype).removeprefix("torch."),
        "features": list(ls.features) if ls.features is not None else None,
        "feature_dim": ls.feature_dim,
        "num_samples": ls.num_samples,
        "num_batches": ls.num_batches,
        "layer_types": list(ls.layer_types),
    }


def part_shapes(row: Mapping[str, Any]) -> Any:
    """The shape of each part of the statistic a :func:`layer_row` row describes (as the row holds them, unchecked)."""
    return row["stat_shape"] if row.get("features") is not None else [row["stat_shape"]]


def part_keys(name: str, features: Sequence[Any] | None) -> list[str]:
    """The names of layer ``name``'s tensors in a statistics file, one per part: ``name``, else ``name/i`` per feature."""
    return [f"{name}{SEP}{i}" for i in range(len(features))] if features is not None else [name]


def layer_from_row(row: Mapping[str, Any], parts: Sequence[RunningStat], input_dtype: torch.dtype, **checked: Any) -> LayerStats:
    """The :class:`LayerStats` a :func:`layer_row` row describes, with ``parts`` its
    statistic (one per feature where the row has ``features``); ``checked``: fields
    read and checked by the caller, in place of the row's."""
    features = row.get("features")
    fields: dict[str, Any] = {
        "input_shape": tuple(row["input_shape"]),
        "aggregate": row["aggregate"],
        "features": tuple(features) if features is not None else None,
        "feature_dim": row.get("feature_dim"),
        "num_samples": row["num_samples"],
        "num_batches": row["num_batches"],
        "layer_types": tuple(row.get("layer_types", [])),
        **checked,
    }
    return LayerStats(stat=tuple(parts) if features is not None else parts[0], input_dtype=input_dtype, **fields)


@dataclass
class Statistics:
    """Layer name -> :class:`LayerStats`, with where they came from."""

    layers: dict[str, LayerStats]
    recipe: Recipe | None = None
    num_samples: int = 0
    num_batches: int = 0
    model: str | None = None
    tool_version: str = __version__
    #: :func:`model_fingerprint` of the model and layers the statistics are of (None: unknown)
    fingerprint: str | None = None
    #: the calibration runs the statistics hold (:func:`new_run_id`; a merge holds its parts'):
    #: merging statistics that share a run would count its samples twice
    runs: tuple[str, ...] = field(default_factory=lambda: (new_run_id(),))
    #: selected layers the forward pass never called, left out -> why (saved; :func:`~actsparse_deploy.calibration.calibrate.select`
    #: passes them on to the masks' ``extra["skipped"]``, a merge holds its parts')
    skipped: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, ls in self.layers.items():
            if not isinstance(ls, LayerStats):
                raise MaskError(f"the statistic of layer {name!r} is a {type(ls).__name__}, not a LayerStats")
            ls.check(name)
        for key in ("num_samples", "num_batches"):
            value = getattr(self, key)
            if not (is_int(value) and 0 <= value <= MAX_COUNT):
                raise MaskError(f"{key} must be a non-negative integer, got {value!r}")
        runs = self.runs
        if not (isinstance(runs, tuple) and 1 <= len(runs) <= _MAX_RUNS and len(set(runs)) == len(runs)
                and all(isinstance(r, str) and _RUN_ID.fullmatch(r) for r in runs)):
            raise MaskError(f"runs {str(runs)[:80]} must be 1 to {_MAX_RUNS} distinct run ids (32 hexadecimal digits)")

    def __getitem__(self, name: str) -> LayerStats:
        try:
            return self.layers[name]
        except KeyError:
            raise CalibrationError(f"no statistic for layer {name!r}; layers: {', '.join(self.layers) or 'none'}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    # --- merge -------------------------------------------------------------------

    def merge(self, other: Statistics) -> Statistics:
        """Statistics of both batch sets, as :func:`collect` over both would give
        (to float rounding); associative. Refused (:class:`CalibrationError`)
        for other layers, recipes, models, aggregates or per-sample shapes."""
        if list(self.layers) != list(other.layers):
            raise CalibrationError(
                f"statistics of layers {list(self.layers)} and {list(other.layers)} cannot be merged: "
                "collect both with the same recipe on the same model"
            )
        if self.recipe is not None and other.recipe is not None and self.recipe != other.recipe:
            raise CalibrationError("statistics collected with different recipes cannot be merged: collect both with one recipe")
        if self.model is not None and other.model is not None and self.model != other.model:
            raise CalibrationError(f"statistics of model {self.model!r} and of model {other.model!r} cannot be merged")
        if self.fingerprint is not None and other.fingerprint is not None and self.fingerprint != other.fingerprint:
            raise CalibrationError(
                f"statistics of two different models (architecture or weights of the masked layers: fingerprints "
                f"{self.fingerprint[:12]} and {other.fingerprint[:12]}) cannot be merged"
            )
        major = {v.split(".")[0] for v in (self.tool_version, other.tool_version)}
        if len(major) > 1:
            raise CalibrationError(
                f"statistics written by actsparse_deploy {self.tool_version} and {other.tool_version} (different major "
                "versions) cannot be merged: collect both with one version"
            )
        layers = {name: ls.merge(other.layers[name], name) for name, ls in self.layers.items()}
        self._check_other_data(other)
        return Statistics(
            layers=layers,
            recipe=self.recipe if self.recipe is not None else other.recipe,
            num_samples=self.num_samples + other.num_samples,
            num_batches=self.num_batches + other.num_batches,
            model=self.model if self.model is not None else other.model,
            tool_version=self.tool_version,
            fingerprint=self.fingerprint if self.fingerprint is not None else other.fingerprint,
            runs=self.runs + other.runs,
            skipped=self.skipped | {name: why for name, why in other.skipped.items() if name not in self.skipped},
        )

    def _check_other_data(self, other: Statistics) -> None:
        """Refuse (:class:`CalibrationError`) statistics that share a calibration run
        with these (the same file, a copy, a merge of one of its parts) or are
        identical to them (the same data collected again): merged, the same
        samples would count twice."""
        shared = sorted(set(self.runs) & set(other.runs))
        if shared:
            raise CalibrationError(
                f"both hold the statistics of the same calibration run ({shared[0][:12]}"
                f"{f' and {len(shared) - 1} more' if len(shared) > 1 else ''}): merged, its samples would count twice; "
                "give each part once"
            )
        if self.layers and all(same_statistic(ls, other.layers[name]) for name, ls in self.layers.items()):
            raise CalibrationError(
                "both hold identical statistics (every layer's values and counts): the same data collected twice "
                "would count twice; merge statistics of different data"
            )

    def values_digest(self) -> str:
        """A digest of every layer's name, counts and values: statistics with the
        same digest hold the same data."""
        digest = hashlib.sha256()
        for name, ls in self.layers.items():
            digest.update(f"{name} {ls.num_samples} {ls.num_batches} {ls.count}\n".encode())
            for part in ls.parts:
                digest.update(stat_tensor(part).detach().to("cpu").contiguous().numpy().tobytes())
        return digest.hexdigest()

    # --- selection ---------------------------------------------------------------

    def resolve(self, recipe: Recipe) -> dict[str, ResolvedLayer]:
        """Layer name -> the recipe's settings for it, as ``recipe.select(model)``
        gives them on the model these statistics came from (rules match the
        layer names and the recorded layer types). A rule that matches no layer,
        or settings that need another aggregate or other features than were
        collected, are refused (:class:`RecipeError`)."""
        selected: dict[str, LayerSettings] = {}
        for i, rule in enumerate(recipe.layers):
            hits = [
                name
                for name, ls in self.layers.items()
                if (not rule.name or any(fnmatch.fnmatchcase(name, p) for p in rule.name))
                and (not rule.type or matches_type(rule.type, ls.layer_types))
            ]
            if not hits:
                raise RecipeError(
                    f"layers[{i}] ({rule.describe()}) matches no layer of the statistics; "
                    f"layers: {', '.join(self.layers) or 'none'}"
                )
            for name in hits:
                selected[name] = selected.get(name, recipe.defaults).merged(rule.settings)
        out = {}
        for name in (n for n in self.layers if n in selected):
            config = selected[name].resolve(f"layer {name!r}")
            ls = self.layers[name]
            wanted = config.aggregate_fn.spec
            superset = config.method is not None and (ls.aggregate, wanted) == ("gram", "moments")  # gram holds the moments
            if ls.aggregate != wanted and not superset:
                raise RecipeError(
                    f"layer {name!r}: the statistics were collected with aggregate_fn {ls.aggregate!r}, the recipe asks "
                    f"for {wanted!r}: collect again with this recipe"
                )
            features = tuple(config.features) if config.features is not None else None
            if (features, config.feature_dim) != (ls.features, ls.feature_dim):
                raise RecipeError(
                    f"layer {name!r}: the statistics were collected for features {ls.features} along feature_dim "
                    f"{ls.feature_dim}, the recipe asks for {features} along {config.feature_dim}: collect again"
                )
            out[name] = config
        return out

    # --- files -------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write atomically (an existing file is replaced: check before calling).
        Only statistics of built-in aggregates can be saved."""
        tensors: dict[str, torch.Tensor] = {}
        rows = []
        for name, ls in self.layers.items():
            if ls.aggregate is None or ls.combine is None:
                raise ConfigError(
                    f"layer {name!r}: the statistic of a user aggregate function cannot be saved (it has no portable "
                    "name): collect with a built-in aggregate_fn"
                )
            for key, part in zip(part_keys(name, ls.features), ls.parts):
                tensors[key] = stat_tensor(part).to("cpu", STAT_DTYPE)
            rows.append({"layer": name, **layer_row(ls)})
        metadata = {
            "model": self.model or "",
            "num_samples": str(self.num_samples),
            "num_batches": str(self.num_batches),
            "recipe": self.recipe.dumps() if self.recipe is not None else "",
            "layers": json.dumps(rows),
            "fingerprint": self.fingerprint or "",
            "runs": json.dumps(list(self.runs)),
            "skipped": json.dumps(self.skipped),
        }
        write_container(Path(path), FORMAT, FORMAT_VERSION, tensors, metadata)

    @classmethod
    def load(cls, path: str | Path) -> Statistics:
        """Read and check a statistics file: the format, every layer's name
        (no control characters, dot-separated parts) and aggregate (a known built-in that
        combines as declared), counts, shapes (declared against the tensors, and
        the statistic against the layer's input), dtypes and features, every value
        finite; the model's name (no control characters; only ever shown or compared, never
        loaded from here), the runs the file holds (a file without them: one
        run, named by a digest of its contents) and the layers the collection
        skipped (names, and reasons of plain text)."""
        path = Path(path)
        tensors, metadata = read_container(path, FORMAT, FORMAT_VERSION, "statistics")
        try:
            rows = json.loads(metadata["layers"])
            if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
                raise MaskError("'layers' must be a list of tables, one per layer")
            layers: dict[str, LayerStats] = {}
            for row in rows:
                name = layer_name_in_file(row.get("layer"))
                if name in layers:
                    raise MaskError(f"layer {name!r} is listed twice")
                layers[name] = _layer_from_row(name, row, tensors)
            expected = {key for n, ls in layers.items() for key in part_keys(n, ls.features)}
            if set(tensors) != expected:
                raise MaskError(f"holds tensors {sorted(set(tensors) ^ expected)[:8]} its metadata does not describe")
            recipe = Recipe.from_toml(metadata["recipe"], f"recipe in {path}") if metadata.get("recipe") else None
            stats = cls(
                layers=layers,
                recipe=recipe,
                num_samples=_count_field(metadata["num_samples"], "num_samples"),
                num_batches=_count_field(metadata["num_batches"], "num_batches"),
                model=model_name_in_file(metadata.get("model") or None),
                tool_version=_text_field(metadata["tool_version"], "tool_version", _TOOL_VERSION),
                fingerprint=_text_field(metadata.get("fingerprint") or None, "fingerprint", re.compile(r"[0-9a-f]{1,64}")),
                runs=_runs_field(metadata.get("runs"), tensors, metadata),
                skipped=_skipped_field(metadata.get("skipped"), layers),
            )
        except MaskError as e:
            raise MaskError(f"statistics file {path}: {e}" if str(path) not in str(e) else str(e)) from e
        except RecipeError as e:  # the recipe is part of the file: exit code 8, not 3
            raise MaskError(f"statistics file {path}: {e}") from e
        except RecursionError as e:
            raise MaskError(f"statistics file {path} holds metadata nested too deeply to read: it is corrupted or hostile") from e
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MaskError(f"statistics file {path} is incomplete or malformed ({e!r})") from e
        return stats


def _text_field(value: Any, what: str, pattern: re.Pattern[str]) -> Any:
    if value is not None and not (isinstance(value, str) and pattern.fullmatch(value)):
        raise MaskError(f"{what} {str(value)[:80]!r} is malformed")
    return value


def _runs_field(raw: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, ...]:
    """The runs a file holds (checked by :class:`Statistics`); a file written
    before files named their runs is one run named by a digest of its contents,
    so a copy of it is the same run."""
    if raw is None:
        digest = hashlib.sha256(metadata.get("layers", "").encode())
        for key in sorted(tensors):
            digest.update(key.encode())
            digest.update(tensors[key].contiguous().numpy().tobytes())
        return (digest.hexdigest()[:32],)
    runs = json.loads(raw)
    if not isinstance(runs, list):
        raise MaskError(f"runs {str(raw)[:80]} must be a list of run ids")
    return tuple(runs)


def _skipped_field(raw: Any, layers: dict[str, LayerStats]) -> dict[str, str]:
    """The layers the collection skipped, each -> why (a file written before files kept them: none)."""
    if raw is None:
        return {}
    try:
        skipped = json.loads(raw)
    except RecursionError as e:
        raise MaskError("skipped layers: nested too deeply to read: the file is corrupted or hostile") from e
    except ValueError as e:
        raise MaskError(f"skipped layers: not JSON ({first_line(e)}): the file is corrupted") from e
    return skipped_in_file(skipped, layers)


def _count_field(raw: Any, what: str) -> int:
    if not isinstance(raw, str) or not raw.isdigit() or len(raw) > 19:
        raise MaskError(f"{what} {str(raw)[:40]!r} is not a non-negative integer")
    return int(raw)


def _int_list(value: Any, what: str, name: str, minimum: int) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 64 or not all(is_int(n) and n >= minimum for n in value):
        raise MaskError(f"{what} of layer {name!r} must be a list of integers >= {minimum}, got {str(value)[:80]}")
    return tuple(value)


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > 256 or not all(isinstance(t, str) for t in value):
        raise MaskError(f"layer_types of layer {name!r} must be a list of class names, got {str(value)[:80]}")
    return tuple(value)


def _layer_from_row(name: str, row: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LayerStats:
    """One layer of a statistics file, every declared field checked (also
    against the tensors) before a LayerStats is made of it."""
    try:
        agg = AGGREGATE_FNS.resolve(row["aggregate"])
    except (RecipeError, ConfigError) as e:
        raise MaskError(f"layer {name!r}: {e}") from e
    if not isinstance(agg, Aggregate) or agg.combine != row["combine"]:
        raise MaskError(f"layer {name!r}: aggregate {row['aggregate']!r} does not combine by {row['combine']!r}")
    count = row["count"]
    if not (is_int(count) and 1 <= count <= MAX_COUNT):
        raise MaskError(f"layer {name!r}: sample count {count!r} is not a positive integer")
    dtype = dtype_named(row["input_dtype"])
    if dtype is None:
        raise MaskError(f"layer {name!r}: input dtype {str(row['input_dtype'])[:40]!r} is not one of {', '.join(_DTYPES)}")
    features = row.get("features")
    if features is not None:
        feature_indices(features, name)  # before they name tensors
    keys = part_keys(name, features)
    declared = part_shapes(row)
    if not isinstance(declared, list) or len(declared) != len(keys):
        raise MaskError(f"layer {name!r}: stat_shape {str(row['stat_shape'])[:80]} does not describe {len(keys)} statistic(s)")
    parts = []
    for key, shape in zip(keys, declared):
        shape = _int_list(shape, "stat_shape", name, 0)
        tensor = tensors.get(key)
        if tensor is None:
            raise MaskError(f"layer {name!r}: tensor {key!r} is missing")
        if tuple(tensor.shape) != shape or tensor.dtype != STAT_DTYPE:
            raise MaskError(
                f"layer {name!r}: statistic {key!r} is {str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}, "
                f"its metadata says float64{list(shape)}"
            )
        parts.append(RunningStat(tensor, count, agg.combine))
    input_shape = _int_list(row["input_shape"], "input_shape", name, 1)
    if features is None and row.get("feature_dim") is not None:
        raise MaskError(f"layer {name!r}: feature_dim {str(row['feature_dim'])[:40]} is given without features")
    _check_fits_input(agg, name, [tuple(p.value.shape) for p in parts], input_shape, features is not None)
    return layer_from_row(row, parts, dtype, input_shape=input_shape, aggregate=agg.spec,
                          layer_types=_strings(row.get("layer_types", []), name))


def _check_fits_input(agg: Aggregate, name: str, shapes: list[tuple[int, ...]], input_shape: tuple[int, ...], per_feature: bool) -> None:
    """Refuse a statistic that the layer's input (``input_shape``, one sample's)
    cannot have made: a plain statistic is what the aggregate makes of such an
    input with one or more leading sample axes (worked out on the ``meta`` device:
    shapes only); a per-feature statistic has no more axes than the batched input."""
    if math.prod(input_shape) > MAX_DENSE_VALUES:
        return  # refused by LayerStats.check
    try:
        possible = None if per_feature else _stat_shapes(agg, input_shape)
    except (RuntimeError, ValueError, NotImplementedError) as e:  # more axes than torch takes, say
        raise MaskError(f"layer {name!r}: no input of shape {list(input_shape)[:8]} makes a {agg.name!r} statistic: the file is corrupted") from e
    for shape in shapes:
        fits = len(shape) <= len(input_shape) + 1 if possible is None else shape in possible
        if not fits:
            raise MaskError(
                f"layer {name!r}: a {agg.name!r} statistic of shape {list(shape)} cannot come from an input of shape "
                f"{list(input_shape)}: the file is corrupted"
            )


def _stat_shapes(agg: Aggregate, input_shape: tuple[int, ...]) -> set[tuple[int, ...]]:
    """The shapes of the statistic ``agg`` makes of a batch of inputs of
    ``input_shape`` with 1 to ``len(input_shape)`` sample axes."""
    x = torch.empty((1, *input_shape), device="meta")
    return {tuple(agg.batch_stat(x, tuple(range(n))).shape) for n in range(1, len(input_shape) + 1)}
