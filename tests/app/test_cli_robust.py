"""The CLI with hostile text, lying files, odd sizes and the usability gaps:
through the real CLI, each case checks the exit code, exactly one line on
stderr, no traceback, and that no output file was left."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from actsparse_deploy.app import cli
from actsparse_deploy.calibration.masks import LayerMask, Masks

from ..helpers import MARKER_FROM_ENV, UserFolder, calibrate_args, invoke, one_line_error, start_cli, user_module, user_module_source

USER_MODULE = user_module_source(3, extra='''
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.intermediate_projection_dense = nn.Linear(4, 4)
        self.output_projection_dense = nn.Linear(4, 4)

    def forward(self, x):
        return self.output_projection_dense(torch.relu(self.intermediate_projection_dense(x)))


class Long(nn.Module):
    """Layer names far longer than an 80-column table allows."""

    def __init__(self):
        super().__init__()
        self.bert_encoder_transformer = nn.ModuleDict({"layer": nn.ModuleList([Block(), Block()])})

    def forward(self, x):
        for block in self.bert_encoder_transformer["layer"]:
            x = block(x)
        return x


def build_long():
    torch.manual_seed(0)
    return Long()
''')


class World(UserFolder):
    def npy(self, name: str, array: np.ndarray | None = None) -> Path:
        path = self.tmp / name
        np.save(path, np.random.default_rng(0).normal(size=(24, 4)).astype(np.float32) if array is None else array)
        return path

    def contents(self) -> set[str]:
        """The folder's entries but the user module's byte code (written where Python writes it)."""
        return {p.name for p in self.tmp.iterdir()} - {"__pycache__"}


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with user_module(tmp_path, USER_MODULE, monkeypatch) as name:
        yield World(tmp_path, name)


def recipe_file(w: World) -> Path:
    path = w.tmp / "recipe.toml"
    path.write_text('[defaults]\nsparse_config = { sparsity_level = 0.5 }\n[[layers]]\nname = "fc1"\n')
    return path


# --- held-out data equal to the calibration data --------------------------------------


def _same_as(w: World, how: str) -> tuple[Path, Path]:
    data = w.npy("calib.npy")
    if how == "same path":
        return data, data
    held = w.tmp / "held.npy"
    if how == "symlink":
        held.symlink_to(data)
    else:
        shutil.copyfile(data, held)
    return data, held


@pytest.mark.parametrize("how", ["same path", "symlink", "byte-identical copy"])
@pytest.mark.parametrize("command", ["convert", "squash", "export"])
def test_heldout_equal_to_data_is_refused(world, how, command):
    data, held = _same_as(world, how)
    before = world.contents()
    out = {"convert": "outdir", "squash": "model.pt2", "export": "model.onnx"}[command]
    args = [command, world.user(), "--data", data, "--heldout", held, "-o", out]
    if command == "convert":
        args += ["--recipe", recipe_file(world)]
        before.add("recipe.toml")
    else:
        masks = world.tmp / "masks.safetensors"
        Masks({"fc1": LayerMask(torch.ones(4))}, num_samples=4).save(masks)
        before.add("masks.safetensors")
        args += ["--masks", masks]
    result = invoke(*args)
    one_line_error(result, 6, "held-out", "calibration data")
    assert world.contents() == before


def test_distinct_heldout_still_accepted(world):
    data = world.npy("calib.npy")
    held = world.npy("held.npy", np.random.default_rng(1).normal(size=(12, 4)).astype(np.float32))
    result = invoke("convert", world.user(), "--data", data, "--heldout", held, "--recipe", recipe_file(world), "-o", "out")
    assert result.exit_code == 0, result.stderr
    assert (world.tmp / "out" / "model.onnx").is_file()


# --- markup and control characters in user text ------------------------------------------


@pytest.mark.parametrize("text", ["[/x]", "[bold red]", "[link=evil.example]here[/link]"])
def test_markup_in_a_data_path_is_printed_literally(world, text):
    missing = world.tmp / f"data{text}.npy"
    result = invoke("calibrate", world.user(), "--data", missing, "--layers", "fc1", "--sparsity", "0.5", "-o", "m.safetensors")
    err = one_line_error(result, 6, "does not exist")
    assert f"data{text}.npy" in err
    assert not (world.tmp / "m.safetensors").exists()


@pytest.mark.parametrize("text", ["[/x]", "[bold red]"])
def test_markup_in_an_output_path_is_printed_literally(world, text):
    out = world.tmp / f"no{text}dir" / "m.safetensors"
    result = invoke("calibrate", world.user(), "--data", world.npy("d.npy"), "--layers", "fc1", "--sparsity", "0.5", "-o", out)
    err = one_line_error(result, 11)
    assert f"no{text}dir" in err


def test_control_characters_in_an_error_are_stripped(world):
    missing = world.tmp / "evil\x1b[2J\rname\x07.npy"
    result = invoke("calibrate", world.user(), "--data", missing, "--layers", "fc1", "--sparsity", "0.5", "-o", "m.safetensors")
    err = one_line_error(result, 6, "does not exist", "evilname.npy")  # the escape sequence removed whole
    assert "\r" not in err and "\x07" not in err


def _hostile_masks(w: World, control: bool = False) -> Path:
    """Layer and model names that rich would read as markup; with ``control``, a
    layer name and a model name holding escape sequences too (no layer is named so)."""
    path = w.tmp / ("hostile-control.safetensors" if control else "hostile.safetensors")
    layers = {
        "[/x]": LayerMask(torch.tensor([1.0, 0.0, 1.0, 1.0])),
        "[link=https://evil.example]click[/link]": LayerMask(torch.tensor([0.0, 1.0])),
    }
    model = "model[bold]x"
    if control:
        layers["name\x1b[31mred\x1b[0m\rback"] = LayerMask(torch.tensor([1.0, 1.0]))
        model = "\x1b]0;owned\x07model\x1b[2J[bold]x"
    Masks(layers, num_samples=8, model=model).save(path)
    return path


def test_inspect_masks_with_hostile_names(world):
    result = invoke("inspect", _hostile_masks(world), env={"COLUMNS": "200"})
    assert result.exit_code == 0, (result.stderr, result.exception)
    out = result.stdout
    assert "[/x]" in out
    assert "[link=https://evil.example]click[/link]" in out
    assert "[bold]x" in out
    assert result.stderr == ""


def test_names_with_control_characters_are_a_corrupted_file_said_without_them(world):
    """No module is named with escape sequences: such a masks file is refused
    (exit 8), and the line that says so carries none of them live."""
    err = one_line_error(invoke("inspect", _hostile_masks(world, control=True)), 8, "hostile-control.safetensors", "not a layer name")
    assert "\x1b" not in err and "\r" not in err and "\x07" not in err


def test_hostile_names_on_a_terminal_print_no_live_escapes(world, monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(cli, "stdout", type(cli.stdout)(file=buf, force_terminal=True, width=200, soft_wrap=True))
    result = invoke("inspect", _hostile_masks(world))
    assert result.exit_code == 0, (result.stderr, result.exception)
    text = buf.getvalue()
    assert "[/x]" in text and "[link=https://evil.example]click[/link]" in text
    assert "\x1b]" not in text  # no hyperlink (OSC 8)


# --- lying headers ---------------------------------------------------------------------------


def _lying_npy(path: Path, shape: tuple[int, ...]) -> Path:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    path.write_bytes(buf.getvalue() + np.ones(64, np.float32).tobytes())
    return path


def test_npy_header_claiming_a_huge_shape(world):
    data = _lying_npy(world.tmp / "huge.npy", (100_000_000_000, 64))
    result = invoke("calibrate", world.user(), "--data", data, "--layers", "fc1", "--sparsity", "0.5", "-o", "m.safetensors")
    one_line_error(result, 6, "huge.npy", "declares")
    assert not (world.tmp / "m.safetensors").exists()


@pytest.mark.parametrize("name", ["x.npy", "x"])
@pytest.mark.parametrize("compress", [False, True], ids=["stored", "deflated"])
def test_npz_member_claiming_a_huge_shape(world, compress, name):
    import zipfile

    member = _lying_npy(world.tmp / "member.npy", (100_000_000_000, 64)).read_bytes()
    path = world.tmp / "huge.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
        archive.writestr(name, member)
    result = invoke("calibrate", world.user(), "--data", path, "--layers", "fc1", "--sparsity", "0.5", "-o", "m.safetensors")
    one_line_error(result, 6, "huge.npz", "declares")


def test_npz_member_that_is_no_array(world):
    import zipfile

    path = world.tmp / "odd.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", np.lib.format.MAGIC_PREFIX[:0] + b"hello")
    result = invoke("calibrate", world.user(), "--data", path, "--layers", "fc1", "--sparsity", "0.5", "-o", "m.safetensors")
    one_line_error(result, 6, "odd.npz", "member x.npy")


def test_safetensors_header_claiming_more_than_the_file(world):
    import json
    import struct

    header = json.dumps({"x": {"dtype": "F32", "shape": [100_000_000_000, 64], "data_offsets": [0, 25_600_000_000_000]}}).encode()
    path = world.tmp / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    result = invoke("calibrate", world.user(), "--data", path, "--layers", "fc1", "--sparsity", "0.5", "-o", "m.safetensors")
    one_line_error(result, 6, "huge.safetensors")


# --- batch sizes too big for any index ----------------------------------------------------------


def _batch_args(w: World, command: str) -> list[object]:
    data = w.npy("d.npy")
    masks = w.tmp / "masks.safetensors"
    if command == "calibrate":
        return ["calibrate", w.user(), "--data", data, "--layers", "fc1", "--sparsity", "0.5", "-o", "m.safetensors"]
    Masks({"fc1": LayerMask(torch.ones(4))}, num_samples=4).save(masks)
    if command == "squash":
        return ["squash", w.user(), "--masks", masks, "--data", data, "-o", "m.pt2"]
    if command == "export":
        return ["export", w.user(), "--masks", masks, "--data", data, "-o", "m.onnx"]
    if command == "validate":
        return ["validate", "absent.onnx", w.user(), "--masks", masks, "--heldout", data]
    if command == "convert":
        return ["convert", w.user(), "--data", data, "--heldout", w.npy("h.npy", np.ones((4, 4), np.float32)),
                "--recipe", recipe_file(w), "-o", "outdir"]
    return ["inspect", w.user(), "--data", data]


@pytest.mark.parametrize("command", ["calibrate", "squash", "export", "validate", "convert", "inspect"])
def test_batch_size_beyond_any_index_is_a_usage_error(world, command):
    args = _batch_args(world, command)
    before = world.contents()
    result = invoke(*args, "--batch-size", "99999999999999999999")
    one_line_error(result, 2, "--batch-size")
    assert world.contents() == before


# --- one line on stderr -----------------------------------------------------------------------


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pt(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def _raw_pickle(path: Path) -> Path:
    import pickle

    path.write_bytes(pickle.dumps({"x": 1}, protocol=4))
    return path


def test_pt_data_holding_a_raw_pickle(world):
    data = _raw_pickle(world.tmp / "raw.pt")
    result = invoke("calibrate", world.user(), "--data", data, "--layers", "fc1", "--sparsity", "0.5", "-o", "m.safetensors")
    one_line_error(result, 6, "raw.pt")
    assert not (world.tmp / "m.safetensors").exists()


def test_pt_data_holding_a_sparse_tensor(world):
    data = _pt(world.tmp / "sparse.pt", torch.eye(6, 4).to_sparse())
    result = invoke("calibrate", world.user(), "--data", data, "--layers", "fc1", "--sparsity", "0.5", "-o", "m.safetensors")
    one_line_error(result, 6, "sparse.pt")


def test_pt_data_holding_complex_numbers(world):
    data = _pt(world.tmp / "complex.pt", torch.ones(6, 4, dtype=torch.complex64))
    result = invoke("calibrate", world.user(), "--data", data, "--layers", "fc1", "--sparsity", "0.5", "-o", "m.safetensors")
    one_line_error(result, 6, "complex.pt")


@pytest.mark.parametrize("what", ["weights", "data"])
@pytest.mark.parametrize("payload", ["malicious", "namespace"])
def test_pickled_objects_are_refused_as_such(world, what, payload):
    import argparse

    marker = world.tmp / "pwned"
    obj = {"fc1.weight": Evil(marker)} if payload == "malicious" else {"fc1.weight": argparse.Namespace(a=1)}
    path = _pt(world.tmp / f"{payload}.pt", obj)
    args = ["calibrate", world.user(), "--layers", "fc1", "--sparsity", "0.5", "-o", "m.safetensors"]
    args += ["--weights", path, "--data", world.npy("d.npy")] if what == "weights" else ["--data", path]
    result = invoke(*args)
    one_line_error(result, 5 if what == "weights" else 6, "refused: holds objects that could run code", f"{payload}.pt")
    assert not marker.exists()


@pytest.mark.slow
def test_torch_warnings_stay_off_stderr_unless_verbose(world):
    """A real process: pytest would capture the warnings of an in-process run."""
    data = _raw_pickle(world.tmp / "raw.pt")
    args = ["calibrate", world.user(), "--data", data, "--layers", "fc1", "--sparsity", "0.5", "-o", "m.safetensors"]
    env = {**os.environ, "PYTHONPATH": str(world.tmp), "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "actsparse_deploy", *map(str, args)]
    quiet = subprocess.run(run, cwd=world.tmp, env=env, capture_output=True, text=True, timeout=120)
    assert "Warning" not in one_line_error(quiet, 6), quiet.stderr
    verbose = subprocess.run([*run, "--verbose"], cwd=world.tmp, env=env, capture_output=True, text=True, timeout=120)
    assert verbose.returncode == 6
    assert "UserWarning: Detected pickle protocol 4" in verbose.stderr  # --verbose shows them, with the traceback


# --- progress: stages and totals ----------------------------------------------------------------------


def test_convert_reports_each_stage(world):
    from actsparse_deploy.app.pipeline import convert

    stages: list[tuple[str, int | None]] = []
    convert(
        world.user(), world.tmp / "out", data=str(world.npy("d.npy")),
        heldout=str(world.npy("h.npy", np.ones((6, 4), np.float32))), recipe=recipe_file(world),
        on_stage=lambda name, total: stages.append((name, total)),
    )
    # the dense model's outputs (and export, for the latency) are recorded before squash changes it in place
    assert stages == [("calibrating", 24), ("recording the dense model", None), ("squashing", None), ("exporting", None), ("validating", None), ("measuring cost", None),
                      ("measuring latency", None)]


def test_progress_bar_shows_the_stage_and_the_total(world, monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(cli, "stderr", type(cli.stderr)(file=buf, force_terminal=True, width=100, stderr=True))
    result = invoke("convert", "digits-mlp", "-o", world.tmp / "out")
    assert result.exit_code == 0, buf.getvalue()
    text = buf.getvalue()
    assert "/200" in text and "/?" not in text
    for stage in ("calibrating", "squashing", "exporting", "validating", "measuring cost", "measuring latency"):
        assert stage in text, text


def test_calibrate_progress_has_the_file_total(world, monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(cli, "stderr", type(cli.stderr)(file=buf, force_terminal=True, width=100, stderr=True))
    result = invoke("calibrate", world.user(), "--data", world.npy("d.npy"), "--layers", "fc1", "--sparsity", "0.5", "-o", "m.safetensors")
    assert result.exit_code == 0
    assert "calibrating" in buf.getvalue() and "/24" in buf.getvalue()


# --- long names at 80 columns ---------------------------------------------------------------------------


LONG_NAMES = [
    f"bert_encoder_transformer.layer.{i}.{part}_projection_dense" for i in (0, 1) for part in ("intermediate", "output")
]


def _first_column(out: str) -> str:
    cells = [line.split("│")[1].strip() for line in out.splitlines() if line.count("│") >= 3]
    return "".join(cells)


def _assert_names_whole(out: str) -> None:
    assert max(len(line) for line in out.splitlines() if "│" in line) <= 80, out
    column = _first_column(out)
    for name in LONG_NAMES:
        assert name in column, out


def test_inspect_model_keeps_whole_names_at_80_columns(world):
    result = invoke("inspect", world.user("build_long"), "--data", world.npy("d.npy"), env={"COLUMNS": "80"})
    assert result.exit_code == 0, (result.stderr, result.exception)
    _assert_names_whole(result.stdout)


def test_calibrate_and_convert_tables_keep_whole_names_at_80_columns(world):
    data = world.npy("d.npy")
    calibrated = invoke(
        "calibrate", world.user("build_long"), "--data", data, "--layers", "*dense", "--sparsity", "0.5", "-o", "m.safetensors",
        env={"COLUMNS": "80"},
    )
    assert calibrated.exit_code == 0, calibrated.stderr
    _assert_names_whole(calibrated.stdout)
    inspected = invoke("inspect", "m.safetensors", env={"COLUMNS": "80"})
    _assert_names_whole(inspected.stdout.split("[defaults]")[0])
    converted = invoke(
        "convert", world.user("build_long"), "--data", data, "--heldout", world.npy("h.npy", np.ones((6, 4), np.float32)),
        "--layers", "*dense", "--sparsity", "0.5", "-o", "out",
        env={"COLUMNS": "80"},
    )
    assert converted.exit_code == 0, converted.stderr
    _assert_names_whole(converted.stdout)


# --- --labels ------------------------------------------------------------------------------------


def _labelled(w: World) -> tuple[Path, Path, np.ndarray]:
    rng = np.random.default_rng(3)
    held = rng.normal(size=(30, 4)).astype(np.float32)
    sys.path.insert(0, str(w.tmp))
    model = __import__(w.module).build().eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(held)).argmax(-1).numpy()
    labels = predicted.copy()
    labels[:6] = (labels[:6] + 1) % 3  # dense accuracy 24/30
    return w.npy("held.npy", held), w.npy("labels.npy", labels.astype(np.int64)), labels


def test_convert_with_labels_reports_accuracy(world):
    import json

    held, labels, _ = _labelled(world)
    result = invoke("convert", world.user(), "--data", world.npy("d.npy"), "--heldout", held, "--labels", labels,
                    "--recipe", recipe_file(world), "-o", "out", "--json")
    assert result.exit_code == 0, result.stderr
    cost = json.loads(result.stdout)["cost"]
    assert cost["accuracy_dense"] == pytest.approx(24 / 30)
    assert cost["accuracy_onnx"] == pytest.approx(cost["accuracy_sparse"])
    text = invoke("convert", world.user(), "--data", world.npy("d.npy"), "--heldout", held, "--labels", labels,
                  "--recipe", recipe_file(world), "-o", "out2")
    assert "accuracy dense 0.8000 -> sparse" in text.stdout


def test_validate_with_labels_names_your_models_inputs_as_export_does(world):
    """The ONNX accuracy of your own classifier: export names the input after
    ``forward``'s parameter, and the accuracy's onnxruntime feeds use that name too."""
    import json

    held, labels, _ = _labelled(world)
    assert invoke("export", world.user(), "--heldout", held, "-o", "dense.onnx").exit_code == 0
    result = invoke("validate", "dense.onnx", world.user(), "--heldout", held, "--labels", labels, "--json")
    assert result.exit_code == 0, result.stderr
    cost = json.loads(result.stdout)["cost"]
    assert cost["accuracy_dense"] == cost["accuracy_onnx"] == pytest.approx(24 / 30)


def test_labels_of_the_wrong_length(world):
    held, _, labels = _labelled(world)
    short = world.npy("short.npy", labels[:20].astype(np.int64))
    result = invoke("convert", world.user(), "--data", world.npy("d.npy"), "--heldout", held, "--labels", short,
                    "--recipe", recipe_file(world), "-o", "out")
    one_line_error(result, 6, "short.npy", "20", "30")
    assert not (world.tmp / "out").exists()


def test_labels_need_heldout(world):
    _, labels, _ = _labelled(world)
    result = invoke("convert", world.user(), "--data", world.npy("d.npy"), "--labels", labels,
                    "--recipe", recipe_file(world), "-o", "out")
    one_line_error(result, 6, "--labels", "--heldout")
    assert not (world.tmp / "out").exists()


def test_labels_must_be_integers(world):
    held, _, _ = _labelled(world)
    floats = world.npy("float_labels.npy", np.ones(30, np.float32))
    result = invoke("convert", world.user(), "--data", world.npy("d.npy"), "--heldout", held, "--labels", floats,
                    "--recipe", recipe_file(world), "-o", "out")
    one_line_error(result, 6, "float_labels.npy", "integer")


# --- convert's recipe flags ---------------------------------------------------------------------------


def test_convert_takes_layer_flags(world):
    import json

    result = invoke("convert", world.user(), "--data", world.npy("d.npy"), "--heldout", world.npy("h.npy", np.ones((6, 4), np.float32)),
                    "--layers", "fc2", "--layer-type", "Linear", "--structured", "--sparsity", "0.25", "--aggregate", "sum_abs",
                    "-o", "out", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted(row["layer"] for row in report["layers"]) == ["fc1", "fc2"]
    assert {row["mode"] for row in report["layers"]} <= {"fold", "prune"}


def test_convert_threshold(world):
    import json

    result = invoke("convert", world.user(), "--data", world.npy("d.npy"), "--heldout", world.npy("h.npy", np.ones((6, 4), np.float32)),
                    "--layers", "fc2", "--threshold", "1e9", "-o", "out", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["recipe"]["layers"][0]["name"] == "fc2"
    assert "threshold" in json.dumps(report["recipe"])
    assert report["layers"][0]["sparsity"] > 0.5


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--layers", "fc2", "--recipe", "RECIPE", "--sparsity", "0.5"], "--recipe cannot be combined"),
        (["--layers", "fc2"], "need --sparsity or --threshold"),
        (["--recipe", "RECIPE", "--structured"], "give --layers too"),
    ],
)
def test_convert_layer_flag_rules(world, extra, needle):
    recipe = recipe_file(world)
    extra = [recipe if a == "RECIPE" else a for a in extra]
    result = invoke("convert", world.user(), "--data", world.npy("d.npy"), "--heldout", world.npy("h.npy", np.ones((6, 4), np.float32)),
                    *extra, "-o", "out")
    one_line_error(result, 3, needle)
    assert not (world.tmp / "out").exists()


# --- signals in a real process ---------------------------------------------------------------------------


STARTUP = """
import os, signal, sys, time
import actsparse_deploy  # the package itself (see the xfail below)
from actsparse_deploy.__main__ import main


class SignalOnImport:  # the signal arrives while the CLI's modules import
    def find_spec(self, name, path=None, target=None):
        if name == "actsparse_deploy.app.cli":
            os.kill(os.getpid(), signal.{sig})
            time.sleep(5)
        return None


sys.meta_path.insert(0, SignalOnImport())
sys.argv = ["actsparse", "models"]
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_during_the_cli_imports_is_one_line(tmp_path, sig, code):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", STARTUP.format(sig=sig)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    one_line_error(result, code, "while starting: nothing was written", start="")
    assert result.stdout == ""


STARTUP_TORCH = """
import os, runpy, signal, sys, time


class SignalOnTorch:  # the signal arrives while torch imports, as `python -m` runs
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        return None


sys.meta_path.insert(0, SignalOnTorch())
sys.argv = ["actsparse", "models"]
runpy.run_module("actsparse_deploy", run_name="__main__", alter_sys=True)
"""


def test_importing_the_package_does_not_import_torch(tmp_path):
    code = "import sys, actsparse_deploy; print('torch' in sys.modules, actsparse_deploy.__version__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.stdout.split()[0] == "False", result.stdout + result.stderr


@pytest.mark.slow
def test_sigint_during_startup_imports_is_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", STARTUP_TORCH], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    # torch loads inside the command now (the CLI starts light): the command's own handler answers
    one_line_error(result, 130, start="interrupted (SIGINT)")


SLOW_CLEANUP = user_module_source(extra=MARKER_FROM_ENV + '''
def batches():
    try:
        yield torch.randn(4, 4)
        MARKER.touch()
        time.sleep(60)
        yield torch.randn(4, 4)
    finally:
        pathlib.Path(str(MARKER) + ".cleanup").touch()
        time.sleep(1.5)  # clean-up takes a while: a second Ctrl-C lands here
        pathlib.Path(str(MARKER) + ".done").touch()
''')


@pytest.mark.slow
def test_second_sigint_during_cleanup_is_still_one_line(tmp_path):
    (tmp_path / "slow_cleanup_model.py").write_text(SLOW_CLEANUP)
    marker = tmp_path / "marker"
    proc = start_cli(tmp_path, *calibrate_args("slow_cleanup_model"))
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    cleanup = Path(str(marker) + ".cleanup")
    while not cleanup.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert Path(str(marker) + ".done").exists()  # the clean-up ran to its end
    assert not (tmp_path / "masks.safetensors").exists()


def test_validate_labels_gives_the_onnx_accuracy_of_your_classifier(tmp_path):
    """--labels on validate: the accuracy of dense, sparse and ONNX models on your own held-out data."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images[-64:, None] / 16.0).astype(np.float32)  # the built-in digits models take 1x8x8 images
    np.save(tmp_path / "held.npy", x)
    np.save(tmp_path / "labels.npy", digits.target[-64:].astype(np.int64))
    onnx_path = tmp_path / "dense.onnx"
    assert invoke("export", "digits-mlp", "-o", onnx_path).exit_code == 0
    result = invoke("validate", onnx_path, "digits-mlp", "--heldout", tmp_path / "held.npy",
                    "--labels", tmp_path / "labels.npy", "--json")
    assert result.exit_code == 0, result.stderr
    cost = json.loads(result.stdout)["cost"]
    assert cost["accuracy_dense"] == cost["accuracy_sparse"] == cost["accuracy_onnx"] > 0.8
    short = tmp_path / "short.npy"
    np.save(short, digits.target[:10].astype(np.int64))
    bad = invoke("validate", onnx_path, "digits-mlp", "--heldout", tmp_path / "held.npy", "--labels", short)
    one_line_error(bad, 6)
