"""All stages in one: load -> calibrate -> squash -> export -> validate -> cost / latency.

A :class:`Workload` is a model with its data: calibration batches, held-out
batches (never the calibration ones), labels for a classifier, and its I/O spec.
:class:`Stages` is the one stage runner: each stage on a workload, timed, told to
``on_stage`` as it starts; ``convert`` runs them once and ``sweep`` once per level
and method (:mod:`actsparse_deploy.app.sweep`). Both write their files into a
staging folder in the output folder, locked for the run (:func:`locked_outputs`),
and move them into place together (:func:`publish_staged`), or not at all.
``convert`` writes ``masks.safetensors``, ``model.onnx`` and ``report.json`` (and, for
a Hugging Face or built-in text model, what a runtime loads beside ``model.onnx``:
:mod:`actsparse_deploy.models.folder`) and
returns the :class:`~actsparse_deploy.app.report.Report` that ``report.json``
holds (the same typed object as every command's ``--json``); what it takes is one
:class:`~actsparse_deploy.app.options.ConvertOptions`, a group per stage.

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
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..bake.smooth import Smoothing, plan_smoothing, smoothed
from ..bake.squash import SquashResult
from ..base.errors import OutputError, UsageError
from ..base.files import check_output_path, os_reason, output_folder, publish, staging_dir
from ..base.memory import MemoryPlan, memory_plan
from ..base.threads import current_threads, use_threads
from ..base.version import __version__
from ..calibration.calibrate import collect, select
from ..calibration.masks import Masks
from ..calibration.recipe import Recipe
from ..data.batches import Batch, first_samples, reiterable, split_tuning, total_samples, unpadded
from ..data.iospec import IOSpec, check_dynamic_axes
from ..data.streams import shape_examples
from ..data.workload import Workload
from ..models.decoder import Target, export_target
from ..models.folder import RuntimeFiles, write_workload_files
from ..models.loading import load_recipe
from ..nn.modules import release_weights, weight_bytes
from ..nn.recorded import Recorded
from ..onnx.export import ExportResult, export_onnx, layer_metadata
from ..onnx.generate import decode_latency, decode_pair, held_out_prompts
from ..onnx.latency import dense_export, dense_export_errors, dense_latency, one_at_a_time, pair_latency, slower_note, verdict
from ..onnx.quantize import FLOAT_FOLDER, Quantized, measure_frontier, quantize_onnx, quantized_cost
from ..onnx.validate import ValidationReport
from .cost import cost_stage
from .options import CalibrateOptions, ConvertOptions, ExportOptions, QuantizeOptions, ValidateOptions
from .quantize import Int8Plan, Int8Search, int8_room, quantize_stage, smooth_stage
from .report import Report, named_input_shape
from .workload import squash_workload, validate_target

if TYPE_CHECKING:
    from ..calibration.stats import Statistics
    from .budget import Budget, BudgetResult

__all__ = ["STAGES", "ConvertOptions", "Stages", "Timer", "build_report", "convert", "locked_outputs", "publish_staged"]


#: what the stages tell ``on_stage`` as each starts (``load`` is silent)
STAGES = {"calibrate": "calibrating", "recover": "recovering", "reference": "recording the dense model", "squash": "squashing", "export": "exporting",
          "validate": "validating", "cost": "measuring cost", "smooth": "smoothing", "quantize": "quantizing", "latency": "measuring latency"}


@dataclass
class Timer:
    """Seconds per stage; tells ``on_stage(name, total)`` as each one starts."""

    seconds: dict[str, float] = field(default_factory=dict)
    on_stage: Callable[[str, int | None], None] | None = None
    totals: dict[str, int | None] = field(default_factory=dict)
    #: when the run began (``time.perf_counter``)
    started: float = field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.on_stage is not None and stage in STAGES:
            self.on_stage(STAGES[stage], self.totals.get(stage))
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(time.perf_counter() - start, 3)

    def total(self) -> float:
        """Seconds since the run began."""
        return time.perf_counter() - self.started


OUT_FILES = ("masks.safetensors", "model.onnx", "report.json")
DATA_FILE = "model.onnx.data"


@dataclass(frozen=True)
class DenseReference:
    """The dense model as the stages after squash compare against it: ``model`` (the PyTorch model, or
    its outputs recorded on the data those stages feed it: :class:`~actsparse_deploy.nn.recorded.Recorded`),
    ``target`` (the same as it is exported: a decoder with its cache) and ``onnx`` (its export for the
    latency stage; None: the latency stage exports it)."""

    model: nn.Module
    target: nn.Module
    onnx: Path | None = None

    @property
    def recorded(self) -> bool:
        """Whether the dense model's outputs stand in for it (squash may then change the model in place)."""
        return isinstance(self.model, Recorded)


@dataclass
class Stages:
    """The stage runner: each stage on ``work``, timed by ``timer`` (which tells
    its ``on_stage`` as the stage starts). Squash works on a copy (the dense model's
    weights are never changed), or, once the dense model's outputs are recorded
    (:meth:`dense_reference`), on the model itself; calibration may move it to its
    device and back to the CPU."""

    work: Workload
    timer: Timer = field(default_factory=Timer)
    #: what export, validation and latency run: the model as it is, or its decoder with a cache
    target: Target = field(default_factory=Target)
    #: the files the export wrote for a runtime beside the ONNX model (``export(..., outdir=...)``)
    runtime: RuntimeFiles = field(default_factory=RuntimeFiles)
    #: how the run keeps within the memory allowed (``--max-memory``): None, unchecked (another rank than 0)
    memory: MemoryPlan | None = None

    @classmethod
    def load(cls, model: str, o: ConvertOptions) -> tuple[Stages, Recipe, Iterable[Batch]]:
        """The ``load`` stage: ``model`` with its data and recipe, and every check
        that needs them, before any work; the runner, the recipe and the calibration
        batches (the first ``max_samples``)."""
        timer = Timer(on_stage=o.on_stage)
        with timer("load"):
            work = o.load.workload(model, check_distinct=False)
            c = o.calibrate
            # a decoder with a cache, or the model as it is; in the dtype the export writes (the weights cast in place)
            dtype = o.export.dtype if o.quantize.mode == "none" else "float32"  # onnxruntime's quantizer takes float32
            target = export_target(work, o.export.cache, o.export.exporter, dtype)
            if target.cast(work):
                work.notes.append(str(target.dtype_note(*target.tolerances(o.validate.atol, o.validate.rtol))))
            recipe = load_recipe(work, c.recipe, c.sparsity, method=c.method, compensate=c.compensate, heads=c.heads)
            o.load.check_distinct()  # after the recipe: a missing recipe is named first
            work.require_heldout()
            if c.max_cost_other and work.other is None:
                raise UsageError(f"--max-cost-other holds the budget on text from another source too, and {work.name!r} has none: "
                                 "give --other-text FILE")
            weights = weight_bytes(work.model)
            check_dynamic_axes(work.model, work.example(), o.export.dynamic_axes, work.io)  # before any work
            calibration = first_samples(work.require_calibration(), c.max_samples)
            timer.totals["calibrate"] = total_samples(calibration) if c.group is None else None  # distributed: a share
            # one copy of the weights in PyTorch and one in onnxruntime must fit (exit 13 here, before any work)
            memory = (memory_plan(weights, o.max_memory, asked=o.max_memory is not None, can_part=not target.cached, loaded=True,
                                  half=target.dtype == torch.float16) if o.writer else None)
        return cls(work, timer, target, memory=memory), recipe, calibration

    def calibrate(self, recipe: Recipe, batches: Iterable[Batch], o: CalibrateOptions,
                  int8: Int8Plan | None = None) -> tuple[Masks, BudgetResult | None] | None:
        """The masks of ``recipe`` on ``batches``: to the cost budget ``o.max_cost``
        where given (levels per layer, tuned on a split of the batches: the budget's
        result too), else at the recipe's level. None on a rank other than 0 of a
        distributed run (it collected its share). ``int8``: ``--quantize`` with the
        budget, the quantized model held to it (:meth:`calibrate_with_int8`)."""
        with self.timer("calibrate"):
            if o.max_cost is not None:
                from .budget import Budget, calibrate_to_budget

                work, budget = self.work, Budget.parse(o.max_cost)
                if int8 is not None and int8.mode != "none":
                    return self.calibrate_with_int8(recipe, batches, o, budget, int8)
                result = calibrate_to_budget(work.model, recipe, batches, budget, model_name=work.name, on_batch=o.on_batch,
                                             other=work.other if o.max_cost_other else None, one_head_count=self.target.cached)
                return result.masks, result
            stats = self.statistics(recipe, batches, o)
            if stats is None:
                return None
            self.work.model.to("cpu")  # squash, export and validation run on CPU
            return select(stats, model=self.work.model), None

    def recover(self, masks: Masks, batches: Iterable[Batch]) -> Masks:
        """The ``recover`` stage: the masked layers trained towards the dense outputs on ``batches``
        (:func:`~actsparse_deploy.bake.recover.recover`); the report's notes say what it did."""
        from ..bake.recover import recover

        with self.timer("recover"):
            recovered, recovery = recover(self.work.model, masks, batches)
        self.work.notes.append(recovery.note())
        return recovered

    def statistics(self, recipe: Recipe, batches: Iterable[Batch], o: CalibrateOptions | None = None) -> Statistics | None:
        """The statistics ``recipe`` selects from, collected on ``batches`` (token
        batches without their padding: real tokens only) on ``o.device``, shared
        across ``o.group``'s ranks; None on a rank other than 0."""
        o = o or CalibrateOptions()
        if o.device is not None:
            from ..calibration.distributed import resolve_device

            self.work.model.to(resolve_device(o.device))
        stats = collect(self.work.model, recipe, unpadded(batches), model_name=self.work.name, on_batch=o.on_batch,
                        group=o.group if o.group is not None else False)
        return stats if o.writer else None

    def calibrate_with_int8(self, recipe: Recipe, batches: Iterable[Batch], o: CalibrateOptions, budget: Budget,
                            plan: Int8Plan) -> tuple[Masks, BudgetResult]:
        """``--max-cost`` with ``--quantize``: the most sparsity that still keeps ``budget`` once quantized.
        The dense model quantized alone first: what it leaves of the budget (:func:`~actsparse_deploy.app.quantize.int8_room`;
        no room: ``auto`` leaves int8 out, else exit 10) is what the sparsity is searched to (each float candidate
        kept :data:`~actsparse_deploy.app.budget.DOUBT` standard errors inside it, so the first search's int8 model mostly keeps the budget); the chosen
        masks are then squashed, exported, quantized and measured on the tuning split, and the search runs
        again on the same candidates, tighter by what the quantized model missed, until it keeps the budget."""
        from .budget import calibrate_to_budget

        work, asked = self.work, plan.mode
        batches = batches if reiterable(batches) else list(batches)
        calibration, tuning = split_tuning(batches)
        tuning = list(unpadded(tuning))
        other = list(unpadded(work.other)) if o.max_cost_other and work.other is not None else None
        with staging_dir(plan.scratch) as folder:
            costs = itertools.count()

            def cost(model: nn.Module) -> tuple[float, float]:  # with --max-cost-other, the worse of the tuning split and the other text
                figures = self.quantized_cost(model, calibration, tuning, budget.kind, "int8" if asked == "auto" else asked, plan.export,
                                              folder / str(next(costs)), plan.smooth, other=other)
                return max(figures, key=lambda f: budget.badness(budget.doubted(*f)))

            room = int8_room(budget, cost(work.model)[0], asked)
            # kept by DOUBT standard errors: the held-out data is other samples
            search = Int8Search(budget, lambda result: cost(squash_workload(work, result.masks, plan.squash,
                                                                            one_head_count=self.target.cached).model))
            last = calibrate_to_budget(work.model, recipe, batches, room.searched, model_name=work.name, on_batch=o.on_batch,
                                       again=search if room.mode != "none" else None, other=work.other if o.max_cost_other else None,
                                       one_head_count=self.target.cached)
        result, figure = search.chosen(last)
        found = {"searched_budget": str(result.budget), "int8_tuning_cost": figure[0], "int8_tuning_error": figure[1],
                 "searches": len(search.measured)} if figure is not None else {}
        return result.masks, replace(result, budget=budget, quantization={**room.to_json(), **found})

    def quantized_cost(self, model: nn.Module, calibration: Iterable[Batch], tuning: list[Batch], kind: str, mode: str,
                       o: ExportOptions, folder: Path, smooth: bool = True, other: list[Batch] | None = None) -> list[tuple[float, float]]:
        """The budget ``kind``'s figure of ``model`` quantized by ``mode``, and its standard error: exported
        into ``folder`` (removed after) as ``convert`` exports it (``smooth``: smoothed as convert smooths it,
        its ranges from ``calibration`` and its strengths chosen on ``tuning``; the model as it was after),
        quantized, and measured against the dense PyTorch model on ``tuning`` as the budget search measures
        its candidates (``int8-static``: ranges from ``calibration``); then, with ``other`` (text from another
        source, ``--max-cost-other``), on it too: one pair per set, the tuning split's first."""
        work, target = self.work, self.target
        folder.mkdir()
        try:
            plan = plan_smoothing(model, unpadded(calibration), tuning, mode) if smooth else None
            with smoothed(model, plan, check=tuning[:2]) if plan is not None else contextlib.nullcontext(model):
                exported = self.export(model, folder / "model.onnx", o, timed=False)
            io, path = target.validation_io(exported.io), folder / "model.int8.onnx"
            quantize_onnx(exported.path, path, mode, calibration=target.batches(calibration) if mode == "int8-static" else None, io_spec=io)
            return [quantized_cost(work.model, path, on, target.batches(on), kind, io_spec=io) for on in (tuning, *([other] if other else []))]
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @contextlib.contextmanager
    def dense_reference(self, o: ConvertOptions, folder: Path, user_budget: bool = False) -> Iterator[DenseReference]:
        """What the stages after squash compare against, made before squash: the dense model's outputs
        recorded on the held-out and other data as the cost, the int8 check and the frontier feed them, and
        with ``o.latency`` its export for the latency stage (in ``folder``, removed after the block); squash
        may then change the model in place (one copy of the weights, never two). ``user_budget``: a budget
        function of the user's is called on the dense model itself, which is kept."""
        work, target = self.work, self.target
        if user_budget:
            yield DenseReference(work.model, target.model(work.model))
            return
        held, other = work.require_heldout(), work.other
        try:
            with self.timer("reference"):
                onnx = None
                if o.latency:  # exported as the converted model will be; timed against it by the latency stage
                    folder.mkdir(parents=True, exist_ok=True)
                    with dense_export_errors():
                        onnx = self.export(work.model, folder / "dense.onnx", o.export, timed=False)
                model = Recorded.of(work.model, work.compared_data())
                exported = [target.batches(held), *([target.batches(other)] if other is not None else [])]
                quantized = o.quantize.mode != "none"
                as_exported = (Recorded.of(target.model(work.model), exported) if target.cached and quantized else model)
            yield DenseReference(model, as_exported, onnx.path if onnx is not None else None)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def squash(self, masks: Masks, mode: str, in_place: bool = False) -> SquashResult:
        """``masks`` baked into a copy of the model, or ``in_place`` into the model itself."""
        with self.timer("squash"):
            return squash_workload(self.work, masks, mode, in_place, one_head_count=self.target.cached)

    def export(self, model: nn.Module, path: Path, o: ExportOptions, metadata: Mapping[str, str] | None = None,
               outdir: Path | None = None, timed: bool = True) -> ExportResult:
        """``model`` to ONNX at ``path`` with the workload's I/O spec (inferred from
        the model and the shapes of its data where it has none); a causal language
        model as its decoder with a cache (:attr:`target`). With ``outdir`` (where the
        files end up), what a runtime loads beside it too (:attr:`runtime`). ``timed``: as the
        export stage (else a scratch export inside another stage)."""
        work, target = self.work, self.target.of_model(model)  # a decoder whose heads were pruned: a smaller cache
        with self.timer("export") if timed else contextlib.nullcontext():
            if outdir is not None:  # config.json, tokenizer, ... beside model.onnx
                self.runtime = write_workload_files(path.parent, work, model, outdir=outdir, cache=target.cached)
            data = () if target.cached else shape_examples(work.require_heldout(), work.calibration)
            return export_onnx(
                target.model(model), target.example(work), path, exporter=target.exporter(o.exporter), opset=o.opset,
                io_spec=target.io(work), metadata=metadata, external_data=o.external_data, verbose=o.verbose, data=data,
                dynamic_axes=o.dynamic_axes,
            )

    def validate(self, path: Path, model: nn.Module, exported: ExportResult, o: ValidateOptions,
                 release: Callable[[], None] | None = None) -> ValidationReport:
        """The ONNX model at ``path`` against ``model`` on the held-out data: a
        ValidationError where an output is outside the tolerances. ``release``: in two passes,
        ``release()`` letting the model's weights go between them (not for a decoder with a cache)."""
        with self.timer("validate"):
            return validate_target(path, model, self.work.require_heldout(), self.target, exported.io, o.atol, o.rtol, o.timeout,
                                   release)

    def cost(self, model: nn.Module, path: Path | None = None, io: IOSpec | None = None,
             budget: BudgetResult | None = None, dense: nn.Module | None = None) -> tuple[dict[str, Any], BudgetResult | None]:
        """What sparsification cost on the held-out data (:func:`~actsparse_deploy.app.cost.cost_stage`;
        the ONNX model's figures too where ``path`` is given, fed as ``io`` says: :meth:`Target.validation_io`
        of the export's spec), and ``budget`` with its held-out cost.
        ``dense``: what stands for the dense model (:attr:`DenseReference.model`; None: ``work.model``)."""
        with self.timer("cost"):
            return cost_stage(self.work, model, path, io, budget, onnx_batches=self.target.batches, dense=dense)

    def quantize(self, path: Path, exported: ExportResult, o: QuantizeOptions, budget: BudgetResult | None = None,
                 verbose: bool = False, dense: nn.Module | None = None, smoothing: Smoothing | None = None,
                 timeout: float | None = None) -> Quantized | None:
        """The validated ONNX model at ``path`` quantized in its place (``o.mode``; None for ``none``),
        the float one moved aside, and held to ``budget`` where there is one
        (:func:`~actsparse_deploy.app.quantize.quantize_stage`, within ``timeout`` seconds: ``--timeout``, as the
        float model's validation); ``smoothing``: what :meth:`smooth` did before export."""
        mode = quantize_mode(o, budget)
        if mode == "none":
            return None
        with self.timer("quantize"):
            return quantize_stage(self.work, self.target, path, exported.io, mode, budget.budget if budget else None, verbose,
                                  dense=dense, smoothing=smoothing, other_text=budget is not None and budget.other_text is not None,
                                  timeout=timeout)

    def smooth(self, model: nn.Module, o: ConvertOptions, budget: BudgetResult | None = None) -> Smoothing | None:
        """Before export, ``model``'s matrix products smoothed for the int8 that ``o.quantize`` will run, where
        that lowers their int8 error (:func:`~actsparse_deploy.app.quantize.smooth_stage`); None: no int8, or ``--no-smooth``."""
        mode = quantize_mode(o.quantize, budget)
        if mode == "none" or not o.quantize.smooth:
            return None
        with self.timer("smooth"):
            return smooth_stage(self.work, model, mode, o.calibrate.max_samples)

    def latency(self, path: Path, exported: ExportResult, scratch: Path, verbose: bool = False,
                quantized: Quantized | None = None, reference: DenseReference | None = None) -> dict[str, Any]:
        """The dense model (exported into ``scratch``, removed after, unless ``reference`` holds its export)
        against the ONNX model at ``path`` under onnxruntime, on held-out data; a decoder's decode speed and
        ``--quantize``'s alternatives side by side measured on the same dense export."""
        work, target, held = self.work, self.target, self.work.require_heldout()
        reference = reference or DenseReference(work.model, target.model(work.model))
        dense, batches = reference.target, target.batches(held)
        # what --quantize's alternatives are measured on too (the other text), as the ONNX models take it
        other = work.other if quantized is not None else None
        io, other_batches = target.validation_io(exported.io), target.batches(other) if other is not None else None
        static = quantized is not None and quantized.result.mode == "int8-static"
        calibration = target.batches(work.require_calibration()) if static else None
        exporting = dense_export(dense, scratch, exporter=exported.exporter, opset=exported.opset, io_spec=exported.io,
                                 example=target.example(work), verbose=verbose) if reference.onnx is None else None
        if self.memory is not None and not self.memory.one_at_a_time and not self.memory.sessions_fit():
            self.memory = replace(self.memory, one_at_a_time=True)  # what the stages before left held: two sessions are over it now
        apart = one_at_a_time(self.memory is not None and self.memory.one_at_a_time)  # where two sessions are over --max-memory
        with self.timer("latency"), apart, exporting or contextlib.nullcontext(reference.onnx) as dense_path:
            assert dense_path is not None
            prompt = held_out_prompts(held, 1, max_tokens=None)[0] if target.cached else None  # a decoder's: ms per new token
            if quantized is None:
                figures = dense_latency(dense_path, path, batches, io_spec=exported.io)
                if prompt is not None:
                    figures["decode"] = decode_latency(dense_path, path, prompt)
                return figures
            # the alternatives side by side (dense, int8 alone, sparse, sparse + int8), timed once: the converted
            # model is the sparse + int8 one, its figures against dense read from the same passes
            measured = measure_frontier(dense, {"dense": dense_path, "sparse": quantized.floated, "sparse+int8": path}, batches,
                                        io=io, mode=quantized.result.mode, tokens=work.causal_lm, labels=work.labels,
                                        other=other_batches, calibration=calibration, decode_prompt=prompt)
            figures = pair_latency(measured.timed, "dense", "sparse+int8")
            if measured.decoding is not None:
                figures["decode"] = decode_pair(measured.decoding, "dense", "sparse+int8")
            return {**figures, "frontier": measured.rows}


def quantize_mode(o: QuantizeOptions, budget: BudgetResult | None) -> str:
    """The quantization that runs: ``o.mode``, where ``auto`` is int8 where the budget left room for it
    (:meth:`Stages.calibrate`), int8 without a budget."""
    if o.mode == "auto":
        return str(budget.quantization["mode"]) if budget is not None and budget.quantization else "int8"
    return o.mode


@contextlib.contextmanager
def locked_outputs(outdir: Path, names: Sequence[str], overwrite: bool) -> Iterator[Path]:
    """``outdir`` made and locked for this run (one run at a time writes there:
    never a mix of two runs' files), each output name checked before any work
    (:func:`~actsparse_deploy.base.files.check_output_path`); the folders it made
    are removed again, if still empty, where the block fails."""
    with output_folder(outdir):
        for name in names:
            check_output_path(outdir / name, overwrite)
        yield outdir


def publish_staged(
    staging: Path, outdir: Path, writers: Mapping[str, Callable[[Path], object]], names: Sequence[str] | None, overwrite: bool,
    *, what: str = "the outputs", confirm: Callable[[], None] | None = None,
) -> None:
    """Each ``writers[name](staging / name)``, then ``names`` (None: everything
    staged, ``report.json`` last) moved from ``staging`` into ``outdir`` together
    (:func:`~actsparse_deploy.base.files.publish`). ``confirm()`` first where given
    (distributed: no other rank failed meanwhile). An OSError is an OutputError."""
    try:
        for name, write in writers.items():
            write(staging / name)
    except OSError as e:
        raise OutputError(f"cannot write {what} to {outdir}: {os_reason(e)}") from e
    if names is None:  # the files of subfolders too (1_Pooling/config.json)
        names = sorted((p.relative_to(staging).as_posix() for p in staging.rglob("*") if not p.is_dir()), key=lambda n: n == "report.json")
    if confirm is not None:
        confirm()
    publish(staging, outdir, names, overwrite)


def convert(model: str, outdir: str | Path, options: ConvertOptions | None = None, **keywords: Any) -> Report | None:
    """Calibrate, squash, export and validate; write the three files to ``outdir``
    and return the report (its ``to_json()`` is ``report.json``). ``options``: one
    :class:`~actsparse_deploy.app.options.ConvertOptions`, or its flat keywords
    (checked first, before any work):

    ``weights``, ``data``, ``heldout``, ``batch_size``; ``labels``: a file of class indices
    for ``heldout``; ``task`` / ``text`` / ``heldout_text`` / ``max_length``: a Hugging Face
    model directory's task and the text files its tokenizer reads; ``factory_args``: keyword
    arguments of a ``module:factory`` (``load``). ``recipe``, ``sparsity``; ``method`` / ``compensate``:
    the selection method (``"fluctuation"``, ...) and the compensation (``"none"``, ``"bias"``,
    ``"lstsq"``) for every layer, over the recipe's; ``max_cost``: a cost budget instead of one
    sparsity; ``max_samples``: calibrate on the first this many calibration samples only;
    ``device``: where calibration runs; ``group``: distributed calibration
    (:mod:`actsparse_deploy.calibration.distributed`: rank 0 writes and returns the report, the
    other ranks return None and touch no file); ``on_batch`` (``calibrate``). ``mode`` (``squash``).
    ``exporter``, ``opset``, ``external_data``, ``verbose``; ``dynamic_axes``: ``NAME:AXIS:LABEL``
    input axes to export as dynamic besides those inferred from the model and data; ``cache``: a
    causal language model as a decoder with a KV cache (None, the default: every causal language
    model; False: one full pass per call) (``export``).
    ``atol``, ``rtol``; ``timeout``: seconds onnxruntime may take for the whole validation (None:
    no limit) (``validate``). ``overwrite``; ``threads``: torch's and onnxruntime's intra-op threads
    (None: ``OMP_NUM_THREADS`` where set, else the free cores; see :mod:`actsparse_deploy.base.threads`);
    ``latency``: time the dense and the converted model under onnxruntime on held-out data (the
    report's ``latency``; False skips it); ``on_stage(name, total)``: called as each stage starts
    (see ``STAGES``; ``total``: calibration samples where known, else None)."""
    if options is not None and keywords:
        raise TypeError(f"convert() got `options` and the keyword {next(iter(keywords))!r}: give one of them")
    options = options if options is not None else ConvertOptions(**keywords)
    outdir = Path(outdir)
    if not options.writer:  # another rank than 0: calibrates its share, writes nothing
        with use_threads(options.threads):
            return _convert(model, outdir, options)
    names = (*OUT_FILES, *([DATA_FILE] if options.export.external_data else []))
    # made and locked: one run at a time writes here; removed again if still empty on a failure
    with locked_outputs(outdir, names, options.overwrite), use_threads(options.threads):  # torch and onnxruntime: one count
        return _convert(model, outdir, options)


def _convert(model: str, outdir: Path, o: ConvertOptions) -> Report | None:
    stages, recipe, calibration = Stages.load(model, o)
    int8 = Int8Plan(o.quantize.mode, o.export, o.squash.mode, outdir, o.quantize.smooth) if o.writer else None
    calibrated = stages.calibrate(recipe, calibration, o.calibrate, int8)
    if calibrated is None:  # another rank than 0 of a distributed run
        return None
    masks, budget = calibrated
    if o.calibrate.recover:
        masks = stages.recover(masks, calibration)
    # everything is written into a staging directory inside outdir and moved into
    # place only when validation passed: an error or an interrupt leaves nothing
    with staging_dir(outdir) as staging:
        # the dense model's outputs (and its export for the latency stage) first: then squash changes the model in place
        with stages.dense_reference(o, staging / ".dense-latency", user_budget=budget is not None and budget.budget.kind == "user") as dense:
            squashed = stages.squash(masks, o.squash.mode, in_place=dense.recorded)
            report = _staged_report(stages, masks, budget, squashed, staging, outdir, o, dense)
        return _publish(report, staging, outdir, o)


def _staged_report(stages: Stages, masks: Masks, budget: BudgetResult | None, squashed: SquashResult, staging: Path,
                   outdir: Path, o: ConvertOptions, dense: DenseReference) -> Report:
    """Export, validate and measure into ``staging`` against ``dense``; the report of the run."""
    onnx_path = staging / "model.onnx"
    smoothing = stages.smooth(squashed.model, o, budget)  # before export: the float model validated is the one quantized
    exported = stages.export(squashed.model, onnx_path, o.export, layer_metadata(squashed.report(), o.squash.mode), outdir=outdir)
    onnx_io = stages.target.validation_io(exported.io)  # what the ONNX model is fed (a decoder's first steps)
    # where one copy at a time is all that fits: the squashed model's outputs kept for the cost, its weights let go once
    # validation has its outputs, and onnxruntime validates alone
    apart = stages.memory is not None and stages.memory.apart
    sparse = Recorded.of(squashed.model, stages.work.compared_data()) if apart else squashed.model
    validation = stages.validate(onnx_path, squashed.model, exported, o.validate,
                                 release=(lambda: release_weights(squashed.model)) if apart else None)
    cost, budget = stages.cost(sparse, onnx_path, onnx_io, budget, dense=dense.model)
    # the float model validated above, moved aside
    quantized = stages.quantize(onnx_path, exported, o.quantize, budget, o.export.verbose, dense=dense.target, smoothing=smoothing,
                                timeout=o.validate.timeout)
    release_weights(squashed.model)  # onnxruntime's sessions from here on: no PyTorch weights beside them (the dense model's
    # too, where squash changed it in place; else the latency stage exports it)
    speed = None
    if o.latency:  # dense vs converted under onnxruntime, on held-out data; the dense export is scratch
        speed = stages.latency(onnx_path, exported, staging / ".dense-latency", o.export.verbose, quantized, dense)
    shutil.rmtree(staging / FLOAT_FOLDER, ignore_errors=True)
    masks.save(staging / "masks.safetensors")
    return build_report(stages.work, masks, squashed, exported, validation, cost, stages.timer, stages.timer.total(), o.squash.mode,
                        onnx_path=outdir / "model.onnx", budget=budget, speed=speed, runtime=stages.runtime, quantized=quantized,
                        cache=stages.target.cached, precision=stages.target.precision(), memory=stages.memory)


def _publish(report: Report, staging: Path, outdir: Path, o: ConvertOptions) -> Report:
    """Write ``report.json`` and move every staged file into ``outdir`` (the
    report last; external data over 2 GB, which comes unasked, is checked too);
    returns the report with ``report.json``'s size.
    Distributed, rank 0 first makes sure that no other rank failed meanwhile
    (``confirm``): a job that failed leaves nothing."""
    sized: list[Report] = []

    def write(path: Path) -> None:
        path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        sized.append(report.with_file("report.json", path.stat().st_size))

    staged_data = (staging / DATA_FILE).exists()
    publish_staged(staging, outdir, {"report.json": write}, None, o.overwrite, confirm=getattr(o.calibrate.group, "confirm", None))
    if not staged_data and o.overwrite and (outdir / DATA_FILE).is_file():
        try:
            (outdir / DATA_FILE).unlink()  # the replaced model's external data: nothing refers to it any more
        except OSError as e:
            raise OutputError(f"cannot write the outputs to {outdir}: {os_reason(e)}") from e
    return sized[0]


def _other_text_note(work: Workload) -> list[str]:
    """A text model's cost measured without text from another source: what its held-out text can and cannot say."""
    if work.other is not None or work.task is None:
        return []
    return ["no --other-text: the cost was measured on the held-out text only, which says little about text unlike the "
            "calibration text where both come from one source; give --other-text FILE (text from another source) for the cost "
            "out of domain"]


def build_report(
    work: Workload, masks: Masks, squashed: SquashResult, exported: ExportResult, validation: Any,
    cost: Mapping[str, Any], timer: Timer, total: float, mode: str, onnx_path: str | Path | None = None,
    budget: BudgetResult | None = None, speed: Mapping[str, Any] | None = None, runtime: RuntimeFiles | None = None,
    quantized: Quantized | None = None, cache: bool | None = None, precision: Mapping[str, str] | None = None,
    memory: MemoryPlan | None = None,
) -> Report:
    """The report of a ``convert`` run, built once: ``report.json`` is its
    ``to_json()``. ``validation``: a ``ValidationReport`` (or its JSON);
    ``onnx_path``: where the ONNX model ends up (the export and validation ran
    on a staged copy), default where it was exported to; ``budget``: a
    ``--max-cost`` search's result (the levels chosen per layer, tuning and
    held-out cost); ``speed``: the latency stage's figures (the ratio in words
    added, and a note where prune was asked for and made it slower); ``runtime``:
    the files written for the runtime beside the ONNX model, and their notes; ``quantized``: what
    ``--quantize`` did (with the latency stage's frontier of the alternatives); ``cache``: whether the
    export is a decoder with a KV cache (``export.cache``); ``precision``: the weights' ``dtype`` written and
    their ``source_dtype`` (``export.dtype``, ``export.source_dtype``); ``memory``: how the run kept within its
    memory budget (the report's ``memory``, with the peak so far, where a budget was asked for or changed the run)."""
    text_notes = _other_text_note(work)
    modes = squashed.rows()
    # merged: the squash rows also say how each layer's features were chosen (method) and compensated
    layers = [{**row, "input_shape": named_input_shape(row), **next(m for m in modes if m["layer"] == row["layer"])}
              for row in masks.summary()]
    outdir = exported.path.parent
    files = {name: (outdir / name).stat().st_size for name in ("masks.safetensors", "model.onnx") if (outdir / name).exists()}
    if exported.external_data:
        files["model.onnx.data"] = os.path.getsize(f"{exported.path}.data")
    runtime = runtime or RuntimeFiles()
    files.update({name: (outdir / name).stat().st_size for name in runtime.names})
    final = str(onnx_path if onnx_path is not None else exported.path)
    checked = validation.to_json() if hasattr(validation, "to_json") else dict(validation)
    note = slower_note(mode, [row.get("mode", "") for row in layers], speed["ratio"]) if speed is not None else None
    left_out = (budget.quantization or {}).get("why") if budget is not None else None
    notes = [*([note] if note else []), *([f"--quantize auto: not quantized: {left_out}"] if left_out else []), *text_notes]
    sections: dict[str, Any] = {  # JSON, parsed by the report's sections
        "calibration": {"samples": masks.num_samples, "batches": masks.num_batches},
        "export": {**exported.to_json(), "path": final, **({"cache": cache} if cache is not None else {}), **(precision or {})},
        "validation": {**checked, "onnx": final,
                       **({"generation": {**checked["generation"], "onnx": final}} if checked.get("generation") else {})},
        "cost": dict(cost),
        "budget": budget.to_json() if budget is not None else None,
        "latency": ({k: v for k, v in speed.items() if k != "frontier"} | {"verdict": verdict(speed["ratio"])}
                    if speed is not None else None),
        "quantization": quantized.to_json((speed or {}).get("frontier")) if quantized is not None else None,
        "memory": memory.to_json() if memory is not None and memory.said else None,
    }
    return Report(
        tool_version=__version__,
        model=work.name,
        squash_mode=mode,
        overall_sparsity=masks.overall_sparsity(),
        layers=layers,
        recipe=masks.recipe.to_dict() if masks.recipe else None,
        notes=[*work.notes, *masks.notes(), *runtime.notes, *notes],
        seconds={**timer.seconds, "total": round(total, 3)},
        files=files,
        threads=current_threads(),
        **sections,
    )
