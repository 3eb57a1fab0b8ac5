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
from pathlib import Path
from typing import TYPE_CHECKING

from ..base.errors import DataError
from ..data.batches import Batch, reiterable, total_samples
from ..data.batches import batch_size as batch_size_of
from ..data.readers import check_distinct_data, load_data, load_labels
from ..data.workload import EXAMPLE_BATCH_SIZE, Workload
from ..models import zoo
from ..models.loading import ModelOptions, load_model, load_text_data, resolve_io_spec

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

    from ..bake.squash import SquashResult
    from ..calibration.masks import Masks
    from ..data.iospec import IOSpec
    from ..models.decoder import Target
    from ..onnx.validate import ValidationReport

__all__ = ["EXAMPLE_BATCH_SIZE", "Workload", "check_batches", "check_distinct_inputs", "load_workload",
           "squash_workload", "validate_target"]


def squash_workload(work: Workload, masks: Masks, mode: str, in_place: bool = False, one_head_count: bool = False) -> SquashResult:
    """Squash ``work.model`` with an example batch (the dataflow for ``prune``)
    and a few held-out batches to check the result against ``mul``: a copy of it, or
    ``in_place`` the model itself (no second copy of its weights; ``work.model`` is then the squashed model).
    ``one_head_count``: a decoder exported with a cache (see :func:`~actsparse_deploy.bake.squash.squash_`)."""
    from ..bake.squash import squash, squash_

    return (squash_ if in_place else squash)(work.model, masks, mode, example=work.example(), check_batches=check_batches(work),
                                             one_head_count=one_head_count)


def validate_target(path: Path, model: nn.Module, held: Iterable[Batch], target: Target, io: IOSpec | None, atol: float, rtol: float,
                    timeout: float | None = None, release: Callable[[], None] | None = None) -> ValidationReport:
    """The ONNX model at ``path`` against ``model`` on ``held`` as ``target`` exports it (``io``: the spec it
    was exported with; the tolerances widened for a float16 target): a ValidationError where an output is
    outside them. A decoder with a cache is checked as it is used: first steps, then token by token against
    PyTorch's own cache, and greedy generation. ``release``: in two passes, ``release()`` letting the model's
    weights go between them (not for a decoder with a cache, which runs both side by side)."""
    from dataclasses import replace

    from ..onnx.generate import check_generation
    from ..onnx.validate import validate

    target = target.of_model(model)
    spec = target.validation_io(io)
    atol, rtol = target.tolerances(atol, rtol)
    checked = validate(path, target.model(model), target.batches(held), atol=atol, rtol=rtol,
                       output_names=spec.output_names if spec is not None else None, io_spec=spec, timeout=timeout,
                       release=None if target.cached else release)
    if not target.cached:
        return checked
    generation = check_generation(path, target.model(model), held, atol=atol, rtol=rtol, timeout=timeout)
    return replace(checked, generation=generation)


def check_batches(work: Workload) -> list[Batch]:
    """The held-out batches a change that keeps the model's function is checked on (squash, smoothing): the first two
    (of a stream, only those are read)."""
    return list(itertools.islice(work.heldout or [], 2))


def check_distinct_inputs(data: str | None, heldout: str | None, model_options: ModelOptions | None = None) -> None:
    """Held-out data that is the calibration data (``data`` and ``heldout`` files, or
    ``model_options``' text files) is refused, naming both."""
    if data is not None and heldout is not None:
        check_distinct_data(data, heldout)
    if model_options is not None and model_options.text and model_options.heldout_text:
        check_distinct_data(model_options.text, model_options.heldout_text)
    other = model_options.other_text if model_options is not None else None
    if model_options is not None and other is not None:
        for known, what in ((model_options.text, "calibration"), (model_options.heldout_text, "held-out")):
            if known:
                check_distinct_data(known, other, what="other text", of=f"the {what} text",
                                    why="its cost would not be a cost out of domain; give text from another source")


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
    the caller checks it later with :func:`check_distinct_inputs`)."""
    if check_distinct:
        check_distinct_inputs(data, heldout, model_options)
    if labels is not None and heldout is None:
        raise DataError(f"`labels` {labels} needs `heldout`: the labels are those of the held-out samples")
    loaded = load_model(spec, weights, model_options)
    entry = loaded.entry
    size = batch_size or (entry.batch_size if entry else 32)
    text, held_text, other = load_text_data(loaded, model_options, data, heldout, size)
    calibration = load_data(data, size) if data is not None else (zoo.calibration_batches(spec, size) if entry else text)
    held: list[Batch] | Iterable[Batch] | None = held_text
    if heldout is not None:
        held = load_data(heldout, size)  # a stream of the file (read again on each use), never held whole
        held = held if reiterable(held) else list(held)  # a data function's one-shot iterable is used several times
    elif entry is not None:
        held = zoo.heldout_batches(spec, size)
    io = resolve_io_spec(loaded, held if held else calibration, entry)
    the_labels = entry.labels() if entry is not None and entry.labels is not None and heldout is None else None
    if labels is not None:
        the_labels = load_labels(labels)
        samples = total_samples(held)
        samples = samples if samples is not None else sum(batch_size_of(b) for b in held or [])
        if len(the_labels) != samples:
            raise DataError(f"labels file {labels} has {len(the_labels)} labels for {samples} held-out samples in {heldout}")
    task = loaded.hf.model.task if loaded.hf is not None else None
    return Workload(loaded.name, loaded.module, entry, calibration, held, the_labels, io, task, loaded.notes, other)
