"""``convert --quantize``: the validated sparse export quantized, and the alternatives side by side.

:func:`quantize_staged` quantizes the staged ``model.onnx`` with onnxruntime's quantizer
(:func:`actsparse_deploy.onnx.quantize.quantize_onnx`): the quantized model becomes
``model.onnx`` (what a runtime loads), the float one is kept aside until the run
ends (its validation against PyTorch is the strict one; the quantized model is
judged by its cost). :func:`frontier` puts what the user could ship side by side,
from one run, on the same held-out batches: the dense export, the dense export
quantized alone (what onnxruntime's one call gives), the sparse float export and
the sparse quantized one: latency (alternated, the first = 1.00x), cost against
the dense PyTorch model (cosine per output; perplexity and accuracy where the
model has them), the quantization's own share (against its float source), size
on disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..data.batches import Batch, head_samples
from ..data.iospec import IOSpec
from ..data.workload import Workload
from ..onnx.latency import latencies
from ..onnx.quantize import QuantizeResult, quantize_onnx, variant_costs
from .decoding import Target
from .report import Report

__all__ = ["FLOAT_FOLDER", "VARIANTS", "Quantized", "check_budget", "frontier", "quantization_json", "quantize_file", "quantize_stage",
           "quantize_staged"]

#: where the float export waits inside the staging folder while the quantized one is measured (removed before publishing)
FLOAT_FOLDER = ".float"
#: the frontier's rows: what each is, in order (the first is the latency's baseline)
VARIANTS = ("dense", "int8", "sparse", "sparse+int8")


def quantize_staged(onnx_path: Path, mode: str, calibration: Iterable[Batch] | None, io: IOSpec | None,
                    verbose: bool = False) -> tuple[QuantizeResult, Path]:
    """The float model at ``onnx_path`` (with its data file) moved into :data:`FLOAT_FOLDER`
    beside it and quantized back to ``onnx_path``; the result and the float model's new path."""
    aside = onnx_path.parent / FLOAT_FOLDER
    aside.mkdir(exist_ok=True)
    floated = aside / onnx_path.name
    for name in (onnx_path.name, f"{onnx_path.name}.data"):  # the graph names its data file: the same name, beside it
        if (onnx_path.parent / name).exists():
            os.replace(onnx_path.parent / name, aside / name)
    result = quantize_onnx(floated, onnx_path, mode, calibration=calibration if mode == "int8-static" else None, io_spec=io,
                           verbose=verbose)
    return result, floated


def frontier(dense: nn.Module, files: dict[str, Path], batches: Iterable[Batch], *, io: IOSpec | None, mode: str,
             tokens: bool, labels: Any = None, max_samples: int = 64) -> list[dict[str, Any]]:
    """The rows of :data:`VARIANTS` (``files``: the dense and sparse float exports as ``dense`` /
    ``sparse``, the sparse quantized one as ``sparse+int8``; the dense one is quantized here beside
    itself as ``int8``): name, file size, latency ratio to the dense export, cost against the dense
    PyTorch model, and for the quantized ones their closeness to their float source."""
    dense_path = files["dense"]
    int8 = dense_path.with_name(f"{dense_path.stem}.int8.onnx")
    quantize_onnx(dense_path, int8, mode, calibration=batches if mode == "int8-static" else None, io_spec=io)
    paths = {"dense": dense_path, "int8": int8, "sparse": files["sparse"], "sparse+int8": files["sparse+int8"]}
    timed = latencies(paths, list(head_samples(batches, max_samples)), io_spec=io)
    costs = variant_costs(dense, paths, batches if labels is not None else head_samples(batches, max_samples),
                          references={"int8": "dense", "sparse+int8": "sparse"}, io_spec=io, tokens=tokens, labels=labels)
    rows = []
    for name in VARIANTS:
        cost = costs[name].to_json()
        rows.append({"variant": name, "size_bytes": cost["size_bytes"], "ms": timed["ms"][name], "latency_ratio": timed["ratio"][name],
                     **{k: v for k, v in cost.items() if k not in ("name", "path", "size_bytes")}})
    return rows


def quantization_json(result: QuantizeResult, rows: list[dict[str, Any]] | None) -> dict[str, Any]:
    """``report.json``'s ``quantization``: what was quantized (not where: the files were staged), and the frontier."""
    done = {k: v for k, v in result.to_json().items() if k not in ("path", "source")}
    return {**done, **({"frontier": rows} if rows is not None else {})}


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
    batches = load_data(data, batch_size) if data is not None else None
    result = quantize_onnx(onnx_model, output, mode, calibration=batches, overwrite=overwrite)
    return Report(model=str(onnx_model), quantization=quantization_json(result, None),  # type: ignore[arg-type]
                  files={str(output): result.size_after})


def budget_figure(kind: str, cost: Any) -> float:
    """A budget kind's figure of a :class:`~actsparse_deploy.onnx.quantize.VariantCost` (a decoder's
    cosine is its logits', as the PyTorch model's only output is; else the last output's)."""
    if kind == "accuracy-drop":
        return float(cost.dense_accuracy - cost.accuracy)
    if kind == "perplexity-ratio":
        return float(cost.perplexity / cost.dense_perplexity)
    shown = next((o for o in cost.outputs if o.get("output") == "logits"), cost.outputs[-1])
    return float(shown["cosine_mean"])


def check_budget(budget: Any, dense: nn.Module, path: Path, batches: Iterable[Batch], *, io: IOSpec | None, tokens: bool,
                 labels: Any = None) -> dict[str, Any]:
    """The quantized model at ``path`` measured by ``budget`` (a :class:`~actsparse_deploy.app.budget.Budget`)
    against the dense PyTorch model on the held-out ``batches`` (as the ONNX model takes them): the
    figure and that it keeps the budget; over it, a ValidationError (exit 10: nothing is written)."""
    from ..base.errors import ValidationError

    cost = variant_costs(dense, {"int8": path}, batches, io_spec=io, tokens=budget.kind == "perplexity-ratio" or tokens,
                         labels=labels if budget.kind == "accuracy-drop" else None)["int8"]
    value = budget_figure(budget.kind, cost)
    if not budget.within(value):
        raise ValidationError(f"the int8 model's held-out cost {budget.kind}={value:.6g} is over the budget {budget} "
                              "(the quantization's error adds to the sparsity's): give a looser budget, or leave out --quantize")
    return {"budget": str(budget), "heldout_cost": value, "within": True}


@dataclass(frozen=True)
class Quantized:
    """What ``convert``'s quantize stage did: onnxruntime's result, where the float model waits
    (inside the staging folder), and the budget's figure of the quantized model (``--max-cost``)."""

    result: QuantizeResult
    floated: Path
    budget: dict[str, Any] | None = None

    def to_json(self, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """``report.json``'s ``quantization``, with the latency stage's frontier ``rows`` where it ran."""
        return {**quantization_json(self.result, rows), **({"budget": self.budget} if self.budget is not None else {})}


def quantize_stage(work: Workload, target: Target, path: Path, exported: IOSpec, mode: str, budget: Any = None,
                   verbose: bool = False) -> Quantized:
    """``convert``'s quantize stage: the validated model at ``path`` quantized in its place
    (:func:`quantize_staged`; ``int8-static``'s ranges from the calibration data), then held to
    ``budget`` (a :class:`~actsparse_deploy.app.budget.Budget`) on the held-out data (:func:`check_budget`)."""
    io = target.validation_io(exported)
    calibration = target.batches(work.require_calibration()) if mode == "int8-static" else None
    result, floated = quantize_staged(path, mode, calibration, io, verbose)
    if budget is None:
        return Quantized(result, floated)
    kept = check_budget(budget, target.model(work.model), path, target.batches(work.require_heldout()), io=io,
                        tokens=work.causal_lm, labels=work.labels)
    return Quantized(result, floated, kept)
