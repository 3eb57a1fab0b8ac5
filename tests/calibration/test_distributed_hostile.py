"""Distributed calibration against a hostile launch: a rank stopped by a signal
in the middle of its share or while it waits for the others, a rank alone at the
rendezvous, ranks started with other commands or options, and a launcher
environment that torchrun would never set. Every rank ends promptly with one
line on stderr and the exit code of the failure's class, and rank 0 leaves no
output of a job another rank failed. Layers the forward pass never calls are
skipped as in one process.

Workers are started with the variables torchrun sets (see test_distributed.py,
whose helpers these tests use)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ..helpers import invoke, one_line_error
from .test_distributed import MODEL, _cli, _env, _free_port

# A practically endless share of batches (the ranks stop only when told to):
# started.RANK once a batch went through, finished.RANK where the share ran out
# (a rank not named by SLOW_RANK runs through FAST batches and then waits in the
# exchange for the others).
SLOW_DATA = textwrap.dedent('''
    import os, pathlib, time, torch

    def batches():
        rank = os.environ["RANK"]
        slow = os.environ.get("SLOW_RANK", rank) == rank
        for i in range(1_000_000 if slow else int(os.environ.get("FAST", "40"))):
            if i == 1:
                pathlib.Path(f"started.{rank}").touch()
            if slow:
                time.sleep(0.05)
            yield torch.full((4, 8), float(i % 7))
        pathlib.Path(f"finished.{rank}").touch()
''')

WAIT = 90  # seconds a test waits for its ranks; a rank that would wait for the next exchange never gets there


@pytest.fixture
def slow_run(tmp_path: Path) -> Path:
    (tmp_path / "distnet.py").write_text(MODEL)
    (tmp_path / "slowdata.py").write_text(SLOW_DATA)
    return tmp_path


def _start(argvs: list[list[str]], cwd: Path, port: int | None = None, world: int | None = None,
           **extra: str) -> list[subprocess.Popen[str]]:
    """Rank r runs ``argvs[r]``, with the variables torchrun would set (``world``: more ranks than are started)."""
    port = port or _free_port()
    return [subprocess.Popen(argv, cwd=cwd, env=_env(r, world or len(argvs), port, PYTHONPATH=str(cwd), **extra),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r, argv in enumerate(argvs)]


def _finish(procs: list[subprocess.Popen[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Every rank's result; where one is still running after WAIT seconds, every rank is killed and the test fails."""
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=WAIT)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return done


def _until(*paths: Path, procs: list[subprocess.Popen[str]]) -> None:
    while not all(p.exists() for p in paths):
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank ended before {[p.name for p in paths]}: {[q.communicate() for q in procs]}")
        time.sleep(0.05)


def _slow_calibrate(out: str = "masks.safetensors") -> list[str]:
    return _cli("calibrate", "distnet:build", "--data", "slowdata:batches", "--layers", "fc2", "--sparsity", "0.5", "-o", out,
                "--dist-timeout", "600")


SIGNALS = {
    signal.SIGTERM: (143, "terminated (SIGTERM): no partial output was left", "terminated (SIGTERM)"),
    signal.SIGINT: (130, "interrupted (SIGINT): no partial output was left", "interrupted (SIGINT)"),
}


@pytest.mark.slow  # real processes, each importing torch
@pytest.mark.parametrize(("victim", "sig", "slow_rank"), [
    (1, signal.SIGTERM, None),  # both ranks in the middle of their share
    (0, signal.SIGINT, None),
    (1, signal.SIGTERM, "0"),  # rank 1 has run out of batches and waits for rank 0 in the exchange
    (0, signal.SIGTERM, "1"),  # rank 0 (which holds the rendezvous store) waits for rank 1
])
def test_a_signalled_rank_tells_the_others_at_once_and_every_rank_exits_with_its_code(
        slow_run: Path, victim: int, sig: signal.Signals, slow_rank: str | None) -> None:
    """Not at the next exchange (which the endless share never reaches): the
    signalled rank sends its failure before it leaves, the others stop at their
    next batch or in the exchange, each with one line and the signal's code."""
    extra = {"SLOW_RANK": slow_rank} if slow_rank is not None else {}
    procs = _start([_slow_calibrate()] * 2, slow_run, **extra)
    marker = "finished" if slow_rank is not None and str(victim) != slow_rank else "started"
    _until(slow_run / f"{marker}.{victim}", slow_run / f"started.{1 - victim}", procs=procs)
    procs[victim].send_signal(sig)
    done = _finish(procs)
    code, own, relayed = SIGNALS[sig]
    one_line_error(done[victim], code, start=own)
    one_line_error(done[1 - victim], code, start=f"error: rank {victim}: {relayed}")
    assert all(p.stdout == "" for p in done)
    assert not (slow_run / "masks.safetensors").exists()


# rank 1 gets stuck in one batch (a forward that takes minutes) once rank 0 has run through its share
STUCK_DATA = textwrap.dedent('''
    import os, pathlib, time, torch

    def batches():
        rank = os.environ["RANK"]
        for i in range(40):
            if i == 3 and rank == "1":
                pathlib.Path("stuck.1").touch()
                time.sleep(600)
            yield torch.full((4, 8), float(i % 7))
        pathlib.Path(f"finished.{rank}").touch()
''')


@pytest.mark.slow  # real processes, each importing torch
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_rank_serving_the_store_leaves_on_a_signal_while_a_peer_is_stuck_in_a_batch(slow_run: Path, sig: signal.Signals) -> None:
    """Rank 0 (hand-launched: it serves the store) waited in the exchange until
    the stuck rank's next batch: it leaves once that rank has read its failure,
    with one line and the signal's code; the stuck rank stops at its next batch."""
    (slow_run / "stuck.py").write_text(STUCK_DATA)
    procs = _start([_cli("calibrate", "distnet:build", "--data", "stuck:batches", "--layers", "fc2", "-s", "0.5", "-o", "m.safetensors",
                         "--dist-timeout", "600")] * 2, slow_run)
    try:
        _until(slow_run / "finished.0", slow_run / "stuck.1", procs=procs)
        time.sleep(0.5)  # rank 0 waits in the exchange by now (a signal before it is the case above)
        procs[0].send_signal(sig)
        out, err = procs[0].communicate(timeout=WAIT)
        code, own, _ = SIGNALS[sig]
        one_line_error(subprocess.CompletedProcess(procs[0].args, procs[0].returncode, out, err), code, start=own)
        assert procs[1].poll() is None  # still in its batch
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert not (slow_run / "m.safetensors").exists()


@pytest.mark.slow  # real processes, each importing torch
def test_a_failing_rank_stops_the_others_at_their_next_batch(slow_run: Path) -> None:
    """An error (not a signal) is sent at once too: rank 0, in the middle of an
    endless share, stops with rank 1's data error (exit 6)."""
    (slow_run / "baddata.py").write_text(SLOW_DATA.replace("float(i % 7))", "float(i % 7)) if rank == '0' or i < 3 else torch.ones(4, 5)"))
    procs = _start([_cli("calibrate", "distnet:build", "--data", "baddata:batches", "--layers", "fc2", "-s", "0.5", "-o", "m.safetensors",
                         "--dist-timeout", "600")] * 2, slow_run)
    for p in _finish(procs):
        one_line_error(p, 6, start="error: rank 1: the model failed on calibration batch ")
    assert not (slow_run / "m.safetensors").exists()


@pytest.mark.slow  # real processes, each importing torch
def test_a_rank_alone_at_the_rendezvous_is_one_line_naming_the_address_and_the_timeout(tmp_path: Path) -> None:
    """c10d's C++ log (dozens of lines from the TCP store's retries) never reaches stderr."""
    for rank in (1, 0):
        port = _free_port()
        p = subprocess.run(_cli("calibrate", "digits-mlp", "-o", "m.safetensors", "--dist-timeout", "2"), cwd=tmp_path,
                           env=_env(rank, 2, port), capture_output=True, text=True, timeout=WAIT)
        one_line_error(p, 7, start=f"error: rank {rank}: could not join the other 1 rank(s) at 127.0.0.1:{port} within 2 s (--dist-timeout)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # real processes, each importing torch
def test_a_signal_while_waiting_at_the_rendezvous_ends_the_rank_at_once(tmp_path: Path) -> None:
    """The rendezvous waits in C++ (where Python's signal handlers cannot run) up to
    --dist-timeout: a SIGTERM meanwhile is one line and exit 143 at once."""
    port = _free_port()
    # rank 0 of 2, alone: it holds the store and waits for rank 1
    procs = _start([_cli("calibrate", "digits-mlp", "-o", "m.safetensors", "--dist-timeout", "600")], tmp_path, port=port, world=2)
    with socket.socket() as probe:  # rank 0 listens once it waits at the rendezvous
        while probe.connect_ex(("127.0.0.1", port)) != 0:
            assert procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.05)
    procs[0].send_signal(signal.SIGTERM)
    one_line_error(_finish(procs)[0], 143, start="terminated (SIGTERM)")
    assert list(tmp_path.iterdir()) == []


# --- ranks that do not run the same command ---------------------------------------------


RANK0 = ["calibrate", "digits-mlp", "--max-samples", "64", "-s", "0.5", "-o", "m.safetensors"]


@pytest.mark.slow  # real processes, each importing torch
@pytest.mark.parametrize(("rank1", "differs"), [
    (["calibrate", "digits-mlp", "--max-samples", "64", "-s", "0.25", "-o", "m.safetensors"], "(--sparsity 0.25 on rank 1, 0.5 on rank 0)"),
    (["calibrate", "digits-mlp", "--max-samples", "32", "-s", "0.5", "-o", "m.safetensors"], "(--max-samples 32 on rank 1, 64 on rank 0)"),
    (["convert", "digits-mlp", "--max-samples", "64", "-s", "0.5", "-o", "m.safetensors"], "rank 1 runs convert, rank 0 calibrate"),
])
def test_ranks_running_other_commands_or_options_are_refused_on_every_rank(tmp_path: Path, rank1: list[str], differs: str) -> None:
    """Checked at the rendezvous, before any work: a usage error (exit 2) on every
    rank, one line naming what differs (they all exited 0 without a word, rank 0's
    options deciding)."""
    timeout = ["--dist-timeout", "60"]
    procs = _start([_cli(*RANK0, *timeout), _cli(*rank1, *timeout)], tmp_path)
    for p in _finish(procs):
        line = one_line_error(p, 2, start="error: rank 1 runs ")
        assert differs in line and "every rank must run the same command with the same options" in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # real processes, each importing torch
def test_ranks_with_the_same_options_in_another_order_and_their_own_verbose_agree(tmp_path: Path) -> None:
    same = ["calibrate", "digits-mlp", "--dist-timeout", "60", "-o", "m.safetensors", "--sparsity", "0.5", "--max-samples", "64", "--verbose"]
    done = _finish(_start([_cli(*RANK0, "--dist-timeout", "60"), _cli(*same)], tmp_path))
    assert [p.returncode for p in done] == [0, 0], [p.stderr[-2000:] for p in done]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.slow  # real processes, each importing torch
def test_ranks_with_their_own_threads_output_format_and_timeout_agree(tmp_path: Path) -> None:
    """What only tunes one host (--threads, --dist-timeout) or shapes what rank 0
    alone writes and prints (-o, --overwrite, --json) may differ: ranks started
    by hand with --threads 1 and --threads 2 were refused (exit 2 on both)."""
    (tmp_path / "m.safetensors").write_bytes(b"an earlier run's")
    rank1 = ["calibrate", "digits-mlp", "--max-samples", "64", "-s", "0.5", "-o", "other.safetensors", "--threads", "2", "--json",
             "--dist-timeout", "30"]
    done = _finish(_start([_cli(*RANK0, "--threads", "1", "--overwrite", "--dist-timeout", "60"), _cli(*rank1)], tmp_path))
    assert [p.returncode for p in done] == [0, 0], [p.stderr[-2000:] for p in done]
    assert "overall sparsity" in done[0].stdout and done[1].stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert (tmp_path / "m.safetensors").read_bytes() != b"an earlier run's"


# --- the launcher's variables: usage errors before any work ---------------------------

HUGE = "1" * 30


@pytest.mark.parametrize(("env", "start"), [
    ({"WORLD_SIZE": HUGE, "RANK": "0"}, "error: WORLD_SIZE='111111111111111111111111111111' is not a number of processes"),
    ({"WORLD_SIZE": "2147483648", "RANK": "0"}, "error: WORLD_SIZE='2147483648' is not a number of processes"),
    ({"WORLD_SIZE": HUGE}, "error: WORLD_SIZE='111111111111111111111111111111' is not a number of processes"),
    ({"RANK": HUGE}, "error: RANK='11111111111111111111' is not a rank of WORLD_SIZE=2"),
    ({"RANK": ""}, "error: WORLD_SIZE is 2 but RANK is not set"),
    ({"LOCAL_RANK": HUGE}, "error: LOCAL_RANK='11111111111111111111' is not a local rank of WORLD_SIZE=2"),
    ({"LOCAL_RANK": "2"}, "error: LOCAL_RANK='2' is not a local rank of WORLD_SIZE=2"),
    ({"LOCAL_RANK": "-1"}, "error: LOCAL_RANK='-1' is not a local rank"),
    ({"LOCAL_RANK": "\u0660"}, "error: LOCAL_RANK='\u0660' is not a local rank"),
    ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1"}, "error: LOCAL_RANK='1' is not a local rank of LOCAL_WORLD_SIZE=1"),
    ({"LOCAL_WORLD_SIZE": "x"}, "error: LOCAL_WORLD_SIZE='x' is not a number of processes"),
    ({"MASTER_PORT": "65536"}, "error: MASTER_PORT='65536' is not a port"),
    ({"MASTER_PORT": HUGE}, "error: MASTER_PORT='11111111111111111111' is not a port"),
    ({"MASTER_PORT": "\u0661"}, "error: MASTER_PORT='\u0661' is not a port"),
])
def test_a_launcher_variable_out_of_range_is_a_usage_error_before_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       env: dict[str, str], start: str) -> None:
    """Numbers past what c10d takes (a C int) were an internal error (exit 1) from
    inside torch; a local rank out of range was waited on until --dist-timeout."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", **env}.items():
        monkeypatch.setenv(name, value)
    one_line_error(invoke("calibrate", "digits-mlp", "-o", tmp_path / "m.safetensors", "--dist-timeout", "2"), 2, start=start)
    assert list(tmp_path.iterdir()) == []


def test_local_rank_of_a_cuda_device_is_checked_like_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--device cuda`` under torchrun takes this rank's LOCAL_RANK GPU: a malformed one
    was GPU 0 without a word (checked here without CUDA: the variable first)."""
    from actsparse_deploy.base.errors import UsageError
    from actsparse_deploy.calibration.distributed import local_rank

    monkeypatch.setenv("WORLD_SIZE", "2")
    for value, expected in (("1", 1), ("", 0)):
        monkeypatch.setenv("LOCAL_RANK", value)
        assert local_rank() == expected
    monkeypatch.delenv("LOCAL_RANK")
    assert local_rank() == 0
    for value in ("x", "-1", HUGE, "2"):
        monkeypatch.setenv("LOCAL_RANK", value)
        with pytest.raises(UsageError, match="is not a local rank"):
            local_rank()


def test_the_command_line_under_several_ranks_quiets_the_cpp_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """c10d writes its log to fd 2 from C++ (dozens of lines per failed connection);
    torch reads TORCH_CPP_LOG_LEVEL once, when it loads: the command line sets it
    first under torchrun, unless the user set it."""
    from actsparse_deploy.app.cli import quiet_cpp_log

    for world, preset, expected in (("2", None, "FATAL"), ("1", None, None), (None, None, None), ("2", "INFO", "INFO")):
        environ = {"WORLD_SIZE": world, "TORCH_CPP_LOG_LEVEL": preset}
        environ = {name: value for name, value in environ.items() if value is not None}
        quiet_cpp_log(environ)
        assert environ.get("TORCH_CPP_LOG_LEVEL") == expected


@pytest.mark.parametrize("command", [
    ["export", "digits-mlp", "-o", "model.onnx"], ["squash", "digits-mlp", "-o", "m.pt2"], ["sweep", "digits-mlp", "-o", "sweep"],
    ["select", "s.safetensors", "-o", "m.safetensors"], ["merge", "a.safetensors", "-o", "b.safetensors"],
    ["validate", "model.onnx", "digits-mlp"], ["inspect", "digits-mlp"],
])
def test_a_command_of_one_process_under_torchrun_is_refused_before_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        command: list[str]) -> None:
    """Every rank did the same work and wrote the same files (one rank exited 0,
    the others 11: the output exists); only calibrate and convert share their work."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    one_line_error(invoke(*command), 2, start=f"error: {command[0]} runs in one process, not under torchrun (WORLD_SIZE=2)")
    assert list(tmp_path.iterdir()) == []
    assert invoke("models").exit_code == 0  # a listing: every rank prints it
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert invoke("inspect", "digits-mlp").exit_code == 0


# --- rank 0 publishes nothing once another rank failed -----------------------------

# rank 0 runs the command line through this script: once its outputs are ready (the
# masks or statistics about to be saved), it says so (gate.0) and waits for the test's go
GATE = textwrap.dedent('''
    import os, pathlib, sys, time
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")  # as the command line sets it before torch loads
    from actsparse_deploy.calibration.masks import Masks
    from actsparse_deploy.calibration.stats import Statistics

    def gated(save):
        def wait_then_save(self, path):
            pathlib.Path("gate.0").touch()
            while not pathlib.Path("go").exists():
                time.sleep(0.05)
            return save(self, path)
        return wait_then_save

    Masks.save, Statistics.save = gated(Masks.save), gated(Statistics.save)
    from actsparse_deploy.app.cli import main
    main()
''')

GATED = {
    "convert": ["convert", "distnet:build", "--data", "calib.npy", "--heldout", "held.npy", "-b", "4", "--layers", "fc2",
                "--sparsity", "0.5", "--no-latency", "-o", "out"],
    "calibrate": ["calibrate", "distnet:build", "--data", "calib.npy", "-b", "4", "--layers", "fc2", "--sparsity", "0.5",
                  "-o", "m.safetensors"],
    "stats-only": ["calibrate", "distnet:build", "--data", "calib.npy", "-b", "4", "--layers", "fc2", "--sparsity", "0.5",
                   "--stats-only", "-o", "s.safetensors"],
}


@pytest.fixture
def gated_run(tmp_path: Path) -> Path:
    import numpy as np

    (tmp_path / "distnet.py").write_text(MODEL)
    (tmp_path / "gate.py").write_text(GATE)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.standard_normal((12, 8)).astype(np.float32))
    np.save(tmp_path / "held.npy", rng.standard_normal((8, 8)).astype(np.float32))
    return tmp_path


@pytest.mark.slow  # real processes, each importing torch
@pytest.mark.parametrize(("command", "sig"), [
    ("convert", signal.SIGTERM), ("calibrate", signal.SIGINT), ("stats-only", signal.SIGTERM), ("convert", signal.SIGKILL),
])
def test_a_rank_stopped_while_it_waits_for_rank_0_leaves_no_output(gated_run: Path, command: str, sig: signal.Signals) -> None:
    """Rank 1 waits for rank 0 to write the outputs and is stopped: rank 0 wrote
    them all the same and only then exited with rank 1's code (the files of a
    failed job on disk). Now rank 0 looks right before it moves them into place:
    the signalled rank's code (a killed rank: 7), one line, no output, no staging."""
    args = [*GATED[command], "--dist-timeout", "600"]
    before = sorted(p.name for p in gated_run.iterdir())
    procs = _start([[sys.executable, "gate.py", *args], _cli(*args)], gated_run)
    _until(gated_run / "gate.0", procs=procs)
    procs[1].send_signal(sig)
    with contextlib.suppress(subprocess.TimeoutExpired):  # in the exchange it leaves at once; else it waits for rank 0
        procs[1].wait(timeout=WAIT / 3)
    (gated_run / "go").touch()
    done = _finish(procs)
    if sig == signal.SIGKILL:
        assert done[1].returncode == -9
        line = one_line_error(done[0], 7, start="error: rank 0: distributed calibration stopped: lost the connection to another rank")
        assert "before writing the outputs" in line, line
    else:
        code, own, relayed = SIGNALS[sig]
        one_line_error(done[1], code, start=own)
        one_line_error(done[0], code, start=f"error: rank 1: {relayed}")
    assert all(p.stdout == "" for p in done)
    assert sorted(p.name for p in gated_run.iterdir() if p.name not in ("gate.0", "go", "__pycache__")) == before


# --- layers the forward pass never calls ---------------------------------------------

# nn.MultiheadAttention reads out_proj's weight without calling it; `rare` runs only
# on a batch whose first value asks for it (in the data below: batch 1, rank 1's)
ATTENDING = textwrap.dedent('''
    import torch
    from torch import nn

    class Attending(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inp = nn.Linear(4, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.rare = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.inp(x)
            h, _ = self.attn(h, h, h)
            if bool(x[0, 0, 0] > 100):
                h = self.rare(h)
            return self.head(torch.relu(h))

    def build():
        return Attending()
''')


@pytest.fixture
def attending(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import numpy as np

    (tmp_path / "attending_net.py").write_text(ATTENDING)
    data = np.random.default_rng(0).normal(size=(24, 5, 4)).astype(np.float32)
    data[6, 0, 0] = 1000.0  # batch 1 of 4 (6 samples each): rank 1's
    np.save(tmp_path / "calib.npy", data)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _attending(*args: str) -> list[str]:
    return ["calibrate", "attending_net:build", "--data", "calib.npy", "-b", "6", "--sparsity", "0.5", *args]


@pytest.mark.slow  # real processes, each importing torch
def test_never_called_layers_are_skipped_under_torchrun_as_in_one_process(attending: Path) -> None:
    """attn.out_proj, called on no rank, was exit 7 under torchrun (each rank
    could have decided alone): skipped with the note of one process; rare, called
    on rank 1 only, is calibrated on what that rank saw (the masks of one process)."""
    from actsparse_deploy.calibration.masks import Masks
    from actsparse_deploy.calibration.stats import Statistics

    for out, extra in (("one.safetensors", []), ("one.stats.safetensors", ["--stats-only"])):
        one = invoke(*_attending("--layer-type", "Linear", "-o", out, *extra))
        assert one.exit_code == 0 and "attn.out_proj" in one.stderr, one.output
    for out, extra in (("two.safetensors", []), ("two.stats.safetensors", ["--stats-only"])):
        done = _finish(_start([_cli(*_attending("--layer-type", "Linear", "-o", out, *extra), "--dist-timeout", "60")] * 2, attending))
        assert [p.returncode for p in done] == [0, 0], [p.stderr[-2000:] for p in done]
        notes = done[0].stderr.strip().splitlines()
        assert len(notes) == 1 and "attn.out_proj" in notes[0] and "never called" in notes[0], done[0].stderr
        assert done[1].stdout == done[1].stderr == ""
    a, b = Masks.load(attending / "one.safetensors"), Masks.load(attending / "two.safetensors")
    assert list(a.layers) == list(b.layers) == ["inp", "rare", "head"]
    assert all(torch.equal(a.layers[n].mask, b.layers[n].mask) for n in a.layers)
    assert a.extra == b.extra and "attn.out_proj" in b.extra["skipped"]
    s, t = Statistics.load(attending / "one.stats.safetensors"), Statistics.load(attending / "two.stats.safetensors")
    assert (s.fingerprint, s.num_samples, s.num_batches, list(s.layers)) == (t.fingerprint, t.num_samples, t.num_batches, list(t.layers))
    assert (t["rare"].num_samples, t["rare"].num_batches) == (6, 1)
    for name in s.layers:
        for x, y in zip(s[name].parts, t[name].parts):
            assert x.count == y.count and torch.allclose(x.value, y.value, rtol=1e-12, atol=0), name


@pytest.mark.slow  # real processes, each importing torch
def test_a_rule_of_never_called_layers_only_is_the_same_calibration_error_on_every_rank(attending: Path) -> None:
    done = _finish(_start([_cli(*_attending("--layers", "attn.*", "-o", "m.safetensors", "--dist-timeout", "60"))] * 2, attending))
    for p in done:
        line = one_line_error(p, 7, start="error: layers[0] (")
        assert "attn.*" in line and "attn.out_proj" in line and "never calls" in line, line
    assert not (attending / "m.safetensors").exists()
