"""Fixtures shared by the tests (helpers they import live in tests/helpers.py).

Expensive outputs are made once per session and only read by the tests: the
digits files (``digits_files``) and the commands of ``background`` (one MiniLM
``convert`` per exporter, the benchmark), run in real processes started as soon
as the selected tests are known, on the second core while the tests go on."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from .helpers import BackgroundCommands, DigitsFiles, EarlyWork, TinyConv, TinyMLP, background_selection

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture
def mlp() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP()


@pytest.fixture
def conv() -> TinyConv:
    torch.manual_seed(0)
    return TinyConv()


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory: pytest.TempPathFactory) -> DigitsFiles:
    return DigitsFiles(tmp_path_factory.mktemp("digits-files"))


# --- commands in the background ---------------------------------------------------------

_BACKGROUND: dict[str, object] = {}


def _requested(items: list[pytest.Item]) -> set[str]:
    return {name for item in items for mark in item.iter_markers("background") for name in mark.args}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that read background commands run last (in their order), so
    that those commands have the rest of the session to finish."""
    items.sort(key=lambda item: item.get_closest_marker("background") is not None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the background commands that the selected tests ask for, now: they
    run while the tests before theirs do."""
    if not session.config.option.collectonly:
        wanted = {name for item in session.items for mark in item.iter_markers("early") for name in mark.args}
        if wanted:
            root = Path(tempfile.mkdtemp(prefix="actsparse-early-"))
            _BACKGROUND["early_root"] = root
            _BACKGROUND["early"] = EarlyWork(root, wanted).start()
    names = _requested(session.items)
    if names and not session.config.option.collectonly:
        root = Path(tempfile.mkdtemp(prefix="actsparse-background-"))
        _BACKGROUND["root"] = root
        _BACKGROUND["runs"] = BackgroundCommands(root, background_selection(names)).start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    early = _BACKGROUND.pop("early", None)
    if isinstance(early, EarlyWork):
        early.join()
    runs = _BACKGROUND.pop("runs", None)
    if isinstance(runs, BackgroundCommands):
        runs.stop()
    for key in ("root", "early_root"):
        root = _BACKGROUND.pop(key, None)
        if isinstance(root, Path):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def background() -> BackgroundCommands:
    """``BACKGROUND_COMMANDS`` (tests/helpers.py), each run in ``.folder(name)``;
    ``.result(name)`` waits for one. A test names those it reads with
    ``@pytest.mark.background(name, ...)``."""
    runs = _BACKGROUND.get("runs")
    assert isinstance(runs, BackgroundCommands), "no test asked for a background command: mark it @pytest.mark.background(name)"
    return runs


@pytest.fixture(scope="session")
def early() -> EarlyWork:
    """Work of ``EARLY_WORK`` (tests/helpers.py) started in a thread when the
    session began; ``.result(name)`` waits for it. A test names what it reads with
    ``@pytest.mark.early(name)``."""
    work = _BACKGROUND.get("early")
    assert isinstance(work, EarlyWork), "mark the test @pytest.mark.early(name)"
    return work
