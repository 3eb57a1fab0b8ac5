"""Stage 3b: prove the ONNX model computes what the squashed PyTorch model computes.

The ONNX model runs under onnxruntime (CPU provider) and the PyTorch model on
the same held-out inputs, at several batch sizes, and for a sequence model (an
input axis past the batch axis that the I/O spec, else the ONNX model, declares
dynamic) at two sequence lengths at least: the held-out length, and the held-out
batches cut to half of it on those axes. The report lists every input shape
validated. The inputs come first: their
names (a dict batch's keys, else the I/O spec's names, else the model's
``forward`` parameter names or ``input`` / ``input_0, input_1, ...``, whichever
the ONNX model takes, as export names them: never fed by position alone), ranks, dtypes and every dimension the ONNX model fixes must fit
the batch and the I/O spec's dynamic axes. Then output names, the shapes the
ONNX model declares for its outputs (rank and every fixed dimension, against
what PyTorch gives, and nothing fixed on an axis the I/O spec makes dynamic),
then shapes, dtypes and values (``|onnx - torch| <= atol + rtol * |torch|``,
compared by :mod:`actsparse_deploy.data.compare`); a NaN or Inf on either
side fails, counted and named. Every failure is collected and raised as one
:class:`ValidationError` that lists each output's max abs and max rel difference
and the tolerance. A mismatch is never a warning.

onnxruntime runs in a worker thread while this one waits, so Ctrl-C / SIGTERM
stop it (``RunOptions.terminate``) and unwind as usual, and ``timeout`` (seconds
for the whole comparison, default ``None``: no limit) fails a model that runs
too long (a runaway ``Loop``). onnxruntime's own log is off: its errors arrive
as exceptions and become one message.

External data (weights in ``MODEL.onnx.data``) is read from beside the model
only: before onnxruntime opens a model, :func:`check_external_data` reads its
graph (not its data) and refuses, naming the tensor, a location that is
absolute, holds ``..``, resolves (through a link) outside the model's folder,
is missing or not a regular file, or claims more bytes than the file holds.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from actsparse_deploy.onnx.export import export_onnx
    >>> from actsparse_deploy.onnx.validate import validate
    >>> model = nn.Sequential(nn.Linear(4, 2)).eval()
    >>> path = tempfile.mkdtemp() + "/model.onnx"
    >>> _ = export_onnx(model, torch.randn(2, 4), path, exporter="torchscript")
    >>> report = validate(path, model, [torch.randn(8, 4)], batch_sizes=(1, 3))
    >>> report.passed, report.batch_sizes
    (True, [1, 3])
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..base.errors import DataError, ValidationError, first_line
from ..base.waiting import run_in_worker
from ..data.batches import Batch, cut_axes, flatten_outputs, input_names, is_named, named_tensors, numpy_feeds, resize_batches, run_batch
from ..data.compare import OutputDiff, Tolerance
from ..data.iospec import BATCH, IOSpec, forward_input_names
from ..nn.modules import eval_mode

__all__ = [
    "OutputDiff", "ValidationReport", "check_external_data", "describe_onnx", "external_tensors", "onnx_feeds", "onnx_session",
    "read_graph", "resize_batches", "run_session", "validate",
]

from ..base.constants import DEFAULT_ATOL, DEFAULT_RTOL  # noqa: E402  (one definition, light for the CLI)

DEFAULT_BATCH_SIZES = (1, 3, 5)
#: onnxruntime's severity FATAL: its logger prints nothing (errors still raise)
ORT_LOG_SEVERITY = 4
# onnxruntime's input type names -> torch / numpy dtype names
_ORT_DTYPES = {
    f"tensor({ort})": name
    for ort, name in [
        ("float", "float32"), ("double", "float64"), ("float16", "float16"), ("bfloat16", "bfloat16"), ("bool", "bool"),
        ("int8", "int8"), ("int16", "int16"), ("int32", "int32"), ("int64", "int64"),
        ("uint8", "uint8"), ("uint16", "uint16"), ("uint32", "uint32"), ("uint64", "uint64"),
    ]
}


@dataclass
class ValidationReport:
    onnx_path: str
    passed: bool
    atol: float
    rtol: float
    batch_sizes: list[int]
    samples: int
    outputs: list[OutputDiff]
    #: every distinct set of input shapes validated, in order (``{input: shape}``)
    shapes: list[dict[str, list[int]]] = dataclasses.field(default_factory=list)
    #: the lengths validated on the sequence (non-batch dynamic) axes: ``{label: [lengths]}``
    sequence_lengths: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    #: a decoder with a KV cache: its generation checked (``generate.GenerationReport``; None for any other model)
    generation: Any = None

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "onnx": self.onnx_path,
            "passed": self.passed,
            "atol": self.atol,
            "rtol": self.rtol,
            "batch_sizes": self.batch_sizes,
            "samples": self.samples,
            "max_abs_diff": self.max_abs,
            "outputs": [o.to_json() for o in self.outputs],
            "shapes": self.shapes,
            "sequence_lengths": self.sequence_lengths,
            **({"generation": self.generation.to_json()} if self.generation is not None else {}),
        }


def read_graph(path: str | Path) -> Any:
    """The ONNX model at ``path`` without its external data (the graph and the
    tensors stored in the file itself); an unreadable or corrupted file is a ValidationError."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises protobuf's and its own exception types
        raise ValidationError(f"cannot load the ONNX model {path}: {first_line(e)}") from e


def _graph_tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of ``graph``: initializers, sparse initializers, node
    attributes, and those of its subgraphs (If / Loop / Scan bodies)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Any) -> Iterator[Any]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sparse in [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []:
                yield sparse.values
                yield sparse.indices
            for sparse in attr.sparse_tensors:
                yield sparse.values
                yield sparse.indices
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for graph in attr.graphs:
                yield from _graph_tensors(graph)


def external_tensors(proto: Any) -> Iterator[tuple[Any, dict[str, str]]]:
    """Each tensor of the model (its functions' too) whose data lies in an external file, with its
    ``external_data`` entries (``location``, ``offset``, ``length``)."""
    import onnx

    tensors = [*_graph_tensors(proto.graph), *(t for f in proto.functions for t in _node_tensors(f.node))]
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor, {entry.key: entry.value for entry in tensor.external_data}


def _unsafe_location(location: str) -> bool:
    """Not a plain relative path below the model's folder: empty, absolute (POSIX,
    Windows drive or UNC), or with a ``..`` part (either separator) or a NUL."""
    return (not location or "\x00" in location or os.path.isabs(location) or location.startswith(("/", "\\"))
            or re.match(r"^[A-Za-z]:", location) is not None or ".." in re.split(r"[/\\]", location))


def check_external_data(path: str | Path, proto: Any = None, *, strict: bool = True) -> dict[str, int | None]:
    """The external data files the ONNX model at ``path`` reads, each checked
    before anything reads it, with its size: ``{location: bytes}``. Refused with a
    :class:`ValidationError` that names the tensor: a location that is empty,
    absolute or holds ``..``, or that resolves (through a link anywhere on the
    way) outside the model's folder; with ``strict`` (what running the model
    needs) also a missing file, one that is not a regular file (a FIFO would
    block the reader), and an ``offset`` / ``length`` past the file's end.
    Without ``strict`` such a file's size is None. ``proto``: the model's graph
    (:func:`read_graph`) where already read; only the graph is ever read here."""
    path = Path(path)
    if proto is None:
        proto = read_graph(path)
    folder = path.parent
    real_folder = os.path.realpath(folder)
    sizes: dict[str, int | None] = {}
    for tensor, entries in external_tensors(proto):
        location = entries.get("location", "")
        where = f"{path}: tensor {tensor.name!r} reads its data from {location!r}"
        if _unsafe_location(location):
            raise ValidationError(
                f"{where}: external data is read from beside the model only (a relative path without `..`); "
                "refusing to read it"
            )
        real = os.path.realpath(folder / location)
        if os.path.commonpath([real, real_folder]) != real_folder:
            raise ValidationError(f"{where}, which leads to {real}, outside the model's folder {folder}: refusing to read it")
        try:
            offset, length = int(entries.get("offset", "0")), int(entries.get("length", "0"))
        except ValueError as e:
            raise ValidationError(f"{where}: its offset / length are not integers ({first_line(e)})") from e
        if offset < 0 or length < 0:
            raise ValidationError(f"{where}: a negative offset / length ({offset} / {length})")
        try:
            info = os.stat(real)
        except OSError as e:
            if strict:
                raise ValidationError(f"{where}: {folder / location} does not exist or cannot be read "
                                      f"({e.strerror or e}): keep the data file beside the model") from e
            sizes[location] = None
            continue
        if not stat.S_ISREG(info.st_mode):
            if strict:
                raise ValidationError(f"{where}: {folder / location} is not a regular file")
            sizes[location] = None
            continue
        if strict and offset + length > info.st_size:
            raise ValidationError(
                f"{where}: it claims bytes {offset} to {offset + length}, the file holds {info.st_size} (truncated, or another model's data)"
            )
        sizes[location] = info.st_size
    return sizes


def _value_info(value: Any) -> dict[str, Any]:
    """A graph input's or output's name, element type and shape (an int per fixed
    dimension, its name or None per free one; None for an unknown rank)."""
    import onnx

    tensor = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else None
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim] \
        if tensor.HasField("shape") else None
    return {"name": value.name, "dtype": dtype, "shape": shape}


def describe_onnx(path: str | Path) -> dict[str, Any]:
    """What an ONNX file holds, from its graph alone (external data is never
    read, only its files' sizes looked up): inputs and outputs, opsets, the
    operators by count, the initializers (count, parameters and bytes, from their
    shapes), each external data file (location, tensors, bytes, present) and the
    metadata. A location outside the model's folder is refused as
    :func:`check_external_data` does; a missing data file is only reported."""
    import onnx

    path = Path(path)
    if path.is_dir():
        raise ValidationError(f"ONNX model {path} is a directory: give the .onnx file")
    if not path.is_file():
        raise ValidationError(f"ONNX model {path} does not exist")
    proto = read_graph(path)
    sizes = check_external_data(path, proto, strict=False)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        ops[op] = ops.get(op, 0) + 1
    parameters = nbytes = 0
    for tensor in proto.graph.initializer:
        count = math.prod(tensor.dims)
        parameters += count
        nbytes += count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize if tensor.data_type else 0
    tensors_at: dict[str, int] = {}
    for _, entries in external_tensors(proto):
        tensors_at[entries.get("location", "")] = tensors_at.get(entries.get("location", ""), 0) + 1
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "ir_version": proto.ir_version,
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "inputs": [_value_info(v) for v in proto.graph.input if v.name not in {t.name for t in proto.graph.initializer}],
        "outputs": [_value_info(v) for v in proto.graph.output],
        "nodes": len(proto.graph.node),
        "ops": dict(sorted(ops.items(), key=lambda item: (-item[1], item[0]))),
        "initializers": len(proto.graph.initializer),
        "parameters": parameters,
        "initializer_bytes": nbytes,
        "external_data": [{"location": location, "tensors": tensors_at[location], "bytes": size, "present": size is not None}
                          for location, size in sizes.items()],
        "metadata": {p.key: p.value for p in proto.metadata_props},
    }


def onnx_session(path: str | Path, prepack: bool = True) -> Any:
    """An onnxruntime CPU session that logs nothing; a missing or corrupted file
    (or a folder) is a ValidationError, and so is external data from anywhere
    but beside the model (:func:`check_external_data`, before onnxruntime opens it).
    ``prepack=False``: onnxruntime packs no weights into memory of its own (external data is
    then read from the file as it is used): a session for the model's inputs and outputs."""
    import onnxruntime as ort

    from ..base.threads import session_options

    path = Path(path)
    if path.is_dir():
        raise ValidationError(f"ONNX model {path} is a directory: give the .onnx file")
    if not path.is_file():
        raise ValidationError(f"ONNX model {path} does not exist")
    check_external_data(path)
    options = session_options()  # the command's intra-op threads, one inter-op (actsparse_deploy.base.threads)
    options.log_severity_level = ORT_LOG_SEVERITY
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ValidationError(f"onnxruntime cannot load {path}: {first_line(e)}") from e


def run_session(session: Any, feeds: Mapping[str, np.ndarray], deadline: float | None = None) -> list[Any]:
    """``session.run(None, feeds)`` in a worker thread while this thread waits:
    a signal (KeyboardInterrupt, Terminated) or the ``time.monotonic()``
    ``deadline`` sets ``RunOptions.terminate``, which stops onnxruntime (between
    nodes and loop iterations); the signal's exception then unwinds as usual, and
    the deadline raises :class:`TimeoutError`. onnxruntime's own errors raise as they are
    (:func:`~actsparse_deploy.base.waiting.run_in_worker`)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = ORT_LOG_SEVERITY
    outputs: list[Any] = run_in_worker(
        lambda: session.run(None, dict(feeds), options), name="actsparse-onnxruntime", deadline=deadline,
        expired=lambda: TimeoutError("onnxruntime was stopped"), stop=lambda: setattr(options, "terminate", True),
    )
    return outputs


def _named_inputs(batch: Batch, input_names: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """A batch's tensors by input name (see :func:`actsparse_deploy.data.batches.named_tensors`)."""
    try:
        return named_tensors(batch, input_names)
    except DataError as e:
        raise ValidationError(str(e)) from e


def onnx_feeds(session: Any, batch: Batch, io_spec: IOSpec | None = None) -> dict[str, np.ndarray]:
    """The batch as onnxruntime feeds, after checking it fits the ONNX model's
    declared inputs: names, ranks, dtypes, fixed dimensions (and the I/O spec's
    dynamic axes are not fixed there)."""
    declared = session.get_inputs()
    expected = [i.name for i in declared]
    given = _named_inputs(batch, io_spec.input_names if io_spec is not None else None)
    if len(given) != len(expected) or set(given) != set(expected):
        hint = "" if is_named(batch) else (
            " (a tensor or tuple batch is named by the I/O spec, else input / input_0, input_1, ...: "
            "pass a dict batch to name the inputs)"
        )
        raise ValidationError(
            f"input names do not match the ONNX model's: it takes {', '.join(expected)}; "
            f"given {', '.join(map(str, given)) or 'nothing'}{hint}"
        )
    problems: list[str] = []
    for meta in declared:
        tensor = given[meta.name] = _empty_as_declared(given[meta.name], list(meta.shape or []))
        shape = list(meta.shape or [])
        if shape:  # [] is also what onnxruntime says for an unknown rank
            problems += _shape_problems(f"input {meta.name}", shape, tuple(tensor.shape), "the batch has", io_spec)
        want, have = _ORT_DTYPES.get(meta.type), str(tensor.dtype).removeprefix("torch.")
        if want is not None and want != have:
            problems.append(f"input {meta.name}: the ONNX model takes {want}, the batch is {have}")
    if problems:
        raise ValidationError("the inputs do not fit the ONNX model: " + "; ".join(problems))
    return numpy_feeds(given, expected)


def _empty_as_declared(tensor: torch.Tensor, shape: list[Any]) -> torch.Tensor:
    """An input with no elements (a decoder's empty cache at its first step, laid out for another model: the
    dense one beside a pruned one with fewer key/value heads) in the fixed sizes the ONNX model declares; any
    other input as it is."""
    if tensor.numel() or len(shape) != tensor.dim():
        return tensor
    sizes = [d if isinstance(d, int) and d > 0 else n for d, n in zip(shape, tensor.shape)]
    return tensor if sizes == list(tensor.shape) or 0 not in sizes else tensor.new_zeros(sizes)


def validate(
    onnx_path: str | Path,
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    max_samples: int | None = 64,
    output_names: Sequence[str] | None = None,
    io_spec: IOSpec | None = None,
    timeout: float | None = None,
    release: Callable[[], None] | None = None,
) -> ValidationReport:
    """Compare onnxruntime with ``model`` (run in eval mode) on ``batches`` re-cut to
    each of ``batch_sizes`` (at most ``max_samples`` samples each); raise on any mismatch.
    ``batches`` is read several times: a list, or a stream that reads again on each pass.
    ``release``: validate in two passes, the model's outputs on every piece first, then
    ``release()`` (the caller lets the model's weights go), then onnxruntime's session:
    one copy of the weights in memory at a time instead of two.

    ``io_spec`` (what the model was exported with) names a tensor / tuple batch's
    inputs, gives the output names (unless ``output_names`` does) and the axes
    that must be dynamic. ``timeout``: seconds for the whole comparison, ``None``
    (the default) for no limit; past it onnxruntime is stopped (a tokenizer making
    held-out text batches is left) and the validation fails."""
    if not (0 <= atol < math.inf and 0 <= rtol < math.inf):  # NaN fails too; inf would pass any output
        raise ValidationError(f"tolerances must be non-negative numbers, finite (atol {atol}, rtol {rtol})")
    if timeout is not None and not timeout > 0:
        raise ValidationError(f"timeout must be a positive number of seconds, got {timeout}")
    deadline = time.monotonic() + timeout if timeout is not None and math.isfinite(timeout) else None
    if output_names is None and io_spec is not None:
        output_names = io_spec.output_names
    from ..data.streams import reading_deadline

    def held_up() -> ValidationError:  # held-out text whose tokenizer is still at work
        return ValidationError(f"validation of {onnx_path} timed out after {timeout:g} s while the tokenizer made the held-out "
                               "batches; give a larger `timeout`, or shorter texts")

    with eval_mode(model), reading_deadline(deadline, held_up):
        return _validate(onnx_path, model, batches, atol, rtol, batch_sizes, max_samples, output_names, io_spec, timeout, deadline,
                         release)


def _validate(
    onnx_path: str | Path, model: Any, batches: Iterable[Batch], atol: float, rtol: float,
    batch_sizes: Sequence[int], max_samples: int | None, output_names: Sequence[str] | None,
    io_spec: IOSpec | None, timeout: float | None, deadline: float | None, release: Callable[[], None] | None = None,
) -> ValidationReport:
    session = onnx_session(onnx_path, prepack=release is None)  # two passes: the first reads the model's inputs only
    declared = _declared_outputs(onnx_path)
    spec = _feed_spec(session, model, batches, io_spec)
    run = _Comparison(str(onnx_path), session, model, spec, declared, Tolerance(atol, rtol), timeout, deadline)
    if output_names is not None and list(output_names) != run.onnx_names:
        run.problems.append(f"output names: ONNX has {run.onnx_names}, expected {list(output_names)}")
    if release is not None:  # the PyTorch outputs of every piece, then the weights let go, then onnxruntime alone
        run.wants = collections.deque()
        _compare_pieces(run, batches, batch_sizes, max_samples)
        release()
        run.start_onnx_pass(onnx_session(onnx_path))
    return run.report(_compare_pieces(run, batches, batch_sizes, max_samples))


def _compare_pieces(run: _Comparison, batches: Iterable[Batch], batch_sizes: Sequence[int], max_samples: int | None) -> list[int]:
    """Every piece compared (or, in a two-pass validation's first pass, the PyTorch outputs kept); the batch sizes run."""
    sizes_run = _compare_batch_sizes(run, batches, batch_sizes, max_samples)
    if run.sequence_axes and not run.count_mismatch:  # a second length on each sequence axis: the held-out pieces cut to half
        _compare_second_lengths(run, batches, sizes_run[-1], max_samples)
    return sizes_run


class _Comparison:
    """One validation under way: the ONNX session and the PyTorch model compared
    piece by piece, every failure collected (and each output's differences)."""

    def __init__(
        self, onnx_path: str, session: Any, model: Any, spec: IOSpec, declared: list[tuple[str, list[int | str | None] | None]],
        tolerance: Tolerance, timeout: float | None, deadline: float | None,
    ) -> None:
        self.onnx_path, self.session, self.model, self.spec, self.declared = onnx_path, session, model, spec, declared
        self.tolerance, self.timeout, self.deadline = tolerance, timeout, deadline
        self.onnx_names = [o.name for o in session.get_outputs()]
        self.diffs = [OutputDiff(name) for name in self.onnx_names]
        self.problems: list[str] = []
        self.shape_problems: list[str] = []
        self.samples = 0
        self.count_mismatch = False
        self.sequence_axes = _sequence_axes(session, spec)
        self.shapes: list[dict[str, list[int]]] = []
        self.lengths: dict[str, list[int]] = {}
        #: a two-pass validation's PyTorch outputs, piece by piece: filled by the first pass (``recording``), used by the second
        self.wants: collections.deque[list[np.ndarray]] | None = None
        self.recording = True

    def start_onnx_pass(self, session: Any) -> None:
        """The second pass of a two-pass validation: onnxruntime's ``session`` against the outputs kept."""
        self.session, self.model, self.recording = session, None, False
        self.shapes, self.lengths, self.samples = [], {}, 0

    def timed_out(self, where: str, what: str) -> ValidationError:
        return ValidationError(
            f"validation of {self.onnx_path} timed out after {self.timeout:g} s at {where}: {what}; "
            "give a larger `timeout` if the model is only slow"
        )

    def check(self, piece: Batch, where: str) -> bool:
        """Compare one piece; False once the output counts differ (said once)."""
        feeds = onnx_feeds(self.session, piece, self.spec)
        seen = self._seen(feeds)
        if self.wants is not None and self.recording:
            self.wants.append(self._torch_outputs(piece, where, seen))
            return True
        want = self.wants.popleft() if self.wants is not None else self._torch_outputs(piece, where, seen)
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise self.timed_out(where, "the PyTorch model was running")
        got = self._onnx_outputs(feeds, where)
        if len(want) != len(got):
            self.problems.append(f"the ONNX model has {len(got)} outputs, the PyTorch model {len(want)}")
            return False
        self.samples += len(next(iter(feeds.values()))) if feeds else 0
        for problem in _declared_output_problems(self.declared, want, self.spec):
            if problem not in self.shape_problems:
                self.shape_problems.append(problem)
        for diff, g, w in zip(self.diffs, got, want):
            diff.compare(g, w, self.tolerance, where=f"{where}: ")
        return True

    def _seen(self, feeds: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
        """The feeds' shapes, recorded (with the lengths on the sequence axes) where new."""
        seen = {name: list(array.shape) for name, array in feeds.items()}
        if seen not in self.shapes:
            self.shapes.append(seen)
        for label, axes in self.sequence_axes.items():
            length = seen[axes[0][0]][axes[0][1]]
            if length not in self.lengths.setdefault(label, []):
                self.lengths[label].append(length)
        return seen

    def _torch_outputs(self, piece: Batch, where: str, seen: Mapping[str, list[int]]) -> list[np.ndarray]:
        try:
            with torch.no_grad():
                return [t.detach().cpu().numpy() for t in flatten_outputs(run_batch(self.model, piece))]
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            raise ValidationError(
                f"the PyTorch model fails at {where} ({', '.join(f'{n} {v}' for n, v in seen.items())}): "
                f"{type(e).__name__}: {first_line(e)}"
            ) from e

    def _onnx_outputs(self, feeds: Mapping[str, np.ndarray], where: str) -> list[Any]:
        try:
            return run_session(self.session, feeds, self.deadline)
        except TimeoutError as e:
            raise self.timed_out(where, "onnxruntime was stopped") from e
        except Exception as e:
            raise ValidationError(f"onnxruntime failed at {where}: {first_line(e)}") from e

    def report(self, sizes_run: list[int]) -> ValidationReport:
        """The report; every failure collected raised as one :class:`ValidationError`."""
        problems = self.problems
        if self.shape_problems:
            problems.append("the declared output shapes do not fit what PyTorch gives: " + "; ".join(self.shape_problems))
        for diff in self.diffs:
            problems.extend(diff.problems(self.tolerance))
        report = ValidationReport(self.onnx_path, not problems, self.tolerance.atol, self.tolerance.rtol, sizes_run, self.samples,
                                  self.diffs, self.shapes, self.lengths)
        if problems:
            summary = "; ".join(f"{d.name} max abs {d.max_abs:.3g} max rel {d.max_rel:.3g}" for d in self.diffs)
            raise ValidationError(
                f"{self.onnx_path} does not match the PyTorch model: " + " | ".join(problems) + f" (all outputs: {summary})"
            ) from None
        return report


def _compare_batch_sizes(run: _Comparison, batches: Iterable[Batch], batch_sizes: Sequence[int], max_samples: int | None) -> list[int]:
    """Compare the held-out batches re-cut to each of ``batch_sizes``; the sizes there was data for (2 at least)."""
    sizes_run: list[int] = []
    for size in batch_sizes:
        pieces = resize_batches(batches, size, max_samples)
        if not pieces:
            continue
        sizes_run.append(size)
        for piece in pieces:
            if run.count_mismatch:
                break
            run.count_mismatch = not run.check(piece, f"batch size {size}")
    if len(sizes_run) < min(2, len(batch_sizes)):
        raise ValidationError(
            f"too little held-out data to validate at {min(2, len(batch_sizes))} batch sizes of {list(batch_sizes)}"
        )
    return sizes_run


def _compare_second_lengths(run: _Comparison, batches: Iterable[Batch], size: int, max_samples: int | None) -> None:
    """Compare the pieces of batch size ``size`` cut to half their length on each sequence axis;
    a sequence axis that shows no second length is a :class:`ValidationError`."""
    for label, axes in run.sequence_axes.items():
        for piece in resize_batches(batches, size, max_samples):
            cut = _cut_piece(piece, run.spec, axes)
            if cut is None:
                continue
            length = named_tensors(cut, run.spec.input_names)[axes[0][0]].shape[axes[0][1]]
            if not run.check(cut, f"batch size {size}, {label} {length}"):
                break
        if len(run.lengths.get(label, [])) < 2:
            where = ", ".join(f"axis {a} of {n}" for n, a in axes)
            raise ValidationError(
                f"cannot validate a second length of the dynamic axis {label!r} ({where}): every held-out batch "
                f"has length {run.lengths.get(label, ['?'])[0]} there; give held-out data at least 2 long on it"
            )


def _feed_spec(session: Any, model: Any, batches: Iterable[Batch], io_spec: IOSpec | None) -> IOSpec:
    """The I/O spec that names the feeds: ``io_spec``; else, for a tensor / tuple
    batch, the model's ``forward`` parameter names (export names inputs so),
    unless the ONNX model takes ``input`` / ``input_0, ...`` instead (an older
    export): a mismatch then names the model's own inputs."""
    if io_spec is not None:
        return io_spec
    first = next(iter(batches), None)
    names = input_names(first) if first is not None else ()
    if first is not None and not is_named(first):
        taken = {i.name for i in session.get_inputs()}
        from_model = forward_input_names(model, first)
        if set(from_model) == taken or set(names) != taken:
            names = from_model
    return IOSpec(tuple(names), tuple(o.name for o in session.get_outputs()), {})


def _sequence_axes(session: Any, spec: IOSpec) -> dict[str, list[tuple[str, int]]]:
    """Input axes past the batch axis that may vary, by label: the I/O spec's
    dynamic axes, else the ONNX model's named (symbolic) dimensions."""
    found: dict[str, list[tuple[str, int]]] = {}
    for name in spec.input_names:
        for axis, label in spec.dynamic_axes.get(name, {}).items():
            if axis > 0 and label != BATCH:
                found.setdefault(label, []).append((name, axis))
    if found or spec.dynamic_axes:
        return found
    for meta in session.get_inputs():
        for axis, dim in enumerate(meta.shape or []):
            if axis > 0 and isinstance(dim, str) and dim != BATCH:
                found.setdefault(dim, []).append((meta.name, axis))
    return found


def _cut_piece(piece: Batch, spec: IOSpec, axes: Sequence[tuple[str, int]]) -> Batch | None:
    """``piece`` with each of ``axes`` cut to half its length (None where one is shorter than 2)."""
    return cut_axes(piece, spec.input_names, axes)


def _declared_outputs(path: str | Path) -> list[tuple[str, list[int | str | None] | None]]:
    """Each graph output's name and shape as the file declares it (onnxruntime
    reports its own inferred shape instead): an int per fixed dimension, a name
    or None per free one; None for an unknown rank."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises protobuf's and its own exception types
        raise ValidationError(f"cannot read the declared outputs of {path}: {first_line(e)}") from e
    found: list[tuple[str, list[int | str | None] | None]] = []
    for value in proto.graph.output:
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            found.append((value.name, None))
            continue
        dims: list[int | str | None] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
        ]
        found.append((value.name, dims))
    return found


def _shape_problems(
    what: str, declared: Sequence[int | str | None], actual: tuple[int, ...], side: str, io_spec: IOSpec | None
) -> list[str]:
    """A declared shape against an actual one: the rank, every dimension the
    ONNX model fixes, and none fixed where the I/O spec makes the axis dynamic.
    ``what``: ``input x`` / ``output y``; ``side``: who has ``actual``."""
    if len(declared) != len(actual):
        return [f"{what}: the ONNX model declares rank {len(declared)} ({list(declared)}), {side} rank {len(actual)} ({list(actual)})"]
    dynamic = io_spec.dynamic_axes.get(what.split(" ", 1)[1], {}) if io_spec is not None else {}
    problems: list[str] = []
    for axis, dim in enumerate(declared):
        if not isinstance(dim, int):
            continue
        if axis in dynamic:
            problems.append(f"{what} axis {axis}: the ONNX model fixes it to {dim}, the I/O spec makes it dynamic ({dynamic[axis]})")
        elif dim != actual[axis]:
            problems.append(f"{what} axis {axis}: the ONNX model fixes it to {dim}, {side} {actual[axis]}")
    return problems


def _declared_output_problems(
    declared: Sequence[tuple[str, list[int | str | None] | None]], outputs: Sequence[np.ndarray], io_spec: IOSpec | None
) -> list[str]:
    """The ONNX model's declared output shapes against what PyTorch gave. A
    declared shape that lies breaks every consumer that reads it (buffers
    allocated from it, shape inference downstream); an unknown rank declares nothing."""
    problems: list[str] = []
    for (name, shape), out in zip(declared, outputs):
        if shape is not None:
            problems += _shape_problems(f"output {name}", shape, tuple(out.shape), "PyTorch gives", io_spec)
    return problems
