"""Statistics files that merge (map-reduce on any scheduler): `calibrate
--stats-only`, `merge`, `select`; parts of another model, recipe or major
version refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from actsparse_deploy import Masks, Statistics, calibrate
from actsparse_deploy.calibration.recipe import resolve_recipe
from actsparse_deploy.models.zoo import builtin_recipe_path, calibration_batches, load_builtin

from ..helpers import invoke, one_line_error


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    """The digits-mlp calibration split cut into three .npy shards, each calibrated
    to a statistics file as a separate job would, then merged."""
    root = tmp_path_factory.mktemp("stats-parts")
    images = torch.cat(calibration_batches("digits-mlp")).numpy()
    for i, (start, stop) in enumerate(((0, 70), (70, 71), (71, 200))):
        np.save(root / f"shard{i}.npy", images[start:stop])
        result = invoke("calibrate", "digits-mlp", "--data", root / f"shard{i}.npy", "--stats-only", "-o", root / f"part{i}.stats.safetensors")
        assert result.exit_code == 0, result.output
    np.save(root / "all.npy", images)
    result = invoke("merge", *(root / f"part{i}.stats.safetensors" for i in range(3)), "-o", root / "all.stats.safetensors", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["calibration"]["samples"] == 200 and report["parts"] == 3
    return root


def test_merged_parts_select_the_masks_of_one_run_over_all_data(parts: Path):
    result = invoke("select", parts / "all.stats.safetensors", "-o", parts / "masks.safetensors", "--json")
    assert result.exit_code == 0, result.output
    assert {(row["method"], row["compensate"]) for row in json.loads(result.stdout)["layers"]} == {("obs", "lstsq")}
    selected = Masks.load(parts / "masks.safetensors")
    model = load_builtin("digits-mlp")
    recipe = resolve_recipe("digits-mlp", builtin_recipe_path("digits-mlp"))
    one_run = calibrate(model, recipe, [torch.from_numpy(np.load(parts / "all.npy"))], model_name="digits-mlp")
    merged = Statistics.load(parts / "all.stats.safetensors")
    from actsparse_deploy import collect

    one_stats = collect(model, recipe, [torch.from_numpy(np.load(parts / "all.npy"))], model_name="digits-mlp")
    for name in ("fc2", "fc3"):
        assert torch.equal(selected[name].mask, one_run[name].mask)  # bit-identical masks
        # statistics equal to the rounding of each batch's float32 sum; the refit amplifies that a little
        torch.testing.assert_close(merged[name].stat.per_sample, one_stats[name].stat.per_sample, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(selected[name].weight, one_run[name].weight, rtol=0, atol=1e-3)
    assert merged.num_samples == 200 and merged.model == "digits-mlp" and merged.fingerprint
    # another level from the same statistics: no calibration again
    result = invoke("select", parts / "all.stats.safetensors", "--sparsity", "0.5", "-o", parts / "half.safetensors")
    assert result.exit_code == 0, result.output
    assert Masks.load(parts / "half.safetensors").overall_sparsity() == pytest.approx(0.5)


def test_parts_of_another_model_recipe_or_version_are_refused(parts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    part0 = parts / "part0.stats.safetensors"
    other_recipe = tmp_path / "other-recipe.stats.safetensors"
    assert invoke("calibrate", "digits-mlp", "--data", parts / "shard0.npy", "--method", "wanda", "--stats-only", "-o",
                  other_recipe).exit_code == 0  # another statistic (per-feature moments, not the Gram matrix)
    one_line_error(invoke("merge", part0, other_recipe, "-o", tmp_path / "m.safetensors"), 7, "different recipes", str(other_recipe))
    # the same architecture with other weights in a masked layer: another fingerprint
    weights = tmp_path / "w.safetensors"
    model = load_builtin("digits-mlp")
    with torch.no_grad():
        model.fc2.weight.mul_(1.5)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    other_weights = tmp_path / "other-weights.stats.safetensors"
    assert invoke("calibrate", "digits-mlp", "--weights", weights, "--data", parts / "shard0.npy", "--stats-only", "-o",
                  other_weights).exit_code == 0
    one_line_error(invoke("merge", part0, other_weights, "-o", tmp_path / "m.safetensors"), 7, "two different models")
    one_line_error(invoke("select", other_weights, "-o", tmp_path / "s.safetensors"), 7, "is not the model the statistics")
    # a part written by another major version of the tool (the version every file's header records)
    from actsparse_deploy.base import serialize

    future = tmp_path / "future.stats.safetensors"
    with monkeypatch.context() as patch:
        patch.setattr(serialize, "__version__", "9.0.0")
        Statistics.load(part0).save(future)
    assert Statistics.load(future).tool_version == "9.0.0"
    one_line_error(invoke("merge", part0, future, "-o", tmp_path / "m.safetensors"), 7, "different major versions", "9.0.0")
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "s.safetensors").exists()


def test_stats_only_is_not_a_budget_and_merge_needs_existing_files(parts: Path, tmp_path: Path):
    one_line_error(invoke("calibrate", "digits-mlp", "--stats-only", "--max-cost", "cosine=0.99", "-o", tmp_path / "x.safetensors"), 3,
              "--stats-only")
    one_line_error(invoke("merge", tmp_path / "missing.stats.safetensors", "-o", tmp_path / "m.safetensors"), 8, "missing.stats.safetensors")
    masks = tmp_path / "masks.safetensors"
    assert invoke("calibrate", "digits-mlp", "-o", masks).exit_code == 0
    one_line_error(invoke("merge", parts / "part0.stats.safetensors", masks, "-o", tmp_path / "m.safetensors"), 8)
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "x.safetensors").exists()
