"""External data: an ONNX model's weights in ``MODEL.onnx.data`` beside it.

Written by convert / export (asked for with ``--external-data``, or unasked over
2 GB: the limit is lowered here, the real > 2 GB run is tools/measure_big_model.py),
validated, and inspected from the graph alone (the data file is not read).
Validation, inspect and the latency measurement read external data from beside
the model only: a location that is absolute, climbs out (``..``), goes through a
link out of the model's folder, names something that is not a regular file or
claims more bytes than the file holds is refused with one line (exit 10) before
onnxruntime opens the model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from actsparse_deploy.base.errors import ValidationError
from actsparse_deploy.onnx import export as export_module
from actsparse_deploy.onnx.export import export_onnx
from actsparse_deploy.onnx.validate import check_external_data, validate

from ..helpers import TinyMLP, invoke, one_line_error

DATA = "model.onnx.data"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``convert digits-mlp --external-data``: model.onnx + model.onnx.data (every weight over 1 kB outside)."""
    out = tmp_path_factory.mktemp("external") / "out"
    result = invoke("convert", "digits-mlp", "--external-data", "--no-latency", "--sparsity", "0.5", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["export"]["external_data"] and report["validation"]["passed"]
    assert report["files"][DATA] == (out / DATA).stat().st_size > 0
    return out


def external_tensors(path: Path) -> dict[str, dict[str, str]]:
    proto = onnx.load(str(path), load_external_data=False)
    return {t.name: {e.key: e.value for e in t.external_data} for t in proto.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}


def test_convert_writes_one_data_file_that_validates_and_inspects(converted: Path) -> None:
    tensors = external_tensors(converted / "model.onnx")
    assert tensors and {t["location"] for t in tensors.values()} == {DATA}
    # every tensor's bytes lie inside the one data file, none overlapping
    spans = sorted((int(t.get("offset", 0)), int(t["length"])) for t in tensors.values())
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))
    assert spans[-1][0] + spans[-1][1] <= (converted / DATA).stat().st_size

    result = invoke("validate", converted / "model.onnx", "digits-mlp", "--masks", converted / "masks.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["validation"]["passed"]

    result = invoke("inspect", converted / "model.onnx", "--json")
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)["export"]
    proto = onnx.load(str(converted / "model.onnx"), load_external_data=False)
    assert found["initializers"] == len(proto.graph.initializer)
    assert found["data_files"] == [{"location": DATA, "tensors": len(tensors), "bytes": (converted / DATA).stat().st_size,
                                    "present": True}]
    assert [i["name"] for i in found["input_shapes"]] == [i.name for i in proto.graph.input]
    assert found["metadata"]["actsparse_deploy.squash_mode"] == "auto"


def test_inspect_reads_the_graph_only(converted: Path, tmp_path: Path) -> None:
    """Without its data file the model still inspects (the data are never read), and says the file is missing."""
    shutil.copy(converted / "model.onnx", tmp_path / "model.onnx")
    result = invoke("inspect", tmp_path / "model.onnx")
    assert result.exit_code == 0, result.stderr
    assert "input" in result.stdout and DATA in result.stdout and "missing" in result.stdout
    params = sum(int(np.prod(t.dims)) for t in onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.initializer)
    assert f"{params:,}" in result.stdout
    # validate, which runs the model, needs it: one line naming the file
    one_line_error(invoke("validate", tmp_path / "model.onnx", "digits-mlp"), 10, DATA, "does not exist")


def test_over_2gb_is_written_as_external_data_unasked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the limit (lowered here from 2 GB) the export writes its weights to MODEL.onnx.data without being asked."""
    monkeypatch.setattr(export_module, "TWO_GB", 1000)
    torch.manual_seed(0)
    model, x = TinyMLP(d_in=32, hidden=64), torch.randn(8, 32)
    result = export_onnx(model, x, tmp_path / "m.onnx", exporter="torchscript")
    assert result.external_data and (tmp_path / "m.onnx.data").is_file()
    assert result.size_bytes == (tmp_path / "m.onnx").stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    assert {t["location"] for t in external_tensors(tmp_path / "m.onnx").values()} == {"m.onnx.data"}
    assert validate(tmp_path / "m.onnx", model, [x]).passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_exporter_files_are_gathered_into_one_data_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exporter that writes one file per tensor (TorchScript over 2 GB) ends as one data file, and
    a small model exported so comes back into one file when no external data is wanted."""
    real = export_module._run_exporter

    def per_tensor(plan, path, exporter, opset):  # what TorchScript does over 2 GB
        real(plan, path, exporter, opset)
        proto = onnx.load(str(path))
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)

    monkeypatch.setattr(export_module, "_run_exporter", per_tensor)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.manual_seed(0)
    model, x = TinyMLP(d_in=32, hidden=64), torch.randn(8, 32)
    asked = export_onnx(model, x, tmp_path / "a" / "m.onnx", exporter="torchscript", external_data=True)
    assert asked.external_data and sorted(p.name for p in (tmp_path / "a").iterdir()) == ["m.onnx", "m.onnx.data"]
    assert validate(tmp_path / "a" / "m.onnx", model, [x]).passed
    plain = export_onnx(model, x, tmp_path / "b" / "m.onnx", exporter="torchscript")
    assert not plain.external_data and sorted(p.name for p in (tmp_path / "b").iterdir()) == ["m.onnx"]
    assert not external_tensors(tmp_path / "b" / "m.onnx")
    assert validate(tmp_path / "b" / "m.onnx", model, [x]).passed


# --- hostile locations -------------------------------------------------------------------


def hostile(converted: Path, root: Path, case: str) -> tuple[Path, str]:
    """A copy of the converted model in ``root/model`` whose first external tensor's location is ``case``'s;
    a copy of the data sits outside the folder (``root/outside``), so only a refusal stops a read of it."""
    folder, outside = root / "model", root / "outside"
    folder.mkdir()
    outside.mkdir()
    shutil.copy(converted / DATA, folder / DATA)
    shutil.copy(converted / DATA, outside / DATA)
    proto = onnx.load(str(converted / "model.onnx"), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    entries = {e.key: e for e in tensor.external_data}
    location = {
        "absolute": str(outside / DATA),
        "parent": f"../outside/{DATA}",
        "hidden parent": f"sub/../../outside/{DATA}",
        "link out": "link.data",
        "folder link out": f"linked/{DATA}",
        "fifo": "fifo.data",
        "folder": ".",
        "missing": "gone.data",
        "too long": DATA,
        "empty": "",
    }[case]
    entries["location"].value = location
    if case == "link out":
        os.symlink(outside / DATA, folder / "link.data")
    if case == "folder link out":
        os.symlink(outside, folder / "linked")
    if case == "fifo":
        os.mkfifo(folder / "fifo.data")
    if case == "too long":
        entries["length"].value = str((folder / DATA).stat().st_size + 1)
    onnx.save(proto, str(folder / "model.onnx"))
    return folder / "model.onnx", tensor.name


HOSTILE = ["absolute", "parent", "hidden parent", "link out", "folder link out", "fifo", "folder", "missing", "too long", "empty"]


@pytest.fixture
def no_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every onnxruntime session opened, recorded (and opened as usual)."""
    opened: list[str] = []
    real = onnxruntime.InferenceSession

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    return opened


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_location_refused_before_onnxruntime(converted: Path, tmp_path: Path, case: str, no_onnxruntime: list[str]) -> None:
    path, tensor = hostile(converted, tmp_path, case)
    line = one_line_error(invoke("validate", path, "digits-mlp"), 10, str(path), tensor)
    assert no_onnxruntime == [], line
    # inspect reads no data, but neither does it accept a model that points out of its folder
    if case not in ("missing", "too long", "fifo", "folder"):
        one_line_error(invoke("inspect", path), 10, tensor)
    assert no_onnxruntime == []


def test_latency_refuses_a_hostile_model(converted: Path, tmp_path: Path, no_onnxruntime: list[str]) -> None:
    from actsparse_deploy.onnx.latency import latency_ratio

    path, tensor = hostile(converted, tmp_path, "parent")
    with pytest.raises(ValidationError, match=tensor):
        latency_ratio(converted / "model.onnx", path, [torch.zeros(1, 1, 8, 8)])
    assert str(path) not in no_onnxruntime


def test_links_and_subfolders_inside_the_folder_are_fine(converted: Path, tmp_path: Path) -> None:
    """A location in a subfolder, or through a link that stays in the folder, is beside the model."""
    folder = tmp_path / "model"
    (folder / "weights").mkdir(parents=True)
    shutil.copy(converted / DATA, folder / "weights" / DATA)
    os.symlink(folder / "weights" / DATA, folder / "link.data")
    proto = onnx.load(str(converted / "model.onnx"), load_external_data=False)
    for i, tensor in enumerate(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL):
        next(e for e in tensor.external_data if e.key == "location").value = f"weights/{DATA}" if i % 2 else "link.data"
    onnx.save(proto, str(folder / "model.onnx"))
    assert check_external_data(folder / "model.onnx") == {f"weights/{DATA}": (folder / "weights" / DATA).stat().st_size,
                                                          "link.data": (folder / "weights" / DATA).stat().st_size}


# --- review: the 2 GB decision, names, links, a full disk, the report schema ------------------------


def test_the_2gb_decision_at_its_edges() -> None:
    """External data when asked, or when the graph plus the tensors loaded back would reach the protobuf
    limit; the headroom covers what loading a tensor back adds to the message (its field tags and lengths)."""
    from actsparse_deploy.onnx.export import needs_external_data

    assert needs_external_data(10, 0, asked=True, limit=1000, headroom=100)
    assert not needs_external_data(899, 0, asked=False, limit=1000, headroom=100)
    assert needs_external_data(900, 0, asked=False, limit=1000, headroom=100)
    assert needs_external_data(500, 400, asked=False, limit=1000, headroom=100)  # the exporter's files count
    assert not needs_external_data(500, 399, asked=False, limit=1000, headroom=100)
    assert needs_external_data(2**31 - 1, 0, asked=False)  # one byte under 2 GiB: too close to save as one file
    assert not needs_external_data(2**30, 0, asked=False)


def test_export_external_data_under_2gb_with_spaces_validates(tmp_path: Path) -> None:
    """`export --external-data` on a small model, into a path with spaces: both files, and validate passes."""
    folder = tmp_path / "my models"
    folder.mkdir()
    target = folder / "tiny model.onnx"
    result = invoke("export", "digits-mlp", "--external-data", "-o", target, "--json")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["tiny model.onnx", "tiny model.onnx.data"]
    assert json.loads(result.stdout)["export"]["external_data"] is True
    locations = {t["location"] for t in external_tensors(target).values()}
    assert locations == {"tiny model.onnx.data"}
    result = invoke("validate", target, "digits-mlp", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["validation"]["passed"]


def test_hard_link_and_shared_file_accepted_case_and_offset_refused(converted: Path, tmp_path: Path) -> None:
    """Two tensors in one file at other offsets, read through a hard link: accepted (and runs); a location that
    differs only in case (another file on a case-sensitive disk) and an offset past the end: refused."""
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(converted / DATA, folder / DATA)
    os.link(folder / DATA, folder / "hard.data")
    proto = onnx.load(str(converted / "model.onnx"), load_external_data=False)
    tensors = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(tensors) >= 2
    for tensor in tensors[::2]:
        next(e for e in tensor.external_data if e.key == "location").value = "hard.data"
    onnx.save(proto, str(folder / "model.onnx"))
    assert set(check_external_data(folder / "model.onnx")) == {DATA, "hard.data"}
    result = invoke("validate", folder / "model.onnx", "digits-mlp", "--masks", converted / "masks.safetensors")
    assert result.exit_code == 0, result.stderr

    entries = {e.key: e for e in tensors[1].external_data}
    entries["location"].value = DATA.upper()
    onnx.save(proto, str(folder / "model.onnx"))
    one_line_error(invoke("validate", folder / "model.onnx", "digits-mlp"), 10, DATA.upper(), "does not exist")

    entries["location"].value = DATA
    entries["offset"].value = str((folder / DATA).stat().st_size + 4096)
    del tensors[1].external_data[[e.key for e in tensors[1].external_data].index("length")]
    onnx.save(proto, str(folder / "model.onnx"))
    one_line_error(invoke("validate", folder / "model.onnx", "digits-mlp"), 10, tensors[1].name, "claims bytes")


def test_a_full_disk_while_writing_the_data_file_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while the data file is written (faked: a full disk cannot be made here): exit 11, one line,
    no model, no data file, no staging folder; an old model there is kept as it was."""
    import builtins
    import errno

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 2000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if str(path).endswith(".onnx.data") and "w" in mode else f

    monkeypatch.setattr(export_module, "open", fake_open, raising=False)
    (tmp_path / "m.onnx").write_bytes(b"old model")
    line = one_line_error(invoke("export", "digits-mlp", "--external-data", "--overwrite", "-o", tmp_path / "m.onnx"), 11, "m.onnx",
                    "disk is full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"], line
    assert (tmp_path / "m.onnx").read_bytes() == b"old model"


def test_inspect_onnx_json_has_the_one_report_schema(converted: Path) -> None:
    """`inspect MODEL.onnx --json` is a report like every command's: the same top-level keys, in order; the
    ONNX file is its `export` section (path, opset, inputs, outputs, external data, size) plus what the graph holds."""
    from actsparse_deploy.app.report import KEYS, Report

    result = invoke("inspect", converted / "model.onnx", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert list(report) == list(KEYS)
    assert Report.from_json(report).to_json() == report
    export = report["export"]
    proto = onnx.load(str(converted / "model.onnx"), load_external_data=False)
    assert export["path"] == str(converted / "model.onnx") and export["external_data"] is True
    assert export["inputs"] == [i.name for i in proto.graph.input] and export["outputs"] == [o.name for o in proto.graph.output]
    assert export["opset"] == next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert export["size_bytes"] == (converted / "model.onnx").stat().st_size + (converted / DATA).stat().st_size
    assert report["files"] == {str(converted / "model.onnx"): (converted / "model.onnx").stat().st_size,
                               str(converted / DATA): (converted / DATA).stat().st_size}
    assert report["squash_mode"] == "auto" and [row["layer"] for row in report["layers"]] == ["fc2", "fc3"]
