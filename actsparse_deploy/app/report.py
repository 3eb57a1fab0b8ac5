"""The report of a run: one typed object behind every command's ``--json`` and
``convert``'s ``report.json``.

A :class:`Report` has the same top-level keys whichever command made it; a
command fills the sections of the stages it ran and leaves the others ``None``
(``null`` in JSON). Each section is a frozen dataclass whose fields are its JSON
keys, so ``to_json()`` writes exactly the keys ``report.json`` has always had.

    >>> from actsparse_deploy.app.report import Calibration, Report
    >>> report = Report(model="digits-mlp", calibration=Calibration(samples=200, batches=7), overall_sparsity=0.25)
    >>> report.calibration.samples, report.to_json()["calibration"]
    (200, {'samples': 200, 'batches': 7})
    >>> list(report.to_json()) == list(KEYS) and Report.from_json(report.to_json()) == report
    True

This module imports nothing heavy (no torch, no onnx): the command line renders
reports without paying for them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self, TypeVar

from ..base.version import __version__

__all__ = ["KEYS", "Calibration", "Cost", "Export", "Latency", "Report", "Section", "Validation", "named_input_shape"]

S = TypeVar("S", bound="Section")


def _plain(value: Any) -> Any:
    """``value`` as JSON data: sections as their ``to_json()``, tuples as lists."""
    if isinstance(value, Section):
        return value.to_json()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True, kw_only=True)
class Section:
    """A part of a report. Its fields are its JSON keys, in order; a field whose
    metadata says ``omit_none`` is left out of the JSON while it is ``None``.
    Keys this version does not know (from a newer tool, or a stage that added
    one) are kept in ``extra`` and written back after the known ones."""

    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)

    #: field name -> the Section class its JSON parses into (a dict given there is parsed)
    SECTIONS: ClassVar[Mapping[str, type[Section]]] = {}

    def __post_init__(self) -> None:
        for name, section in self.SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, section.from_json(value))

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        """The section ``data`` (a ``to_json()`` result, or the dict a stage returns) describes."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__} is read from a JSON object, not {type(data).__name__}")
        names = cls.keys()
        known = {name: data[name] for name in names if name in data}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.metadata.get("omit_none")):
                continue
            out[f.name] = _plain(value)
        out.update(_plain(self.extra))
        return out


_OMIT_NONE = {"omit_none": True}


@dataclass(frozen=True, kw_only=True)
class Calibration(Section):
    """How much data the masks were learned from."""

    samples: int
    batches: int


@dataclass(frozen=True, kw_only=True)
class Export(Section):
    """The ONNX file written (``ExportResult.to_json()``)."""

    path: str
    exporter: str
    opset: int
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[str, str]]
    seconds: float
    external_data: bool
    size_bytes: int


@dataclass(frozen=True, kw_only=True)
class Validation(Section):
    """ONNX vs PyTorch on held-out data (``ValidationReport.to_json()``)."""

    onnx: str
    passed: bool
    atol: float
    rtol: float
    batch_sizes: list[int]
    samples: int
    max_abs_diff: float
    outputs: list[dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class Cost(Section):
    """What sparsification cost: dense vs sparse per output, and accuracy for a
    classifier with labels (dense, sparse, ONNX; absent otherwise)."""

    outputs: list[dict[str, Any]]
    heldout_samples: int
    accuracy_dense: float | None = field(default=None, metadata=_OMIT_NONE)
    accuracy_sparse: float | None = field(default=None, metadata=_OMIT_NONE)
    accuracy_onnx: float | None = field(default=None, metadata=_OMIT_NONE)


@dataclass(frozen=True, kw_only=True)
class Latency(Section):
    """onnxruntime latency of the dense and the converted model on held-out data
    (``latency.latency_ratio``: median milliseconds per pass over ``samples``
    samples, alternated, after ``warmup`` passes), their ratio (converted / dense:
    below 1 is faster) and the ratio in words (``latency.verdict``)."""

    dense_ms: float
    sparse_ms: float
    ratio: float
    verdict: str
    samples: int
    runs: int
    warmup: int
    threads: int


@dataclass(frozen=True, kw_only=True)
class Report(Section):
    """What a command did. Every key is always present in the JSON.

    ``layers`` holds one row per layer; its keys depend on what ran: ``calibrate``
    and ``inspect`` of a masks file give the masks' rows (layer, mask_shape,
    input_shape, features, feature_dim, sparsity), ``squash`` and ``export`` the
    squash rows (layer, mode, reason, sparsity), ``convert`` both merged,
    ``inspect`` of a model its layers (layer, type, input_shape, foldable).
    ``files``: each file written -> its size in bytes (``convert``: names inside
    its output directory). ``seconds``: per stage, and ``total``. ``threads``: the
    thread count torch and onnxruntime ran with (``--threads``). ``latency``:
    ``convert``'s dense vs converted onnxruntime latency (None with ``--no-latency``
    and for the other commands).
    """

    tool_version: str = __version__
    model: str | None = None
    squash_mode: str | None = None
    calibration: Calibration | None = None
    overall_sparsity: float | None = None
    layers: list[dict[str, Any]] | None = None
    recipe: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    export: Export | None = None
    validation: Validation | None = None
    cost: Cost | None = None
    seconds: dict[str, float] | None = None
    files: dict[str, int] | None = None
    threads: int | None = None
    latency: Latency | None = None

    SECTIONS: ClassVar[Mapping[str, type[Section]]] = {
        "calibration": Calibration, "export": Export, "validation": Validation, "cost": Cost, "latency": Latency,
    }

    @property
    def passed(self) -> bool | None:
        """The validation verdict, or None where nothing was validated."""
        return self.validation.passed if self.validation is not None else None

    def replace(self, **changes: Any) -> Report:
        """A copy with ``changes`` (sections may be given as JSON dicts)."""
        return dataclasses.replace(self, **changes)

    def with_file(self, name: str, size: int) -> Report:
        return self.replace(files={**(self.files or {}), name: size})


#: the top-level keys of every report, in order
KEYS = tuple(Report.keys())


def named_input_shape(row: Mapping[str, Any]) -> list[int | str] | None:
    """A masks row's ``input_shape`` (one sample's input, as calibration first saw
    it) with the leading axes its mask is shared across named: they take any
    length (a token layer's positions), so the first batch's length would
    mislead. One such axis is ``sequence``, more are ``positions_1``, ...

    >>> named_input_shape({"input_shape": [5, 1536], "mask_shape": [1536]})
    ['sequence', 1536]
    >>> named_input_shape({"input_shape": [16, 8, 8], "mask_shape": [16, 1, 1]})
    [16, 8, 8]
    """
    shape, mask = row.get("input_shape"), row.get("mask_shape")
    if not shape or not mask or not all(isinstance(n, int) for n in mask) or len(mask) >= len(shape):
        return None if shape is None else list(shape)
    shared = len(shape) - len(mask)
    names = ["sequence"] if shared == 1 else [f"positions_{i + 1}" for i in range(shared)]
    return [*names, *shape[shared:]]
