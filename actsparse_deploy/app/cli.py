"""The ``actsparse`` command line: thin commands over the Python API.

    $ actsparse models
    $ actsparse calibrate digits-cnn -o masks.safetensors
    $ actsparse calibrate my_pkg.models:build --weights w.safetensors \\
          --data calib.npz --layers "encoder.*.fc2" --sparsity 0.5 -o masks.safetensors

Errors become a one-line message on stderr and the exit code of their class
(see the README); ``--verbose`` adds the traceback. Library messages name
parameters in backticks (`` `heldout` ``): shown here as the command's flags.

Each command is its options, one library call (``sources``, ``pipeline``) and
the rendering of the :class:`~actsparse_deploy.app.report.Report` it returns
(``--json``: ``Report.to_json()``, one schema for every command). torch and onnx
are imported inside the commands: ``--version`` and ``--help`` do not load them.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import json
import logging
import math
import os
import re
import signal
import sys
import traceback
import typing
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text
from typer.core import TyperGroup, TyperOption

# light modules only: torch, onnx and the stages are imported inside the commands
from ..base.constants import (
    BUILTIN_AGGREGATES,
    COMPENSATIONS,
    DEFAULT_AGGREGATE,
    DEFAULT_ATOL,
    DEFAULT_EXPORTER,
    DEFAULT_MODE,
    DEFAULT_RTOL,
    EXPORTERS,
    HF_TASKS,
    MAX_LENGTH,
    MAX_RUNS,
    METHODS,
    MODES,
)
from ..base.errors import ActsparseError, Terminated, is_panic
from ..base.files import check_output_path
from ..base.threads import MAX_THREADS
from ..base.version import __version__
from .report import Report

if TYPE_CHECKING:
    from ..calibration.recipe import Recipe

# typer vendors click in recent versions: take its exception classes from typer itself
_CLICK_ERRORS = {c.__name__: c for c in typer.BadParameter.__mro__}
_ClickException = cast("type[Any]", _CLICK_ERRORS["ClickException"])
_UsageError = cast("type[Any]", _CLICK_ERRORS["UsageError"])


class _OneLineErrors(TyperGroup):
    """Usage errors (bad option values, unknown options, an option of one value
    given twice) as one line on stderr, exit code 2, like every other error of
    this tool. Help is plain text wrapped to the terminal: every text whole,
    flags shown without a value, each command's whole summary in the list."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        standalone_mode = kwargs.pop("standalone_mode", True)
        given = kwargs.get("args", args[0] if args else None)
        try:
            rv = super().main(*args, **{**kwargs, "standalone_mode": False})
            code = rv if isinstance(rv, int) else 0
        except _UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # `actsparse` alone: the help
                typer.echo(e.format_message())
            else:
                where = e.ctx.command_path if e.ctx is not None else "actsparse"
                hint = _flag_value_hint(e, list(sys.argv[1:] if given is None else given))
                typer.echo(f"error: {one_line(e.format_message())}{hint} (see `{where} --help`)", err=True)
            code = e.exit_code
        except _ClickException as e:
            typer.echo(f"error: {one_line(e.format_message())}", err=True)
            code = e.exit_code
        except typer.Abort:
            typer.echo("aborted", err=True)
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not ctx.resilient_parsing:
            sub = ctx.__class__(command, info_name=name, parent=ctx)
            if _asks_for_help(command, sub, rest):  # the help, whatever else the line holds
                ctx.meta[_HELP_ASKED] = True
            else:
                _refuse_repeated_options(command, sub, rest)
        return name, command, rest

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """Each command with the whole first paragraph of its help (never cut short)."""
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, " ".join(inspect.cleandoc(command.help or "").split("\n\n")[0].split())))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


#: the key of the context's meta that says the command's --help was given
_HELP_ASKED = "actsparse.help"


def _asks_for_help(command: Any, ctx: Any, args: list[str]) -> bool:
    """``args`` give the command's help option (as an option, not as another option's value)."""
    _, _, order = command.make_parser(ctx).parse_args(args=list(args))
    return any(set(getattr(param, "opts", ())) & set(ctx.help_option_names) for param in order)


def _refuse_repeated_options(command: Any, ctx: Any, args: list[str]) -> None:
    """An option that takes one value, given more than once, is a usage error
    (the parser would keep the last one silently). Repeatable options (lists)
    and flags may repeat."""
    _, _, order = command.make_parser(ctx).parse_args(args=list(args))
    seen: set[str] = set()
    for param in order:
        if not isinstance(param, TyperOption) or param.multiple or param.is_flag or param.count:
            continue
        if param.name in seen:
            flag = max(param.opts, key=len)
            raise _UsageError(f"{flag} is given more than once: it takes one value, give it once", ctx=ctx)
        seen.add(param.name)


_BOOLEAN_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def _flag_value_hint(error: Any, given: list[str]) -> str:
    """For ``--overwrite true``: that the flag takes no value (else nothing)."""
    found = re.match(r"Got unexpected extra argument(?:s|\(s\))? \((.*)\)", error.format_message())
    if error.ctx is None or not found:
        return ""
    extra = found[1].split()[0]
    flags = {opt for p in error.ctx.command.params if getattr(p, "is_flag", False) for opt in p.opts}
    for before, word in zip(given, given[1:]):
        if word == extra and before in flags and word.lower() in _BOOLEAN_WORDS:
            return f"; {before} is a flag and takes no value: give {before} alone, or leave it out"
    return ""


app = typer.Typer(
    cls=_OneLineErrors,
    name="actsparse",
    help="Calibrate activation masks on real data, bake them into a PyTorch model and export a validated ONNX model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: wrapped, never cut; help texts are not read as markup
)
# ANSI escape sequences (CSI, OSC up to BEL / ST, two-byte ones), then any other
# control character but newline and tab: file and user text never reaches the terminal raw
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|\x9b[0-?]*[ -/]*[@-~]")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """``text`` without escape sequences and control characters (newline and tab kept)."""
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


def one_line(text: str) -> str:
    """``text`` cleaned and on one line (for messages on stderr)."""
    return " ".join(clean(text).split())


class SafeConsole(Console):
    """A console that never reads markup in text and strips control characters from
    every string it renders (table cells and titles included): layer names, paths
    and file metadata are the user's text, printed as is. Styling comes from rich
    ``Text`` objects built in code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("markup", False)
        kwargs.setdefault("emoji", False)
        kwargs.setdefault("highlight", False)
        super().__init__(*args, **kwargs)

    def render_str(self, text: str, **kwargs: Any) -> Text:
        kwargs["markup"] = kwargs["emoji"] = False
        return super().render_str(clean(text), **kwargs)


stdout = SafeConsole(soft_wrap=True)
stderr = SafeConsole(stderr=True)


class _Notices(logging.Handler):
    """The library's notices (``actsparse_deploy`` log warnings, e.g. leftovers of
    killed runs removed) as plain lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        stderr.print(record.getMessage(), markup=False, highlight=False, soft_wrap=True)


logging.getLogger("actsparse_deploy").addHandler(_Notices(logging.WARNING))

F = TypeVar("F", bound=Callable[..., Any])

# --- options shared by several commands ------------------------------------------

ModelArg = Annotated[
    str,
    typer.Argument(
        help="A built-in model name (see `actsparse models`), a Hugging Face model directory (holding config.json and "
        ".safetensors weights; or hf:PATH), or package.module:factory, a callable that returns your torch.nn.Module.",
        show_default=False,
    ),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option("--weights", "-w", help="Weights for the model: .safetensors, or a .pt state dict (loaded with weights_only=True)."),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        "-d",
        help="Calibration data: a .npy/.npz/.safetensors/.pt file of inputs (batch axis first), a directory of such "
        "shards or a quoted glob ('shards/*.npy'; read in name order, batch by batch, never whole), or "
        "package.module:function returning batches. Default for built-in models: their calibration split.",
    ),
]
#: the largest --batch-size: more than any data file holds, less than any index overflows
MAX_BATCH_SIZE = 2**31 - 1
BatchSizeOpt = Annotated[
    int, typer.Option("--batch-size", "-b", min=1, max=MAX_BATCH_SIZE, help="Samples per batch when data comes from a file.")
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace output files that already exist.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for scripts).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors, and the exporter's own output.")]
HeldoutOpt = Annotated[
    str | None,
    typer.Option(
        "--heldout",
        help="Held-out data for validation and the accuracy cost (never the calibration data); same formats as --data. "
        "Default for built-in models: their held-out split.",
    ),
]
MasksOpt = Annotated[Path | None, typer.Option("--masks", "-m", help="A masks file from `actsparse calibrate`.")]
#: --mode and --exporter are choices: a value not listed is a usage error (exit 2)
Mode = enum.StrEnum("Mode", {name: name for name in MODES})  # type: ignore[misc]
Exporter = enum.StrEnum("Exporter", {name: name for name in EXPORTERS})  # type: ignore[misc]
ModeOpt = Annotated[
    Mode,
    typer.Option(
        "--mode",
        help="How masks become part of the model: mul (multiply the input by a constant), fold (into the weights, "
        "where the mask is per input feature / channel), prune (remove the masked features from this layer and, "
        "where the graph allows, from the layer producing them), auto (prune where exact, else fold, else mul).",
    ),
]
ExporterOpt = Annotated[
    Exporter,
    typer.Option("--exporter", help=f"torch.onnx exporter (default {DEFAULT_EXPORTER}: torchscript, then dynamo where it fails; see the README)."),
]
def _dynamic_axes(values: list[str] | None) -> list[str] | None:
    """Each ``--dynamic-axis`` well formed, or a usage error (exit 2) before any work."""
    from ..base.errors import ExportError, first_line
    from ..data.iospec import parse_dynamic_axis

    for value in values or ():
        try:
            parse_dynamic_axis(value)
        except (ExportError, ValueError) as e:  # ValueError: an axis int() refuses (over 4300 digits)
            raise typer.BadParameter(first_line(e)) from e
    return values


DynamicAxisOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--dynamic-axis",
        metavar="<name:axis:label>",
        callback=_dynamic_axes,
        help="NAME:AXIS:LABEL (repeatable): export this input axis as dynamic, e.g. input_ids:1:sequence. "
        "Default: the batch axis, axis 1 of integer (batch, seq) inputs, and axes whose length differs across the data.",
    ),
]
OpsetOpt = Annotated[
    int | None,
    typer.Option("--opset", help="ONNX opset (default: the exporter's, 20). Each exporter writes its own range: "
                 "torchscript 7 to 20, dynamo 14 to the newest onnx knows; auto uses the one whose range "
                 "holds it."),
]
ExternalOpt = Annotated[
    bool, typer.Option("--external-data", help="Write the weights to MODEL.onnx.data beside the model (automatic over 2 GB).")
]


def _finite(value: float) -> float:
    """A tolerance: finite (inf would pass any output), or a usage error (exit 2) before any work."""
    if not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite tolerance: it would pass any output")
    return value


def _positive(value: float | None) -> float | None:
    """A timeout: more than 0 seconds (inf: no limit), or a usage error (exit 2) before any work."""
    if value is not None and not value > 0:
        raise typer.BadParameter(f"{value:g} is not a positive number of seconds (leave it out for no limit)")
    return value


AtolOpt = Annotated[float, typer.Option("--atol", min=0.0, callback=_finite, help="Absolute tolerance, ONNX vs PyTorch.")]
RtolOpt = Annotated[
    float, typer.Option("--rtol", min=0.0, callback=_finite, help="Relative tolerance, ONNX vs PyTorch (added to atol).")
]
TimeoutOpt = Annotated[
    float | None,
    typer.Option("--timeout", min=0.0, callback=_positive,
                 help="Fail validation after this many seconds, stopping onnxruntime (default: no limit)."),
]
LabelsOpt = Annotated[
    Path | None,
    typer.Option(
        "--labels",
        help="Class labels of the --heldout samples, for your own classifier's accuracy (dense, sparse, ONNX): "
        "one integer array, same formats as --data, one label per held-out sample.",
    ),
]
# a Hugging Face model directory and its text; a factory's arguments (see loading.ModelOptions)
Task = enum.StrEnum("Task", {name: name for name in HF_TASKS})  # type: ignore[misc]
TaskOpt = Annotated[
    Task | None,
    typer.Option(
        "--task",
        metavar="<task>",
        help="What a Hugging Face model directory is loaded as: feature-extraction (last_hidden_state), sentence-embedding "
        "(mean-pooled, normalised sentence_embedding), causal-lm (logits), sequence-classification (logits). "
        "Default: from config.json's architectures.",
        show_default=False,
    ),
]
TextOpt = Annotated[
    Path | None,
    typer.Option(
        "--text",
        help="Calibration text for a Hugging Face model, made into tokens by its tokenizer: one text per line, or a .jsonl "
        "file with a \"text\" field per line (blank ones skipped). Instead of --data.",
    ),
]
HeldoutTextOpt = Annotated[
    Path | None,
    typer.Option("--heldout-text", help="Held-out text, same form as --text (never the calibration text). Instead of --heldout."),
]
MaxLengthOpt = Annotated[
    int | None,
    typer.Option("--max-length", min=1, max=MAX_LENGTH,
                 help="Tokens per text: longer texts are cut (default: the model's maximum position)."),
]
FactoryArgsOpt = Annotated[
    str | None,
    typer.Option("--factory-args", help='Keyword arguments for package.module:factory, as a JSON object, e.g. \'{"hidden": 64}\'.'),
]


def _model_options(
    task: enum.StrEnum | None = None, text: Path | None = None, heldout_text: Path | None = None,
    max_length: int | None = None, factory_args: str | None = None,
) -> Any:
    """The flags above as one ``loading.ModelOptions``."""
    from ..models.loading import ModelOptions, parse_factory_args

    return ModelOptions(task=_choice(task), factory_args=parse_factory_args(factory_args), text=_path(text),
                        heldout_text=_path(heldout_text), max_length=max_length)


def _path(value: Path | None) -> str | None:
    return str(value) if value is not None else None


# a one-rule recipe from flags (calibrate, convert): see build_recipe
LayersOpt = Annotated[
    list[str] | None, typer.Option("--layers", "-l", metavar="<glob>", help="Glob over module names to mask (repeatable), e.g. 'encoder.*.fc2'.")
]
LayerTypesOpt = Annotated[
    list[str] | None, typer.Option("--layer-type", metavar="<class>", help="Module class to mask (repeatable), e.g. Linear or Conv2d.")
]
ThresholdOpt = Annotated[
    float | None, typer.Option("--threshold", help="Zero activations whose statistic is below this value instead.")
]
AggregateOpt = Annotated[
    str | None,
    typer.Option("--aggregate", help=f"Statistic over the data, with --layers: {', '.join(BUILTIN_AGGREGATES)} (default {DEFAULT_AGGREGATE})."),
]
StructuredOpt = Annotated[
    bool, typer.Option("--structured", help="One mask value per input feature / channel (foldable into weights).")
]
#: --method and --compensate are choices too; they override the recipe for every layer
Method = enum.StrEnum("Method", {name: name for name in METHODS})  # type: ignore[misc]
Compensation = enum.StrEnum("Compensation", {name: name for name in COMPENSATIONS})  # type: ignore[misc]
#: sweep's --method: besides the methods, the recipe as it is and the topk baseline (sweep.RECIPE, sweep.BASELINE)
SweepMethod = enum.StrEnum("SweepMethod", {name: name for name in ("recipe", "topk", *METHODS)})  # type: ignore[misc]
MethodOpt = Annotated[
    Method | None,
    typer.Option(
        "--method",
        help="Choose the masked features with a method that sees the consumer's weight, for every layer of the recipe: "
        "wanda (||x_j|| * ||W[:, j]||), fluctuation (var(x_j) * ||W[:, j]||^2), obs (least reconstruction error, "
        "greedy optimal brain surgeon on the input's second moments). Default: the recipe's.",
        show_default=False,
    ),
]
CompensateOpt = Annotated[
    Compensation | None,
    typer.Option(
        "--compensate",
        help="Change the consumer's weight and bias for the features masked, for every layer of the recipe: none, "
        "bias (add the removed features' mean contribution to the bias), lstsq (ridge least-squares refit of the kept "
        "columns and the bias on the calibration data). Stored in the masks file. Default: the recipe's.",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", help="Where calibration runs: cpu or cuda (cuda:N; under torchrun: the rank's LOCAL_RANK GPU). "
                 "Statistics accumulate there in float64. Default: where the model's parameters are.", show_default=False),
]
DistTimeoutOpt = Annotated[
    float,
    typer.Option("--dist-timeout", min=0.001, help="Under torchrun (WORLD_SIZE > 1): seconds a rank waits for the others at each "
                 "exchange before it stops with an error (a rank that died or hangs), rank 0's writing included."),
]
#: seconds; actsparse_deploy.calibration.distributed.DEFAULT_TIMEOUT (not imported here: it imports torch)
DEFAULT_DIST_TIMEOUT = 1800.0
MaxSamplesOpt = Annotated[
    int | None,
    typer.Option("--max-samples", min=1, max=MAX_BATCH_SIZE,
                 help="Calibrate on the first N calibration samples only (the rest is never read). Default: all of them.",
                 show_default=False),
]
MaxCostOpt = Annotated[
    str | None,
    typer.Option(
        "--max-cost",
        help="A cost budget instead of one sparsity: cosine=0.98 (mean cosine of the last output to the dense model's), "
        "accuracy-drop=0.01, perplexity-ratio=1.05, or package.module:function=VALUE (function(dense, sparse, batches) "
        "-> cost). Sparsity is allocated per layer (sensitive layers keep more), tuned on every fifth sample of the "
        "calibration data; the held-out cost is reported. Not with --sparsity.",
        show_default=False,
    ),
]

ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        max=MAX_THREADS,
        help="Threads for torch and for onnxruntime, each (intra-op; inter-op 1), so that they do not fight over the "
        "cores. Default: OMP_NUM_THREADS where set, else the cores this process may run on less those other processes "
        "keep busy (1-minute load average), at least 1.",
        show_default=False,
    ),
]
NoLatencyOpt = Annotated[
    bool,
    typer.Option("--no-latency", help="Skip timing the dense and the converted model under onnxruntime (the report's latency)."),
]


def with_threads(fn: F) -> F:
    """Run the command at its --threads count (actsparse_deploy.base.threads.use_threads:
    torch's and every onnxruntime session's intra-op threads, one inter-op thread)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..base.threads import use_threads

        with use_threads(kwargs.get("threads")):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _check_max_cost(max_cost: str | None, sparsity: float | None, command: str) -> None:
    """--max-cost and --sparsity both given: a usage error (one line, exit 2)."""
    if max_cost is not None and sparsity is not None:
        stderr.print(f"error: give --sparsity or --max-cost, not both (--max-cost chooses the sparsity per layer) "
                     f"(see `actsparse {command} --help`)", soft_wrap=True)
        raise typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"actsparse {__version__}")
        raise typer.Exit()


#: the commands that run under torchrun: calibrate and convert share their work across the ranks, models only lists
_UNDER_TORCHRUN = ("calibrate", "convert", "models")


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """actsparse: activation sparsity from calibration to validated ONNX."""
    world = os.environ.get("WORLD_SIZE", "1")
    command = ctx.invoked_subcommand
    if command not in (None, *_UNDER_TORCHRUN) and not ctx.meta.get(_HELP_ASKED) and world.isascii() and world.isdigit() and world.lstrip("0") not in ("", "1"):
        # every rank would do the same work and write the same files
        stderr.print(f"error: {command} runs in one process, not under torchrun (WORLD_SIZE={world}): only "
                     f"{' and '.join(_UNDER_TORCHRUN[:2])} share their work across ranks; run it without torchrun", soft_wrap=True)
        raise typer.Exit(2)


def _flags(fn: Callable[..., Any]) -> dict[str, str]:
    """Parameter name -> its long flag, read from the command's typer options."""
    flags: dict[str, str] = {}
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # an annotation that does not resolve: the message stays as it is
        return flags
    for name, hint in hints.items():
        for info in getattr(hint, "__metadata__", ()):
            # in Annotated[...] form typer.Option's first name lands in ``default``
            decls = [getattr(info, "default", None), *(getattr(info, "param_decls", None) or ())]
            long = [d for d in decls if isinstance(d, str) and d.startswith("--")]
            if long:
                flags[name] = long[0]
    return flags


def as_flags(message: str, flags: dict[str, str]) -> str:
    """``message`` with the parameters it names in backticks (`` `heldout` ``)
    written as the command's flags (``--heldout``); other names stay as they are."""
    known = set(flags.values())

    def flag(m: re.Match[str]) -> str:
        dashed = "--" + m[1].replace("_", "-")  # a library parameter named like the flag (batch_size: --batch-size)
        return flags.get(m[1]) or (dashed if dashed in known else m[0])

    return re.sub(r"`([A-Za-z_][A-Za-z0-9_]*)`", flag, message)


def handle_errors(fn: F) -> F:
    """Turn library errors into a one-line message and their exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = kwargs.get("verbose", False)
        try:
            with warnings.catch_warnings():
                if not verbose:  # torch's and numpy's warnings are not this tool's one line
                    warnings.simplefilter("ignore")
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except ActsparseError as e:
            if verbose:
                traceback.print_exc(file=sys.stderr)
            stderr.print(Text.assemble(("error:", "red"), " ", one_line(as_flags(str(e), _flags(fn)))), soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("interrupted (SIGINT): no partial output was left")
            raise typer.Exit(130) from None
        except Terminated:
            stderr.print("terminated (SIGTERM): no partial output was left")
            raise typer.Exit(143) from None
        except Exception as e:  # a bug, not a user mistake: still one line unless --verbose
            _internal_error(e, verbose)
            raise typer.Exit(1) from None
        except BaseException as e:  # a Rust library's panic (pyo3's PanicException) is no Exception: the same line
            if not is_panic(e):
                raise
            _internal_error(e, verbose)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _internal_error(e: BaseException, verbose: bool) -> None:
    """The one line of an error no stage knows the cause of (a bug, a library's panic); with --verbose its traceback first."""
    if verbose:
        traceback.print_exc(file=sys.stderr)
    stderr.print(f"internal error: {type(e).__name__}: {one_line(str(e))} (run with --verbose for the traceback)", soft_wrap=True)


class StageProgress:
    """One progress line on stderr: the stage (calibrating, squashing, exporting,
    validating, measuring cost), a bar, and samples done / total where known."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("", total=None, count="")
        self.counting = False
        self.done = 0
        self.total: int | None = None

    def _count(self) -> str:
        if not self.counting:
            return ""
        return f"{self.done}/{self.total} samples" if self.total is not None else f"{self.done} samples"

    def on_stage(self, name: str, total: int | None = None) -> None:
        self.counting, self.done, self.total = name == "calibrating", 0, total
        self.progress.reset(self.task, total=total, description=name, count=self._count())
        self.progress.refresh()

    def on_batch(self, n: int) -> None:
        self.done += n
        self.progress.update(self.task, advance=n, count=self._count())


@contextlib.contextmanager
def stage_progress(quiet: bool) -> Iterator[StageProgress]:
    """A :class:`StageProgress` on stderr (a terminal only, not with --json)."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"), TimeElapsedColumn(),
        console=stderr, transient=True, disable=quiet or not stderr.is_terminal,
    ) as progress:
        yield StageProgress(progress)


def names_table(*headers: str, title: str | None = None) -> Table:
    """A table whose cells wrap (long layer names and paths fold onto more lines),
    never cut: in a narrow terminal the distinguishing end of a name stays visible."""
    return Table(*(Column(header, overflow="fold") for header in headers), title=title)


def _emit_json(data: Report | list[dict[str, Any]]) -> None:
    """A report (every command but ``models``: one schema) or a list, as JSON on stdout;
    a report without its thread count gets the command's (``--threads``)."""
    if isinstance(data, Report) and data.threads is None:
        from ..base.threads import current_threads

        data = data.replace(threads=current_threads())
    sys.stdout.write(json.dumps(data.to_json() if isinstance(data, Report) else data, indent=2) + "\n")


# --- models ----------------------------------------------------------------------


@app.command("models")
@handle_errors
def models_cmd(as_json: JsonOpt = False, verbose: VerboseOpt = False) -> None:
    """List the built-in models, with their test accuracy and built-in recipe."""
    from ..models import zoo

    rows: list[dict[str, Any]] = []
    for name in zoo.builtin_names():
        entry = zoo.get_builtin(name)
        weights = zoo.builtin_weights_path(name)
        meta = zoo.builtin_metadata(name) if weights is not None and weights.is_file() else {}
        rows.append(
            {
                "name": name,
                "description": entry.description,
                "task": entry.task,
                "test_accuracy": float(meta["test_accuracy"]) if "test_accuracy" in meta else None,
                "heldout_perplexity": float(meta["heldout_perplexity"]) if "heldout_perplexity" in meta else None,
                "weights": str(weights) if weights is not None else None,
                "recipe": str(zoo.builtin_recipe_path(name)),
            }
        )
    if as_json:
        _emit_json(rows)
        return
    table = names_table("name", "description", "test accuracy", "recipe")
    for row in rows:
        acc = f"{row['test_accuracy']:.4f}" if row["test_accuracy"] is not None else "-"
        table.add_row(row["name"], row["description"], acc, row["recipe"])
    stdout.print(table)


# --- calibrate -------------------------------------------------------------------


def build_recipe(
    model_name: str,
    builtin: bool,
    recipe: Recipe | Path | None,
    layers: list[str] | None,
    layer_types: list[str] | None,
    sparsity: float | None,
    threshold: float | None,
    aggregate: str | None,
    structured: bool,
    method: str | None = None,
    compensate: str | None = None,
) -> Recipe:
    """The recipe the flags describe: a file, a one-rule recipe from flags, or
    the built-in model's own (with --sparsity, --method and --compensate applied
    to it); see :func:`actsparse_deploy.calibration.recipe.resolve_recipe`."""
    from ..calibration.recipe import resolve_recipe
    from ..models.zoo import builtin_recipe_path

    return resolve_recipe(
        model_name, builtin_recipe_path(model_name) if builtin else None, recipe, layers=layers, layer_types=layer_types,
        sparsity=sparsity, threshold=threshold, aggregate=aggregate, structured=structured, method=method, compensate=compensate,
    )


def _choice(value: enum.StrEnum | None) -> str | None:
    """A choice option's plain name (None where not given)."""
    return str(value) if value is not None else None


def _print_notes(notes: list[str]) -> None:
    """What is worth knowing but not an error (a layer masked whole), one line each on stderr."""
    for note in notes:
        stderr.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)


def _print_masks_table(report: Report, title: str) -> None:
    table = names_table("layer", "input shape", "mask shape", "sparsity", title=title)
    for row in report.layers or []:
        input_shape = "x".join(str(n) if isinstance(n, int) else f"<{n}>" for n in row["input_shape"]) if row["input_shape"] else "?"
        shape = row["mask_shape"]
        shape_text = "x".join(map(str, shape)) if shape and isinstance(shape[0], int) else f"{len(shape)} features"
        table.add_row(row["layer"], input_shape, shape_text or "scalar", f"{row['sparsity']:.1%}")
    stdout.print(table)


@app.command("calibrate")
@handle_errors
@with_threads
def calibrate_cmd(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the masks (.safetensors).")],
    weights: WeightsOpt = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", "-r", help="A recipe TOML file (which layers, which functions, how sparse).")
    ] = None,
    layers: LayersOpt = None,
    layer_types: LayerTypesOpt = None,
    sparsity: Annotated[
        float | None,
        typer.Option(
            "--sparsity", "-s", min=0.0, max=1.0, help="Fraction of activations to zero (topk). On a built-in model alone: overrides its recipe."
        ),
    ] = None,
    threshold: ThresholdOpt = None,
    aggregate: AggregateOpt = None,
    structured: StructuredOpt = False,
    method: MethodOpt = None,
    compensate: CompensateOpt = None,
    max_cost: MaxCostOpt = None,
    data: DataOpt = None,
    max_samples: MaxSamplesOpt = None,
    text: TextOpt = None,
    task: TaskOpt = None,
    max_length: MaxLengthOpt = None,
    factory_args: FactoryArgsOpt = None,
    batch: BatchSizeOpt = 32,
    stats_only: Annotated[
        bool,
        typer.Option("--stats-only", help="Write the collected statistics (for `actsparse merge` and `actsparse select`) instead of masks."),
    ] = False,
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
    from ..calibration.distributed import check_budget_device, launched, resolve_device

    _check_max_cost(max_cost, sparsity, "calibrate")
    check_budget_device(max_cost, device)
    where = resolve_device(device)  # --device cuda without CUDA: exit 2 before any work
    with launched(where, dist_timeout, command) as session:
        _calibrate(model, output, weights, recipe, layers, layer_types, sparsity, threshold, aggregate, structured, method,
                   compensate, max_cost, data, max_samples, text, task, max_length, factory_args, batch, stats_only,
                   where if device is not None else None, session, overwrite, as_json)


def _calibrate(
    model: str, output: Path, weights: Path | None, recipe: Path | None, layers: list[str] | None, layer_types: list[str] | None,
    sparsity: float | None, threshold: float | None, aggregate: str | None, structured: bool, method: Any, compensate: Any,
    max_cost: str | None, data: str | None, max_samples: int | None, text: Path | None, task: Any, max_length: int | None,
    factory_args: str | None, batch: int, stats_only: bool, device: Any, session: Any, overwrite: bool, as_json: bool,
) -> None:
    """calibrate_cmd's body, on every rank of a distributed run (rank 0 prints and writes)."""
    from ..models.loading import load_model
    from .commands import calibrate_to_file

    if max_cost is not None:
        from .budget import check_budget

        check_budget(max_cost)  # a malformed budget fails before the model loads
        if layers or layer_types:
            sparsity = 0.0  # a one-rule recipe needs a level: the search sets it per layer
    writer = session is None or session.writer
    if writer:
        check_output_path(output, overwrite)
    model_options = _model_options(task, text, None, max_length, factory_args)
    loaded = load_model(model, weights, model_options, device=device)
    base: Recipe | Path | None = recipe
    if recipe is None and not (layers or layer_types) and loaded.hf is not None:  # a Hugging Face model: its MLPs' default
        from ..models.hf import default_recipe

        base = default_recipe(loaded.module)
    the_recipe = build_recipe(
        model, loaded.builtin, base, layers, layer_types, sparsity, threshold, aggregate, structured, _choice(method),
        _choice(compensate),
    )
    with stage_progress(quiet=as_json or not writer) as progress:
        report = calibrate_to_file(
            loaded, the_recipe, output, data=data, batch_size=batch, on_stage=progress.on_stage, on_batch=progress.on_batch,
            max_cost=max_cost, model_options=model_options, max_samples=max_samples, stats_only=stats_only, group=session,
        )
    if report is None:  # another rank than 0: rank 0 prints
        return
    if as_json:
        _emit_json(report)
        return
    if stats_only:
        _print_stats(report, output)
        _print_notes(report.notes)
        return
    _print_masks_table(report, f"{model}: {report.calibration.samples if report.calibration else '?'} calibration samples")
    stdout.print(f"overall sparsity {report.overall_sparsity or 0:.1%}; masks written to {output}")
    _print_budget(report)
    _print_notes(report.notes)


def _print_stats(report: Report, output: Path) -> None:
    samples = report.calibration.samples if report.calibration else 0
    table = names_table("layer", "statistic", "shape", "samples", title=f"{report.model or 'model'}: statistics of {samples} samples")
    for row in report.layers or []:
        table.add_row(row["layer"], str(row["aggregate"]), "x".join(map(str, row["stat_shape"])), str(row["samples"]))
    stdout.print(table)
    parts = report.extra.get("parts")
    stdout.print(f"{'merged ' + str(parts) + ' parts; ' if parts else ''}statistics written to {output}")


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
    if as_json:
        _emit_json(report)
        return
    _print_stats(report, output)


@app.command("select")
@handle_errors
@with_threads
def select_cmd(
    stats: Annotated[Path, typer.Argument(help="A statistics file (`calibrate --stats-only`, `merge`).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the masks (.safetensors).")],
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
    if as_json:
        _emit_json(report)
        return
    _print_masks_table(report, f"{report.model or stats}: {report.calibration.samples if report.calibration else '?'} calibration samples")
    stdout.print(f"overall sparsity {report.overall_sparsity or 0:.1%}; masks written to {output}")
    _print_notes(report.notes)


# --- squash / export / validate / convert / inspect ----------------------------------


def _print_modes(rows: list[dict[str, Any]], title: str) -> None:
    table = names_table("layer", "sparsity", "mode", "why", title=title)
    for row in rows:
        table.add_row(row["layer"], f"{row['sparsity']:.1%}", row["mode"], row["reason"])
    stdout.print(table)


def figure(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, a large one written out whole
    (12346, never 1.23e+04); a very small one keeps its exponent (9.54e-06)."""
    if abs(value) >= 10**digits - 0.5:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def milliseconds(value: float) -> str:
    """A duration in milliseconds as a person reads it: ``41.2 ms``, ``1.09 s``."""
    if value < 999.5:
        return f"{value:.3g} ms"
    return f"{figure(value / 1000)} s"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


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
    if as_json:
        _emit_json(report)
        return
    _print_modes(report.layers or [], f"{model}: squashed ({mode})")
    stdout.print(f"torch.export program written to {output}")


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
        external_data=external_data, overwrite=overwrite, verbose=verbose, dynamic_axes=tuple(dynamic_axis or ()),
    )
    if as_json:
        _emit_json(report)
        return
    if report.layers:
        _print_modes(report.layers, f"{source}: squashed")
    result = report.export
    assert result is not None  # export_source always exports
    stdout.print(
        f"{result.exporter} export, opset {result.opset}, {result.seconds:.2f} s: {output} ({_size(result.size_bytes)}"
        + (", external data)" if result.external_data else ")")
    )


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
    task: TaskOpt = None,
    max_length: MaxLengthOpt = None,
    factory_args: FactoryArgsOpt = None,
    batch: BatchSizeOpt = 32,
    atol: AtolOpt = DEFAULT_ATOL,
    rtol: RtolOpt = DEFAULT_RTOL,
    timeout: TimeoutOpt = None,
    labels: LabelsOpt = None,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the ONNX model under onnxruntime and the PyTorch model on held-out inputs, at several batch sizes.

    Checks input names, ranks, dtypes and fixed dimensions, then output names,
    shapes and values; a NaN or Inf, or any output over tolerance, fails with a
    non-zero exit code. With a model and --masks, also reports what
    sparsification cost (dense vs sparse outputs, accuracy for classifiers).
    """
    from .commands import SourceOptions, validate_against

    options = SourceOptions(masks=masks, mode=str(mode), weights=weights, heldout=heldout,
                            batch_size=batch if heldout or heldout_text else None, labels=labels,
                            model=_model_options(task, None, heldout_text, max_length, factory_args))
    report = validate_against(onnx_model, reference, options, atol=atol, rtol=rtol, timeout=timeout)
    if as_json:
        _emit_json(report)
        return
    validation = report.validation
    assert validation is not None  # validate_against raises unless it passed
    title = f"{onnx_model} vs {reference}: PASSED"
    if rtol == 0:  # the verdict is max abs diff <= atol: show that, not a relative figure it never used
        table = names_table("output", "max abs diff", "tolerance", title=title)
        for diff in validation.outputs:
            table.add_row(diff["output"], f"{diff['max_abs_diff']:.2e}", f"<= atol {atol:.2e}")
    else:  # per value |diff| <= atol + rtol * |PyTorch|: the worst ratio is the verdict's figure
        table = names_table("output", "max abs diff", "max rel diff", "worst diff / tolerance", title=title)
        for diff in validation.outputs:
            table.add_row(
                diff["output"], f"{diff['max_abs_diff']:.2e}", f"{diff['max_rel_diff']:.2e}", f"{diff['max_tolerance_used']:.3g} <= 1"
            )
    stdout.print(table)
    stdout.print(
        f"{validation.samples} held-out samples at batch sizes {validation.batch_sizes}; "
        f"passes where |ONNX - PyTorch| <= atol {atol:g} + rtol {rtol:g} * |PyTorch| for every value"
    )
    if report.cost is not None:
        _print_cost(report)


def _print_cost(report: Report) -> None:
    cost = report.cost
    if cost is None:
        return
    for row in cost.outputs:
        stdout.print(
            f"sparsification cost, {row['output']}: cosine to dense mean {row['cosine_mean']:.4f} "
            f"(worst {row['cosine_min']:.4f}), max abs diff {figure(row['max_abs_diff'])}"
        )
    other = cost.extra.get("other_text") or {}
    for row in other.get("outputs", []):
        stdout.print(
            f"other text ({other['samples']} samples), {row['output']}: cosine to dense mean {row['cosine_mean']:.4f} "
            f"(worst {row['cosine_min']:.4f})"
        )
    if cost.accuracy_dense is not None:
        stdout.print(
            f"accuracy dense {cost.accuracy_dense:.4f} -> sparse {cost.accuracy_sparse:.4f}"
            + (f" (ONNX {cost.accuracy_onnx:.4f})" if cost.accuracy_onnx is not None else "")
        )
    ppl = cost.extra
    if ppl.get("perplexity_dense") is not None:
        stdout.print(
            f"held-out perplexity dense {ppl['perplexity_dense']:.3f} -> sparse {ppl['perplexity_sparse']:.3f} "
            f"(x{ppl['perplexity_sparse'] / ppl['perplexity_dense']:.3f})"
            + (f" (ONNX {ppl['perplexity_onnx']:.3f})" if ppl.get("perplexity_onnx") is not None else "")
        )


@app.command("convert")
@handle_errors
@with_threads
def convert_cmd(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for masks.safetensors, model.onnx and report.json.")],
    weights: WeightsOpt = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", "-r", help="A recipe TOML file (default: the built-in model's).")] = None,
    sparsity: Annotated[
        float | None,
        typer.Option("--sparsity", "-s", min=0.0, max=1.0, help="Override the recipe's sparsity_level everywhere; with --layers: the fraction to zero."),
    ] = None,
    layers: LayersOpt = None,
    layer_types: LayerTypesOpt = None,
    threshold: ThresholdOpt = None,
    aggregate: AggregateOpt = None,
    structured: StructuredOpt = False,
    method: MethodOpt = None,
    compensate: CompensateOpt = None,
    max_cost: MaxCostOpt = None,
    data: DataOpt = None,
    max_samples: MaxSamplesOpt = None,
    heldout: HeldoutOpt = None,
    text: TextOpt = None,
    heldout_text: HeldoutTextOpt = None,
    task: TaskOpt = None,
    max_length: MaxLengthOpt = None,
    factory_args: FactoryArgsOpt = None,
    labels: LabelsOpt = None,
    batch: Annotated[
        int | None,
        typer.Option("--batch-size", "-b", min=1, max=MAX_BATCH_SIZE, help="Samples per batch (default: the built-in model's, else 32)."),
    ] = None,
    mode: ModeOpt = Mode(DEFAULT_MODE),
    exporter: ExporterOpt = Exporter(DEFAULT_EXPORTER),
    dynamic_axis: DynamicAxisOpt = None,
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
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Calibrate, squash, export and validate in one go.

    Writes OUTDIR/masks.safetensors, OUTDIR/model.onnx and OUTDIR/report.json, and
    prints a summary: layers, sparsity, squash mode, ONNX max diff, the accuracy
    (or cosine) cost, file sizes.
    """
    command = ("convert", dict(locals()))  # as parsed: every rank of a distributed run must run the same
    from ..calibration.distributed import check_budget_device, launched, resolve_device
    from .pipeline import convert

    _check_max_cost(max_cost, sparsity, "convert")
    check_budget_device(max_cost, device)
    where = resolve_device(device)  # --device cuda without CUDA: exit 2 before any work
    model_options = _model_options(task, text, heldout_text, max_length, factory_args)
    if max_cost is not None and (layers or layer_types):
        sparsity = 0.0  # a one-rule recipe needs a level: the search sets it per layer
    the_recipe: Recipe | Path | None = recipe
    if layers or layer_types or threshold is not None or aggregate is not None or structured:
        the_recipe = build_recipe(model, ":" not in model, recipe, layers, layer_types, sparsity, threshold, aggregate, structured)
        sparsity = None  # already in the one-rule recipe (--method and --compensate are applied by convert)
    with launched(where, dist_timeout, command) as session, stage_progress(quiet=as_json or not (session is None or session.writer)) as progress:
        report = convert(
            model, output, weights=weights, recipe=the_recipe, sparsity=sparsity, data=data, heldout=heldout,
            batch_size=batch, mode=str(mode), exporter=str(exporter), opset=opset, external_data=external_data, atol=atol,
            rtol=rtol, overwrite=overwrite, verbose=verbose, on_batch=progress.on_batch, on_stage=progress.on_stage,
            labels=labels, timeout=timeout, method=_choice(method), compensate=_choice(compensate), max_cost=max_cost,
            task=model_options.task, text=model_options.text, heldout_text=model_options.heldout_text,
            max_length=model_options.max_length, factory_args=model_options.factory_args, dynamic_axes=tuple(dynamic_axis or ()),
            threads=threads, latency=not no_latency, max_samples=max_samples, device=device, group=session,
        )
    if report is None:  # another rank than 0 of a distributed run: rank 0 prints
        return
    if as_json:
        _emit_json(report)
        return
    print_convert_summary(report)


def _print_budget(report: Report) -> None:
    """The levels a --max-cost search chose per layer, its tuning and held-out cost, and whether it kept the budget."""
    budget = report.extra.get("budget")
    if not budget:
        return
    table = names_table("layer", "level", title=f"budget {budget['budget']}: levels chosen per layer")
    for name, level in budget["levels"].items():
        table.add_row(name, f"{level:.1%}")
    stdout.print(table)
    stdout.print(
        f"budget {budget['budget']}: overall sparsity {budget['overall_sparsity']:.1%} (uniform start {budget['uniform_level']:.1%}), "
        f"cost {figure(budget['tuning_cost'], 4)} on the tuning split ({budget['tuning_samples']} calibration samples, "
        f"{budget['evaluations']} allocations measured)"
    )
    if budget.get("heldout_cost") is None:
        stdout.print(f"budget {budget['budget']}: {budget.get('heldout_note', 'held-out cost not measured')}")
    elif budget["heldout_within"]:
        stdout.print(f"budget {budget['budget']}: held-out cost {figure(budget['heldout_cost'], 4)}: within the budget")
    else:
        stdout.print(f"budget {budget['budget']}: held-out cost {figure(budget['heldout_cost'], 4)}: MISSED, the held-out "
                     "data exceeds the budget")


def print_convert_summary(report: Report) -> None:
    samples = report.calibration.samples if report.calibration else "?"
    _print_modes(report.layers or [], f"{report.model}: {samples} calibration samples")
    validation, export = report.validation, report.export
    if validation is not None and export is not None:
        stdout.print(
            f"ONNX ({export.exporter}, opset {export.opset}) vs PyTorch: max abs diff "
            f"{validation.max_abs_diff:.2e} <= {validation.atol:g} at batch sizes {validation.batch_sizes}"
            + "".join(f", {label} lengths {lengths}" for label, lengths in validation.extra.get("sequence_lengths", {}).items())
            + ": PASSED"
        )
        if export.extra.get("fallback"):
            stdout.print(f"exporter {export.extra.get('requested_exporter')}: {export.extra['fallback']}; exported with {export.exporter}")
    _print_cost(report)
    _print_budget(report)
    latency = report.latency
    if latency is not None:
        stdout.print(
            f"onnxruntime latency ({latency.threads} thread{'s' if latency.threads != 1 else ''}, median of {latency.runs} "
            f"passes over {latency.samples} held-out samples): dense {milliseconds(latency.dense_ms)}, converted "
            f"{milliseconds(latency.sparse_ms)}: {latency.verdict}"
        )
    _print_notes(report.notes)
    files = ", ".join(f"{name} {_size(size)}" for name, size in (report.files or {}).items())
    threads = f", {report.threads} thread{'s' if report.threads != 1 else ''}" if report.threads is not None else ""
    stdout.print(f"files: {files}; {(report.seconds or {}).get('total', 0.0):.1f} s in all{threads}")


@app.command("sweep")
@handle_errors
@with_threads
def sweep_cmd(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for sweep.json and sweep.png.")],
    sparsity: Annotated[
        str, typer.Option("--sparsity", "-s", help="Levels: START:STOP:STEP (inclusive) or a list, e.g. 0.1:0.8:0.1 or 0.25,0.5.")
    ] = "0.1:0.8:0.1",
    method: Annotated[
        list[SweepMethod] | None,
        typer.Option(
            "--method",
            metavar="<method>",
            help="A method to sweep (repeatable): recipe (the model's recipe as it is), topk (activation top-k baseline), "
            "or a selection method (wanda, fluctuation, obs). Default: recipe and topk.",
        ),
    ] = None,
    compensate: CompensateOpt = None,
    weights: WeightsOpt = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", "-r", help="A recipe TOML file (default: the built-in model's).")] = None,
    data: DataOpt = None,
    heldout: HeldoutOpt = None,
    batch: Annotated[
        int | None,
        typer.Option("--batch-size", "-b", min=1, max=MAX_BATCH_SIZE, help="Samples per batch (default: the built-in model's, else 32)."),
    ] = None,
    runs: Annotated[
        int, typer.Option("--runs", min=1, max=MAX_RUNS, help="Timed onnxruntime runs per model (median; after warm-up).")
    ] = 15,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """For each sparsity level and method: held-out cost and onnxruntime latency of the pruned model (auto squash).

    Prints a table and writes OUTDIR/sweep.json and OUTDIR/sweep.png (cost against
    sparsity per method, latency ratio to dense on a second axis).
    """
    from .sweep import parse_levels, sweep

    levels = parse_levels(sparsity)
    with stage_progress(quiet=as_json) as progress:
        result = sweep(
            model, output, levels=levels, methods=[str(m) for m in method or ()], compensate=_choice(compensate), recipe=recipe, weights=weights,
            data=data, heldout=heldout, batch_size=batch, runs=runs, overwrite=overwrite,
            on_step=lambda what: progress.on_stage(what),
        )
    if as_json:
        _emit_json([result])
        return
    table = names_table("method", "level", "overall sparsity", "cosine mean / worst", "accuracy", "latency / dense",
                        title=f"{result['model']}: held-out cost and onnxruntime latency ({result['latency']['threads']} thread)")
    for row in result["rows"]:
        accuracy = f"{row['accuracy_sparse']:.4f} (dense {row['accuracy_dense']:.4f})" if "accuracy_sparse" in row else "-"
        table.add_row(row["method"], f"{row['level']:.1%}", f"{row['overall_sparsity']:.1%}",
                      f"{row['cosine_mean']:.4f} / {row['cosine_min']:.4f}", accuracy, f"{row['latency_ratio']:.3f}x")
    stdout.print(table)
    stdout.print(f"written: {output / 'sweep.json'}, {output / 'sweep.png'}")


def _print_onnx(target: str, report: Report) -> None:
    """``inspect MODEL.onnx``: inputs and outputs, operators, initializers, external data files, squash rows."""
    assert report.export is not None
    found = report.export.extra
    opsets = ", ".join(f"{domain} {version}" for domain, version in found["opsets"].items())
    table = names_table("", "name", "dtype", "shape",
                        title=f"{target}: ONNX model ({opsets}; {found['nodes']} nodes, {found['initializers']} initializers, "
                              f"{found['parameters']:,} parameters, {found['initializer_bytes'] / 1e6:,.1f} MB)")
    for side in ("input", "output"):
        for value in found[f"{side}_shapes"]:
            shape = "?" if value["shape"] is None else "x".join("?" if d is None else str(d) for d in value["shape"])
            table.add_row(side, value["name"], str(value["dtype"]), shape)
    stdout.print(table)
    stdout.print("operators: " + ", ".join(f"{op} {n}" for op, n in found["ops"].items()), markup=False)
    for data in found["data_files"]:
        size = f"{data['bytes'] / 1e6:,.1f} MB" if data["present"] else "missing or not a regular file"
        stdout.print(f"external data: {data['location']} ({data['tensors']} tensors, {size})", markup=False)
    if report.layers:
        layers = names_table("layer", "mode", "sparsity", title=f"squashed layers (mode {report.squash_mode})")
        for row in report.layers:
            sparsity = row.get("sparsity")
            layers.add_row(str(row.get("layer")), str(row.get("mode")), f"{sparsity:.1%}" if isinstance(sparsity, (int, float)) else "-")
        stdout.print(layers)


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
        _print_masks_table(report, title)
        if report.recipe is not None:
            from ..calibration.recipe import Recipe

            stdout.print(Recipe.from_dict(report.recipe).dumps().rstrip(), markup=False)
        _print_notes(report.notes)
        return
    if report.export is not None:  # an ONNX file: its graph (its external data is never read)
        _print_onnx(target, report)
        return
    table = names_table("layer", "type", "input shape", "fold", title=f"{target}: layers that can take a mask")
    for row in report.layers or []:
        table.add_row(row["layer"], row["type"], "x".join(map(str, row["input_shape"])), "yes" if row["foldable"] else "no")
    stdout.print(table)
    _print_notes(report.notes)  # how the model was loaded (a Hugging Face model's task, inferred)


def _interrupt(signum: int, frame: Any) -> None:
    """The first SIGINT / SIGTERM stops the command (KeyboardInterrupt / Terminated,
    so every clean-up runs); any later one is ignored, so that clean-up runs to its
    end and the message stays one line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated()


def quiet_cpp_log(environ: typing.MutableMapping[str, str]) -> None:
    """Under torchrun (``WORLD_SIZE`` > 1), c10d's C++ log off unless the user set
    ``TORCH_CPP_LOG_LEVEL``: it writes to fd 2 (dozens of lines for one failed
    connection) and torch reads the level once, when it loads. Every failure is
    still this tool's one line."""
    if environ.get("WORLD_SIZE", "1").strip() not in ("", "1"):
        environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")


def main() -> None:
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    if "torch" not in sys.modules:  # read once, as torch loads
        quiet_cpp_log(os.environ)
    code = _run_app()
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "1"):
        sys.exit(code)
    # Under torchrun: once the ranks' last exchange is over (every output written,
    # or every rank told of the failure), end without the interpreter's teardown.
    # There gloo's and the TCP store's threads are destroyed after the other rank
    # may have gone, which can abort this rank (SIGABRT, "terminate called without
    # an active exception") and make torchrun report a finished job as failed.
    # A signal now (torchrun stopping the job) changes nothing: the code stands.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _run_app() -> int:
    """The app's exit code. What escapes the commands' handlers (a signal or a bug
    while the command line is parsed, ``sys.exit("text")``) is one line on
    stderr and its code too, as :func:`handle_errors` gives them."""
    try:
        app()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        stderr.print(one_line(str(e.code)), soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        stderr.print("interrupted (SIGINT): no partial output was left")
        return 130
    except Terminated:
        stderr.print("terminated (SIGTERM): no partial output was left")
        return 143
    except BaseException as e:  # a bug or a Rust library's panic outside a command's handler: still one line
        if not (isinstance(e, Exception) or is_panic(e)):
            raise
        stderr.print(f"internal error: {type(e).__name__}: {one_line(str(e))}", soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    main()
