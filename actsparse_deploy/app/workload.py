"""A model with its data: what every stage after loading works on.

A :class:`Workload` is a dense model, its calibration batches, its held-out
batches (never the calibration ones), the labels of a classifier's held-out
samples, and its one I/O spec (input / output names and dynamic axes, used by
export, ``.pt2`` capture and validation alike). :func:`load_workload` makes one
from a built-in name or a ``module:factory`` plus files.

    >>> from actsparse_deploy.app.workload import load_workload
    >>> work = load_workload("digits-mlp", batch_size=50)
    >>> len(work.heldout), tuple(work.example().shape), work.io.output_names, work.io.dynamic_axes["logits"]
    (8, (2, 1, 8, 8), ('logits',), {0: 'batch'})
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..base.errors import DataError
from ..data.batches import Batch, resize_batches, total_samples
from ..data.batches import batch_size as batch_size_of
from ..data.streams import Stream, reiterable
from ..models import zoo
from ..models.loading import ModelOptions, check_distinct_data, load_data, load_labels, load_model, load_text_data

if TYPE_CHECKING:
    from ..bake.squash import SquashResult
    from ..calibration.masks import Masks
    from ..calibration.recipe import Recipe
    from ..onnx.export import IOSpec

__all__ = ["EXAMPLE_BATCH_SIZE", "Workload", "load_recipe", "load_workload", "squash_workload"]

#: samples in the example batch that export and ``.pt2`` capture trace with
EXAMPLE_BATCH_SIZE = 2


@dataclass
class Workload:
    """A dense model and the data around it."""

    name: str
    model: nn.Module
    builtin: zoo.BuiltinModel | None = None
    calibration: list[Batch] | Iterable[Batch] | None = None
    #: a list, or a re-iterable stream (actsparse_deploy.data.streams.Stream) read again on each use
    heldout: list[Batch] | Iterable[Batch] | None = None
    labels: torch.Tensor | None = None
    io: IOSpec | None = None
    #: a Hugging Face model's task (``causal-lm``, ...; see actsparse_deploy.models.hf.TASKS), None for others
    task: str | None = None
    #: what the user is told about how the model was loaded (a Hugging Face model's task inferred)
    notes: list[str] = field(default_factory=list)

    def require_calibration(self) -> Iterable[Batch]:
        if self.calibration is None:
            if self.task is not None:
                raise DataError(f"{self.name!r} has no built-in data: pass `text`, a text file its tokenizer reads "
                                "(or `data`, a file of token ids)")
            raise DataError(f"{self.name!r} has no built-in data: pass `data`, a file of calibration inputs")
        return self.calibration

    def require_heldout(self) -> list[Batch] | Iterable[Batch]:
        if self.heldout is None:
            if self.task is not None:
                raise DataError(f"{self.name!r} has no built-in held-out data: pass `heldout_text`, a text file its tokenizer "
                                "reads (or `heldout`, a file of token ids), never the calibration text")
            raise DataError(
                f"{self.name!r} has no built-in held-out data: pass `heldout`, a file of held-out inputs (never the calibration data)"
            )
        return self.heldout

    def example(self) -> Batch:
        """A small batch for export tracing (from the held-out data, else calibration)."""
        source = self.heldout if self.heldout is not None else self.calibration
        if source is None:
            given = "`heldout_text` (a text file its tokenizer reads)" if self.task is not None else "`data` or `heldout`"
            raise DataError(f"{self.name!r} needs {given} to give the exporter an example input")
        batches = source if reiterable(source) else list(source)  # a stream: only its first batch is read
        pieces = resize_batches(batches, EXAMPLE_BATCH_SIZE, EXAMPLE_BATCH_SIZE)
        if not pieces:
            raise DataError(f"no batch of {self.name!r}'s data has {EXAMPLE_BATCH_SIZE} samples for the export example")
        return pieces[0]


def squash_workload(work: Workload, masks: Masks, mode: str) -> SquashResult:
    """Squash ``work.model`` with an example batch (the dataflow for ``prune``)
    and a few held-out batches to check the result against ``mul``."""
    from ..bake.squash import squash

    checks = list(itertools.islice(work.heldout or [], 2))  # of a stream, its first two batches only
    return squash(work.model, masks, mode, example=work.example(), check_batches=checks)


def load_recipe(
    work: Workload,
    recipe: Recipe | str | Path | None = None,
    sparsity: float | None = None,
    *,
    method: str | None = None,
    compensate: str | None = None,
) -> Recipe:
    """The recipe for ``work``: ``recipe``, else its built-in one (``sparsity``
    overrides the level, ``method`` and ``compensate`` those of every layer);
    see :func:`actsparse_deploy.calibration.recipe.resolve_recipe`."""
    from ..calibration.recipe import resolve_recipe

    if recipe is None and work.builtin is None and work.task is not None:  # a Hugging Face model: its MLPs' default
        from ..models.hf import default_recipe

        recipe = default_recipe(work.model)
    return resolve_recipe(work.name, work.builtin is not None, recipe, sparsity=sparsity, method=method, compensate=compensate)


def _first(batches: list[Batch] | Iterable[Batch] | None) -> Batch | None:
    """The first batch of a list or a stream (an iterable from a data function is not read twice)."""
    if isinstance(batches, list):
        return batches[0] if batches else None
    return next(iter(batches), None) if isinstance(batches, Stream) else None


def load_workload(
    spec: str,
    weights: str | Path | None = None,
    data: str | None = None,
    heldout: str | None = None,
    batch_size: int | None = None,
    labels: str | Path | None = None,
    check_distinct: bool = True,
    model_options: ModelOptions | None = None,
) -> Workload:
    """A built-in name, a Hugging Face model directory or ``module:factory`` (+ weights),
    with its data; ``labels``: a file of class indices for the held-out samples (your own
    classifier's accuracy); ``model_options``: a task, factory arguments, text files.
    Held-out data that is the calibration data is refused (``check_distinct=False``:
    the caller checks it later with ``check_distinct_data``)."""
    if check_distinct and data is not None and heldout is not None:
        check_distinct_data(data, heldout)
    if check_distinct and model_options is not None and model_options.text and model_options.heldout_text:
        check_distinct_data(model_options.text, model_options.heldout_text)
    if labels is not None and heldout is None:
        raise DataError(f"`labels` {labels} needs `heldout`: the labels are those of the held-out samples")
    loaded = load_model(spec, weights, model_options)
    entry = zoo.get_builtin(spec) if loaded.builtin else None
    size = batch_size or (entry.batch_size if entry else 32)
    text, held_text = load_text_data(loaded, model_options, data, heldout, size)
    calibration = load_data(data, size) if data is not None else (zoo.calibration_batches(spec, size) if entry else text)
    held: list[Batch] | Iterable[Batch] | None = held_text
    if heldout is not None:
        held = load_data(heldout, size)  # a stream of the file (read again on each use), never held whole
        held = held if reiterable(held) else list(held)  # a data function's one-shot iterable is used several times
    elif entry is not None:
        held = zoo.heldout_batches(spec, size)
    the_labels = entry.labels() if entry is not None and entry.labels is not None and heldout is None else None
    if labels is not None:
        the_labels = load_labels(labels)
        samples = total_samples(held)
        samples = samples if samples is not None else sum(batch_size_of(b) for b in held or [])
        if len(the_labels) != samples:
            raise DataError(f"labels file {labels} has {len(the_labels)} labels for {samples} held-out samples in {heldout}")
    io = entry.io_spec() if entry is not None else loaded.io_spec(_first(held) if held else _first(calibration))
    task = loaded.hf.model.task if loaded.hf is not None else None
    return Workload(loaded.name, loaded.module, entry, calibration, held, the_labels, io, task, loaded.notes)
