"""The command line's options: ``Annotated`` typer types, each defined once and
shared by the commands that take it, and what turns their values into the
library's (:func:`model_options`, :func:`choice`). A value typer refuses (a
choice not listed, a malformed ``--dynamic-axis``, an infinite tolerance) is a
usage error, exit 2, before any work.

    >>> choice(Mode("fold")), choice(None), sorted(m.value for m in Mode)
    ('fold', None, ['auto', 'fold', 'mul', 'prune'])

This module imports nothing heavy (no torch): ``--help`` reads it.
"""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from ..base.constants import (
    BUILTIN_AGGREGATES,
    COMPENSATIONS,
    DEFAULT_AGGREGATE,
    DEFAULT_EXPORTER,
    EXPORT_DTYPES,
    EXPORTERS,
    HF_TASKS,
    MAX_LENGTH,
    METHODS,
    MODES,
)
from ..base.threads import MAX_THREADS
from .render import stderr

__all__ = [
    "DEFAULT_DIST_TIMEOUT",
    "MAX_BATCH_SIZE",
    "AggregateOpt",
    "AtolOpt",
    "CalibrateSparsityOpt",
    "BatchSizeOpt",
    "CompensateOpt",
    "Compensation",
    "DataOpt",
    "DeviceOpt",
    "DistTimeoutOpt",
    "DynamicAxisOpt",
    "Dtype",
    "DtypeOpt",
    "MaxMemoryOpt",
    "Exporter",
    "ExporterOpt",
    "ExternalOpt",
    "FactoryArgsOpt",
    "HeldoutOpt",
    "HeldoutTextOpt",
    "MaxCostOtherOpt",
    "HeadsOpt",
    "RecoverOpt",
    "OtherTextOpt",
    "JsonOpt",
    "LabelsOpt",
    "LayerTypesOpt",
    "LayersOpt",
    "MasksOpt",
    "MasksOutputOpt",
    "MaxCostOpt",
    "QuantizedMaxCostOpt",
    "MaxLengthOpt",
    "MaxSamplesOpt",
    "Method",
    "MethodOpt",
    "Mode",
    "ModeOpt",
    "ModelArg",
    "NoLatencyOpt",
    "CacheOpt",
    "QuantizeOpt",
    "SmoothOpt",
    "OpsetOpt",
    "OverwriteOpt",
    "RecipeFileOpt",
    "RtolOpt",
    "StatsOnlyOpt",
    "StructuredOpt",
    "SweepMethod",
    "SweepMethodsOpt",
    "Task",
    "TaskOpt",
    "TextOpt",
    "ThreadsOpt",
    "ThresholdOpt",
    "TimeoutOpt",
    "VerboseOpt",
    "WeightsOpt",
    "check_max_cost",
    "choice",
    "model_options",
]

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
                 help="Fail validation (and an int8 model's budget check) after this many seconds, stopping onnxruntime (default: no limit)."),
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
        "(last_hidden_state, then its mean-pooled, normalised sentence_embedding), causal-lm (logits), sequence-classification (logits). "
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
OtherTextOpt = Annotated[
    Path | None,
    typer.Option("--other-text", help="Text from another source than the calibration and held-out text, same form as --text: "
                 "the cost on it is reported beside the held-out cost (any text model; the built-in ones have their own)."),
]
MaxCostOtherOpt = Annotated[
    bool,
    typer.Option("--max-cost-other", help="With --max-cost: hold the budget on the other text too (the worse of the two)."),
]
HeadsOpt = Annotated[
    bool,
    typer.Option("--heads", help="Prune attention heads too: the attention output projections' inputs, whole heads "
                 "(query, key and value rows with them; grouped-query attention: whole key/value groups), by the recipe's method."),
]
RecoverOpt = Annotated[
    bool,
    typer.Option("--recover", help="After selection, train the masked layers' weights and biases a few epochs towards the dense "
                 "model's outputs on the calibration data (slower; the masks file keeps the result)."),
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
#: sweep's --method, repeatable
SweepMethodsOpt = Annotated[
    list[SweepMethod] | None,  # type: ignore[valid-type]
    typer.Option(
        "--method",
        metavar="<method>",
        help="A method to sweep (repeatable): recipe (the model's recipe as it is), topk (activation top-k baseline), "
        "or a selection method (wanda, fluctuation, obs). Default: recipe and topk (with --heads: recipe).",
    ),
]
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
QuantizedMaxCostOpt = Annotated[
    str | None,
    typer.Option(
        "--max-cost",
        help="For a quantized (int8) ONNX model, which cannot match PyTorch within a tolerance: the cost budget it must keep "
        "against the dense model on the held-out data, as convert --quantize holds it (cosine=0.99, accuracy-drop=0.01, "
        "perplexity-ratio=1.03); over it: exit 10.",
        show_default=False,
    ),
]

MaxMemoryOpt = Annotated[
    str | None,
    typer.Option("--max-memory", metavar="<amount>", show_default=False,
                 help="The memory the command may take, e.g. 8GB (default: what the machine has free). Over it: exit 13 before any "
                 "work; convert: where two onnxruntime sessions side by side would be, the latency check times one after the other; "
                 "calibrate: a Hugging Face model whose weights are over it is calibrated block by block."),
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
# calibrate's and select's own
MasksOutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Where to write the masks (.safetensors).")]
RecipeFileOpt = Annotated[
    Path | None, typer.Option("--recipe", "-r", help="A recipe TOML file (which layers, which functions, how sparse).")
]
CalibrateSparsityOpt = Annotated[
    float | None,
    typer.Option(
        "--sparsity", "-s", min=0.0, max=1.0, help="Fraction of activations to zero (topk). On a built-in model alone: overrides its recipe."
    ),
]
StatsOnlyOpt = Annotated[
    bool,
    typer.Option("--stats-only", help="Write the collected statistics (for `actsparse merge` and `actsparse select`) instead of masks."),
]
QuantizeOpt = Annotated[
    str,
    typer.Option("--quantize", help="After validation, quantize the ONNX model with onnxruntime: none, int8 (dynamic, "
                 "per-channel int8 weights), int8-static (activation ranges from the calibration data) or auto (int8 where "
                 "--max-cost has room for it; without --max-cost, int8).", show_default=False),
]
SmoothOpt = Annotated[
    bool,
    typer.Option("--smooth/--no-smooth", help="With --quantize: before export, move part of each matrix product's input range "
                 "into its weight (SmoothQuant; the strength chosen per layer on the calibration data) where that lowers its int8 error."),
]
Dtype = enum.StrEnum("Dtype", {name: name for name in EXPORT_DTYPES})  # type: ignore[misc]
DtypeOpt = Annotated[
    Dtype,
    typer.Option("--dtype", help="The weights' dtype in the ONNX model: auto (float16 where the model's weights are bfloat16 "
                 "or float16, else as they are), float32, or float16 (half the size; validated at float16's tolerance)."),
]
CacheOpt = Annotated[
    bool | None,
    typer.Option("--cache/--no-cache", help="A causal language model as a decoder with a KV cache, as Optimum exports it "
                 "(default: every causal language model); --no-cache: one full pass per call.", show_default=False),
]
NoLatencyOpt = Annotated[
    bool,
    typer.Option("--no-latency", help="Skip timing the dense and the converted model under onnxruntime (the report's latency)."),
]


def choice(value: enum.StrEnum | None) -> str | None:
    """A choice option's plain name (None where not given)."""
    return str(value) if value is not None else None


def _path(value: Path | None) -> str | None:
    return str(value) if value is not None else None


def model_options(
    task: enum.StrEnum | None = None, text: Path | None = None, heldout_text: Path | None = None,
    max_length: int | None = None, factory_args: str | None = None, other_text: Path | None = None,
) -> Any:
    """--task, --text, --heldout-text, --max-length, --factory-args and --other-text as one ``loading.ModelOptions``."""
    from ..models.loading import ModelOptions, parse_factory_args

    return ModelOptions(task=choice(task), factory_args=parse_factory_args(factory_args), text=_path(text),
                        heldout_text=_path(heldout_text), max_length=max_length, other_text=_path(other_text))


def check_max_cost(max_cost: str | None, sparsity: float | None, command: str) -> None:
    """--max-cost and --sparsity both given: a usage error (one line, exit 2)."""
    if max_cost is not None and sparsity is not None:
        stderr.print(f"error: give --sparsity or --max-cost, not both (--max-cost chooses the sparsity per layer) "
                     f"(see `actsparse {command} --help`)", soft_wrap=True)
        raise typer.Exit(2)
