"""The command line, through typer's CliRunner (and one real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from actsparse_deploy import Masks
from actsparse_deploy.base.errors import ModelLoadError, OutputError

from ..helpers import invoke, one_line_error

USER_MODULE = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
'''


def test_calibrate_builtin_out_of_the_box(tmp_path):
    out = tmp_path / "masks.safetensors"
    result = invoke("calibrate", "digits-cnn", "-o", out)
    assert result.exit_code == 0, result.output
    for text in ("conv2", "16x1x1", "12.5%", "fc1", "25.0%", "fc2", "50.0%", "200 calibration samples"):
        assert text in result.stdout
    masks = Masks.load(out)
    assert list(masks) == ["conv2", "fc1", "fc2"] and masks.model == "digits-cnn"
    assert [round(masks[n].sparsity, 4) for n in masks] == [0.125, 0.25, 0.5]


def test_calibrate_json_and_sparsity_override(tmp_path):
    out = tmp_path / "m.safetensors"
    result = invoke("calibrate", "digits-mlp", "--sparsity", "0.5", "--json", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["files"] == {str(out): out.stat().st_size} and report["calibration"]["samples"] == 200
    assert [(row["layer"], row["sparsity"]) for row in report["layers"]] == [("fc2", 0.5), ("fc3", 0.5)]


def test_calibrate_flags_recipe(tmp_path):
    out = tmp_path / "m.safetensors"
    result = invoke(
        "calibrate", "digits-cnn", "--layers", "conv*", "--layer-type", "Linear", "--sparsity", "0.25",
        "--structured", "--aggregate", "sum_sq", "--batch-size", "64", "-o", out,
    )
    assert result.exit_code == 0, result.output
    masks = Masks.load(out)
    assert list(masks) == ["conv1", "conv2", "fc1", "fc2"]
    assert masks["conv2"].mask.shape == (16, 1, 1) and masks.num_batches == 4
    assert masks.recipe.defaults.aggregate_fn.name == "sum_sq"


def test_calibrate_recipe_file_and_user_model(tmp_path, monkeypatch):
    (tmp_path / "cli_user_model.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[defaults]\nmask_fn = "threshold"\nsparse_config = { threshold = 0.3 }\n[[layers]]\nname = "2"\n')
    torch.manual_seed(3)
    weights = {"0.weight": torch.randn(8, 4), "0.bias": torch.randn(8), "2.weight": torch.randn(2, 8), "2.bias": torch.randn(2)}
    save_file(weights, str(tmp_path / "w.safetensors"))
    out = tmp_path / "m.safetensors"
    result = invoke(
        "calibrate", "cli_user_model:build", "--weights", tmp_path / "w.safetensors", "--recipe", recipe,
        "--data", tmp_path / "calib.npz", "--batch-size", "16", "-o", out,
    )
    assert result.exit_code == 0, result.output
    masks = Masks.load(out)
    x = torch.from_numpy(np.load(tmp_path / "calib.npz")["x"])
    hidden = torch.relu(x @ weights["0.weight"].T + weights["0.bias"])
    torch.testing.assert_close(masks["2"].mask, (hidden.abs().mean(0) >= 0.3).float())
    assert masks.num_samples == 50 and masks.num_batches == 4


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    result = invoke("calibrate", "digits-mlp", "-o", out)
    assert result.exit_code == OutputError.exit_code and "--overwrite" in result.stderr
    assert out.read_bytes() == b"keep me"
    result = invoke("calibrate", "digits-mlp", "-o", out, "--overwrite")
    assert result.exit_code == 0
    assert len(Masks.load(out)) == 2


def test_verbose_shows_traceback(tmp_path):
    result = invoke("calibrate", "nope", "-o", tmp_path / "m.safetensors", "--verbose")
    assert result.exit_code == ModelLoadError.exit_code
    assert "Traceback" in result.stderr


def test_models_command():
    result = invoke("models")
    assert result.exit_code == 0 and "digits-cnn" in result.stdout and "0.9800" in result.stdout
    rows = json.loads(invoke("models", "--json").stdout)
    assert {r["name"]: r["test_accuracy"] for r in rows} == {"digits-cnn": 0.98, "digits-mlp": 0.9725, "minilm": None, "tiny-lm": None}


@pytest.mark.slow
def test_python_dash_m_runs_the_cli(tmp_path):
    """A failure through a real process: one line, the exit code (a real process
    that succeeds: test_pt2.py::test_squash_other_suffix_prints_no_torch_warning)."""
    proc = subprocess.run([sys.executable, "-m", "actsparse_deploy", "calibrate", "nope", "-o", str(tmp_path / "other.safetensors")], capture_output=True, text=True)
    one_line_error(proc, ModelLoadError.exit_code, start="error: unknown built-in model")
    assert list(tmp_path.iterdir()) == []
