"""Stage 3a: ONNX export with provenance, written whole or not at all.

Either exporter of ``torch.onnx`` (``dynamo`` or ``torchscript``), a dynamic
batch axis always (and a dynamic sequence axis where the model's I/O spec says),
a chosen opset, one file unless the model is over 2 GB or external data is
asked for, ``onnx.checker`` run on the result, and ``metadata_props`` recording
the tool version, squash mode and per-layer sparsity.

Everything is written in a short-named staging folder beside the output
(``.actsparse-<pid>-<random>``, so any legal output name works) and renamed into
place at the end; a full disk anywhere on the way (the exporter's own write,
the final save, the rename) is an :class:`OutputError`, and nothing is left.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from actsparse_deploy.export import export_onnx
    >>> model = nn.Sequential(nn.Linear(4, 2)).eval()
    >>> path = tempfile.mkdtemp() + "/model.onnx"
    >>> result = export_onnx(model, torch.randn(2, 4), path, exporter="torchscript")
    >>> result.io.input_names, result.io.output_names
    (('input',), ('output',))
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from .batches import Batch, describe_batch, flatten_outputs, input_names, is_named, positional, run_batch
from .calibrate import eval_mode
from .errors import DataError, ExportError, OutputError, first_line
from .files import check_output_path, os_reason, remove_stale_staging, set_output_mode, staging_dir
from .version import __version__

__all__ = ["DEFAULT_EXPORTER", "EXPORTERS", "ExportResult", "IOSpec", "PositionalAdapter", "export_onnx", "flatten_outputs"]

from .constants import DEFAULT_EXPORTER, EXPORTERS  # noqa: E402  (one definition, light for the CLI)

TWO_GB = 2**31
METADATA_PREFIX = "actsparse_deploy."
# errors of the file system, not of the exporter: the output cannot be written
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.ENAMETOOLONG}


@dataclass(frozen=True)
class IOSpec:
    """Input / output names and dynamic axes (``{name: {axis: dim_name}}``)."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]] = field(default_factory=dict)

    def export_dynamic_shapes(self, named: bool = True) -> tuple[dict[int, Any], ...]:
        """``torch.export`` dynamic shapes, one dict per input: one named ``Dim``
        per axis name, or ``Dim.DYNAMIC`` (ranges such as a maximum sequence
        length are then inferred from the model instead of refused)."""
        dims: dict[str, Any] = {}

        def dim(name: str) -> Any:
            return dims.setdefault(name, torch.export.Dim(name)) if named else torch.export.Dim.DYNAMIC

        return tuple(
            {axis: dim(name) for axis, name in self.dynamic_axes.get(input_name, {}).items()}
            for input_name in self.input_names
        )

    @classmethod
    def infer(cls, example: Batch, n_outputs: int, sequence_axis: bool = False) -> IOSpec:
        """Default names (``input`` / dict keys, ``output`` / ``output_i``), batch axis
        dynamic everywhere, plus axis 1 of the inputs and outputs if ``sequence_axis``."""
        inputs = input_names(example)
        outputs = ("output",) if n_outputs == 1 else tuple(f"output_{i}" for i in range(n_outputs))
        axes = {0: "batch", 1: "sequence"} if sequence_axis else {0: "batch"}
        return cls(inputs, outputs, {name: dict(axes) for name in inputs + outputs})


def positional_inputs(example: Batch, names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """The example's tensors in input order (a dict's in ``names`` order)."""
    return positional(example, names)


class PositionalAdapter(nn.Module):
    """Positional inputs in (passed by ``names`` as keywords where given), a flat
    tuple of tensors out: what both exporters and torch.export handle."""

    def __init__(self, model: nn.Module, names: Sequence[str] | None) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names) if names is not None else None

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.names, args))) if self.names is not None else self.model(*args)
        return flatten_outputs(out)


@dataclass
class ExportResult:
    path: Path
    exporter: str
    opset: int
    io: IOSpec
    seconds: float
    external_data: bool
    size_bytes: int
    metadata: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "exporter": self.exporter,
            "opset": self.opset,
            "inputs": list(self.io.input_names),
            "outputs": list(self.io.output_names),
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in self.io.dynamic_axes.items()},
            "seconds": round(self.seconds, 3),
            "external_data": self.external_data,
            "size_bytes": self.size_bytes,
        }


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """Silence torch.export / exporter prints, warnings and log lines unless verbose
    (torch.export prints the partial graph when it fails)."""
    if verbose:
        yield
        return
    names = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx", "onnxscript")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _run_exporter(
    wrapped: Any, args: tuple[torch.Tensor, ...], path: Path, exporter: str, opset: int | None, spec: IOSpec
) -> None:
    common: dict[str, Any] = {
        "input_names": list(spec.input_names), "output_names": list(spec.output_names), "opset_version": opset,
    }
    if isinstance(wrapped, torch.export.ExportedProgram):  # its dynamic shapes are part of it
        exported = torch.onnx.export(wrapped, args, dynamo=True, **common)
        if exported is None:
            raise ExportError("the dynamo exporter returned no program")
        exported.save(str(path), external_data=True)
        return
    if exporter == "torchscript":
        axes = {name: dict(axes) for name, axes in spec.dynamic_axes.items()}
        torch.onnx.export(wrapped, args, str(path), dynamo=False, dynamic_axes=axes, **common)
        return
    shapes = spec.export_dynamic_shapes()
    # forward(*args): the dynamic shapes of the one var-positional argument
    program = torch.onnx.export(wrapped, args, dynamo=True, dynamic_shapes=(shapes,), **common)
    if program is None:
        raise ExportError("the dynamo exporter returned no program")
    program.save(str(path), external_data=True)


def export_onnx(
    model: nn.Module | torch.export.ExportedProgram,
    example: Batch,
    path: str | Path,
    *,
    exporter: str = DEFAULT_EXPORTER,
    opset: int | None = None,
    io_spec: IOSpec | None = None,
    sequence_axis: bool = False,
    metadata: Mapping[str, str] | None = None,
    external_data: bool = False,
    overwrite: bool = True,
    verbose: bool = False,
) -> ExportResult:
    """Export ``model`` (called on ``example``) to ``path``. External data
    (``<name>.data`` beside it) when asked or when the model is over 2 GB."""
    path = Path(path)
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; known: {', '.join(EXPORTERS)}")
    check_output_path(path, overwrite)
    if external_data:  # its name must fit too (and not clobber a file without --overwrite)
        check_output_path(path.parent / f"{path.name}.data", overwrite)
    program = model if isinstance(model, torch.export.ExportedProgram) else None
    if program is not None and exporter != "dynamo":
        raise ExportError("a torch.export program (.pt2) exports with `exporter` dynamo only")
    with contextlib.ExitStack() as stack:
        if program is None and isinstance(model, nn.Module):
            stack.enter_context(eval_mode(model))  # the caller's train/eval flags come back after
        return _export(model, program, example, path, exporter, opset, io_spec, sequence_axis, metadata, external_data, overwrite, verbose)


def _export(
    model: Any, program: Any, example: Batch, path: Path, exporter: str, opset: int | None, io_spec: IOSpec | None,
    sequence_axis: bool, metadata: Mapping[str, str] | None, external_data: bool, overwrite: bool, verbose: bool,
) -> ExportResult:
    callable_model: Any = program.module() if program is not None else model
    try:
        with torch.no_grad():
            # a program takes positional inputs only, a dict's in its own order
            outputs = run_batch(callable_model, example if program is None else positional(example))
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise DataError(
            f"the model fails on the example input ({describe_batch(example)}): {type(e).__name__}: {first_line(e)}"
        ) from e
    n_outputs = len(flatten_outputs(outputs))
    spec = io_spec or IOSpec.infer(example, n_outputs, sequence_axis)
    if len(spec.output_names) != n_outputs:
        raise ExportError(f"the model returns {n_outputs} outputs but {len(spec.output_names)} output names were given")
    wrapped: Any = program if program is not None else PositionalAdapter(model, spec.input_names if is_named(example) else None)
    args = positional(example, spec.input_names)
    remove_stale_staging(path.parent)
    with staging_dir(path.parent) as staging:
        return _export_staged(wrapped, args, spec, path, staging, exporter, opset, metadata, external_data, overwrite, verbose)


def _export_staged(
    wrapped: Any, args: tuple[torch.Tensor, ...], spec: IOSpec, path: Path, staging: Path,
    exporter: str, opset: int | None, metadata: Mapping[str, str] | None, external_data: bool, overwrite: bool, verbose: bool,
) -> ExportResult:
    data_name = f"{path.name}.data"
    data_path = path.parent / data_name
    raw = staging / "raw.onnx"
    start = time.perf_counter()
    try:
        with quiet(verbose), torch.no_grad():
            _run_exporter(wrapped, args, raw, exporter, opset, spec)
    except ExportError:
        raise
    except Exception as e:
        cause = _write_error(e)
        if cause is not None:  # the disk, not the exporter: another exporter would not help
            raise OutputError(f"cannot write {path}: {os_reason(cause)}") from e
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        raise ExportError(
            f"the {exporter} exporter failed: {type(e).__name__}: {first_line(e)}; try `exporter` {other}"
        ) from e
    seconds = time.perf_counter() - start
    try:
        proto = onnx.load(str(raw), load_external_data=True)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {os_reason(e)}") from e
    meta = {f"{METADATA_PREFIX}version": __version__, f"{METADATA_PREFIX}exporter": exporter, **(metadata or {})}
    existing = {p.key for p in proto.metadata_props}
    for key, value in meta.items():
        if key not in existing:
            proto.metadata_props.add(key=key, value=str(value))
    size = proto.ByteSize() if proto.ByteSize() < TWO_GB else TWO_GB
    external = external_data or size >= TWO_GB
    if external and not external_data:  # over 2 GB: its data file's name must fit, and may not clobber
        check_output_path(data_path, overwrite)
    staged = staging / path.name
    try:
        onnx.save_model(
            proto, str(staged), save_as_external_data=external, all_tensors_to_one_file=True, location=data_name,
            size_threshold=1024,
        )
    except (OSError, ValueError) as e:
        raise OutputError(f"cannot write {path}: {os_reason(e)}") from e
    try:
        onnx.checker.check_model(str(staged), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the exported model fails onnx.checker: {first_line(e)}") from e
    opset_found = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    # every tensor under save_model's size threshold: no data file was written, none is needed
    external = external and (staging / data_name).exists()
    _move_into_place(staged, path, staging / data_name if external else None, data_path, staging)
    total = path.stat().st_size + (data_path.stat().st_size if external else 0)
    return ExportResult(path, exporter, opset_found, spec, seconds, external, total, dict(meta))


def _move_into_place(staged: Path, path: Path, staged_data: Path | None, data_path: Path, staging: Path) -> None:
    """Rename the staged model (and its data) over ``path``. An old data file
    beside ``path`` is set aside first and comes back if a rename fails, so the
    old model keeps its weights; it is dropped once the new model is in place."""
    old_data = staging / "replaced.data"
    # a data file beside a model that is not there is not ours to touch, unless ours replaces it
    had_data = os.path.lexists(data_path) and (staged_data is not None or os.path.lexists(path))
    try:
        for staged_file in (staged, staged_data):
            if staged_file is not None:
                set_output_mode(staged_file)  # onnx writes its external data 0600
        if had_data:
            os.replace(data_path, old_data)
        if staged_data is not None:
            os.replace(staged_data, data_path)
        os.replace(staged, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            if staged_data is not None and not os.path.lexists(staged_data) and os.path.lexists(data_path):
                os.unlink(data_path)  # ours, moved in before the model's rename failed
            if had_data and os.path.lexists(old_data):
                os.replace(old_data, data_path)
        raise OutputError(f"cannot write {path}: {os_reason(e)}") from e


def _write_error(e: BaseException) -> OSError | None:
    """The file-system error (disk full, read-only, ...) behind an exporter's
    exception, following its causes; ``None`` when it is the exporter's own."""
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _WRITE_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def layer_metadata(squash_report: list[dict[str, Any]], mode: str) -> dict[str, str]:
    """``metadata_props`` entries for a squashed model."""
    return {
        f"{METADATA_PREFIX}squash_mode": mode,
        f"{METADATA_PREFIX}layers": json.dumps(squash_report),
    }
