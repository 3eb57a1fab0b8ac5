"""``--heads``: convert prunes attention heads as well as MLP features, end to end (squash,
export, strict validation against PyTorch), the heads named in each row; refused where the
model has no heads this tool finds or where a decoder's cache would have to describe them;
the budget search prices a head per multiply-add it saves and allocates whole heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actsparse_deploy import Recipe
from actsparse_deploy.app.budget import search_budget
from actsparse_deploy.bake.savings import work_per_feature
from actsparse_deploy.nn.attention import find_heads, head_blocks

from ..helpers import invoke, one_line_error
from ..models.test_hf import HFFiles


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> HFFiles:
    return HFFiles(tmp_path_factory.mktemp("hf-heads"))


def _rows(report: dict) -> dict[str, dict]:
    return {row["layer"]: row for row in report["layers"]}


def test_convert_with_heads_prunes_heads_and_mlp_features_and_validates(hf: HFFiles, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("convert", hf.bert, "--task", "feature-extraction", "--text", hf.calib, "--heldout-text", hf.held, "--heads",
                    "--sparsity", "0.5", "-o", out, "--json", "--no-latency")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = _rows(report)
    for i in range(2):
        heads = rows[f"encoder.layer.{i}.attention.output.dense"]
        assert heads["mode"] == "prune" and heads["reason"].startswith("removed 1 of 2 attention heads (16 of 32 features)")
        assert heads["method"] == "obs" and heads["compensate"] == "lstsq"
        assert rows[f"encoder.layer.{i}.output.dense"]["reason"].startswith("removed 32 of 64 features")
    assert report["validation"]["passed"] is True


def test_without_heads_the_recipe_leaves_attention_alone(hf: HFFiles) -> None:
    from actsparse_deploy.app.options import ModelOptions
    from actsparse_deploy.app.workload import load_workload
    from actsparse_deploy.models.loading import load_recipe

    work = load_workload(str(hf.bert), model_options=ModelOptions(task="feature-extraction", text=hf.calib, heldout_text=hf.held))
    assert not any("attention" in name for name in load_recipe(work).select(work.model))
    assert sorted(name for name in load_recipe(work, heads=True).select(work.model) if "attention" in name) == [
        "encoder.layer.0.attention.output.dense", "encoder.layer.1.attention.output.dense"]


def test_heads_of_a_decoder_without_a_cache_go_by_key_value_group(hf: HFFiles, tmp_path: Path) -> None:
    result = invoke("convert", hf.llama, "--task", "causal-lm", "--text", hf.calib, "--heldout-text", hf.held, "--heads", "--no-cache",
                    "--sparsity", "0.5", "-o", tmp_path / "out", "--json", "--no-latency")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    row = _rows(report)["model.layers.0.self_attn.o_proj"]
    assert row["reason"].startswith("removed 2 of 4 attention heads (32 of 64 features)")  # one key/value head and its two query heads
    assert report["validation"]["passed"] is True


def test_heads_with_a_cache_are_refused_before_any_work(hf: HFFiles, tmp_path: Path) -> None:
    result = invoke("convert", hf.llama, "--task", "causal-lm", "--text", hf.calib, "--heldout-text", hf.held, "--heads",
                    "-o", tmp_path / "out")
    one_line_error(result, 2, "--heads with a decoder exported with a cache", "--no-cache")
    assert not (tmp_path / "out").exists()


def test_heads_on_a_model_without_attention_is_one_line(tmp_path: Path) -> None:
    result = invoke("convert", "digits-mlp", "--heads", "-o", tmp_path / "out")
    one_line_error(result, 3, "--heads: the model has no attention heads this tool can prune")


def test_the_budget_search_allocates_whole_heads_priced_per_multiply_add(hf: HFFiles) -> None:
    from actsparse_deploy.app.options import ModelOptions
    from actsparse_deploy.app.workload import load_workload

    work = load_workload(str(hf.bert), model_options=ModelOptions(task="feature-extraction", text=hf.calib, heldout_text=hf.held))
    model = work.model
    names = ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"]
    heads = {names[0]: find_heads(model, names[0])}
    batch = next(iter(work.calibration))
    work_done = work_per_feature(model, names, heads, batch, tokens=10.0)
    # a head feature: its query, key and value rows (32 weights each), its output column (32) and 2 x 10 positions;
    # an MLP feature: its intermediate row (32) and its output column (32)
    assert work_done == {names[0]: 4 * 32 + 20, names[1]: 64}
    recipe = Recipe.simple(["encoder.layer.*.output.dense"], None, 0.5, None, "sum_abs", structured=True).with_method("obs", "lstsq")
    recipe = recipe.with_heads([names[0], "encoder.layer.1.attention.output.dense"])
    result = search_budget(model, recipe, list(work.calibration) * 4, "cosine=0.5")
    for name in ("encoder.layer.0.attention.output.dense", "encoder.layer.1.attention.output.dense"):
        assert result.levels[name] in (0.0, 0.5)  # whole heads: one of two at most (one stays)
        assert head_blocks(result.masks[name].dense().reshape(-1), 16)
    assert result.tuning_cost >= 0.5  # the budget kept on the tuning split
    assert any(result.levels[name] > 0 for name in ("encoder.layer.0.attention.output.dense", "encoder.layer.1.attention.output.dense"))


def test_calibrate_with_heads_writes_whole_head_masks(hf: HFFiles, tmp_path: Path) -> None:
    from actsparse_deploy.calibration.masks import Masks

    out = tmp_path / "masks.safetensors"
    result = invoke("calibrate", hf.bert, "--task", "feature-extraction", "--text", hf.calib, "--heads", "--sparsity", "0.5", "-o", out)
    assert result.exit_code == 0, result.output
    masks = Masks.load(out)
    vector = masks["encoder.layer.1.attention.output.dense"].dense().reshape(-1)
    assert head_blocks(vector, 16) and int((vector == 0).sum()) == 16
    assert masks["encoder.layer.1.attention.output.dense"].method == "obs"


def test_sweep_refuses_heads_with_the_topk_baseline(tmp_path: Path) -> None:
    result = invoke("sweep", "minilm", "--heads", "--method", "topk", "--sparsity", "0.25", "-o", tmp_path / "sweep")
    one_line_error(result, 2, "--heads with the topk baseline")
    assert not (tmp_path / "sweep" / "sweep.json").exists()


def test_a_budget_with_heads_by_wanda_reports_the_heads_it_removed(hf: HFFiles) -> None:
    from actsparse_deploy.app.options import ModelOptions
    from actsparse_deploy.app.workload import load_workload

    work = load_workload(str(hf.bert), model_options=ModelOptions(task="feature-extraction", text=hf.calib, heldout_text=hf.held))
    recipe = Recipe.simple(["encoder.layer.*.output.dense"], None, 0.5, None, "sum_abs", structured=True).with_method("wanda")
    recipe = recipe.with_heads(["encoder.layer.0.attention.output.dense", "encoder.layer.1.attention.output.dense"])
    result = search_budget(work.model, recipe, list(work.calibration) * 4, "cosine=0.5")
    for name in ("encoder.layer.0.attention.output.dense", "encoder.layer.1.attention.output.dense"):
        vector = result.masks[name].dense().reshape(-1)
        assert head_blocks(vector, 16)
        assert result.levels[name] == float((vector == 0).sum()) / 32  # the level is the heads removed, not the grid's step
