"""Squash, step 2 of 3: change the model as its plan says
(:func:`~actsparse_deploy.bake.plan.plan_squash`). Without an example, in place:
each layer's new weight / bias, then its fold or its :class:`MaskedInput`. With
one (prune, auto), by module swaps only: the new weight / bias, the shrunk
layers (:meth:`~actsparse_deploy.nn.layers.LayerKind.shrink`), the wrappers
(:class:`MaskedInput`, :class:`PrunedInput`); the result is checked against the
``mul`` squash on the example and the check batches, and a failure swaps every
module back.

    >>> import torch
    >>> from torch import nn
    >>> from actsparse_deploy.bake.apply import apply_plan
    >>> from actsparse_deploy.bake.plan import plan_squash
    >>> from actsparse_deploy.calibration.masks import LayerMask, Masks
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> masks = Masks({"2": LayerMask(torch.tensor([1.0, 0.0] * 4), input_shape=(8,))})
    >>> plan = plan_squash(model, masks, "prune", example=torch.randn(3, 4))
    >>> result = apply_plan(model, plan)
    >>> result.model is model, model[0].out_features, model[2].in_features, result.modes
    (True, 4, 4, {'2': 'prune'})
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from ..base.errors import DataError, SquashError, first_line
from ..data.batches import Batch, describe_batch, flatten_outputs, run_batch
from ..data.compare import Tolerance
from ..nn.layers import Cut, layer_kind
from ..nn.modules import eval_mode
from .explain import explain
from .plan import Edits, Prepared, Reason, SquashPlan

__all__ = ["HALF_PRUNE_ATOL", "HALF_PRUNE_RTOL", "PRUNE_ATOL", "PRUNE_RTOL", "MaskedInput", "PrunedInput", "SquashResult", "apply_plan",
           "edited", "replace_module", "squash_tolerance"]

#: prune vs mul on the check batches: ``|pruned - mul| <= ATOL * max(1, max|mul|) + RTOL * |mul|``.
PRUNE_RTOL = 1e-4
PRUNE_ATOL = 1e-5
#: the same check where the model computes in float16 / bfloat16 (about three significant digits): the
#: pruned model sums in another order than mul's, and half precision rounds each partial sum
HALF_PRUNE_RTOL = 1e-2
HALF_PRUNE_ATOL = 5e-3


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


def apply_plan(model: nn.Module, plan: SquashPlan, check_batches: Iterable[Batch] = ()) -> SquashResult:
    """Change ``model`` as ``plan`` (made on this model, unchanged since) says;
    what each layer got and why. A traced plan is checked against ``mul`` on its
    example and ``check_batches``: a mismatch raises and leaves the model as it was."""
    max_abs_diff = None
    if plan.traced:
        max_abs_diff = _apply_swapping(model, plan, list(check_batches))
    else:
        _apply_in_place(model, plan)
    result = SquashResult(model, max_abs_diff=max_abs_diff)
    for name, layer in plan.layers.items():
        result.modes[name], result.reasons[name] = layer.mode, explain(layer, plan.channel_multiple)
        result.sparsity[name], result.compensate[name], result.method[name] = layer.sparsity, layer.compensate, layer.method
    return result


def replace_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """``setattr(parent, child_name, new)``: the one place modules are swapped."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _apply_in_place(model: nn.Module, plan: SquashPlan) -> None:
    """mul, fold, and auto without an example: the layers the plan checked, changed in place."""
    for name, layer in plan.layers.items():
        prep = plan.prepared[name]
        target = model.get_submodule(name)  # the model's own layer, as the swapping path takes it
        if prep.edits != (None, None):  # the new weight / bias first: the mask scales or gathers its input
            _apply_edits(target, prep.edits)
        if layer.mode == "fold":
            assert prep.vector is not None
            _fold(target, prep.vector)
        else:
            replace_module(model, name, _masked(target, prep.mask))


def _fold(layer: nn.Module, vector: torch.Tensor) -> None:
    """The layer kind's fold: the scaled weight becomes a new parameter, so a
    weight tied to another layer (shared with it) keeps its values there."""
    kind = layer_kind(layer)
    assert kind is not None
    kind.fold(layer, vector)


def _apply_edits(layer: nn.Module, edits: Edits) -> None:
    """Replace the layer's weight / bias with new parameters (in its dtype and on
    its device), in place; a layer without a bias gains one. A parameter tied to
    another layer keeps its values there."""
    weight, bias = edits
    current = layer.weight
    assert isinstance(current, torch.Tensor)  # checked by the planner
    with torch.no_grad():
        if weight is not None:
            new = weight.detach().to(dtype=current.dtype, device=current.device).clone()
            layer.weight = nn.Parameter(new, requires_grad=current.requires_grad)
        if bias is not None:
            old = getattr(layer, "bias", None)
            grad = old.requires_grad if isinstance(old, torch.Tensor) else current.requires_grad
            layer.bias = nn.Parameter(bias.detach().to(dtype=current.dtype, device=current.device).clone(), requires_grad=grad)


def edited(layer: nn.Module, edits: Edits) -> nn.Module:
    """A copy of ``layer`` with the edits applied (prune swaps modules, never changes them)."""
    new = copy.deepcopy(layer)
    _apply_edits(new, edits)
    return new


def _gathered(layer: nn.Module, index: torch.Tensor, axis: int) -> PrunedInput:
    return PrunedInput(layer, index.to(next(layer.parameters()).device), axis)


def _masked(layer: nn.Module, mask: torch.Tensor) -> MaskedInput:
    weight = next(layer.parameters(), None)
    dtype = weight.dtype if weight is not None and weight.is_floating_point() else mask.dtype
    return MaskedInput(layer, mask.to(dtype).clone())


def _shrunk(layer: nn.Module, cut: Cut) -> nn.Module:
    """A copy of ``layer`` (same class) with the cut applied by its layer kind."""
    kind = layer_kind(layer)
    assert kind is not None
    return kind.shrink(layer, cut)


def _depth(fqn: str) -> int:
    return fqn.count(".") + 1 if fqn else 0


# --- the traced plan: module swaps, checked against mul ------------------------------------


def _mul_outputs(model: nn.Module, prepared: dict[str, Prepared], batches: list[Batch]) -> list[tuple[torch.Tensor, ...]]:
    """The outputs of ``model`` squashed with ``mul`` and the same edits on each batch: what the
    traced result must equal. The prepared layers are wrapped (an edited one copied first) for the
    run and put back after it: only those layers are ever copied, never the whole model."""
    originals = {name: model.get_submodule(name) for name in prepared}
    try:
        for name, prep in prepared.items():
            layer = originals[name] if prep.edits == (None, None) else edited(originals[name], prep.edits)
            replace_module(model, name, _masked(layer, prep.mask))
        outputs = []
        with eval_mode(model):  # no grad: outputs kept across the swaps, never an autograd graph
            for i, batch in enumerate(batches):
                try:
                    outputs.append(flatten_outputs(run_batch(model, batch)))
                except (RuntimeError, ValueError, IndexError, TypeError) as e:
                    raise DataError(
                        f"the model fails on check batch {i} ({describe_batch(batch)}): {type(e).__name__}: "
                        f"{first_line(e)}"
                    ) from e
        return outputs
    finally:
        for name, layer in originals.items():
            replace_module(model, name, layer)


def _cuts_and_wraps(plan: SquashPlan) -> tuple[dict[str, Cut], dict[str, Callable[[nn.Module], nn.Module]]]:
    """What each layer of the traced plan is rebuilt with (the cuts: consumers'
    scale and kept inputs, producers' and norms' kept outputs) and wrapped in."""
    cuts: dict[str, Cut] = {}
    wraps: dict[str, Callable[[nn.Module], nn.Module]] = {}
    for name, layer in plan.layers.items():
        prep = plan.prepared[name]
        if layer.mode == "mul":
            wraps[name] = partial(_masked, mask=prep.mask)
            continue
        cuts.setdefault(name, Cut()).in_scale = prep.vector
        if layer.reason in (Reason.PRUNED, Reason.HEADS):
            cuts[name].in_keep = layer.kept
            for fqn, rows in layer.rows.items():
                cuts.setdefault(fqn, Cut()).out_keep = rows
        elif layer.reason is Reason.GATHERED:
            assert layer.kept is not None and prep.axis is not None
            cuts[name].in_keep = layer.kept
            wraps[name] = partial(_gathered, index=layer.kept, axis=prep.axis)
    return cuts, wraps


def _apply_swapping(model: nn.Module, plan: SquashPlan, check_batches: list[Batch]) -> float:
    """prune, and auto with an example: module swaps only (the new weight / bias,
    the cuts, the wraps), checked against mul; undone on failure. The largest difference from mul."""
    assert plan.example is not None
    batches = [plan.example, *check_batches]
    wanted = _mul_outputs(model, plan.prepared, batches)
    cuts, wraps = _cuts_and_wraps(plan)
    swapped: list[tuple[str, nn.Module]] = []

    def swap(fqn: str, new: nn.Module) -> None:
        swapped.append((fqn, model.get_submodule(fqn)))
        replace_module(model, fqn, new)

    try:
        for fqn, prep in plan.prepared.items():  # the new weight / bias first: cuts and wraps start from them
            if prep.edits != (None, None):
                swap(fqn, edited(model.get_submodule(fqn), prep.edits))
        for fqn in sorted(cuts, key=_depth, reverse=True):
            swap(fqn, _shrunk(model.get_submodule(fqn), cuts[fqn]))
        for fqn in sorted(wraps, key=_depth, reverse=True):
            swap(fqn, wraps[fqn](model.get_submodule(fqn)))
        return _check_exact(model, wanted, batches)
    except BaseException:
        for fqn, old in reversed(swapped):
            replace_module(model, fqn, old)
        raise


def squash_tolerance(want: Sequence[torch.Tensor]) -> Tolerance:
    """How close a changed model's outputs must stay to ``want`` (the model's before a change that keeps its
    function: prune against mul, smoothing): ``PRUNE_ATOL`` scaled by each output's magnitude, plus ``PRUNE_RTOL``;
    ``HALF_PRUNE_ATOL`` / ``HALF_PRUNE_RTOL`` where an output is float16 or bfloat16; the same NaN agrees."""
    if any(w.dtype in (torch.float16, torch.bfloat16) for w in want):
        return Tolerance(HALF_PRUNE_ATOL, HALF_PRUNE_RTOL, scale_atol=True, nan_equal=True)
    return Tolerance(PRUNE_ATOL, PRUNE_RTOL, scale_atol=True, nan_equal=True)


def _check_exact(model: nn.Module, wanted: list[tuple[torch.Tensor, ...]], batches: list[Batch]) -> float:
    """The largest difference between ``model``'s outputs on ``batches`` and ``wanted`` (the ``mul``
    squash's, :func:`_mul_outputs`); raises if any output is over the tolerance
    (:mod:`actsparse_deploy.data.compare`: ``PRUNE_ATOL`` scaled by the output's
    magnitude, plus ``PRUNE_RTOL``; ``HALF_PRUNE_ATOL`` / ``HALF_PRUNE_RTOL`` where the outputs are
    float16 or bfloat16; integer outputs equal; the same NaN agrees)."""
    from ..data.compare import compare_outputs

    fallback = 'a bug in the dataflow analysis: use mode "fold" meanwhile'
    worst = 0.0
    with eval_mode(model):
        for i, (batch, want) in enumerate(zip(batches, wanted, strict=True)):
            try:
                got = flatten_outputs(run_batch(model, batch))
            except (RuntimeError, ValueError, IndexError, TypeError) as e:
                raise SquashError(
                    f"the pruned model fails on check batch {i} ({describe_batch(batch)}) where the mul squash runs: "
                    f"{type(e).__name__}: {first_line(e)}; the model is left as it was ({fallback})"
                ) from e
            diffs, problems = compare_outputs(got, want, squash_tolerance(want), sides=("pruned", "mul"))
            worst = max([worst, *(d.max_abs for d in diffs)])
            if problems:
                raise SquashError(
                    f"the pruned model is not exact on check batch {i} ({describe_batch(batch)}): {'; '.join(problems)}; "
                    f"the model is left as it was ({fallback})"
                )
    return worst
