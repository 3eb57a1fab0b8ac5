"""``--method`` and ``--compensate`` on ``calibrate`` and ``convert``: choices
(exit 2 on an unknown name), they override the recipe for every rule, the
report's layer rows carry them, and ``calibrate`` then ``export`` / ``squash``
from the masks file gives the model ``convert`` gives."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from actsparse_deploy.base.constants import COMPENSATIONS, METHODS
from actsparse_deploy.calibration.masks import Masks
from actsparse_deploy.models import zoo

from ..helpers import WIDE, invoke, one_line_error


def test_the_cli_choices_are_the_registered_methods():
    from actsparse_deploy.calibration.methods import METHODS as REGISTRY

    assert set(METHODS) <= set(REGISTRY.names()), (METHODS, REGISTRY.names())
    from actsparse_deploy.calibration import compensate

    assert COMPENSATIONS == compensate.COMPENSATIONS == ("none", "bias", "lstsq")


@pytest.mark.parametrize("command", ["calibrate", "convert"])
@pytest.mark.parametrize("flag, value, choices", [("--method", "magic", METHODS), ("--compensate", "ridge", COMPENSATIONS)])
def test_an_unknown_choice_is_a_usage_error(tmp_path, command, flag, value, choices):
    out = tmp_path / ("masks.safetensors" if command == "calibrate" else "out")
    result = invoke(command, "digits-mlp", "-o", out, flag, value, env=WIDE)
    one_line_error(result, 2, f"'{value}'", flag, *choices)
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["calibrate", "convert"])
def test_help_lists_the_choices(command):
    result = invoke(command, "--help", env=WIDE)
    assert result.exit_code == 0, result.output
    assert "|".join(METHODS) in result.stdout and "|".join(COMPENSATIONS) in result.stdout, result.stdout


def test_calibrate_with_method_and_compensation_stores_the_edits(tmp_path):
    masks_path = tmp_path / "masks.safetensors"
    result = invoke("calibrate", "digits-mlp", "-o", masks_path, "--method", "fluctuation", "--compensate", "lstsq", "--json", env=WIDE)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(row["layer"], row["method"], row["compensate"]) for row in report["layers"]] == [
        ("fc2", "fluctuation", "lstsq"), ("fc3", "fluctuation", "lstsq"),
    ]
    masks = Masks.load(masks_path)
    model = zoo.load_builtin("digits-mlp")
    for name in ("fc2", "fc3"):
        lm = masks[name]
        assert lm.weight is not None and lm.weight.shape == model.get_submodule(name).weight.shape
        assert lm.bias is not None and lm.bias.shape == model.get_submodule(name).bias.shape
        assert lm.sparsity == pytest.approx(0.25, abs=0.02)
    defaults = report["recipe"]["defaults"]
    assert (defaults["method"], defaults["compensate"]) == ("fluctuation", "lstsq"), report["recipe"]
    assert all((rule.get("method"), rule.get("compensate")) == ("fluctuation", "lstsq") for rule in report["recipe"]["layers"])


def _onnx_outputs(path, inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


def test_convert_with_compensation_equals_calibrate_then_squash_from_the_file(tmp_path):
    out = tmp_path / "out"
    result = invoke("convert", "digits-mlp", "-o", out, "-b", "32", "--method", "fluctuation", "--compensate", "lstsq",
                    "--sparsity", "0.5", "--json", env=WIDE)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["validation"]["passed"]
    rows = {row["layer"]: row for row in report["layers"]}
    assert {(r["method"], r["compensate"]) for r in rows.values()} == {("fluctuation", "lstsq")}
    assert all("compensated (lstsq)" in r["reason"] for r in rows.values()), rows
    assert json.loads((out / "report.json").read_text())["layers"] == report["layers"]

    # the same through the stages: calibrate (same batch size), then export and squash from the file
    masks_path = tmp_path / "masks.safetensors"
    assert invoke("calibrate", "digits-mlp", "-o", masks_path, "-b", "32", "--method", "fluctuation",
                  "--compensate", "lstsq", "--sparsity", "0.5", env=WIDE).exit_code == 0
    from_file, from_convert = Masks.load(masks_path), Masks.load(out / "masks.safetensors")
    for name in from_convert:
        torch.testing.assert_close(from_file[name].dense(), from_convert[name].dense(), rtol=0, atol=0)
        torch.testing.assert_close(from_file[name].weight, from_convert[name].weight)
        torch.testing.assert_close(from_file[name].bias, from_convert[name].bias)
    onnx_path = tmp_path / "m.onnx"
    exported = invoke("export", "digits-mlp", "--masks", masks_path, "-o", onnx_path, "--json", env=WIDE)
    assert exported.exit_code == 0, exported.output
    assert {row["compensate"] for row in json.loads(exported.stdout)["layers"]} == {"lstsq"}
    inputs = torch.cat([b for b in zoo.heldout_batches("digits-mlp", 64)]).numpy()
    np.testing.assert_allclose(_onnx_outputs(onnx_path, inputs), _onnx_outputs(out / "model.onnx", inputs), rtol=0, atol=1e-5)
    pt2 = tmp_path / "m.pt2"
    assert invoke("squash", "digits-mlp", "--masks", out / "masks.safetensors", "-o", pt2, env=WIDE).exit_code == 0
    program = torch.export.load(str(pt2)).module()
    with torch.no_grad():
        squashed = program(torch.from_numpy(inputs[:2])).numpy()
    np.testing.assert_allclose(squashed, _onnx_outputs(out / "model.onnx", inputs[:2]), rtol=0, atol=1e-4)


def test_compensation_keeps_the_digits_mlp_accurate_at_half_its_features(tmp_path):
    out = tmp_path / "out"
    result = invoke("convert", "digits-mlp", "-o", out, "--method", "fluctuation", "--compensate", "lstsq",
                    "--sparsity", "0.5", "--json", env=WIDE)
    assert result.exit_code == 0, result.output
    cost = json.loads(result.stdout)["cost"]
    assert cost["accuracy_sparse"] >= cost["accuracy_dense"] - 0.01, cost


CLASSIC_MLP_RECIPE = """version = 1
[defaults]
aggregate_fn = "max_abs"
reduce_fn = "feature_mean"
mask_fn = "topk"
sparse_config = { sparsity_level = 0.25 }
[[layers]]
name = ["fc2", "fc3"]
"""


def test_builtin_recipes_select_with_obs_and_compensate_with_lstsq(tmp_path):
    result = invoke("calibrate", "digits-mlp", "-o", tmp_path / "masks.safetensors", "--json", env=WIDE)
    assert result.exit_code == 0, result.output
    assert {(row["method"], row["compensate"]) for row in json.loads(result.stdout)["layers"]} == {("obs", "lstsq")}


def test_rows_without_a_method_say_so(tmp_path):
    masks_path = tmp_path / "masks.safetensors"
    (tmp_path / "classic.toml").write_text(CLASSIC_MLP_RECIPE)
    result = invoke("calibrate", "digits-mlp", "--recipe", tmp_path / "classic.toml", "-o", masks_path, "--json", env=WIDE)
    assert result.exit_code == 0, result.output
    assert {(row["method"], row["compensate"]) for row in json.loads(result.stdout)["layers"]} == {(None, "none")}
    result = invoke("export", "digits-mlp", "--masks", masks_path, "-o", tmp_path / "m.onnx", "--json", env=WIDE)
    assert result.exit_code == 0, result.output
    assert {(row["method"], row["compensate"]) for row in json.loads(result.stdout)["layers"]} == {(None, "none")}


def test_compensation_without_a_method_is_a_recipe_error(tmp_path):
    (tmp_path / "classic.toml").write_text(CLASSIC_MLP_RECIPE)
    result = invoke("convert", "digits-mlp", "--recipe", tmp_path / "classic.toml", "-o", tmp_path / "out", "--compensate", "lstsq", env=WIDE)
    one_line_error(result, 3, "needs a method")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classic.toml"]
