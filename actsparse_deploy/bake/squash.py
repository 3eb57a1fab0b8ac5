"""Stage 2: bake masks into the model as fixed ops, no hooks left.

Modes, per layer:

- ``mul``: the layer is wrapped in :class:`MaskedInput`, which multiplies its
  input by a constant mask buffer; any mask that broadcasts against the input;
- ``fold``: a mask that only varies along the consuming layer's input-feature
  axis (``Linear``: last axis; ``ConvNd``: channel axis; any module type with a
  registered layer kind, see :mod:`actsparse_deploy.layers`) is multiplied into
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
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from ..base.errors import DataError, MaskError, SquashError, first_line
from ..calibration.calibrate import Batch, describe_batch, run_batch
from ..calibration.masks import LayerMask, Masks
from ..data.batches import flatten_outputs
from ..nn.layers import Cut, LayerKind, WeightedKind, layer_kind, why_unregistered
from ..nn.modules import eval_mode
from .graph import Dataflow

__all__ = ["MODES", "MaskedInput", "PrunedInput", "SquashResult", "squash", "squash_"]

from ..base.constants import MODES  # noqa: E402  (one definition, light for the CLI)

#: prune vs mul on the check batches: ``|pruned - mul| <= ATOL * max(1, max|mul|) + RTOL * |mul|``.
PRUNE_RTOL = 1e-4
PRUNE_ATOL = 1e-5


class _Wrapper(nn.Module):
    """A layer wrapped in front of its input. What the wrapper does not have
    itself (``weight``, ``bias``, ``in_features``, ...) is the layer's: a model
    whose code reads ``self.fc.weight`` besides calling ``self.fc`` still runs."""

    module: nn.Module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(super().__getattr__("module"), name)


class MaskedInput(_Wrapper):
    """``module(input * mask, *rest)``: a mask baked in as a constant buffer."""

    def __init__(self, module: nn.Module, mask: torch.Tensor) -> None:
        super().__init__()
        self.module = module
        self.mask: torch.Tensor
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.module(x * self.mask, *args, **kwargs)


class PrunedInput(_Wrapper):
    """``module(input.index_select(axis, index), *rest)``: only the kept input
    features reach ``module``, a layer that has lost the others."""

    def __init__(self, module: nn.Module, index: torch.Tensor, axis: int) -> None:
        super().__init__()
        self.module = module
        self.axis = axis
        self.index: torch.Tensor
        self.register_buffer("index", index)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.module(x.index_select(self.axis, self.index), *args, **kwargs)


@dataclass
class SquashResult:
    """The squashed model and, per layer, the mode it got and why."""

    model: nn.Module
    modes: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    #: per layer, the sparsity achieved: the fraction of input features removed
    #: where prune removed some (masked features kept to round a conv's channels
    #: or to leave no tensor empty are not counted: the reason says so), else the
    #: fraction of mask values that are 0
    sparsity: dict[str, float] = field(default_factory=dict)
    #: prune / auto with an example: the largest difference of any output from
    #: the ``mul`` squash on the check batches (None when not checked)
    max_abs_diff: float | None = None
    #: per layer, the compensation baked in with the mask: the masks' kind
    #: ("bias", "lstsq"; "edits" where they do not say), "none" without edits
    compensate: dict[str, str] = field(default_factory=dict)
    #: per layer, the selection method that chose its mask (the masks' metadata; None: a recipe's mask_fn)
    method: dict[str, str | None] = field(default_factory=dict)

    def report(self) -> list[dict[str, Any]]:
        """One row per layer: layer, mode, reason, sparsity (what ``.pt2`` and ONNX metadata hold)."""
        return [
            {"layer": name, "mode": mode, "reason": self.reasons[name], "sparsity": round(self.sparsity[name], 6)}
            for name, mode in self.modes.items()
        ]

    def rows(self) -> list[dict[str, Any]]:
        """:meth:`report`'s rows with the layer's ``method`` and ``compensate`` (the reports' layer rows)."""
        return [
            {**row, "method": self.method.get(row["layer"]), "compensate": self.compensate.get(row["layer"], "none")}
            for row in self.report()
        ]


def _replace_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """``setattr(parent, child_name, new)``: the one place modules are swapped."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


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
    return vector.expand(n).clone(), "one value per input feature: folded into the weight"


def _fold(layer: nn.Module, vector: torch.Tensor) -> None:
    """The layer kind's fold: the scaled weight becomes a new parameter, so a
    weight tied to another layer (shared with it) keeps its values there."""
    kind = layer_kind(layer)
    assert kind is not None
    kind.fold(layer, vector)


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


# --- edits: the consumer's new weight / bias (compensation), applied before its mask -----------

#: a layer's new (weight, bias) from its masks; either may be None (that parameter stays)
Edits = tuple[torch.Tensor | None, torch.Tensor | None]


def _edits(name: str, layer: nn.Module, lm: LayerMask) -> Edits:
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
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            kind_of = str(t.dtype).removeprefix("torch.") if isinstance(t, torch.Tensor) else type(t).__name__
            raise MaskError(f"layer {name!r}: the new {what} in the masks (compensation) is {kind_of}, not floating point")
        if tuple(t.shape) != expected[what]:
            raise MaskError(
                f"layer {name!r}: the masks give it a new {what} of shape {list(t.shape)} (compensation), but the layer "
                f"needs {list(expected[what])}: the masks come from another model"
            )
        if not bool(torch.isfinite(t).all()):
            raise MaskError(f"layer {name!r}: the new {what} in the masks (compensation) holds NaN or Inf: calibrate again")
    if weight is not None and not native:
        weight = kind.native_weight(layer, weight).contiguous()
    return weight, bias


def _apply_edits(layer: nn.Module, edits: Edits) -> None:
    """Replace the layer's weight / bias with new parameters (in its dtype and on
    its device), in place; a layer without a bias gains one. A parameter tied to
    another layer keeps its values there."""
    weight, bias = edits
    current = layer.weight
    assert isinstance(current, torch.Tensor)  # checked by _edits
    with torch.no_grad():
        if weight is not None:
            new = weight.detach().to(dtype=current.dtype, device=current.device).clone()
            layer.weight = nn.Parameter(new, requires_grad=current.requires_grad)
        if bias is not None:
            old = getattr(layer, "bias", None)
            grad = old.requires_grad if isinstance(old, torch.Tensor) else current.requires_grad
            layer.bias = nn.Parameter(bias.detach().to(dtype=current.dtype, device=current.device).clone(), requires_grad=grad)


def _edited(layer: nn.Module, edits: Edits) -> nn.Module:
    """A copy of ``layer`` with the edits applied (prune swaps modules, never changes them)."""
    new = copy.deepcopy(layer)
    _apply_edits(new, edits)
    return new


def _edit_note(lm: LayerMask, edits: Edits) -> str:
    """What the reason of an edited layer adds: ``compensated (lstsq): new weight and bias``."""
    given = " and ".join(what for what, t in zip(("weight", "bias"), edits, strict=True) if t is not None)
    how = getattr(lm, "compensate", None)
    return f"; compensated ({how}): new {given}" if how and how != "none" else f"; compensated: new {given} from the masks"


def _compensation(lm: LayerMask, edits: Edits) -> str:
    """The row's ``compensate``: the masks' kind of compensation; "none" without edits."""
    how = getattr(lm, "compensate", None)
    if edits == (None, None):
        return "none"
    return str(how) if how and how != "none" else "edits"


def _gathered(layer: nn.Module, index: torch.Tensor, axis: int) -> PrunedInput:
    return PrunedInput(layer, index.to(next(layer.parameters()).device), axis)


def _masked(layer: nn.Module, mask: torch.Tensor) -> MaskedInput:
    weight = next(layer.parameters(), None)
    dtype = weight.dtype if weight is not None and weight.is_floating_point() else mask.dtype
    return MaskedInput(layer, mask.to(dtype).clone())


def squash_(
    model: nn.Module,
    masks: Masks | Any,
    mode: str = "auto",
    example: Batch | None = None,
    *,
    check_batches: Iterable[Batch] = (),
    channel_multiple: int | None = None,
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
    """
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
    if example is not None and mode in ("prune", "auto"):
        multiple = CONV_CHANNEL_MULTIPLE if channel_multiple is None else channel_multiple
        return _squash_pruning(model, masks, mode, example, list(check_batches), multiple)
    result = SquashResult(model)
    plan = []
    for name in masks:  # every check before any change: an error leaves the model as it was
        layer = modules[name]
        mask = _dense(name, layer, masks[name])
        _check_fits(name, layer, mask, masks[name])
        vector, why = fold_vector(layer, mask)
        if mode == "fold" and vector is None:
            raise SquashError(f"layer {name!r} cannot be folded: {why}; use mode='mul' or 'auto'")
        plan.append((name, masks[name], layer, mask, vector, why, _edits(name, layer, masks[name])))
    if mode == "fold" and example is not None:
        _check_reads(model, example, [name for name, *_ in plan])
    for name, lm, layer, mask, vector, why, edits in plan:
        if edits != (None, None):  # the new weight / bias first: the mask scales or gathers its input
            _apply_edits(layer, edits)
        result.compensate[name], result.method[name] = _compensation(lm, edits), getattr(lm, "method", None)
        if mode != "mul" and vector is not None:
            _fold(layer, vector)
            result.modes[name], result.reasons[name] = "fold", why
        else:
            _replace_module(model, name, _masked(layer, mask))
            result.modes[name] = "mul"
            result.reasons[name] = "asked for mul" if mode == "mul" else why
        if edits != (None, None):
            result.reasons[name] += _edit_note(lm, edits)
        result.sparsity[name] = lm.sparsity
    return result


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


def squash(
    model: nn.Module,
    masks: Masks | Any,
    mode: str = "auto",
    example: Batch | None = None,
    *,
    check_batches: Iterable[Batch] = (),
    channel_multiple: int | None = None,
) -> SquashResult:
    """Like :func:`squash_` on a deep copy: ``model`` is left as it was."""
    return squash_(copy.deepcopy(model), masks, mode, example, check_batches=check_batches, channel_multiple=channel_multiple)


# --- prune ---------------------------------------------------------------------------


def _shrunk(layer: nn.Module, cut: Cut) -> nn.Module:
    """A copy of ``layer`` (same class) with the cut applied by its layer kind."""
    kind = layer_kind(layer)
    assert kind is not None
    return kind.shrink(layer, cut)


#: onnxruntime's CPU convolutions run blocked by 8 channels: 14 channels ran
#: slower than 16 (digits CNN, tools/benchmark.py), so pruned convs keep a multiple.
CONV_CHANNEL_MULTIPLE = 8


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


def _nothing_removed(vector: torch.Tensor, n: int, multiple: int) -> str:
    if bool((vector == 0).any()):
        return f"the {n} channels are kept whole: pruned convs keep a multiple of {multiple} channels"
    return "no mask value is 0"


#: prune where only the consumer can lose features: an index_select in front of the
#: smaller layer, which costs more than the smaller matmul saves (a Llama MLP
#: ran 1.19-1.23x dense in issue 11). What the reasons say about it:
_GATHER_COST = "the gather may run slower than dense"
_GATHER_NOT_AUTO = "a gather before this layer alone runs slower than dense, so auto does not choose it"
_PER_FEATURE_CONSUMER = "a depthwise conv's input channels are its output channels: it cannot lose them alone"


def _depth(fqn: str) -> int:
    return fqn.count(".") + 1 if fqn else 0


def _squash_pruning(
    model: nn.Module, masks: Masks, mode: str, example: Batch, check_batches: list[Batch], channel_multiple: int
) -> SquashResult:
    """``prune`` and ``auto`` with an example: plan every layer on the original
    graph, apply the plan (module swaps only), check it against ``mul``, undo on failure."""
    if "" in masks.layers:
        raise SquashError("a mask on the model itself (layer '') cannot be squashed: mask its layers instead")
    result = SquashResult(model)
    layers: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor | None, str]] = {}
    edits: dict[str, Edits] = {}
    for name in masks:
        lm = masks[name]
        layer = model.get_submodule(name)
        mask = _dense(name, layer, lm)
        _check_fits(name, layer, mask, lm)
        edits[name] = _edits(name, layer, lm)
        result.compensate[name], result.method[name] = _compensation(lm, edits[name]), getattr(lm, "method", None)
        vector, why = fold_vector(layer, mask)
        if mode == "prune" and vector is None:
            raise SquashError(f"layer {name!r} cannot be pruned: {why}; use mode='mul' or 'auto'")
        layers[name] = (layer, mask, vector, why)
        result.sparsity[name] = lm.sparsity
    flow: Dataflow | None = None
    flow_error = ""
    if any(vector is not None for _, _, vector, _ in layers.values()):
        try:
            flow = Dataflow(model, example)
        except (SquashError, MaskError) as e:  # MaskError: an example the analysis cannot read
            if mode == "prune":
                raise
            flow_error = str(e)
    reference = squash_(copy.deepcopy(model), masks, "mul").model  # mul plus the same edits

    cuts: dict[str, Cut] = {}
    wraps: dict[str, Callable[[nn.Module], nn.Module]] = {}
    for name, (layer, mask, vector, why) in layers.items():
        elsewhere = flow.read_elsewhere(name) if flow is not None and vector is not None else None
        if elsewhere is not None and mode == "prune":
            raise SquashError(f"layer {name!r} cannot be pruned: {elsewhere}, which the mask must not change; use mode='mul' or 'auto'")
        if elsewhere is not None:
            vector, why = None, f"{elsewhere}: folding or pruning would change that read too, so the mask stays a multiply"
        if vector is None:  # auto: neither prune nor fold
            wraps[name] = partial(_masked, mask=mask)
            result.modes[name], result.reasons[name] = "mul", why
            continue
        cuts.setdefault(name, Cut()).in_scale = vector
        n = vector.numel()
        kept = torch.nonzero(vector != 0).flatten()
        why_more = ""
        if kept.numel() == 0:  # keep one feature, multiplied by 0, so no tensor is empty
            kept = torch.zeros(1, dtype=torch.long)
            why_more = "no tensor is empty"
        if getattr(layer_kind(layer), "aligned", False):
            aligned = _aligned(kept, n, channel_multiple)
            if aligned.numel() > kept.numel():
                why_more = f"{aligned.numel()} channels, a multiple of {channel_multiple}, are kept"
            kept = aligned
        removed = n - kept.numel()
        # what is removed is the sparsity achieved; masked features kept (scaled by 0) are said why
        masked = int((vector == 0).sum())
        stay = masked - removed
        rounding = f" ({masked} are masked: {stay} {'stays' if stay == 1 else 'stay'}, zeroed in the weight, so that {why_more})" if removed and stay else ""
        chain, not_why = flow.producer(name, masks.layers) if flow is not None else (None, flow_error)
        kind = layer_kind(layer)
        if removed and kind is not None and kind.is_per_feature(layer):  # depthwise: in and out channels together
            removed, chain = 0, None
            not_why = _PER_FEATURE_CONSUMER
        if removed and (chain is not None or mode == "prune"):
            result.sparsity[name] = removed / n
        if removed and chain is not None:
            cuts[name].in_keep = kept
            for fqn in (*chain.producers, *chain.norms):
                cuts.setdefault(fqn, Cut()).out_keep = kept
            via = f" (and {', '.join(chain.norms)})" if chain.norms else ""
            result.modes[name] = "prune"
            result.reasons[name] = f"removed {removed} of {n} features from {chain.producer}{via} and this layer{rounding}"
        elif removed and mode == "prune":
            cuts[name].in_keep = kept
            axis = _feature_axis(layer)
            assert axis is not None
            wraps[name] = partial(_gathered, index=kept, axis=axis)
            result.modes[name] = "prune"
            result.reasons[name] = (
                f"consumer only: removed {removed} of {n} input features of this layer, gathered before it "
                f"(its producer keeps them: {not_why}){rounding}; {_GATHER_COST}"
            )
        elif mode == "prune":
            result.modes[name] = "prune"
            nothing = not_why if not_why == _PER_FEATURE_CONSUMER else _nothing_removed(vector, n, channel_multiple)
            result.reasons[name] = f"no feature of {n} is removed ({nothing}): the mask is folded into the weight"
        else:
            result.modes[name] = "fold"
            if removed:  # only the consumer could lose them: a gather, which auto does not choose
                unpruned = f"{not_why}; {_GATHER_NOT_AUTO}"
            else:
                unpruned = not_why if not_why == _PER_FEATURE_CONSUMER else _nothing_removed(vector, n, channel_multiple)
            result.reasons[name] = f"{why} (not pruned: {unpruned})"

    swapped: list[tuple[str, nn.Module]] = []

    def swap(fqn: str, new: nn.Module) -> None:
        swapped.append((fqn, model.get_submodule(fqn)))
        _replace_module(model, fqn, new)

    try:
        for fqn, edit in edits.items():  # the new weight / bias first: cuts and wraps start from them
            if edit != (None, None):
                swap(fqn, _edited(model.get_submodule(fqn), edit))
        for fqn in sorted(cuts, key=_depth, reverse=True):
            swap(fqn, _shrunk(model.get_submodule(fqn), cuts[fqn]))
        for fqn in sorted(wraps, key=_depth, reverse=True):
            swap(fqn, wraps[fqn](model.get_submodule(fqn)))
        result.max_abs_diff = _check_exact(model, reference, [example, *check_batches])
    except BaseException:
        for fqn, old in reversed(swapped):
            _replace_module(model, fqn, old)
        raise
    for name, edit in edits.items():
        if edit != (None, None):
            result.reasons[name] += _edit_note(masks[name], edit)
    return result


def _check_exact(model: nn.Module, reference: nn.Module, batches: list[Batch]) -> float:
    """The largest difference between ``model`` and ``reference`` (the ``mul``
    squash) over ``batches``; raises if any output is over the tolerance
    (:mod:`actsparse_deploy.data.compare`: ``PRUNE_ATOL`` scaled by the output's
    magnitude, plus ``PRUNE_RTOL``; integer outputs equal; the same NaN agrees)."""
    from ..data.compare import Tolerance, compare_outputs

    tolerance = Tolerance(PRUNE_ATOL, PRUNE_RTOL, scale_atol=True, nan_equal=True)
    fallback = 'a bug in the dataflow analysis: use mode "fold" meanwhile'
    worst = 0.0
    with eval_mode(model), eval_mode(reference):
        for i, batch in enumerate(batches):
            try:
                want = flatten_outputs(run_batch(reference, batch))
            except (RuntimeError, ValueError, IndexError, TypeError) as e:
                raise DataError(
                    f"the model fails on check batch {i} ({describe_batch(batch)}): {type(e).__name__}: "
                    f"{first_line(e)}"
                ) from e
            try:
                got = flatten_outputs(run_batch(model, batch))
            except (RuntimeError, ValueError, IndexError, TypeError) as e:
                raise SquashError(
                    f"the pruned model fails on check batch {i} ({describe_batch(batch)}) where the mul squash runs: "
                    f"{type(e).__name__}: {first_line(e)}; the model is left as it was ({fallback})"
                ) from e
            diffs, problems = compare_outputs(got, want, tolerance, sides=("pruned", "mul"))
            worst = max([worst, *(d.max_abs for d in diffs)])
            if problems:
                raise SquashError(
                    f"the pruned model is not exact on check batch {i} ({describe_batch(batch)}): {'; '.join(problems)}; "
                    f"the model is left as it was ({fallback})"
                )
    return worst
