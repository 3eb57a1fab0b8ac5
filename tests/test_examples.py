"""The README's examples run as written: the user's own model (`examples/`: every
README command of that example, read from the README, in a copy of the folder),
and `make demo`'s output is what the README shows."""

from __future__ import annotations

import json
import re
import runpy
import shlex
import shutil
import subprocess
import sys

import pytest

from .helpers import invoke
from .test_readme import ROOT, in_examples, readme_commands


def example_commands() -> list[list[str]]:
    return [words for words in readme_commands() if in_examples(words)]


@pytest.fixture
def examples(tmp_path, monkeypatch):
    """A copy of examples/ as a clone has it, the current directory; its package forgotten after."""
    folder = tmp_path / "examples"
    shutil.copytree(ROOT / "examples", folder, ignore=shutil.ignore_patterns("__pycache__", "out", "*.npz", "*.npy", "model.safetensors"))
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in [n for n in sys.modules if n == "my_pkg" or n.startswith("my_pkg.")]:
        del sys.modules[name]


def _run(words: list[str]) -> None:
    if words[0] == "python":  # the example's data script, in this process (torch is imported already)
        assert words[1:] == ["make_data.py"], words
        runpy.run_path("make_data.py", run_name="__main__")
        return
    assert words[0] == "actsparse", words
    result = invoke(*words[1:])
    assert result.exit_code == 0, f"`{shlex.join(words)}` exited {result.exit_code}: {result.output}"


def test_the_readme_commands_of_the_own_model_example_run_as_written(examples):
    commands = example_commands()
    assert commands[0] == ["cd", "examples"] and ["python", "make_data.py"] in commands, commands
    ran = [words for words in commands[1:] if words[0] == "actsparse"]
    assert {w[1] for w in ran} >= {"inspect", "convert"}, commands
    for words in commands[1:]:
        _run(words)
    for out in ("out/mine", "out/mine-50"):
        assert sorted(p.name for p in (examples / out).iterdir()) == ["masks.safetensors", "model.onnx", "report.json"]
    report = json.loads((examples / "out/mine/report.json").read_text())
    assert [row["layer"] for row in report["layers"]] == ["encoder.0.fc2", "encoder.1.fc2"]
    cost = report["cost"]
    assert cost["accuracy_dense"] > 0.9 and cost["accuracy_dense"] - cost["accuracy_sparse"] < 0.02, cost
    assert cost["heldout_samples"] == 400
    written = sorted(str(p.relative_to(examples)) for p in examples.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    made = [name for name in written if not (ROOT / "examples" / name).is_file()]
    assert made, written
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git clone: cannot check .gitignore")
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *(f"examples/{n}" for n in made)], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert sorted(ignored) == sorted(f"examples/{n}" for n in made)  # none would be committed by accident


# --- `make demo` prints what the README shows ---------------------------------------------------

#: lines that depend on the machine's speed and load: their figures are not compared
_TIMED = ("onnxruntime latency", "files:", "ONNX (")
#: notes that depend on the timing (prune measured slower than dense)
_TIMED_NOTES = ("note: auto chose prune", "note: prune was asked for")


def _comparable(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if line.startswith(_TIMED_NOTES):
            continue
        if line.startswith(_TIMED):
            line = re.sub(r"(faster|slower) than dense|as fast as dense", "VERDICT", line)
            line = re.sub(r"\d+(\.\d+)?(e[-+]\d+)?", "N", re.sub(r"threads\b", "thread", line))
        out.append(line.rstrip())
    return out


def readme_demo_output() -> list[str]:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"`make demo` runs `actsparse convert digits-cnn -o out/digits-cnn`.*?\n```\n(.*?)^```", text, re.S | re.M)
    assert found, "the README has no demo output block"
    return found[1].splitlines()


def test_the_readme_demo_output_is_what_the_demo_prints(tmp_path):
    makefile = (ROOT / "Makefile").read_text()
    assert "actsparse convert digits-cnn -o out/digits-cnn --overwrite" in makefile
    result = invoke("convert", "digits-cnn", "-o", tmp_path / "digits-cnn", "--overwrite", env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert _comparable(result.output.splitlines()) == _comparable(readme_demo_output())
