"""Stage 2: bake masks into the model as fixed ops, no hooks left.

Modes, per layer:

- ``mul``: the layer is wrapped in :class:`MaskedInput`, which multiplies its
  input by a constant mask buffer; any mask that broadcasts against the input;
- ``fold``: a mask that only varies along the consuming layer's input-feature
  axis (``Linear``: last axis; ``ConvNd``: channel axis; any module type with a
  registered layer kind, see :mod:`actsparse_deploy.nn.layers`) is multiplied into
  the layer's weight: no extra op at all;
- ``prune``: such a mask's zero features are removed. The layer loses those
  input columns / channels (the others are scaled by the mask, as in fold), and
  the layers that make them (``Linear``, ``ConvNd``, GPT-2's ``Conv1D``; both
  ``gate_proj`` and ``up_proj`` of a SwiGLU MLP, through its elementwise join),
  where the graph shows that nothing else reads them (through per-feature ops
  such as ReLU / GELU, BatchNorm and depthwise convs, which lose them too), lose
  those output features too, so none computes them. Where no producer can be
  shrunk (a residual add, a flatten between), :class:`PrunedInput` gathers the
  kept features before the smaller layer. Needs an ``example`` batch:
  the dataflow comes from ``torch.export`` (see :mod:`actsparse_deploy.bake.graph`),
  and the result is checked against ``mul`` on it; a mismatch raises and leaves
  the model as it was;
- ``auto`` (default): ``prune`` where the producers can be shrunk too (only with an
  ``example``), else ``fold`` where it is exact, else ``mul``. Never the gather
  alone: it runs slower than dense (the layer's reason says so).

    >>> import torch
    >>> from torch import nn
    >>> from actsparse_deploy import Recipe, calibrate, squash
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> masks = calibrate(model, Recipe.simple(layers=["2"], sparsity=0.5), [torch.randn(16, 4)])
    >>> result = squash(model, masks)
    >>> result.modes
    {'2': 'fold'}
    >>> int((result.model[2].weight == 0).all(dim=0).sum())   # 4 of 8 input columns zeroed
    4
    >>> pruned = squash(model, masks, "prune", example=torch.randn(2, 4))
    >>> pruned.model[0].out_features, pruned.model[2].in_features   # 4 of 8 features removed from both
    (4, 4)
    >>> pruned.reasons["2"]
    'removed 4 of 8 features from 0 and this layer'

Three steps, one module each: :mod:`~actsparse_deploy.bake.plan` checks the masks and
decides every layer's mode (nothing is changed), :mod:`~actsparse_deploy.bake.apply`
changes the model as the plan says, :mod:`~actsparse_deploy.bake.explain` says the
plan's reason codes in words.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from torch import nn

from ..base.constants import MODES
from ..base.errors import SquashError, first_line
from ..calibration.masks import Masks
from ..data.batches import Batch
from ..nn.attention import describe_heads
from .apply import PRUNE_ATOL, PRUNE_RTOL, MaskedInput, PrunedInput, SquashResult, apply_plan
from .explain import explain
from .plan import CONV_CHANNEL_MULTIPLE, Because, LayerPlan, Reason, SquashPlan, fold_vector, head_count_problem, plan_squash, without_heads

__all__ = [
    "CONV_CHANNEL_MULTIPLE",
    "MODES",
    "PRUNE_ATOL",
    "PRUNE_RTOL",
    "LayerPlan",
    "MaskedInput",
    "PrunedInput",
    "Reason",
    "SquashPlan",
    "SquashResult",
    "apply_plan",
    "explain",
    "fold_vector",
    "plan_squash",
    "squash",
    "squash_",
]


def squash_(
    model: nn.Module,
    masks: Masks | Any,
    mode: str = "auto",
    example: Batch | None = None,
    *,
    check_batches: Iterable[Batch] = (),
    channel_multiple: int | None = None,
    one_head_count: bool = False,
) -> SquashResult:
    """Bake ``masks`` (a :class:`Masks` or a live ``ActivationSparsifier`` after
    ``step()``) into ``model`` in place; returns the model and what each layer got.

    ``example`` (a batch as the model takes it: tensor, tuple or dict of tensors)
    lets ``prune`` and ``auto`` see the model's dataflow; ``prune`` needs one. The
    pruned model is checked against ``mul`` on ``example`` and ``check_batches``.
    With an example, ``fold`` also refuses a layer whose weight the model's code
    reads outside the layer (``F.linear(h, self.fc.weight)``: folding would change
    that read), where ``auto`` keeps such a mask a multiply.
    Pruned convolutions keep a multiple of ``channel_multiple`` channels (default
    ``CONV_CHANNEL_MULTIPLE``; 1 keeps exactly the unmasked ones).
    ``one_head_count``: every attention layer must keep one number of heads (a decoder exported
    with a cache, whose runtime's config says one): where the masks remove different numbers (or a number
    its config cannot say), ``auto`` folds the heads' masks and ``prune`` refuses. Where every layer keeps one
    number of heads, the model's config says the new counts (:func:`~actsparse_deploy.nn.attention.describe_heads`).
    """
    plan = plan_squash(model, masks, mode, example, channel_multiple=channel_multiple)
    checks = list(check_batches)
    if one_head_count and (problem := head_count_problem(model, plan)) is not None:
        if mode != "auto":
            raise SquashError(f"a decoder exported with a cache keeps one number of attention heads in every layer, which its config "
                              f"says, and the masks leave heads it cannot say: {problem}; give every attention output one level whose "
                              "count the config takes, or export with --no-cache")
        plan = without_heads(plan, problem, Because.HEADS_UNEVEN)
    heads = any(layer.reason is Reason.HEADS for layer in plan.layers.values())
    try:
        result = apply_plan(model, plan, checks)
    except SquashError as e:  # auto: heads whose removal the model's code does not follow are folded (the model as it was)
        if mode != "auto" or not heads:
            raise
        return apply_plan(model, without_heads(plan, first_line(e, 200)), checks)
    if heads:  # pruned heads, one number in every layer: the config says it (a cache's layout, a loader's shapes)
        describe_heads(model)
    return result


def squash(
    model: nn.Module,
    masks: Masks | Any,
    mode: str = "auto",
    example: Batch | None = None,
    *,
    check_batches: Iterable[Batch] = (),
    channel_multiple: int | None = None,
    one_head_count: bool = False,
) -> SquashResult:
    """Like :func:`squash_` on a deep copy: ``model`` is left as it was."""
    return squash_(copy.deepcopy(model), masks, mode, example, check_batches=check_batches, channel_multiple=channel_multiple,
                   one_head_count=one_head_count)
