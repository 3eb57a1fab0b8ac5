"""A model with its data: what every stage after loading works on.

A :class:`Workload` is a dense model, its calibration batches, its held-out
batches (never the calibration ones), the labels of a classifier's held-out
samples, and its one I/O spec (input / output names and dynamic axes, used by
export, ``.pt2`` capture and validation alike).
:func:`actsparse_deploy.app.workload.load_workload` makes one from a built-in
name or a ``module:factory`` plus files.

    >>> import torch
    >>> work = Workload("mine", torch.nn.Linear(3, 2), heldout=[torch.zeros(4, 3)])
    >>> tuple(work.example().shape)
    (2, 3)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..base.errors import DataError
from .batches import Batch, cast_floats, map_batches, reiterable, resize_batches, unpadded
from .iospec import IOSpec

__all__ = ["EXAMPLE_BATCH_SIZE", "Workload"]

#: samples in the example batch that export and ``.pt2`` capture trace with
EXAMPLE_BATCH_SIZE = 2


@dataclass
class Workload:
    """A dense model and the data around it."""

    name: str
    model: nn.Module
    #: the built-in's entry (an actsparse_deploy.models.zoo.BuiltinModel), None for a user's model
    builtin: Any = None
    calibration: list[Batch] | Iterable[Batch] | None = None
    #: a list, or a re-iterable stream (actsparse_deploy.data.streams.Stream) read again on each use
    heldout: list[Batch] | Iterable[Batch] | None = None
    labels: torch.Tensor | None = None
    io: IOSpec | None = None
    #: a Hugging Face model's task (``causal-lm``, ...; see actsparse_deploy.models.hf.TASKS), None for others
    task: str | None = None
    #: what the user is told about how the model was loaded (a Hugging Face model's task inferred)
    notes: list[str] = field(default_factory=list)
    #: inputs from another source than the calibration and held-out data (``--other-text``, or a
    #: built-in's own second text): the cost out of domain; None where there is none
    other: list[Batch] | Iterable[Batch] | None = None

    @property
    def causal_lm(self) -> bool:
        """Whether the model is a causal language model: a ``causal-lm`` built-in (tiny-lm), or a
        Hugging Face model loaded for ``causal-lm`` (its held-out cost has a perplexity)."""
        return (self.builtin.task if self.builtin is not None else self.task) == "causal-lm"

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

    def cast(self, dtype: torch.dtype) -> None:
        """The model's weights, and the floating inputs of its data, in ``dtype``: the model
        changed in place (never a second copy of its weights), the data as it is read.

        >>> work = Workload("mine", torch.nn.Linear(3, 2), heldout=[torch.zeros(4, 3)])
        >>> work.cast(torch.float16)
        >>> work.model.weight.dtype, work.example().dtype
        (torch.float16, torch.float16)
        """
        self.model.to(dtype)
        for name in ("calibration", "heldout", "other"):
            batches = getattr(self, name)
            if batches is not None:
                setattr(self, name, map_batches(batches, lambda b: cast_floats(b, dtype)))

    def compared_data(self) -> list[Iterable[Batch]]:
        """The data the cost runs the dense and the sparse model on, in each form it feeds them: the
        held-out and the other data, as they are and without their padding (what a recording of a
        model's outputs must cover: :class:`actsparse_deploy.nn.recorded.Recorded`)."""
        held, other = self.require_heldout(), self.other
        return [held, unpadded(held), *([other, unpadded(other)] if other is not None else [])]

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
