"""What sparsification cost on a workload: the figures behind ``report.json``'s ``cost``.

:func:`sparsification_cost` puts :mod:`actsparse_deploy.onnx.metrics` together for
a :class:`~actsparse_deploy.data.workload.Workload`: dense vs sparse on its
held-out data (per-output difference, cosine); for a built-in with other data
(MiniLM) also ``other_text``, the cosine on English that is neither calibration
nor held-out data; for a classifier, test accuracy (dense, sparse, ONNX); for a
causal language model (tiny-lm), held-out perplexity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..data.batches import total_samples, unpadded
from ..data.iospec import IOSpec
from ..data.workload import Workload
from ..onnx.metrics import Counted, accuracy, cosine_stats, perplexity

__all__ = ["sparsification_cost"]


def _is_causal_lm(work: Workload) -> bool:
    """Whether ``work`` is a causal language model: a ``causal-lm`` built-in, or a
    workload whose ``task`` (a Hugging Face model's) is ``causal-lm``."""
    task = work.builtin.task if work.builtin is not None else work.task
    return task == "causal-lm"


def sparsification_cost(
    work: Workload, sparse: nn.Module, onnx_path: Path | None = None, io_spec: IOSpec | None = None
) -> dict[str, Any]:
    """Dense vs sparse on the held-out data: per-output difference and cosine
    similarity; test accuracy for a classifier (dense, sparse, and the ONNX model);
    held-out perplexity for a causal language model (``perplexity_dense``,
    ``perplexity_sparse``, ``perplexity_onnx``). ``io_spec``: what the ONNX model
    was exported with (default: the workload's)."""
    held = work.require_heldout()
    io = io_spec or work.io
    io_names = io.output_names if io else None
    # cosine and perplexity on token batches without their padding (the same figures, less work: a
    # model's per-token outputs at padding positions are not compared); accuracy keeps the labels' order
    regrouped = unpadded(held)
    counted = Counted(regrouped)
    outputs = cosine_stats(work.model, sparse, counted)
    for row in outputs:
        if io_names is not None:
            row["output"] = io_names[row["output"]]
    known = total_samples(held)
    cost: dict[str, Any] = {"outputs": outputs, "heldout_samples": known if known is not None else counted.samples}
    other = work.builtin.other_data if work.builtin is not None else None
    if other is not None:  # the cost under domain shift: text that is neither calibration nor held-out data
        batches = other(work.builtin.batch_size)  # type: ignore[union-attr]
        rows = cosine_stats(work.model, sparse, unpadded(list(batches)))
        for row in rows:
            if io_names is not None:
                row["output"] = io_names[row["output"]]
        cost["other_text"] = {"outputs": rows, "samples": total_samples(batches)}
    if _is_causal_lm(work):  # a language model's quality: held-out next-token perplexity
        cost["perplexity_dense"] = perplexity(work.model, regrouped)
        cost["perplexity_sparse"] = perplexity(sparse, regrouped)
        if onnx_path is not None:
            cost["perplexity_onnx"] = perplexity(onnx_path, held, io)
    if work.labels is not None:
        cost["accuracy_dense"] = accuracy(work.model, held, work.labels)
        cost["accuracy_sparse"] = accuracy(sparse, held, work.labels)
        if onnx_path is not None:
            cost["accuracy_onnx"] = accuracy(onnx_path, held, work.labels, io)
    return cost
