"""Output paths under hostile or unlucky conditions, through the real CLI: files
that must not be replaced, two runs writing one folder at once, special files,
file modes, leftovers of killed runs, names near the file system's limit."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from actsparse_deploy.calibration.masks import Masks

from ..helpers import invoke, one_line_error

OUT_FILES = ["masks.safetensors", "model.onnx", "report.json"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


@pytest.fixture
def sleeper():
    """A live process that is not this one (its pid marks a run still going)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


# --- existing files -------------------------------------------------------------------


def test_convert_external_data_keeps_an_existing_data_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    data = out / "model.onnx.data"
    data.write_bytes(b"another model's weights")
    result = invoke("convert", "digits-mlp", "-o", out, "--external-data")
    one_line_error(result, 11, str(data), "--overwrite")
    assert data.read_bytes() == b"another model's weights"
    assert _names(out) == ["model.onnx.data"]  # refused before any work: nothing else written


def test_convert_overwrite_removes_the_data_of_the_model_it_replaces(tmp_path):
    out = tmp_path / "out"
    assert invoke("convert", "digits-mlp", "-o", out, "--external-data").exit_code == 0
    assert _names(out) == sorted([*OUT_FILES, "model.onnx.data"])
    result = invoke("convert", "digits-mlp", "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert _names(out) == OUT_FILES  # no data file left that nothing refers to


# --- two runs at once ---------------------------------------------------------------


@pytest.mark.slow
def test_two_converts_into_one_folder_at_once(tmp_path):
    out = tmp_path / "out"
    levels = ("0.25", "0.75")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "actsparse_deploy", "convert", "digits-mlp", "-o", str(out), "--sparsity", level],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        )
        for level in levels
    ]
    results = [(proc, *proc.communicate(timeout=300)) for proc in procs]
    codes = [proc.returncode for proc, _, _ in results]
    assert sorted(codes) == [0, 11], [err for _, _, err in results]
    winner = levels[codes.index(0)]
    loser, loser_out, loser_err = results[codes.index(11)]
    line = one_line_error(subprocess.CompletedProcess(loser.args, 11, loser_out, loser_err), 11)
    assert f"another actsparse run is writing to {out}" in line or "already exists" in line, line
    # every file comes from the one run that succeeded
    assert _names(out) == OUT_FILES
    report = json.loads((out / "report.json").read_text())
    masks = Masks.load(out / "masks.safetensors")
    assert report["overall_sparsity"] == pytest.approx(masks.overall_sparsity(), abs=1e-6)
    assert report["overall_sparsity"] == pytest.approx(float(winner), abs=0.05)
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    onnx_layers = {row["layer"]: row["sparsity"] for row in json.loads(meta["actsparse_deploy.layers"])}
    assert onnx_layers == pytest.approx({row["layer"]: row["sparsity"] for row in masks.summary()})


def test_a_file_that_appears_while_writing_is_kept_without_overwrite(tmp_path):
    from actsparse_deploy.base.errors import OutputError
    from actsparse_deploy.base.files import atomic_output

    target = tmp_path / "model.pt2"
    with pytest.raises(OutputError, match="appeared while this run was writing it"):
        with atomic_output(target, overwrite=False) as tmp:
            tmp.write_bytes(b"ours")
            target.write_bytes(b"the other run's")  # another run finished first
    assert target.read_bytes() == b"the other run's" and _names(tmp_path) == ["model.pt2"]
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_bytes(b"ours")
    assert target.read_bytes() == b"ours" and _names(tmp_path) == ["model.pt2"]


HOLD_LOCK = """
import pathlib, sys, time
from actsparse_deploy.base.files import output_lock
with output_lock(pathlib.Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_locked_folder_is_refused_and_a_dead_runs_lock_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--overwrite"]):
            result = invoke("convert", "digits-mlp", "-o", out, *extra)
            one_line_error(result, 11, f"another actsparse run is writing to {out} (pid {holder.pid})")
            assert _names(out) == [".actsparse.lock"]
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind
        holder.wait()
    assert _names(out) == [".actsparse.lock"]
    result = invoke("convert", "digits-mlp", "-o", out)
    assert result.exit_code == 0, result.output
    assert _names(out) == OUT_FILES  # the lock is gone with the run that took it over


# --- what the output path is ---------------------------------------------------------


def _calibrate(target: Path, *extra: str):
    return invoke("calibrate", "digits-mlp", "-o", target, *extra)


def _convert(target: Path, *extra: str):
    return invoke("convert", "digits-mlp", "-o", target.parent, *extra)


def _export(target: Path, *extra: str):
    return invoke("export", "digits-mlp", "-o", target, *extra)


def _squash(target: Path, *extra: str):
    masks = target.parent.parent / "masks.safetensors"
    if not masks.exists():
        assert _calibrate(masks).exit_code == 0
    return invoke("squash", "digits-mlp", "--masks", masks, "-o", target, *extra)


COMMANDS = {
    "calibrate": (_calibrate, "masks.safetensors"),
    "convert": (_convert, "model.onnx"),
    "export": (_export, "model.onnx"),
    "squash": (_squash, "model.pt2"),
}


def _output(tmp_path: Path, command: str):
    """``command``'s runner and the path of its output, in a new empty folder ``out``."""
    run, name = COMMANDS[command]
    out = tmp_path / "out"
    out.mkdir()
    return run, out / name


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_dangling_symlink_is_never_replaced(tmp_path, command, overwrite):
    run, link = _output(tmp_path, command)
    link.symlink_to(tmp_path / "nowhere")
    result = run(link, *(["--overwrite"] if overwrite else []))
    one_line_error(result, 11, str(link))
    assert link.is_symlink() and os.readlink(link) == str(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists() and _names(link.parent) == [link.name]


@pytest.mark.parametrize("kind", ["fifo", "symlink to /dev/null"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_overwrite_replaces_only_regular_files(tmp_path, command, kind):
    run, target = _output(tmp_path, command)
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/null")
    result = run(target, "--overwrite")
    one_line_error(result, 11, str(target), "not a regular file")
    if kind == "fifo":
        assert stat.S_ISFIFO(os.lstat(target).st_mode)
    else:
        assert os.readlink(target) == "/dev/null"
    assert _names(target.parent) == [target.name]


def test_overwrite_replaces_a_symlink_to_a_regular_file(tmp_path):
    real = tmp_path / "real.safetensors"
    real.write_bytes(b"old")
    link = tmp_path / "masks.safetensors"
    link.symlink_to(real)
    assert _calibrate(link, "--overwrite").exit_code == 0
    assert not link.is_symlink() and Masks.load(link).model == "digits-mlp"
    assert real.read_bytes() == b"old"  # the link is replaced, never the file it points to


# --- file modes ------------------------------------------------------------------------


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield 0o664
    os.umask(old)


def _modes(paths: list[Path]) -> dict[str, str]:
    return {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in paths}


def test_every_output_gets_the_mode_the_umask_gives(tmp_path, umask_002):
    from actsparse_deploy import ActivationSparsifier
    from actsparse_deploy.models.zoo import load_builtin

    masks, pt2, onnx_path, out = tmp_path / "m.safetensors", tmp_path / "s.pt2", tmp_path / "e.onnx", tmp_path / "c"
    assert invoke("calibrate", "digits-mlp", "-o", masks).exit_code == 0
    assert invoke("squash", "digits-mlp", "--masks", masks, "-o", pt2).exit_code == 0
    assert invoke("export", "digits-mlp", "--masks", masks, "-o", onnx_path).exit_code == 0
    assert invoke("convert", "digits-mlp", "-o", out, "--external-data").exit_code == 0
    model = load_builtin("digits-mlp")
    sp = ActivationSparsifier(model, aggregate_fn="sum_abs", reduce_fn="mean", mask_fn="topk", sparsity_level=0.5)
    sp.register_layer(model.fc2)
    state = tmp_path / "state.safetensors"
    sp.save(state)
    files = [masks, pt2, onnx_path, state, *(out / n for n in [*OUT_FILES, "model.onnx.data"])]
    assert _modes(files) == {p.name: oct(umask_002) for p in files}
    assert oct(stat.S_IMODE(out.stat().st_mode)) == oct(0o775)


def test_export_external_data_gets_the_mode_the_umask_gives(tmp_path, umask_002):
    onnx_path = tmp_path / "e.onnx"
    assert invoke("export", "digits-mlp", "-o", onnx_path, "--external-data").exit_code == 0
    files = [onnx_path, tmp_path / "e.onnx.data"]
    assert _modes(files) == {p.name: oct(umask_002) for p in files}


# --- leftovers of killed runs ------------------------------------------------------------


@pytest.mark.parametrize("command", ["convert", "calibrate", "squash", "export"])
def test_staging_of_killed_runs_is_removed(tmp_path, command, sleeper):
    run, name = COMMANDS[command]
    out = tmp_path / "out"
    out.mkdir()
    dead = _dead_pid()
    here = json.dumps({"pid": dead, "host": socket.gethostname(), "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip()})
    stale_dir = out / f".actsparse-{dead}-k1ll3d0a"
    stale_dir.mkdir()
    (stale_dir / "model.onnx").write_bytes(b"half written")
    stale_file = out / f".actsparse-{dead}-k1ll3d0b.safetensors"
    stale_file.write_bytes(b"half written")
    live = out / f".actsparse-{sleeper.pid}-runn1ng0"
    live.mkdir()
    for stem in ("k1ll3d0a", "k1ll3d0b", "runn1ng0"):  # each run's lock file, its record; the live run holds its lock
        (out / f".actsparse-{sleeper.pid if stem == 'runn1ng0' else dead}-{stem}-lock").write_text(here)
    held = os.open(out / f".actsparse-{sleeper.pid}-runn1ng0-lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    lookalikes = [out / ".actsparse-notes", out / f".actsparse-{dead}-k1ll3d0a-mine"]
    for path in lookalikes:
        path.write_text("not ours")
    try:
        result = run(out / name)
    finally:
        os.close(held)
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [
        f"removed 1 staging folder and 1 temporary file left by killed actsparse runs in {out}"
    ]
    assert not stale_dir.exists() and not stale_file.exists()
    assert live.is_dir() and all(p.read_text() == "not ours" for p in lookalikes)


# --- long names --------------------------------------------------------------------------


@pytest.mark.parametrize("command, suffix", [("calibrate", ".safetensors"), ("squash", ".pt2"), ("export", ".onnx")])
def test_a_legal_long_name_is_written(tmp_path, command, suffix):
    run, _ = COMMANDS[command]
    out = tmp_path / "out"
    out.mkdir()
    name = "m" * (240 - len(suffix)) + suffix
    result = run(out / name)
    assert result.exit_code == 0, result.output
    assert _names(out) == [name]


def test_convert_into_a_folder_with_a_legal_long_name(tmp_path):
    out = tmp_path / ("d" * 250)
    result = invoke("convert", "digits-mlp", "-o", out)
    assert result.exit_code == 0, result.output
    assert _names(out) == OUT_FILES


@pytest.mark.parametrize("length", [256, 300])
@pytest.mark.parametrize("command", ["calibrate", "export", "squash", "convert-folder", "convert-parent"])
def test_a_name_over_the_limit_is_an_output_error(tmp_path, command, length):
    out = tmp_path / "out"
    out.mkdir()
    long_name = "n" * length
    if command == "convert-folder":
        result = invoke("convert", "digits-mlp", "-o", out / long_name)
    elif command == "convert-parent":
        result = invoke("convert", "digits-mlp", "-o", out / long_name / "inner")
    else:
        run, _ = COMMANDS[command]
        result = run(out / long_name)
    one_line_error(result, 11, f"{length} bytes", "at most 255")
    assert _names(out) == []
