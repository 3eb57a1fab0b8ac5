"""Recovery (``actsparse_deploy.bake.recover``, ``--recover``): the masked layers' weights
and biases trained towards the dense model's outputs on the calibration data; the masks
carry the result (every squash mode bakes it in), the model itself is left as it was,
and the same call gives the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from actsparse_deploy import Recipe, calibrate
from actsparse_deploy.bake.recover import recover
from actsparse_deploy.bake.squash import squash
from actsparse_deploy.base.errors import UsageError

from ..helpers import invoke


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def _batches() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(32, 8) for _ in range(6)]


def _cosine_error(model: nn.Module, sparse: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return float(torch.cat([1 - nn.functional.cosine_similarity(sparse(b), model(b), dim=-1) for b in batches]).mean())


def test_recovery_brings_the_masked_model_closer_to_the_dense_one_and_leaves_the_model_alone():
    model, batches = _model(), _batches()
    before = copy.deepcopy(model.state_dict())
    masks = calibrate(model, Recipe.simple(layers=["2", "4"], sparsity=0.5), batches)
    recovered, recovery = recover(model, masks, batches, epochs=20, lr=1e-2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    plain = _cosine_error(model, squash(model, masks, "mul").model, batches)
    better = _cosine_error(model, squash(model, recovered, "mul").model, batches)
    assert better < 0.8 * plain
    assert recovery.after < recovery.before and recovery.layers == 2 and recovery.batches == 6
    assert recovered["2"].note.startswith("recovered") and recovered["2"].weight.shape == (16, 32)
    assert torch.equal(recovered["2"].mask, masks["2"].mask)  # the masks are the same: only the weights move


def test_recovery_is_deterministic_and_survives_the_masks_file(tmp_path):
    model, batches = _model(), _batches()
    masks = calibrate(model, Recipe.simple(layers=["2"], sparsity=0.5), batches)
    first, _ = recover(model, masks, batches, epochs=2)
    second, _ = recover(model, masks, batches, epochs=2)
    assert torch.equal(first["2"].weight, second["2"].weight) and torch.equal(first["2"].bias, second["2"].bias)
    first.save(tmp_path / "masks.safetensors")
    from actsparse_deploy.calibration.masks import Masks

    again = Masks.load(tmp_path / "masks.safetensors")
    example = batches[0]
    with torch.no_grad():
        want = squash(model, first, "mul").model(example)
        got = squash(model, again, "prune", example=example).model(example)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_recovery_refuses_half_precision_weights():
    model, batches = _model().half(), [b.half() for b in _batches()]
    masks = calibrate(_model(), Recipe.simple(layers=["2"], sparsity=0.5), _batches())
    with pytest.raises(UsageError, match="recovery trains in float32"):
        recover(model, masks, batches)


def test_convert_recover_trains_and_says_so(tmp_path):
    import json

    from actsparse_deploy.calibration.masks import Masks

    result = invoke("convert", "digits-mlp", "--recover", "-o", tmp_path / "out", "--json", "--no-latency")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    masks = Masks.load(tmp_path / "out" / "masks.safetensors")  # the masks written are the recovered ones
    assert all("recovered" in (masks[name].note or "") for name in masks)
    assert "recover" in report["seconds"]
    assert any(note.startswith("recovered: ") for note in report["notes"])
    assert report["validation"]["passed"] is True


def test_recover_in_distributed_calibration_is_refused():
    from actsparse_deploy.app.options import CalibrateOptions

    with pytest.raises(UsageError, match="--recover trains on all the calibration data in one process"):
        CalibrateOptions(recover=True, group=object())


@pytest.mark.parametrize("budget", [[], ["--max-cost", "cosine=0.99"]])
def test_calibrate_recover_writes_the_recovered_weights(tmp_path, budget):
    from actsparse_deploy.calibration.masks import Masks

    out = tmp_path / "masks.safetensors"
    result = invoke("calibrate", "digits-mlp", "--recover", *budget, "-o", out)
    assert result.exit_code == 0, result.output
    masks = Masks.load(out)
    assert all(masks[name].note and "recovered" in masks[name].note and masks[name].weight is not None for name in masks)
    assert "recovered: " in result.stderr


def test_calibrate_recover_with_stats_only_is_one_line(tmp_path):
    from ..helpers import one_line_error

    result = invoke("calibrate", "digits-mlp", "--recover", "--stats-only", "-o", tmp_path / "stats.safetensors")
    one_line_error(result, 3, "--recover make masks", "--stats-only")
