"""All stages in one: calibrate -> squash -> export -> validate.

A :class:`Workload` is a model with its data: calibration batches, held-out
batches (never the calibration ones), labels for a classifier, and its I/O spec.
``convert`` runs every stage and writes ``masks.safetensors``, ``model.onnx``
and ``report.json`` to a directory.

    >>> import tempfile
    >>> from actsparse_deploy.pipeline import convert
    >>> report = convert("digits-mlp", tempfile.mkdtemp())
    >>> report["validation"]["passed"], report["cost"]["accuracy_onnx"] == report["cost"]["accuracy_sparse"]
    (True, True)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from . import __version__, zoo
from .calibrate import Batch, batch_size, calibrate, run_batch
from .errors import DataError, ExportError, OutputError, RecipeError, first_line
from .export import (
    DEFAULT_EXPORTER,
    ExportResult,
    IOSpec,
    PositionalAdapter,
    export_onnx,
    flatten_outputs,
    layer_metadata,
    positional_inputs,
)
from .files import atomic_output, check_output_path
from .loading import load_data, load_model
from .masks import Masks
from .recipe import Recipe
from .squash import SquashResult, squash
from .validate import DEFAULT_ATOL, DEFAULT_RTOL, compare_models, onnx_session, resize_batches, validate

__all__ = ["Workload", "as_positional", "squash_workload", "convert", "load_pt2", "load_workload", "pt2_io", "save_pt2"]

EXAMPLE_BATCH_SIZE = 2
PT2_META = "actsparse.json"


@dataclass
class Workload:
    """A dense model and the data around it."""

    name: str
    model: nn.Module
    builtin: zoo.BuiltinModel | None = None
    calibration: list[Batch] | Iterable[Batch] | None = None
    heldout: list[Batch] | None = None
    labels: torch.Tensor | None = None
    io: IOSpec | None = None

    def require_calibration(self) -> Iterable[Batch]:
        if self.calibration is None:
            raise DataError(f"{self.name!r} has no built-in data: pass --data FILE for calibration")
        return self.calibration

    def require_heldout(self) -> list[Batch]:
        if self.heldout is None:
            raise DataError(
                f"{self.name!r} has no built-in held-out data: pass --heldout FILE (never the calibration data)"
            )
        return self.heldout

    def example(self) -> Batch:
        """A small batch for export tracing (from the held-out data, else calibration)."""
        source = self.heldout if self.heldout is not None else self.calibration
        if source is None:
            raise DataError(f"{self.name!r} needs --data or --heldout to give the exporter an example input")
        batches = list(source) if not isinstance(source, list) else source
        pieces = resize_batches(batches, EXAMPLE_BATCH_SIZE, EXAMPLE_BATCH_SIZE)
        if not pieces:
            raise DataError(f"no batch of {self.name!r}'s data has {EXAMPLE_BATCH_SIZE} samples for the export example")
        return pieces[0]


def squash_workload(work: "Workload", masks: Masks, mode: str) -> SquashResult:
    """Squash ``work.model`` with an example batch (the dataflow for ``prune``)
    and a few held-out batches to check the result against ``mul``."""
    checks = (work.heldout or [])[:2]
    return squash(work.model, masks, mode, example=work.example(), check_batches=checks)


def load_workload(
    spec: str,
    weights: str | Path | None = None,
    data: str | None = None,
    heldout: str | None = None,
    batch_size: int | None = None,
) -> Workload:
    """A built-in name or ``module:factory`` (+ weights), with its data."""
    loaded = load_model(spec, weights)
    entry = zoo.get_builtin(spec) if loaded.builtin else None
    size = batch_size or (entry.batch_size if entry else 32)
    calibration = load_data(data, size) if data is not None else (zoo.calibration_batches(spec, size) if entry else None)
    held: list[Batch] | None = None
    if heldout is not None:
        held = list(load_data(heldout, size))
    elif entry is not None:
        held = zoo.heldout_batches(spec, size)
    labels = entry.labels() if entry is not None and entry.labels is not None and heldout is None else None
    io = IOSpec(entry.input_names, entry.output_names, entry.dynamic_axes()) if entry is not None else None
    return Workload(loaded.name, loaded.module, entry, calibration, held, labels, io)


def load_recipe(work: Workload, recipe: Recipe | str | Path | None, sparsity: float | None = None) -> Recipe:
    if recipe is None:
        if work.builtin is None:
            raise RecipeError(f"{work.name!r} has no built-in recipe: pass --recipe FILE")
        recipe = zoo.builtin_recipe_path(work.name)
    loaded = Recipe.coerce(recipe)
    return loaded.with_sparsity(sparsity) if sparsity is not None else loaded


# --- .pt2 --------------------------------------------------------------------------


def save_pt2(work: Workload, squashed: SquashResult, path: Path, overwrite: bool = False) -> None:
    """A ``torch.export`` program with the masks baked in (dynamic batch / sequence)."""
    check_output_path(path, overwrite)
    example = work.example()
    io = work.io or IOSpec.infer(example, len(flatten_outputs(_call(squashed.model, example))))
    module: nn.Module = squashed.model
    if isinstance(example, Mapping):
        module = PositionalAdapter(squashed.model, io.input_names)
    args = positional_inputs(example, io.input_names)
    shapes = io.export_dynamic_shapes(named=False)
    if isinstance(example, Mapping):
        shapes = (shapes,)  # type: ignore[assignment]
    try:
        with torch.no_grad():
            program = torch.export.export(module.eval(), args, dynamic_shapes=shapes)
    except Exception as e:
        raise ExportError(f"torch.export cannot capture the squashed model: {type(e).__name__}: {first_line(e)}") from e
    meta = {"tool_version": __version__, "model": work.name, "inputs": list(io.input_names), "outputs": list(io.output_names),
            "dynamic_axes": {k: {str(a): d for a, d in v.items()} for k, v in io.dynamic_axes.items()},
            "layers": squashed.report()}
    with atomic_output(path, overwrite) as tmp:
        torch.export.save(program, str(tmp), extra_files={PT2_META: json.dumps(meta)})


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """torch.export.load falls back to an unrestricted torch.load when the safe
    one fails; force weights_only=True for every load inside the block."""
    original = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = safe_load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]


def _refuse_pickled_objects(path: Path) -> None:
    """torch.export.load unpickles custom and opaque object constants directly
    (no torch.load): a program holding any is refused before it is opened."""
    from torch.export.pt2_archive.constants import CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX

    try:
        with zipfile.ZipFile(path) as archive:
            names = [Path(n).name for n in archive.namelist()]
    except (zipfile.BadZipFile, OSError) as e:
        raise ExportError(f"{path} is not a torch.export program (.pt2 zip archive): {e}") from e
    pickled = [n for n in names if n.startswith((CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX))]
    if pickled:
        raise ExportError(
            f"{path} holds pickled Python objects ({', '.join(pickled[:3])}), which are refused: loading them could run code"
        )


def load_pt2(path: str | Path) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """The program and the metadata this tool stored with it."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f".pt2 file {path} does not exist")
    _refuse_pickled_objects(path)
    extra = {PT2_META: ""}
    try:
        with _weights_only_torch_load():
            program = torch.export.load(str(path), extra_files=extra)
    except Exception as e:
        raise ExportError(f"{path} is not a loadable torch.export program: {type(e).__name__}: {first_line(e)}") from e
    meta = json.loads(extra[PT2_META]) if extra[PT2_META] else {}
    return program, meta


def pt2_io(meta: dict[str, Any]) -> IOSpec | None:
    """The I/O spec stored with a .pt2 written by this tool."""
    if not meta.get("inputs"):
        return None
    axes = {k: {int(a): d for a, d in v.items()} for k, v in meta.get("dynamic_axes", {}).items()}
    return IOSpec(tuple(meta["inputs"]), tuple(meta["outputs"]), axes)


def as_positional(batches: Iterable[Batch], names: tuple[str, ...]) -> list[Batch]:
    """Dict batches as tuples in ``names`` order (what a .pt2 program takes)."""
    return [tuple(b[n] for n in names) if isinstance(b, Mapping) else b for b in batches]


# --- stages ------------------------------------------------------------------------


def _call(model: nn.Module, batch: Batch) -> Any:
    with torch.no_grad():
        return run_batch(model, batch)


def accuracy(model: nn.Module, batches: Iterable[Batch], labels: torch.Tensor) -> float:
    predictions = torch.cat([flatten_outputs(_call(model, b))[0].argmax(dim=-1) for b in batches])
    return float((predictions == labels).double().mean())


def onnx_accuracy(onnx_path: Path, batches: Iterable[Batch], labels: torch.Tensor) -> float:
    session = onnx_session(onnx_path)
    name = session.get_inputs()[0].name
    predictions = np.concatenate([session.run(None, {name: b.numpy()})[0].argmax(axis=-1) for b in batches])
    return float((predictions == labels.numpy()).mean())


def sparsification_cost(work: Workload, sparse: nn.Module, onnx_path: Path | None = None) -> dict[str, Any]:
    """Dense vs sparse on the held-out data: per-output difference and cosine
    similarity; test accuracy for a classifier (dense, sparse, and the ONNX model)."""
    held = work.require_heldout()
    io_names = work.io.output_names if work.io else None
    outputs = compare_models(work.model, sparse, held)
    for row in outputs:
        if io_names is not None:
            row["output"] = io_names[row["output"]]
    cost: dict[str, Any] = {"outputs": outputs, "heldout_samples": sum(batch_size(b) for b in held)}
    if work.labels is not None:
        cost["accuracy_dense"] = accuracy(work.model, held, work.labels)
        cost["accuracy_sparse"] = accuracy(sparse, held, work.labels)
        if onnx_path is not None:
            cost["accuracy_onnx"] = onnx_accuracy(onnx_path, held, work.labels)
    return cost


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(time.perf_counter() - start, 3)


OUT_FILES = ("masks.safetensors", "model.onnx", "report.json")


def convert(
    model: str,
    outdir: str | Path,
    *,
    weights: str | Path | None = None,
    recipe: Recipe | str | Path | None = None,
    sparsity: float | None = None,
    data: str | None = None,
    heldout: str | None = None,
    batch_size: int | None = None,
    mode: str = "auto",
    exporter: str = DEFAULT_EXPORTER,
    opset: int | None = None,
    external_data: bool = False,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    overwrite: bool = False,
    verbose: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Calibrate, squash, export and validate; write the three files to ``outdir``
    and return the report (also in ``report.json``)."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"output {outdir} is a file: give a directory for the three outputs")
    created = [p for p in (outdir, *outdir.parents) if not p.exists()]
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output directory {outdir}: {e.strerror or e}") from e
    try:
        return _convert(
            model, outdir, weights, recipe, sparsity, data, heldout, batch_size, mode, exporter, opset, external_data,
            atol, rtol, overwrite, verbose, on_batch,
        )
    except BaseException:
        for directory in created:  # the directories this call made, if still empty
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def _convert(
    model: str, outdir: Path, weights: str | Path | None, recipe: Recipe | str | Path | None, sparsity: float | None,
    data: str | None, heldout: str | None, batch_size: int | None, mode: str, exporter: str, opset: int | None,
    external_data: bool, atol: float, rtol: float, overwrite: bool, verbose: bool, on_batch: Callable[[int], None] | None,
) -> dict[str, Any]:
    for name in OUT_FILES:
        check_output_path(outdir / name, overwrite)
    timer = Timer()
    total = time.perf_counter()
    with timer("load"):
        work = load_workload(model, weights, data, heldout, batch_size)
        the_recipe = load_recipe(work, recipe, sparsity)
        work.require_heldout()
    with timer("calibrate"):
        masks = calibrate(work.model, the_recipe, work.require_calibration(), model_name=work.name, on_batch=on_batch)
    with timer("squash"):
        squashed = squash_workload(work, masks, mode)
    # everything is written into a staging directory inside outdir and moved into
    # place only when validation passed: an error or an interrupt leaves nothing
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=outdir))
    try:
        onnx_path = staging / "model.onnx"
        with timer("export"):
            exported = export_onnx(
                squashed.model, work.example(), onnx_path, exporter=exporter, opset=opset, io_spec=work.io,
                metadata=layer_metadata(squashed.report(), mode), external_data=external_data, verbose=verbose,
            )
        with timer("validate"):
            validation = validate(onnx_path, squashed.model, work.require_heldout(), atol=atol, rtol=rtol,
                                  output_names=exported.io.output_names)
        with timer("cost"):
            cost = sparsification_cost(work, squashed.model, onnx_path)
        masks.save(staging / "masks.safetensors")
        report = build_report(work, masks, squashed, exported, validation.to_json(), cost, timer, time.perf_counter() - total, mode)
        report["validation"]["onnx"] = report["export"]["path"] = str(outdir / "model.onnx")
        try:
            (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            report["files"]["report.json"] = (staging / "report.json").stat().st_size
            names = [p.name for p in staging.iterdir()]
            for name in sorted(names, key=lambda n: n == "report.json"):  # the report last
                os.replace(staging / name, outdir / name)
        except OSError as e:
            reason = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
            raise OutputError(f"cannot write the outputs to {outdir}: {reason}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def build_report(
    work: Workload, masks: Masks, squashed: SquashResult, exported: ExportResult, validation: dict[str, Any],
    cost: dict[str, Any], timer: Timer, total: float, mode: str,
) -> dict[str, Any]:
    modes = squashed.report()
    layers = [{**row, **next(m for m in modes if m["layer"] == row["layer"])} for row in masks.summary()]
    outdir = exported.path.parent
    files = {name: (outdir / name).stat().st_size for name in ("masks.safetensors", "model.onnx") if (outdir / name).exists()}
    if exported.external_data:
        files["model.onnx.data"] = os.path.getsize(f"{exported.path}.data")
    return {
        "tool_version": __version__,
        "model": work.name,
        "squash_mode": mode,
        "calibration": {"samples": masks.num_samples, "batches": masks.num_batches},
        "overall_sparsity": masks.overall_sparsity(),
        "layers": layers,
        "recipe": masks.recipe.to_dict() if masks.recipe else None,
        "export": exported.to_json(),
        "validation": validation,
        "cost": cost,
        "seconds": {**timer.seconds, "total": round(total, 3)},
        "files": files,
    }
