"""``convert --quantize`` and ``actsparse quantize``: an ONNX model quantized by onnxruntime, held to the budget.

:func:`quantize_stage` quantizes the staged ``model.onnx`` with onnxruntime's quantizer
(:func:`actsparse_deploy.onnx.quantize.quantize_staged`): the quantized model becomes
``model.onnx`` (what a runtime loads), the float one is kept aside until the run
ends (its validation against PyTorch is the strict one; the quantized model is
judged by its cost, and held to the budget: :func:`~actsparse_deploy.onnx.quantize.check_quantized`).
The latency stage puts the alternatives side by side
(:func:`~actsparse_deploy.onnx.quantize.frontier`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.iospec import IOSpec
from ..data.workload import Workload
from ..models.decoder import Target
from ..onnx.quantize import Quantized, check_quantized, quantization_json, quantize_onnx, quantize_staged
from .report import Report

__all__ = ["quantize_file", "quantize_stage"]

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


def quantize_stage(work: Workload, target: Target, path: Path, exported: IOSpec, mode: str, budget: Any = None,
                   verbose: bool = False) -> Quantized:
    """``convert``'s quantize stage: the validated model at ``path`` quantized in its place
    (:func:`~actsparse_deploy.onnx.quantize.quantize_staged`; ``int8-static``'s ranges from the calibration data), then held to
    ``budget`` (a :class:`~actsparse_deploy.app.budget.Budget`) on the held-out data
    (:func:`~actsparse_deploy.onnx.quantize.check_quantized`)."""
    io, dense = target.validation_io(exported), target.model(work.model)
    calibration = target.batches(work.require_calibration()) if mode == "int8-static" else None
    held = target.batches(work.require_heldout()) if budget is not None else None
    result, floated = quantize_staged(path, mode, calibration, io, verbose)
    if budget is None or held is None:
        return Quantized(result, floated)
    kept = check_quantized(budget, dense, path, held, io=io, tokens=work.causal_lm, labels=work.labels)
    return Quantized(result, floated, kept)
