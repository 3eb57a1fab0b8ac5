"""What sparsification cost: accuracy and closeness of a sparse model to the dense one.

:func:`accuracy` is the one top-1 accuracy of a classifier (a PyTorch model, or
an ONNX model run by onnxruntime) on batches with their labels;
:func:`cosine_stats` compares two models output by output (max abs difference,
per-sample cosine similarity); :func:`perplexity` a causal language model's
held-out next-token perplexity. :func:`actsparse_deploy.app.cost.sparsification_cost`
puts them together for a workload.

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

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..base.errors import DataError
from ..data.batches import Batch, batch_size, call_args, flatten_outputs, run_batch
from ..nn.modules import eval_mode

if TYPE_CHECKING:
    from ..data.iospec import IOSpec

__all__ = ["Counted", "accuracy", "cosine_stats", "nll_sum", "perplexity", "predictions", "sample_cosines", "token_ids"]


def predictions(model: nn.Module | str | Path, batches: Iterable[Batch], io_spec: IOSpec | None = None) -> np.ndarray:
    """The arg-max of the first output over its last axis, batch by batch: of a
    PyTorch model (in eval mode, flags restored) or an ONNX model file run by
    onnxruntime (``io_spec`` names a tensor or tuple batch's inputs)."""
    if isinstance(model, (str, Path)):
        from .validate import onnx_feeds, onnx_session, run_session

        session = onnx_session(model)
        found = [run_session(session, onnx_feeds(session, b, io_spec))[0].argmax(axis=-1) for b in batches]
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    with torch.no_grad(), eval_mode(model):
        parts = [flatten_outputs(run_batch(model, b))[0].argmax(dim=-1) for b in batches]
    return torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.int64)


def accuracy(
    model: nn.Module | str | Path, batches: Iterable[Batch], labels: torch.Tensor, io_spec: IOSpec | None = None
) -> float:
    """Top-1 accuracy of ``model`` (a PyTorch model or an ONNX model file) on
    ``batches``, whose samples ``labels`` (class indices) label in order."""
    found = predictions(model, batches, io_spec)
    what = "ONNX model" if isinstance(model, (str, Path)) else "model"
    if found.shape != tuple(labels.shape):
        raise DataError(
            f"the {what}'s first output gives predictions of shape {list(found.shape)} for {len(labels)} labels: "
            "accuracy needs a classifier whose first output is (batch, classes)"
        )
    return float((found == labels.numpy()).mean())


def token_ids(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A language model batch's token ids (``input_ids``, else its first tensor) and ``attention_mask``."""
    args, kwargs = call_args(batch)
    if kwargs:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else next(iter(kwargs.values()))
        return ids, kwargs.get("attention_mask")
    return args[0], None


def nll_sum(logits: torch.Tensor, batch: Batch, what: str) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (float64) of a batch and the tokens it predicts
    (positions 1.. of the token ids, those the ``attention_mask`` keeps)."""
    ids, mask = token_ids(batch)
    if logits.ndim != 3 or ids.ndim != 2 or tuple(logits.shape[:2]) != tuple(ids.shape) or ids.is_floating_point():
        raise DataError(
            f"perplexity needs a language model: the {what}'s first output must be logits (batch, tokens, vocabulary) "
            f"for integer token ids (batch, tokens); got logits {list(logits.shape)} for inputs {list(ids.shape)}"
        )
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].double().transpose(1, 2), ids[:, 1:], reduction="none")
    keep = mask[:, 1:].bool() if mask is not None else torch.ones_like(nll, dtype=torch.bool)
    return float(nll[keep].sum()), int(keep.sum())


def perplexity(model: nn.Module | str | Path, batches: Iterable[Batch], io_spec: IOSpec | None = None) -> float:
    """Next-token perplexity of a causal language model (a PyTorch model, or an
    ONNX model file run by onnxruntime) on ``batches`` of token ids: exp of the
    mean negative log-likelihood of every token after the first of each row
    (first output: logits ``(batch, tokens, vocabulary)``; targets: the batch's
    ``input_ids`` or first tensor; ``attention_mask`` respected)."""
    total, count = 0.0, 0
    if isinstance(model, (str, Path)):
        from .validate import onnx_feeds, onnx_session, run_session

        session = onnx_session(model)
        for batch in batches:
            logits = torch.from_numpy(np.asarray(run_session(session, onnx_feeds(session, batch, io_spec))[0]))
            nll, n = nll_sum(logits, batch, "ONNX model")
            total, count = total + nll, count + n
    else:
        with torch.no_grad(), eval_mode(model):
            for batch in batches:
                nll, n = nll_sum(flatten_outputs(run_batch(model, batch))[0], batch, "model")
                total, count = total + nll, count + n
    if count == 0:
        raise DataError("perplexity: the batches hold no next token to predict (rows of one token, or all masked)")
    return float(np.exp(total / count))


def sample_cosines(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of two outputs of the same shape, in float64
    (a scalar output, a loss or a count: one value)."""
    rows = x.shape[0] if x.ndim else 1
    return torch.nn.functional.cosine_similarity(x.double().reshape(rows, -1), y.double().reshape(rows, -1), dim=1, eps=1e-12)


def cosine_stats(dense: nn.Module, sparse: nn.Module, batches: Iterable[Batch]) -> list[dict[str, Any]]:
    """Per output of the two models: max abs diff and per-sample cosine
    similarity (mean and worst) of the sparse model's outputs to the dense one's."""
    stats: list[dict[str, Any]] = []
    cosines: list[list[np.ndarray]] = []
    with torch.no_grad(), eval_mode(dense, sparse):
        for batch in batches:
            a = flatten_outputs(run_batch(dense, batch))
            b = flatten_outputs(run_batch(sparse, batch))
            if not stats:
                stats = [{"output": i, "max_abs_diff": 0.0} for i in range(len(a))]
                cosines = [[] for _ in a]
            for i, (x, y) in enumerate(zip(a, b)):
                rows = x.shape[0] if x.ndim else 1  # a scalar output (a loss, a count): one value per batch
                x64, y64 = x.double().reshape(rows, -1), y.double().reshape(rows, -1)
                stats[i]["max_abs_diff"] = max(stats[i]["max_abs_diff"], float((x64 - y64).abs().max()))
                cosines[i].append(sample_cosines(x64, y64).numpy())
    for stat, cos in zip(stats, cosines):
        values = np.concatenate(cos)
        stat["cosine_mean"] = float(values.mean())
        stat["cosine_min"] = float(values.min())
    return stats


class Counted:
    """``batches``, counting the samples that pass (data that cannot say how many it holds)."""

    def __init__(self, batches: Iterable[Batch]) -> None:
        self.batches = batches
        self.samples = 0

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.batches:
            self.samples += batch_size(batch)
            yield batch


