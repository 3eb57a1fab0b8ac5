"""Squash applies a layer's weight / bias edits (compensation) before its mask, in
every mode: the result computes ``new_W @ (x * mask) + new_b`` at that layer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from actsparse_deploy import Masks
from actsparse_deploy.bake.squash import squash
from actsparse_deploy.base.errors import MaskError, SquashError
from actsparse_deploy.calibration.masks import LayerMask
from actsparse_deploy.onnx.export import export_onnx
from actsparse_deploy.onnx.validate import validate

from ..helpers import TinyConv, TinyMLP

MODES = ("mul", "fold", "prune", "auto")


def _edits(model: TinyMLP, seed: int = 1, bias: bool = True) -> tuple[Masks, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks on fc2 (half its 8 input features) with a random new weight and bias."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    weight = torch.randn(model.fc2.weight.shape, generator=g)
    new_bias = torch.randn(model.fc2.out_features, generator=g)
    lm = LayerMask(mask, input_shape=(8,), weight=weight, bias=new_bias if bias else None)
    return Masks({"fc2": lm}), mask, weight, new_bias


def _expected(model: TinyMLP, x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """What the model computes with fc2 replaced by ``x -> weight @ (x * mask) + bias``."""
    h = model.act(model.fc1(x))
    h = nn.functional.linear(h * mask, weight, bias if bias is not None else model.fc2.bias)
    return model.fc3(model.act(h))


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_applies_the_edits_before_the_mask(mode):
    torch.manual_seed(0)
    model = TinyMLP()
    before = copy.deepcopy(model.state_dict())
    masks, mask, weight, bias = _edits(model)
    x = torch.randn(5, 6)
    result = squash(model, masks, mode, example=torch.randn(2, 6))
    with torch.no_grad():
        assert_close(result.model(x), _expected(model, x, mask, weight, bias))
    for key, value in model.state_dict().items():  # squash works on a copy
        assert_close(value, before[key])
    assert "compensated" in result.reasons["fc2"], result.reasons
    if mode in ("prune", "auto"):  # the producer still loses the masked features
        assert result.modes["fc2"] == "prune"
        assert result.model.fc1.out_features == 4 and result.model.fc2.in_features == 4
        assert result.max_abs_diff is not None


@pytest.mark.parametrize("mode", MODES)
def test_a_consumer_without_bias_gains_one(mode):
    torch.manual_seed(0)
    model = TinyMLP()
    model.fc2 = nn.Linear(8, 8, bias=False)
    masks, mask, weight, bias = _edits(model)
    x = torch.randn(4, 6)
    result = squash(model, masks, mode, example=torch.randn(2, 6))
    with torch.no_grad():
        assert_close(result.model(x), _expected(model, x, mask, weight, bias))
    fc2 = result.model.fc2.module if mode == "mul" else result.model.fc2
    assert isinstance(fc2.bias, nn.Parameter) and "bias" in dict(fc2.named_parameters())
    assert model.fc2.bias is None


def test_a_weight_edit_alone_keeps_the_bias():
    torch.manual_seed(0)
    model = TinyMLP()
    masks, mask, weight, _ = _edits(model, bias=False)
    x = torch.randn(4, 6)
    for mode in MODES:
        result = squash(model, masks, mode, example=torch.randn(2, 6))
        with torch.no_grad():
            assert_close(result.model(x), _expected(model, x, mask, weight, None))


def test_tied_weights_elsewhere_stay_as_they_were():
    torch.manual_seed(0)
    model = TinyMLP(d_in=8, hidden=8)
    model.fc1.weight = model.fc2.weight  # tied: one Parameter in two layers
    masks, _, weight, _ = _edits(model)
    for mode in ("mul", "fold"):
        result = squash(model, masks, mode)
        fc2 = result.model.fc2.module if mode == "mul" else result.model.fc2
        assert_close(result.model.fc1.weight, model.fc1.weight)  # the other holder keeps the old weight
        assert_close(fc2.weight, weight if mode == "mul" else weight * masks["fc2"].dense())


@pytest.mark.parametrize(
    "weight_shape, bias_shape, what",
    [
        ((5, 8), (5,), r"layer 'fc2': the masks give it a new weight of shape \[5, 8\].*needs \[8, 8\]"),
        ((8, 7), (8,), r"weight of layer 'fc2' has 7 input features"),  # refused by the masks themselves
        ((8, 8), (3,), r"bias of layer 'fc2' has shape \[3\]"),
        ((8,), (8,), r"weight of layer 'fc2' has shape \[8\]"),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_edits_of_the_wrong_shape_name_the_layer(mode, weight_shape, bias_shape, what):
    torch.manual_seed(0)
    model = TinyMLP()
    with pytest.raises(MaskError, match=what):
        lm = LayerMask(torch.ones(8), input_shape=(8,), weight=torch.zeros(weight_shape), bias=torch.zeros(bias_shape))
        squash(model, Masks({"fc2": lm}), mode, example=torch.randn(2, 6))


def test_a_bias_edit_that_does_not_fit_the_layer_names_it():
    model = TinyMLP()  # fc3: 3 outputs; the masks were made for a layer with 5
    lm = LayerMask(torch.ones(8), input_shape=(8,), bias=torch.zeros(5))
    for mode in MODES:
        with pytest.raises(MaskError, match=r"layer 'fc3': the masks give it a new bias of shape \[5\].*needs \[3\]"):
            squash(model, Masks({"fc3": lm}), mode, example=torch.randn(2, 6))


def test_edits_on_a_layer_without_a_weight_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    lm = LayerMask(torch.ones(4), input_shape=(4,), weight=torch.zeros(4, 4), bias=torch.zeros(4))
    with pytest.raises((MaskError, SquashError), match=r"layer '1'.*weight"):
        squash(model, Masks({"1": lm}), "mul")


def test_conv_edits_in_every_mode():
    torch.manual_seed(0)
    model = TinyConv()
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0]).reshape(4, 1, 1)
    weight = torch.randn(model.conv2.weight.shape, generator=g)
    bias = torch.randn(5, generator=g)
    masks = Masks({"conv2": LayerMask(mask, input_shape=(4, 8, 8), weight=weight, bias=bias)})
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        h = model.act(model.conv1(x))
        h = model.act(nn.functional.conv2d(h * mask, weight, bias, padding=1))
        want = model.fc(model.pool(h).flatten(1))
    for mode in MODES:
        result = squash(model, masks, mode, example=torch.rand(2, 1, 8, 8), channel_multiple=1)
        with torch.no_grad():
            assert_close(result.model(x), want)
        if mode == "prune":
            assert result.model.conv1.out_channels == 2


@pytest.mark.parametrize("mode", ("mul", "fold", "prune"))
def test_onnx_export_and_validation_pass_with_edits(tmp_path, mode):
    torch.manual_seed(0)
    model = TinyMLP()
    model.fc2 = nn.Linear(8, 8, bias=False)
    masks, *_ = _edits(model)
    result = squash(model, masks, mode, example=torch.randn(2, 6))
    path = tmp_path / f"{mode}.onnx"
    export_onnx(result.model, torch.randn(2, 6), path, exporter="torchscript")
    report = validate(path, result.model, [torch.randn(8, 6), torch.randn(8, 6)])
    assert report.passed and report.max_abs < 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_squash_from_a_saved_masks_file_equals_squash_from_memory(tmp_path, mode):
    torch.manual_seed(0)
    model = TinyMLP()
    model.fc3 = nn.Linear(8, 3, bias=False)
    masks, *_ = _edits(model)
    g = torch.Generator().manual_seed(5)
    masks.layers["fc3"] = LayerMask(
        torch.tensor([0.0, 1.0] * 4), input_shape=(8,), weight=torch.randn(3, 8, generator=g), bias=torch.randn(3, generator=g)
    )
    masks.save(tmp_path / "masks.safetensors")
    loaded = Masks.load(tmp_path / "masks.safetensors")
    example, x = torch.randn(2, 6), torch.randn(7, 6)
    with torch.no_grad():
        want = squash(model, masks, mode, example=example).model(x)
        got = squash(model, loaded, mode, example=example).model(x)
    assert_close(got, want, rtol=0, atol=0)


class SumReader(nn.Module):
    """fc1's features also reach the output through a sum: removing them from fc1 is wrong."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3, bias=False)

    def forward(self, x):
        h = nn.functional.relu(self.fc1(x))
        return self.fc2(h) + h.sum(-1, keepdim=True)


def test_a_failed_prune_with_edits_leaves_the_model_as_it_was(monkeypatch):
    from actsparse_deploy.bake.graph import Chain, Dataflow
    from actsparse_deploy.bake.squash import squash_

    torch.manual_seed(0)
    model = SumReader()
    g = torch.Generator().manual_seed(2)
    lm = LayerMask(torch.tensor([1.0, 0, 1, 0, 1, 1, 0, 1]), input_shape=(8,), weight=torch.randn(3, 8, generator=g),
                   bias=torch.randn(3, generator=g))
    before = copy.deepcopy(model.state_dict())
    fc2 = model.fc2
    monkeypatch.setattr(Dataflow, "producer", lambda self, name, masked=(): (Chain("fc1"), ""))
    with pytest.raises(SquashError, match="not exact.*the model is left as it was"):
        squash_(model, Masks({"fc2": lm}), "prune", example=torch.randn(4, 6))
    assert model.fc2 is fc2 and fc2.bias is None
    assert model.state_dict().keys() == before.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
