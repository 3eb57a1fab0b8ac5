"""Fixtures shared by the tests (helpers they import live in tests/helpers.py).

Expensive outputs are made once per session and only read by the tests: the
digits files (``digits_files``) and the commands of ``background`` (one MiniLM
``convert`` per exporter, the benchmark), run in real processes started as soon
as the selected tests are known, on the second core while the tests go on.

This file imports nothing heavy itself: pytest-xdist's controller, which only
hands the tests to its workers, starts them without importing torch; each process
that runs tests sets itself up in ``pytest_configure``."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .helpers import BackgroundCommands, DigitsFiles, EarlyWork, TinyConv, TinyMLP

# While the tests are collected, byte code is cached even where PYTHONDONTWRITEBYTECODE
# is set: without it every test process compiles the package and pytest rewrites the
# asserts of every test module (and of hypothesis, a plugin) again, about 6 s of each
# process's start. The tests themselves run as the environment asks.
_DONT_WRITE_BYTECODE = sys.dont_write_bytecode
sys.dont_write_bytecode = False
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# xdist workers inherit a fixed terminal size, which rich would keep for the whole
# process: without it, the COLUMNS a test gives the CLI decides the width
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)


def _build_the_torchlib_table_once() -> None:
    """torch's dynamo ONNX exporter builds its table of torchlib functions again
    on every export (onnxscript parses the source of each of ~500 functions):
    about half of what exporting a small model costs, ~1 s a time. The table
    depends only on the installed packages, so each test process builds it on its
    first dynamo export and keeps it. Nothing is imported here (the exporter
    stays unloaded until a test exports); where torch's internals differ, the
    exports simply build it every time as before."""
    try:
        from torch.onnx._internal import _lazy_import
    except ImportError:
        return
    apis = getattr(_lazy_import, "onnxscript_apis", None)
    if apis is None or "torch.onnx._internal.exporter._registration" in sys.modules:
        return  # too late: the registry module holds the lazy module already

    class BuiltOnce:
        """``onnxscript._framework_apis.torch_2_*`` whose ``get_torchlib_ops`` runs once."""

        def __getattr__(self, name: str) -> object:
            return getattr(apis, name)

        @staticmethod
        @functools.cache
        def get_torchlib_ops() -> object:
            return apis.get_torchlib_ops()

    _lazy_import.onnxscript_apis = BuiltOnce()


def _hands_tests_out(config: pytest.Config) -> bool:
    """This process is pytest-xdist's controller: its workers run the tests."""
    return getattr(config, "workerinput", None) is None and config.getoption("dist", default="no") != "no"


def _set_up_a_test_process() -> None:
    import torch

    torch.set_num_threads(1)
    _build_the_torchlib_table_once()


@pytest.fixture
def mlp() -> TinyMLP:
    import torch

    from .helpers import TinyMLP

    torch.manual_seed(0)
    return TinyMLP()


@pytest.fixture
def conv() -> TinyConv:
    import torch

    from .helpers import TinyConv

    torch.manual_seed(0)
    return TinyConv()


@pytest.fixture
def attending(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A user's folder (the current directory) with ``build_attending`` (a layer the
    forward pass never calls) and token-shaped inputs: ``calib.npy``, ``calib2.npy``
    (other values) and ``held.npy``."""
    import numpy as np

    from .helpers import ATTENTION, UserFolder, user_module, user_module_source

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for name, n in (("calib.npy", 24), ("held.npy", 16), ("calib2.npy", 24)):
        np.save(tmp_path / name, rng.normal(size=(n, 5, 4)).astype(np.float32))
    with user_module(tmp_path, user_module_source(extra=ATTENTION), monkeypatch) as name:
        yield UserFolder(tmp_path, name)


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory: pytest.TempPathFactory) -> DigitsFiles:
    from .helpers import DigitsFiles

    return DigitsFiles(tmp_path_factory.mktemp("digits-files"))


# --- commands in the background ---------------------------------------------------------
#
# Under pytest-xdist (``make test`` runs two worker processes) every worker collects
# every test; one folder made by the controller is shared, and one process (the
# worker gw0, or the only process without xdist) runs the background commands
# there; every process reads their results from it.

_BACKGROUND: dict[str, object] = {}


def _requested(items: list[pytest.Item]) -> set[str]:
    return {name for item in items for mark in item.iter_markers("background") for name in mark.args}


def _worker(config: pytest.Config) -> str | None:
    """This process's xdist worker id, or None when it runs the tests alone."""
    workerinput = getattr(config, "workerinput", None)
    return None if workerinput is None else str(workerinput["workerid"])


def pytest_configure(config: pytest.Config) -> None:
    if _hands_tests_out(config):
        sys.dont_write_bytecode = _DONT_WRITE_BYTECODE
    else:
        _set_up_a_test_process()
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        _BACKGROUND["root"] = Path(workerinput["actsparse_shared"])
    else:
        _BACKGROUND["root"] = Path(tempfile.mkdtemp(prefix="actsparse-shared-"))
        _BACKGROUND["owner"] = True


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: object) -> None:
    """xdist: hand the shared folder to each worker."""
    node.workerinput["actsparse_shared"] = str(_BACKGROUND["root"])  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    root = _BACKGROUND.pop("root", None)
    if _BACKGROUND.pop("owner", False) and isinstance(root, Path):
        shutil.rmtree(root, ignore_errors=True)
    if _worker(config) is not None:
        atexit.register(_end_without_teardown)  # registered last: runs first


def _end_without_teardown() -> None:
    """An xdist worker has handed every result to the controller by now, which
    waits for it to end: Python's teardown of torch, onnx and transformers (1 to
    2 s of a worker's end) is skipped."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that read background commands run last (in their order), so
    that those commands have the rest of the session to finish. A test that
    reads background commands or early work (real processes) must be marked
    slow: `make test` leaves slow tests out, `make check` (CI) runs them."""
    unmarked = [item.nodeid for item in items
                if (item.get_closest_marker("background") or item.get_closest_marker("early")) and not item.get_closest_marker("slow")]
    if unmarked:
        raise pytest.UsageError(f"mark these @pytest.mark.slow (they read background commands or early work): {unmarked[:5]}")
    items.sort(key=lambda item: item.get_closest_marker("background") is not None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the background commands that the selected tests ask for, now: they
    run while the tests before theirs do. Early work starts now only without
    xdist (a worker does not know which tests it will get; there it runs on
    first use, beside the other worker)."""
    sys.dont_write_bytecode = _DONT_WRITE_BYTECODE
    if session.config.option.collectonly:
        return
    root = _BACKGROUND["root"]
    assert isinstance(root, Path)
    from .helpers import BackgroundCommands, EarlyWork, background_selection

    worker = _worker(session.config)
    wanted = {name for item in session.items for mark in item.iter_markers("early") for name in mark.args}
    if wanted:
        early_root = root / f"early-{worker or 'main'}"
        early_root.mkdir()
        _BACKGROUND["early"] = EarlyWork(early_root, wanted).start() if worker is None else EarlyWork(early_root, wanted)
    names = _requested(session.items)
    if names:
        runner = worker in (None, "gw0")
        _BACKGROUND["runs"] = BackgroundCommands(root / "background", background_selection(names), runner=runner).start()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    early = _BACKGROUND.pop("early", None)
    if early is not None:
        early.join()
    runs = _BACKGROUND.pop("runs", None)
    if runs is not None:
        runs.finish(interrupted=exitstatus == pytest.ExitCode.INTERRUPTED)


@pytest.fixture(scope="session")
def background() -> BackgroundCommands:
    """``BACKGROUND_COMMANDS`` (tests/helpers.py), each run in ``.folder(name)``;
    ``.result(name)`` waits for one. A test names those it reads with
    ``@pytest.mark.background(name, ...)``."""
    from .helpers import BackgroundCommands

    runs = _BACKGROUND.get("runs")
    assert isinstance(runs, BackgroundCommands), "no test asked for a background command: mark it @pytest.mark.background(name)"
    return runs


@pytest.fixture(scope="session")
def early() -> EarlyWork:
    """Work of ``EARLY_WORK`` (tests/helpers.py) started in a thread when the
    session began; ``.result(name)`` waits for it. A test names what it reads with
    ``@pytest.mark.early(name)``."""
    from .helpers import EarlyWork

    work = _BACKGROUND.get("early")
    assert isinstance(work, EarlyWork), "mark the test @pytest.mark.early(name)"
    return work
