"""A real `actsparse` process interrupted mid-run leaves no partial output and
exits with the conventional code (130 for SIGINT, 143 for SIGTERM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SLOW_MODULE = '''
import os
import pathlib
import time

import torch
from torch import nn

MARKER = pathlib.Path(os.environ["ACTSPARSE_TEST_MARKER"])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            MARKER.touch()  # the exporter is tracing: now is mid-export
            time.sleep(60)
        return self.fc2(torch.relu(self.fc1(x)))


def build():
    torch.manual_seed(0)
    return Net()


def batches():
    yield torch.randn(4, 4)
    MARKER.touch()  # one batch calibrated: now is mid-calibration
    time.sleep(60)
    yield torch.randn(4, 4)
'''


def _run_until_marker(tmp_path: Path, args: list[str], sig: int) -> subprocess.CompletedProcess:
    (tmp_path / "slow_user_model.py").write_text(SLOW_MODULE)
    marker = tmp_path / "marker"
    env = {**os.environ, "ACTSPARSE_TEST_MARKER": str(marker), "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "actsparse_deploy", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"never reached the point to interrupt: rc {proc.returncode}\n{out}\n{err}")
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _leftovers(directory: Path) -> list[str]:
    ignore = {"slow_user_model.py", "marker", "__pycache__", "data.npy"}
    return sorted(p.name for p in directory.iterdir() if p.name not in ignore)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupt_during_calibration(tmp_path, sig, code):
    args = ["calibrate", "slow_user_model:build", "--data", "slow_user_model:batches", "--layers", "fc2", "--sparsity", "0.5", "-o", "masks.safetensors"]
    result = _run_until_marker(tmp_path, args, sig)
    assert result.returncode == code, result.stderr
    assert "no partial output" in result.stderr and "Traceback" not in result.stderr
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupt_during_export(tmp_path, sig, code, exporter):
    import numpy as np

    np.save(tmp_path / "data.npy", np.ones((8, 4), np.float32))
    args = ["export", "slow_user_model:build", "--heldout", "data.npy", "--exporter", exporter, "-o", "model.onnx"]
    result = _run_until_marker(tmp_path, args, sig)
    assert result.returncode == code, result.stderr
    assert "no partial output" in result.stderr and "Traceback" not in result.stderr
    assert _leftovers(tmp_path) == []  # no model.onnx, no staging directory
