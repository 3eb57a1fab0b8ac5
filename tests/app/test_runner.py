"""The one stage runner (actsparse_deploy.app.pipeline.Stages): convert runs it once,
sweep once per level and method, so a sweep's ONNX models are validated against
PyTorch like convert's, and a sweep that fails midway writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from actsparse_deploy.app.options import ExportOptions, ValidateOptions
from actsparse_deploy.app.pipeline import Stages, Timer
from actsparse_deploy.app.sweep import sweep
from actsparse_deploy.app.workload import load_workload
from actsparse_deploy.base.errors import ValidationError
from actsparse_deploy.calibration.calibrate import select
from actsparse_deploy.models.zoo import builtin_recipe_path
from tests.helpers import invoke, one_line_error

QUICK = ("--runs", "1", "--method", "topk")


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _fail_on_call(monkeypatch: pytest.MonkeyPatch, failing: int) -> list[int]:
    """The runner's validation, failing (a model outside the tolerances) on its
    ``failing``-th call; the calls made, each the number of held-out samples seen."""
    from actsparse_deploy.onnx import validate as validate_module

    real = validate_module.validate
    calls: list[int] = []

    def validate(*args, **kwargs):
        calls.append(len(calls) + 1)
        if len(calls) == failing:
            raise ValidationError(f"ONNX model {args[0]} does not match PyTorch: max abs diff 1.0 > atol {kwargs['atol']}")
        return real(*args, **kwargs)

    monkeypatch.setattr(validate_module, "validate", validate)
    return calls


def test_sweep_rows_carry_the_validation_of_their_onnx_model(tmp_path):
    result = sweep("digits-mlp", tmp_path / "sw", levels=[0.25, 0.5], methods=["topk"], runs=1,
                   validation=ValidateOptions(atol=1e-3))
    assert result["validation"] == {"atol": 1e-3, "rtol": 0.0}
    assert [row["level"] for row in result["rows"]] == [0.25, 0.5]
    for row in result["rows"]:
        assert 0 <= row["onnx_max_abs_diff"] <= 1e-3  # ONNX vs the squashed PyTorch model, as convert checks it
    written = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [row["onnx_max_abs_diff"] for row in written["rows"]] == [row["onnx_max_abs_diff"] for row in result["rows"]]


def test_a_sweep_whose_onnx_model_fails_validation_is_exit_10_with_nothing_written(tmp_path, monkeypatch):
    calls = _fail_on_call(monkeypatch, failing=2)  # the second level: midway
    out = tmp_path / "new" / "out"
    result = invoke("sweep", "digits-mlp", "--sparsity", "0.25,0.5", *QUICK, "-o", out)
    one_line_error(result, 10, "does not match PyTorch")
    assert calls == [1, 2]
    assert _names(tmp_path) == []  # no half-written folder: nothing, and the folders it made are gone


def test_a_sweep_failing_midway_keeps_the_old_outputs(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("sweep.json", "sweep.png"):
        (out / name).write_text("old")
    _fail_on_call(monkeypatch, failing=2)
    result = invoke("sweep", "digits-mlp", "--sparsity", "0.25,0.5", *QUICK, "-o", out, "--overwrite")
    assert result.exit_code == 10, result.output
    assert _names(out) == ["sweep.json", "sweep.png"]  # no lock, no staging folder left
    assert all((out / name).read_text() == "old" for name in ("sweep.json", "sweep.png"))


def test_a_tolerance_the_library_refuses_stops_the_sweep_before_any_work(tmp_path):
    with pytest.raises(ValidationError, match="tolerances must be non-negative"):
        sweep("digits-mlp", tmp_path / "sw", levels=[0.5], validation=ValidateOptions(atol=float("nan")))
    assert not (tmp_path / "sw").exists()


def test_the_runner_times_and_tells_each_stage(tmp_path):
    told: list[tuple[str, int | None]] = []
    work = load_workload("digits-mlp")
    dense = {name: p.detach().clone() for name, p in work.model.named_parameters()}
    stages = Stages(work, Timer(on_stage=lambda name, total: told.append((name, total))))
    stats = stages.statistics(_recipe(), work.require_calibration())
    masks = select(stats, _recipe().with_sparsity(0.5), model=work.model)
    squashed = stages.squash(masks, "auto")
    exported = stages.export(squashed.model, tmp_path / "m.onnx", ExportOptions())
    checked = stages.validate(tmp_path / "m.onnx", squashed.model, exported, ValidateOptions())
    cost, budget = stages.cost(squashed.model, tmp_path / "m.onnx", stages.target.validation_io(exported.io))
    assert [name for name, _ in told] == ["squashing", "exporting", "validating", "measuring cost"]
    assert set(stages.timer.seconds) == {"squash", "export", "validate", "cost"} and stages.timer.total() > 0
    assert checked.passed and checked.max_abs <= 1e-4 and budget is None
    assert cost["accuracy_onnx"] == cost["accuracy_sparse"]  # the ONNX model's figures where its path is given
    for name, p in work.model.named_parameters():  # the dense model is never changed
        torch.testing.assert_close(p, dense[name])


def _recipe():
    from actsparse_deploy.calibration.recipe import Recipe

    return Recipe.load(builtin_recipe_path("digits-mlp"))
