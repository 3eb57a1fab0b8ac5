"""The ``actsparse`` command line: thin commands over the Python API.

    $ actsparse models
    $ actsparse calibrate digits-cnn -o masks.safetensors
    $ actsparse calibrate my_pkg.models:build --weights w.safetensors \\
          --data calib.npz --layers "encoder.*.fc2" --sparsity 0.5 -o masks.safetensors

Errors become a one-line message on stderr and the exit code of their class
(see the README); ``--verbose`` adds the traceback. Library messages name
parameters in backticks (`` `heldout` ``): shown here as the command's flags.

Each command is its options (:mod:`~actsparse_deploy.app.cli_options`), one
call into the application layer (``commands``, ``calibrate``, ``pipeline``,
``sweep``) and the rendering (:mod:`~actsparse_deploy.app.render`) of the
:class:`~actsparse_deploy.app.report.Report` it returns (``--json``:
``Report.to_json()``, one schema for every command); how errors and signals end
a run is :mod:`~actsparse_deploy.app.exits`. torch and onnx are imported inside
the commands: ``--version`` and ``--help`` do not load them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import RenderableType

# light modules only: torch, onnx and the stages are imported inside the commands
from ..base.constants import DEFAULT_ATOL, DEFAULT_EXPORTER, DEFAULT_MODE, DEFAULT_RTOL, MAX_RUNS
from ..base.files import check_output_path
from ..base.version import __version__
from . import render
from .calibrate import RecipeFlags
from .cli_options import (
    DEFAULT_DIST_TIMEOUT,
    MAX_BATCH_SIZE,
    AggregateOpt,
    AtolOpt,
    BatchSizeOpt,
    CacheOpt,
    CalibrateSparsityOpt,
    CompensateOpt,
    DataOpt,
    DeviceOpt,
    DistTimeoutOpt,
    Dtype,
    DtypeOpt,
    DynamicAxisOpt,
    Exporter,
    ExporterOpt,
    ExternalOpt,
    FactoryArgsOpt,
    HeadsOpt,
    HeldoutOpt,
    HeldoutTextOpt,
    JsonOpt,
    LabelsOpt,
    LayersOpt,
    LayerTypesOpt,
    MasksOpt,
    MasksOutputOpt,
    MaxCostOpt,
    MaxCostOtherOpt,
    MaxLengthOpt,
    MaxMemoryOpt,
    MaxSamplesOpt,
    MethodOpt,
    Mode,
    ModelArg,
    ModeOpt,
    NoLatencyOpt,
    OpsetOpt,
    OtherTextOpt,
    OverwriteOpt,
    QuantizedMaxCostOpt,
    QuantizeOpt,
    RecipeFileOpt,
    RecoverOpt,
    RtolOpt,
    SmoothOpt,
    StatsOnlyOpt,
    StructuredOpt,
    SweepMethodsOpt,
    TaskOpt,
    TextOpt,
    ThreadsOpt,
    ThresholdOpt,
    TimeoutOpt,
    VerboseOpt,
    WeightsOpt,
)
from .cli_options import check_max_cost as _check_max_cost
from .cli_options import choice as _choice
from .cli_options import model_options as _model_options
from .exits import HELP_ASKED, OneLineErrors, catch_signals, check_one_process, exit_process, handle_errors, run_app, with_threads
from .exits import quiet_cpp_log as quiet_cpp_log
from .render import StageProgress, figure, milliseconds, stderr, stdout
from .render import emit_json as _emit_json
from .report import Report, SweepResult

__all__ = ["app", "figure", "main", "milliseconds", "print_convert_summary", "quiet_cpp_log"]

app = typer.Typer(
    cls=OneLineErrors,
    name="actsparse",
    help="Calibrate activation masks on real data, bake them into a PyTorch model and export a validated ONNX model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: wrapped, never cut; help texts are not read as markup
)
logging.getLogger("actsparse_deploy").addHandler(render.Notices(logging.WARNING))


# --- what a command shows: render's tables and lines, printed on this module's stdout and stderr ---------


@contextlib.contextmanager
def _ranked(where: Any, timeout: float, command: tuple[str, dict[str, Any]], as_json: bool) -> Iterator[tuple[Any, Any]]:
    """A command's distributed session (None in one process) and progress display (quiet with --json and on ranks but 0)."""
    from ..calibration.distributed import launched

    with launched(where, timeout, command) as session, stage_progress(quiet=as_json or not (session is None or session.writer)) as progress:
        yield session, progress


def _output(as_json: bool, data: Any, show: Callable[[], object]) -> None:
    """``data`` as JSON on stdout with ``--json``, else ``show()``: the summary for people."""
    if as_json:
        _emit_json(data)
    else:
        show()


def _show(*items: RenderableType) -> None:
    """Tables and lines of text on stdout, in order."""
    for item in items:
        stdout.print(item)


def _print_notes(notes: list[str]) -> None:
    """What is worth knowing but not an error (a layer masked whole), one line each on stderr."""
    for note in notes:
        stderr.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)


def stage_progress(quiet: bool) -> contextlib.AbstractContextManager[StageProgress]:
    """The progress line on stderr (a terminal only, not with --json): see :func:`render.stage_progress`."""
    return render.stage_progress(quiet, stderr)


def print_convert_summary(report: Report) -> None:
    """``convert``'s summary on stdout, its notes on stderr before the files line."""
    _show(*render.convert_summary(report))
    _print_notes(report.notes)
    _show(render.files_line(report))


def _version(value: bool) -> None:
    if value:
        stdout.print(f"actsparse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """actsparse: activation sparsity from calibration to validated ONNX."""
    check_one_process(ctx.invoked_subcommand, bool(ctx.meta.get(HELP_ASKED)))


# --- models ----------------------------------------------------------------------


@app.command("models")
@handle_errors
def models_cmd(as_json: JsonOpt = False, verbose: VerboseOpt = False) -> None:
    """List the built-in models, with their test accuracy and built-in recipe."""
    from .catalog import builtin_models

    rows = builtin_models()
    _output(as_json, rows, lambda: _show(render.models_table(rows)))


# --- calibrate -------------------------------------------------------------------


@app.command("calibrate")
@handle_errors
@with_threads
def calibrate_cmd(
    model: ModelArg,
    output: MasksOutputOpt,
    weights: WeightsOpt = None,
    recipe: RecipeFileOpt = None,
    layers: LayersOpt = None,
    layer_types: LayerTypesOpt = None,
    sparsity: CalibrateSparsityOpt = None,
    threshold: ThresholdOpt = None,
    aggregate: AggregateOpt = None,
    structured: StructuredOpt = False,
    method: MethodOpt = None,
    compensate: CompensateOpt = None,
    heads: HeadsOpt = False,
    recover: RecoverOpt = False,
    max_cost: MaxCostOpt = None,
    data: DataOpt = None,
    max_samples: MaxSamplesOpt = None,
    text: TextOpt = None,
    task: TaskOpt = None,
    max_length: MaxLengthOpt = None,
    factory_args: FactoryArgsOpt = None,
    batch: BatchSizeOpt = 32,
    stats_only: StatsOnlyOpt = False,
    max_memory: MaxMemoryOpt = None,
    device: DeviceOpt = None,
    dist_timeout: DistTimeoutOpt = DEFAULT_DIST_TIMEOUT,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Learn activation masks from calibration data and write them to a .safetensors file.

    With --compensate, the file also holds each layer's new weight and bias,
    which squash, export and validate bake in with the mask.

    Under torchrun each process calibrates on its share of the batches, rank 0
    writes the file (see the README, "Calibrating at scale")."""
    command = ("calibrate", dict(locals()))  # as parsed: every rank of a distributed run must run the same
    from ..calibration.distributed import check_budget_device, resolve_device
    from .calibrate import calibrate_model

    _check_max_cost(max_cost, sparsity, "calibrate")
    check_budget_device(max_cost, device)
    where = resolve_device(device)  # --device cuda without CUDA: exit 2 before any work
    flags = RecipeFlags(recipe, layers, layer_types, sparsity, threshold, aggregate, structured, _choice(method), _choice(compensate), heads,
                        recover)
    with _ranked(where, dist_timeout, command, as_json) as (session, progress):
        report = calibrate_model(
            model, output, flags, weights=weights, model_options=_model_options(task, text, None, max_length, factory_args),
            data=data, batch_size=batch, max_cost=max_cost, max_samples=max_samples, stats_only=stats_only,
            device=where if device is not None else None, group=session, overwrite=overwrite,
            on_stage=progress.on_stage, on_batch=progress.on_batch, max_memory=max_memory,
        )
    if report is not None:  # None: another rank than 0 (rank 0 prints)
        _output(as_json, report, lambda: _masks_summary(report, model, output, stats_only))


def _masks_summary(report: Report, model: object, output: Path, stats_only: bool = False) -> None:
    """What ``calibrate`` and ``select`` print: the layers and their masks (``--stats-only``: the statistics), the budget, the notes."""
    samples = report.calibration.samples if report.calibration else "?"
    _show(*(render.stats_lines(report, output) if stats_only else render.masks_lines(report, f"{model}: {samples} calibration samples", output)),
          *render.budget_lines(report.budget, report.quantization))
    _print_notes(report.notes)


@app.command("merge")
@handle_errors
def merge_cmd(
    parts: Annotated[list[Path], typer.Argument(help="Statistics files from `actsparse calibrate --stats-only` (or earlier merges).",
                                                show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the merged statistics (.safetensors).")],
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Merge statistics files: the statistics one run over all their data would give.

    Each part may come from another process or machine (a Slurm array, several
    hosts): parts of another model, recipe or major version are refused."""
    from .commands import merge_stats_files

    check_output_path(output, overwrite)
    report = merge_stats_files(parts, output)
    _output(as_json, report, lambda: _show(*render.stats_lines(report, output)))


@app.command("select")
@handle_errors
@with_threads
def select_cmd(
    stats: Annotated[Path, typer.Argument(help="A statistics file (`calibrate --stats-only`, `merge`).", show_default=False)],
    output: MasksOutputOpt,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", "-r", help="A recipe TOML file (default: the one the statistics were collected with).")
    ] = None,
    sparsity: Annotated[
        float | None, typer.Option("--sparsity", "-s", min=0.0, max=1.0, help="Override the recipe's sparsity_level everywhere.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="The model the statistics are of (default: the one the file names); methods read its weights."),
    ] = None,
    weights: WeightsOpt = None,
    factory_args: FactoryArgsOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Make masks (and, with a method's compensation, new weights) from a statistics file."""
    from .commands import select_to_file

    check_output_path(output, overwrite)
    report = select_to_file(stats, output, recipe=recipe, sparsity=sparsity, model=model, weights=weights,
                            model_options=_model_options(None, None, None, None, factory_args))
    _output(as_json, report, lambda: _masks_summary(report, report.model or stats, output))


# --- squash / export / validate / convert / inspect ----------------------------------


@app.command("squash")
@handle_errors
@with_threads
def squash_cmd(
    model: ModelArg,
    masks: Annotated[Path, typer.Option("--masks", "-m", help="A masks file from `actsparse calibrate`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the squashed program (.pt2, torch.export).")],
    weights: WeightsOpt = None,
    mode: ModeOpt = Mode(DEFAULT_MODE),
    data: DataOpt = None,
    heldout: HeldoutOpt = None,
    text: TextOpt = None,
    heldout_text: HeldoutTextOpt = None,
    task: TaskOpt = None,
    max_length: MaxLengthOpt = None,
    factory_args: FactoryArgsOpt = None,
    batch: BatchSizeOpt = 32,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Bake masks into the model (no hooks left) and save it as a torch.export program (.pt2).

    Load it with actsparse_deploy.bake.pt2.load_pt2(path), which checks the file first and
    returns (program, metadata); call .module() on the program. An example input for tracing comes
    from the built-in data, or from --heldout / --data for your own model.
    """
    from .commands import SourceOptions, squash_to_pt2

    check_output_path(output, overwrite)
    options = SourceOptions(masks=masks, mode=str(mode), weights=weights, data=data, heldout=heldout,
                            batch_size=batch if data or heldout or text or heldout_text else None,
                            model=_model_options(task, text, heldout_text, max_length, factory_args))
    report = squash_to_pt2(model, output, options, overwrite=overwrite)
    _output(as_json, report, lambda: _show(render.modes_table(report.layers or [], f"{model}: squashed ({mode})"), f"torch.export program written to {output}"))


@app.command("export")
@handle_errors
@with_threads
def export_cmd(
    source: Annotated[str, typer.Argument(
        help="A model (built-in name, Hugging Face model directory or package.module:factory) or a .pt2 from `actsparse squash`.",
        show_default=False,
    )],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the ONNX model.")],
    masks: MasksOpt = None,
    mode: ModeOpt = Mode(DEFAULT_MODE),
    weights: WeightsOpt = None,
    data: DataOpt = None,
    heldout: HeldoutOpt = None,
    text: TextOpt = None,
    heldout_text: HeldoutTextOpt = None,
    task: TaskOpt = None,
    max_length: MaxLengthOpt = None,
    factory_args: FactoryArgsOpt = None,
    batch: BatchSizeOpt = 32,
    exporter: Annotated[
        Exporter | None,
        typer.Option("--exporter", help=f"torch.onnx exporter (default {DEFAULT_EXPORTER}; dynamo for a .pt2).", show_default=False),
    ] = None,
    opset: OpsetOpt = None,
    dynamic_axis: DynamicAxisOpt = None,
    external_data: ExternalOpt = False,
    cache: CacheOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Export to ONNX: a model with --masks (squashed first), a model alone (dense), or a .pt2 program.

    The batch axis is always dynamic (and the sequence axis for sequence models);
    onnx.checker runs on the result; metadata_props record the tool version,
    squash mode and per-layer sparsity.
    """
    from ..onnx.export import check_opset
    from .commands import SourceOptions, export_source, is_pt2

    check_opset(opset, str(exporter) if exporter else ("dynamo" if is_pt2(source) else DEFAULT_EXPORTER))
    check_output_path(output, overwrite)
    options = SourceOptions(masks=masks, mode=str(mode), weights=weights, data=data, heldout=heldout,
                            batch_size=batch if data or heldout or text or heldout_text else None,
                            model=_model_options(task, text, heldout_text, max_length, factory_args))
    report = export_source(
        source, output, options, exporter=str(exporter) if exporter else None, opset=opset,
        external_data=external_data, overwrite=overwrite, verbose=verbose, dynamic_axes=tuple(dynamic_axis or ()), cache=cache,
    )
    table = [render.modes_table(report.layers, f"{source}: squashed")] if report.layers else []
    _output(as_json, report, lambda: _show(*table, render.export_line(report, output)))


@app.command("quantize")
@handle_errors
@with_threads
def quantize_cmd(
    onnx_model: Annotated[Path, typer.Argument(help="The ONNX model to quantize (float).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The int8 ONNX model to write.", show_default=False)],
    mode: Annotated[str, typer.Option("--mode", help="int8 (dynamic, per-channel int8 weights) or int8-static "
                                      "(activation ranges from --data).")] = "int8",
    data: DataOpt = None,
    batch: BatchSizeOpt = 32,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Quantize an ONNX model with onnxruntime's quantizer (what convert --quantize does after validation).

    Prints the nodes quantized and the sizes before and after. The int8 model
    is judged by its cost: `actsparse convert --quantize` measures it against
    the dense model, beside the other alternatives; `actsparse validate` holds it to --max-cost.
    """
    from .quantize import quantize_file

    report = quantize_file(onnx_model, output, mode, data, batch, overwrite)
    _output(as_json, report, lambda: _show(*render.quantization_lines(report.quantization)))


@app.command("validate")
@handle_errors
@with_threads
def validate_cmd(
    onnx_model: Annotated[Path, typer.Argument(help="The ONNX model to check.", show_default=False)],
    reference: Annotated[str, typer.Argument(help="What it must compute: a model (+ --masks) or a .pt2 from `actsparse squash`.", show_default=False)],
    masks: MasksOpt = None,
    mode: ModeOpt = Mode(DEFAULT_MODE),
    weights: WeightsOpt = None,
    heldout: HeldoutOpt = None,
    heldout_text: HeldoutTextOpt = None,
    other_text: OtherTextOpt = None,
    task: TaskOpt = None,
    max_length: MaxLengthOpt = None,
    factory_args: FactoryArgsOpt = None,
    batch: BatchSizeOpt = 32,
    atol: AtolOpt = DEFAULT_ATOL,
    rtol: RtolOpt = DEFAULT_RTOL,
    timeout: TimeoutOpt = None,
    labels: LabelsOpt = None,
    as_json: JsonOpt = False,
    max_memory: MaxMemoryOpt = None,
    max_cost: QuantizedMaxCostOpt = None,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the ONNX model under onnxruntime and the PyTorch model on held-out inputs, at several batch sizes.

    Checks input names, ranks, dtypes and fixed dimensions, then output names,
    shapes and values; a NaN or Inf, or any output over tolerance, fails with a
    non-zero exit code. With a model and --masks, also reports what
    sparsification cost (dense vs sparse outputs, accuracy for classifiers).
    A quantized model is held to --max-cost against the dense model instead.
    """
    from .commands import SourceOptions, validate_against

    options = SourceOptions(masks=masks, mode=str(mode), weights=weights, heldout=heldout,
                            batch_size=batch if heldout or heldout_text else None, labels=labels,
                            model=_model_options(task, None, heldout_text, max_length, factory_args, other_text))
    report = validate_against(onnx_model, reference, options, atol=atol, rtol=rtol, timeout=timeout, max_memory=max_memory, max_cost=max_cost)
    passed = render.validation_lines(report, f"{onnx_model} vs {reference}: PASSED", atol, rtol) if report.quantized is None else []
    _output(as_json, report, lambda: _show(*passed, *render.cost_lines(report.cost), *render.quantized_check_lines(report.quantized)))


#: convert's --sparsity and the --batch-size of convert and sweep (default: the built-in model's)
ConvertSparsityOpt = Annotated[
    float | None,
    typer.Option("--sparsity", "-s", min=0.0, max=1.0, help="Override the recipe's sparsity_level everywhere; with --layers: the fraction to zero."),
]
BuiltinBatchSizeOpt = Annotated[
    int | None,
    typer.Option("--batch-size", "-b", min=1, max=MAX_BATCH_SIZE, help="Samples per batch (default: the built-in model's, else 32)."),
]


def _convert_run(flags: dict[str, Any]) -> tuple[Any, Callable[[Any, Any], Any]]:
    """convert_cmd's flags: the usage checks, the model's options and the recipe
    (before any work), and a function of the distributed session and the progress
    display that groups them into one ``ConvertOptions`` (checked there, on every rank)
    and converts with them."""
    from types import SimpleNamespace

    from ..calibration.distributed import check_budget_device, resolve_device
    from .calibrate import recipe_from_flags
    from .options import CalibrateOptions, ConvertOptions, ExportOptions, LoadOptions, QuantizeOptions, SquashOptions, ValidateOptions
    from .pipeline import convert

    f = SimpleNamespace(**flags)
    _check_max_cost(f.max_cost, f.sparsity, "convert")
    check_budget_device(f.max_cost, f.device)
    where = resolve_device(f.device)  # --device cuda without CUDA: exit 2 before any work
    model_options = _model_options(f.task, f.text, f.heldout_text, f.max_length, f.factory_args, f.other_text)
    recipe, sparsity = recipe_from_flags(f.model, f.recipe, f.sparsity, max_cost=f.max_cost, layers=f.layers, layer_types=f.layer_types,
                                         threshold=f.threshold, aggregate=f.aggregate, structured=f.structured)

    def build(session: Any, progress: Any) -> Any:
        return ConvertOptions(
            LoadOptions(f.weights, f.data, f.heldout, f.batch, f.labels, model_options),
            CalibrateOptions(recipe, sparsity, _choice(f.method), _choice(f.compensate), f.max_cost, f.max_samples, f.device, session,
                             progress.on_batch, f.max_cost_other, f.heads, f.recover),
            SquashOptions(str(f.mode)),
            ExportOptions(str(f.exporter), f.opset, f.external_data, tuple(f.dynamic_axis or ()), f.verbose, f.cache, str(f.dtype)),
            ValidateOptions(f.atol, f.rtol, f.timeout), QuantizeOptions(f.quantize, f.smooth),
            overwrite=f.overwrite, threads=f.threads, latency=not f.no_latency, on_stage=progress.on_stage, max_memory=f.max_memory,
        )

    return where, lambda session, progress: convert(f.model, f.output, build(session, progress))


@app.command("convert")
@handle_errors
@with_threads
def convert_cmd(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for masks.safetensors, model.onnx and report.json.")],
    weights: WeightsOpt = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", "-r", help="A recipe TOML file (default: the built-in model's).")] = None,
    sparsity: ConvertSparsityOpt = None,
    layers: LayersOpt = None,
    layer_types: LayerTypesOpt = None,
    threshold: ThresholdOpt = None,
    aggregate: AggregateOpt = None,
    structured: StructuredOpt = False,
    method: MethodOpt = None,
    compensate: CompensateOpt = None,
    heads: HeadsOpt = False,
    recover: RecoverOpt = False,
    max_cost: MaxCostOpt = None,
    max_cost_other: MaxCostOtherOpt = False,
    data: DataOpt = None,
    max_samples: MaxSamplesOpt = None,
    heldout: HeldoutOpt = None,
    text: TextOpt = None,
    heldout_text: HeldoutTextOpt = None,
    other_text: OtherTextOpt = None,
    task: TaskOpt = None,
    max_length: MaxLengthOpt = None,
    factory_args: FactoryArgsOpt = None,
    labels: LabelsOpt = None,
    batch: BuiltinBatchSizeOpt = None,
    mode: ModeOpt = Mode(DEFAULT_MODE),
    exporter: ExporterOpt = Exporter(DEFAULT_EXPORTER),
    dynamic_axis: DynamicAxisOpt = None,
    cache: CacheOpt = None,
    dtype: DtypeOpt = Dtype("auto"),
    quantize: QuantizeOpt = "none",
    smooth: SmoothOpt = True,
    opset: OpsetOpt = None,
    external_data: ExternalOpt = False,
    atol: AtolOpt = DEFAULT_ATOL,
    rtol: RtolOpt = DEFAULT_RTOL,
    timeout: TimeoutOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    no_latency: NoLatencyOpt = False,
    device: DeviceOpt = None,
    dist_timeout: DistTimeoutOpt = DEFAULT_DIST_TIMEOUT,
    max_memory: MaxMemoryOpt = None,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Calibrate, squash, export and validate in one go (then quantize, with --quantize).

    Writes OUTDIR/masks.safetensors, model.onnx, the runtime's files (config, tokenizer) and report.json;
    prints a summary: layers, modes, ONNX max diff, cost, latency, file sizes."""
    command = ("convert", dict(locals()))  # as parsed: every rank of a distributed run must run the same
    where, run = _convert_run(command[1])  # the usage checks, the model's options and the recipe: before any work
    with _ranked(where, dist_timeout, command, as_json) as (session, progress):
        report = run(session, progress)  # the options checked there, on every rank
    if report is not None:  # None: another rank than 0 of a distributed run (rank 0 prints)
        _output(as_json, report, lambda: print_convert_summary(report))


@app.command("sweep")
@handle_errors
@with_threads
def sweep_cmd(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for sweep.json and sweep.png.")],
    sparsity: Annotated[
        str, typer.Option("--sparsity", "-s", help="Levels: START:STOP:STEP (inclusive) or a list, e.g. 0.1:0.8:0.1 or 0.25,0.5.")
    ] = "0.1:0.8:0.1",
    method: SweepMethodsOpt = None,
    compensate: CompensateOpt = None,
    heads: HeadsOpt = False,
    weights: WeightsOpt = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", "-r", help="A recipe TOML file (default: the built-in model's).")] = None,
    data: DataOpt = None,
    heldout: HeldoutOpt = None,
    batch: BuiltinBatchSizeOpt = None,
    runs: Annotated[
        int, typer.Option("--runs", min=1, max=MAX_RUNS, help="Timed onnxruntime runs per model (median; after warm-up).")
    ] = 15,
    quantize: Annotated[
        str, typer.Option("--quantize", help="Also measure each level quantized by onnxruntime: a list of none, int8, "
                          "int8-static (e.g. none,int8), and the dense export quantized alone.")
    ] = "none",
    smooth: SmoothOpt = True,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """For each sparsity level and method: held-out cost and onnxruntime latency of the pruned model (auto squash).

    Prints a table and writes OUTDIR/sweep.json and OUTDIR/sweep.png (cost against
    sparsity per method, latency ratio to dense on a second axis; with --quantize,
    cost against latency beside it, int8 alone marked).
    """
    from .sweep import parse_levels, parse_quantize, sweep

    levels = parse_levels(sparsity)
    modes = parse_quantize(quantize)
    with stage_progress(quiet=as_json) as progress:
        result = sweep(
            model, output, levels=levels, methods=[str(m) for m in method or ()], compensate=_choice(compensate), recipe=recipe, weights=weights,
            data=data, heldout=heldout, batch_size=batch, runs=runs, overwrite=overwrite,
            on_step=lambda what: progress.on_stage(what), quantize=modes, smooth=smooth, heads=heads,
        )
    _output(as_json, [result], lambda: _show(*render.sweep_lines(SweepResult.from_json(result), output)))


@app.command("inspect")
@handle_errors
@with_threads
def inspect_cmd(
    target: Annotated[str, typer.Argument(
        help="A masks file (.safetensors from calibrate), an ONNX file (its graph; external data not read), or a model to list the layers of.",
        show_default=False)],
    weights: WeightsOpt = None,
    data: DataOpt = None,
    text: TextOpt = None,
    task: TaskOpt = None,
    max_length: MaxLengthOpt = None,
    factory_args: FactoryArgsOpt = None,
    batch: BatchSizeOpt = 8,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """List a model's layers that can take a mask (name, type, input shape on a sample batch), or a masks file's contents.

    A Hugging Face model directory without --data or --text is run on 8 token ids."""
    from .commands import inspect_target

    report = inspect_target(target, weights=weights, data=data, batch_size=batch,
                            model_options=_model_options(task, text, None, max_length, factory_args))
    if as_json:
        _emit_json(report)
        return
    if report.calibration is not None:  # a masks file
        title = f"{target}: masks for {report.model or '?'}, {report.calibration.samples} calibration samples, tool {report.tool_version}"
        _show(render.masks_table(report, title), *([render.recipe_text(report.recipe)] if report.recipe is not None else []))
    elif report.export is not None:  # an ONNX file: its graph (its external data is never read)
        _show(*render.onnx_lines(target, report))
        return
    else:
        _show(render.layers_table(target, report))
    _print_notes(report.notes)  # how the model was loaded (a Hugging Face model's task, inferred)


# --- the program ------------------------------------------------------------------------


def main() -> None:
    """``actsparse``: the app's exit code, every way out one line on stderr (see :mod:`~actsparse_deploy.app.exits`)."""
    catch_signals()
    exit_process(_run_app())


def _run_app() -> int:
    return run_app(app)


if __name__ == "__main__":
    main()
