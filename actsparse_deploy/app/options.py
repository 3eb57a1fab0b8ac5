"""What ``convert`` takes, one frozen group per stage, each checked once (in its ``__post_init__``).

:class:`ConvertOptions` holds ``load`` (:class:`LoadOptions`: the model's weights and
data, with the :class:`~actsparse_deploy.models.loading.ModelOptions` of a Hugging Face
model or a factory), ``calibrate`` (:class:`CalibrateOptions`), ``squash``
(:class:`SquashOptions`), ``export`` (:class:`ExportOptions`) and ``validate``
(:class:`ValidateOptions`), each taken by its stage, and what the run as a whole
takes (``overwrite``, ``threads``, ``latency``, ``on_stage``). Flat keywords (those
of :func:`~actsparse_deploy.app.pipeline.convert`) go to their group.

    >>> from actsparse_deploy.app.options import ConvertOptions, SquashOptions, ValidateOptions
    >>> options = ConvertOptions(mode="fold", atol=1e-4)
    >>> options.squash == SquashOptions("fold"), options.validate.atol, options.export.exporter
    (True, 0.0001, 'auto')
    >>> ValidateOptions(atol=-1.0)
    Traceback (most recent call last):
    ...
    actsparse_deploy.base.errors.ValidationError: tolerances must be non-negative numbers, finite (atol -1.0, rtol 0.0)
    >>> options.calibrate.recipe
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base.constants import COMPENSATIONS, DEFAULT_ATOL, DEFAULT_EXPORTER, DEFAULT_MODE, DEFAULT_RTOL, EXPORT_DTYPES, EXPORTERS, MODES
from ..base.errors import DataError, ExportError, RecipeError, SquashError, UsageError, ValidationError
from ..base.memory import parse_memory
from ..base.threads import check_threads
from ..models.loading import ModelOptions

if TYPE_CHECKING:
    from ..calibration.recipe import Recipe
    from ..data.workload import Workload

__all__ = ["QUANTIZE_MODES", "CalibrateOptions", "ConvertOptions", "ExportOptions", "LoadOptions", "QuantizeOptions", "SquashOptions",
           "ValidateOptions"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    """A positive integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class LoadOptions:
    """The model's ``weights`` and its data: ``data`` (calibration) and ``heldout``
    files (never the same data), ``batch_size`` (None: the built-in model's, else 32),
    ``labels`` (class indices of the held-out samples), and ``model``: a Hugging Face
    model's task and text files, a factory's arguments."""

    weights: str | Path | None = None
    data: str | None = None
    heldout: str | None = None
    batch_size: int | None = None
    labels: str | Path | None = None
    model: ModelOptions = field(default_factory=ModelOptions)

    def __post_init__(self) -> None:
        if self.batch_size is not None and not _is_count(self.batch_size):
            raise DataError(f"batch size must be a positive integer, got {self.batch_size!r}")

    def workload(self, spec: str, check_distinct: bool = True) -> Workload:
        """``spec`` loaded with these options (:func:`actsparse_deploy.app.workload.load_workload`)."""
        from .workload import load_workload

        return load_workload(spec, self.weights, self.data, self.heldout, self.batch_size, labels=self.labels,
                             check_distinct=check_distinct, model_options=self.model)

    def check_distinct(self) -> None:
        """Held-out data that is the calibration data (files, or text files): refused."""
        from .workload import check_distinct_inputs

        check_distinct_inputs(self.data, self.heldout, self.model)


@dataclass(frozen=True)
class CalibrateOptions:
    """How the masks are learnt: the ``recipe`` (None: the model's own) at
    ``sparsity`` (None: the recipe's), the selection ``method`` and the
    ``compensate`` of every layer over the recipe's, or a cost budget
    (``max_cost``, see :mod:`actsparse_deploy.app.budget`) instead of one sparsity;
    the first ``max_samples`` calibration samples only; ``device`` where it runs;
    ``group``: distributed calibration (a :class:`~actsparse_deploy.calibration.distributed.Session`
    or a process group: rank 0 writes); ``on_batch(samples)`` after each batch."""

    recipe: Recipe | str | Path | None = None
    sparsity: float | None = None
    method: str | None = None
    compensate: str | None = None
    max_cost: str | None = None
    max_samples: int | None = None
    device: str | None = None
    group: Any = None
    on_batch: Callable[[int], None] | None = None
    #: hold the budget on the other text too (the worse of the two; needs one: ``other_text`` or a built-in's own)
    max_cost_other: bool = False
    #: prune attention heads too (:meth:`~actsparse_deploy.calibration.recipe.Recipe.with_heads`)
    heads: bool = False
    #: train the masked layers towards the dense outputs after selection (:mod:`actsparse_deploy.bake.recover`)
    recover: bool = False

    def __post_init__(self) -> None:
        if self.device is not None:  # a bad device, or CUDA where there is none: before the model loads
            from ..calibration.distributed import check_budget_device, resolve_device

            check_budget_device(self.max_cost, self.device)
            resolve_device(self.device)
        if self.max_cost is not None and self.group is not None:
            raise RecipeError("a cost budget (`max_cost`) searches over several passes of the data: it is not supported in "
                              "distributed calibration; run it in one process, or give a sparsity")
        if self.recover and self.group is not None:
            raise UsageError("--recover trains on all the calibration data in one process: it is not supported in distributed "
                             "calibration; run it in one process")
        if self.max_cost_other and self.max_cost is None:
            raise UsageError("--max-cost-other holds a cost budget on the other text too: give --max-cost as well")
        if self.max_cost is not None:
            from .budget import check_budget

            check_budget(self.max_cost)
            if self.sparsity is not None:
                raise RecipeError("give a sparsity or a cost budget (max_cost), not both")
        if self.method is not None and not (isinstance(self.method, str) and self.method):
            raise RecipeError(f"method must be the name of a selection method, got {self.method!r}")
        if self.compensate is not None and self.compensate not in COMPENSATIONS:
            raise RecipeError(f"unknown compensation {self.compensate!r}; known: {', '.join(COMPENSATIONS)}")
        if self.max_samples is not None and not _is_count(self.max_samples):
            raise DataError(f"max_samples must be a positive integer, got {self.max_samples!r}")

    @property
    def writer(self) -> bool:
        """Whether this process writes the outputs (distributed: rank 0 only)."""
        return bool(getattr(self.group, "writer", True))


@dataclass(frozen=True)
class SquashOptions:
    """How the masks become part of the model (:data:`~actsparse_deploy.base.constants.MODES`)."""

    mode: str = DEFAULT_MODE

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SquashError(f"unknown squash mode {self.mode!r}; known: {', '.join(MODES)}")


#: what ``--quantize`` takes: none; int8 (dynamic, per-channel int8 weights); int8-static (QDQ, activation ranges from the
#: calibration data); auto (int8 where the cost budget has room for it, else none; without a budget, int8)
QUANTIZE_MODES = ("none", "int8", "int8-static", "auto")


@dataclass(frozen=True)
class QuantizeOptions:
    """After export and validation, the ONNX model quantized by onnxruntime's quantizer
    (:data:`QUANTIZE_MODES`; ``none``: left in float)."""

    mode: str = "none"
    #: before int8, the matrix products' inputs smoothed where it lowers their int8 error (:mod:`actsparse_deploy.bake.smooth`)
    smooth: bool = True

    def __post_init__(self) -> None:
        if self.mode not in QUANTIZE_MODES:
            raise UsageError(f"unknown quantization {self.mode!r}; known: {', '.join(QUANTIZE_MODES)}")


@dataclass(frozen=True)
class ExportOptions:
    """The ONNX export: ``exporter`` and ``opset``, weights in an ``external_data``
    file, input axes to export as ``dynamic_axes`` besides those inferred
    (``NAME:AXIS:LABEL`` each), the exporter's own output (``verbose``);
    ``cache``: a causal language model as a decoder with a KV cache (None: for
    every causal language model; False: one full pass per call)."""

    exporter: str = DEFAULT_EXPORTER
    opset: int | None = None
    external_data: bool = False
    dynamic_axes: tuple[str, ...] = ()
    verbose: bool = False
    cache: bool | None = None
    #: the weights' dtype in the ONNX model (:data:`~actsparse_deploy.base.constants.EXPORT_DTYPES`)
    dtype: str = "auto"

    def __post_init__(self) -> None:
        from ..data.iospec import parse_dynamic_axis
        from ..onnx.export import check_opset

        object.__setattr__(self, "dynamic_axes", tuple(self.dynamic_axes))
        for axis in self.dynamic_axes:
            parse_dynamic_axis(axis)
        if self.exporter not in EXPORTERS:
            raise ExportError(f"unknown exporter {self.exporter!r}; known: {', '.join(EXPORTERS)}")
        check_opset(self.opset, self.exporter)
        if self.cache not in (None, True, False):
            raise UsageError(f"`cache` is True, False or None (for every causal language model), not {self.cache!r}")
        if self.dtype not in EXPORT_DTYPES:
            raise ExportError(f"unknown dtype {self.dtype!r} for the exported weights; known: {', '.join(EXPORT_DTYPES)}")


@dataclass(frozen=True)
class ValidateOptions:
    """ONNX against PyTorch on the held-out data: ``atol`` and ``rtol``, and the
    seconds onnxruntime may take in all (``timeout``; None: no limit)."""

    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    timeout: float | None = None

    def __post_init__(self) -> None:
        if not all(_is_number(t) and 0 <= t < math.inf for t in (self.atol, self.rtol)):  # NaN fails too; inf passes anything
            raise ValidationError(f"tolerances must be non-negative numbers, finite (atol {self.atol}, rtol {self.rtol})")
        if self.timeout is not None and not (_is_number(self.timeout) and self.timeout > 0):
            raise ValidationError(f"timeout must be a positive number of seconds, got {self.timeout}")


#: the flat keywords of each group, in the order the groups are made (and checked)
_FLAT: dict[str, tuple[str, ...]] = {
    "model": ("task", "text", "heldout_text", "max_length", "factory_args", "other_text"),
    "export": ("exporter", "opset", "external_data", "dynamic_axes", "verbose", "cache", "dtype"),
    "calibrate": ("recipe", "sparsity", "method", "compensate", "max_cost", "max_samples", "device", "group", "on_batch",
                  "max_cost_other", "heads", "recover"),
    "squash": ("mode",),
    "validate": ("atol", "rtol", "timeout"),
    "quantize": ("quantize", "smooth"),
    "load": ("weights", "data", "heldout", "batch_size", "labels"),
}
_MADE: dict[str, Callable[..., Any]] = {"model": ModelOptions, "export": ExportOptions, "calibrate": CalibrateOptions,
                                        "squash": SquashOptions, "validate": ValidateOptions, "load": LoadOptions,
                                        "quantize": lambda quantize="none", smooth=True: QuantizeOptions(quantize, smooth)}


@dataclass(frozen=True, init=False)
class ConvertOptions:
    """Everything ``convert`` takes besides the model and the output directory:
    one group per stage, or the flat keywords of :func:`~actsparse_deploy.app.pipeline.convert`,
    each sent to its group; all checked before any work. ``threads``: torch's and
    onnxruntime's intra-op threads each (None: :func:`actsparse_deploy.base.threads.default_threads`);
    ``latency``: time the dense and the converted model under onnxruntime;
    ``on_stage(name, total)`` as each stage starts; ``max_memory``: the memory the run may take
    (``8GB``, or bytes; None: what the machine has free; see :mod:`actsparse_deploy.base.memory`)."""

    load: LoadOptions
    calibrate: CalibrateOptions
    squash: SquashOptions
    export: ExportOptions
    validate: ValidateOptions
    quantize: QuantizeOptions
    overwrite: bool = False
    threads: int | None = None
    latency: bool = True
    on_stage: Callable[[str, int | None], None] | None = None
    max_memory: int | None = None

    def __init__(
        self, load: LoadOptions | None = None, calibrate: CalibrateOptions | None = None, squash: SquashOptions | None = None,
        export: ExportOptions | None = None, validate: ValidateOptions | None = None, quantize: QuantizeOptions | str | None = None, *,
        overwrite: bool = False, threads: int | None = None, latency: bool = True,
        on_stage: Callable[[str, int | None], None] | None = None, max_memory: str | int | None = None, **flat: Any,
    ) -> None:
        unknown = sorted(set(flat) - {name for names in _FLAT.values() for name in names})
        if unknown:
            raise TypeError(f"ConvertOptions() got an unexpected keyword argument {unknown[0]!r}")
        if isinstance(quantize, str):  # the flat keyword (its group's first field) shares the group's name
            flat["quantize"], quantize = quantize, None
        given = {"load": load, "calibrate": calibrate, "squash": squash, "export": export, "validate": validate,
                 "quantize": quantize, "model": load.model if load is not None else None}
        made: dict[str, Any] = {}
        for group, names in _FLAT.items():
            keywords = {name: flat[name] for name in names if name in flat}
            if given[group] is not None and keywords:
                raise TypeError(f"ConvertOptions() got `{group}` and its keyword {next(iter(keywords))!r}: give one of them")
            if group == "load" and given[group] is None:
                keywords["model"] = made["model"]
            made[group] = given[group] if given[group] is not None else _MADE[group](**keywords)
            if group == "export" and threads is not None:  # after the dynamic axes, before the device: as always
                check_threads(threads)
        if made["calibrate"].max_cost is not None and made["quantize"].mode != "none" and ":" in made["calibrate"].max_cost.partition("=")[0]:
            raise UsageError("a budget function (max_cost=package.module:function=VALUE) with quantize: it is called on PyTorch "
                             "models, and the int8 model is ONNX; use a built-in budget kind, or leave out quantize")
        if made["export"].dtype == "float16" and made["quantize"].mode != "none":
            raise UsageError("dtype float16 with quantize: onnxruntime's quantizer takes a float32 model (its int8 weights "
                             "replace the float ones); leave out dtype (auto exports float32 where it quantizes) or quantize")
        for name in ("load", "calibrate", "squash", "export", "validate", "quantize"):
            object.__setattr__(self, name, made[name])
        memory = parse_memory(max_memory) if max_memory is not None else None
        for name, value in (("overwrite", overwrite), ("threads", threads), ("latency", latency), ("on_stage", on_stage),
                            ("max_memory", memory)):
            object.__setattr__(self, name, value)

    @property
    def writer(self) -> bool:
        """Whether this process writes the outputs (distributed calibration: rank 0 only)."""
        return self.calibrate.writer
