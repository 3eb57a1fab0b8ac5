"""actsparse sweep: cost and latency per level and method (actsparse_deploy.app.sweep)."""

from __future__ import annotations

import json

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
        assert 0 < row["latency_ratio"] < 10 and row["dense_ms"] > 0 and row["sparse_ms"] > 0
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
