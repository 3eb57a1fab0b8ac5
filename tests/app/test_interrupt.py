"""A real `actsparse` process interrupted mid-run leaves no partial output and
exits with the conventional code (130 for SIGINT, 143 for SIGTERM)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from ..helpers import MARKER_FROM_ENV, calibrate_args, one_line_error, start_cli, user_module_source

pytestmark = pytest.mark.slow  # real processes, each importing torch

SLOW_MODULE = user_module_source(
    forward_first='''
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        MARKER.touch()  # the exporter is tracing: now is mid-export
        time.sleep(60)
''',
    extra=MARKER_FROM_ENV + '''
def batches():
    yield torch.randn(4, 4)
    MARKER.touch()  # one batch calibrated: now is mid-calibration
    time.sleep(60)
    yield torch.randn(4, 4)
''',
)


def _start(directory: Path, args: list[str]) -> subprocess.Popen:
    (directory / "slow_user_model.py").write_text(SLOW_MODULE)
    np.save(directory / "data.npy", np.ones((8, 4), np.float32))
    return start_cli(directory, *args)


CALIBRATE = calibrate_args("slow_user_model")
SIGNALS = {"SIGINT": (signal.SIGINT, 130), "SIGTERM": (signal.SIGTERM, 143)}
EXPORTERS = ["torchscript", "dynamo"]
# case id -> the command
COMMANDS = {
    "calibration": CALIBRATE,
    **{f"export-{e}": ["export", "slow_user_model:build", "--heldout", "data.npy", "--exporter", e, "-o", "model.onnx"] for e in EXPORTERS},
}
# (command, signal): every command and every signal, each signal both mid-calibration
# and mid-export (one handler serves both signals; each process costs a torch import)
CASES = [("calibration", "SIGINT"), ("calibration", "SIGTERM"), ("export-torchscript", "SIGTERM"), ("export-dynamo", "SIGINT")]


def run_interrupt_cases(root: Path) -> dict[tuple[str, str], tuple[subprocess.CompletedProcess | str, Path]]:
    """Every (command, signal) case of ``CASES`` at once: each process is started, waits at its
    marker (mid-calibration or mid-export) until it gets its signal, and all of
    them overlap (their start-up is most of the time). Maps each case to its
    finished process (or why it never reached the point to interrupt) and its folder."""
    started = {}
    for command, name in CASES:
        directory = root / f"{command}-{name}"
        directory.mkdir(parents=True)
        started[command, name] = (_start(directory, COMMANDS[command]), directory)
    results: dict[tuple[str, str], tuple[subprocess.CompletedProcess | str, Path]] = {}
    waiting = dict(started)
    deadline = time.monotonic() + 180
    try:
        while waiting:
            for case, (proc, directory) in list(waiting.items()):
                if (directory / "marker").exists():
                    proc.send_signal(SIGNALS[case[1]][0])
                    del waiting[case]
                elif proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    out, err = proc.communicate()
                    results[case] = (f"never reached the point to interrupt: rc {proc.returncode}\n{out}\n{err}", directory)
                    del waiting[case]
            time.sleep(0.05)
        for case, (proc, directory) in started.items():
            if case not in results:
                out, err = proc.communicate(timeout=60)
                results[case] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), directory)
    finally:
        for proc, _ in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


@pytest.fixture(scope="module")
def interrupted(early) -> dict[tuple[str, str], tuple[subprocess.CompletedProcess | str, Path]]:
    """The cases, started in a thread as soon as the session knew it would run
    them (tests/conftest.py: ``early``), so that their processes overlap the tests
    before these instead of blocking one of them."""
    return early.result("interrupts")


def _leftovers(directory: Path) -> list[str]:
    ignore = {"slow_user_model.py", "marker", "__pycache__", "data.npy"}
    return sorted(p.name for p in directory.iterdir() if p.name not in ignore)


@pytest.mark.early("interrupts")
@pytest.mark.parametrize(("command", "sig"), CASES, ids=[f"{c}-{s}" for c, s in CASES])
def test_interrupt_leaves_nothing_and_exits_with_the_signal_code(interrupted, command, sig):
    result, directory = interrupted[command, sig]
    assert not isinstance(result, str), result
    one_line_error(result, SIGNALS[sig][1], "no partial output", start="")
    assert _leftovers(directory) == []  # no masks file, no model.onnx, no staging directory
