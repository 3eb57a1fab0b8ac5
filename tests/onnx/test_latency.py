"""onnxruntime latency of two ONNX models timed alternately (actsparse_deploy.onnx.latency)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from actsparse_deploy.base.errors import ValidationError
from actsparse_deploy.onnx.export import export_onnx
from actsparse_deploy.onnx.latency import alternate, latency_ratio


def test_latency_ratio_times_both_models_and_restores_torch_threads(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    big, small = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 64)), nn.Linear(64, 64)
    export_onnx(big, x, tmp_path / "big.onnx")
    export_onnx(small, x, tmp_path / "small.onnx")
    before = torch.get_num_threads()
    result = latency_ratio(tmp_path / "big.onnx", tmp_path / "small.onnx", [x, x[:3]], runs=5, warmup=1, threads=1)
    assert torch.get_num_threads() == before
    assert result["runs"] == 5 and result["threads"] == 1 and result["warmup"] == 1
    assert result["dense_ms"] > 0 and result["sparse_ms"] > 0
    assert result["ratio"] == pytest.approx(result["sparse_ms"] / result["dense_ms"])


def test_alternate_runs_every_variant_in_rotated_order():
    calls: list[str] = []
    timings = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, runs=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotated rounds
    assert {name: t["runs"] for name, t in timings.items()} == {"a": 3, "b": 3}


def test_missing_model_and_no_batches_are_validation_errors(tmp_path):
    x = torch.randn(2, 4)
    export_onnx(nn.Linear(4, 2), x, tmp_path / "a.onnx")
    with pytest.raises(ValidationError, match="does not exist"):
        latency_ratio(tmp_path / "a.onnx", tmp_path / "missing.onnx", [x], runs=1, warmup=0)
    with pytest.raises(ValidationError, match="at least one batch"):
        latency_ratio(tmp_path / "a.onnx", tmp_path / "a.onnx", [], runs=1)
