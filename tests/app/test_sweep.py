"""actsparse sweep: cost and latency per level and method (actsparse_deploy.app.sweep)."""

from __future__ import annotations

import json
import math

import pytest

from actsparse_deploy.app.sweep import parse_levels
from actsparse_deploy.base.errors import RecipeError
from tests.helpers import invoke

PNG = b"\x89PNG\r\n\x1a\n"


def test_sweep_digits_mlp_writes_table_json_and_png(tmp_path):
    out = tmp_path / "sweep"
    result = invoke("sweep", "digits-mlp", "--sparsity", "0.25:0.5:0.25", "--runs", "2", "-o", out)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "sweep.json").read_text())
    assert data["levels"] == [0.25, 0.5] and data["methods"] == ["recipe", "topk"]
    cells = {(row["method"], row["level"]) for row in data["rows"]}
    assert cells == {(m, lv) for m in ("recipe", "topk") for lv in (0.25, 0.5)}
    for row in data["rows"]:
        # a timing: positive and finite (its size moves with the machine's load: a busy machine gave 30x on this tiny model)
        assert 0 < row["latency_ratio"] < math.inf and row["dense_ms"] > 0 and row["sparse_ms"] > 0
        assert 0 <= row["accuracy_sparse"] <= 1 and -1 <= row["cosine_mean"] <= 1
        assert row["overall_sparsity"] == pytest.approx(row["level"], abs=0.02)
    low, high = (next(r for r in data["rows"] if r["method"] == "topk" and r["level"] == lv) for lv in (0.25, 0.5))
    assert high["cosine_mean"] < low["cosine_mean"]  # more masked, further from dense
    png = (out / "sweep.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 5000
    assert "topk" in result.stdout and "latency" in result.stdout and "50.0%" in result.stdout


def test_sweep_refuses_to_overwrite_and_bad_levels(tmp_path):
    (tmp_path / "sweep.json").write_text("{}")
    result = invoke("sweep", "digits-mlp", "--sparsity", "0.5", "--runs", "1", "-o", tmp_path)
    assert result.exit_code == 11 and "--overwrite" in result.stderr, result.output
    assert (tmp_path / "sweep.json").read_text() == "{}"
    for bad in ("0.1:0.8", "a:b:c", "0.5:0.9:0", "1.5"):
        with pytest.raises(RecipeError, match="0.1:0.8:0.1"):
            parse_levels(bad)


def test_sweep_quantize_measures_each_level_in_int8_beside_int8_alone(tmp_path):
    """Before, a sweep measured float models only: the user's real alternative, int8, was not on the plot."""
    out = tmp_path / "sweep"
    result = invoke("sweep", "digits-mlp", "--sparsity", "0.25,0.5", "--method", "recipe", "--runs", "2", "--quantize", "none,int8",
                    "-o", out)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "sweep.json").read_text())
    assert data["quantize"] == ["int8"] and data["smooth"] is True
    assert sum(row["smoothed"] for row in data["rows"] if row["quantize"] == "int8") >= 1  # the digits MLP's products smooth
    cells = {(row["level"], row["quantize"]) for row in data["rows"]}
    assert cells == {(lv, q) for lv in (0.25, 0.5) for q in ("none", "int8")}
    alone = data["int8_alone"]["int8"]
    assert 0 < alone["latency_ratio"] < math.inf and abs(alone["accuracy_sparse"] - alone["accuracy_dense"]) <= 0.01
    for level in (0.25, 0.5):
        float_row, int8_row = (next(r for r in data["rows"] if r["level"] == level and r["quantize"] == q) for q in ("none", "int8"))
        assert float_row["onnx_max_abs_diff"] < 1e-4 and "onnx_max_abs_diff" not in int8_row  # judged by its cost
        assert int8_row["size_bytes"] < 0.5 * float_row["size_bytes"]
        assert abs(int8_row["accuracy_sparse"] - float_row["accuracy_sparse"]) <= 0.005 + 1e-9  # within half a point
        assert int8_row["overall_sparsity"] == float_row["overall_sparsity"]
    png = (out / "sweep.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 20000  # two panels: the second, cost against latency
    assert "│ recipe +" in result.stdout and "int8 alone (the dense export quantized" in result.stdout  # recipe + int8, wrapped
    # without --quantize: the float rows as before, nothing about int8
    plain = invoke("sweep", "digits-mlp", "--sparsity", "0.5", "--method", "recipe", "--runs", "1", "-o", tmp_path / "plain", "--json")
    assert plain.exit_code == 0 and not {"quantize", "int8_alone"} & set(json.loads(plain.stdout)[0])
    assert all("quantize" not in row and "size_bytes" not in row for row in json.loads(plain.stdout)[0]["rows"])


def test_sweep_quantize_refuses_auto_and_unknown_modes_before_any_work(tmp_path):
    for bad in ("auto", "int4", "none,fp8"):
        result = invoke("sweep", "digits-mlp", "--sparsity", "0.5", "--quantize", bad, "-o", tmp_path / bad)
        assert result.exit_code == 2 and "not none, int8 or int8-static" in result.stderr, result.output
        assert not (tmp_path / bad).exists()
