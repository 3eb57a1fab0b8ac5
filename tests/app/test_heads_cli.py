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


def _convert(hf: HFFiles, model: str, *args: object) -> dict:
    """``convert`` of the Hugging Face directory ``model`` (``bert`` or ``llama``) on the text files, its report."""
    task = "feature-extraction" if model == "bert" else "causal-lm"
    result = invoke("convert", getattr(hf, model), "--task", task, "--text", hf.calib, "--heldout-text", hf.held, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_convert_with_heads_prunes_heads_and_mlp_features_and_validates(hf: HFFiles, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = _convert(hf, "bert", "--heads", "--sparsity", "0.5", "-o", out, "--no-latency")
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
    report = _convert(hf, "llama", "--heads", "--no-cache", "--sparsity", "0.5", "-o", tmp_path / "out", "--no-latency")
    row = _rows(report)["model.layers.0.self_attn.o_proj"]
    assert row["reason"].startswith("removed 2 of 4 attention heads (32 of 64 features)")  # one key/value head and its two query heads
    assert report["validation"]["passed"] is True
    assert _config_heads(tmp_path / "out") == (2, 1, 16)  # one number in every layer: config.json says it


def _config_heads(folder: Path) -> tuple[int, int, int]:
    config = json.loads((folder / "config.json").read_text())
    return config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]


def _cache_inputs(onnx_path: Path) -> dict[str, list[int]]:
    import onnx

    graph = onnx.load(onnx_path).graph
    return {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input if i.name.startswith("past_key_values")}


@pytest.mark.slow
def test_a_pruned_decoders_smaller_cache_is_timed_and_costed_beside_the_dense_one(hf: HFFiles, tmp_path: Path) -> None:
    """The dense export (two key/value heads) and the pruned one (one) side by side: latency, decode speed and
    the int8 frontier, each fed its own empty cache; a cache of another shape is not compared to the dense one's."""
    out = tmp_path / "out"
    report = _convert(hf, "llama", "--heads", "--sparsity", "0.5", "--quantize", "int8", "-o", out, "--threads", "1")
    frontier = {row["variant"]: row for row in report["quantization"]["frontier"]}
    assert [o["output"] for o in frontier["sparse"]["outputs"]] == ["logits"]
    assert "present.0.key" in [o["output"] for o in frontier["int8"]["outputs"]]
    assert frontier["sparse+int8"]["decode_ratio"] > 0 and report["latency"]["decode"]["sparse_ms_per_token"] > 0
    decode = report["latency"]["decode"]  # the converted model's decode figures are the frontier's, from one timing
    assert decode["dense_ms_per_token"] == frontier["dense"]["decode_ms_per_token"]
    assert decode["sparse_ms_per_token"] == frontier["sparse+int8"]["decode_ms_per_token"]
    assert decode["ratio"] == frontier["sparse+int8"]["decode_ratio"]
    # the int8 decoder with its smaller cache validates again by a cost budget, fed its first steps as convert fed it
    checked = invoke("validate", out / "model.onnx", hf.llama, "--task", "causal-lm", "--heldout-text", hf.held, "--masks",
                     out / "masks.safetensors", "--max-cost", "perplexity-ratio=100", "--json")
    assert checked.exit_code == 0, checked.output
    quantized = json.loads(checked.stdout)["quantized"]
    assert quantized["heldout_cost"] == pytest.approx(frontier["sparse+int8"]["perplexity_ratio"], rel=1e-6)
    assert 0.9 < quantized["float_source"]["cosine_mean"] <= 1.0
    assert _config_heads(out) == (2, 1, 16) and _cache_inputs(out / "model.onnx")["past_key_values.0.key"][1] == 1


def test_heads_of_a_decoder_with_a_cache_at_levels_that_differ_by_layer_are_refused_by_prune(hf: HFFiles, tmp_path: Path) -> None:
    """(auto folds them instead: tests/bake/test_heads.py)"""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('version = 1\n\n[[layers]]\nname = "model.layers.0.self_attn.o_proj"\nheads = true\nmethod = "obs"\n'
                      'sparse_config = { sparsity_level = 0.5 }\n')
    refused = invoke("convert", hf.llama, "--task", "causal-lm", "--text", hf.calib, "--heldout-text", hf.held, "--recipe", recipe,
                     "--mode", "prune", "--no-latency", "-o", tmp_path / "prune")
    one_line_error(refused, 12, "one number of attention heads in every layer", "model.layers.1.self_attn.o_proj keeps 4 of 4")
    assert not (tmp_path / "prune").exists()


@pytest.mark.slow
def test_a_budget_search_with_one_head_count_moves_every_layers_heads_together() -> None:
    """A decoder exported with a cache: the search steps the heads of every layer as one (their obs curves summed,
    priced by the features of all), the MLP layers keep their own levels. On tiny-lm under perplexity-ratio=1.2
    the search without the tie takes a head of layer 3 alone (levels 0 0 0 0.25); a step of every layer's heads
    at once is over the budget, and the MLPs take what is left."""
    import torch

    from actsparse_deploy.app.workload import load_workload
    from actsparse_deploy.models.loading import load_recipe

    torch.set_num_threads(1)
    work = load_workload("tiny-lm")
    tied = search_budget(work.model, load_recipe(work, heads=True), list(work.calibration), "perplexity-ratio=1.2", one_head_count=True)
    heads = {tied.levels[f"lm.model.layers.{i}.self_attn.o_proj"] for i in range(4)}
    assert len(heads) == 1  # one number of heads in every layer
    assert tied.tuning_cost <= 1.2 and all(tied.levels[f"lm.model.layers.{i}.mlp.down_proj"] > 0.3 for i in range(4))
    # heads alone: without the tie 1.5 takes one head of four in three layers and two in one (0.25 0.25 0.25 0.5), and
    # 3 takes 0.5 0.75 0.5 0.5; tied, only counts the config takes (2 or 1 of 4 kept: hidden 256 is no multiple of 3)
    names = [f"lm.model.layers.{i}.self_attn.o_proj" for i in range(4)]
    alone = Recipe.simple(names, None, 0.5, None, "sum_abs", structured=True).with_method("obs", "lstsq").with_heads(names)
    for budget, want in (("perplexity-ratio=1.5", 0.0), ("perplexity-ratio=3", 0.5)):
        result = search_budget(work.model, alone, list(work.calibration), budget, one_head_count=True)
        assert [result.levels[name] for name in names] == [want] * 4, budget


def test_a_budget_with_heads_on_a_decoder_with_a_cache_keeps_one_count_in_every_layer(hf: HFFiles, tmp_path: Path) -> None:
    """No longer refused: the search, squash with one head count, export and the token-by-token check, end to end (the
    tie itself is tested on tiny-lm above: this random decoder's heads go at any level, tied or not). The runtime's
    config describes one number of key/value heads for every layer: the same number goes everywhere, config.json says
    the new counts, the cache inputs have them, validated token by token."""
    out = tmp_path / "out"
    report = _convert(hf, "llama", "--heads", "--max-cost", "perplexity-ratio=1.5", "-o", out, "--no-latency")
    levels = report["budget"]["levels"]
    assert levels["model.layers.0.self_attn.o_proj"] == levels["model.layers.1.self_attn.o_proj"] == 0.5
    for i in range(2):
        assert _rows(report)[f"model.layers.{i}.self_attn.o_proj"]["reason"].startswith("removed 2 of 4 attention heads")
    assert report["export"]["cache"] is True and report["validation"]["passed"] is True
    assert _config_heads(out) == (2, 1, 16) and report["validation"]["generation"]["passed"] is True
    past = _cache_inputs(out / "model.onnx")
    assert past["past_key_values.0.key"][1] == 1 and past["past_key_values.1.value"][3] == 16


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
