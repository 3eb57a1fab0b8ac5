"""A model's outputs recorded once, replayed in its place: the dense model after its weights are gone.

``convert`` squashes the dense model in place (never a second copy of the weights).
What the stages after squash compare against the dense model (the cost, the int8
budget check, the frontier) is its outputs on batches known in advance: the held-out
and other data, as each stage feeds them. :class:`Recorded` runs the dense model over
those batches once, before squash, and answers each later call on the same inputs
with the outputs it recorded; a call on inputs it did not see is an error, never a
guess.

    >>> import torch
    >>> from torch import nn
    >>> dense = nn.Linear(3, 2)
    >>> batches = [torch.ones(2, 3), torch.zeros(1, 3)]
    >>> recorded = Recorded.of(dense, [batches])
    >>> torch.equal(recorded(torch.ones(2, 3)), dense(torch.ones(2, 3)))
    True
    >>> recorded(torch.full((2, 3), 5.0))
    Traceback (most recent call last):
    ...
    RuntimeError: the dense model's outputs were not recorded for these inputs (float32[2, 3]): ...
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..data.batches import Batch, call_args, describe_batch, run_batch
from .modules import eval_mode

__all__ = ["Recorded", "inputs_digest"]


def inputs_digest(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """A digest of a call's inputs: each tensor's name or position, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for key, value in (*enumerate(args), *sorted(kwargs.items())):
        digest.update(f"{key}|".encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


class Recorded(nn.Module):
    """A model's outputs on given batches, by the digest of their inputs (:meth:`of`); called
    like the model on one of those batches, it returns what the model returned."""

    def __init__(self, outputs: Mapping[str, Any]) -> None:
        super().__init__()
        self.outputs = dict(outputs)

    @classmethod
    def of(cls, model: nn.Module, batch_sets: Iterable[Iterable[Batch]]) -> Recorded:
        """``model``'s outputs on every batch of ``batch_sets`` (eval mode, no grad; a batch seen twice runs once)."""
        outputs: dict[str, Any] = {}
        with eval_mode(model):  # no grad too
            for batches in batch_sets:
                for batch in batches:
                    key = inputs_digest(*call_args(batch))
                    if key not in outputs:
                        outputs[key] = run_batch(model, batch)
        return cls(outputs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        key = inputs_digest(args, kwargs)
        if key not in self.outputs:
            shown = describe_batch(kwargs if kwargs else (args[0] if len(args) == 1 else args))
            raise RuntimeError(f"the dense model's outputs were not recorded for these inputs ({shown}): "
                               "record every batch a stage after squash compares against the dense model")
        return self.outputs[key]
