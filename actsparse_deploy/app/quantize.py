"""``convert --quantize`` and ``actsparse quantize``: an ONNX model quantized by onnxruntime, held to the budget.

:func:`quantize_stage` quantizes the staged ``model.onnx`` with onnxruntime's quantizer
(:func:`actsparse_deploy.onnx.quantize.quantize_staged`): the quantized model becomes
``model.onnx`` (what a runtime loads), the float one is kept aside until the run
ends (its validation against PyTorch is the strict one; the quantized model is
judged by its cost, and held to the budget: :func:`~actsparse_deploy.onnx.quantize.check_quantized`).
The latency stage puts the alternatives side by side
(:func:`~actsparse_deploy.onnx.quantize.measure_frontier`). Before export, :func:`smooth_stage`
smooths the squashed model's matrix products where that lowers their int8 error
(:mod:`actsparse_deploy.bake.smooth`), so the float model validated is the one quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..bake.smooth import Smoothing, apply_smoothing, plan_smoothing
from ..base.errors import ValidationError
from ..data.batches import Batch, first_samples, split_tuning, unpadded
from ..data.iospec import IOSpec
from ..data.workload import Workload
from ..models.decoder import CacheLayout, Target, decoder_batch
from ..onnx.quantize import Quantized, check_quantized, quantization_json, quantize_onnx, quantize_staged
from .report import Report

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch import nn

    from .budget import Budget, BudgetResult
    from .options import ExportOptions

__all__ = ["Int8Plan", "Int8Room", "Int8Search", "int8_room", "quantize_file", "quantize_stage", "smooth_stage", "smoothing_plan"]


def quantize_file(onnx_model: Path, output: Path, mode: str, data: str | None = None, batch_size: int = 32,
                  overwrite: bool = False) -> Report:
    """``actsparse quantize``: the ONNX model at ``onnx_model`` quantized to ``output``
    (``int8-static``: activation ranges from the ``data`` file's batches); the report's
    ``quantization`` and ``files``."""
    from ..base.errors import UsageError
    from ..data.readers import load_data
    from .options import QuantizeOptions

    QuantizeOptions(mode)
    if mode == "none":
        raise UsageError("quantize --mode none does nothing: int8 or int8-static")
    if (mode == "int8-static") != (data is not None):
        raise UsageError("--data gives int8-static its calibration batches: give it with int8-static, and only then")
    batches = first_steps(onnx_model, load_data(data, batch_size)) if data is not None else None
    result = quantize_onnx(onnx_model, output, mode, calibration=batches, overwrite=overwrite)
    return Report(model=str(onnx_model), quantization=quantization_json(result, None),  # type: ignore[arg-type]
                  files={str(output): result.size_after})


def first_steps(onnx_model: Path, batches: Iterable[Batch]) -> Iterable[Batch]:
    """``batches`` as the model at ``onnx_model`` takes them: where it is a decoder with a cache
    (``past_key_values.*`` inputs) and a batch holds tokens only, the decoder's first step on them (their
    positions, an empty cache in the cache's dtype), as ``convert`` feeds it; else as they are."""
    import onnx

    from ..onnx.validate import read_graph

    graph = read_graph(onnx_model).graph
    shapes = {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim] for i in graph.input}
    layout = CacheLayout.declared(shapes)
    if layout is None:
        return batches
    kinds = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    dtype = torch.float16 if kinds[layout.past_names()[0]] == onnx.TensorProto.FLOAT16 else torch.float32
    return [decoder_batch(b, layout, dtype) if isinstance(b, Mapping) and not any(k.startswith("past_key_values.") for k in b) else b
            for b in batches]


@dataclass(frozen=True)
class Int8Plan:
    """``--quantize`` (``mode``) under ``--max-cost``: how ``convert`` makes each model the budget
    search has its quantized cost measured on (``export``, squashed in ``squash`` mode, staged in ``scratch``)."""

    mode: str
    export: ExportOptions
    squash: str
    scratch: Path
    #: the matrix products smoothed before int8 where it helps (``--no-smooth``: never)
    smooth: bool = True


@dataclass(frozen=True)
class Int8Room:
    """``--quantize`` under ``--max-cost``: what int8 alone costs on the tuning split (``share``, the
    budget's figure), the budget the sparsity is searched to (``searched``: what int8 leaves of it),
    and the quantization that runs (``none`` where ``auto`` found no room for int8, and ``why``)."""

    mode: str
    share: float
    searched: Budget
    why: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "share": self.share, "searched_budget": str(self.searched), **({"why": self.why} if self.why else {})}


@dataclass
class Int8Search:
    """``--max-cost`` with ``--quantize``: the budget the sparsity is searched to, narrowed until the quantized
    model keeps the user's ``budget`` on the tuning split by :data:`~actsparse_deploy.app.budget.DOUBT` standard errors (``measure``: a search result's
    quantized figure and its error). Where a search's int8 model misses, the next is tighter by what it missed
    (by half the searched budget's room where it missed by more than that room);
    once one keeps it and a looser one missed, the next searches halve the gap between them (the loosest that keeps
    the budget is the most sparsity). A miss also takes the next search past the allocation that missed (its own
    float figure), so that it is not chosen again; an allocation chosen again is not measured again. Called on each
    search's result (:func:`~actsparse_deploy.app.budget.calibrate_to_budget`'s ``again``); :attr:`kept` is the
    loosest result that kept it, with its figure."""

    budget: Budget
    measure: Callable[[BudgetResult], tuple[float, float]]
    measured: list[tuple[float, float]] = field(default_factory=list)
    kept: tuple[BudgetResult, tuple[float, float]] | None = None
    missed: Budget | None = None
    #: each allocation's figure, by its levels
    seen: dict[tuple[tuple[str, float], ...], tuple[float, float]] = field(default_factory=dict)

    def __call__(self, result: BudgetResult) -> Budget | None:
        allocation = tuple(sorted(result.levels.items()))
        figure = self.seen[allocation] if allocation in self.seen else self.measure(result)
        self.seen[allocation] = figure
        self.measured.append(figure)
        doubted = self.budget.doubted(*figure)
        if self.budget.within(doubted):
            if self.kept is None or self.kept[0].masks.overall_sparsity() <= result.masks.overall_sparsity():
                self.kept = (result, figure)
            return self._between(result.budget, self.missed) if self.missed is not None else None
        self.missed = result.budget
        if self.kept is not None:
            return self._between(self.kept[0].budget, result.budget)
        tighter = result.budget.after(self.budget.miss(doubted))
        # a miss larger than the room searched: halfway to no sparsity at all, not the end of the search
        return self._past(result, tighter) if tighter is not None else self._between(result.budget.free(), result.budget)

    @staticmethod
    def _past(result: BudgetResult, tighter: Budget) -> Budget:
        """``tighter``, or where a search to it would choose ``result``'s allocation again (its float figure,
        doubted as the search held it, keeps ``tighter``), the budget just past that figure. With an other text the
        search held the worse of two figures, and only one is known here: ``tighter`` as it is."""
        if result.other_text is not None:
            return tighter
        figure = result.budget.doubted(result.tuning_cost, result.tuning_error, result.doubt)
        return tighter.tighter(result.budget.past(figure)) if tighter.within(figure) else tighter

    @staticmethod
    def _between(kept: Budget, missed: Budget) -> Budget | None:
        """Halfway between a searched budget that kept the user's and a looser one that missed; None where they
        are as good as one (a relative gap under 1e-4)."""
        if abs(missed.value - kept.value) <= 1e-4 * max(abs(kept.value), 1e-12):
            return None
        return type(kept)(kept.kind, (kept.value + missed.value) / 2)

    def chosen(self, last: BudgetResult) -> tuple[BudgetResult, tuple[float, float] | None]:
        """The result to keep after the last search (``last``): the loosest that kept the budget, else ``last``
        (the held-out check then decides), with its measured figure."""
        if self.kept is not None:
            return self.kept
        return last, self.measured[-1] if self.measured else None


def int8_room(budget: Budget, share: float, asked: str) -> Int8Room:
    """The room ``budget`` keeps for int8 that costs ``share`` alone (:meth:`Budget.after`). No room:
    ``auto`` leaves int8 out (the whole budget goes to the sparsity); ``int8`` / ``int8-static``
    asked for is a ValidationError (exit 10) before the search."""
    left = budget.after(share)
    if left is not None:
        return Int8Room("int8" if asked == "auto" else asked, share, left)
    why = f"{'int8' if asked == 'auto' else asked} alone costs {budget.kind}={share:.6g} on the tuning split of the calibration data, over the budget {budget}"
    if asked != "auto":
        raise ValidationError(f"{why}: give a looser budget, or leave out --quantize (--quantize auto leaves int8 out where it does not fit)")
    return Int8Room("none", share, budget, why)


def smoothing_plan(model: nn.Module, calibration: Iterable[Batch], mode: str) -> Smoothing:
    """Which of ``model``'s matrix products to smooth before ``mode`` (``int8`` / ``int8-static``), at which
    strength: their inputs' ranges from the calibration part of ``calibration``, each strength's int8 error
    on its tuning split (:func:`~actsparse_deploy.data.batches.split_tuning`; padding left out)."""
    fitted, tuning = split_tuning(calibration)
    return plan_smoothing(model, unpadded(fitted), unpadded(tuning), mode)


def smooth_stage(work: Workload, model: nn.Module, mode: str, max_samples: int | None = None) -> Smoothing:
    """``convert``'s smoothing before ``--quantize``: :func:`smoothing_plan` on ``model`` (the squashed model;
    the first ``max_samples`` calibration samples) baked into it, checked on two held-out batches against its
    outputs before (squash's tolerance: a SquashError, and the model as it was, where they differ)."""
    from .workload import check_batches

    plan = smoothing_plan(model, first_samples(work.require_calibration(), max_samples), mode)
    return apply_smoothing(model, plan, check=check_batches(work))


def quantize_stage(work: Workload, target: Target, path: Path, exported: IOSpec, mode: str, budget: Any = None,
                   verbose: bool = False, dense: nn.Module | None = None, smoothing: Smoothing | None = None,
                   other_text: bool = False, timeout: float | None = None) -> Quantized:
    """``convert``'s quantize stage: the validated model at ``path`` quantized in its place
    (:func:`~actsparse_deploy.onnx.quantize.quantize_staged`; ``int8-static``'s ranges from the calibration data), then held to
    ``budget`` (a :class:`~actsparse_deploy.app.budget.Budget`) on the held-out data
    (:func:`~actsparse_deploy.onnx.quantize.check_quantized`) against ``dense``, the dense model as it is
    exported (its recorded outputs, once squash changed it in place; None: ``work.model``'s); ``smoothing``:
    what :func:`smooth_stage` did before export (the report's ``quantization.smoothing``); ``other_text``: the budget
    holds on the workload's other text too (``--max-cost-other``), and so is the quantized model held there; ``timeout``:
    seconds onnxruntime may take for the check (``--timeout``: it is the quantized model's validation)."""
    io, dense = target.validation_io(exported), dense if dense is not None else target.model(work.model)
    calibration = target.batches(work.require_calibration()) if mode == "int8-static" else None
    held = target.batches(work.require_heldout()) if budget is not None else None
    smoothed = smoothing.to_json() if smoothing is not None else None
    result, floated = quantize_staged(path, mode, calibration, io, verbose)
    if budget is None or held is None:
        return Quantized(result, floated, smoothing=smoothed)
    other = target.batches(work.other) if other_text and work.other is not None else None
    kept = check_quantized(budget, dense, path, held, io=io, tokens=work.causal_lm, labels=work.labels, other=other, timeout=timeout)
    return Quantized(result, floated, kept, smoothed)
