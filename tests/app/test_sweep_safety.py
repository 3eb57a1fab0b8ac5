"""actsparse sweep's outputs: written whole or not at all, one run at a time in a
folder, by the rules of convert's outputs (links, special files, --overwrite);
levels, methods and the output folder checked before any work."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from actsparse_deploy.base.files import output_lock

from ..helpers import invoke, one_line_error

PNG = b"\x89PNG\r\n\x1a\n"
OUT_FILES = ["sweep.json", "sweep.png"]
QUICK = ("--runs", "1", "--method", "topk")


def _sweep(out: Path, *extra: object, levels: str = "0.5"):
    return invoke("sweep", "digits-mlp", "--sparsity", levels, *QUICK, "-o", out, *extra)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _assert_sweep_outputs(out: Path) -> None:
    assert _names(out) == OUT_FILES  # no lock, no staging folder, no temporary file left
    assert json.loads((out / "sweep.json").read_text())["methods"] == ["topk"]
    assert (out / "sweep.png").read_bytes().startswith(PNG)


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


# --- links and special files at the output names ------------------------------------


@pytest.mark.parametrize("name", OUT_FILES)
def test_overwrite_replaces_a_link_to_an_outside_file_never_the_file(tmp_path, out, name):
    outside = tmp_path / "notes.txt"
    outside.write_text("my notes")
    (out / name).symlink_to(outside)
    result = _sweep(out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / name).is_symlink()
    _assert_sweep_outputs(out)
    assert outside.read_text() == "my notes"


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
@pytest.mark.parametrize("name", OUT_FILES)
def test_a_dangling_link_is_never_written_through(tmp_path, out, name, overwrite):
    nowhere = tmp_path / "nowhere"
    (out / name).symlink_to(nowhere)
    one_line_error(_sweep(out, *overwrite), 11, str(out / name))
    assert not nowhere.exists() and os.readlink(out / name) == str(nowhere)
    assert _names(out) == [name]  # refused before any work


@pytest.mark.parametrize("kind", ["symlink to /dev/null", "fifo"])
@pytest.mark.parametrize("name", OUT_FILES)
def test_a_special_file_is_never_replaced(out, name, kind):
    target = out / name
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/null")
    one_line_error(_sweep(out, "--overwrite"), 11, str(target), "not a regular file")
    assert stat.S_ISFIFO(os.lstat(target).st_mode) if kind == "fifo" else os.readlink(target) == "/dev/null"
    assert _names(out) == [name]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_a_directory_at_sweep_png_is_refused_before_any_work(out, overwrite):
    (out / "sweep.png").mkdir()
    one_line_error(_sweep(out, *overwrite), 11, str(out / "sweep.png"), "is a directory")
    assert _names(out) == ["sweep.png"] and not any((out / "sweep.png").iterdir())


def test_overwrite_replaces_both_and_without_it_an_existing_png_is_kept(out):
    (out / "sweep.png").write_bytes(b"an older plot")
    one_line_error(_sweep(out), 11, str(out / "sweep.png"), "--overwrite")
    assert _names(out) == ["sweep.png"] and (out / "sweep.png").read_bytes() == b"an older plot"
    (out / "sweep.json").write_text("{}")
    assert _sweep(out, "--overwrite").exit_code == 0
    _assert_sweep_outputs(out)


# --- whole or nothing --------------------------------------------------------------------


def _plot_fails(error: BaseException):
    def plot(result, path):
        path.write_bytes(PNG)  # half a plot
        raise error

    return plot


@pytest.mark.parametrize(
    "error, code, needle",
    [(RuntimeError("the plot broke"), 1, "internal error"), (OSError(28, "No space left on device"), 11, "the disk is full")],
    ids=["bug", "disk-full"],
)
def test_a_failed_plot_leaves_no_sweep_json(tmp_path, monkeypatch, error, code, needle):
    monkeypatch.setattr("actsparse_deploy.app.sweep.plot_sweep", _plot_fails(error))
    out = tmp_path / "new" / "out"
    result = _sweep(out)
    one_line_error(result, code, needle, start="")
    assert _names(tmp_path) == []  # nothing written, and the folders it made are gone


def test_a_failed_plot_keeps_the_old_outputs_with_overwrite(out, monkeypatch):
    for name in OUT_FILES:
        (out / name).write_text("old")
    monkeypatch.setattr("actsparse_deploy.app.sweep.plot_sweep", _plot_fails(RuntimeError("the plot broke")))
    assert _sweep(out, "--overwrite").exit_code == 1
    assert _names(out) == OUT_FILES and all((out / n).read_text() == "old" for n in OUT_FILES)


def test_a_second_sweep_into_a_locked_folder_stops(out):
    with output_lock(out):  # another run writing there (flock: a second open file is refused in this process too)
        for extra in ([], ["--overwrite"]):
            one_line_error(_sweep(out, *extra), 11, f"another actsparse run is writing to {out}")
            assert _names(out) == [".actsparse.lock"]
    assert _sweep(out).exit_code == 0
    _assert_sweep_outputs(out)


@pytest.mark.slow
def test_a_bad_mplbackend_does_not_stop_the_plot(out):
    env = {**os.environ, "MPLBACKEND": "no-such-backend", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "actsparse_deploy", "sweep", "digits-mlp", "-s", "0.5", *QUICK, "-o", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _assert_sweep_outputs(out)


# --- checked before any work ----------------------------------------------------------


def test_a_file_where_the_folder_should_be(tmp_path):
    (tmp_path / "out").write_text("a file")
    one_line_error(_sweep(tmp_path / "out"), 11, str(tmp_path / "out"), "is a file")
    assert (tmp_path / "out").read_text() == "a file"


@pytest.mark.parametrize("command", ["sweep", "calibrate", "convert"])
def test_an_unknown_method_is_a_usage_error(tmp_path, command):
    result = invoke(command, "digits-mlp", "--method", "evil", "-o", tmp_path / "out")
    one_line_error(result, 2, "--method", "evil")
    assert _names(tmp_path) == []


@pytest.mark.parametrize("levels", ["0:1:1e-9", "0:0.5:1e-320", "0:0.5:0.0004", ",".join(["0.5"] * 1001)])
def test_too_many_levels_are_refused_at_once(tmp_path, levels):
    one_line_error(_sweep(tmp_path / "out", levels=levels), 3, "at most 1000")
    assert _names(tmp_path) == []


@pytest.mark.parametrize("levels", ["nan:0.5:0.1", "0:nan:0.1", "0:0.5:inf", "0:inf:0.1"])
def test_levels_that_are_not_numbers_are_refused(tmp_path, levels):
    one_line_error(_sweep(tmp_path / "out", levels=levels), 3, "0.1:0.8:0.1")
    assert _names(tmp_path) == []


def test_the_cli_knows_every_method_a_sweep_does():
    from actsparse_deploy.app.cli_options import SweepMethod
    from actsparse_deploy.app.sweep import BASELINE, RECIPE
    from actsparse_deploy.base.constants import METHODS

    assert [str(m) for m in SweepMethod] == [RECIPE, BASELINE, *METHODS]
