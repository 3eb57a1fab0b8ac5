"""Squash, step 3 of 3: the plan's codes in words. What each layer's row says
(:attr:`~actsparse_deploy.bake.squash.SquashResult.reasons`, the reports, the
metadata of a ``.pt2`` or ONNX file) is rendered here from its
:class:`~actsparse_deploy.bake.plan.LayerPlan`, and only here.

    >>> import torch
    >>> from actsparse_deploy.bake.explain import explain
    >>> from actsparse_deploy.bake.plan import Because, LayerPlan, Reason
    >>> explain(LayerPlan("fc", "prune", Reason.PRUNED, features=8, masked=4, kept=torch.arange(4), producers=("up",)))
    'removed 4 of 8 features from up and this layer'
    >>> explain(LayerPlan("fc", "fold", Reason.NOT_PRUNED, Because.NO_ZERO, compensate="lstsq", edited=("weight", "bias")))
    'one value per input feature: folded into the weight (not pruned: no mask value is 0); compensated (lstsq): new weight and bias'
"""

from __future__ import annotations

from collections.abc import Callable

from .plan import CONV_CHANNEL_MULTIPLE, FOLD_WORDS, Because, LayerPlan, Reason

__all__ = ["GATHER_COST", "GATHER_NOT_AUTO", "PER_FEATURE_CONSUMER", "edit_note", "explain"]

#: prune where only the consumer can lose features: an index_select in front of the
#: smaller layer, which costs more than the smaller matmul saves (a Llama MLP
#: ran 1.19-1.23x dense in issue 11). What the reasons say about it:
GATHER_COST = "the gather may run slower than dense"
GATHER_NOT_AUTO = "a gather before this layer alone runs slower than dense, so auto does not choose it"
PER_FEATURE_CONSUMER = "a depthwise conv's input channels are its output channels: it cannot lose them alone"


def explain(layer: LayerPlan, channel_multiple: int = CONV_CHANNEL_MULTIPLE) -> str:
    """The reason ``squash`` gives for ``layer``'s mode, with what its compensation
    changed; ``channel_multiple``: the plan's (what pruned convs keep a multiple of)."""
    return _WORDS[layer.reason](layer, channel_multiple) + edit_note(layer)


def edit_note(layer: LayerPlan) -> str:
    """What the reason of an edited layer adds: ``; compensated (lstsq): new weight and bias``."""
    if not layer.edited:
        return ""
    given = " and ".join(layer.edited)
    if layer.compensate == "edits":
        return f"; compensated: new {given} from the masks"
    return f"; compensated ({layer.compensate}): new {given}"


def _unpruned(layer: LayerPlan, multiple: int) -> str:
    """Why nothing of the layer is pruned (``NOT_PRUNED``, ``NOTHING_REMOVED``)."""
    if layer.because is Because.CONSUMER_ONLY:
        return f"{layer.note}; {GATHER_NOT_AUTO}"
    if layer.because is Because.PER_FEATURE:
        return PER_FEATURE_CONSUMER
    if layer.because is Because.HEADS_FAILED:
        return f"its mask removes whole attention heads, but the model does not compute the same without them ({layer.note})"
    if layer.because is Because.HEADS_UNEVEN:
        return (f"its mask removes whole attention heads, but a decoder with a cache keeps one number of attention heads in every "
                f"layer, which its config says ({layer.note})")
    if layer.because is Because.KEPT_WHOLE:
        return f"the {layer.features} channels are kept whole: pruned convs keep a multiple of {multiple} channels"
    return "no mask value is 0"


def _rounding(layer: LayerPlan, multiple: int) -> str:
    """Why masked features stay in a pruned layer (zeroed in the weight), if any do."""
    removed = layer.removed
    stay = layer.masked - removed
    if not (removed and stay):
        return ""
    if layer.because is Because.ALIGNED:
        kept = layer.features - removed
        why = f"{kept} channels, a multiple of {multiple}, are kept"
    else:
        why = "no tensor is empty"
    return f" ({layer.masked} are masked: {stay} {'stays' if stay == 1 else 'stay'}, zeroed in the weight, so that {why})"


def _pruned(layer: LayerPlan, multiple: int) -> str:
    via = f" (and {', '.join(layer.norms)})" if layer.norms else ""
    producer = ", ".join(layer.producers)
    return f"removed {layer.removed} of {layer.features} features from {producer}{via} and this layer{_rounding(layer, multiple)}"


def _heads(layer: LayerPlan, multiple: int) -> str:
    heads = layer.heads
    assert heads is not None and layer.kept is not None
    head = "head" if heads.heads == 1 else "heads"
    gone = layer.removed // heads.head_dim
    stay = ""
    if layer.because is Because.EMPTY:
        stay = f" ({layer.masked // heads.head_dim} are masked: one group stays, zeroed in the weight, so that no tensor is empty)"
    return (f"removed {gone} of {heads.heads} attention {head} ({layer.removed} of {layer.features} features) from "
            f"{', '.join(layer.producers)} and this layer{stay}")


def _gathered(layer: LayerPlan, multiple: int) -> str:
    return (
        f"consumer only: removed {layer.removed} of {layer.features} input features of this layer, gathered before it "
        f"(its producer keeps them: {layer.note}){_rounding(layer, multiple)}; {GATHER_COST}"
    )


_WORDS: dict[Reason, Callable[[LayerPlan, int], str]] = {
    Reason.ASKED_MUL: lambda layer, _: "asked for mul",
    Reason.CANNOT_FOLD: lambda layer, _: layer.note,
    Reason.READ_ELSEWHERE: lambda layer, _: f"{layer.note}: folding or pruning would change that read too, so the mask stays a multiply",
    Reason.FOLDED: lambda layer, _: FOLD_WORDS,
    Reason.NOT_PRUNED: lambda layer, m: f"{FOLD_WORDS} (not pruned: {_unpruned(layer, m)})",
    Reason.PRUNED: _pruned,
    Reason.GATHERED: _gathered,
    Reason.HEADS: _heads,
    Reason.NOTHING_REMOVED: lambda layer, m: f"no feature of {layer.features} is removed ({_unpruned(layer, m)}): the mask is folded into the weight",
}
