"""The README's shell commands run as written, in order, on a fresh clone: every
```sh block, through the real CLI, in an empty directory. Skipped: `make` and
`source .venv/bin/activate` (set-up) and the commands of the user's-own-model
example (`cd examples`, `python make_data.py`, those on `my_pkg`), which
tests/test_examples.py runs in a copy of examples/. The MiniLM command is the session's shared
MiniLM run (tests/helpers.py: BACKGROUND_COMMANDS, run once in the background):
`test_readme_minilm_commands` checks that the README shows exactly that command
and that it ran as written. ```shell blocks are launcher commands and templates
(torchrun, `MODEL` placeholders), not run here: tests/calibration/test_distributed.py runs the
torchrun form."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import BACKGROUND_COMMANDS, MINILM_OUTDIRS, invoke

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[list[str]]:
    """Every command of the README's ```sh blocks, in order, as argv lists."""
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def in_examples(words: list[str]) -> bool:
    """A command of the user's-own-model example, run in examples/ by tests/test_examples.py."""
    return words[0] in ("cd", "python") or any("my_pkg" in w for w in words)


def _needs_set_up(words: list[str]) -> bool:
    return words[0] in ("make", "source") or in_examples(words)


def _runnable(minilm: bool) -> list[list[str]]:
    commands = [w for w in readme_commands() if not _needs_set_up(w)]
    assert all(w[0] == "actsparse" for w in commands), [w for w in commands if w[0] != "actsparse"]
    return [w for w in commands if ("minilm" in w) == minilm]


def _run_in(directory: Path, commands: list[list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(directory)
    for words in commands:
        result = invoke(*words[1:])
        assert result.exit_code == 0, f"`{shlex.join(words)}` exited {result.exit_code}: {result.stderr}"


def test_readme_commands_run_in_order(tmp_path, monkeypatch):
    commands = _runnable(minilm=False)
    assert len(commands) >= 10  # the walkthrough, the stages one by one, the command line
    _run_in(tmp_path, commands, monkeypatch)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert "masks.safetensors" in written and "model.onnx" in written
    # none of them would be committed by accident from a clone's root
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git clone: cannot check .gitignore")
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *written], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert sorted(ignored) == written


@pytest.mark.slow
@pytest.mark.background("minilm-torchscript")
def test_readme_minilm_commands(background):
    commands = _runnable(minilm=True)
    args = BACKGROUND_COMMANDS["minilm-torchscript"][3:]  # after `python -m actsparse_deploy`
    assert commands == [["actsparse", *args]], (
        "the README's MiniLM commands changed: make tests/helpers.py's BACKGROUND_COMMANDS['minilm-torchscript'] run them"
    )
    background.result("minilm-torchscript")  # `python -m actsparse_deploy ARGS`, as written, first in an empty directory
    out = background.folder("minilm") / MINILM_OUTDIRS["torchscript"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "masks.safetensors", "model.onnx", "report.json",  # and what loaders read beside model.onnx
                                                 "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path):
    """The README's Python section runs as written in an empty directory and writes what it says."""
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert blocks, "the README has no Python example"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for block in blocks:
        result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    written = {p.name for p in tmp_path.iterdir()}
    assert {"masks.safetensors", "model.onnx", "state.safetensors", "part_a.stats.safetensors"} <= written
    assert "{'fc1': 'fold', 'fc2': 'prune'}" in result.stdout
