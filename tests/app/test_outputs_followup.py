"""Outputs of several files written as one: ``export`` with external data (the
model and its ``.data`` file) locked like convert's folder and moved into place
both or neither; what is already beside the model (a folder at the data file's
name) never taken for a data file of ours."""

from __future__ import annotations

from pathlib import Path

import pytest

from actsparse_deploy.base.files import output_lock
from actsparse_deploy.onnx import export as export_module

from ..helpers import invoke, one_line_error


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("extra", [["--external-data"], [], ["--external-data", "--overwrite"]])
def test_a_second_export_to_a_name_another_run_writes_is_refused_at_once(tmp_path: Path, extra: list[str]) -> None:
    """Two exports of model.onnx + model.onnx.data to one place could end with
    one run's model beside the other's data: one run at a time writes that name."""
    with output_lock(tmp_path, "model.onnx"):
        line = one_line_error(invoke("export", "digits-mlp", "-o", tmp_path / "model.onnx", *extra), 11,
                              f"another actsparse run is writing {tmp_path / 'model.onnx'}")
        assert _names(tmp_path) == [".model.onnx.actsparse.lock"], line
    assert invoke("export", "digits-mlp", "-o", tmp_path / "model.onnx", *extra).exit_code == 0
    assert _names(tmp_path) == ["model.onnx", *(["model.onnx.data"] if "--external-data" in extra else [])]


def test_exports_of_other_names_share_a_folder(tmp_path: Path) -> None:
    """A folder of models (one export per model, run side by side) is not one
    run's output: an export locks its own name only."""
    with output_lock(tmp_path, "other.onnx"):
        assert invoke("export", "digits-mlp", "-o", tmp_path / "model.onnx", "--external-data").exit_code == 0
    assert _names(tmp_path) == ["model.onnx", "model.onnx.data"]


def test_the_lock_of_a_name_as_long_as_the_file_system_allows_fits_it(tmp_path: Path) -> None:
    name = "m" * 250 + ".onnx"
    with output_lock(tmp_path, name):
        (lock,) = _names(tmp_path)
        assert lock.endswith(".actsparse.lock") and len(lock) < 64
        one_line_error(invoke("export", "digits-mlp", "-o", tmp_path / name), 11, "another actsparse run is writing")
    assert _names(tmp_path) == []


def _appearing(monkeypatch: pytest.MonkeyPatch, make: dict[str, str]) -> None:
    """While the exporter runs, another program makes folders (``make``: name -> a file in it) beside the output."""
    real = export_module._run_exporters

    def run(*args, **kwargs):
        found = real(*args, **kwargs)
        path: Path = args[4]
        for name, inside in make.items():
            (path.parent / name).mkdir()
            (path.parent / name / inside).write_text("keep")
        return found

    monkeypatch.setattr(export_module, "_run_exporters", run)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_appearing_at_the_data_files_name_leaves_neither_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       overwrite: list[str]) -> None:
    """It was moved aside as an old data file, the new pair written, and the
    folder deleted with the staging folder; now: exit 11, one line, neither file
    of the pair, the folder as it was (and, with --overwrite, the old model)."""
    if overwrite:
        (tmp_path / "model.onnx").write_bytes(b"old model")
    _appearing(monkeypatch, {"model.onnx.data": "precious"})
    one_line_error(invoke("export", "digits-mlp", "-o", tmp_path / "model.onnx", "--external-data", *overwrite), 11,
                   "model.onnx.data is a directory")
    assert _names(tmp_path) == [*(["model.onnx"] if overwrite else []), "model.onnx.data"]
    assert (tmp_path / "model.onnx.data" / "precious").read_text() == "keep"
    if overwrite:
        assert (tmp_path / "model.onnx").read_bytes() == b"old model"


def test_a_folder_appearing_at_the_models_name_leaves_no_data_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _appearing(monkeypatch, {"model.onnx": "precious"})
    one_line_error(invoke("export", "digits-mlp", "-o", tmp_path / "model.onnx", "--external-data"), 11,
                   "model.onnx is a directory")
    assert _names(tmp_path) == ["model.onnx"]
    assert (tmp_path / "model.onnx" / "precious").read_text() == "keep"


def test_overwriting_a_model_without_external_data_keeps_a_folder_at_the_data_files_name(tmp_path: Path) -> None:
    """An old model's data file is dropped when the new model needs none; a folder
    of that name is no data file of ours: it was deleted with everything in it."""
    assert invoke("export", "digits-mlp", "-o", tmp_path / "model.onnx").exit_code == 0
    (tmp_path / "model.onnx.data").mkdir()
    (tmp_path / "model.onnx.data" / "precious").write_text("keep")
    result = invoke("export", "digits-mlp", "-o", tmp_path / "model.onnx", "--overwrite")
    assert result.exit_code == 0, result.output
    assert _names(tmp_path) == ["model.onnx", "model.onnx.data"]
    assert (tmp_path / "model.onnx.data" / "precious").read_text() == "keep"


def test_overwriting_a_model_with_external_data_by_one_without_drops_its_data_file(tmp_path: Path) -> None:
    assert invoke("export", "digits-mlp", "-o", tmp_path / "model.onnx", "--external-data").exit_code == 0
    assert invoke("export", "digits-mlp", "-o", tmp_path / "model.onnx", "--overwrite").exit_code == 0
    assert _names(tmp_path) == ["model.onnx"]
