"""What the stages need to know about a whole model: eval mode for a while (one
definition for calibration, squash, export, validation and the budget), weights
that are finite, and the dtype they are stored in.

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    >>> with eval_mode(model):
    ...     model.training
    False
    >>> model.training
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..base.errors import WeightsError

__all__ = ["check_finite_weights", "eval_mode", "float_dtype", "release_weights", "weight_bytes"]


def check_finite_weights(model: nn.Module) -> None:
    """Raise :class:`WeightsError` naming the first parameter that holds NaN or
    Inf, or buffer that holds NaN (buffers may hold -inf on purpose: attention
    masks). Calibration on such a model would blame the data for the NaN."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if not (t.is_floating_point() or t.is_complex()):
                continue
            count = _bad_values(t, nan_only=kind == "buffer")
            if count:
                what = "NaN or Inf" if kind == "parameter" else "NaN"
                raise WeightsError(
                    f"{kind} {name!r} of the model holds {what} ({count} of {t.numel()} values): "
                    "the weights are corrupted; check the weights file or the training run that made it"
                )


@contextlib.contextmanager
def eval_mode(*models: Any) -> Iterator[None]:
    """eval mode and no grad for the duration; every module's training flag restored
    after. A torch.export program's module (a ``GraphModule``) cannot switch modes
    and is run as it is (it was captured in eval); what is no module is passed over."""
    modes = {
        m: m.training for model in models if isinstance(model, nn.Module) and not isinstance(model, torch.fx.GraphModule)
        for m in model.modules()
    }
    for module in modes:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.train(training)


#: the elements checked at once (a few MB of flags, never a copy of a whole weight)
_CHECK_ELEMENTS = 2**22


def _bad_values(t: torch.Tensor, nan_only: bool = False) -> int:
    """How many values of ``t`` are NaN or infinite (``nan_only``: NaN), a slice at a time."""
    flat = t.detach().reshape(-1)
    count = 0
    for start in range(0, flat.numel(), _CHECK_ELEMENTS):
        piece = flat[start:start + _CHECK_ELEMENTS]
        good = ~torch.isnan(piece) if nan_only else torch.isfinite(piece)
        if not bool(good.all()):
            count += int(piece.numel() - good.count_nonzero())
    return count


def float_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype that holds most of ``model``'s parameter elements (float32 for a
    model without floating parameters): the dtype its weights were stored in.

    >>> float_dtype(nn.Linear(2, 2).to(torch.bfloat16)), float_dtype(nn.Module())
    (torch.bfloat16, torch.float32)
    """
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=lambda d: counts[d]) if counts else torch.float32


def release_weights(*models: nn.Module) -> None:
    """The weights of ``models`` let go: every parameter and buffer moved to the meta device in
    place (names, shapes and dtypes kept; no memory), for a model no stage runs any more.

    >>> model = nn.Linear(2, 2)
    >>> release_weights(model)
    >>> model.weight.is_meta, tuple(model.weight.shape)
    (True, (2, 2))
    """
    for model in models:
        model.to("meta")


def weight_bytes(model: nn.Module) -> int:
    """The bytes of ``model``'s parameters and buffers (a tensor shared by two names once).

    >>> weight_bytes(nn.Linear(4, 2))
    40
    """
    seen = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())
