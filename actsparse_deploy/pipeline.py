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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from . import zoo
from .version import __version__
from .calibrate import Batch, batch_size, calibrate, run_batch
from .calibrate import batch_size as batch_size_of
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
from .files import check_output_dir, check_output_path, output_lock, remove_stale_staging, set_output_mode, staging_dir
from .loading import check_distinct_data, load_data, load_labels, load_model
from .masks import Masks
from .recipe import Recipe
from .squash import SquashResult, squash
from .validate import DEFAULT_ATOL, DEFAULT_RTOL, _feeds, compare_models, onnx_session, resize_batches, run_session, validate

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
    labels: str | Path | None = None,
    check_distinct: bool = True,
) -> Workload:
    """A built-in name or ``module:factory`` (+ weights), with its data; ``labels``:
    a file of class indices for the held-out samples (your own classifier's accuracy).
    Held-out data that is the calibration data is refused (``check_distinct=False``:
    the caller checks it later with ``check_distinct_data``)."""
    if check_distinct and data is not None and heldout is not None:
        check_distinct_data(data, heldout)
    if labels is not None and heldout is None:
        raise DataError(f"--labels {labels} needs --heldout: the labels are those of the held-out samples")
    loaded = load_model(spec, weights)
    entry = zoo.get_builtin(spec) if loaded.builtin else None
    size = batch_size or (entry.batch_size if entry else 32)
    calibration = load_data(data, size) if data is not None else (zoo.calibration_batches(spec, size) if entry else None)
    held: list[Batch] | None = None
    if heldout is not None:
        held = list(load_data(heldout, size))
    elif entry is not None:
        held = zoo.heldout_batches(spec, size)
    the_labels = entry.labels() if entry is not None and entry.labels is not None and heldout is None else None
    if labels is not None:
        the_labels = load_labels(labels)
        samples = sum(batch_size_of(b) for b in held or [])
        if len(the_labels) != samples:
            raise DataError(f"labels file {labels} has {len(the_labels)} labels for {samples} held-out samples in {heldout}")
    io = IOSpec(entry.input_names, entry.output_names, entry.dynamic_axes()) if entry is not None else None
    return Workload(loaded.name, loaded.module, entry, calibration, held, the_labels, io)


def load_recipe(work: Workload, recipe: Recipe | str | Path | None, sparsity: float | None = None) -> Recipe:
    if recipe is None:
        if work.builtin is None:
            raise RecipeError(f"{work.name!r} has no built-in recipe: pass --recipe FILE")
        recipe = zoo.builtin_recipe_path(work.name)
    loaded = Recipe.coerce(recipe)
    return loaded.with_sparsity(sparsity) if sparsity is not None else loaded


# --- .pt2 --------------------------------------------------------------------------
# the format and its safe loading live in pt2.py; these names stay importable from here

from .pt2 import PT2_META, _weights_only_torch_load, as_positional, load_pt2, pt2_io, save_pt2  # noqa: E402,F401


# --- stages ------------------------------------------------------------------------


def _call(model: nn.Module, batch: Batch) -> Any:
    with torch.no_grad():
        return run_batch(model, batch)


def _matching(predictions: np.ndarray, labels: torch.Tensor, what: str) -> float:
    if predictions.shape != tuple(labels.shape):
        raise DataError(
            f"the {what}'s first output gives predictions of shape {list(predictions.shape)} for {len(labels)} labels: "
            "accuracy needs a classifier whose first output is (batch, classes)"
        )
    return float((predictions == labels.numpy()).mean())


def accuracy(model: nn.Module, batches: Iterable[Batch], labels: torch.Tensor) -> float:
    predictions = torch.cat([flatten_outputs(_call(model, b))[0].argmax(dim=-1) for b in batches])
    return _matching(predictions.numpy(), labels, "model")


def onnx_accuracy(onnx_path: Path, batches: Iterable[Batch], labels: torch.Tensor) -> float:
    session = onnx_session(onnx_path)
    predictions = np.concatenate([run_session(session, _feeds(session, b))[0].argmax(axis=-1) for b in batches])
    return _matching(predictions, labels, "ONNX model")


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


#: what ``convert`` tells ``on_stage`` as each stage starts (``load`` is silent)
STAGES = {"calibrate": "calibrating", "squash": "squashing", "export": "exporting", "validate": "validating", "cost": "measuring cost"}


def _samples(batches: Iterable[Batch] | None) -> int | None:
    """The number of samples in a list of batches; None for a one-shot iterable."""
    return sum(batch_size_of(b) for b in batches) if isinstance(batches, list) else None


@dataclass
class Timer:
    """Seconds per stage; tells ``on_stage(name, total)`` as each one starts."""

    seconds: dict[str, float] = field(default_factory=dict)
    on_stage: Callable[[str, int | None], None] | None = None
    totals: dict[str, int | None] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.on_stage is not None and stage in STAGES:
            self.on_stage(STAGES[stage], self.totals.get(stage))
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(time.perf_counter() - start, 3)


OUT_FILES = ("masks.safetensors", "model.onnx", "report.json")
DATA_FILE = "model.onnx.data"


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
    on_stage: Callable[[str, int | None], None] | None = None,
    labels: str | Path | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Calibrate, squash, export and validate; write the three files to ``outdir``
    and return the report (also in ``report.json``). ``on_stage(name, total)`` is
    called as each stage starts (see ``STAGES``; ``total``: calibration samples
    where known, else None); ``labels``: a file of class indices for ``heldout``;
    ``timeout``: seconds onnxruntime may take for the whole validation (None: no limit)."""
    outdir = Path(outdir)
    check_output_dir(outdir)
    created = [p for p in (outdir, *outdir.parents) if not p.exists()]
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output directory {outdir}: {e.strerror or e}") from e
    try:
        with output_lock(outdir):  # one run at a time writes here: never a mix of two runs' files
            remove_stale_staging(outdir)
            return _convert(
                model, outdir, weights, recipe, sparsity, data, heldout, batch_size, mode, exporter, opset, external_data,
                atol, rtol, overwrite, verbose, on_batch, on_stage=on_stage, labels=labels, timeout=timeout,
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
    *, on_stage: Callable[[str, int | None], None] | None = None, labels: str | Path | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    for name in (*OUT_FILES, *([DATA_FILE] if external_data else [])):
        check_output_path(outdir / name, overwrite)
    timer = Timer(on_stage=on_stage)
    total = time.perf_counter()
    with timer("load"):
        work = load_workload(model, weights, data, heldout, batch_size, labels=labels, check_distinct=False)
        the_recipe = load_recipe(work, recipe, sparsity)
        if data is not None and heldout is not None:  # after the recipe: a missing recipe is named first
            check_distinct_data(data, heldout)
        work.require_heldout()
        timer.totals["calibrate"] = _samples(work.calibration)
    with timer("calibrate"):
        masks = calibrate(work.model, the_recipe, work.require_calibration(), model_name=work.name, on_batch=on_batch)
    with timer("squash"):
        squashed = squash_workload(work, masks, mode)
    # everything is written into a staging directory inside outdir and moved into
    # place only when validation passed: an error or an interrupt leaves nothing
    with staging_dir(outdir) as staging:
        onnx_path = staging / "model.onnx"
        with timer("export"):
            exported = export_onnx(
                squashed.model, work.example(), onnx_path, exporter=exporter, opset=opset, io_spec=work.io,
                metadata=layer_metadata(squashed.report(), mode), external_data=external_data, verbose=verbose,
            )
        with timer("validate"):
            validation = validate(onnx_path, squashed.model, work.require_heldout(), atol=atol, rtol=rtol,
                                  output_names=exported.io.output_names, io_spec=exported.io, timeout=timeout)
        with timer("cost"):
            cost = sparsification_cost(work, squashed.model, onnx_path)
        masks.save(staging / "masks.safetensors")
        report = build_report(work, masks, squashed, exported, validation.to_json(), cost, timer, time.perf_counter() - total, mode)
        report["validation"]["onnx"] = report["export"]["path"] = str(outdir / "model.onnx")
        try:
            (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            report["files"]["report.json"] = (staging / "report.json").stat().st_size
            names = sorted((p.name for p in staging.iterdir()), key=lambda n: n == "report.json")  # the report last
            for name in names:  # external data over 2 GB comes unasked: check it too, before moving any
                check_output_path(outdir / name, overwrite)
                set_output_mode(staging / name)
            for name in names:
                os.replace(staging / name, outdir / name)
            if DATA_FILE not in names and overwrite and (outdir / DATA_FILE).is_file():
                (outdir / DATA_FILE).unlink()  # the replaced model's external data: nothing refers to it any more
        except OSError as e:
            if isinstance(e, OutputError):
                raise
            reason = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
            raise OutputError(f"cannot write the outputs to {outdir}: {reason}") from e
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
        "notes": masks.notes(),
        "export": exported.to_json(),
        "validation": validation,
        "cost": cost,
        "seconds": {**timer.seconds, "total": round(total, 3)},
        "files": files,
    }
