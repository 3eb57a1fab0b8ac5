"""Plain helpers the tests import (conftest.py holds only fixtures and hooks):
tiny models, a user's own model file, the CLI runner (``invoke`` in this process,
``start_cli`` in a real one) and the check of a one-line error of either
(``one_line_error``), and commands run in a background thread.

    >>> TinyMLP()(torch.zeros(2, 6)).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from typer.testing import CliRunner

runner = CliRunner()
#: a terminal wide enough that rich wraps no line of a table or a help text
WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}


def _cli_command_built_once() -> None:
    """typer's CliRunner turns the Typer app into its click command again on every
    call (~35 ms for this CLI, a thousand calls in the suite). The command holds
    no state between runs (the callbacks look up what they call at run time), so
    the CLI's is built once per test process; any other app as before."""
    import typer.testing

    build = typer.testing._get_command
    built: dict[Any, Any] = {}

    def get_command(app: Any) -> Any:
        from actsparse_deploy.app import cli

        if app is not cli.app:
            return build(app)
        if app not in built:
            built[app] = build(app)
        return built[app]

    typer.testing._get_command = get_command


_cli_command_built_once()


def invoke(*args: object, env: dict[str, str] | None = None):
    """``actsparse ARGS`` in this process (typer's CliRunner); every argument as a
    string, ``env``: variables set for the run (``WIDE``: a wide terminal)."""
    from actsparse_deploy.app.cli import app

    return runner.invoke(app, [str(a) for a in args], env=env)


def one_line_error(result: Any, code: int, *needles: str, start: str = "error: ") -> str:
    """The run failed with exit ``code`` and said why in exactly one line on
    stderr, starting with ``start`` and naming every needle, with no traceback and
    no escape sequence, and nothing on stdout; that line.

    ``result``: a run of :func:`invoke` (which must have ended in ``SystemExit``,
    not an exception the CLI let through) or a finished real process
    (``subprocess.CompletedProcess``).
    """
    if isinstance(result, subprocess.CompletedProcess):
        got, out, err = result.returncode, result.stdout, result.stderr
        assert got == code, (got, out[-3000:], err[-3000:])
    else:
        got, out, err = result.exit_code, result.stdout, result.stderr
        assert got == code, (got, out, err, result.exception)
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err[-3000:]
    assert "Traceback" not in err and "\x1b" not in err, err
    assert lines[0].startswith(start), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert out.strip() == "", out[-3000:]
    return lines[0]


class TinyMLP(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 8, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class LinearPair(nn.Module):
    """``fc(relu(a(x)))``: ``a`` makes fc's input features (``width`` of them);
    subclasses change ``forward`` to read fc or its weight in other ways."""

    def __init__(self, width: int = 8, d_out: int = 3) -> None:
        super().__init__()
        self.a = nn.Linear(4, width)
        self.fc = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.a(x)))


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv2(self.act(self.conv1(x))))
        return self.fc(self.pool(h).flatten(1))


# --- a user's own model: the file a user writes, named as package.module:factory ---------

#: factories for :func:`user_module_source`'s ``extra``: ``build_attending`` returns a model whose
#: ``nn.MultiheadAttention`` reads its out_proj's weight without calling out_proj (a layer never called)
ATTENTION = '''
class Attending(nn.Module):
    """nn.MultiheadAttention reads its out_proj's weight without calling out_proj."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        h, _ = self.attn(h, h, h)
        return self.head(torch.relu(h))


def build_attending():
    torch.manual_seed(0)
    return Attending()
'''



def user_module_source(out_features: int = 2, extra: str = "", forward_first: str = "") -> str:
    """The text of a user's model file: ``Net`` (``fc1`` Linear(4, hidden=8), ReLU,
    ``fc2`` Linear(hidden, ``out_features``)), a seeded ``build()`` and ``extra``
    (more factories and classes; ``os``, ``pathlib``, ``time``, ``torch`` and
    ``nn`` are imported). ``forward_first``: statements that open ``Net.forward``.

    >>> namespace = {}
    >>> exec(user_module_source(3), namespace)
    >>> namespace["build"]()(torch.zeros(5, 4)).shape
    torch.Size([5, 3])
    """
    first = textwrap.indent(textwrap.dedent(forward_first).strip() + "\n", " " * 8) if forward_first else ""
    return f'''
import os
import pathlib
import time

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, hidden=8):
        super().__init__()
        self.fc1 = nn.Linear(4, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, {out_features})

    def forward(self, x):
{first}        return self.fc2(self.act(self.fc1(x)))


def build():
    torch.manual_seed(0)
    return Net()

''' + textwrap.dedent(extra)


@dataclass
class UserFolder:
    """A test's folder ``tmp`` and the user module written there (``user_module``)."""

    tmp: Path
    module: str

    def file(self, name: str) -> Path:
        return self.tmp / name

    def user(self, factory: str = "build") -> str:
        """The model as the CLI takes it: ``module:factory``."""
        return f"{self.module}:{factory}"

    def recipe(self, text: str) -> Path:
        path = self.file("recipe.toml")
        path.write_text(text)
        return path


#: for a user module run by ``start_cli``: the path it touches to say where it is
MARKER_FROM_ENV = 'MARKER = pathlib.Path(os.environ["ACTSPARSE_TEST_MARKER"])\n'

_user_modules = itertools.count()


@contextmanager
def user_module(directory: Path, source: str, monkeypatch) -> Iterator[str]:
    """``source`` written to a module in ``directory`` (put on the import path)
    under a name no other test uses, so imports do not leak between tests; gives
    the module's name and forgets its import afterwards."""
    name = f"user_model_{next(_user_modules)}"
    (directory / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(directory))
    try:
        yield name
    finally:
        sys.modules.pop(name, None)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "actsparse_deploy", *args]


def start_cli(directory: Path, *args: str) -> subprocess.Popen[str]:
    """``actsparse ARGS`` started in a real process in ``directory``, which is on
    its import path (a user module written there loads); ``directory / "marker"``
    is its ACTSPARSE_TEST_MARKER (see ``MARKER_FROM_ENV``)."""
    env = {**os.environ, "ACTSPARSE_TEST_MARKER": str(directory / "marker"), "PYTHONPATH": str(directory), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(_cli(*args), cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def calibrate_args(module: str) -> list[str]:
    """``calibrate MODULE:build`` on the batches ``MODULE:batches()`` yields:
    layer fc2 at sparsity 0.5, to masks.safetensors."""
    return ["calibrate", f"{module}:build", "--data", f"{module}:batches", "--layers", "fc2", "--sparsity", "0.5", "-o", "masks.safetensors"]


# --- commands run in the background: one MiniLM run per exporter, the benchmark --------

ROOT = Path(__file__).resolve().parent.parent


#: name -> argv, run in this order (only those the selected tests ask for with
#: ``@pytest.mark.background(name, ...)``, and what those need), each in the folder
#: named by its name up to the first "-" (the MiniLM commands share one, which the
#: first of them finds empty): the benchmark script's quick digits section; the
#: README's MiniLM command (the default exporter, torchscript), a .pt2 of the same
#: masks, the dynamo exporter
BACKGROUND_COMMANDS: dict[str, list[str]] = {
    "benchmark": [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--quick", "--sections", "speed-digits", "--out", "bench.json"],
    "minilm-torchscript": _cli("convert", "minilm", "-o", "out/minilm"),  # the README's command, as written
    "minilm-pt2": _cli("squash", "minilm", "--masks", "out/minilm/masks.safetensors", "-o", "minilm.pt2", "--json"),
    # the other exporter on 64 of the calibration sentences, without latency figures (the run above has both)
    "minilm-dynamo": _cli("convert", "minilm", "-o", "out/minilm-dynamo", "--exporter", "dynamo", "--no-latency", "--max-samples", "64"),
}
#: what a command reads from another one's output
BACKGROUND_NEEDS = {"minilm-pt2": ("minilm-torchscript",)}
MINILM_OUTDIRS = {"torchscript": "out/minilm", "dynamo": "out/minilm-dynamo"}


def background_selection(names: set[str]) -> dict[str, list[str]]:
    """The commands ``names`` need, in their order; an unknown name is an error."""
    unknown = names - set(BACKGROUND_COMMANDS)
    assert not unknown, f"unknown background command(s) {sorted(unknown)}; known: {list(BACKGROUND_COMMANDS)}"
    wanted = set(names)
    for name in names:
        wanted.update(BACKGROUND_NEEDS.get(name, ()))
    return {name: argv for name, argv in BACKGROUND_COMMANDS.items() if name in wanted}


class BackgroundCommands:
    """Commands run one after another in real processes, from a background thread
    of one test process (``runner``): they use a core while the tests go on.
    Each finished command leaves ``.results/NAME.json`` in ``root``, so every test
    process of the session (pytest-xdist workers share ``root``) reads the same
    runs; ``result(name)`` waits for one and fails the test that asked if it failed."""

    def __init__(self, root: Path, commands: dict[str, list[str]], runner: bool = True) -> None:
        self.root = root
        self.commands = commands
        self.runner = runner
        # the environment now, before any test patches os.environ
        self.env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self._stopped = False
        self._proc: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._run, name="background-commands", daemon=True)

    def start(self) -> BackgroundCommands:
        (self.root / ".results").mkdir(parents=True, exist_ok=True)
        if self.runner:
            self._thread.start()
        return self

    def _result_file(self, name: str) -> Path:
        return self.root / ".results" / f"{name}.json"

    def _record(self, name: str, argv: list[str], returncode: int | None, out: str, err: str) -> None:
        path = self._result_file(name)
        staged = path.with_suffix(".tmp")
        staged.write_text(json.dumps({"argv": argv, "returncode": returncode, "stdout": out, "stderr": err}))
        staged.replace(path)  # readers see a whole file or none

    def _run(self) -> None:
        try:
            for name, argv in self.commands.items():
                if self._stopped:
                    break
                cwd = self.folder(name)
                cwd.mkdir(exist_ok=True)
                self._proc = subprocess.Popen(
                    argv, cwd=cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
                out, err = self._proc.communicate()
                self._record(name, argv, self._proc.returncode, out, err)
        finally:
            for name, argv in self.commands.items():  # a stopped chain wakes every waiter (result() then says so)
                if not self._result_file(name).exists():
                    self._record(name, argv, None, "", "the background run was stopped before this command")

    def folder(self, name: str) -> Path:
        """The working directory of command ``name``."""
        return self.root / name.split("-")[0]

    def result(self, name: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """The finished command ``name``; asserts that it exited 0."""
        assert name in self.commands, f"{name!r} was not scheduled: mark the test @pytest.mark.background({name!r})"
        shown = " ".join(self.commands[name][1:])
        path = self._result_file(name)
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert time.monotonic() < deadline, f"`{shown}` still runs after {timeout} s"
            time.sleep(0.2)
        done = json.loads(path.read_text())
        assert done["returncode"] is not None, f"`{shown}` never ran: {done['stderr']}"
        assert done["returncode"] == 0, f"`{shown}` exited {done['returncode']}: {done['stderr']}"
        return subprocess.CompletedProcess(done["argv"], done["returncode"], done["stdout"], done["stderr"])

    def finish(self, interrupted: bool) -> None:
        """At the end of this process's tests: let the commands finish (another
        test process may still read them), or kill the one running if the session
        was interrupted."""
        if not self.runner:
            return
        if interrupted:
            self._stopped = True
            proc = self._proc
            if proc is not None and proc.poll() is None:
                proc.kill()
        self._thread.join(timeout=900)


def assert_same_outputs(model: nn.Module, reference: nn.Module, batches: Any) -> None:
    """Outputs within rtol 1e-4, atol 1e-5 scaled by the output's magnitude (the comparator prune uses)."""
    from actsparse_deploy.data.batches import flatten_outputs, run_batch
    from actsparse_deploy.data.compare import Tolerance, compare_outputs

    tolerance = Tolerance(atol=1e-5, rtol=1e-4, scale_atol=True)
    with torch.no_grad():
        for batch in batches:
            got, want = flatten_outputs(run_batch(model.eval(), batch)), flatten_outputs(run_batch(reference.eval(), batch))
            diffs, problems = compare_outputs(got, want, tolerance)
            assert problems == [] and len(diffs) == len(want) > 0


# --- digits: files the CLI writes, made once per session --------------------------------


class DigitsFiles:
    """Masks, ``.pt2`` programs and ONNX models that the CLI writes for the
    built-in digits models with their built-in recipes, each made on first use
    and shared by every test of the session: tests only read them (copy one
    before changing it)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.outputs: dict[str, str] = {}  # file name -> stdout of the command that wrote it
        self._lock = threading.Lock()

    def _make(self, name: str, *args: object) -> Path:
        path = self.root / name
        with self._lock:
            if not path.exists():
                result = invoke(*args, "-o", path)
                assert result.exit_code == 0, f"{' '.join(map(str, args))}: {result.output}"
                self.outputs[name] = result.stdout
        return path

    def masks(self, model: str) -> Path:
        """``actsparse calibrate MODEL``."""
        return self._make(f"{model}.safetensors", "calibrate", model)

    def pt2(self, model: str) -> Path:
        """``actsparse squash MODEL --masks masks(MODEL)`` (mode auto)."""
        return self._make(f"{model}.pt2", "squash", model, "--masks", self.masks(model))

    def dense_onnx(self, model: str) -> Path:
        """``actsparse export MODEL`` without masks."""
        return self._make(f"{model}-dense.onnx", "export", model)

    def pt2_onnx(self, model: str) -> Path:
        """``actsparse export pt2(MODEL)``: the squashed program's ONNX model."""
        return self._make(f"{model}-pt2.onnx", "export", self.pt2(model))


# --- work started in a thread when the session begins ------------------------------------


def _interrupt_cases(root: Path) -> Any:
    from .app.test_interrupt import run_interrupt_cases

    return run_interrupt_cases(root)


#: name -> a function of a fresh folder, run in a thread from the start of the session
EARLY_WORK: dict[str, Callable[[Path], Any]] = {"interrupts": _interrupt_cases}


class EarlyWork:
    """Functions of ``EARLY_WORK`` run in threads from the start of the session
    (real processes they manage then overlap the tests that come first), or, when
    not started (an xdist worker), on first use; ``result(name)`` waits for one
    and re-raises what it raised."""

    def __init__(self, root: Path, names: set[str]) -> None:
        unknown = names - set(EARLY_WORK)
        assert not unknown, f"unknown early work {sorted(unknown)}; known: {list(EARLY_WORK)}"
        self.root = root
        self._results: dict[str, Any] = {}
        self._errors: dict[str, BaseException] = {}
        self._threads = {name: threading.Thread(target=self._run, args=(name,), name=f"early-{name}", daemon=True) for name in sorted(names)}

    def start(self) -> EarlyWork:
        for thread in self._threads.values():
            thread.start()
        return self

    def _run(self, name: str) -> None:
        try:
            self._results[name] = EARLY_WORK[name](self.root / name)
        except BaseException as e:  # handed to the test that reads it
            self._errors[name] = e

    def result(self, name: str, timeout: float = 600) -> Any:
        assert name in self._threads, f"{name!r} was not started: mark the test @pytest.mark.early({name!r})"
        if self._threads[name].ident is None:
            self._threads[name].start()
        self._threads[name].join(timeout)
        assert not self._threads[name].is_alive(), f"early work {name!r} still runs after {timeout} s"
        if name in self._errors:
            raise self._errors[name]
        return self._results[name]

    def join(self) -> None:
        for thread in self._threads.values():
            if thread.ident is not None:
                thread.join(300)
