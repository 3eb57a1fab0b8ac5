"""Squash as plan, apply, explain: the plan says per layer the mode and why (a
code), applying it gives what ``squash`` gives, and explain words the codes as
``squash`` reports them (the strings below are squash's reasons before the split)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from actsparse_deploy.bake.apply import apply_plan
from actsparse_deploy.bake.explain import explain
from actsparse_deploy.bake.plan import Because, Reason, plan_squash
from actsparse_deploy.base.errors import SquashError
from actsparse_deploy.calibration.masks import LayerMask, Masks

from ..helpers import TinyConv, TinyMLP

FOLDED = "one value per input feature: folded into the weight"
GATHER_NOT_AUTO = "a gather before this layer alone runs slower than dense, so auto does not choose it"
MODEL_INPUT = "the input of fc1 is an input of the model, not the output of a layer"
FLATTEN = "aten.flatten sits between fc and the layer that makes its input"


def _mlp_masks() -> Masks:
    return Masks({
        "fc1": LayerMask(torch.tensor([1.0, 0, 1, 0, 1, 1]), input_shape=(6,)),
        "fc2": LayerMask(torch.tensor([1.0, 0] * 4), input_shape=(8,)),
        "fc3": LayerMask(torch.ones(8), input_shape=(8,)),
    })


def _conv_masks() -> Masks:
    board = (torch.arange(8)[:, None] + torch.arange(8)).remainder(2).float()[None]  # varies over space: no fold
    return Masks({
        "conv1": LayerMask(board, input_shape=(1, 8, 8)),
        "conv2": LayerMask(torch.tensor([1.0, 0, 1, 0]).reshape(4, 1, 1), input_shape=(4, 8, 8)),
        "fc": LayerMask(torch.tensor([1.0, 0, 1, 0, 1]), input_shape=(5,)),
    })


def _edit_masks() -> Masks:
    """fc2: a new weight, no compensation named ("edits"); fc3: lstsq's weight and bias."""
    g = torch.Generator().manual_seed(0)
    return Masks({
        "fc2": LayerMask(torch.tensor([1.0, 0] * 4), input_shape=(8,), weight=torch.randn(8, 8, generator=g)),
        "fc3": LayerMask(torch.tensor([1.0, 1, 0, 0, 1, 1, 0, 1]), input_shape=(8,), weight=torch.randn(3, 8, generator=g),
                         bias=torch.randn(3, generator=g), method="obs", compensate="lstsq", damping=0.001),
    })


MLP = (TinyMLP, _mlp_masks, lambda: torch.randn(3, 6))
CONV = (TinyConv, _conv_masks, lambda: torch.rand(2, 1, 8, 8))
EDITS = (TinyMLP, _edit_masks, lambda: torch.randn(3, 6))

#: id -> (model, masks, example), mode, with an example, channel_multiple,
#: per layer (mode, reason, because, producers, squash's reason)
CASES = {
    "mlp-mul": (MLP, "mul", False, None, {
        name: ("mul", Reason.ASKED_MUL, None, (), "asked for mul") for name in ("fc1", "fc2", "fc3")
    }),
    "mlp-auto-no-example": (MLP, "auto", False, None, {
        name: ("fold", Reason.FOLDED, None, (), FOLDED) for name in ("fc1", "fc2", "fc3")
    }),
    "mlp-auto": (MLP, "auto", True, None, {
        "fc1": ("fold", Reason.NOT_PRUNED, Because.CONSUMER_ONLY, (), f"{FOLDED} (not pruned: {MODEL_INPUT}; {GATHER_NOT_AUTO})"),
        "fc2": ("prune", Reason.PRUNED, None, ("fc1",), "removed 4 of 8 features from fc1 and this layer"),
        "fc3": ("fold", Reason.NOT_PRUNED, Because.NO_ZERO, (), f"{FOLDED} (not pruned: no mask value is 0)"),
    }),
    "mlp-prune": (MLP, "prune", True, None, {
        "fc1": ("prune", Reason.GATHERED, None, (),
                f"consumer only: removed 2 of 6 input features of this layer, gathered before it (its producer keeps them: {MODEL_INPUT}); "
                "the gather may run slower than dense"),
        "fc2": ("prune", Reason.PRUNED, None, ("fc1",), "removed 4 of 8 features from fc1 and this layer"),
        "fc3": ("prune", Reason.NOTHING_REMOVED, Because.NO_ZERO, (), "no feature of 8 is removed (no mask value is 0): the mask is folded into the weight"),
    }),
    "conv-auto-no-example": (CONV, "auto", False, None, {
        "conv1": ("mul", Reason.CANNOT_FOLD, None, (), "mask of shape [1, 8, 8] varies along more than the input-feature axis"),
        "conv2": ("fold", Reason.FOLDED, None, (), FOLDED),
        "fc": ("fold", Reason.FOLDED, None, (), FOLDED),
    }),
    "conv-auto": (CONV, "auto", True, None, {
        "conv1": ("mul", Reason.CANNOT_FOLD, None, (), "mask of shape [1, 8, 8] varies along more than the input-feature axis"),
        "conv2": ("fold", Reason.NOT_PRUNED, Because.KEPT_WHOLE, (),
                  f"{FOLDED} (not pruned: the 4 channels are kept whole: pruned convs keep a multiple of 8 channels)"),
        "fc": ("fold", Reason.NOT_PRUNED, Because.CONSUMER_ONLY, (), f"{FOLDED} (not pruned: {FLATTEN}; {GATHER_NOT_AUTO})"),
    }),
    "conv-auto-multiple-1": (CONV, "auto", True, 1, {
        "conv1": ("mul", Reason.CANNOT_FOLD, None, (), "mask of shape [1, 8, 8] varies along more than the input-feature axis"),
        "conv2": ("prune", Reason.PRUNED, None, ("conv1",), "removed 2 of 4 features from conv1 and this layer"),
        "fc": ("fold", Reason.NOT_PRUNED, Because.CONSUMER_ONLY, (), f"{FOLDED} (not pruned: {FLATTEN}; {GATHER_NOT_AUTO})"),
    }),
    "edits-mul": (EDITS, "mul", False, None, {
        "fc2": ("mul", Reason.ASKED_MUL, None, (), "asked for mul; compensated: new weight from the masks"),
        "fc3": ("mul", Reason.ASKED_MUL, None, (), "asked for mul; compensated (lstsq): new weight and bias"),
    }),
    "edits-fold": (EDITS, "fold", False, None, {
        "fc2": ("fold", Reason.FOLDED, None, (), f"{FOLDED}; compensated: new weight from the masks"),
        "fc3": ("fold", Reason.FOLDED, None, (), f"{FOLDED}; compensated (lstsq): new weight and bias"),
    }),
    "edits-prune": (EDITS, "prune", True, None, {
        "fc2": ("prune", Reason.PRUNED, None, ("fc1",), "removed 4 of 8 features from fc1 and this layer; compensated: new weight from the masks"),
        "fc3": ("prune", Reason.PRUNED, None, ("fc2",), "removed 3 of 8 features from fc2 and this layer; compensated (lstsq): new weight and bias"),
    }),
}


def _setup(case):
    (factory, masks, example), mode, with_example, multiple, expected = CASES[case]
    torch.manual_seed(0)
    model = factory()
    return model, masks(), mode, example() if with_example else None, multiple, expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_plan_says_each_layers_mode_and_reason_code(case):
    model, masks, mode, example, multiple, expected = _setup(case)
    before = copy.deepcopy(model.state_dict())
    plan = plan_squash(model, masks, mode, example, channel_multiple=multiple)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # planning changes nothing
    assert plan.modes == {name: row[0] for name, row in expected.items()}
    for name, (layer_mode, reason, because, producers, _) in expected.items():
        layer = plan.layers[name]
        assert (layer.name, layer.mode, layer.reason, layer.because, layer.producers) == (name, layer_mode, reason, because, producers)
        if reason in (Reason.PRUNED, Reason.GATHERED):  # the kept features are the unmasked ones (no rounding here)
            assert layer.kept is not None and layer.kept.tolist() == torch.nonzero(masks[name].mask.reshape(-1)).flatten().tolist()
            assert layer.removed == layer.masked > 0
        else:
            assert layer.kept is None and layer.removed == 0


def _masked_reference(model: nn.Module, masks: Masks) -> nn.Module:
    """What every mode must compute, made without the squash code: each masked
    layer's input times its mask (forward pre-hooks), the layer's new weight and
    bias where the masks file holds them (in PyTorch's (out, in) layout)."""
    reference = copy.deepcopy(model)
    for name, lm in masks.layers.items():
        layer = reference.get_submodule(name)
        with torch.no_grad():
            if lm.weight is not None:
                layer.weight.copy_(lm.weight)
            if lm.bias is not None:
                layer.bias.copy_(lm.bias)
        layer.register_forward_pre_hook(lambda _, args, mask=lm.mask: (args[0] * mask, *args[1:]))
    return reference


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_plan_applied_to_another_copy_changes_that_copy_only(case):
    """The plan is made on ``model``; applied to a copy, the copy computes what the
    masks say (a reference made without the squash code) and ``model`` is untouched."""
    model, masks, mode, example, multiple, _ = _setup(case)
    state = copy.deepcopy(model.state_dict())
    plan = plan_squash(model, masks, mode, example, channel_multiple=multiple)
    other = copy.deepcopy(model)
    got = apply_plan(other, plan)
    assert got.model is other
    assert [type(m) for m in model.modules()] == [type(m) for m in copy.deepcopy(model).modules()]
    assert model.state_dict().keys() == state.keys() and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    batch = example if example is not None else (torch.randn(4, 6) if isinstance(model, TinyMLP) else torch.rand(4, 1, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(got.model(batch), _masked_reference(model, masks)(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_explain_words_the_codes_as_squash_reports_them(case):
    model, masks, mode, example, multiple, expected = _setup(case)
    plan = plan_squash(model, masks, mode, example, channel_multiple=multiple)
    words = {name: explain(layer, plan.channel_multiple) for name, layer in plan.layers.items()}
    assert words == {name: row[4] for name, row in expected.items()}


def test_a_failed_check_leaves_the_model_as_it_was():
    """The plan is made before any change; a model that fails the check against
    mul is swapped back whole (the applier's undo)."""

    class Broken(TinyMLP):
        def forward(self, x):
            out = super().forward(x)
            return out if self.fc2.in_features == 8 else out + 1  # the pruned model differs from mul

    torch.manual_seed(0)
    model = Broken()
    masks = _mlp_masks()
    plan = plan_squash(model, masks, "prune", torch.randn(3, 6))
    assert plan.layers["fc2"].reason is Reason.PRUNED
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(SquashError, match="not exact on check batch 0"):
        apply_plan(model, plan)
    assert [type(m) for m in model.children()] == [nn.Linear, nn.ReLU, nn.Linear, nn.Linear]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
