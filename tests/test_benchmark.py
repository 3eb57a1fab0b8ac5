"""The benchmark script runs and writes its JSON (figures are not checked: times
vary by machine; the README holds a measured table). It runs in the background
(tests/helpers.py: BACKGROUND_COMMANDS["benchmark"]) while other tests go on."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
@pytest.mark.background("benchmark")
def test_benchmark_quick_digits(background):
    proc = background.result("benchmark")  # tools/benchmark.py --quick --sections speed-digits --out bench.json
    report = json.loads((background.folder("benchmark") / "bench.json").read_text())
    assert report["threads"] == 1 and report["runs"] == 2
    cnn, mlp = report["speed_digits"]
    for section in (cnn, mlp):
        assert set(section["latency"]["batch32"]) == {"dense", "mul", "fold", "prune", "auto"}
        assert all(row["runs"] >= 2 and row["min_ms"] <= row["median_ms"] <= row["max_ms"] for row in section["latency"]["batch32"].values())
        assert section["accuracy"]["dense"] > 0.97 and section["accuracy"]["auto"] > 0.96
    assert "onnxruntime latency, digits-cnn" in proc.stdout
