"""What export, validation and latency run: the squashed model, or its decoder with a KV cache.

A causal language model (a Hugging Face ``causal-lm`` or tiny-lm) is exported as a
decoder with its cache (:mod:`actsparse_deploy.models.decoder`) unless the user
says ``cache=False`` (``--no-cache``); any other model as it is. A :class:`Target`
turns the workload's pieces into the decoder's: the model (the squashed or the
dense one) wrapped, the export example (tokens after a short random past), the
I/O spec (Optimum's names) and the held-out batches (each a first step: an empty
cache).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..base.errors import ExportError, UsageError
from ..data.batches import Batch, Generated, Stream, total_samples
from ..data.iospec import IOSpec
from ..data.workload import Workload
from ..models.decoder import CacheLayout, WithPast, causal_lm, decoder_batch, decoder_example

__all__ = ["Target", "export_target"]


@dataclass(frozen=True)
class Target:
    """How a workload's model is exported: as it is (``layout`` None), or as its decoder with a cache of ``layout``."""

    layout: CacheLayout | None = None

    @property
    def cached(self) -> bool:
        return self.layout is not None

    def model(self, model: nn.Module) -> nn.Module:
        """``model`` (the dense or the squashed one) as it is exported."""
        if self.layout is None:
            return model
        lm = causal_lm(model)
        assert lm is not None  # export_target checked the dense one, squash keeps its class
        return WithPast(lm).eval()

    def example(self, work: Workload) -> Batch:
        return work.example() if self.layout is None else decoder_example(work.example(), self.layout)

    def io(self, work: Workload) -> IOSpec | None:
        return work.io if self.layout is None else self.layout.io_spec()

    def batches(self, batches: Iterable[Batch]) -> Iterable[Batch]:
        """Held-out batches as the exported model takes them (a decoder's: first steps, an empty cache)."""
        layout = self.layout
        if layout is None:
            return batches
        if isinstance(batches, Stream):
            stream = batches
            return Generated(lambda: (decoder_batch(b, layout) for b in stream), total_samples(stream))
        return [decoder_batch(b, layout) for b in batches]

    def validation_io(self, exported: IOSpec) -> IOSpec:
        """The I/O spec validation and the cost's ONNX pass use on :meth:`batches` (a decoder's first steps)."""
        return exported if self.layout is None else self.layout.first_step_spec()

    def exporter(self, asked: str) -> str:
        """The exporter a decoder with a cache needs (dynamo: the cache's tensors are traced through ``DynamicCache``)."""
        if self.layout is None:
            return asked
        if asked in ("dynamo", "auto"):
            return "dynamo"
        raise ExportError(f"a decoder with a KV cache exports with the dynamo exporter only, not {asked}: "
                          "pass --exporter dynamo, or --no-cache for one full pass per call")


def export_target(work: Workload, cache: bool | None, exporter: str | None = None) -> Target:
    """The workload's :class:`Target`: a causal language model with a cache unless
    ``cache`` is False; ``cache=True`` for any other model is a :class:`UsageError`,
    an ``exporter`` the target cannot be exported with an :class:`ExportError`."""
    lm = causal_lm(work.model) if work.causal_lm and cache is not False else None
    if lm is None:
        if cache:
            raise UsageError(f"--cache is for causal language models (Hugging Face causal-lm, tiny-lm); {work.name!r} is not one")
        return Target()
    target = Target(CacheLayout.of(lm))
    if exporter is not None:
        target.exporter(exporter)
    return target


def describe(target: Target) -> dict[str, Any]:
    """What the report says of the export's form."""
    layout = target.layout
    return {"cache": layout is not None, **({"layers": layout.layers, "kv_heads": layout.kv_heads, "head_dim": layout.head_dim}
                                            if layout is not None else {})}
