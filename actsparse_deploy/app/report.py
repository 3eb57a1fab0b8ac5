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

A stage's JSON (a dict) becomes its section where it is handed over, so what is
read back is typed: the budget a ``--max-cost`` search chose, the perplexity and
the other-text cosine of the cost, the exporter asked for, an ONNX file's graph.

    >>> cost = Report(cost={"outputs": [], "heldout_samples": 8, "perplexity_dense": 9.0, "perplexity_sparse": 9.9}).cost
    >>> cost.perplexity, round(cost.perplexity.ratio, 3), cost.to_json()["perplexity_sparse"]
    (Perplexity(dense=9.0, sparse=9.9, onnx=None), 1.1, 9.9)

The results of a sweep (``sweep.json``) are a :class:`SweepResult`.

This module imports nothing heavy (no torch, no onnx): the command line renders
reports without paying for them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Self, TypeVar

from ..base.version import __version__

__all__ = [
    "KEYS",
    "BudgetSearch",
    "Calibration",
    "Cost",
    "Export",
    "ExportRequest",
    "HeldoutCost",
    "Latency",
    "OnnxGraph",
    "OtherText",
    "Perplexity",
    "QuantizedCheck",
    "Report",
    "Section",
    "SweepLatency",
    "SweepResult",
    "SweepRow",
    "Validation",
    "named_input_shape",
]

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
    metadata says ``omit_none`` is left out of the JSON while it is ``None``; a
    field whose metadata says ``flat`` (a prefix) is a section whose keys sit
    beside the others, each with that prefix (``perplexity_dense``). Keys this
    version does not know (from a newer tool) are kept in ``unknown`` and
    written back after the known ones."""

    unknown: Mapping[str, Any] = field(default_factory=dict, repr=False)

    #: field name -> the Section class its JSON parses into (a dict given there is parsed)
    SECTIONS: ClassVar[Mapping[str, type[Section]]] = {}
    #: list field name -> the Section class of its rows (dicts given there are parsed)
    ROWS: ClassVar[Mapping[str, type[Section]]] = {}

    def __post_init__(self) -> None:
        for name, section in self.SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, section.from_json(value))
        for name, row in self.ROWS.items():
            value = getattr(self, name)
            if isinstance(value, list) and any(isinstance(v, Mapping) for v in value):
                object.__setattr__(self, name, [row.from_json(v) if isinstance(v, Mapping) else v for v in value])

    @classmethod
    def keys(cls) -> list[str]:
        """The keys of the fields written as themselves (not ``flat``), in order."""
        return [f.name for f in fields(cls) if f.name != "unknown" and "flat" not in f.metadata]

    @classmethod
    def required(cls) -> list[str]:
        """The keys without which the JSON is not this section."""
        return [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        """The section ``data`` (a ``to_json()`` result, or the dict a stage returns) describes."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__} is read from a JSON object, not {type(data).__name__}")
        known: dict[str, Any] = {name: data[name] for name in cls.keys() if name in data}
        taken = set(known)
        for f in fields(cls):
            if "flat" in f.metadata:
                prefix, section = f.metadata["flat"], cls.SECTIONS[f.name]
                part = {key: data[prefix + key] for key in section.keys() if prefix + key in data}
                if all(key in part for key in section.required()):
                    known[f.name] = section.from_json(part)
                    taken |= {prefix + key for key in part}
        return cls(**known, unknown={k: v for k, v in data.items() if k not in taken})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "unknown" or (value is None and (f.metadata.get("omit_none") or "flat" in f.metadata)):
                continue
            if "flat" in f.metadata:
                out.update({f.metadata["flat"] + key: item for key, item in value.to_json().items()})
            else:
                out[f.name] = _plain(value)
        out.update(_plain(self.unknown))
        return out

    @property
    def extra(self) -> dict[str, Any]:
        """The JSON keys beyond this section's own fields: its ``flat`` sections'
        and the ``unknown`` ones (read the typed fields; this is what the JSON holds)."""
        own = set(self.keys())
        return {k: v for k, v in self.to_json().items() if k not in own}


_OMIT_NONE = {"omit_none": True}


def _flat(prefix: str) -> Any:
    """A section field whose keys sit in its parent's JSON, each after ``prefix`` (absent while None)."""
    return field(default=None, metadata={"flat": prefix})


@dataclass(frozen=True, kw_only=True)
class Calibration(Section):
    """How much data the masks were learned from."""

    samples: int
    batches: int


@dataclass(frozen=True, kw_only=True)
class ExportRequest(Section):
    """What the export was asked for (``export`` and ``convert``): the exporter
    and opset requested, and why another exporter was used (``fallback``; None
    where none was)."""

    requested_exporter: str
    fallback: str | None
    requested_opset: int | None


@dataclass(frozen=True, kw_only=True)
class OnnxGraph(Section):
    """What an ONNX file's graph holds (``inspect MODEL.onnx``; ``validate.describe_onnx``):
    each input's and output's dtype and shape, the opsets, operator counts,
    initializers and their parameters and bytes, the external data files."""

    input_shapes: list[dict[str, Any]]
    output_shapes: list[dict[str, Any]]
    file_bytes: int
    ir_version: int
    producer: str
    opsets: dict[str, int]
    nodes: int
    ops: dict[str, int]
    initializers: int
    parameters: int
    initializer_bytes: int
    metadata: dict[str, str]
    data_files: list[dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class Export(Section):
    """The ONNX file written (``ExportResult.to_json()``: ``request`` says what was
    asked for), or the one ``inspect`` read (``seconds`` None; ``graph`` what it holds)."""

    path: str
    exporter: str
    opset: int
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[str, str]]
    seconds: float | None
    external_data: bool
    size_bytes: int
    request: ExportRequest | None = _flat("")
    graph: OnnxGraph | None = _flat("")
    #: a causal language model exported as a decoder with a KV cache (``convert``; None where not said)
    cache: bool | None = field(default=None, metadata=_OMIT_NONE)
    #: the weights' dtype in the ONNX model, and the one they were stored in (``convert``; None where not said)
    dtype: str | None = field(default=None, metadata=_OMIT_NONE)
    source_dtype: str | None = field(default=None, metadata=_OMIT_NONE)

    SECTIONS: ClassVar[Mapping[str, type[Section]]] = {"request": ExportRequest, "graph": OnnxGraph}


@dataclass(frozen=True, kw_only=True)
class Generation(Section):
    """A decoder with a KV cache checked as it is used (``generate.GenerationReport.to_json()``):
    prompts fed whole, in a prefill and one token at a time against one PyTorch pass, then
    ``new_tokens`` greedy tokens after each prompt, ONNX against PyTorch with its own cache."""

    onnx: str
    passed: bool
    atol: float
    rtol: float
    prompts: int
    prompt_tokens: list[int]
    new_tokens: int
    tokens_identical: bool
    max_abs_diff: float
    prefill_max_abs_diff: float
    step_max_abs_diff: list[float]
    prompt_ids: list[list[int]]
    tokens: list[list[int]]


@dataclass(frozen=True, kw_only=True)
class Validation(Section):
    """ONNX vs PyTorch on held-out data (``ValidationReport.to_json()``): with the
    input shapes validated (``shapes``) and the lengths of each sequence axis
    (``sequence_lengths``, ``{label: [lengths]}``)."""

    onnx: str
    passed: bool
    atol: float
    rtol: float
    batch_sizes: list[int]
    samples: int
    max_abs_diff: float
    outputs: list[dict[str, Any]]
    shapes: list[dict[str, list[int]]] | None = field(default=None, metadata=_OMIT_NONE)
    sequence_lengths: dict[str, list[int]] | None = field(default=None, metadata=_OMIT_NONE)
    generation: Generation | None = field(default=None, metadata=_OMIT_NONE)

    SECTIONS: ClassVar[Mapping[str, type[Section]]] = {"generation": Generation}


@dataclass(frozen=True, kw_only=True)
class OtherText(Section):
    """The cost under domain shift (``--other-text``, or a built-in's own second text): per
    output, the cosine of the sparse to the dense model on text that is neither
    calibration nor held-out data; a language model's perplexity there, dense and sparse."""

    outputs: list[dict[str, Any]]
    samples: int | None
    perplexity_dense: float | None = field(default=None, metadata=_OMIT_NONE)
    perplexity_sparse: float | None = field(default=None, metadata=_OMIT_NONE)


@dataclass(frozen=True, kw_only=True)
class Perplexity(Section):
    """Held-out next-token perplexity of a causal language model: dense, sparse and
    (where an ONNX model was run) ONNX. In the cost's JSON as ``perplexity_dense``, ..."""

    dense: float
    sparse: float
    onnx: float | None = field(default=None, metadata=_OMIT_NONE)

    @property
    def ratio(self) -> float:
        """Sparse over dense: above 1 is worse."""
        return self.sparse / self.dense


@dataclass(frozen=True, kw_only=True)
class Cost(Section):
    """What sparsification cost: dense vs sparse per output, and accuracy for a
    classifier with labels (dense, sparse, ONNX; absent otherwise); the cosine
    on other text and the perplexity of a language model where they apply. With
    ``--quantize`` these are the float sparse model's (its ONNX export, validated, then
    quantized): the int8 model written is in ``quantization`` (``budget``, ``frontier``)."""

    outputs: list[dict[str, Any]]
    heldout_samples: int
    accuracy_dense: float | None = field(default=None, metadata=_OMIT_NONE)
    accuracy_sparse: float | None = field(default=None, metadata=_OMIT_NONE)
    accuracy_onnx: float | None = field(default=None, metadata=_OMIT_NONE)
    other_text: OtherText | None = field(default=None, metadata=_OMIT_NONE)
    perplexity: Perplexity | None = _flat("perplexity_")

    SECTIONS: ClassVar[Mapping[str, type[Section]]] = {"other_text": OtherText, "perplexity": Perplexity}


@dataclass(frozen=True, kw_only=True)
class HeldoutCost(Section):
    """A budget's cost on held-out data and whether it keeps the budget; without
    held-out data both None and a note that says so. In the budget's JSON as
    ``heldout_cost``, ``heldout_within``, ``heldout_note``."""

    cost: float | None
    within: bool | None
    note: str | None = field(default=None, metadata=_OMIT_NONE)


@dataclass(frozen=True, kw_only=True)
class BudgetSearch(Section):
    """What a ``--max-cost`` search chose (``budget.BudgetResult.to_json()``): the
    level per layer, the overall sparsity and the uniform level it started from,
    the cost on the tuning split of the calibration data, how many allocations
    it measured, and the held-out cost."""

    budget: str
    levels: dict[str, float]
    overall_sparsity: float
    uniform_level: float
    tuning_cost: float
    tuning_samples: int
    evaluations: int
    #: the tuning cost's standard error over the tuning samples, and the errors the candidates kept the budget by
    #: (``budget.DOUBT`` for cosine and perplexity-ratio; 0: as measured)
    tuning_error: float | None = field(default=None, metadata=_OMIT_NONE)
    doubt: float | None = field(default=None, metadata=_OMIT_NONE)
    heldout: HeldoutCost | None = _flat("heldout_")
    #: ``--quantize`` with the budget: ``mode`` (what runs: ``none`` where ``auto`` left int8 out, and ``why``),
    #: ``share`` (int8 alone on the tuning split) and ``searched_budget`` (what the sparsity was searched to)
    quantization: dict[str, Any] | None = field(default=None, metadata=_OMIT_NONE)
    #: ``--max-cost-other``: the other text the budget held on too: ``samples``, ``tuning_cost`` (the search's
    #: figure there at the levels chosen), ``cost`` / ``within`` (the final model on it)
    other_text: dict[str, Any] | None = field(default=None, metadata=_OMIT_NONE)

    SECTIONS: ClassVar[Mapping[str, type[Section]]] = {"heldout": HeldoutCost}


@dataclass(frozen=True, kw_only=True)
class DecodeLatency(Section):
    """A decoder's generation speed, dense and converted, both with their cache
    (``generate.decode_latency``): batch 1, a held-out prompt, ``new_tokens``
    greedy tokens; ms per new token (the prefill apart), median over ``runs``."""

    dense_ms_per_token: float
    sparse_ms_per_token: float
    ratio: float
    dense_tokens_per_s: float
    sparse_tokens_per_s: float
    dense_prefill_ms: float
    sparse_prefill_ms: float
    prompt_tokens: int
    new_tokens: int
    runs: int
    warmup: int
    threads: int


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
    decode: DecodeLatency | None = field(default=None, metadata=_OMIT_NONE)
    #: timed one after the other, a session at a time (two side by side are over ``--max-memory``); None: alternated
    one_at_a_time: bool | None = field(default=None, metadata=_OMIT_NONE)

    SECTIONS: ClassVar[Mapping[str, type[Section]]] = {"decode": DecodeLatency}


@dataclass(frozen=True, kw_only=True)
class Quantization(Section):
    """``--quantize``: what onnxruntime's quantizer did to the validated model (``mode``, the
    op types asked for, the nodes quantized per float op type, bytes before and after,
    its pre-processing), and where the latency stage ran, the ``frontier``: the dense
    export, int8 alone, the sparse float and the sparse int8 model side by side (latency
    ratio to the dense export, cost against the dense PyTorch model, size)."""

    mode: str
    op_types: list[str]
    quantized: dict[str, int]
    nodes_quantized: int
    size_before: int
    size_after: int
    size_ratio: float
    preprocess: str
    external_data: bool
    seconds: float
    calibration_samples: int | None = field(default=None, metadata=_OMIT_NONE)
    frontier: list[dict[str, Any]] | None = field(default=None, metadata=_OMIT_NONE)
    #: ``--max-cost``: the quantized model's held-out cost by the budget, which it keeps (over it: exit 10)
    budget: dict[str, Any] | None = field(default=None, metadata=_OMIT_NONE)
    #: the matrix products smoothed before int8 (``mode``, ``smoothed``, ``summary``, per layer ``layers``: smoothed,
    #: ``alpha``, its int8 error on the tuning split without and with, ``why``); absent with ``--no-smooth``
    smoothing: dict[str, Any] | None = field(default=None, metadata=_OMIT_NONE)


@dataclass(frozen=True, kw_only=True)
class QuantizedCheck(Section):
    """``validate --max-cost`` of a quantized ONNX model (which cannot match PyTorch within a tolerance): its
    quantized nodes by op type (``ops``), its cost against the dense model on the held-out data by the
    ``budget`` (``heldout_cost``), which it keeps (over it: exit 10), its cost on the other text, and with ``--masks``
    its closeness to the squashed float model it was made from (``float_source``: per-sample cosine of its last output,
    mean and worst)."""

    ops: dict[str, int]
    budget: str
    heldout_cost: float
    within: bool
    float_source: dict[str, Any] | None = field(default=None, metadata=_OMIT_NONE)
    #: the workload's other text (``--other-text``, a built-in's own): its samples, the figure by the budget's kind
    #: there, and whether it is within (reported, not held: the held-out data decides)
    other_text_samples: int | None = field(default=None, metadata=_OMIT_NONE)
    other_text_cost: float | None = field(default=None, metadata=_OMIT_NONE)
    other_text_within: bool | None = field(default=None, metadata=_OMIT_NONE)


@dataclass(frozen=True, kw_only=True)
class Memory(Section):
    """``convert``'s and ``calibrate``'s memory (:mod:`actsparse_deploy.base.memory`): the process's peak resident memory,
    the model's weights, the budget it kept within (``--max-memory``, else what the machine had free;
    None where unknown), and whether validation ran in two passes (``apart``) and the latency check a
    session at a time (``one_at_a_time``) to keep within it."""

    peak_bytes: int
    weights_bytes: int
    budget_bytes: int | None
    apart: bool
    one_at_a_time: bool
    #: ``calibrate`` read the blocks' weights from their files a layer at a time (the whole model was over the budget)
    by_block: bool | None = field(default=None, metadata=_OMIT_NONE)
    #: ``calibrate`` collected the statistics of a few blocks at a time, in this many passes over the data (all at once were over the budget)
    passes: int | None = field(default=None, metadata=_OMIT_NONE)


@dataclass(frozen=True, kw_only=True)
class Report(Section):
    """What a command did. Every key of :data:`KEYS` is always present in the JSON;
    ``budget`` (a ``--max-cost`` search), ``fingerprint`` and ``parts`` (a
    statistics file: its model's fingerprint, the parts it merges) only where they apply.

    ``layers`` holds one row per layer; its keys depend on what ran: ``calibrate``
    and ``inspect`` of a masks file give the masks' rows (layer, mask_shape,
    input_shape, features, feature_dim, sparsity), ``squash`` and ``export`` the
    squash rows (layer, mode, reason, sparsity), ``convert`` both merged,
    ``inspect`` of a model its layers (layer, type, input_shape, foldable).
    ``files``: each file written -> its size in bytes (``convert``: names inside
    its output directory). ``seconds``: per stage, and ``total``. ``threads``: the
    thread count torch and onnxruntime ran with (``--threads``). ``latency``:
    ``convert``'s dense vs converted onnxruntime latency (None with ``--no-latency``
    and for the other commands); ``memory``: ``convert``'s peak memory and how it kept within ``--max-memory``
    (where one was given, or the memory the machine had free changed how the run went).
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
    budget: BudgetSearch | None = field(default=None, metadata=_OMIT_NONE)
    fingerprint: str | None = field(default=None, metadata=_OMIT_NONE)
    parts: int | None = field(default=None, metadata=_OMIT_NONE)
    quantization: Quantization | None = field(default=None, metadata=_OMIT_NONE)
    memory: Memory | None = field(default=None, metadata=_OMIT_NONE)
    quantized: QuantizedCheck | None = field(default=None, metadata=_OMIT_NONE)

    SECTIONS: ClassVar[Mapping[str, type[Section]]] = {
        "calibration": Calibration, "export": Export, "validation": Validation, "cost": Cost, "latency": Latency,
        "budget": BudgetSearch, "quantization": Quantization, "memory": Memory, "quantized": QuantizedCheck,
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
KEYS = tuple(f.name for f in fields(Report) if f.name in Report.keys() and not f.metadata.get("omit_none"))


# --- sweep.json ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SweepLatency(Section):
    """How a sweep timed each model: ``runs`` onnxruntime passes (median) over ``batches`` held-out batches."""

    batches: int
    runs: int
    threads: int | None


@dataclass(frozen=True, kw_only=True)
class SweepValidation(Section):
    """The tolerances every exported model of a sweep was validated with."""

    atol: float
    rtol: float


@dataclass(frozen=True, kw_only=True)
class SweepRow(Section):
    """One method at one level: its overall sparsity, the cosine of its last output
    to the dense model's (mean and worst), the latency ratio to dense, accuracy
    for a classifier and the other-text cost where the model has other data."""

    method: str
    level: float
    overall_sparsity: float
    output: str | int
    cosine_mean: float
    cosine_min: float
    heldout_samples: int
    latency_ratio: float
    dense_ms: float
    sparse_ms: float
    threads: int
    #: the largest difference of the exported model's outputs to the squashed PyTorch model's (validated;
    #: None for an int8 row: its float source was validated, it is judged by its cost)
    onnx_max_abs_diff: float | None = field(default=None, metadata=_OMIT_NONE)
    accuracy_dense: float | None = field(default=None, metadata=_OMIT_NONE)
    accuracy_sparse: float | None = field(default=None, metadata=_OMIT_NONE)
    other_text: OtherText | None = field(default=None, metadata=_OMIT_NONE)
    #: with ``--quantize``: ``none`` (the float model) or the int8 mode; an int8 row's products smoothed before
    quantize: str | None = field(default=None, metadata=_OMIT_NONE)
    smoothed: int | None = field(default=None, metadata=_OMIT_NONE)
    perplexity_ratio: float | None = field(default=None, metadata=_OMIT_NONE)
    #: with ``--quantize``: the model's bytes on disk
    size_bytes: int | None = field(default=None, metadata=_OMIT_NONE)

    SECTIONS: ClassVar[Mapping[str, type[Section]]] = {"other_text": OtherText}

    @property
    def variant(self) -> str:
        """The method, with its int8 mode where quantized (``recipe + int8``)."""
        return self.method if self.quantize in (None, "none") else f"{self.method} + {self.quantize}"


@dataclass(frozen=True, kw_only=True)
class SweepResult(Section):
    """What ``sweep`` measured (``sweep.json``): one row per method and level."""

    model: str
    levels: list[float]
    methods: list[str]
    compensate: str | None
    heldout_samples: int
    latency: SweepLatency
    validation: SweepValidation
    rows: list[SweepRow]
    #: with ``--quantize``: the int8 modes measured, whether smoothed before, and per mode the dense export
    #: quantized alone (``latency_ratio``, ``cosine_mean``, ``accuracy_sparse``, ``size_bytes``, ...)
    quantize: list[str] | None = field(default=None, metadata=_OMIT_NONE)
    smooth: bool | None = field(default=None, metadata=_OMIT_NONE)
    int8_alone: dict[str, dict[str, Any]] | None = field(default=None, metadata=_OMIT_NONE)

    SECTIONS: ClassVar[Mapping[str, type[Section]]] = {"latency": SweepLatency, "validation": SweepValidation}
    ROWS: ClassVar[Mapping[str, type[Section]]] = {"rows": SweepRow}


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
