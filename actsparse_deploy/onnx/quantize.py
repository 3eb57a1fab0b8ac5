"""Stage 3c: int8 quantization of an ONNX export, by onnxruntime's own quantizer.

:func:`quantize_onnx` writes the int8 model beside nothing else (whole or not at
all, as export writes), :func:`variant_costs` says what it cost against the
dense PyTorch model and against its float source, and
:func:`~actsparse_deploy.onnx.latency.latencies` times it beside the others.
In ``convert``, :func:`quantize_staged` quantizes the validated export in its
place (the float one waits in :data:`FLOAT_FOLDER`), :func:`check_quantized` holds
it to the cost budget, and :class:`Quantized` is what the report says of it.
:func:`measure_frontier` puts what the user could ship side by side, from one run, on
the same held-out batches: the dense export, the dense export quantized alone
(what onnxruntime's one call gives), the sparse float export and the sparse
quantized one: latency (alternated, the first = 1.00x), cost against the dense
PyTorch model (cosine per output; perplexity and accuracy where the model has
them), the quantization's own share (against its float source), size on disk.

Two modes, both ``onnxruntime.quantization`` with per-channel int8 weights:

- ``int8``: ``quantize_dynamic`` (activations quantized at run time, no data).
  What is quantized: :data:`DEFAULT_OP_TYPES`. ``Gemm`` needs no entry:
  onnxruntime's dynamic quantizer turns each ``Gemm`` into ``MatMul`` + ``Add``
  itself (the digits MLP's three layers are quantized so).
- ``int8-static``: ``quantize_static`` in QDQ form, activation ranges (MinMax)
  from calibration batches (:class:`CalibrationFeeds` feeds our batches,
  :data:`DEFAULT_CALIBRATION_SAMPLES` samples), uint8 activations.

Both run onnxruntime's ``quant_pre_process`` first (symbolic shape inference,
its basic graph optimizations, ONNX shape inference); where the symbolic shape
inference cannot finish (the MiniLM export: "Incomplete symbolic shape
inference") it runs without it, and the result says so (:attr:`QuantizeResult.preprocess`).

Why these choices: measured on an AMD EPYC (AVX2, no VNNI), onnxruntime 1.32,
one thread, the built-in models' held-out batches (MiniLM: 64 sentences in
batches of 8, 24 to 49 tokens; tiny-lm: its decoder's first step, 64 x 64
tokens), median of 9 to 21 alternated passes, the dense float export = 1.00x;
a shared machine, so latency within about 0.05 is noise:

=============================  ==============  ===================  =========  ===========
MiniLM                         latency         cosine mean / worst  size MB    MatMuls
=============================  ==============  ===================  =========  ===========
dense float                    1.00x           1 / 1                90.4       0 of 36
MatMul                         0.67-0.76x      0.99247 / 0.98480    58.7       36
MatMul + Gather (chosen)       0.69-0.76x      0.99214 / 0.98419    22.9       36
the same, pre-processed        0.69-0.75x      0.99214 / 0.98419    22.9       36
uint8 weights                  0.84x           0.99319 / 0.98090    22.9       36
reduce_range                   0.70x           0.99163 / 0.98226    22.9       36
int8-static (QDQ, MinMax)      0.72x           0.934 / 0.887        58.7       36 + 12
the same, products' outputs    0.64x           0.9891 / 0.979       58.7       36
  left float (chosen)
=============================  ==============  ===================  =========  ===========

=============================  ==============  ===================  =========  ===========
tiny-lm                        latency         perplexity (94.79)   size MB    MatMuls
=============================  ==============  ===================  =========  ===========
MatMul + Gather                0.79-0.80x      94.76                5.1        28
the same, pre-processed        0.63-0.77x      94.69                5.6        29
int8-static (QDQ, MinMax)      0.68x           94.99                8.8        37
=============================  ==============  ===================  =========  ===========

- Pre-processing: on tiny-lm it folds the ``Transpose`` of the tied embedding
  into a constant, so the language-model head (the largest MatMul) is quantized
  too (0.80x -> 0.72x, alternated in one run); on MiniLM the same nodes are quantized either way. Kept on.
- ``Gather`` (the embedding tables): a quarter of the size (MiniLM 58.7 -> 22.9
  MB) for a cosine 0.0003 lower; no latency change. Kept.
- ``Attention``: none of our exports has the fused contrib op (onnxruntime's
  BERT optimizer does not fuse MiniLM's export either); it is quantized where a graph has it.
- Weights int8 (not uint8: slower on AVX2), full range (``reduce_range`` no faster, less faithful).
- ``int8-static``: onnxruntime's static quantizer also quantizes each product's
  output by default; MiniLM's MLP outputs reach 195, a uint8 step of 0.78, and
  the model lost 0.066 cosine (0.934; the Percentile and moving-average MinMax
  calibrations 0.937 / 0.939). The products' outputs stay float
  (:data:`STATIC_FLOAT_OUTPUTS`): 0.9891 and 0.64x (``python tools/measure_quantize.py
  --models minilm --mode int8-static``), still a little less faithful than dynamic
  int8 (0.992) at the same speed: it stays behind ``mode="int8-static"``.

The digits MLP: accuracy 0.9725 before and after, 70 -> 24 kB (no faster: a pass
is 0.08 ms, per-node overhead; the quantize nodes add three). ``tools/measure_quantize.py``
gives the frontier (dense / int8 / sparse / sparse + int8) of the built-in models.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from actsparse_deploy.onnx.export import export_onnx
    >>> from actsparse_deploy.onnx.quantize import quantize_onnx
    >>> folder = tempfile.mkdtemp()
    >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    >>> _ = export_onnx(model, torch.randn(4, 64), folder + "/model.onnx")
    >>> result = quantize_onnx(folder + "/model.onnx", folder + "/model.int8.onnx")
    >>> result.mode, result.quantized, result.size_after < result.size_before / 2
    ('int8', {'Gemm': 2}, True)
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ..base.errors import ActsparseError, DataError, ExportError, OutputError, UsageError, ValidationError, first_line
from ..base.files import check_output_path, os_reason, output_lock, publish, remove_stale_staging, staging_dir
from ..base.quiet import quiet
from ..data.batches import Batch, batch_size, flatten_outputs, head_samples, run_batch
from ..data.scores import Tally, cost_error, cost_figure
from ..nn.modules import eval_mode
from .latency import latencies
from .validate import check_external_data, onnx_feeds, onnx_session, read_graph, run_session

if TYPE_CHECKING:
    from torch import nn

    from ..data.iospec import IOSpec

__all__ = [
    "DEFAULT_CALIBRATION_SAMPLES", "DEFAULT_OP_TYPES", "FLOAT_FOLDER", "Frontier", "MODES", "STATIC_OP_TYPES", "CalibrationFeeds", "CostBudget",
    "QuantizeResult", "Quantized", "VARIANTS", "VariantCost", "check_quantized", "measure_frontier", "model_bytes", "ops_said", "quantization_json",
    "quantize_onnx", "quantize_staged", "quantized_cost", "quantized_ops", "variant_costs",
]

#: the quantization modes, each onnxruntime's quantizer with per-channel int8 weights
MODES = ("int8", "int8-static")
#: ``int8``: the op types quantized (a ``Gemm`` is turned into ``MatMul`` + ``Add`` by onnxruntime's dynamic quantizer)
DEFAULT_OP_TYPES = ("MatMul", "Gather", "Attention")
#: ``int8-static``: the op types quantized (QDQ form keeps ``Gemm`` as it is)
STATIC_OP_TYPES = ("MatMul", "Gemm")
#: ``int8-static``: the op types whose outputs stay float (quantized, MiniLM's MLP outputs, up to 195, get a uint8
#: step of 0.78: cosine 0.934; left float, 0.989, and faster: fewer quantize / dequantize nodes)
STATIC_FLOAT_OUTPUTS = ("MatMul", "Gemm")
#: ``int8-static``: calibration samples read (the first of the batches given)
DEFAULT_CALIBRATION_SAMPLES = 128
#: ops only a quantized graph holds: such a graph is not quantized again
_QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul",
    "QLinearConv", "QGemm", "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM",
})
#: a quantized node's op type -> the float op type it replaced
_FLOAT_OP = {"MatMulInteger": "MatMul", "DynamicQuantizeMatMul": "MatMul", "MatMulIntegerToFloat": "MatMul",
             "QAttention": "Attention", "ConvInteger": "Conv", "QGemm": "Gemm", "DynamicQuantizeLSTM": "LSTM"}


def quantized_ops(proto: Any) -> dict[str, int]:
    """The quantized nodes of the ONNX model ``proto`` (a ``ModelProto``) by op type, in name order; empty for a float model."""
    return dict(sorted(Counter(node.op_type for node in proto.graph.node if node.op_type in _QUANTIZED_OPS).items()))


def ops_said(ops: Mapping[str, int]) -> str:
    """``{"MatMulInteger": 3}`` as ``3 MatMulInteger``."""
    return ", ".join(f"{n} {op}" for op, n in ops.items())


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize_onnx` did."""

    path: Path
    source: Path
    mode: str
    #: the op types asked for
    op_types: tuple[str, ...]
    #: nodes quantized per float op type (``{"MatMul": 36, "Gather": 3}``)
    quantized: dict[str, int]
    #: bytes on disk, the model file with its external data: the float source, the quantized model
    size_before: int
    size_after: int
    #: onnxruntime's pre-processing: "shapes and graph", "graph only (...)", or "off"
    preprocess: str
    external_data: bool
    seconds: float
    #: ``int8-static``: the calibration samples read (None for ``int8``)
    calibration_samples: int | None = None

    @property
    def nodes_quantized(self) -> int:
        return sum(self.quantized.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "source": str(self.source), "mode": self.mode, "op_types": list(self.op_types),
            "quantized": dict(self.quantized), "nodes_quantized": self.nodes_quantized,
            "size_before": self.size_before, "size_after": self.size_after,
            "size_ratio": self.size_after / self.size_before if self.size_before else float("nan"),
            "preprocess": self.preprocess, "external_data": self.external_data, "seconds": round(self.seconds, 3),
            **({"calibration_samples": self.calibration_samples} if self.calibration_samples is not None else {}),
        }


class CalibrationFeeds:
    """``int8-static``'s calibration data for onnxruntime (a ``CalibrationDataReader``:
    ``get_next`` gives one batch's feeds, then None): ``batches`` as the ONNX model
    at ``path`` takes them (:func:`~actsparse_deploy.onnx.validate.onnx_feeds`, checked
    against its inputs), the first ``max_samples`` only, read as onnxruntime asks."""

    def __init__(self, path: str | Path, batches: Iterable[Batch], io_spec: IOSpec | None = None,
                 max_samples: int = DEFAULT_CALIBRATION_SAMPLES) -> None:
        session = onnx_session(path)
        self.samples = 0

        def feeds() -> Iterator[dict[str, np.ndarray]]:
            for batch in head_samples(batches, max_samples):
                self.samples += batch_size(batch)
                yield onnx_feeds(session, batch, io_spec)

        self._feeds = feeds()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._feeds


def model_bytes(path: str | Path) -> int:
    """Bytes on disk of the ONNX model at ``path`` and the external data files it reads."""
    path = Path(path)
    sizes = check_external_data(path)
    return path.stat().st_size + sum(size or 0 for size in sizes.values())


def quantize_onnx(
    float_path: str | Path,
    out_path: str | Path,
    mode: str = "int8",
    *,
    op_types: Sequence[str] | None = None,
    preprocess: bool = True,
    calibration: Iterable[Batch] | None = None,
    io_spec: IOSpec | None = None,
    max_samples: int = DEFAULT_CALIBRATION_SAMPLES,
    external_data: bool | None = None,
    overwrite: bool = True,
    verbose: bool = False,
) -> QuantizeResult:
    """The float ONNX model at ``float_path`` quantized by onnxruntime to
    ``out_path`` (``mode``: see the module docstring), written by way of a staging
    folder beside it, the model and its data file both or neither.
    ``op_types``: default :data:`DEFAULT_OP_TYPES` (``int8``) or :data:`STATIC_OP_TYPES`;
    ``calibration``: ``int8-static``'s batches (the calibration split, never the held-out
    one; ``io_spec`` names a tensor or tuple batch's inputs), the first ``max_samples``;
    ``external_data``: the weights in ``<out>.data`` (None: where the source has external data:
    a model over 2 GB). A file that is not ONNX is a ValidationError, an unknown mode or a
    model already quantized a UsageError, a quantizer failure an ExportError."""
    start = time.perf_counter()
    source, out = Path(float_path), Path(out_path)
    proto = _check_source(source, out, mode, calibration)
    ops = tuple(op_types) if op_types is not None else (DEFAULT_OP_TYPES if mode == "int8" else STATIC_OP_TYPES)
    external = bool(external_data) if external_data is not None else bool(check_external_data(source, proto))
    data_name = f"{out.name}.data"
    check_output_path(out, overwrite)
    if external:
        check_output_path(out.parent / data_name, overwrite)
    with output_lock(out.parent, out.name):
        remove_stale_staging(out.parent)
        with staging_dir(out.parent) as staging:
            staged = staging / out.name
            prepared, how = _preprocess(source, staging / "pre" / "pre.onnx", preprocess, external, verbose)
            static = calibration if mode == "int8-static" else None  # checked: given for int8-static
            reader = CalibrationFeeds(prepared, static, io_spec, max_samples) if static is not None else None
            try:
                _quantize(prepared, staged, ops, external, reader, verbose)
            except ActsparseError:  # ours, from the calibration batches (they do not fit the model): as it is
                raise
            except Exception as e:  # onnxruntime's quantizer raises RuntimeError, ValueError, onnx's errors
                raise _quantizer_error(source, mode, e) from e
            quantized = _quantized_ops(read_graph(staged))
            written = external and (staging / data_name).is_file()
            check_external_data(staged)  # what it wrote reads from beside it only, whole
            size = model_bytes(staged)
            publish(staging, out.parent, [data_name, out.name] if written else [out.name], overwrite=overwrite)
    return QuantizeResult(out, source, mode, ops, quantized, model_bytes(source), size, how, written,
                          time.perf_counter() - start, reader.samples if reader is not None else None)


def _check_source(source: Path, out: Path, mode: str, calibration: Iterable[Batch] | None) -> Any:
    """The source's graph (not its data), after the checks that need no work: the mode, the
    calibration data it needs, an ONNX file that exists and is not quantized, an output elsewhere."""
    if mode not in MODES:
        raise UsageError(f"unknown quantization mode {mode!r}; known: {', '.join(MODES)}")
    if mode == "int8-static" and calibration is None:
        raise DataError("int8-static quantization needs calibration batches (the activation ranges come from them)")
    if source.is_dir():
        raise ValidationError(f"ONNX model {source} is a directory: give the .onnx file")
    if not source.is_file():
        raise ValidationError(f"ONNX model {source} does not exist")
    if out.resolve() == source.resolve():
        raise UsageError(f"the quantized model would overwrite its float source {source}: give another output name")
    proto = read_graph(source)
    found = quantized_ops(proto)
    if found:
        raise UsageError(f"ONNX model {source} is quantized already ({ops_said(found)}): quantize the float export")
    return proto


def _preprocess(source: Path, target: Path, asked: bool, external: bool, verbose: bool) -> tuple[Path, str]:
    """onnxruntime's ``quant_pre_process`` of ``source`` into ``target`` (its own folder): the
    model to quantize and what was done. Where symbolic shape inference cannot finish, without it."""
    if not asked:
        return source, "off"
    from onnxruntime.quantization import quant_pre_process

    target.parent.mkdir()
    options = {"save_as_external_data": external, "all_tensors_to_one_file": True,
               "external_data_location": f"{target.name}.data" if external else None}
    try:
        # in the staging folder: symbolic shape inference leaves its temporary model and data file in the working
        # directory when it fails (MiniLM's export), removed with the folder, not left in the user's
        with quiet(verbose), contextlib.chdir(target.parent):
            quant_pre_process(str(source.resolve()), str(target.resolve()), **options)
        return target, "shapes and graph"
    except Exception as e:  # onnxruntime's symbolic shape inference raises a bare Exception
        reason = first_line(e)
    _clear(target.parent)
    try:
        with quiet(verbose), contextlib.chdir(target.parent):
            quant_pre_process(str(source.resolve()), str(target.resolve()), skip_symbolic_shape=True, **options)
    except Exception as e:
        raise _quantizer_error(source, "pre-processing", e) from e
    return target, f"graph only (symbolic shape inference: {reason})"


def _clear(folder: Path) -> None:
    for entry in folder.iterdir():
        entry.unlink()


def _quantize(source: Path, target: Path, op_types: tuple[str, ...], external: bool, reader: CalibrationFeeds | None,
              verbose: bool) -> None:
    """onnxruntime's quantizer from ``source`` to ``target``, int8 per-channel weights: dynamic,
    or static (QDQ, uint8 activations) with the ranges ``reader``'s batches give."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    with quiet(verbose):
        if reader is None:
            quantize_dynamic(str(source), str(target), op_types_to_quantize=list(op_types), per_channel=True,
                             weight_type=QuantType.QInt8, use_external_data_format=external)
        else:
            quantize_static(str(source), str(target), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(op_types), per_channel=True, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8, use_external_data_format=external,
                            extra_options={"OpTypesToExcludeOutputQuantization": list(STATIC_FLOAT_OUTPUTS)})


#: errors of the file system, not of the quantizer: the output cannot be written
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def _quantizer_error(source: Path, what: str, e: BaseException) -> ExportError | OutputError:
    """The quantizer's failure in one line; a full disk (or another write error) an OutputError."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        return OutputError(f"cannot quantize {source.name} ({what}): {os_reason(e)}")
    return ExportError(f"onnxruntime's quantizer failed on {source.name} ({what}): {first_line(e)}")


def _quantized_ops(proto: Any) -> dict[str, int]:
    """Nodes that take a quantized weight (``NAME_quantized``, directly or through
    a DequantizeLinear), counted by the float op type they replaced (a MatMul onnxruntime
    made of a Gemm, whose weight it named ``NAME_Transposed``, counts as a Gemm)."""
    graph = proto.graph
    weights = {t.name for t in graph.initializer if t.name.endswith("_quantized")}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: dict[str, Any] = {}
    for weight in sorted(weights):
        for node in consumers.get(weight, []):
            users = [u for out in node.output for u in consumers.get(out, [])] if node.op_type == "DequantizeLinear" else [node]
            for user in users:
                gemm = re.search(r"_Transposed(_\d+)?_quantized$", weight) is not None and node.op_type != "DequantizeLinear"
                found[user.name or str(id(user))] = "Gemm" if gemm else _FLOAT_OP.get(user.op_type, user.op_type)
    return dict(sorted(Counter(found.values()).items()))


@dataclass(frozen=True)
class VariantCost:
    """One ONNX variant's cost on the held-out batches, as :func:`variant_costs` measures
    every variant: against the dense PyTorch model (per output: max abs difference, per-sample
    cosine mean and worst; perplexity and accuracy where asked, and their change from the
    dense model's), and against its reference ONNX variant (its float source) where it has one."""

    name: str
    path: str
    size_bytes: int
    outputs: list[dict[str, Any]]
    perplexity: float | None = None
    accuracy: float | None = None
    dense_perplexity: float | None = None
    dense_accuracy: float | None = None
    reference: str | None = None
    against_reference: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cosine_mean(self) -> float:
        """The last output's mean per-sample cosine to the dense model (a budget's ``cosine``)."""
        return float(self.outputs[-1]["cosine_mean"])

    def figure(self, kind: str) -> float:
        """A built-in budget kind's figure (``cosine``: a decoder's logits', as the PyTorch model's
        only output is; else the last output's)."""
        if kind == "accuracy-drop":
            assert self.accuracy is not None and self.dense_accuracy is not None, "measured without labels"
            return float(self.dense_accuracy - self.accuracy)
        if kind == "perplexity-ratio":
            assert self.perplexity is not None and self.dense_perplexity is not None, "measured without tokens"
            return float(self.perplexity / self.dense_perplexity)
        shown = next((o for o in self.outputs if o.get("output") == "logits"), self.outputs[-1])
        return float(shown["cosine_mean"])

    def to_json(self) -> dict[str, Any]:
        ratio = (self.perplexity / self.dense_perplexity
                 if self.perplexity is not None and self.dense_perplexity else None)
        drop = self.dense_accuracy - self.accuracy if self.accuracy is not None and self.dense_accuracy is not None else None
        return {
            "name": self.name, "path": self.path, "size_bytes": self.size_bytes, "outputs": self.outputs,
            **({"perplexity": self.perplexity, "perplexity_ratio": ratio} if self.perplexity is not None else {}),
            **({"accuracy": self.accuracy, "accuracy_drop": drop} if self.accuracy is not None else {}),
            **({"reference": self.reference, "against_reference": self.against_reference} if self.reference else {}),
        }


def _check_references(variants: Mapping[str, Any], references: Mapping[str, str] | None) -> dict[str, str]:
    references = dict(references or {})
    missing = sorted({r for r in references.values() if r not in variants} | set(references) - set(variants))
    if missing:
        raise UsageError(f"variant_costs: references name variants not given: {', '.join(missing)}")
    return references


def variant_costs(
    dense: nn.Module,
    variants: Mapping[str, str | Path],
    batches: Iterable[Batch],
    *,
    references: Mapping[str, str] | None = None,
    io_spec: IOSpec | None = None,
    tokens: bool = False,
    labels: torch.Tensor | None = None,
    deadline: float | None = None,
) -> dict[str, VariantCost]:
    """Each ONNX variant (``{name: file}``: dense float, dense int8, sparse float,
    sparse int8, ...) against the dense PyTorch model ``dense`` on ``batches``
    (held-out data as the ONNX models take them), measured alike in one pass: each
    batch through the dense model once (eval mode, no grad) and through every variant
    once, its outputs folded into :class:`~actsparse_deploy.data.scores.Tally`-s: per
    output cosine and max abs difference to the dense model, with ``tokens`` next-token
    perplexity, with ``labels`` top-1 accuracy. ``references`` (``{variant: its float
    source}``, e.g. ``{"int8": "dense", "sparse+int8": "sparse"}``) adds each one's
    closeness to its source (the quantization's own share). ``deadline`` (``time.monotonic()``): onnxruntime is
    stopped past it (a TimeoutError)."""
    references = _check_references(variants, references)
    sizes = {name: model_bytes(path) for name, path in variants.items()}
    sessions = {name: onnx_session(path) for name, path in variants.items()}
    model = Tally(("model",), tokens=tokens, classes=labels is not None)
    alone = {name: Tally(("ONNX model",), tokens=tokens, classes=labels is not None) for name in variants}
    to_dense = {name: Tally(("model", "ONNX model"), compare=True) for name in variants}
    to_source = {name: Tally(("ONNX model", "ONNX model"), compare=True) for name in references}
    with eval_mode(dense):
        for batch in batches:
            want = flatten_outputs(run_batch(dense, batch))
            model.add(batch, want)
            got = {name: run_session(s, onnx_feeds(s, batch, io_spec), deadline) for name, s in sessions.items()}
            for name, out in got.items():
                alone[name].add(batch, out)
                to_dense[name].add(batch, want, out)
                if name in to_source:
                    to_source[name].add(batch, got[references[name]], out)
    ppl, acc = model.figures(0, labels)
    costs = {}
    for name, path in variants.items():
        outputs = [o.name for o in sessions[name].get_outputs()]
        costs[name] = VariantCost(name, str(path), sizes[name], to_dense[name].output_stats(outputs),
                                  *alone[name].figures(0, labels), ppl, acc, references.get(name),
                                  to_source[name].output_stats(outputs) if name in to_source else [])
    return costs


def quantized_cost(dense: nn.Module, path: Path, batches: Iterable[Batch], onnx_batches: Iterable[Batch], kind: str,
                   io_spec: IOSpec | None = None) -> tuple[float, float]:
    """A built-in budget ``kind``'s figure of the ONNX model at ``path`` against the dense PyTorch
    model, measured as the budget search measures its candidates (:func:`~actsparse_deploy.data.scores.cost_figure`,
    no labels), and its standard error over the samples (:func:`~actsparse_deploy.data.scores.cost_error`):
    ``dense`` on ``batches``, the ONNX model on the same samples as it takes them (``onnx_batches``: a
    decoder's first steps), its first outputs (as many as the PyTorch model gives) compared."""
    from .metrics import run

    reference, quantized = Tally(("model",), keep=True), Tally(("ONNX model",), keep=True)
    run((dense,), batches, reference)
    run(path, onnx_batches, quantized, io_spec=io_spec)
    want = reference.kept[0]
    got = [[torch.as_tensor(np.asarray(o)) for o in out[:len(d)]] for out, d in zip(quantized.kept[0], want)]
    return cost_figure(kind, want, got, batches), cost_error(kind, want, got, batches)


#: where the float export waits inside the staging folder while the quantized one is measured (removed before publishing)
FLOAT_FOLDER = ".float"


def quantize_staged(onnx_path: Path, mode: str, calibration: Iterable[Batch] | None, io: IOSpec | None,
                    verbose: bool = False) -> tuple[QuantizeResult, Path]:
    """The float model at ``onnx_path`` (with its data file) moved into :data:`FLOAT_FOLDER`
    beside it and quantized back to ``onnx_path``; the result and the float model's new path."""
    aside = onnx_path.parent / FLOAT_FOLDER
    aside.mkdir(exist_ok=True)
    floated = aside / onnx_path.name
    for name in (onnx_path.name, f"{onnx_path.name}.data"):  # the graph names its data file: the same name, beside it
        if (onnx_path.parent / name).exists():
            os.replace(onnx_path.parent / name, aside / name)
    result = quantize_onnx(floated, onnx_path, mode, calibration=calibration if mode == "int8-static" else None, io_spec=io,
                           verbose=verbose)
    return result, floated


class CostBudget(Protocol):
    """What :func:`check_quantized` reads of a cost budget (an :class:`actsparse_deploy.app.budget.Budget`)."""

    @property
    def kind(self) -> str: ...

    def within(self, measured: float) -> bool: ...


def check_quantized(budget: CostBudget, dense: nn.Module, path: Path, batches: Iterable[Batch], *, io: IOSpec | None, tokens: bool,
                    labels: torch.Tensor | None = None, other: Iterable[Batch] | None = None,
                    timeout: float | None = None, hold_other: bool = True) -> dict[str, Any]:
    """The quantized model at ``path`` measured by ``budget`` (an :class:`~actsparse_deploy.app.budget.Budget`)
    against the dense PyTorch model on the held-out ``batches`` (as the ONNX model takes them): the
    figure and that it keeps the budget; over it, a ValidationError (exit 10: nothing is written).
    ``other``: text from another source the budget holds on too (``--max-cost-other``), all of it, the
    same way (``other_text_cost``; ``hold_other=False``: measured and reported, never a failure). ``timeout``: seconds
    for onnxruntime's runs, past which the check fails."""
    tokens = budget.kind == "perplexity-ratio" or tokens
    deadline = time.monotonic() + timeout if timeout is not None else None
    try:
        value = variant_costs(dense, {"int8": path}, batches, io_spec=io, tokens=tokens, labels=labels if budget.kind == "accuracy-drop" else None,
                              deadline=deadline)["int8"].figure(budget.kind)
        if not budget.within(value):
            raise ValidationError(f"the int8 model's held-out cost {budget.kind}={value:.6g} is over the budget {budget} "
                                  "(the quantization's error adds to the sparsity's): give a looser budget, or leave out --quantize")
        elsewhere = (variant_costs(dense, {"int8": path}, other, io_spec=io, tokens=tokens, deadline=deadline)["int8"].figure(budget.kind)
                     if other is not None else None)
    except TimeoutError as e:
        raise ValidationError(f"the check of the quantized model {path} timed out after {timeout:g} s: {e}; give a larger "
                              "`timeout`") from e
    kept = {"budget": str(budget), "heldout_cost": value, "within": True}
    if elsewhere is None:
        return kept
    if hold_other and not budget.within(elsewhere):
        raise ValidationError(f"the int8 model's cost on the other text {budget.kind}={elsewhere:.6g} is over the budget {budget} "
                              "(--max-cost-other holds it there too): give a looser budget, or leave out --quantize")
    return {**kept, "other_text_cost": elsewhere, "other_text_within": budget.within(elsewhere)}


@dataclass(frozen=True)
class Quantized:
    """What ``convert``'s quantize stage did: onnxruntime's result, where the float model waits
    (inside the staging folder), the budget's figure of the quantized model (``--max-cost``), and
    the smoothing baked in before export."""

    result: QuantizeResult
    floated: Path
    budget: dict[str, Any] | None = None
    #: the matrix products smoothed before it, per layer (:meth:`actsparse_deploy.bake.smooth.Smoothing.to_json`)
    smoothing: dict[str, Any] | None = None

    def to_json(self, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """``report.json``'s ``quantization``, with the latency stage's frontier ``rows`` where it ran."""
        return {**quantization_json(self.result, rows), **({"budget": self.budget} if self.budget is not None else {}),
                **({"smoothing": self.smoothing} if self.smoothing is not None else {})}


def quantization_json(result: QuantizeResult, rows: list[dict[str, Any]] | None) -> dict[str, Any]:
    """``report.json``'s ``quantization``: what was quantized (not where: the files were staged), and the frontier."""
    done = {k: v for k, v in result.to_json().items() if k not in ("path", "source")}
    return {**done, **({"frontier": rows} if rows is not None else {})}


#: the frontier's rows: what each is, in order (the first is the latency's baseline)
VARIANTS = ("dense", "int8", "sparse", "sparse+int8")


@dataclass(frozen=True)
class Frontier:
    """:func:`measure_frontier`'s result: the ``rows`` (one per variant), and the timings they were read
    from: ``timed`` (:func:`~actsparse_deploy.onnx.latency.latencies` of the four variants, in
    :data:`VARIANTS`' order) and ``decoding`` (:func:`~actsparse_deploy.onnx.generate.decode_latencies`
    of the four, None without a decode prompt): a report that shows one pair of them apart reads it from
    these (:func:`~actsparse_deploy.onnx.latency.pair_latency`), not from a timing of its own."""

    rows: list[dict[str, Any]]
    timed: dict[str, Any]
    decoding: dict[str, Any] | None


def measure_frontier(dense: nn.Module, files: dict[str, Path], batches: Iterable[Batch], *, io: IOSpec | None, mode: str,
                     tokens: bool, labels: Any = None, max_samples: int = 64, other: Iterable[Batch] | None = None,
                     calibration: Iterable[Batch] | None = None, decode_prompt: Any = None) -> Frontier:
    """The rows of :data:`VARIANTS` (``files``: the dense and sparse float exports as ``dense`` /
    ``sparse``, the sparse quantized one as ``sparse+int8``; the dense one is quantized here beside
    itself as ``int8``, ``int8-static`` with its ranges from ``calibration``): name, file size, latency
    ratio to the dense export (on the first ``max_samples`` of ``batches``), cost against the dense PyTorch
    model on all the held-out ``batches`` (the samples a budget's held-out cost is measured on), and for
    the quantized ones their closeness to their float source; with ``other`` (text from another source
    than the calibration data, as the ONNX models take it), each one's cost on it too (``other_text``); with
    ``decode_prompt`` (decoders with a cache: a held-out prompt's token ids), each one's decode speed
    (``decode_ms_per_token``, ``decode_ratio`` to the dense one: :func:`~actsparse_deploy.onnx.generate.decode_latencies`)."""
    if mode == "int8-static" and calibration is None:
        raise UsageError("the frontier's int8-static needs calibration batches for the dense model's ranges (never the held-out data)")
    dense_path = files["dense"]
    int8 = dense_path.with_name(f"{dense_path.stem}.int8.onnx")
    quantize_onnx(dense_path, int8, mode, calibration=calibration if mode == "int8-static" else None, io_spec=io)
    paths = {"dense": dense_path, "int8": int8, "sparse": files["sparse"], "sparse+int8": files["sparse+int8"]}
    timed = latencies(paths, list(head_samples(batches, max_samples)), io_spec=io)
    decoding = None
    if decode_prompt is not None:
        from .generate import decode_latencies

        decoding = decode_latencies(paths, decode_prompt)
    sets = {"heldout": batches, **({"other_text": other} if other else {})}  # costs on all of it, as the budget's
    costs = {where: variant_costs(dense, paths, on, references={"int8": "dense", "sparse+int8": "sparse"} if where == "heldout" else None,
                                  io_spec=io, tokens=tokens, labels=labels if where == "heldout" else None)
             for where, on in sets.items()}
    rows = []
    for name in VARIANTS:
        cost = costs["heldout"][name].to_json()
        rows.append({"variant": name, "size_bytes": cost["size_bytes"], "ms": timed["ms"][name], "latency_ratio": timed["ratio"][name],
                     **{k: v for k, v in cost.items() if k not in ("name", "path", "size_bytes")}})
        if decoding is not None:
            decoder = decoding["decoders"][name]
            rows[-1] |= {"decode_ms_per_token": decoder["ms_per_token"], "decode_ratio": decoder["ratio"]}
        if "other_text" in costs:
            shown = costs["other_text"][name].to_json()
            rows[-1]["other_text"] = {"samples": sum(batch_size(b) for b in other or []),
                                      **{k: v for k, v in shown.items() if k not in ("name", "path", "size_bytes")}}
    return Frontier(rows, timed, decoding)
