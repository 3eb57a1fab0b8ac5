"""All stages in one: calibrate -> squash -> export -> validate.

A :class:`Workload` is a model with its data: calibration batches, held-out
batches (never the calibration ones), labels for a classifier, and its I/O spec.
``convert`` runs every stage, writes ``masks.safetensors``, ``model.onnx``
and ``report.json`` to a directory, and returns the
:class:`~actsparse_deploy.app.report.Report` that ``report.json`` holds (the same
typed object as every command's ``--json``).

    >>> import tempfile
    >>> from actsparse_deploy.app.pipeline import convert
    >>> report = convert("digits-mlp", tempfile.mkdtemp())
    >>> report.validation.passed, report.cost.accuracy_onnx == report.cost.accuracy_sparse
    (True, True)
    >>> sorted(report.files)
    ['masks.safetensors', 'model.onnx', 'report.json']
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bake.squash import SquashResult
from ..base.constants import COMPENSATIONS, DEFAULT_ATOL, DEFAULT_EXPORTER, DEFAULT_RTOL, EXPORTERS, MODES
from ..base.errors import DataError, ExportError, OutputError, RecipeError, SquashError, ValidationError
from ..base.files import check_output_path, os_reason, output_folder, publish, staging_dir
from ..base.threads import check_threads, current_threads, use_threads
from ..base.version import __version__
from ..calibration.calibrate import collect, select
from ..calibration.masks import Masks
from ..calibration.recipe import Recipe
from ..data.batches import first_samples, total_samples, unpadded
from ..data.iospec import check_dynamic_axes
from ..data.readers import check_distinct_data
from ..data.streams import shape_examples
from ..data.workload import Workload
from ..models.loading import ModelOptions
from ..onnx.export import ExportResult, check_opset, export_onnx, layer_metadata
from ..onnx.latency import dense_latency, slower_note, verdict
from ..onnx.validate import validate
from .cost import sparsification_cost
from .report import Calibration, Cost, Export, Latency, Report, Validation, named_input_shape
from .workload import load_recipe, load_workload, squash_workload

__all__ = ["STAGES", "ConvertOptions", "Timer", "build_report", "convert"]


#: what ``convert`` tells ``on_stage`` as each stage starts (``load`` is silent)
STAGES = {"calibrate": "calibrating", "squash": "squashing", "export": "exporting", "validate": "validating", "cost": "measuring cost",
          "latency": "measuring latency"}


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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ConvertOptions:
    """Everything ``convert`` takes besides the model and the output directory
    (the keyword parameters of :func:`convert`), checked before any work is done."""

    weights: str | Path | None = None
    recipe: Recipe | str | Path | None = None
    sparsity: float | None = None
    data: str | None = None
    heldout: str | None = None
    batch_size: int | None = None
    mode: str = "auto"
    exporter: str = DEFAULT_EXPORTER
    opset: int | None = None
    external_data: bool = False
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    overwrite: bool = False
    verbose: bool = False
    on_batch: Callable[[int], None] | None = None
    on_stage: Callable[[str, int | None], None] | None = None
    labels: str | Path | None = None
    timeout: float | None = None
    #: override the recipe's selection method / compensation for every layer (None: the recipe's)
    method: str | None = None
    compensate: str | None = None
    #: a cost budget (``"cosine=0.98"``, see actsparse_deploy.app.budget) instead of one sparsity: levels per layer
    max_cost: str | None = None
    #: calibrate on the first this many calibration samples only (None: all of them)
    max_samples: int | None = None
    #: a Hugging Face model's task, text files and tokens per text; a factory's keyword arguments (loading.ModelOptions)
    task: str | None = None
    text: str | None = None
    heldout_text: str | None = None
    max_length: int | None = None
    factory_args: Mapping[str, Any] | None = None
    #: torch's and onnxruntime's intra-op threads each (None: actsparse_deploy.base.threads.default_threads)
    threads: int | None = None
    #: time the dense and the converted model under onnxruntime (the report's ``latency``)
    latency: bool = True
    #: input axes to export as dynamic besides those inferred, ``NAME:AXIS:LABEL`` each (export.parse_dynamic_axis)
    dynamic_axes: tuple[str, ...] = ()
    #: where calibration runs ("cpu", "cuda", "cuda:N"; None: where the model's parameters are); squash and export run on CPU
    device: str | None = None
    #: distributed calibration (actsparse_deploy.calibration.distributed.Session or a process group): rank 0 writes, the others return None
    group: Any = None

    def model_options(self) -> ModelOptions:
        return ModelOptions(task=self.task, factory_args=self.factory_args, text=self.text, heldout_text=self.heldout_text,
                            max_length=self.max_length)

    def __post_init__(self) -> None:
        self.model_options()  # checks the task, the factory arguments and the length
        from ..data.iospec import parse_dynamic_axis

        for axis in self.dynamic_axes:
            parse_dynamic_axis(axis)
        if self.threads is not None:
            check_threads(self.threads)
        if self.device is not None:  # a bad device, or CUDA where there is none: before the model loads
            from ..calibration.distributed import check_budget_device, resolve_device

            check_budget_device(self.max_cost, self.device)
            resolve_device(self.device)
        if self.max_cost is not None and self.group is not None:
            raise RecipeError("a cost budget (`max_cost`) searches over several passes of the data: it is not supported in "
                              "distributed calibration; run it in one process, or give a sparsity")
        if self.max_cost is not None:
            from .budget import check_budget

            check_budget(self.max_cost)
            if self.sparsity is not None:
                raise RecipeError("give a sparsity or a cost budget (max_cost), not both")
        if self.method is not None and not (isinstance(self.method, str) and self.method):
            raise RecipeError(f"method must be the name of a selection method, got {self.method!r}")
        if self.compensate is not None and self.compensate not in COMPENSATIONS:
            raise RecipeError(f"unknown compensation {self.compensate!r}; known: {', '.join(COMPENSATIONS)}")
        if self.mode not in MODES:
            raise SquashError(f"unknown squash mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.exporter not in EXPORTERS:
            raise ExportError(f"unknown exporter {self.exporter!r}; known: {', '.join(EXPORTERS)}")
        check_opset(self.opset, self.exporter)
        if not all(_is_number(t) and 0 <= t < math.inf for t in (self.atol, self.rtol)):  # NaN fails too; inf passes anything
            raise ValidationError(f"tolerances must be non-negative numbers, finite (atol {self.atol}, rtol {self.rtol})")
        if self.timeout is not None and not (_is_number(self.timeout) and self.timeout > 0):
            raise ValidationError(f"timeout must be a positive number of seconds, got {self.timeout}")
        if self.batch_size is not None and not (isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool)
                                                and self.batch_size >= 1):
            raise DataError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if self.max_samples is not None and not (isinstance(self.max_samples, int) and not isinstance(self.max_samples, bool)
                                                 and self.max_samples >= 1):
            raise DataError(f"max_samples must be a positive integer, got {self.max_samples!r}")


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
    method: str | None = None,
    compensate: str | None = None,
    max_cost: str | None = None,
    task: str | None = None,
    text: str | None = None,
    heldout_text: str | None = None,
    max_length: int | None = None,
    factory_args: Mapping[str, Any] | None = None,
    threads: int | None = None,
    latency: bool = True,
    dynamic_axes: tuple[str, ...] = (),
    max_samples: int | None = None,
    device: str | None = None,
    group: Any = None,
) -> Report | None:
    """Calibrate, squash, export and validate; write the three files to ``outdir``
    and return the report (its ``to_json()`` is ``report.json``). ``on_stage(name, total)`` is
    called as each stage starts (see ``STAGES``; ``total``: calibration samples
    where known, else None); ``labels``: a file of class indices for ``heldout``;
    ``timeout``: seconds onnxruntime may take for the whole validation (None: no limit);
    ``method`` / ``compensate``: the selection method (``"fluctuation"``, ...) and the
    compensation (``"none"``, ``"bias"``, ``"lstsq"``) for every layer, over the recipe's;
    ``task`` / ``text`` / ``heldout_text`` / ``max_length``: a Hugging Face model directory's task
    and the text files its tokenizer reads; ``factory_args``: keyword arguments of a ``module:factory``;
    ``threads``: torch's and onnxruntime's intra-op threads (None: ``OMP_NUM_THREADS`` where set, else the
    free cores; see :mod:`actsparse_deploy.base.threads`); ``latency``: time the dense and the converted model
    under onnxruntime on held-out data (the report's ``latency``; False skips it); ``dynamic_axes``:
    ``NAME:AXIS:LABEL`` input axes to export as dynamic besides those inferred from the model and data;
    ``max_samples``: calibrate on the first this many calibration samples only; ``device``: where calibration
    runs; ``group``: distributed calibration (:mod:`actsparse_deploy.calibration.distributed`: rank 0 writes and returns
    the report, the other ranks return None and touch no file).
    The keyword parameters are those of :class:`ConvertOptions`, checked first."""
    options = ConvertOptions(
        weights=weights, recipe=recipe, sparsity=sparsity, data=data, heldout=heldout, batch_size=batch_size, mode=mode,
        exporter=exporter, opset=opset, external_data=external_data, atol=atol, rtol=rtol, overwrite=overwrite,
        verbose=verbose, on_batch=on_batch, on_stage=on_stage, labels=labels, timeout=timeout, method=method,
        compensate=compensate, max_cost=max_cost, task=task, text=text, heldout_text=heldout_text, max_length=max_length,
        factory_args=factory_args, threads=threads, latency=latency, dynamic_axes=tuple(dynamic_axes), max_samples=max_samples,
        device=device, group=group,
    )
    outdir = Path(outdir)
    if not getattr(options.group, "writer", True):  # another rank than 0: calibrates its share, writes nothing
        with use_threads(options.threads):
            return _convert(model, outdir, options)
    # made and locked: one run at a time writes here (never a mix of two runs' files); removed again if still empty on a failure
    with output_folder(outdir), use_threads(options.threads):  # torch and every onnxruntime session: the same count
        return _convert(model, outdir, options)


def _convert(model: str, outdir: Path, o: ConvertOptions) -> Report | None:
    writer = getattr(o.group, "writer", True)  # distributed: rank 0 checks and writes the outputs
    for name in (*OUT_FILES, *([DATA_FILE] if o.external_data else [])) if writer else ():
        check_output_path(outdir / name, o.overwrite)
    timer = Timer(on_stage=o.on_stage)
    total = time.perf_counter()
    with timer("load"):
        work = load_workload(model, o.weights, o.data, o.heldout, o.batch_size, labels=o.labels, check_distinct=False,
                             model_options=o.model_options())
        the_recipe = load_recipe(work, o.recipe, o.sparsity, method=o.method, compensate=o.compensate)
        if o.data is not None and o.heldout is not None:  # after the recipe: a missing recipe is named first
            check_distinct_data(o.data, o.heldout)
        if o.text is not None and o.heldout_text is not None:
            check_distinct_data(o.text, o.heldout_text)
        work.require_heldout()
        check_dynamic_axes(work.model, work.example(), o.dynamic_axes, work.io)  # before any work
        calibration = first_samples(work.require_calibration(), o.max_samples)
        timer.totals["calibrate"] = total_samples(calibration) if o.group is None else None  # distributed: a share
    with timer("calibrate"):
        budget = None
        if o.max_cost is not None:  # levels per layer to the budget, tuned on a split of the calibration data
            from .budget import calibrate_to_budget

            budget = calibrate_to_budget(work.model, the_recipe, calibration, o.max_cost, model_name=work.name, on_batch=o.on_batch)
            masks = budget.masks
        else:  # token batches without their padding: the statistics see real tokens only
            if o.device is not None:
                from ..calibration.distributed import resolve_device

                work.model.to(resolve_device(o.device))
            calibration = unpadded(calibration)
            stats = collect(work.model, the_recipe, calibration, model_name=work.name, on_batch=o.on_batch,
                            group=o.group if o.group is not None else False)
            if not writer:
                return None
            work.model.to("cpu")  # squash, export and validation run on CPU
            masks = select(stats, model=work.model)
    with timer("squash"):
        squashed = squash_workload(work, masks, o.mode)
    # everything is written into a staging directory inside outdir and moved into
    # place only when validation passed: an error or an interrupt leaves nothing
    with staging_dir(outdir) as staging:
        onnx_path = staging / "model.onnx"
        with timer("export"):
            exported = export_onnx(
                squashed.model, work.example(), onnx_path, exporter=o.exporter, opset=o.opset, io_spec=work.io,
                metadata=layer_metadata(squashed.report(), o.mode), external_data=o.external_data, verbose=o.verbose,
                data=shape_examples(work.require_heldout(), work.calibration),
                dynamic_axes=o.dynamic_axes,
            )
        with timer("validate"):
            validation = validate(onnx_path, squashed.model, work.require_heldout(), atol=o.atol, rtol=o.rtol,
                                  output_names=exported.io.output_names, io_spec=exported.io, timeout=o.timeout)
        with timer("cost"):
            cost = sparsification_cost(work, squashed.model, onnx_path, exported.io)
            if budget is not None:
                from .budget import heldout_budget

                budget = heldout_budget(budget, work, squashed.model)
        speed = None
        if o.latency:  # dense vs converted under onnxruntime, on held-out data; the dense export is scratch
            with timer("latency"):
                speed = dense_latency(work.model, onnx_path, work.require_heldout(), staging / ".dense-latency",
                                      exporter=exported.exporter, opset=exported.opset, io_spec=exported.io,
                                      example=work.example(), verbose=o.verbose)
        masks.save(staging / "masks.safetensors")
        report = build_report(work, masks, squashed, exported, validation, cost, timer, time.perf_counter() - total, o.mode,
                              onnx_path=outdir / "model.onnx")
        if budget is not None:  # the budget, the levels chosen per layer, tuning and held-out cost
            report = report.replace(extra={**report.extra, "budget": budget.to_json()})
        report = report.replace(threads=current_threads())
        if speed is not None:  # the ratio in words, and a note where prune was asked for and made it slower
            note = slower_note(o.mode, [row.get("mode", "") for row in report.layers or []], speed["ratio"])
            report = report.replace(latency=Latency.from_json({**speed, "verdict": verdict(speed["ratio"])}),
                                    notes=[*report.notes, *([note] if note else [])])
        return _publish(report, staging, outdir, o)


def _publish(report: Report, staging: Path, outdir: Path, o: ConvertOptions) -> Report:
    """Write ``report.json`` and move every staged file into ``outdir`` (the
    report last; external data over 2 GB, which comes unasked, is checked too);
    returns the report with ``report.json``'s size.
    Distributed, rank 0 first makes sure that no other rank failed meanwhile
    (``confirm``): a job that failed leaves nothing."""
    try:
        (staging / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
        report = report.with_file("report.json", (staging / "report.json").stat().st_size)
    except OSError as e:
        raise OutputError(f"cannot write the outputs to {outdir}: {os_reason(e)}") from e
    names = sorted((p.name for p in staging.iterdir()), key=lambda n: n == "report.json")
    confirm = getattr(o.group, "confirm", None)
    if confirm is not None:
        confirm()
    publish(staging, outdir, names, o.overwrite)
    if DATA_FILE not in names and o.overwrite and (outdir / DATA_FILE).is_file():
        try:
            (outdir / DATA_FILE).unlink()  # the replaced model's external data: nothing refers to it any more
        except OSError as e:
            raise OutputError(f"cannot write the outputs to {outdir}: {os_reason(e)}") from e
    return report


def build_report(
    work: Workload, masks: Masks, squashed: SquashResult, exported: ExportResult, validation: Any,
    cost: Mapping[str, Any], timer: Timer, total: float, mode: str, onnx_path: str | Path | None = None,
) -> Report:
    """The report of a ``convert`` run, built once: ``report.json`` is its
    ``to_json()``. ``validation``: a ``ValidationReport`` (or its JSON);
    ``onnx_path``: where the ONNX model ends up (the export and validation ran
    on a staged copy), default where it was exported to."""
    modes = squashed.rows()
    # merged: the squash rows also say how each layer's features were chosen (method) and compensated
    layers = [{**row, "input_shape": named_input_shape(row), **next(m for m in modes if m["layer"] == row["layer"])}
              for row in masks.summary()]
    outdir = exported.path.parent
    files = {name: (outdir / name).stat().st_size for name in ("masks.safetensors", "model.onnx") if (outdir / name).exists()}
    if exported.external_data:
        files["model.onnx.data"] = os.path.getsize(f"{exported.path}.data")
    final = str(onnx_path if onnx_path is not None else exported.path)
    checked = validation.to_json() if hasattr(validation, "to_json") else dict(validation)
    return Report(
        tool_version=__version__,
        model=work.name,
        squash_mode=mode,
        calibration=Calibration(samples=masks.num_samples, batches=masks.num_batches),
        overall_sparsity=masks.overall_sparsity(),
        layers=layers,
        recipe=masks.recipe.to_dict() if masks.recipe else None,
        notes=[*work.notes, *masks.notes()],
        export=Export.from_json({**exported.to_json(), "path": final}),
        validation=Validation.from_json({**checked, "onnx": final}),
        cost=Cost.from_json(cost),
        seconds={**timer.seconds, "total": round(total, 3)},
        files=files,
    )
