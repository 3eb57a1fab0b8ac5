"""What sparsification cost: accuracy and closeness of a sparse model to the dense one.

The models run here, each once per batch, and hand every batch's outputs to
:class:`~actsparse_deploy.data.scores.Tally`, which does the arithmetic:
:func:`run` is one pass of PyTorch models (or of an ONNX model under
onnxruntime) that feeds any number of tallies; :func:`cost_tallies` every pass
of the cost stage (:func:`actsparse_deploy.app.cost.sparsification_cost`).
:func:`accuracy` is the one top-1 accuracy of a classifier (a PyTorch model, or
an ONNX model) on batches with their labels; :func:`cosine_stats` compares two
models output by output (max abs difference, per-sample cosine similarity);
:func:`perplexity` a causal language model's held-out next-token perplexity.

    >>> import torch
    >>> from torch import nn
    >>> from actsparse_deploy.onnx.metrics import accuracy, cosine_stats
    >>> model = nn.Linear(3, 2)
    >>> x = torch.randn(6, 3)
    >>> labels = model(x).argmax(dim=-1)
    >>> accuracy(model, [x[:4], x[4:]], labels)
    1.0
    >>> stats = cosine_stats(model, model, [x])
    >>> stats[0]["max_abs_diff"], round(stats[0]["cosine_min"], 6)
    (0.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..data.batches import Batch, flatten_outputs, run_batch, unpadded
from ..data.scores import Tally, nll_sum, sample_cosines, token_ids
from ..nn.modules import eval_mode

if TYPE_CHECKING:
    from ..data.iospec import IOSpec

__all__ = ["CostTallies", "accuracy", "cosine_stats", "cost_tallies", "nll_sum", "perplexity", "predictions", "run",
           "sample_cosines", "token_ids"]


def run(models: Sequence[nn.Module] | str | Path, batches: Iterable[Batch], *tallies: Tally,
        io_spec: IOSpec | None = None) -> None:
    """One pass over ``batches``: each batch through each model once, its outputs
    (flattened, one sequence per model) folded into every tally. ``models``:
    PyTorch models (in eval mode, no grad, flags restored after), or an ONNX
    model file run by onnxruntime (``io_spec`` names a tensor or tuple batch's inputs)."""
    if isinstance(models, (str, Path)):
        from .validate import onnx_feeds, onnx_session, run_session

        session = onnx_session(models)
        for batch in batches:
            outputs = run_session(session, onnx_feeds(session, batch, io_spec))
            for tally in tallies:
                tally.add(batch, outputs)
        return
    with eval_mode(*models):
        for batch in batches:
            each = [flatten_outputs(run_batch(model, batch)) for model in models]
            for tally in tallies:
                tally.add(batch, *each)


def _side(model: nn.Module | str | Path) -> tuple[Sequence[nn.Module] | str | Path, str]:
    """What :func:`run` takes for one model, and its name in messages."""
    return (model, "ONNX model") if isinstance(model, (str, Path)) else ((model,), "model")


def predictions(model: nn.Module | str | Path, batches: Iterable[Batch], io_spec: IOSpec | None = None) -> np.ndarray:
    """The arg-max of the first output over its last axis, batch by batch: of a
    PyTorch model (in eval mode, flags restored) or an ONNX model file run by
    onnxruntime (``io_spec`` names a tensor or tuple batch's inputs)."""
    models, what = _side(model)
    tally = Tally((what,), classes=True)
    run(models, batches, tally, io_spec=io_spec)
    return tally.predictions_of(0)


def accuracy(
    model: nn.Module | str | Path, batches: Iterable[Batch], labels: torch.Tensor, io_spec: IOSpec | None = None
) -> float:
    """Top-1 accuracy of ``model`` (a PyTorch model or an ONNX model file) on
    ``batches``, whose samples ``labels`` (class indices) label in order."""
    models, what = _side(model)
    tally = Tally((what,), classes=True)
    run(models, batches, tally, io_spec=io_spec)
    return tally.accuracy_of(0, labels)


def perplexity(model: nn.Module | str | Path, batches: Iterable[Batch], io_spec: IOSpec | None = None) -> float:
    """Next-token perplexity of a causal language model (a PyTorch model, or an
    ONNX model file run by onnxruntime) on ``batches`` of token ids: exp of the
    mean negative log-likelihood of every token after the first of each row
    (first output: logits ``(batch, tokens, vocabulary)``; targets: the batch's
    ``input_ids`` or first tensor; ``attention_mask`` respected)."""
    models, what = _side(model)
    tally = Tally((what,), tokens=True)
    run(models, batches, tally, io_spec=io_spec)
    return tally.perplexity_of(0)


def cosine_stats(dense: nn.Module, sparse: nn.Module, batches: Iterable[Batch]) -> list[dict[str, Any]]:
    """Per output of the two models: max abs diff and per-sample cosine
    similarity (mean and worst) of the sparse model's outputs to the dense one's."""
    tally = Tally(("model", "model"), compare=True)
    run((dense, sparse), batches, tally)
    return tally.output_stats()


@dataclass(frozen=True)
class CostTallies:
    """The figures of :func:`cost_tallies`' passes (side 0 dense, 1 sparse)."""

    #: on the regrouped held-out batches: per-output closeness, next-token NLL, samples
    heldout: Tally
    #: on the held-out batches in their order: top-1 predictions, outputs kept
    ordered: Tally
    #: on the other data: per-output closeness (None without other data)
    other: Tally | None = None
    #: the ONNX model's on the held-out batches in their order (None without one)
    onnx: Tally | None = None


def cost_tallies(
    dense: nn.Module, sparse: nn.Module, held: Iterable[Batch], *, tokens: bool = False, classes: bool = False,
    keep: bool = False, other: Iterable[Batch] | None = None, onnx_path: str | Path | None = None, io_spec: IOSpec | None = None,
    onnx_batches: Iterable[Batch] | None = None,
) -> CostTallies:
    """Every pass of the cost stage, each model once per batch. On ``unpadded(held)``
    (token batches without their padding): dense vs sparse per output, and with
    ``tokens`` each one's next-token NLL; on ``held`` in its order (what labels
    label): with ``classes`` each one's top-1 predictions, with ``keep`` every
    output. One pass where regrouping leaves ``held`` as it is, else a second over
    ``held`` where it is needed. ``other``: dense vs sparse on other data
    (regrouped too; with ``tokens`` each one's NLL there too); ``onnx_path``: the ONNX model's NLL and predictions on ``held`` (as ``onnx_batches``
    gives it, where the ONNX model takes other inputs: a decoder's first steps)."""
    sides = ("model", "model")
    tallies = CostTallies(Tally(sides, compare=True, tokens=tokens, count=True), Tally(sides, classes=classes, keep=keep),
                          Tally(sides, compare=True, tokens=tokens, count=True) if other is not None else None,
                          Tally(("ONNX model",), tokens=tokens, classes=classes) if onnx_path is not None else None)
    regrouped = unpadded(held)
    same = regrouped is held
    passes: list[tuple[Sequence[nn.Module] | str | Path, Iterable[Batch], list[Tally]]] = [
        ((dense, sparse), regrouped, [tallies.heldout, tallies.ordered] if same else [tallies.heldout])]
    if not same and (classes or keep):
        passes.append(((dense, sparse), held, [tallies.ordered]))
    if other is not None and tallies.other is not None:
        passes.append(((dense, sparse), unpadded(other), [tallies.other]))
    if onnx_path is not None and tallies.onnx is not None:
        passes.append((onnx_path, onnx_batches if onnx_batches is not None else held, [tallies.onnx]))
    for models, batches, fed in passes:
        run(models, batches, *fed, io_spec=io_spec)
    return tallies
