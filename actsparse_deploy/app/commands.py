"""What each stage starts from, and one entry point per stage that returns a
:class:`~actsparse_deploy.app.report.Report` (the command line is these calls plus
rendering).

A *source* is a model (a built-in name or ``package.module:factory``, with its
weights, and masks squashed in a given mode) or a ``.pt2`` program written by
``actsparse squash`` (its masks already baked in). :func:`load_source` resolves
either into a :class:`Source`: what to export or run, held-out batches, the I/O
spec, and the squash rows. What to load with it (masks and mode, weights, data,
batch size, labels) is one :class:`SourceOptions`, the same for every stage.

    >>> from actsparse_deploy.app.commands import SourceOptions, layer_table, load_source
    >>> source = load_source("digits-mlp")
    >>> source.mode, source.layers, source.io.output_names
    ('none (dense)', [], ('logits',))
    >>> load_source("digits-mlp", SourceOptions(batch_size=4)).heldout[0].shape
    torch.Size([4, 1, 8, 8])
    >>> [(row["layer"], row["input_shape"], row["foldable"]) for row in layer_table(source.work)][:2]
    [('flatten', [32, 1, 8, 8], False), ('fc1', [32, 64], True)]

Messages name the parameters at fault in backticks (`` `heldout` ``); the
command line shows them as its flags (``--heldout``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bake.pt2 import load_pt2, pt2_io, save_pt2
from ..base.constants import DEFAULT_ATOL, DEFAULT_EXPORTER, DEFAULT_MODE, DEFAULT_RTOL
from ..base.errors import CalibrationError, DataError, MaskError, ModelLoadError, OutputError, RecipeError, UsageError, ValidationError, first_line
from ..base.files import publish, remove_stale_staging, staging_dir
from ..base.memory import MemoryPlan, memory_plan, parse_memory
from ..calibration.calibrate import calibrate_in_passes, collect, select
from ..calibration.masks import Masks
from ..calibration.recipe import Recipe
from ..calibration.stats import Statistics
from ..data.batches import Batch, as_positional, describe_batch, first_samples, reiterable, run_batch, total_samples, unpadded
from ..data.iospec import IOSpec
from ..data.readers import load_data
from ..data.streams import shape_examples
from ..data.workload import Workload
from ..models import zoo
from ..models.decoder import Target, export_target
from ..models.loading import LoadedModel, ModelOptions, load_model, load_text_data, resolve_io_spec
from ..nn.modules import float_dtype, release_weights, weight_bytes
from ..nn.recorded import Recorded
from ..onnx.export import export_onnx, layer_metadata
from ..onnx.quantize import check_quantized, ops_said, quantized_ops, variant_costs
from ..onnx.validate import read_graph
from .cost import cost_stage
from .options import CalibrateOptions, LoadOptions
from .report import Calibration, QuantizedCheck, Report, named_input_shape
from .workload import load_workload, squash_workload, validate_target

__all__ = [
    "Source",
    "SourceOptions",
    "calibrate_to_file",
    "export_source",
    "inspect_target",
    "layer_table",
    "load_source",
    "masks_report",
    "squash_to_pt2",
    "validate_against",
]

DENSE = "none (dense)"
FROM_PT2 = "from .pt2"


@dataclass(frozen=True)
class Source:
    """A model ready to export or to validate against.

    ``program``: what to export (an ``nn.Module``, or the ``ExportedProgram`` of
    a ``.pt2``); ``module``: the same as a runnable ``nn.Module``; ``heldout``:
    held-out batches in the model's input form (None where not loaded);
    ``layers`` / ``mode``: the squash rows and mode (``"none (dense)"`` without
    masks, ``"from .pt2"`` for a program); ``work``: the dense model and its data
    (None for a ``.pt2``), what the sparsification cost compares with."""

    name: str
    program: Any
    module: nn.Module
    example: Batch | None
    heldout: list[Batch] | Iterable[Batch] | None
    io: IOSpec | None
    layers: list[dict[str, Any]]
    mode: str
    work: Workload | None
    #: what stands for the dense model in the cost: ``work.model``, or its outputs recorded before squash changed it in place
    dense: nn.Module | None = None

    def require_heldout(self) -> list[Batch] | Iterable[Batch]:
        if self.heldout is None:
            if self.work is not None and self.work.task is not None:  # a Hugging Face model: its held-out text
                self.work.require_heldout()
            raise DataError(f"{self.name!r} has no held-out data: pass `heldout` data (never the calibration data)")
        return self.heldout


@dataclass(frozen=True)
class SourceOptions(LoadOptions):
    """What to load a source with: the model, its weights and data as
    :class:`~actsparse_deploy.app.options.LoadOptions` says (``model``: a Hugging
    Face model's task and text files, a factory's arguments), then ``masks``
    squashed in ``mode`` (dense without)."""

    masks: str | Path | None = None
    mode: str = DEFAULT_MODE


def is_pt2(spec: str | Path) -> bool:
    return str(spec).endswith(".pt2")


def load_source(spec: str, options: SourceOptions | None = None, *, need_heldout: bool = False,
                memory: Callable[[nn.Module], object] | None = None) -> Source:
    """``spec`` (a model, or a ``.pt2``) resolved with ``options``: the model
    squashed with its masks in place (dense without), or the program the ``.pt2`` holds.
    ``need_heldout``: a ``.pt2`` also loads held-out data (``heldout``, else the
    built-in data of the model it names), and a model's dense outputs on it are
    recorded before squash (what the cost compares with: one copy of the weights, never two).
    ``memory(model)``: called once the model is loaded, before any work (the memory budget's check)."""
    options = options or SourceOptions()
    masks, heldout, batch_size = options.masks, options.heldout, options.batch_size
    if not is_pt2(spec):
        work = options.workload(spec)
        if memory is not None:
            memory(work.model)
        module, rows, the_mode, dense = work.model, [], DENSE, work.model
        if masks is not None:
            loaded = Masks.load(masks)
            if need_heldout and work.heldout is not None:  # the data the cost runs the dense model on
                dense = Recorded.of(work.model, work.compared_data())
            squashed = squash_workload(work, loaded, options.mode, in_place=True)
            module, rows, the_mode = squashed.model, squashed.rows(), options.mode
        example = work.example() if need_heldout is False else None
        return Source(work.name, module, module, example, work.heldout, work.io, rows, the_mode, work, dense)
    if masks is not None:
        raise MaskError(f"{spec}: a .pt2 program already has its masks baked in: pass no `masks`")
    if options.model is not None and options.model != ModelOptions():
        raise DataError(f"{spec}: a .pt2 program is loaded as it is: `task`, `factory_args` and text files are for a model")
    if options.labels is not None:
        raise DataError(
            f"{spec}: `labels` need a model (with `masks`) as the reference, not a .pt2: the accuracy cost compares with the dense model"
        )
    program, meta = load_pt2(spec)
    io = pt2_io(meta)
    held: list[Batch] | Iterable[Batch] | None = None
    if need_heldout:
        name = meta.get("model")
        if heldout is not None:
            held = load_data(heldout, batch_size or 32)  # a stream, read again on each use
            held = held if reiterable(held) else list(held)
        elif name and name in zoo.builtin_names():
            held = load_workload(name).require_heldout()
        else:
            raise DataError(f"{spec} does not name a built-in model: pass `heldout` data")
        held = as_positional(held, io.input_names) if io else held
    example = program.example_inputs[0]
    return Source(str(spec), program, program.module(), example, held, io, list(meta.get("layers", [])), FROM_PT2, None)


# --- one entry point per stage ----------------------------------------------------------------


def _size(path: Path) -> int:
    return os.path.getsize(path)


def masks_report(
    masks: Masks, files: dict[str, int] | None = None, seconds: dict[str, float] | None = None, notes: Sequence[str] = ()
) -> Report:
    """A masks file's contents as a report (``calibrate``, ``inspect``); every
    layer row says its ``method`` (None: the recipe's functions) and ``compensate``;
    ``notes``: the model's own (how it was loaded), before the masks' notes."""
    rows = [{**row, "input_shape": named_input_shape(row), "method": row.get("method"), "compensate": row.get("compensate") or "none"}
            for row in masks.summary()]
    return Report(
        tool_version=masks.tool_version, model=masks.model,
        calibration=Calibration(samples=masks.num_samples, batches=masks.num_batches),
        overall_sparsity=round(masks.overall_sparsity(), 6), layers=rows,
        recipe=masks.recipe.to_dict() if masks.recipe is not None else None, notes=[*notes, *masks.notes()],
        seconds=seconds, files=files,
    )


def calibrate_to_file(
    loaded: LoadedModel,
    recipe: Recipe,
    output: str | Path,
    *,
    data: str | None = None,
    batch_size: int = 32,
    on_stage: Callable[[str, int | None], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    max_cost: str | None = None,
    model_options: ModelOptions | None = None,
    max_samples: int | None = None,
    stats_only: bool = False,
    group: Any = None,
    recover: bool = False,
    passes: Sequence[tuple[Sequence[str], str | None]] | None = None,
) -> Report | None:
    """Calibrate ``loaded`` on ``data`` (else ``model_options.text``, else its
    built-in calibration split; the first ``max_samples`` samples where given;
    token batches without their padding) and write the masks to ``output``
    (checked by the caller); ``max_cost``: a cost budget instead of the recipe's
    level (see :mod:`actsparse_deploy.app.budget`); ``stats_only``: write the
    collected statistics instead (:func:`merge_stats_files`, :func:`select_to_file`); ``recover``: the masked
    layers trained towards the dense outputs after selection (:mod:`actsparse_deploy.bake.recover`); ``passes``: the
    statistics collected a few layers at a time (:func:`~actsparse_deploy.calibration.calibrate.calibrate_in_passes`).

    ``group``: a :class:`~actsparse_deploy.calibration.distributed.Session` (or process
    group): each rank collects its share of the batches, rank 0 writes and
    returns the report, the other ranks return None."""
    CalibrateOptions(max_cost=max_cost, max_samples=max_samples, group=group, recover=recover)  # its checks: budget, ranks, samples
    if stats_only and (max_cost is not None or recover):
        raise RecipeError("a cost budget and --recover make masks: they cannot be given with `stats_only` (select from the statistics later)")
    start = time.perf_counter()
    batches = first_samples(_calibration_data(loaded, model_options, data, batch_size), max_samples)
    if on_stage is not None:
        on_stage("calibrating", total_samples(batches) if group is None else None)  # distributed: this rank's share, count unknown
    if max_cost is not None:
        return budget_to_file(loaded, recipe, batches, max_cost, output, batch_size=batch_size, on_batch=on_batch, start=start,
                              recover=recover)
    batches = unpadded(batches)
    if passes is not None and not stats_only and group is None:
        batches = batches if reiterable(batches) else list(batches)
        masks = calibrate_in_passes(loaded.module, recipe, batches, passes, model_name=loaded.name, on_batch=on_batch)
        return _masks_written(loaded, masks, batches, output, start, recover)
    stats = collect(loaded.module, recipe, batches,
                    model_name=loaded.name, on_batch=on_batch, group=group if group is not None else False)
    if group is not None and not getattr(group, "writer", True):
        return None  # rank 0 writes
    if stats_only:
        _save(stats.save, output, group)
        return stats_report(stats, output, time.perf_counter() - start)
    return _masks_written(loaded, select(stats, model=loaded.module), batches, output, start, recover, group)


def _masks_written(loaded: LoadedModel, masks: Masks, batches: Iterable[Batch], output: str | Path, start: float, recover: bool,
                   group: Any = None) -> Report:
    """``masks`` (trained where ``recover``) written to ``output``: ``calibrate``'s report."""
    notes = loaded.notes
    if recover:
        masks, notes = _recovered(loaded, masks, batches)
    _save(masks.save, output, group)
    seconds = round(time.perf_counter() - start, 3)
    return masks_report(masks, files={str(output): _size(Path(output))}, seconds={"calibrate": seconds, "total": seconds}, notes=notes)


def _calibration_data(loaded: LoadedModel, model_options: ModelOptions | None, data: str | None, batch_size: int) -> Iterable[Batch]:
    """What ``calibrate`` calibrates on: the text (``model_options.text``), else ``data``, else the built-in's split."""
    text, _, _ = load_text_data(loaded, model_options, data, None, batch_size)
    if text is not None:
        return text
    if data is not None:
        return load_data(data, batch_size)
    if loaded.builtin:
        return zoo.calibration_batches(loaded.name, batch_size)
    more = " (or `text`, a text file its tokenizer reads)" if loaded.hf is not None and loaded.hf.directory else ""
    raise DataError(f"{loaded.name!r} has no built-in data: pass `data`, a file of calibration inputs{more}")


def _recovered(loaded: LoadedModel, masks: Masks, batches: Iterable[Batch]) -> tuple[Masks, list[str]]:
    """``masks`` after recovery on ``batches`` (:func:`~actsparse_deploy.bake.recover.recover`), and the
    report's notes: the model's, then what recovery did."""
    from ..bake.recover import recover

    recovered, recovery = recover(loaded.module, masks, batches)
    return recovered, [*loaded.notes, recovery.note()]


def _save(save: Callable[[Path], None], output: str | Path, group: Any) -> None:
    """``save(path)`` to ``output``. Distributed, rank 0 saves into a staging
    folder, has the session ``confirm`` that no other rank failed meanwhile, and
    only then moves the file into place: a job that failed leaves no file."""
    output = Path(output)
    confirm = getattr(group, "confirm", None)
    if confirm is None:
        save(output)
        return
    remove_stale_staging(output.parent)
    with staging_dir(output.parent) as staging:
        staged = staging / output.name
        try:
            save(staged)
        except OutputError as e:  # named by the output asked for, not its staged copy
            raise OutputError(str(e).replace(str(staged), str(output))) from e
        confirm()
        publish(staging, output.parent, [output.name], overwrite=True)  # the caller checked `overwrite`


def stats_report(stats: Statistics, output: str | Path, seconds: float, parts: int | None = None) -> Report:
    """A statistics file as a report: its layers (statistic and per-sample shape),
    samples and batches, the fingerprint of its model, how many parts it merges."""
    rows = [{"layer": name, "aggregate": ls.aggregate, "stat_shape": ls.stat_shape, "input_shape": list(ls.input_shape),
             "samples": ls.num_samples} for name, ls in stats.layers.items()]
    extra: dict[str, Any] = {"fingerprint": stats.fingerprint}
    if parts is not None:
        extra["parts"] = parts
    return Report(tool_version=stats.tool_version, model=stats.model,
                  calibration=Calibration(samples=stats.num_samples, batches=stats.num_batches), layers=rows,
                  recipe=stats.recipe.to_dict() if stats.recipe is not None else None,
                  notes=[f"layer {name!r}: {why}" for name, why in stats.skipped.items()],
                  seconds={"total": round(seconds, 3)}, files={str(output): _size(Path(output))}, **extra)


def merge_stats_files(parts: Sequence[str | Path], output: str | Path) -> Report:
    """Merge statistics files (each from ``calibrate`` with ``stats_only``, or an
    earlier merge) into ``output``: what one run over all their data gives. A part
    of another model (fingerprint), recipe or major version is refused, naming it;
    so is the same data twice: a file given twice (or through a link), two parts
    that share a calibration run (a copy; a merge and one of its parts) or hold
    identical statistics (the same data collected again)."""
    start = time.perf_counter()
    if not parts:
        raise MaskError("merge needs at least one statistics file")
    seen: dict[tuple[int, int], str | Path] = {}
    for part in parts:
        try:
            info = os.stat(part)
        except OSError:
            continue  # Statistics.load says what is wrong with it
        earlier = seen.setdefault((info.st_dev, info.st_ino), part)
        if earlier is not part:
            raise CalibrationError(f"{part} and {earlier} are the same file: merged, its samples would count twice; give each part once")
    merged = Statistics.load(parts[0])
    digests = {merged.values_digest(): parts[0]}
    for part in parts[1:]:
        stats = Statistics.load(part)
        try:
            merged = merged.merge(stats)
        except CalibrationError as e:
            raise CalibrationError(f"{part} does not merge with {parts[0]}: {e}") from e
        same = digests.setdefault(stats.values_digest(), part)
        if same is not part:
            raise CalibrationError(
                f"{part} holds identical statistics to {same} (every layer's values and counts): the same data collected "
                "twice would count twice; merge statistics of different data"
            )
    merged.save(output)
    return stats_report(merged, output, time.perf_counter() - start, parts=len(parts))


def select_to_file(
    stats_path: str | Path,
    output: str | Path,
    *,
    recipe: Recipe | str | Path | None = None,
    sparsity: float | None = None,
    model: str | None = None,
    weights: str | Path | None = None,
    model_options: ModelOptions | None = None,
) -> Report:
    """The masks of a statistics file (and, with a recipe's ``method`` /
    ``compensate``, the layers' new weights), written to ``output``: with
    ``recipe`` (default: the one the statistics were collected with) at
    ``sparsity`` where given. Methods read the layers' weights: the model is
    ``model``, else the built-in model the file names (a file's contents never
    choose code to run: any other model it names is only shown), and must be the
    one the statistics are of (same fingerprint)."""
    from ..calibration.recipe import resolve_recipe

    start = time.perf_counter()
    stats = Statistics.load(stats_path)
    if recipe is None and stats.recipe is None:
        raise RecipeError(f"{stats_path} records no recipe: give one")
    base = recipe if recipe is not None else stats.recipe
    chosen = resolve_recipe(stats.model or "model", None, base, sparsity=sparsity)
    module = None
    needs_model = any(config.method is not None for config in stats.resolve(chosen).values())
    if needs_model or model is not None or weights is not None:
        module = _model_of(stats, stats_path, model, weights, model_options)
    masks = select(stats, chosen, model=module)
    masks.save(output)
    seconds = round(time.perf_counter() - start, 3)
    return masks_report(masks, files={str(output): _size(Path(output))}, seconds={"select": seconds, "total": seconds})


def _model_of(
    stats: Statistics, stats_path: str | Path, model: str | None, weights: str | Path | None, options: ModelOptions | None
) -> nn.Module:
    """The model the statistics are of: ``model`` as the user gives it, else the
    built-in model the file names; refused where it is not (fingerprint, layers)."""
    from ..calibration.stats import model_fingerprint

    name = model if model is not None else stats.model
    if name is None:
        raise ModelLoadError(f"{stats_path} does not name its model: give the model (its methods read the layers' weights)")
    if model is None and name not in zoo.builtin_names():
        raise ModelLoadError(
            f"statistics file {stats_path} was collected on {name!r}, which is not a built-in model: give that model as "
            "`model` (a model a file names is loaded only if it is built in; anything else would run code the file chose)"
        )
    module = load_model(name, weights, options).module
    modules = dict(module.named_modules())
    missing = next((layer for layer in stats.layers if layer not in modules), None)
    if missing is not None and name == stats.model:
        raise MaskError(
            f"statistics file {stats_path}: layer {missing!r} is not a layer of {name}, the model the file names: "
            "the file is corrupted"
        )
    differs = stats.fingerprint is not None and model_fingerprint(module, stats.layers) != stats.fingerprint
    if missing is not None or differs:
        why = f"it has no layer {missing!r}" if missing is not None else "its architecture or the masked layers' weights differ"
        raise CalibrationError(
            f"{name} is not the model the statistics in {stats_path} were collected on ({why}): give that model and its weights"
        )
    return module


def squash_to_pt2(model: str, output: str | Path, options: SourceOptions, *, overwrite: bool = False) -> Report:
    """Squash ``options.masks`` into ``model`` (in ``options.mode``) and save it
    as a ``torch.export`` program."""
    if options.masks is None:
        raise MaskError(f"{model}: squash needs `masks`, the file `actsparse calibrate` writes")
    start = time.perf_counter()
    work = options.workload(model)
    result = squash_workload(work, Masks.load(options.masks), options.mode)
    save_pt2(work, result, Path(output), overwrite)
    seconds = round(time.perf_counter() - start, 3)
    return Report(model=work.name, squash_mode=options.mode, layers=result.rows(), seconds={"total": seconds},
                  files={str(output): _size(Path(output))})


def export_source(
    spec: str,
    output: str | Path,
    options: SourceOptions | None = None,
    *,
    exporter: str | None = None,
    opset: int | None = None,
    external_data: bool = False,
    overwrite: bool = False,
    verbose: bool = False,
    dynamic_axes: Sequence[tuple[str, int, str] | str] = (),
    cache: bool | None = None,
) -> Report:
    """Export ``spec`` (squashed with the ``options``' masks, dense without, or a
    ``.pt2``) to ONNX. ``exporter``: None picks ``dynamo`` for a ``.pt2``, else
    the default. Without the model's own I/O spec, names and dynamic axes come
    from the model and the shapes of its data; ``dynamic_axes``
    (``"NAME:AXIS:LABEL"``) adds axes. ``cache``: a causal language model as its decoder
    with a KV cache, as ``convert`` writes it (None: every causal language model; False: one full pass)."""
    start = time.perf_counter()
    exporter = exporter or ("dynamo" if is_pt2(spec) else DEFAULT_EXPORTER)
    source = load_source(spec, options)
    if source.example is None:
        raise DataError(f"{spec!r} needs `data` or `heldout` to give the exporter an example input")
    program, example, io = source.program, source.example, source.io
    data: Iterable[Batch] = shape_examples(source.heldout)
    if source.work is not None and (target := export_target(source.work, cache, exporter)).cached:
        target.cast(source.work)  # half precision as float16, as convert writes it
        target = target.of_model(source.module)
        program, example, io, data, exporter = (target.model(source.module), target.example(source.work), target.io(source.work), (),
                                                target.exporter(exporter))
    elif cache and source.work is None:  # a model that is no causal language model: export_target said so
        raise UsageError(f"--cache: {spec!r} is a .pt2 program, exported as it is; export the model it was made from")
    result = export_onnx(
        program, example, output, exporter=exporter, opset=opset, io_spec=io,
        metadata=layer_metadata(source.layers, source.mode), external_data=external_data, overwrite=overwrite, verbose=verbose,
        data=data, dynamic_axes=dynamic_axes,
    )
    files = {str(output): _size(Path(output))}
    if result.external_data:
        files[f"{output}.data"] = _size(Path(f"{output}.data"))
    seconds = round(time.perf_counter() - start, 3)
    return Report(model=source.name, squash_mode=source.mode, layers=source.layers, export=result.to_json(),  # type: ignore[arg-type]
                  seconds={"export": round(result.seconds, 3), "total": seconds}, files=files)


def validate_against(
    onnx_model: str | Path,
    reference: str,
    options: SourceOptions | None = None,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    timeout: float | None = None,
    max_memory: str | int | None = None,
    max_cost: str | None = None,
) -> Report:
    """Validate ``onnx_model`` against ``reference`` (a model with or without
    the ``options``' masks, or a ``.pt2``) on the held-out data; with masks or
    labels, also what sparsification cost against the dense model. A quantized ONNX model is
    held to the cost budget ``max_cost`` instead (:func:`validate_quantized`). ``max_memory``
    (default: what the machine has free; :mod:`actsparse_deploy.base.memory`): where one
    copy of the weights in PyTorch and one in onnxruntime are over it, validation runs in
    two passes (the PyTorch outputs first, its weights let go, then onnxruntime alone)."""
    start = time.perf_counter()
    options = options or SourceOptions()
    proto = readable_graph(onnx_model)  # read once: told quantized or not, and whether it takes a cache
    ops = quantized_ops(proto) if proto is not None else {}
    if ops and max_cost is not None:  # an int8 model cannot match PyTorch within a tolerance: held to a cost budget instead
        return validate_quantized(onnx_model, reference, options, ops, max_cost, start, timeout, proto, max_memory)
    if max_cost is not None:
        raise UsageError(f"--max-cost holds a quantized ONNX model to a cost budget, and {onnx_model} is a float model: it is "
                         "held to --atol / --rtol; leave out --max-cost")
    budget = parse_memory(max_memory) if max_memory is not None else None
    plans: list[MemoryPlan] = []  # the memory budget checked once the model loads, before any work
    source = load_source(reference, options, need_heldout=True, memory=lambda model: plans.append(
        memory_plan(weight_bytes(model), budget, asked=budget is not None, loaded=True, what="validate",
                    half=float_dtype(model) in (torch.float16, torch.bfloat16))))
    io, module = source.io, source.module
    target = onnx_target(onnx_model, source.work, proto).of_model(module)  # a decoder exported with a cache is run as one
    plan = plans[0] if plans else MemoryPlan(budget, 0, False)  # a .pt2 program: validated side by side
    apart = plan.apart and source.work is not None and source.work.heldout is not None and not target.cached
    measured = source.work is not None and (options.masks is not None or options.labels is not None)
    # what export names the inputs and outputs by default, from the model: before two passes let its weights go
    cost_io = resolve_io_spec(module, source.require_heldout(), infer=True) if measured and io is None else io
    cost_io = target.validation_io(cost_io)
    sparse = Recorded.of(module, source.work.compared_data()) if apart and source.work is not None else module
    try:  # a quantized model may match (a PyTorch model that quantizes as it does); an int8 one from convert does not
        validation = validate_target(Path(onnx_model), module, source.require_heldout(), target, io, atol, rtol, timeout,
                                     release=(lambda: release_weights(module)) if apart else None)
    except ValidationError as e:
        if not ops:
            raise
        raise ValidationError(f"{first_line(e)}; it is quantized ({ops_said(ops)}): an int8 model cannot match PyTorch within a "
                              "tolerance: give --max-cost (cosine=0.99, accuracy-drop=0.01, perplexity-ratio=1.03) to hold it to a "
                              "cost budget against the dense model on the held-out data") from e
    seconds = {"validate": round(time.perf_counter() - start, 3)}
    cost = None
    if measured and source.work is not None:
        dense = sparse if source.dense is module else source.dense  # without masks the model is the dense one
        cost = cost_stage(source.work, sparse, Path(onnx_model), cost_io, dense=dense, onnx_batches=target.batches)[0]
    seconds["total"] = round(time.perf_counter() - start, 3)
    return Report(model=source.name, squash_mode=source.mode, layers=source.layers,
                  validation=validation.to_json(), cost=cost, seconds=seconds)  # type: ignore[arg-type]


def validate_quantized(onnx_model: str | Path, reference: str, options: SourceOptions, ops: dict[str, int], max_cost: str,
                       start: float, timeout: float | None = None, proto: Any = None, max_memory: str | int | None = None) -> Report:
    """A quantized ONNX model (its quantized nodes ``ops``) against the dense model ``reference`` on the held-out data,
    by the cost budget ``max_cost`` as ``convert --quantize`` holds it (:func:`~actsparse_deploy.onnx.quantize.check_quantized`:
    over it, exit 10; ``timeout``: seconds for onnxruntime's runs); its cost on the workload's other text beside it (reported,
    not held); with ``options.masks``, also its closeness to the squashed float model it was made from. ``max_memory``: as
    :func:`validate` plans it (over it, two passes: the PyTorch outputs recorded, the weights let go, then onnxruntime)."""
    from .budget import Budget

    budget = Budget.parse(max_cost)
    if budget.kind == "user" or is_pt2(reference):
        raise UsageError(f"a quantized model is held to a built-in cost against the dense model: give a model as the reference "
                         f"(not a .pt2) and cosine=, accuracy-drop= or perplexity-ratio= (not {reference if is_pt2(reference) else max_cost})")
    work = options.workload(reference)
    target = onnx_target(onnx_model, work, proto)
    limit = parse_memory(max_memory) if max_memory is not None else None
    plan = memory_plan(weight_bytes(work.model), limit, asked=limit is not None, loaded=True, what="validate", can_part=not target.cached,
                       half=float_dtype(work.model) in (torch.float16, torch.bfloat16))
    held = target.batches(work.require_heldout())
    other = list(target.batches(work.other)) if work.other is not None else None  # a few dozen texts
    io = target.validation_io(work.io)  # None: a tensor batch is fed by the ONNX model's own input names
    dense = target.model(work.model)  # its outputs recorded where squash or the memory budget changes the model
    dense = Recorded.of(dense, [held, *([other] if other is not None else [])]) if plan.apart or options.masks else dense
    float_source, rows, mode, squashed = None, [], DENSE, None
    if options.masks is not None:  # the squashed float model it was made from: the quantization's own share
        squashed = squash_workload(work, Masks.load(options.masks), options.mode, in_place=True)
        rows, mode = squashed.rows(), options.mode
        source = target.of_model(squashed.model).model(squashed.model)
        source = Recorded.of(source, [held]) if plan.apart else source
    if plan.apart:
        release_weights(work.model)
    kept = check_quantized(budget, dense, Path(onnx_model), held, io=io, tokens=work.causal_lm, labels=work.labels,
                           timeout=timeout, other=other, hold_other=False)
    if squashed is not None:
        last = variant_costs(source, {"int8": Path(onnx_model)}, held, io_spec=io)["int8"].outputs[-1]
        float_source = {"output": last["output"], "cosine_mean": last["cosine_mean"], "cosine_min": last["cosine_min"]}
    checked = QuantizedCheck(ops=ops, budget=kept["budget"], heldout_cost=kept["heldout_cost"], within=True, float_source=float_source,
                             other_text_samples=total_samples(other) if other is not None else None,
                             other_text_cost=kept.get("other_text_cost"), other_text_within=kept.get("other_text_within"))
    return Report(model=work.name, squash_mode=mode, layers=rows, quantized=checked,
                  seconds={"validate": round(time.perf_counter() - start, 3), "total": round(time.perf_counter() - start, 3)})


def readable_graph(onnx_model: str | Path) -> Any:
    """The ONNX model at ``onnx_model`` without its external data, or None where it is missing or unreadable
    (validation then says what is wrong with the file, in its words)."""
    try:
        return read_graph(onnx_model) if Path(onnx_model).is_file() else None
    except ValidationError:
        return None


def onnx_target(onnx_model: str | Path, work: Workload | None, proto: Any = None) -> Target:
    """How ``work``'s model is run beside the ONNX model at ``onnx_model`` (``proto``: the file as
    :func:`readable_graph` read it, where the caller has it): as its decoder with a cache where the
    file takes one (``past_key_values.*`` inputs; float16 where they are, as ``convert`` wrote it), else as it is."""
    import onnx

    proto = proto if proto is not None else readable_graph(onnx_model)
    inputs = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input} if proto is not None else {}
    past = [kind for name, kind in inputs.items() if name.startswith("past_key_values.")]
    if work is None or not past:
        return Target()
    target = export_target(work, True, dtype="float16" if past[0] == onnx.TensorProto.FLOAT16 else "float32")
    target.cast(work)  # as convert casts it before calibration
    return target


def layer_table(work: Workload) -> list[dict[str, Any]]:
    """Leaf modules whose first input is a floating-point tensor, with the input
    shape seen on the first calibration batch and whether a mask folds into them."""
    from ..bake.squash import fold_vector

    batch = next(iter(work.require_calibration()))
    seen: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in work.model.named_modules():
        if name and not list(module.children()):
            def hook(m: Any, inputs: tuple[Any, ...], name: str = name) -> None:
                if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].is_floating_point():
                    seen.setdefault(name, tuple(inputs[0].shape))
            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run_batch(work.model, batch)
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise DataError(f"the model fails on the first batch ({describe_batch(batch)}): {type(e).__name__}: {e}") from e
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(work.model.named_modules())
    rows = []
    for name, shape in seen.items():
        module = modules[name]
        foldable = fold_vector(module, torch.ones(1))[0] is not None
        rows.append({"layer": name, "type": type(module).__name__, "input_shape": list(shape), "foldable": foldable})
    return rows


def inspect_target(
    target: str, *, weights: str | Path | None = None, data: str | None = None, batch_size: int = 8,
    model_options: ModelOptions | None = None,
) -> Report:
    """A masks file's contents (a ``.safetensors`` without ``weights``), an ONNX
    file's graph (``.onnx``: inputs, outputs, operators, initializers, external
    data files and metadata, in its ``export`` section (:func:`onnx_report`); its
    external data is never read), or the layers of a model that can take a mask (a Hugging Face model
    without data: seen on a few token ids)."""
    if target.endswith(".safetensors") and weights is None:
        return masks_report(Masks.load(target))
    if target.endswith(".onnx"):
        return onnx_report(target, given=weights is not None or data is not None)
    work = load_workload(target, weights, data, None, batch_size, model_options=model_options)
    from ..models.hf import HFModel, HFSource

    if work.calibration is None and isinstance(work.model, HFModel):
        work.calibration = [HFSource(work.model, None).sample_batch()]
    return Report(model=work.name, layers=layer_table(work), notes=list(work.notes))


def onnx_report(target: str | Path, given: bool = False) -> Report:
    """An ONNX file as a report, from its graph alone (:func:`~actsparse_deploy.onnx.validate.describe_onnx`),
    with the one schema every command's report has: the file is its ``export`` section (path, exporter,
    opset, input and output names, dynamic axes, external data, size; ``seconds`` None: not exported
    here) plus what the graph holds (``input_shapes`` / ``output_shapes``, ``opsets``, ``ops``, ``nodes``,
    ``initializers``, ``parameters``, ``initializer_bytes``, ``data_files``, ``metadata``, ...);
    ``files`` its file and each data file present; the squash mode and layer rows this tool recorded in
    its metadata, where it did. ``given``: weights or data were passed, which an ONNX file does not take."""
    import json

    from ..onnx.export import METADATA_PREFIX
    from ..onnx.validate import describe_onnx
    from .report import Export

    if given:
        raise DataError(f"{target} is an ONNX model: inspect reads it alone, without `weights` or `data`")
    found = describe_onnx(target)
    meta = found["metadata"]
    try:
        layers = json.loads(meta[f"{METADATA_PREFIX}layers"]) if f"{METADATA_PREFIX}layers" in meta else None
    except ValueError:
        layers = None
    if not (isinstance(layers, list) and all(isinstance(row, dict) for row in layers)):
        layers = None
    folder = Path(found["path"]).parent
    files = {found["path"]: found["file_bytes"]}
    files.update({str(folder / d["location"]): d["bytes"] for d in found["external_data"] if d["present"]})
    opset = found["opsets"].get("ai.onnx", 0)
    axes = {v["name"]: {str(i): d for i, d in enumerate(v["shape"] or []) if isinstance(d, str)}
            for v in (*found["inputs"], *found["outputs"])}
    export = Export.from_json({
        "path": found["path"], "exporter": meta.get(f"{METADATA_PREFIX}exporter") or found["producer"], "opset": opset,
        "inputs": [v["name"] for v in found["inputs"]], "outputs": [v["name"] for v in found["outputs"]],
        "dynamic_axes": {name: a for name, a in axes.items() if a}, "seconds": None,
        "external_data": bool(found["external_data"]), "size_bytes": sum(files.values()),
        "input_shapes": found["inputs"], "output_shapes": found["outputs"],
        **{k: v for k, v in found.items() if k not in ("path", "inputs", "outputs", "external_data")},
        "data_files": found["external_data"],
    })
    return Report(tool_version=meta.get(f"{METADATA_PREFIX}version"), squash_mode=meta.get(f"{METADATA_PREFIX}squash_mode"),
                  layers=layers, export=export, files=files)


def budget_to_file(
    loaded: LoadedModel, recipe: Recipe, batches: Iterable[Batch], max_cost: str, output: Any, *,
    batch_size: int = 32, on_batch: Callable[[int], None] | None = None, start: float | None = None, recover: bool = False,
) -> Report:
    """``calibrate --max-cost``: search (then ``recover``), write the masks to ``output``, and report
    the levels with the tuning cost and, for a built-in model, the held-out cost."""
    from ..bake.squash import squash
    from .budget import calibrate_to_budget, heldout_budget

    start = time.perf_counter() if start is None else start
    result = calibrate_to_budget(loaded.module, recipe, batches, max_cost, model_name=loaded.name, on_batch=on_batch)
    notes = loaded.notes
    if recover:
        masks, notes = _recovered(loaded, result.masks, unpadded(batches))
        result = replace(result, masks=masks)
    work = None
    if loaded.builtin:
        entry = zoo.get_builtin(loaded.name)
        labels = entry.labels() if entry.labels is not None else None
        work = Workload(loaded.name, loaded.module, entry, heldout=zoo.heldout_batches(loaded.name, batch_size), labels=labels)
    sparse = squash(loaded.module, result.masks, "mul").model
    result = heldout_budget(result, work, sparse)
    result.masks.save(output)
    seconds = round(time.perf_counter() - start, 3)
    report = masks_report(result.masks, files={str(output): _size(Path(output))}, seconds={"calibrate": seconds, "total": seconds},
                          notes=notes)
    return report.replace(budget=result.to_json())
