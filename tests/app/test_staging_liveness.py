"""Leftovers of killed runs: removed only when their run is shown to be over (its
lock is free, and it ran on this host), whatever the pid in their name says: a
run in another pid namespace (a container, another host on a shared folder) has
a pid that looks dead here."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from actsparse_deploy.base.files import remove_stale_staging, staging_dir
from tests.helpers import invoke

BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
HOST = socket.gethostname()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _leave(folder: Path, tag: str, *, kind: str = "folder", host: str = HOST, boot_id: str = BOOT_ID,
           pid: int | None = None) -> tuple[Path, Path]:
    """What a run left in ``folder``: its staging folder (or temporary file) and
    its lock file, recording the run's pid, host and boot id."""
    pid = _dead_pid() if pid is None else pid
    stem = folder / f".actsparse-{pid}-{tag}"
    lock = Path(f"{stem}-lock")
    lock.write_text(json.dumps({"pid": pid, "host": host, "boot_id": boot_id}))
    if kind == "folder":
        stem.mkdir()
        (stem / "model.onnx").write_bytes(b"half written")
        return stem, lock
    entry = Path(f"{stem}.onnx")
    entry.write_bytes(b"half written")
    return entry, lock


@contextmanager
def _held(lock: Path) -> Iterator[None]:
    """Hold ``lock`` as its live run does, from an open file of its own (flock
    locks belong to the open file, so this process's other opens are refused)."""
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def _run(command: str, out: Path, *extra: str):
    target = {"calibrate": out / "masks.safetensors", "export": out / "model.onnx", "convert": out}[command]
    return invoke(command, "digits-mlp", "-o", target, *extra)


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


REMOVED = "removed 1 staging folder and 1 temporary file left by killed actsparse runs in {}"


@pytest.mark.parametrize("command", ["calibrate", "export", "convert"])
def test_a_live_run_whose_pid_looks_dead_is_kept(out, command):
    staging, staging_lock = _leave(out, "n4msp4ce")
    temp, temp_lock = _leave(out, "n4msp4cf", kind="file")
    with _held(staging_lock), _held(temp_lock):
        result = _run(command, out)
        assert result.exit_code == 0, result.output
        assert "removed" not in result.stderr and "kept" not in result.stderr, result.stderr
        assert (staging / "model.onnx").read_bytes() == b"half written" and temp.read_bytes() == b"half written"
        assert staging_lock.exists() and temp_lock.exists()
    result = _run(command, out, "--overwrite")  # both runs over now: their files go
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [REMOVED.format(out)]
    assert not any(p.exists() for p in (staging, staging_lock, temp, temp_lock))


def test_what_killed_runs_left_is_removed_and_said(out):
    staging, staging_lock = _leave(out, "k1ll3d0a")
    temp, temp_lock = _leave(out, "k1ll3d0b", kind="file", pid=os.getpid())  # the pid says alive: the lock decides
    lookalikes = [out / ".actsparse-notes", out / ".actsparse-12-k1ll3d0a-mine", out / ".actsparse-12-k1ll3d0c-lock.bak"]
    for path in lookalikes:
        path.write_text("not ours")
    result = _run("calibrate", out)
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [REMOVED.format(out)]
    assert not any(p.exists() for p in (staging, staging_lock, temp, temp_lock))
    assert all(p.read_text() == "not ours" for p in lookalikes)


def test_a_run_of_this_kernel_is_judged_by_its_lock(out):
    """A container of this kernel has another host name and the same boot id: its lock is this kernel's."""
    staging, lock = _leave(out, "s4m3h0st", host="a-container", boot_id=BOOT_ID)
    assert remove_stale_staging(out) == 1
    assert not staging.exists() and not lock.exists()


def test_a_run_of_this_host_name_and_another_kernel_is_kept(out):
    """The same host name and another boot id: this host before a reboot, or a
    cloned machine of the same name sharing the folder whose locks this kernel
    cannot see (an NFS mount without locks): not proven dead, so kept and said."""
    staging, lock = _leave(out, "s4m3n4m3", host=HOST, boot_id="another-kernel")
    assert remove_stale_staging(out) == 0
    assert staging.is_dir() and lock.exists()


def test_a_run_on_another_host_is_kept_and_said(out, caplog):
    staging, lock = _leave(out, "0th3rh0s", host="node-7", boot_id="another-kernel")
    result = _run("calibrate", out)
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"kept 1 staging folder in {out}") and "node-7" in lines[0], lines[0]
    assert staging.is_dir() and lock.exists()


def test_files_without_a_lock_are_never_removed(out):
    pid = _dead_pid()
    staging = out / f".actsparse-{pid}-n0l0ck00"
    staging.mkdir()
    temp = out / f".actsparse-{pid}-n0l0ck01.safetensors"
    temp.write_bytes(b"half written")
    result = _run("calibrate", out)
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kept 1 staging folder and 1 temporary file in {out}"), result.stderr
    assert staging.is_dir() and temp.exists()


def test_a_lock_left_empty_by_a_run_killed_while_making_it_is_removed_unsaid(out, caplog):
    lock = out / f".actsparse-{_dead_pid()}-3mpty000-lock"
    lock.write_bytes(b"")  # what a run leaves between making its lock file and signing it
    assert remove_stale_staging(out) == 0
    assert not lock.exists() and caplog.records == []


def test_a_staging_folder_is_locked_while_it_exists(out):
    with staging_dir(out) as staging:
        locks = [p for p in out.iterdir() if p.name.endswith("-lock")]
        assert [p.name for p in locks] == [f"{staging.name}-lock"]
        record = json.loads(locks[0].read_text())
        assert record == {"pid": os.getpid(), "host": HOST, "boot_id": BOOT_ID}
        fd = os.open(locks[0], os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert remove_stale_staging(out) == 0 and staging.is_dir()
    assert list(out.iterdir()) == []


HOLD_STAGING = """
import pathlib, sys, time
from actsparse_deploy.base.files import atomic_output, staging_dir
folder = pathlib.Path(sys.argv[1])
with staging_dir(folder), atomic_output(folder / "masks.safetensors") as tmp:
    tmp.write_bytes(b"half written")
    print("writing", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_run_killed_with_sigkill_is_cleaned_up_by_the_next(out):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_STAGING, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert remove_stale_staging(out) == 0  # alive: kept
        assert len(list(out.iterdir())) == 4  # a staging folder, a temporary file and their locks
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    result = _run("calibrate", out)
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [REMOVED.format(out)]
    assert [p.name for p in out.iterdir()] == ["masks.safetensors"]
