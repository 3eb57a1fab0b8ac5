"""What removing one input feature of a masked layer saves: multiply-adds per token.

The budget search prices each layer's steps per unit of this work, so that a layer
where a removed feature saves more (an attention head: its query, key and value
rows, its output column and its share of the attention products) is worth more
cost than an MLP feature (its producer's row and its consumer's column).

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> work_per_feature(model, ["2"], {}, torch.randn(3, 4))
    {'2': 6.0}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from ..base.errors import MaskError, SquashError
from ..data.batches import Batch
from ..nn.attention import Heads
from .graph import Dataflow

__all__ = ["work_per_feature"]


def _per_row(module: nn.Module, rows: int) -> float:
    """A layer's weights per output row (``rows`` rows: out features) or per column."""
    weight = getattr(module, "weight", None)
    return float(weight.numel()) / rows if weight is not None and rows else 0.0


def work_per_feature(model: nn.Module, names: Sequence[str], heads: Mapping[str, Heads], example: Batch,
                     tokens: float = 0.0) -> dict[str, float]:
    """Per masked layer, the multiply-adds per token one removed input feature saves: the
    layer's column, its producers' rows (found as ``prune`` finds them; none where the walk
    cannot), and for a layer of attention ``heads`` the query row, the key and value rows
    shared by ``group`` query heads, and the attention's two products over ``tokens`` positions."""
    flow: Dataflow | None = None
    try:
        flow = Dataflow(model, example)
    except (SquashError, MaskError):
        flow = None
    work: dict[str, float] = {}
    for name in names:
        layer = model.get_submodule(name)
        columns = getattr(layer, "in_features", None) or getattr(layer, "in_channels", None)
        saved = _per_row(layer, columns if isinstance(columns, int) else 0)
        if name in heads:
            h = heads[name]
            q, k, v = (model.get_submodule(p) for p in (h.query, h.key, h.value))
            # per query feature: its query row; a 1 / group share of a key and a value row; QK^T and PV over the positions
            saved += _per_row(q, h.width) + _per_row(k, h.width) + _per_row(v, h.width) + 2 * tokens
        elif flow is not None:
            chain, _ = flow.producer(name, tuple(names))
            for producer in chain.producers if chain is not None else ():
                module = model.get_submodule(producer)
                rows = getattr(module, "out_features", None) or getattr(module, "out_channels", None)
                saved += _per_row(module, rows if isinstance(rows, int) else 0)
        work[name] = saved
    return work
