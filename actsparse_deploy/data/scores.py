"""Figures from model outputs already computed: per-sample cosine, next-token NLL, top-1 predictions.

Pure arithmetic, batch by batch: the models run elsewhere
(:mod:`actsparse_deploy.onnx.metrics`, the budget's meter) and hand their
flattened outputs (see :func:`actsparse_deploy.data.batches.flatten_outputs`)
here. :func:`sample_cosines` and :func:`nll_sum` (with :func:`token_ids`, its
targets) are the two measures; a :class:`Tally` folds one batch's outputs of
one or more models in at a time and gives the cost stage's figures at the end
(per-output max abs difference and cosine of the second model's outputs to the
first's, each model's perplexity and accuracy); :func:`cost_figure` is a cost
budget's figure over two lists of outputs, :func:`figure_needs` what the
outputs allow.

    >>> import torch
    >>> from actsparse_deploy.data.scores import Tally
    >>> tally = Tally(("dense", "sparse"), compare=True, classes=True)
    >>> logits = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    >>> tally.add(logits, (logits,), (2 * logits,))
    >>> stats = tally.output_stats()
    >>> stats[0]["max_abs_diff"], round(stats[0]["cosine_min"], 6)
    (2.0, 1.0)
    >>> tally.accuracy_of(1, torch.tensor([1, 1]))
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from ..base.errors import DataError
from .batches import Batch, batch_size, call_args, slice_batch

__all__ = ["Tally", "cost_error", "cost_figure", "figure_needs", "nll_sum", "sample_cosines", "token_ids"]


def token_ids(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A language model batch's token ids (``input_ids``, else its first tensor) and ``attention_mask``."""
    args, kwargs = call_args(batch)
    if kwargs:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else next(iter(kwargs.values()))
        return ids, kwargs.get("attention_mask")
    return args[0], None


#: the most values of a batch's output copied to float64 at a time: its rows are taken in groups under it (a large
#: vocabulary's logits on one batch are gigabytes in float64, and their log-softmax as much again)
ROW_VALUES = 1 << 22


def row_groups(rows: int, per_row: int) -> list[slice]:
    """Slices of ``rows`` rows of ``per_row`` values each, as many rows a slice as keep it under :data:`ROW_VALUES` (one at least)."""
    step = max(1, ROW_VALUES // max(1, per_row))
    return [slice(start, start + step) for start in range(0, max(rows, 1), step)]


def nll_sum(logits: torch.Tensor, batch: Batch, what: str) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (float64) of a batch and the tokens it predicts
    (positions 1.. of the token ids, those the ``attention_mask`` keeps), a group of rows at a time (:func:`row_groups`)."""
    ids, mask = token_ids(batch)
    if logits.ndim != 3 or ids.ndim != 2 or tuple(logits.shape[:2]) != tuple(ids.shape) or ids.is_floating_point():
        raise DataError(
            f"perplexity needs a language model: the {what}'s first output must be logits (batch, tokens, vocabulary) "
            f"for integer token ids (batch, tokens); got logits {list(logits.shape)} for inputs {list(ids.shape)}"
        )
    keep = mask[:, 1:].bool() if mask is not None else torch.ones(ids[:, 1:].shape, dtype=torch.bool)
    total = torch.zeros((), dtype=torch.float64)
    for rows in row_groups(ids.shape[0], logits[0].numel()):
        nll = torch.nn.functional.cross_entropy(logits[rows, :-1].double().transpose(1, 2), ids[rows, 1:], reduction="none")
        total += nll[keep[rows]].sum()
    return float(total), int(keep.sum())


def sample_cosines(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of two outputs of the same shape, in float64
    (a scalar output, a loss or a count: one value)."""
    rows = x.shape[0] if x.ndim else 1
    return torch.nn.functional.cosine_similarity(x.double().reshape(rows, -1), y.double().reshape(rows, -1), dim=1, eps=1e-12)


def _tensor(x: Any) -> torch.Tensor:
    """A torch tensor as it is, an onnxruntime array as a tensor (sharing its memory)."""
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def _top1(x: Any) -> np.ndarray:
    """The arg-max over the last axis, as numpy (a torch tensor's, or an onnxruntime array's)."""
    return x.argmax(dim=-1).numpy() if isinstance(x, torch.Tensor) else np.asarray(x).argmax(axis=-1)


class Tally:
    """One pass's figures, a batch at a time: :meth:`add` folds in each batch's
    flattened outputs, one sequence per model (``sides`` names them, as messages
    do: ``"model"``, ``"ONNX model"``), and the figures are read at the end.

    ``compare``: per output, max abs difference and per-sample cosine of the
    second model's outputs to the first's; ``tokens``: each model's summed
    next-token NLL (first output: logits) for :meth:`perplexity_of`; ``classes``:
    each model's top-1 predictions (arg-max of the first output) for
    :meth:`accuracy_of`; ``keep``: every output, as it came (``kept[side]``, batch
    by batch); ``count``: the samples seen (``samples``)."""

    def __init__(self, sides: Sequence[str] = ("model",), *, compare: bool = False, tokens: bool = False,
                 classes: bool = False, keep: bool = False, count: bool = False) -> None:
        self.sides = tuple(sides)
        self.compare, self.tokens, self.classes, self.keep, self.count = compare, tokens, classes, keep, count
        self.samples = 0
        self.stats: list[dict[str, Any]] = []
        self.cosines: list[list[np.ndarray]] = []
        self.nll = [(0.0, 0) for _ in self.sides]
        self.predicted: list[list[np.ndarray]] = [[] for _ in self.sides]
        self.kept: list[list[list[Any]]] = [[] for _ in self.sides]

    def add(self, batch: Batch, *outputs: Sequence[Any]) -> None:
        """One batch's outputs, one flat sequence per side (torch tensors, or the ONNX model's arrays)."""
        if self.count:
            self.samples += batch_size(batch)
        if self.compare:
            self._compare(outputs[0], outputs[1])
        for side, (what, out) in enumerate(zip(self.sides, outputs)):
            if self.tokens:
                nll, n = nll_sum(_tensor(out[0]), batch, what)
                self.nll[side] = (self.nll[side][0] + nll, self.nll[side][1] + n)
            if self.classes:
                self.predicted[side].append(_top1(out[0]))
            if self.keep:
                self.kept[side].append(list(out))

    def _compare(self, a: Sequence[Any], b: Sequence[Any]) -> None:
        """Per output of the same shape on both sides: a pruned decoder's cache (fewer key/value heads than the
        dense model's) is another tensor, not a different value of the same one, and is left out."""
        if not self.stats:
            self.stats = [{"output": i, "max_abs_diff": 0.0} for i, (x, y) in enumerate(zip(a, b))
                          if _tensor(x).shape == _tensor(y).shape]
            self.cosines = [[] for _ in self.stats]
        for stat, cosines in zip(self.stats, self.cosines):
            x, y = _tensor(a[stat["output"]]), _tensor(b[stat["output"]])
            rows = x.shape[0] if x.ndim else 1  # a scalar output (a loss, a count): one value per batch
            x, y = x.reshape(rows, -1), y.reshape(rows, -1)
            for group in row_groups(rows, x.shape[1]):  # float64 copies of a few rows at a time
                x64, y64 = x[group].double(), y[group].double()
                stat["max_abs_diff"] = max(stat["max_abs_diff"], float((x64 - y64).abs().max()))
                cosines.append(sample_cosines(x64, y64).numpy())

    def output_stats(self, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Per output: ``max_abs_diff``, ``cosine_mean``, ``cosine_min`` (``output``: its index, or its name from ``names``)."""
        rows = []
        for stat, cos in zip(self.stats, self.cosines):
            values = np.concatenate(cos)
            name = names[stat["output"]] if names is not None else stat["output"]
            rows.append({**stat, "output": name, "cosine_mean": float(values.mean()), "cosine_min": float(values.min())})
        return rows

    def perplexity_of(self, side: int) -> float:
        """exp of the mean next-token negative log-likelihood of side ``side``'s logits."""
        total, count = self.nll[side]
        if count == 0:
            raise DataError("perplexity: the batches hold no next token to predict (rows of one token, or all masked)")
        return float(np.exp(total / count))

    def predictions_of(self, side: int) -> np.ndarray:
        """Side ``side``'s top-1 predictions, every batch's in order."""
        found = self.predicted[side]
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def figures(self, side: int = 0, labels: torch.Tensor | None = None) -> tuple[float | None, float | None]:
        """Side ``side``'s perplexity (where the tally counts tokens) and accuracy on ``labels``
        (where it counts classes and labels are given), else None."""
        return (self.perplexity_of(side) if self.tokens else None,
                self.accuracy_of(side, labels) if self.classes and labels is not None else None)

    def accuracy_of(self, side: int, labels: torch.Tensor) -> float:
        """Top-1 accuracy of side ``side`` on the samples ``labels`` (class indices) label in order."""
        found = self.predictions_of(side)
        if found.shape != tuple(labels.shape):
            raise DataError(
                f"the {self.sides[side]}'s first output gives predictions of shape {list(found.shape)} for {len(labels)} "
                "labels: accuracy needs a classifier whose first output is (batch, classes)"
            )
        return float((found == labels.numpy()).mean())


def figure_needs(outputs: Sequence[Sequence[torch.Tensor]], batches: Iterable[Batch]) -> dict[str, str]:
    """The cost figures (``cosine``, ``accuracy-drop``, ``perplexity-ratio``) a
    model's outputs (batch by batch, flattened) allow, each -> what it needs
    (``""`` where the model has it): what its first output and the first batch show."""
    first = outputs[0][0] if outputs and outputs[0] else None
    ids, _ = token_ids(next(iter(batches)))
    shown = f"its first output is {list(first.shape) if first is not None else 'none'} for inputs {list(ids.shape)}"
    classifier = first is not None and first.ndim >= 2
    language = (classifier and first.ndim == 3 and ids.ndim == 2 and not ids.is_floating_point()  # type: ignore[union-attr]
                and tuple(first.shape[:2]) == tuple(ids.shape))  # type: ignore[union-attr]
    return {
        "cosine": "" if first is not None else f"an output to compare ({shown})",
        "accuracy-drop": "" if classifier else f"a classifier, whose first output is (batch, classes) ({shown})",
        "perplexity-ratio": "" if language else (
            f"a language model, whose first output is logits (batch, tokens, vocabulary) for integer token ids "
            f"(batch, tokens) ({shown})"
        ),
    }


def cost_figure(
    kind: str, dense: Sequence[Sequence[torch.Tensor]], sparse: Sequence[Sequence[torch.Tensor]],
    batches: Iterable[Batch], labels: torch.Tensor | None = None,
) -> float:
    """The figure of a built-in cost budget ``kind`` for the sparse model's outputs
    against the dense one's (flattened, batch by batch, on ``batches``): ``cosine``,
    the mean per-sample cosine of the last output; ``accuracy-drop``, dense minus
    sparse accuracy on ``labels``, without labels the share of changed predictions
    (arg-max of the first output); ``perplexity-ratio``, sparse over dense perplexity."""
    if kind == "cosine":  # per sample, as the report's cost counts it (Tally.output_stats)
        return float(torch.cat([sample_cosines(d[-1], s[-1]) for d, s in zip(dense, sparse)]).mean())
    if kind == "accuracy-drop":
        dense_pred = torch.cat([d[0].argmax(-1) for d in dense])
        sparse_pred = torch.cat([s[0].argmax(-1) for s in sparse])
        if labels is not None:
            if labels.shape != dense_pred.shape:
                raise DataError(f"{len(labels)} labels for predictions of shape {list(dense_pred.shape)}")
            return float((dense_pred == labels).double().mean() - (sparse_pred == labels).double().mean())
        return float((dense_pred != sparse_pred).double().mean())
    dense_nll = _mean_nll([d[0] for d in dense], batches)
    return math.exp(_mean_nll([s[0] for s in sparse], batches) - dense_nll)


def cost_error(
    kind: str, dense: Sequence[Sequence[torch.Tensor]], sparse: Sequence[Sequence[torch.Tensor]],
    batches: Iterable[Batch], labels: torch.Tensor | None = None,
) -> float:
    """The standard error of :func:`cost_figure` (same arguments) over the samples it averages: how far
    the figure could move on other samples from the same source. ``cosine``: of the per-sample
    cosines' mean; ``accuracy-drop``: of the mean per-sample change (correct, or without labels the
    same prediction, its share taken as (changed + 1) / (samples + 2)); ``perplexity-ratio``: the ratio's,
    each sequence's summed NLL one sample (a ratio estimator)."""
    if kind == "cosine":
        cosines = torch.cat([sample_cosines(d[-1], s[-1]) for d, s in zip(dense, sparse)])
        return _standard_error(cosines)
    if kind == "accuracy-drop":
        dense_pred = torch.cat([d[0].argmax(-1).reshape(-1) for d in dense])
        sparse_pred = torch.cat([s[0].argmax(-1).reshape(-1) for s in sparse])
        if labels is not None:
            flat = labels.reshape(-1)
            return _standard_error((dense_pred == flat).double() - (sparse_pred == flat).double())
        changed, n = int((dense_pred != sparse_pred).sum()), len(dense_pred)
        share = (changed + 1) / (n + 2)  # none changed on a few samples is not certainty: Laplace's rule of succession
        return math.sqrt(share * (1 - share) / n) if n else 0.0
    gaps, counts = _sequence_gaps(dense, sparse, batches)
    if len(counts) < 2:
        return 0.0
    log_ratio = float(gaps.sum() / counts.sum())
    residual = gaps - log_ratio * counts
    spread = math.sqrt(float((residual ** 2).sum()) * len(counts) / (len(counts) - 1)) / float(counts.sum())
    return math.exp(log_ratio) * spread


def _sequence_gaps(dense: Sequence[Sequence[torch.Tensor]], sparse: Sequence[Sequence[torch.Tensor]],
                   batches: Iterable[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence (a batch row that predicts a token): sparse minus dense summed next-token NLL, and its tokens."""
    gaps, counts = [], []
    for d, s, b in zip(dense, sparse, batches):
        for i in range(batch_size(b)):
            row = slice_batch(b, i, i + 1)
            (dense_nll, count), (sparse_nll, _) = nll_sum(d[0][i:i + 1], row, "model"), nll_sum(s[0][i:i + 1], row, "ONNX model")
            if count:
                gaps.append(sparse_nll - dense_nll)
                counts.append(count)
    return torch.tensor(gaps, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)


def _standard_error(values: torch.Tensor) -> float:
    return float(values.double().std() / math.sqrt(len(values))) if len(values) > 1 else 0.0


def _mean_nll(logits: list[torch.Tensor], batches: Iterable[Batch]) -> float:
    """Mean next-token negative log-likelihood (targets: the batch's token ids), as :meth:`Tally.perplexity_of` counts it."""
    total, count = 0.0, 0
    for out, batch in zip(logits, batches):
        nll, n = nll_sum(out, batch, "model (perplexity-ratio)")
        total, count = total + nll, count + n
    if count == 0:
        raise DataError("perplexity-ratio: the batches hold no next token to predict")
    return total / count
