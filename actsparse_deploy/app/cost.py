"""What sparsification cost on a workload: the figures behind ``report.json``'s ``cost``.

:func:`sparsification_cost` reads them for a
:class:`~actsparse_deploy.data.workload.Workload` from the passes of
:func:`actsparse_deploy.onnx.metrics.cost_tallies` (each model run once per
batch): dense vs sparse on its held-out data (per-output difference, cosine);
for a built-in with other data (MiniLM) also ``other_text``, the cosine on
English that is neither calibration nor held-out data; for a classifier, test
accuracy (dense, sparse, ONNX); for a causal language model (tiny-lm),
held-out perplexity. :func:`cost_stage` adds a cost budget's held-out cost,
measured from the same outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn

from ..data.batches import Batch, total_samples
from ..data.iospec import IOSpec
from ..data.workload import Workload
from ..onnx.metrics import cost_tallies
from .budget import BudgetResult, heldout_budget

__all__ = ["cost_stage", "sparsification_cost"]


def sparsification_cost(
    work: Workload, sparse: nn.Module, onnx_path: Path | None = None, io_spec: IOSpec | None = None, dense: nn.Module | None = None,
) -> dict[str, Any]:
    """Dense vs sparse on the held-out data: per-output difference and cosine
    similarity; test accuracy for a classifier (dense, sparse, and the ONNX model);
    held-out perplexity for a causal language model (``perplexity_dense``,
    ``perplexity_sparse``, ``perplexity_onnx``). ``io_spec``: what the ONNX model
    was exported with (default: the workload's); ``dense``: what stands for the dense model (default: ``work.model``)."""
    return cost_stage(work, sparse, onnx_path, io_spec, dense=dense)[0]


def cost_stage(
    work: Workload, sparse: nn.Module, onnx_path: Path | None = None, io_spec: IOSpec | None = None,
    budget: BudgetResult | None = None, onnx_batches: Callable[[Iterable[Batch]], Iterable[Batch]] | None = None,
    dense: nn.Module | None = None,
) -> tuple[dict[str, Any], BudgetResult | None]:
    """:func:`sparsification_cost`, and ``budget`` with its held-out cost
    (:func:`~actsparse_deploy.app.budget.heldout_budget`): a built-in budget kind
    from the outputs the cost's passes kept, a user's function on the models. ``onnx_batches``: the held-out
    batches as the ONNX model takes them (a decoder with a cache: first steps). ``dense``: what stands for
    the dense model (its recorded outputs, once squash changed it in place; None: ``work.model``)."""
    held = work.require_heldout()
    io = io_spec or work.io
    names = io.output_names if io else None
    language = work.causal_lm
    keep = budget is not None and budget.budget.kind != "user"
    # cosine and perplexity on token batches without their padding (the same figures, less work: a
    # model's per-token outputs at padding positions are not compared); accuracy keeps the labels' order
    dense = dense if dense is not None else work.model
    tallies = cost_tallies(dense, sparse, held, tokens=language, classes=work.labels is not None, keep=keep,
                           other=work.other, onnx_path=onnx_path, io_spec=io,
                           onnx_batches=onnx_batches(held) if onnx_batches is not None else None)
    known = total_samples(held)
    cost: dict[str, Any] = {"outputs": tallies.heldout.output_stats(names),
                            "heldout_samples": known if known is not None else tallies.heldout.samples}
    if tallies.other is not None:  # the cost under domain shift: text that is neither calibration nor held-out data
        cost["other_text"] = {"outputs": tallies.other.output_stats(names), "samples": tallies.other.samples,
                              **({"perplexity_dense": tallies.other.perplexity_of(0), "perplexity_sparse": tallies.other.perplexity_of(1)}
                                 if language else {})}
    if language:  # a language model's quality: held-out next-token perplexity
        cost["perplexity_dense"], cost["perplexity_sparse"] = tallies.heldout.perplexity_of(0), tallies.heldout.perplexity_of(1)
        if tallies.onnx is not None:
            cost["perplexity_onnx"] = tallies.onnx.perplexity_of(0)
    if work.labels is not None:
        cost["accuracy_dense"] = tallies.ordered.accuracy_of(0, work.labels)
        cost["accuracy_sparse"] = tallies.ordered.accuracy_of(1, work.labels)
        if tallies.onnx is not None:
            cost["accuracy_onnx"] = tallies.onnx.accuracy_of(0, work.labels)
    if budget is not None:
        budget = heldout_budget(budget, work, sparse, tallies.ordered.kept if keep else None, dense=dense)
    return cost, budget
