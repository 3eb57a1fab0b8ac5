"""The benchmark script runs and writes its JSON (figures are not checked: times
vary by machine; the README holds a measured table)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_quick_digits(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--quick", "--sections", "speed-digits", "--out", str(out)],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["threads"] == 1 and report["runs"] == 2
    cnn, mlp = report["speed_digits"]
    for section in (cnn, mlp):
        assert set(section["latency"]["batch32"]) == {"dense", "mul", "fold", "prune", "auto"}
        assert all(row["runs"] >= 2 and row["min_ms"] <= row["median_ms"] <= row["max_ms"] for row in section["latency"]["batch32"].values())
        assert section["accuracy"]["dense"] > 0.97 and section["accuracy"]["auto"] > 0.96
    assert "onnxruntime latency, digits-cnn" in proc.stdout
