"""The report is one typed object: ``convert()`` returns it, ``report.json`` is
its ``to_json()`` (today's keys), and every command's ``--json`` has its schema."""

from __future__ import annotations

import json

import pytest

from actsparse_deploy.app.report import KEYS, Calibration, Cost, Report, Validation
from actsparse_deploy.base.errors import DataError, MaskError

from ..helpers import invoke, one_line_error

#: report.json's top-level keys before the report became an object: they stay
REPORT_JSON_KEYS = [
    "tool_version", "model", "squash_mode", "calibration", "overall_sparsity", "layers", "recipe", "notes",
    "export", "validation", "cost", "seconds", "files", "threads", "latency",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from actsparse_deploy.app.pipeline import convert

    out = tmp_path_factory.mktemp("convert") / "out"
    return out, convert("digits-mlp", out)


def test_convert_returns_the_report_that_report_json_holds(converted):
    out, report = converted
    assert isinstance(report, Report) and report.validation.passed and report.passed
    assert report.cost.accuracy_onnx == report.cost.accuracy_sparse and 0.5 < report.cost.accuracy_dense <= 1.0
    assert report.export.path == report.validation.onnx == str(out / "model.onnx")  # the final place, not the staging one
    assert report.calibration == Calibration(samples=200, batches=7)
    written = json.loads((out / "report.json").read_text())
    assert list(written) == REPORT_JSON_KEYS == list(KEYS)
    # the file holds the report but its own size, which is known only once it is written
    assert report.files["report.json"] == (out / "report.json").stat().st_size
    assert written == report.replace(files={k: v for k, v in report.files.items() if k != "report.json"}).to_json()
    assert Report.from_json(written).to_json() == written  # readable back, key for key
    assert [row["layer"] for row in written["layers"]] == ["fc2", "fc3"]
    assert set(written["layers"][0]) >= {"layer", "mask_shape", "input_shape", "sparsity", "mode", "reason"}
    assert set(written["export"]) >= {"path", "exporter", "opset", "inputs", "outputs", "size_bytes"}
    assert set(written["validation"]) >= {"onnx", "passed", "atol", "rtol", "batch_sizes", "samples", "max_abs_diff", "outputs"}
    assert set(written["cost"]) == {"outputs", "heldout_samples", "accuracy_dense", "accuracy_sparse", "accuracy_onnx"}


def test_convert_json_on_stdout_is_the_report(tmp_path):
    result = invoke("convert", "digits-mlp", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(printed) == REPORT_JSON_KEYS
    assert printed["files"].pop("report.json") == (tmp_path / "out" / "report.json").stat().st_size
    assert printed == written


def test_every_command_json_has_one_schema(tmp_path):
    masks, pt2, onnx_path = tmp_path / "masks.safetensors", tmp_path / "m.pt2", tmp_path / "m.onnx"
    runs = {
        "calibrate": ["calibrate", "digits-mlp", "-o", masks, "--json"],
        "squash": ["squash", "digits-mlp", "--masks", masks, "--mode", "fold", "-o", pt2, "--json"],
        "export": ["export", "digits-mlp", "--masks", masks, "--mode", "fold", "-o", onnx_path, "--json"],
        "validate": ["validate", onnx_path, "digits-mlp", "--masks", masks, "--mode", "fold", "--json"],
        "validate .pt2": ["validate", onnx_path, pt2, "--json"],
        "inspect masks": ["inspect", masks, "--json"],
        "inspect model": ["inspect", "digits-mlp", "--json"],
    }
    reports = {}
    for name, args in runs.items():
        result = invoke(*args)
        assert result.exit_code == 0, f"{name}: {result.output}"
        reports[name] = json.loads(result.stdout)
        assert list(reports[name]) == REPORT_JSON_KEYS, name
        assert Report.from_json(reports[name]).to_json() == reports[name], name

    calibrated = reports["calibrate"]
    assert calibrated["model"] == "digits-mlp" and calibrated["calibration"] == {"samples": 200, "batches": 7}
    assert calibrated["files"] == {str(masks): masks.stat().st_size} and calibrated["overall_sparsity"] > 0
    assert [(row["layer"], row["sparsity"]) for row in calibrated["layers"]] == [("fc2", 0.25), ("fc3", 0.25)]
    assert calibrated["export"] is calibrated["validation"] is calibrated["cost"] is None
    assert reports["inspect masks"]["layers"] == calibrated["layers"] and reports["inspect masks"]["files"] is None

    squashed = reports["squash"]
    assert squashed["squash_mode"] == "fold" and {row["mode"] for row in squashed["layers"]} == {"fold"}
    assert squashed["files"] == {str(pt2): pt2.stat().st_size}

    exported = reports["export"]
    assert exported["export"]["path"] == str(onnx_path) and exported["export"]["outputs"] == ["logits"]
    assert exported["layers"] == squashed["layers"] and exported["files"] == {str(onnx_path): onnx_path.stat().st_size}

    checked = reports["validate"]
    assert checked["validation"]["passed"] is True and checked["validation"]["onnx"] == str(onnx_path)
    assert checked["cost"]["accuracy_onnx"] == checked["cost"]["accuracy_sparse"]
    assert reports["validate .pt2"]["validation"]["passed"] is True and reports["validate .pt2"]["cost"] is None
    assert reports["validate .pt2"]["squash_mode"] == "from .pt2"

    rows = reports["inspect model"]["layers"]
    assert [(r["layer"], r["type"], r["foldable"]) for r in rows if r["type"] == "Linear"] == [
        ("fc1", "Linear", True), ("fc2", "Linear", True), ("fc3", "Linear", True)
    ]


def test_sections_keep_keys_they_do_not_know_and_omit_absent_accuracy():
    data = {"onnx": "m.onnx", "passed": True, "atol": 1e-4, "rtol": 0.0, "batch_sizes": [1], "samples": 1,
            "max_abs_diff": 0.0, "outputs": [], "declared_shapes": "checked"}
    section = Validation.from_json(data)
    assert section.passed is True and section.extra == {"declared_shapes": "checked"}
    assert section.to_json() == data and list(section.to_json()) == list(data)
    assert Cost(outputs=[], heldout_samples=3).to_json() == {"outputs": [], "heldout_samples": 3}
    report = Report(model="m").replace(cost={"outputs": [], "heldout_samples": 3, "accuracy_dense": 0.9})
    assert report.cost == Cost(outputs=[], heldout_samples=3, accuracy_dense=0.9) and report.passed is None
    with pytest.raises(TypeError, match="missing .*'batches'"):
        Calibration.from_json({"samples": 3})
    with pytest.raises(TypeError, match="JSON object, not list"):
        Report.from_json([])  # type: ignore[arg-type]


# --- library messages name parameters; the command line shows its flags -------------------------


def test_library_names_parameters_and_the_cli_names_flags(tmp_path):
    from actsparse_deploy.app.commands import SourceOptions, export_source, squash_to_pt2, validate_against

    pt2 = str(tmp_path / "squashed.pt2")
    with pytest.raises(MaskError, match="pass no `masks`"):
        export_source(pt2, tmp_path / "m.onnx", SourceOptions(masks=tmp_path / "masks.safetensors"))
    with pytest.raises(DataError, match="`labels` need a model"):
        validate_against(tmp_path / "m.onnx", pt2, SourceOptions(labels=tmp_path / "labels.npy"))
    with pytest.raises(MaskError, match="squash needs `masks`"):
        squash_to_pt2("digits-mlp", pt2, SourceOptions())

    result = invoke("export", pt2, "--masks", tmp_path / "masks.safetensors", "-o", tmp_path / "m.onnx")
    assert result.exit_code == MaskError.exit_code and "pass no --masks" in result.stderr and "`" not in result.stderr
    result = invoke("validate", tmp_path / "m.onnx", pt2, "--labels", tmp_path / "labels.npy")
    one_line_error(result, DataError.exit_code, "--labels need a model (with --masks)")
