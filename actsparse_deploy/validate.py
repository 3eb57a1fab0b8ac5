"""Stage 3b: prove the ONNX model computes what the squashed PyTorch model computes.

The ONNX model runs under onnxruntime (CPU provider) and the PyTorch model on
the same held-out inputs, at several batch sizes. Output names are checked
first, then shapes, then values (``|onnx - torch| <= atol + rtol * |torch|``);
every failure is collected and raised as one :class:`ValidationError` that lists
each output's max abs and max rel difference and the tolerance. A mismatch is
never a warning.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .calibrate import Batch, batch_size, eval_mode, run_batch
from .errors import ValidationError, first_line
from .export import flatten_outputs

__all__ = ["OutputDiff", "ValidationReport", "compare_models", "onnx_session", "resize_batches", "validate"]

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 0.0
DEFAULT_BATCH_SIZES = (1, 3, 5)


@dataclass
class OutputDiff:
    """The worst difference seen on one output over all validation batches."""

    name: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    shape_errors: list[str] = field(default_factory=list)
    over_tolerance: bool = False

    def update(self, got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> None:
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        scale = np.abs(want.astype(np.float64))
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.max_rel = max(self.max_rel, float((diff / np.maximum(scale, np.finfo(np.float32).tiny)).max()))
            if not np.all(diff <= atol + rtol * scale):  # NaN fails too
                self.over_tolerance = True

    def to_json(self) -> dict[str, Any]:
        return {"output": self.name, "max_abs_diff": self.max_abs, "max_rel_diff": self.max_rel, "shape_errors": self.shape_errors}


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
    """An onnxruntime CPU session; a missing or corrupted file is a ValidationError."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"ONNX model {path} does not exist")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ValidationError(f"onnxruntime cannot load {path}: {first_line(e)}") from e


def _feeds(session: Any, batch: Batch) -> dict[str, np.ndarray]:
    expected = [i.name for i in session.get_inputs()]
    if isinstance(batch, torch.Tensor):
        given: dict[str, torch.Tensor] = dict(zip(expected, [batch]))
        n_given = 1
    elif isinstance(batch, Mapping):
        given, n_given = dict(batch), len(batch)
    else:
        given, n_given = dict(zip(expected, batch)), len(batch)
    names = list(batch) if isinstance(batch, Mapping) else expected[:n_given]
    if n_given != len(expected) or set(names) != set(expected):
        raise ValidationError(
            f"the inputs do not match the ONNX model's: it takes {', '.join(expected)}; given {', '.join(map(str, names)) or 'nothing'}"
        )
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
) -> ValidationReport:
    """Compare onnxruntime with ``model`` (run in eval mode) on ``batches`` re-cut to
    each of ``batch_sizes`` (at most ``max_samples`` samples each); raise on any mismatch."""
    if atol < 0 or rtol < 0 or math.isnan(atol) or math.isnan(rtol):
        raise ValidationError(f"tolerances must be non-negative numbers (atol {atol}, rtol {rtol})")
    with _eval(model):
        return _validate(onnx_path, model, batches, atol, rtol, batch_sizes, max_samples, output_names)


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
) -> ValidationReport:
    session = onnx_session(onnx_path)
    onnx_names = [o.name for o in session.get_outputs()]
    problems: list[str] = []
    if output_names is not None and list(output_names) != onnx_names:
        problems.append(f"output names: ONNX has {onnx_names}, expected {list(output_names)}")
    diffs = [OutputDiff(name) for name in onnx_names]
    sizes_run: list[int] = []
    samples = 0
    for size in batch_sizes:
        pieces = resize_batches(batches, size, max_samples)
        if not pieces:
            continue
        sizes_run.append(size)
        for piece in pieces:
            feeds = _feeds(session, piece)
            try:
                got = session.run(None, feeds)
            except Exception as e:
                raise ValidationError(f"onnxruntime failed at batch size {size}: {first_line(e)}") from e
            with torch.no_grad():
                want = [t.detach().cpu().numpy() for t in flatten_outputs(run_batch(model, piece))]
            if len(want) != len(got):
                problems.append(f"the ONNX model has {len(got)} outputs, the PyTorch model {len(want)}")
                break
            samples += size
            for diff, g, w in zip(diffs, got, want):
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
        if diff.shape_errors:
            problems.append(f"{diff.name}: shape mismatch ({'; '.join(diff.shape_errors)})")
        if diff.over_tolerance:
            problems.append(
                f"{diff.name}: max abs diff {diff.max_abs:.3g}, max rel diff {diff.max_rel:.3g} "
                f"over tolerance atol {atol:g} + rtol {rtol:g} * |PyTorch|"
            )
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
