"""Sparsity 0 changes nothing: a layer that loses no input feature keeps its
weight and bias bit for bit, whatever the selection method and compensation,
and every squash mode then gives the dense model's outputs exactly (here on a
small model, and end to end through ``convert`` of a built-in)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from actsparse_deploy import Recipe, calibrate, squash
from actsparse_deploy.calibration.compensate import COMPENSATIONS
from actsparse_deploy.calibration.methods import METHODS

from ..helpers import WIDE, invoke


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 12, bias=False), nn.ReLU(), nn.Linear(12, 3)).eval()


def _batches() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(20, 6) for _ in range(3)]


@pytest.mark.parametrize("method", METHODS.names())
@pytest.mark.parametrize("compensation", COMPENSATIONS)
def test_nothing_masked_leaves_every_layer_and_output_exactly_as_it_was(method, compensation):
    model = _model()
    dense = copy.deepcopy(model)
    recipe = Recipe.simple(layers=["2", "4"], sparsity=0.0).with_method(method, compensation)
    masks = calibrate(model, recipe, _batches())
    example = torch.randn(5, 6)
    for mode in ("mul", "fold", "prune"):
        squashed = squash(model, masks, mode, example=example)
        for name in ("2", "4"):
            layer, original = squashed.model.get_submodule(name), dense.get_submodule(name)
            layer = getattr(layer, "module", layer)  # mul wraps the layer
            assert torch.equal(layer.weight, original.weight), (mode, name)
            assert (layer.bias is None) == (original.bias is None), (mode, name)  # no bias added to a layer without one
            if original.bias is not None:
                assert torch.equal(layer.bias, original.bias), (mode, name)
        with torch.no_grad():
            assert torch.equal(squashed.model(example), dense(example)), mode
        assert squashed.compensate == {"2": "none", "4": "none"}, mode


def test_convert_at_sparsity_zero_gives_the_dense_models_outputs(tmp_path):
    out = tmp_path / "out"
    result = invoke("convert", "digits-mlp", "-o", out, "--sparsity", "0", "--no-latency", "--json", env=WIDE)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    cost = report["cost"]
    assert [row["max_abs_diff"] for row in cost["outputs"]] == [0.0], cost
    assert cost["outputs"][0]["cosine_min"] == pytest.approx(1.0, abs=1e-7)
    assert cost["accuracy_sparse"] == cost["accuracy_dense"], cost
    assert [(row["layer"], row["sparsity"], row["compensate"]) for row in report["layers"]] == [
        ("fc2", 0.0, "none"), ("fc3", 0.0, "none"),
    ]
