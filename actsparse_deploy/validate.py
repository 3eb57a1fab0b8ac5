"""Stage 3b: prove the ONNX model computes what the squashed PyTorch model computes.

The ONNX model runs under onnxruntime (CPU provider) and the PyTorch model on
the same held-out inputs, at several batch sizes. The inputs come first: their
names (a dict batch's keys, else the I/O spec's names, else ``input`` /
``input_0, input_1, ...`` as :meth:`IOSpec.infer` names them: never fed by
position alone), ranks, dtypes and every dimension the ONNX model fixes must fit
the batch and the I/O spec's dynamic axes. Then output names, shapes, dtypes and
values (``|onnx - torch| <= atol + rtol * |torch|``); a NaN or Inf on either
side fails, counted and named. Every failure is collected and raised as one
:class:`ValidationError` that lists each output's max abs and max rel difference
and the tolerance. A mismatch is never a warning.

onnxruntime runs in a worker thread while this one waits, so Ctrl-C / SIGTERM
stop it (``RunOptions.terminate``) and unwind as usual, and ``timeout`` (seconds
for the whole comparison, default ``None``: no limit) fails a model that runs
too long (a runaway ``Loop``). onnxruntime's own log is off: its errors arrive
as exceptions and become one message.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from actsparse_deploy.export import export_onnx
    >>> from actsparse_deploy.validate import validate
    >>> model = nn.Sequential(nn.Linear(4, 2)).eval()
    >>> path = tempfile.mkdtemp() + "/model.onnx"
    >>> _ = export_onnx(model, torch.randn(2, 4), path, exporter="torchscript")
    >>> report = validate(path, model, [torch.randn(8, 4)], batch_sizes=(1, 3))
    >>> report.passed, report.batch_sizes
    (True, [1, 3])
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .calibrate import Batch, batch_size, eval_mode, run_batch
from .errors import ValidationError, first_line
from .export import IOSpec, flatten_outputs

__all__ = ["OutputDiff", "ValidationReport", "compare_models", "onnx_session", "resize_batches", "run_session", "validate"]

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 0.0
DEFAULT_BATCH_SIZES = (1, 3, 5)
#: how often the waiting thread looks at the clock (and takes signals) while onnxruntime runs
POLL_SECONDS = 0.05
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
class OutputDiff:
    """The worst difference seen on one output over all validation batches."""

    name: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    #: the verdict's own figure: worst ``|onnx - torch| / (atol + rtol * |torch|)`` (over 1 fails)
    max_tolerance_used: float = 0.0
    shape_errors: list[str] = field(default_factory=list)
    dtype_error: str | None = None
    over_tolerance: bool = False
    values: int = 0
    #: NaN / Inf counts, ``{"NaN in the ONNX output": n, ...}``
    non_finite: dict[str, int] = field(default_factory=dict)

    def update(self, got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> None:
        got64, want64 = got.astype(np.float64), want.astype(np.float64)
        self.values += got64.size
        for side, values in (("ONNX", got64), ("PyTorch", want64)):
            for word, count in (("NaN", np.isnan(values).sum()), ("Inf", np.isinf(values).sum())):
                if count:
                    key = f"{word} in the {side} output"
                    self.non_finite[key] = self.non_finite.get(key, 0) + int(count)
        finite = np.isfinite(got64) & np.isfinite(want64)  # non-finite values fail on their own, counted
        diff = np.abs(got64[finite] - want64[finite])
        scale = np.abs(want64[finite])
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.max_rel = max(self.max_rel, float((diff / np.maximum(scale, np.finfo(np.float32).tiny)).max()))
            tolerance = atol + rtol * scale
            used = np.where(tolerance > 0, diff / np.where(tolerance > 0, tolerance, 1.0), np.where(diff > 0, np.inf, 0.0))
            self.max_tolerance_used = max(self.max_tolerance_used, float(used.max()))
            if not np.all(diff <= tolerance):
                self.over_tolerance = True

    def problems(self, atol: float, rtol: float) -> list[str]:
        found = []
        if self.shape_errors:
            found.append(f"{self.name}: shape mismatch ({'; '.join(self.shape_errors)})")
        if self.dtype_error:
            found.append(f"{self.name}: dtype mismatch ({self.dtype_error})")
        if self.non_finite:
            counts = ", ".join(f"{key} ({n} of {self.values} values)" for key, n in self.non_finite.items())
            found.append(f"{self.name}: {counts}; a NaN or Inf never validates")
        if self.over_tolerance:
            found.append(
                f"{self.name}: max abs diff {self.max_abs:.3g}, max rel diff {self.max_rel:.3g} "
                f"over tolerance atol {atol:g} + rtol {rtol:g} * |PyTorch|"
            )
        return found

    def to_json(self) -> dict[str, Any]:
        return {
            "output": self.name,
            "max_abs_diff": self.max_abs,
            "max_rel_diff": self.max_rel,
            "max_tolerance_used": self.max_tolerance_used,
            "shape_errors": self.shape_errors,
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
        }


def onnx_session(path: str | Path) -> Any:
    """An onnxruntime CPU session that logs nothing; a missing or corrupted file
    (or a folder) is a ValidationError."""
    import onnxruntime as ort

    path = Path(path)
    if path.is_dir():
        raise ValidationError(f"ONNX model {path} is a directory: give the .onnx file")
    if not path.is_file():
        raise ValidationError(f"ONNX model {path} does not exist")
    options = ort.SessionOptions()
    options.log_severity_level = ORT_LOG_SEVERITY
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ValidationError(f"onnxruntime cannot load {path}: {first_line(e)}") from e


def run_session(session: Any, feeds: Mapping[str, np.ndarray], deadline: float | None = None) -> list[Any]:
    """``session.run(None, feeds)`` in a worker thread while this thread waits:
    a signal (KeyboardInterrupt, Terminated) or the ``time.monotonic()``
    ``deadline`` sets ``RunOptions.terminate``, which stops onnxruntime (between
    nodes and loop iterations); the signal's exception then unwinds as usual, and
    the deadline raises :class:`TimeoutError`. onnxruntime's own errors raise as they are."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = ORT_LOG_SEVERITY
    outcome: dict[str, Any] = {}
    # an Event, not Thread.join: a join interrupted by a signal can mark a running thread as stopped
    done = threading.Event()

    def work() -> None:
        try:
            outcome["outputs"] = session.run(None, dict(feeds), options)
        except BaseException as e:  # handed to the waiting thread
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=work, name="actsparse-onnxruntime", daemon=True).start()
    timed_out = False
    try:
        while not done.is_set():
            # a timed wait: the signal handlers run between waits (session.run would hold them off)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                timed_out = True
                options.terminate = True
                done.wait()
                break
            done.wait(POLL_SECONDS if left is None else min(POLL_SECONDS, left))
    except BaseException:
        options.terminate = True
        done.wait()  # onnxruntime stops at its next node or loop iteration; never unwind while it runs
        raise
    if timed_out:
        raise TimeoutError("onnxruntime was stopped")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["outputs"]


def _named_inputs(batch: Batch, input_names: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """A batch's tensors by input name: a dict's keys, else the I/O spec's names,
    else the names export gives (``input`` / ``input_0, input_1, ...``)."""
    if isinstance(batch, Mapping):
        return dict(batch)
    tensors = [batch] if isinstance(batch, torch.Tensor) else list(batch)
    names = list(input_names) if input_names is not None else list(IOSpec.infer(batch, 1).input_names)
    if len(names) != len(tensors):
        raise ValidationError(
            f"a batch holds {len(tensors)} input tensor(s) but the I/O spec names {len(names)} ({', '.join(names)})"
        )
    return dict(zip(names, tensors))


def _feeds(session: Any, batch: Batch, io_spec: IOSpec | None = None) -> dict[str, np.ndarray]:
    """The batch as onnxruntime feeds, after checking it fits the ONNX model's
    declared inputs: names, ranks, dtypes, fixed dimensions (and the I/O spec's
    dynamic axes are not fixed there)."""
    declared = session.get_inputs()
    expected = [i.name for i in declared]
    given = _named_inputs(batch, io_spec.input_names if io_spec is not None else None)
    if len(given) != len(expected) or set(given) != set(expected):
        hint = "" if isinstance(batch, Mapping) else (
            " (a tensor or tuple batch is named by the I/O spec, else input / input_0, input_1, ...: "
            "pass a dict batch to name the inputs)"
        )
        raise ValidationError(
            f"input names do not match the ONNX model's: it takes {', '.join(expected)}; "
            f"given {', '.join(map(str, given)) or 'nothing'}{hint}"
        )
    problems: list[str] = []
    for meta in declared:
        tensor = given[meta.name]
        shape = list(meta.shape or [])
        dynamic = io_spec.dynamic_axes.get(meta.name, {}) if io_spec is not None else {}
        if shape and len(shape) != tensor.ndim:  # [] is also what onnxruntime says for an unknown rank
            problems.append(
                f"input {meta.name}: the ONNX model declares rank {len(shape)} ({shape}), "
                f"the batch has rank {tensor.ndim} ({list(tensor.shape)})"
            )
        elif shape:
            for axis, dim in enumerate(shape):
                if not isinstance(dim, int):
                    continue
                if axis in dynamic:
                    problems.append(
                        f"input {meta.name} axis {axis}: the ONNX model fixes it to {dim}, "
                        f"the I/O spec makes it dynamic ({dynamic[axis]})"
                    )
                elif dim != tensor.shape[axis]:
                    problems.append(
                        f"input {meta.name} axis {axis}: the ONNX model fixes it to {dim}, the batch has {tensor.shape[axis]}"
                    )
        want, have = _ORT_DTYPES.get(meta.type), str(tensor.dtype).removeprefix("torch.")
        if want is not None and want != have:
            problems.append(f"input {meta.name}: the ONNX model takes {want}, the batch is {have}")
    if problems:
        raise ValidationError("the inputs do not fit the ONNX model: " + "; ".join(problems))
    return {name: given[name].detach().cpu().numpy() for name in expected}


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: v[start:stop] for k, v in batch.items()}
    return tuple(t[start:stop] for t in batch)


def resize_batches(batches: Iterable[Batch], size: int, max_samples: int | None = None) -> list[Batch]:
    """Cut each batch into pieces of exactly ``size`` rows (a shorter remainder is
    dropped), keeping each batch's other axes (sequence length) as they are."""
    out: list[Batch] = []
    taken = 0
    for batch in batches:
        n = batch_size(batch)
        for start in range(0, n - size + 1, size):
            if max_samples is not None and taken + size > max_samples:
                return out
            out.append(_slice(batch, start, start + size))
            taken += size
    return out


def validate(
    onnx_path: str | Path,
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    max_samples: int | None = 64,
    output_names: Sequence[str] | None = None,
    io_spec: IOSpec | None = None,
    timeout: float | None = None,
) -> ValidationReport:
    """Compare onnxruntime with ``model`` (run in eval mode) on ``batches`` re-cut to
    each of ``batch_sizes`` (at most ``max_samples`` samples each); raise on any mismatch.

    ``io_spec`` (what the model was exported with) names a tensor / tuple batch's
    inputs, gives the output names (unless ``output_names`` does) and the axes
    that must be dynamic. ``timeout``: seconds for the whole comparison, ``None``
    (the default) for no limit; past it onnxruntime is stopped and the
    validation fails."""
    if atol < 0 or rtol < 0 or math.isnan(atol) or math.isnan(rtol):
        raise ValidationError(f"tolerances must be non-negative numbers (atol {atol}, rtol {rtol})")
    if timeout is not None and not timeout > 0:
        raise ValidationError(f"timeout must be a positive number of seconds, got {timeout}")
    deadline = time.monotonic() + timeout if timeout is not None and math.isfinite(timeout) else None
    if output_names is None and io_spec is not None:
        output_names = io_spec.output_names
    with _eval(model):
        return _validate(onnx_path, model, batches, atol, rtol, batch_sizes, max_samples, output_names, io_spec, timeout, deadline)


@contextlib.contextmanager
def _eval(*models: Any) -> Iterator[None]:
    """Eval mode for the duration (flags restored); a torch.export program's
    module cannot switch modes and is run as it is (it was captured in eval)."""
    with contextlib.ExitStack() as stack:
        for model in models:
            if isinstance(model, nn.Module) and not isinstance(model, torch.fx.GraphModule):
                stack.enter_context(eval_mode(model))
        yield


def _validate(
    onnx_path: str | Path, model: Any, batches: Sequence[Batch], atol: float, rtol: float,
    batch_sizes: Sequence[int], max_samples: int | None, output_names: Sequence[str] | None,
    io_spec: IOSpec | None, timeout: float | None, deadline: float | None,
) -> ValidationReport:
    session = onnx_session(onnx_path)
    onnx_names = [o.name for o in session.get_outputs()]
    problems: list[str] = []
    if output_names is not None and list(output_names) != onnx_names:
        problems.append(f"output names: ONNX has {onnx_names}, expected {list(output_names)}")
    diffs = [OutputDiff(name) for name in onnx_names]
    sizes_run: list[int] = []
    samples = 0
    count_mismatch = False

    def timed_out(size: int, where: str) -> ValidationError:
        return ValidationError(
            f"validation of {onnx_path} timed out after {timeout:g} s at batch size {size}: {where}; "
            "give a larger --timeout if the model is only slow"
        )

    for size in batch_sizes:
        pieces = resize_batches(batches, size, max_samples)
        if not pieces:
            continue
        sizes_run.append(size)
        for piece in pieces:
            if count_mismatch:
                break
            feeds = _feeds(session, piece, io_spec)
            with torch.no_grad():
                want = [t.detach().cpu().numpy() for t in flatten_outputs(run_batch(model, piece))]
            if deadline is not None and time.monotonic() >= deadline:
                raise timed_out(size, "the PyTorch model was running")
            try:
                got = run_session(session, feeds, deadline)
            except TimeoutError as e:
                raise timed_out(size, "onnxruntime was stopped") from e
            except Exception as e:
                raise ValidationError(f"onnxruntime failed at batch size {size}: {first_line(e)}") from e
            if len(want) != len(got):
                problems.append(f"the ONNX model has {len(got)} outputs, the PyTorch model {len(want)}")
                count_mismatch = True  # said once: the other batch sizes would only repeat it
                break
            samples += size
            for diff, g, w in zip(diffs, got, want):
                if g.dtype != w.dtype and diff.dtype_error is None:
                    diff.dtype_error = f"ONNX {g.dtype} vs PyTorch {w.dtype}"
                if g.shape != w.shape:
                    if len(diff.shape_errors) < 3:
                        diff.shape_errors.append(f"batch size {size}: ONNX {list(g.shape)} vs PyTorch {list(w.shape)}")
                    continue
                diff.update(g, w, atol, rtol)
    if len(sizes_run) < min(2, len(batch_sizes)):
        raise ValidationError(
            f"too little held-out data to validate at {min(2, len(batch_sizes))} batch sizes of {list(batch_sizes)}"
        )
    for diff in diffs:
        problems.extend(diff.problems(atol, rtol))
    report = ValidationReport(str(onnx_path), not problems, atol, rtol, sizes_run, samples, diffs)
    if problems:
        summary = "; ".join(f"{d.name} max abs {d.max_abs:.3g} max rel {d.max_rel:.3g}" for d in diffs)
        raise ValidationError(
            f"{onnx_path} does not match the PyTorch model: " + " | ".join(problems) + f" (all outputs: {summary})"
        ) from None
    return report


def compare_models(dense: nn.Module, sparse: nn.Module, batches: Iterable[Batch]) -> list[dict[str, Any]]:
    """What sparsification cost, per output: max abs diff and per-sample cosine
    similarity (mean and worst) of the sparse model's outputs to the dense one's."""
    stats: list[dict[str, Any]] = []
    cosines: list[list[np.ndarray]] = []
    with torch.no_grad(), _eval(dense, sparse):
        for batch in batches:
            a = flatten_outputs(run_batch(dense, batch))
            b = flatten_outputs(run_batch(sparse, batch))
            if not stats:
                stats = [{"output": i, "max_abs_diff": 0.0} for i in range(len(a))]
                cosines = [[] for _ in a]
            for i, (x, y) in enumerate(zip(a, b)):
                x64, y64 = x.double().reshape(x.shape[0], -1), y.double().reshape(y.shape[0], -1)
                stats[i]["max_abs_diff"] = max(stats[i]["max_abs_diff"], float((x64 - y64).abs().max()))
                cosines[i].append(torch.nn.functional.cosine_similarity(x64, y64, dim=1, eps=1e-12).numpy())
    for stat, cos in zip(stats, cosines):
        values = np.concatenate(cos)
        stat["cosine_mean"] = float(values.mean())
        stat["cosine_min"] = float(values.min())
    return stats
