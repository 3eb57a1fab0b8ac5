"""Stage 3a: ONNX export with provenance, written whole or not at all.

Either exporter of ``torch.onnx`` (``dynamo`` or ``torchscript``), or ``auto``:
the first of :data:`AUTO_ORDER`, and the other where it fails (said in one line
on stderr and in :attr:`ExportResult.fallback`). Input and output names come
from the model (``forward``'s parameter names, a dict batch's keys, a returned
dict's keys or Hugging Face output fields), a dynamic batch axis always, and a
dynamic sequence axis where the data shows one (an integer ``(batch, seq)``
input, or an axis whose length differs across batches) or the user names one
(``NAME:AXIS:LABEL``, :func:`parse_dynamic_axis`). What the exporter prints (the
TorchScript exporter's IR dump is written by native code) never reaches stdout:
file descriptor 1 is redirected while it runs (to stderr with ``verbose``). A
chosen opset, one file unless the model is over 2 GB or external data is
asked for, ``onnx.checker`` run on the result, and ``metadata_props`` recording
the tool version, squash mode and per-layer sparsity.

Everything is written in a short-named staging folder beside the output
(``.actsparse-<pid>-<random>``, so any legal output name works) and renamed into
place at the end, the model and its data file both or neither; one run at a
time writes in that folder (its ``.actsparse.lock``, as ``convert``'s output
folder), so two runs never leave one's model beside the other's data. A full
disk anywhere on the way (the exporter's own write, the final save, the rename)
is an :class:`OutputError`, and nothing is left.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from actsparse_deploy.onnx.export import export_onnx
    >>> model = nn.Sequential(nn.Linear(4, 2)).eval()
    >>> path = tempfile.mkdtemp() + "/model.onnx"
    >>> result = export_onnx(model, torch.randn(2, 4), path, exporter="torchscript")
    >>> result.io.input_names, result.io.output_names
    (('input',), ('output',))
    >>> class Tagger(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.embed = nn.Embedding(16, 4)
    ...     def forward(self, input_ids):
    ...         return {"logits": self.embed(input_ids)}
    >>> result = export_onnx(Tagger(), torch.zeros(2, 5, dtype=torch.int64), path, exporter="torchscript")
    >>> result.io.input_names, result.io.output_names, result.io.dynamic_axes["logits"]
    (('input_ids',), ('logits',), {0: 'batch', 1: 'sequence'})
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from ..base.errors import ExportError, OutputError, UsageError, ValidationError, first_line
from ..base.files import check_output_path, os_reason, output_lock, remove_stale_staging, set_output_mode, staging_dir
from ..base.quiet import quiet
from ..base.version import __version__
from ..data.batches import Batch, flatten_outputs  # noqa: F401  (flatten_outputs: its old import path)
from ..data.iospec import ExportPlan, IOSpec, export_plan, parse_dynamic_axis
from ..nn.modules import eval_mode

__all__ = [
    "AUTO_ORDER", "DEFAULT_EXPORTER", "EXPORTERS", "OPSETS", "ExportResult", "check_opset", "export_onnx",
]

from ..base.constants import DEFAULT_EXPORTER, EXPORTERS  # noqa: E402  (one definition, light for the CLI)

#: ``auto`` tries these in order (chosen by tools/exporters.py's table: see the README)
AUTO_ORDER = ("torchscript", "dynamo")
#: the opsets each exporter of torch 2.13 writes, lowest and highest: the TorchScript exporter 7 to 20
#: (torch.onnx's own constants); dynamo builds at 18 and converts to the opset asked for, from 14 up to
#: the newest onnx knows (below 14 it keeps 18 without saying so; the opset written is checked anyway)
OPSETS = {"torchscript": (7, 20), "dynamo": (14, onnx.defs.onnx_opset_version())}

TWO_GB = 2**31
METADATA_PREFIX = "actsparse_deploy."
# errors of the file system, not of the exporter: the output cannot be written
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.ENAMETOOLONG}


def _opset_range(exporter: str) -> str:
    low, high = OPSETS[exporter]
    return f"{exporter} {low} to {high}"


def check_opset(opset: int | None, exporter: str) -> None:
    """``opset`` one that ``exporter`` writes (``auto``: either of :data:`AUTO_ORDER`),
    or a :class:`UsageError` naming the ranges (:data:`OPSETS`)."""
    if opset is None:
        return
    names = AUTO_ORDER if exporter == "auto" else (exporter,)
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise UsageError(f"`opset` must be an integer, got {opset!r}")
    if not any(OPSETS[name][0] <= opset <= OPSETS[name][1] for name in names):
        ranges = ", ".join(_opset_range(name) for name in names)
        who = "the exporters support" if len(names) > 1 else f"the {exporter} exporter supports"
        raise UsageError(f"opset {opset} is not one {who} ({ranges}): give `opset` in that range")


def _exporters_for(exporter: str, opset: int | None) -> tuple[tuple[str, ...], str | None]:
    """The exporters to try in turn, and why ``auto`` skips its first one (an
    opset above the TorchScript exporter's range)."""
    order = AUTO_ORDER if exporter == "auto" else (exporter,)
    if opset is None or len(order) == 1:
        return order, None
    usable = tuple(name for name in order if opset <= OPSETS[name][1])
    if usable == order:
        return order, None
    skipped = order[0]
    return usable, f"opset {opset} is above what the {skipped} exporter writes ({_opset_range(skipped)})"


def _opset_of(exporter: str, opset: int | None) -> int | None:
    """The opset to ask ``exporter`` for: ``opset``, raised to dynamo's lowest where
    ``auto`` falls back to it from a lower one."""
    if opset is None:
        return None
    return max(opset, OPSETS[exporter][0])


@dataclass
class ExportResult:
    path: Path
    #: the exporter that made the model (``auto`` resolved)
    exporter: str
    opset: int
    io: IOSpec
    seconds: float
    external_data: bool
    size_bytes: int
    metadata: dict[str, str]
    #: the exporter asked for (``auto`` or one of them)
    requested: str = ""
    #: why ``auto``'s first exporter failed or was skipped, when it was (the other one made the model)
    fallback: str | None = None
    #: the opset asked for (None: the exporter's default); ``opset`` is the one written
    requested_opset: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "exporter": self.exporter,
            "requested_exporter": self.requested or self.exporter,
            "fallback": self.fallback,
            "opset": self.opset,
            "requested_opset": self.requested_opset,
            "inputs": list(self.io.input_names),
            "outputs": list(self.io.output_names),
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in self.io.dynamic_axes.items()},
            "seconds": round(self.seconds, 3),
            "external_data": self.external_data,
            "size_bytes": self.size_bytes,
        }


def _run_exporter(plan: ExportPlan, path: Path, exporter: str, opset: int | None) -> None:
    spec, wrapped, args = plan.spec, plan.module, plan.args
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
    if plan.shapes_error is not None:  # a label torch.export cannot name
        raise plan.shapes_error
    # forward(*args): the dynamic shapes of the one var-positional argument
    program = torch.onnx.export(wrapped, args, dynamo=True, dynamic_shapes=(plan.dynamic_shapes,), **common)
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
    data: Iterable[Batch] = (),
    dynamic_axes: Sequence[tuple[str, int, str] | str] = (),
    on_fallback: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export ``model`` (called on ``example``) to ``path``. External data
    (``<name>.data`` beside it) when asked or when the model is over 2 GB.

    What the exporter is handed is read from the model in one call
    (:func:`~actsparse_deploy.data.iospec.export_plan`). Without ``io_spec``,
    names and dynamic axes come from the model and its data
    (:meth:`IOSpec.from_model`: ``data`` are batches whose shapes show which axes
    vary); ``dynamic_axes`` (``(input, axis, label)`` or ``"NAME:AXIS:LABEL"``)
    adds axes either way. ``exporter="auto"``: the exporters of
    :data:`AUTO_ORDER` in turn; when the first fails, ``on_fallback`` (default:
    one line on stderr) is told which failed and why."""
    path = Path(path)
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; known: {', '.join(EXPORTERS)}")
    user_axes = tuple(parse_dynamic_axis(a) if isinstance(a, str) else a for a in dynamic_axes)
    program = model if isinstance(model, torch.export.ExportedProgram) else None
    if program is not None and exporter == "auto":
        exporter = "dynamo"
    if program is not None and exporter != "dynamo":
        raise ExportError("a torch.export program (.pt2) exports with `exporter` dynamo only")
    check_opset(opset, exporter)
    check_output_path(path, overwrite)
    if external_data:  # its name must fit too (and not clobber a file without --overwrite)
        check_output_path(path.parent / f"{path.name}.data", overwrite)
    with eval_mode(model if program is None else None):  # the caller's train/eval flags come back after
        plan = export_plan(model, example, io_spec=io_spec, sequence_axis=sequence_axis, data=data, dynamic_axes=user_axes)
        return _export(plan, path, exporter, opset, metadata, external_data, overwrite, verbose, on_fallback or _say_on_stderr)


def _opset_change(exporter: str, opset: int | None) -> str:
    """What a fallback to ``exporter`` does to the opset asked for (nothing: "")."""
    written = _opset_of(exporter, opset)
    if written == opset:
        return ""
    return f"at opset {written}, its lowest ({_opset_range(exporter)}), not the opset {opset} asked for"


def _say_on_stderr(message: str) -> None:
    print(f"actsparse: {message}", file=sys.stderr, flush=True)


def _export(
    plan: ExportPlan, path: Path, exporter: str, opset: int | None, metadata: Mapping[str, str] | None, external_data: bool,
    overwrite: bool, verbose: bool, on_fallback: Callable[[str], None],
) -> ExportResult:
    """``plan`` exported to ``path`` by way of a staging folder beside it."""
    with output_lock(path.parent, path.name):  # one run at a time writes this name: never one run's model beside another's data
        remove_stale_staging(path.parent)
        with staging_dir(path.parent) as staging:
            return _export_staged(plan, path, staging, exporter, opset, metadata, external_data, overwrite, verbose, on_fallback)


def _try_exporter(plan: ExportPlan, raw: Path, exporter: str, opset: int | None, path: Path, verbose: bool) -> ExportError | None:
    """Run one exporter into ``raw``; its failure as an ExportError (returned,
    for ``auto`` to try the other), a full disk raised as an OutputError."""
    try:
        with quiet(verbose), torch.no_grad():
            _run_exporter(plan, raw, exporter, opset)
    except ExportError as e:
        return e
    except Exception as e:
        cause = _write_error(e)
        if cause is not None:  # the disk, not the exporter: another exporter would not help
            raise OutputError(f"cannot write {path}: {os_reason(cause)}") from e
        failed = ExportError(f"the {exporter} exporter failed: {type(e).__name__}: {first_line(e)}")
        failed.__cause__ = e
        return failed
    return None


def _run_exporters(
    plan: ExportPlan, raw: Path, exporter: str, opset: int | None, path: Path, verbose: bool, on_fallback: Callable[[str], None],
) -> tuple[str, str | None]:
    """Export into ``raw`` with ``exporter`` (``auto``: each of its order in turn,
    from a clean staging folder); the exporter that made the model, and why
    ``auto``'s first one did not (None where it did)."""
    order, fallback = _exporters_for(exporter, opset)
    if fallback is not None:
        on_fallback(f"{fallback}: exporting with {order[0]}")
    failures: list[ExportError] = []
    for exporter in order:
        for leftover in raw.parent.parent.iterdir():  # a failed exporter's partial files
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        raw.parent.mkdir()
        failed = _try_exporter(plan, raw, exporter, _opset_of(exporter, opset), path, verbose)
        if failed is None:
            return exporter, fallback
        failures.append(failed)
        if exporter != order[-1]:
            following = order[order.index(exporter) + 1]
            change = _opset_change(following, opset)
            fallback = f"{failed}" + (f"; {following} exported {change}" if change else "")
            on_fallback(f"{failed}; exporting with {following} instead" + (f" {change}" if change else ""))
    if len(failures) == 1:
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        if opset is None or OPSETS[other][0] <= opset <= OPSETS[other][1]:
            raise ExportError(f"{failures[0]}; try `exporter` {other}") from failures[0].__cause__
        raise ExportError(f"{failures[0]}; try `exporter` {other} with an `opset` it writes ({_opset_range(other)})") from failures[0].__cause__
    raise ExportError("both exporters failed: " + "; ".join(map(str, failures))) from failures[-1].__cause__


def _export_staged(
    plan: ExportPlan, path: Path, staging: Path,
    exporter: str, opset: int | None, metadata: Mapping[str, str] | None, external_data: bool, overwrite: bool, verbose: bool,
    on_fallback: Callable[[str], None],
) -> ExportResult:
    data_name = f"{path.name}.data"
    data_path = path.parent / data_name
    raw = staging / "raw" / "raw.onnx"  # a folder of its own: an exporter's per-tensor files never meet ours
    start = time.perf_counter()
    requested = exporter
    exporter, fallback = _run_exporters(plan, raw, exporter, opset, path, verbose, on_fallback)
    seconds = time.perf_counter() - start
    proto = _load_raw(raw, path)
    _name_dims(proto.graph, plan.spec)
    meta = _stamp_metadata(proto, exporter, metadata)
    outside = _outside_bytes(proto, raw, exporter, external_data)
    external = needs_external_data(proto.ByteSize(), outside, asked=external_data)
    if external and not external_data:  # over 2 GB: its data file's name must fit, and may not clobber
        check_output_path(data_path, overwrite)
    staged = staging / path.name
    moved = _save_staged(proto, raw, staged, staging / data_name, external, outside, path)
    opset_found = _check_saved(staged, proto, exporter, opset)
    # every tensor under the size threshold: no data file is needed
    if external and not moved:
        (staging / data_name).unlink(missing_ok=True)
    external = external and moved > 0
    _move_into_place(staged, path, staging / data_name if external else None, data_path, staging, overwrite)
    total = path.stat().st_size + (data_path.stat().st_size if external else 0)
    return ExportResult(path, exporter, opset_found, plan.spec, seconds, external, total, dict(meta), requested, fallback, opset)


def _load_raw(raw: Path, path: Path) -> Any:
    """The exporter's graph only: weights it wrote to files of their own stay there until copied, never all in memory."""
    try:
        return onnx.load(str(raw), load_external_data=False)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {os_reason(e)}") from e


def _stamp_metadata(proto: Any, exporter: str, metadata: Mapping[str, str] | None) -> dict[str, Any]:
    """This tool's version, the exporter and ``metadata`` written into the model's
    metadata (a key the exporter wrote already is kept); all of them, as asked."""
    meta = {f"{METADATA_PREFIX}version": __version__, f"{METADATA_PREFIX}exporter": exporter, **(metadata or {})}
    existing = {p.key for p in proto.metadata_props}
    for key, value in meta.items():
        if key not in existing:
            proto.metadata_props.add(key=key, value=str(value))
    return meta


def _outside_bytes(proto: Any, raw: Path, exporter: str, external_data: bool) -> int:
    """The bytes of the tensors the exporter wrote beside ``raw`` (checked: inside its
    folder, whole); 0 where ``external_data`` keeps them outside anyway."""
    from .validate import check_external_data, external_tensors

    try:
        check_external_data(raw, proto)  # the exporter's own files: inside raw's folder, whole
    except ValidationError as e:
        raise ExportError(f"the {exporter} exporter wrote external data that cannot be read: {e}") from e
    return 0 if external_data else sum(
        int(entries["length"]) if "length" in entries else (raw.parent / entries["location"]).stat().st_size
        for _, entries in external_tensors(proto)
    )


def _save_staged(proto: Any, raw: Path, staged: Path, data: Path, external: bool, outside: int, path: Path) -> int:
    """Write ``proto`` to ``staged``: its large tensors gathered into ``data`` where
    ``external``, else the exporter's own files read back into it; the exporter's
    folder removed. The number of tensors written to ``data``."""
    moved = 0
    try:
        if external:
            moved = _gather_external_data(proto, raw.parent, data)
        elif outside:  # under 2 GB and not asked for: back into the one file
            onnx.load_external_data_for_model(proto, str(raw.parent))
        shutil.rmtree(raw.parent)  # its copy of the weights, before the checker reads ours
        onnx.save_model(proto, str(staged))
    except (OSError, ValueError) as e:
        raise OutputError(f"cannot write {path}: {os_reason(e)}") from e
    return moved


def _check_saved(staged: Path, proto: Any, exporter: str, opset: int | None) -> int:
    """The saved model checked by ``onnx.checker`` and of the opset asked for; its opset."""
    try:
        onnx.checker.check_model(str(staged), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the exported model fails onnx.checker: {first_line(e)}") from e
    opset_found: int = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    asked = _opset_of(exporter, opset)
    if asked is not None and opset_found != asked:
        raise ExportError(
            f"the {exporter} exporter wrote opset {opset_found}, not the opset {asked} asked for: it cannot write this "
            f"model at opset {asked}; give another `opset` or `exporter`"
        )
    return opset_found


def _name_dims(graph: Any, spec: IOSpec) -> None:
    """The inputs' dynamic dimensions named by ``spec``'s labels (``batch``,
    ``sequence``), and every dimension of the graph that is the same symbol with
    them: a ``.pt2`` program's dynamo export names them by torch's symbols (``s77``)."""
    rename: dict[str, str] = {}
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        for axis, label in spec.dynamic_axes.get(value.name, {}).items():
            if axis < len(dims) and dims[axis].dim_param and dims[axis].dim_param != label:
                rename.setdefault(dims[axis].dim_param, label)
    if not rename:
        return
    symbol = re.compile(r"\b(?:" + "|".join(map(re.escape, sorted(rename, key=len, reverse=True))) + r")\b")
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = symbol.sub(lambda m: rename[m[0]], dim.dim_param)


#: room kept under the 2 GB limit: loading an exporter's external tensors back into the graph adds a
#: field tag and a length to each (and a graph close to the limit is one the next change pushes over)
EXTERNAL_HEADROOM = 16 * 2**20


def needs_external_data(graph_bytes: int, outside_bytes: int, *, asked: bool, limit: int | None = None,
                        headroom: int = EXTERNAL_HEADROOM) -> bool:
    """Whether the weights go to a data file: asked for, or the graph (``graph_bytes``, serialized) with the
    tensors an exporter left in files of their own (``outside_bytes``) comes within ``headroom`` of ``limit``
    (default :data:`TWO_GB`: a protobuf cannot be over 2 GB)."""
    return asked or graph_bytes + outside_bytes + headroom >= (TWO_GB if limit is None else limit)


#: initializers of at least this many bytes go to the data file (onnx.save_model's default threshold)
EXTERNAL_THRESHOLD = 1024
#: each tensor in the data file starts at a multiple of this (a page: onnxruntime can map it instead of copying)
EXTERNAL_ALIGN = 4096
_COPY_CHUNK = 64 * 2**20


def _gather_external_data(proto: Any, source: Path, data_path: Path) -> int:
    """Every tensor's data into the one file ``data_path`` (its name beside the
    model: the ``location`` each tensor records), tensor by tensor: those an
    exporter already wrote to files in ``source`` copied in chunks (never a whole
    weight in memory), initializers of :data:`EXTERNAL_THRESHOLD` bytes or more
    moved out of the graph. Each starts at a multiple of :data:`EXTERNAL_ALIGN`.
    The number of tensors written."""
    from .validate import external_tensors

    count = 0
    with open(data_path, "wb") as out:

        def place(tensor: Any, write: Callable[[], int]) -> None:
            nonlocal count
            offset = -out.tell() % EXTERNAL_ALIGN
            out.write(b"\0" * offset)
            start = out.tell()
            length = write()
            del tensor.external_data[:]
            for key, value in (("location", data_path.name), ("offset", str(start)), ("length", str(length))):
                tensor.external_data.add(key=key, value=value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            count += 1

        for tensor, entries in list(external_tensors(proto)):
            def copy(entries: dict[str, str] = entries) -> int:
                with open(source / entries["location"], "rb") as f:
                    f.seek(int(entries.get("offset") or 0))
                    left = int(entries["length"]) if "length" in entries else None
                    written = 0
                    while left is None or left > 0:
                        chunk = f.read(_COPY_CHUNK if left is None else min(_COPY_CHUNK, left))
                        if not chunk:
                            break
                        out.write(chunk)
                        written += len(chunk)
                        left = None if left is None else left - len(chunk)
                    if left:
                        raise ValueError(f"the exporter's data file {entries['location']} ends {left} bytes short")
                    return written

            place(tensor, copy)
        for tensor in _initializers(proto.graph):
            if tensor.data_location != onnx.TensorProto.EXTERNAL and len(tensor.raw_data) >= EXTERNAL_THRESHOLD:
                def move(tensor: Any = tensor) -> int:
                    data = tensor.raw_data
                    out.write(data)
                    tensor.ClearField("raw_data")
                    return len(data)

                place(tensor, move)
    return count


def _initializers(graph: Any) -> Iterator[Any]:
    """The initializers of ``graph`` and of its subgraphs (If / Loop / Scan bodies)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _initializers(attr.g)
            for sub in attr.graphs:
                yield from _initializers(sub)


def _move_into_place(staged: Path, path: Path, staged_data: Path | None, data_path: Path, staging: Path, overwrite: bool) -> None:
    """Rename the staged model (and its data) over ``path``: both or neither.
    Each name is checked again first (something may have appeared there while
    the model was exported). An old data file beside ``path`` is set aside first
    and comes back if a rename fails, so the old model keeps its weights; it is
    dropped once the new model is in place. Only a file (or a link to one) at
    the data file's name is taken for an old data file, never a folder."""
    check_output_path(path, overwrite)
    if staged_data is not None:
        check_output_path(data_path, overwrite)
    old_data = staging / "replaced.data"
    # a data file beside a model that is not there is not ours to touch, unless ours replaces it
    had_data = os.path.isfile(data_path) and (staged_data is not None or os.path.lexists(path))
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
