"""Squash, step 1 of 3: the plan. Every check and every decision, before any change:
per masked layer, the mode it gets (``mul``, ``fold`` or ``prune``), the input
features it keeps, the layers that lose the same features with it, and why, as
codes (:class:`Reason`, :class:`Because`). :mod:`.apply` changes the model from
the plan; :mod:`.explain` says the codes in words. :func:`~actsparse_deploy.bake.squash.squash_`
is the three in a row.

    >>> import torch
    >>> from torch import nn
    >>> from actsparse_deploy import Recipe, calibrate
    >>> from actsparse_deploy.bake.plan import plan_squash
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> masks = calibrate(model, Recipe.simple(layers=["2"], sparsity=0.5), [torch.randn(16, 4)])
    >>> layer = plan_squash(model, masks, "prune", example=torch.randn(2, 4)).layers["2"]
    >>> layer.mode, layer.reason, layer.producers, layer.features, layer.removed
    ('prune', <Reason.PRUNED: 'pruned'>, ('0',), 8, 4)
    >>> plan_squash(model, masks, "mul").layers["2"].reason
    <Reason.ASKED_MUL: 'asked-mul'>
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import torch
from torch import nn

from ..base.constants import MODES
from ..base.errors import ConfigError, MaskError, SquashError
from ..calibration.masks import LayerMask, Masks
from ..data.batches import Batch
from ..nn.attention import HEAD_FIELDS, Heads, attention_outputs, find_heads, head_blocks, head_config_refusal
from ..nn.layers import LayerKind, WeightedKind, layer_kind, why_unregistered
from .graph import Dataflow

__all__ = [
    "CONV_CHANNEL_MULTIPLE",
    "FOLD_WORDS",
    "Because",
    "Edits",
    "LayerPlan",
    "Prepared",
    "Reason",
    "SquashPlan",
    "fold_vector",
    "layer_edits",
    "plan_squash",
    "without_heads",
]

#: onnxruntime's CPU convolutions run blocked by 8 channels: 14 channels ran
#: slower than 16 (digits CNN, tools/benchmark.py), so pruned convs keep a multiple.
CONV_CHANNEL_MULTIPLE = 8

#: what :func:`fold_vector` says of a mask it can fold (and the reason of a folded layer)
FOLD_WORDS = "one value per input feature: folded into the weight"


class Reason(StrEnum):
    """Why a layer gets its mode (:attr:`LayerPlan.reason`)."""

    #: mul: asked for
    ASKED_MUL = "asked-mul"
    #: mul: the layer or the mask's shape cannot fold (:attr:`LayerPlan.note`: the layer kind's words)
    CANNOT_FOLD = "cannot-fold"
    #: mul: the model's code reads the layer's weight outside the layer (note: where)
    READ_ELSEWHERE = "read-elsewhere"
    #: fold: one mask value per input feature, multiplied into the weight
    FOLDED = "folded"
    #: fold (auto): folded, not pruned (:attr:`LayerPlan.because` says why)
    NOT_PRUNED = "not-pruned"
    #: prune: the producers and this layer lose the removed features
    PRUNED = "pruned"
    #: prune: only this layer loses them, the kept ones gathered before it (note: why its producer keeps them)
    GATHERED = "gathered"
    #: prune: no feature is removed (because says why); the mask is folded
    NOTHING_REMOVED = "nothing-removed"
    #: prune: whole attention heads removed: the query, key and value projections lose their rows, this layer its inputs
    HEADS = "heads"


class Because(StrEnum):
    """The detail of a reason (:attr:`LayerPlan.because`): why masked features
    stay (``PRUNED``, ``GATHERED``) or why nothing is pruned (``NOT_PRUNED``, ``NOTHING_REMOVED``)."""

    #: one masked feature stays so that no tensor is empty
    EMPTY = "empty"
    #: masked channels stay so that a multiple of ``channel_multiple`` is kept
    ALIGNED = "aligned"
    #: a depthwise conv's input channels are its output channels: it cannot lose them alone
    PER_FEATURE = "per-feature"
    #: every channel is kept (a multiple of ``channel_multiple``)
    KEPT_WHOLE = "kept-whole"
    #: no mask value is 0
    NO_ZERO = "no-zero"
    #: only this layer could lose them (its producer keeps them: note says why), a gather auto does not choose
    CONSUMER_ONLY = "consumer-only"
    #: whole attention heads, but the model did not compute the same with them removed (note: how it failed)
    HEADS_FAILED = "heads-failed"
    #: whole attention heads, but other layers keep another number of them, which a decoder's cache cannot describe (note)
    HEADS_UNEVEN = "heads-uneven"


#: a layer's new (weight, bias) from its masks; either may be None (that parameter stays)
Edits = tuple[torch.Tensor | None, torch.Tensor | None]


@dataclass(frozen=True)
class LayerPlan:
    """What squash does to one layer, and why (codes: :func:`~actsparse_deploy.bake.explain.explain` words them)."""

    name: str
    #: "mul", "fold" or "prune"
    mode: str
    reason: Reason
    because: Because | None = None
    #: the words of the layer kind or of the dataflow analysis the reason quotes
    note: str = ""
    #: the layer's input features, where its mask has one value per feature (else 0)
    features: int = 0
    #: of them, those whose mask value is 0
    masked: int = 0
    #: prune, where features are removed: the input features kept (sorted indices)
    kept: torch.Tensor | None = field(default=None, compare=False)
    #: ``PRUNED``: the layers that make the input features (they lose the same output features)
    producers: tuple[str, ...] = ()
    #: ``PRUNED``: per-feature layers between them and this layer (they lose them too)
    norms: tuple[str, ...] = ()
    #: the sparsity achieved (see :attr:`~actsparse_deploy.bake.squash.SquashResult.sparsity`)
    sparsity: float = 0.0
    #: the compensation baked in with the mask ("none" without edits, "edits" where the masks do not say)
    compensate: str = "none"
    #: what the masks replace: "weight", "bias"
    edited: tuple[str, ...] = ()
    #: the selection method that chose the mask (None: a recipe's mask_fn)
    method: str | None = None
    #: ``HEADS``: the attention heads of this layer's input (:class:`~actsparse_deploy.nn.attention.Heads`)
    heads: Heads | None = None

    @property
    def rows(self) -> dict[str, torch.Tensor]:
        """The output features each producer keeps: ``HEADS``, the query, key and value rows of the
        heads kept; ``PRUNED``, the kept input features, in every producer and norm."""
        if self.kept is None:
            return {}
        if self.heads is not None:
            return self.heads.rows(self.kept)
        return {name: self.kept for name in (*self.producers, *self.norms)}

    @property
    def removed(self) -> int:
        """How many input features the layer loses."""
        return self.features - self.kept.numel() if self.kept is not None else 0


@dataclass(frozen=True)
class Prepared:
    """One masked layer, checked: what the planner decides on and the applier changes it with."""

    layer: nn.Module
    layer_mask: LayerMask
    #: the mask as one tensor (mul)
    mask: torch.Tensor
    #: one value per input feature (fold; prune's scale), None where it cannot fold (``why`` says why)
    vector: torch.Tensor | None
    why: str
    edits: Edits
    #: the input-feature axis, negative (a gather's), None where not fixed from the right
    axis: int | None


@dataclass
class SquashPlan:
    """Every layer's plan and checked masks, in the masks' order."""

    #: the mode asked for
    mode: str
    layers: dict[str, LayerPlan]
    prepared: dict[str, Prepared]
    #: prune / auto with an example: the applier swaps modules and checks the model against mul on ``example``
    traced: bool = False
    example: Batch | None = None
    channel_multiple: int = CONV_CHANNEL_MULTIPLE

    @property
    def modes(self) -> dict[str, str]:
        return {name: layer.mode for name, layer in self.layers.items()}


# --- checks of one layer's masks -------------------------------------------------------


def _foldable(layer: nn.Module) -> tuple[LayerKind | None, int | None, str]:
    """The layer's kind and the input-feature axis (negative, from the right) a
    fold would scale, or None and why it cannot fold."""
    kind = layer_kind(layer)
    if kind is None:
        return None, None, why_unregistered(layer)
    why = kind.why_not_foldable(layer)
    axis = kind.feature_axis(layer) if why is None else None
    if why is None and axis is None:
        why = f"{type(layer).__name__} has no input-feature axis fixed from the right to fold along"
    return kind, axis, why or ""


def _feature_axis(layer: nn.Module) -> int | None:
    """The input-feature axis (negative, from the right) a fold would scale, or None."""
    return _foldable(layer)[1]


def _n_features(layer: nn.Module) -> int:
    kind = layer_kind(layer)
    assert kind is not None
    return kind.in_features(layer)


def fold_vector(layer: nn.Module, mask: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """The per-input-feature scale a fold would apply, or None and why not."""
    _, axis, why = _foldable(layer)
    if axis is None:
        return None, why
    shape = (1,) * max(0, -axis - mask.ndim) + tuple(mask.shape)
    others = [size for i, size in enumerate(shape) if i != len(shape) + axis]
    if any(size != 1 for size in others):
        return None, f"mask of shape {list(mask.shape)} varies along more than the input-feature axis"
    n = _n_features(layer)
    vector = mask.reshape(-1)
    if vector.numel() not in (1, n):
        raise MaskError(f"mask of shape {list(mask.shape)} does not fit a layer with {n} input features")
    return vector.expand(n).clone(), FOLD_WORDS


def _dense(name: str, layer: nn.Module, lm: LayerMask) -> torch.Tensor:
    """The layer's mask as one tensor, after checking the input size the masks
    declare against the layer (before a tensor of that size is made)."""
    axis = _feature_axis(layer)
    if axis is not None and lm.input_shape is not None and len(lm.input_shape) >= -axis:
        n = _n_features(layer)
        if lm.input_shape[axis] != n:
            raise MaskError(
                f"mask of layer {name!r} declares input shape {list(lm.input_shape)} (one sample), but the layer "
                f"takes {n} input features: the masks come from another model"
            )
    return lm.dense().detach()


def _check_fits(name: str, layer: nn.Module, mask: torch.Tensor, lm: LayerMask) -> None:
    axis = _feature_axis(layer)
    if axis is not None and mask.ndim >= -axis and mask.shape[axis] not in (1, _n_features(layer)):
        raise MaskError(
            f"mask of layer {name!r} has shape {list(mask.shape)} but the layer takes {_n_features(layer)} "
            "input features: the masks come from another model"
        )
    if lm.input_shape is not None and mask.ndim > len(lm.input_shape) and mask.shape[0] != 1:
        raise MaskError(
            f"mask of layer {name!r} has shape {list(mask.shape)}, with a batch axis: it only fits one batch "
            "size and cannot be baked into the model (use built-in functions, whose masks have no batch axis)"
        )


def layer_edits(name: str, layer: nn.Module, lm: LayerMask) -> Edits:
    """The new weight and bias ``lm`` gives the layer (compensation, see
    :mod:`actsparse_deploy.calibration.compensate`), checked against the layer: a weight of
    the layer's weight's shape in the ``(out, in, *kernel)`` layout of a masks
    file (returned in the layer's own, through its kind; a ``native`` one, from
    a file of 0.1.0, is the layer's own already), a bias of one value per
    output feature, both finite floating point. ``(None, None)`` where the mask
    comes without edits."""
    weight, bias = getattr(lm, "weight", None), getattr(lm, "bias", None)
    if weight is None and bias is None:
        return None, None
    given = " and ".join(what for what, t in (("weight", weight), ("bias", bias)) if t is not None)
    kind, current = layer_kind(layer), getattr(layer, "weight", None)
    if not isinstance(kind, WeightedKind) or not isinstance(current, torch.Tensor):
        why = why_unregistered(layer) if kind is None else f"{type(layer).__name__} has no weight and bias to replace"
        raise MaskError(
            f"layer {name!r}: the masks give it a new {given} (compensation), but {why}: the masks come from another model"
        )
    native = getattr(lm, "weight_layout", "out-in") == "native"
    standard = current if native else kind.standard_weight(layer)
    expected = {"weight": tuple(standard.shape), "bias": (kind.out_features(layer),)}
    for what, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check_edit(name, what, t, expected[what])
    if weight is not None and not native:
        weight = kind.native_weight(layer, weight).contiguous()
    return weight, bias


def _check_edit(name: str, what: str, t: Any, expected: tuple[int, ...]) -> None:
    """One new parameter of the masks: floating point, of the ``expected`` shape, finite."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        kind_of = str(t.dtype).removeprefix("torch.") if isinstance(t, torch.Tensor) else type(t).__name__
        raise MaskError(f"layer {name!r}: the new {what} in the masks (compensation) is {kind_of}, not floating point")
    if tuple(t.shape) != expected:
        raise MaskError(
            f"layer {name!r}: the masks give it a new {what} of shape {list(t.shape)} (compensation), but the layer "
            f"needs {list(expected)}: the masks come from another model"
        )
    if not bool(torch.isfinite(t).all()):
        raise MaskError(f"layer {name!r}: the new {what} in the masks (compensation) holds NaN or Inf: calibrate again")


def _compensation(lm: LayerMask, edits: Edits) -> str:
    """The row's ``compensate``: the masks' kind of compensation; "none" without edits."""
    how = getattr(lm, "compensate", None)
    if edits == (None, None):
        return "none"
    return str(how) if how and how != "none" else "edits"


def _prepare(model: nn.Module, masks: Masks, refuse: str | None, traced: bool) -> dict[str, Prepared]:
    """Every layer's masks checked and made ready, before any change (an error
    leaves the model as it was). ``refuse``: "folded" / "pruned", where a mask
    that cannot fold is an error. The traced path reads the edits before the fold
    vector, the other after it (which error a layer with two shows first)."""
    modules = dict(model.named_modules())
    prepared = {}
    for name in masks:
        layer, lm = modules[name], masks[name]
        mask = _dense(name, layer, lm)
        _check_fits(name, layer, mask, lm)
        edits = layer_edits(name, layer, lm) if traced else None
        vector, why = fold_vector(layer, mask)
        if refuse is not None and vector is None:
            raise SquashError(f"layer {name!r} cannot be {refuse}: {why}; use mode='mul' or 'auto'")
        if edits is None:
            edits = layer_edits(name, layer, lm)
        prepared[name] = Prepared(layer, lm, mask, vector, why, edits, _feature_axis(layer))
    return prepared


def _layer(name: str, prep: Prepared, mode: str, reason: Reason, **facts: Any) -> LayerPlan:
    """One layer's plan: ``facts`` over what its checked masks say."""
    lm, vector = prep.layer_mask, prep.vector
    common: dict[str, Any] = {
        "features": vector.numel() if vector is not None else 0,
        "masked": int((vector == 0).sum()) if vector is not None else 0,
        "sparsity": lm.sparsity,
        "compensate": _compensation(lm, prep.edits),
        "edited": tuple(what for what, t in zip(("weight", "bias"), prep.edits) if t is not None),
        "method": getattr(lm, "method", None),
    }
    return LayerPlan(name, mode, reason, **{**common, **facts})


# --- the planner -----------------------------------------------------------------------


def plan_squash(
    model: nn.Module, masks: Masks | Any, mode: str = "auto", example: Batch | None = None, *, channel_multiple: int | None = None
) -> SquashPlan:
    """The plan of :func:`~actsparse_deploy.bake.squash.squash_` (same arguments,
    same checks and errors): the model is not changed."""
    if mode not in MODES:
        raise SquashError(f"unknown squash mode {mode!r}; known: {', '.join(MODES)}")
    if not isinstance(masks, Masks):
        masks = Masks.from_sparsifier(masks)
    masks.check()  # the tensors may have changed since the masks were made
    modules = dict(model.named_modules())
    unknown = [name for name in masks if name not in modules]
    if unknown:
        raise MaskError(
            f"masks name layer(s) {', '.join(unknown)} that the model does not have: the masks come from another model"
        )
    if mode == "prune" and example is None:
        raise SquashError(
            "prune needs an example batch (squash(model, masks, 'prune', example=batch)): it traces the model "
            "on it to find which layers make each masked layer's input, and checks the pruned model on it"
        )
    multiple = CONV_CHANNEL_MULTIPLE if channel_multiple is None else channel_multiple
    traced = example is not None and mode in ("prune", "auto")
    if traced and "" in masks.layers:
        raise SquashError("a mask on the model itself (layer '') cannot be squashed: mask its layers instead")
    prepared = _prepare(model, masks, {"fold": "folded", "prune": "pruned"}.get(mode), traced)
    if traced:
        assert example is not None
        layers = _plan_traced(model, mode, example, prepared, multiple)
    else:
        layers = _plan_direct(model, mode, example, prepared)
    return SquashPlan(mode, layers, prepared, traced, example, multiple)


def _plan_direct(model: nn.Module, mode: str, example: Batch | None, prepared: dict[str, Prepared]) -> dict[str, LayerPlan]:
    """mul, fold, and auto without an example: fold where the mask folds, else mul."""
    if mode == "fold" and example is not None:
        _check_reads(model, example, list(prepared))
    layers = {}
    for name, prep in prepared.items():
        if mode != "mul" and prep.vector is not None:
            layers[name] = _layer(name, prep, "fold", Reason.FOLDED)
        elif mode == "mul":
            layers[name] = _layer(name, prep, "mul", Reason.ASKED_MUL)
        else:
            layers[name] = _layer(name, prep, "mul", Reason.CANNOT_FOLD, note=prep.why)
    return layers


def _check_reads(model: nn.Module, example: Batch, names: list[str]) -> None:
    """``fold`` with an example: refuse a layer whose weight the model's code also
    reads outside the layer (folding would change that read too). Where the
    model's dataflow cannot be captured, fold goes on unchecked, as without an example."""
    try:
        flow = Dataflow(model, example)
    except (SquashError, MaskError):
        return
    for name in names:
        if (elsewhere := flow.read_elsewhere(name)) is not None:
            raise SquashError(f"layer {name!r} cannot be folded: {elsewhere}, which the mask must not change; use mode='mul' or 'auto'")


def _plan_traced(model: nn.Module, mode: str, example: Batch, prepared: dict[str, Prepared], multiple: int) -> dict[str, LayerPlan]:
    """prune, and auto with an example: every layer planned on the original graph."""
    flow: Dataflow | None = None
    flow_error = ""
    if any(prep.vector is not None for prep in prepared.values()):
        try:
            flow = Dataflow(model, example)
        except (SquashError, MaskError) as e:  # MaskError: an example the analysis cannot read
            if mode == "prune":
                raise
            flow_error = str(e)
    layers = {name: _traced_layer(name, prep, mode, flow, flow_error, tuple(prepared), multiple) for name, prep in prepared.items()}
    return {name: _as_heads(model, layer, prepared[name]) for name, layer in layers.items()}


def _as_heads(model: nn.Module, layer: LayerPlan, prep: Prepared) -> LayerPlan:
    """A layer whose producer the dataflow walk could not find (it ends at the attention's
    matmuls) but whose input is attention heads and whose mask removes whole heads: the
    query, key and value projections lose the heads' rows (``HEADS``); else the plan as it was."""
    vector = prep.vector
    if layer.mode == "mul" or vector is None or not bool((vector == 0).any()) or layer.reason is Reason.PRUNED:
        return layer
    try:
        heads = find_heads(model, layer.name)
    except ConfigError:
        return layer
    if not head_blocks(vector, heads.block):
        return layer
    kept = torch.nonzero(vector != 0).flatten()
    because = None
    if kept.numel() == 0:  # keep one group of heads, multiplied by 0, so no tensor is empty
        kept, because = torch.arange(heads.block), Because.EMPTY
    return _layer(layer.name, prep, "prune", Reason.HEADS, because=because, kept=kept, heads=heads,
                  producers=(heads.query, heads.key, heads.value), sparsity=(vector.numel() - kept.numel()) / vector.numel())


def _traced_layer(
    name: str, prep: Prepared, mode: str, flow: Dataflow | None, flow_error: str, masked: tuple[str, ...], multiple: int
) -> LayerPlan:
    """One layer's plan on the graph: prune where features go and the producers
    can lose them too (prune mode: gather where only this layer can), else fold, else mul."""
    vector = prep.vector
    if vector is None:  # auto: neither prune nor fold
        return _layer(name, prep, "mul", Reason.CANNOT_FOLD, note=prep.why)
    if flow is not None and (elsewhere := flow.read_elsewhere(name)) is not None:
        if mode == "prune":
            raise SquashError(f"layer {name!r} cannot be pruned: {elsewhere}, which the mask must not change; use mode='mul' or 'auto'")
        return _layer(name, prep, "mul", Reason.READ_ELSEWHERE, note=elsewhere)
    n = vector.numel()
    kept, because = _kept(vector, prep.layer, multiple)
    removed = n - kept.numel()
    chain, not_why = flow.producer(name, masked) if flow is not None else (None, flow_error)
    kind = layer_kind(prep.layer)
    per_feature = bool(removed) and kind is not None and kind.is_per_feature(prep.layer)
    if per_feature:  # depthwise: in and out channels together
        removed, chain = 0, None
    if removed and chain is not None:
        return _layer(name, prep, "prune", Reason.PRUNED, because=because, kept=kept, producers=chain.producers,
                      norms=chain.norms, sparsity=removed / n)
    if removed and mode == "prune":
        return _layer(name, prep, "prune", Reason.GATHERED, because=because, kept=kept, note=not_why, sparsity=removed / n)
    nothing = Because.PER_FEATURE if per_feature else Because.KEPT_WHOLE if bool((vector == 0).any()) else Because.NO_ZERO
    if mode == "prune":
        return _layer(name, prep, "prune", Reason.NOTHING_REMOVED, because=nothing)
    if removed:  # only the consumer could lose them: a gather, which auto does not choose
        return _layer(name, prep, "fold", Reason.NOT_PRUNED, because=Because.CONSUMER_ONLY, note=not_why)
    return _layer(name, prep, "fold", Reason.NOT_PRUNED, because=nothing)


def without_heads(plan: SquashPlan, why: str, because: Because = Because.HEADS_FAILED) -> SquashPlan:
    """``plan`` with its ``HEADS`` layers folded instead (auto, where the model did not compute the same
    with the heads removed, or ``because`` another reason: ``why``)."""
    layers = {name: _layer(name, plan.prepared[name], "fold", Reason.NOT_PRUNED, because=because, note=why)
              if layer.reason is Reason.HEADS else layer for name, layer in plan.layers.items()}
    return replace(plan, layers=layers)


def head_count_problem(model: nn.Module, plan: SquashPlan) -> str | None:
    """Why the model's config cannot say the attention heads ``plan`` leaves (a decoder's cache is laid out by
    its config, one number of heads for every layer): which layers keep how many where they differ, or
    the config's own refusal of the count (:func:`~actsparse_deploy.nn.attention.head_config_refusal`); None where it can."""
    left: dict[str, tuple[int, int, int]] = {}
    said: list[str] = []
    for name in attention_outputs(model):
        heads, layer = find_heads(model, name), plan.layers.get(name)
        kept = layer.kept if layer is not None and layer.reason is Reason.HEADS and layer.kept is not None else None
        count = kept.numel() // heads.head_dim if kept is not None else heads.heads
        left[name] = (count, count // heads.group, heads.head_dim)
        said.append(f"{name} keeps {count} of {heads.heads}")
    if len(set(left.values())) > 1:
        return "; ".join(said)
    return head_config_refusal(model, dict(zip(HEAD_FIELDS, next(iter(left.values()))))) if left else None


def _kept(vector: torch.Tensor, layer: nn.Module, multiple: int) -> tuple[torch.Tensor, Because | None]:
    """The input features a pruned layer keeps (the unmasked ones), and why masked ones stay, if any."""
    n = vector.numel()
    kept = torch.nonzero(vector != 0).flatten()
    because = None
    if kept.numel() == 0:  # keep one feature, multiplied by 0, so no tensor is empty
        kept = torch.zeros(1, dtype=torch.long)
        because = Because.EMPTY
    if getattr(layer_kind(layer), "aligned", False):
        aligned = _aligned(kept, n, multiple)
        if aligned.numel() > kept.numel():
            because = Because.ALIGNED
        kept = aligned
    return kept, because


def _aligned(kept: torch.Tensor, n: int, multiple: int) -> torch.Tensor:
    """``kept`` grown to a multiple of ``multiple`` (at most ``n``) with the first
    masked features; those stay, scaled by their mask value 0: still exact."""
    target = min(n, -(-kept.numel() // multiple) * multiple)
    if kept.numel() >= target:
        return kept
    is_kept = torch.zeros(n, dtype=torch.bool)
    is_kept[kept] = True
    masked = torch.nonzero(~is_kept).flatten()
    return torch.sort(torch.cat([kept, masked[: target - kept.numel()]])).values
