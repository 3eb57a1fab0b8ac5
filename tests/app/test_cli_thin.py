"""The command line stays thin: choices are usage errors, ``--version`` and
``--help`` answer without importing torch or onnx, every command's help lists
its options."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from actsparse_deploy.base.constants import DEFAULT_EXPORTER, EXPORTERS, MODES

from ..helpers import WIDE, invoke, one_line_error

# --- --mode and --exporter are choices: a bad value is a usage error (exit 2) ---------------------


def _with_mode(tmp_path, command: str, mode: str) -> list[str]:
    masks = tmp_path / "masks.safetensors"
    return {
        "squash": ["squash", "digits-mlp", "--masks", masks, "-o", tmp_path / "m.pt2"],
        "export": ["export", "digits-mlp", "--masks", masks, "-o", tmp_path / "m.onnx"],
        "validate": ["validate", tmp_path / "m.onnx", "digits-mlp", "--masks", masks],
        "convert": ["convert", "digits-mlp", "-o", tmp_path / "out"],
    }[command] + ["--mode", mode]


@pytest.mark.parametrize("command", ["squash", "export", "validate", "convert"])
def test_unknown_mode_is_a_usage_error(tmp_path, command):
    result = invoke(*_with_mode(tmp_path, command, "sideways"), env=WIDE)
    one_line_error(result, 2, "'sideways'", "--mode", *MODES)
    assert result.stdout == "" and list(tmp_path.iterdir()) == []  # nothing ran, nothing written


@pytest.mark.parametrize("command", ["export", "convert"])
def test_unknown_exporter_is_a_usage_error(tmp_path, command):
    out = tmp_path / ("m.onnx" if command == "export" else "out")
    result = invoke(command, "digits-mlp", "-o", out, "--exporter", "tflite", env=WIDE)
    one_line_error(result, 2, "'tflite'", "--exporter", *EXPORTERS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["squash", "export", "validate", "convert"])
def test_help_lists_the_modes(command):
    result = invoke(command, "--help", env=WIDE)
    assert result.exit_code == 0, result.output
    assert "|".join(MODES) in result.stdout, result.stdout


@pytest.mark.parametrize("command", ["export", "convert"])
def test_help_lists_the_exporters(command):
    result = invoke(command, "--help", env=WIDE)
    assert result.exit_code == 0, result.output
    assert "|".join(EXPORTERS) in result.stdout and f"default {DEFAULT_EXPORTER}" in result.stdout


def test_a_choice_is_passed_on_as_its_name(tmp_path):
    """The choice reaches the library as the plain name (in the report and the file metadata)."""
    masks = tmp_path / "masks.safetensors"
    assert invoke("calibrate", "digits-mlp", "-o", masks, env=WIDE).exit_code == 0
    result = invoke("export", "digits-mlp", "--masks", masks, "--mode", "mul", "--exporter", "torchscript",
                    "-o", tmp_path / "m.onnx", "--json", env=WIDE)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["squash_mode"] == "mul" and report["export"]["exporter"] == "torchscript"
    assert {row["mode"] for row in report["layers"]} == {"mul"}


# --- --version and --help do not pay for torch or onnx -----------------------------------------

OPTIONS = {
    "models": ["--json"],
    "calibrate": ["--output", "--weights", "--recipe", "--layers", "--layer-type", "--sparsity", "--threshold",
                  "--aggregate", "--structured", "--method", "--compensate", "--max-cost", "--data", "--batch-size", "--overwrite",
                  "--json", "--verbose"],
    "squash": ["--masks", "--output", "--weights", "--mode", "--data", "--heldout", "--batch-size", "--overwrite", "--json"],
    "export": ["--output", "--masks", "--mode", "--weights", "--data", "--heldout", "--batch-size", "--exporter",
               "--opset", "--external-data", "--overwrite", "--json"],
    "validate": ["--masks", "--mode", "--weights", "--heldout", "--batch-size", "--atol", "--rtol", "--timeout",
                 "--labels", "--json"],
    "convert": ["--output", "--weights", "--recipe", "--sparsity", "--layers", "--layer-type", "--threshold",
                "--aggregate", "--structured", "--method", "--compensate", "--max-cost", "--data", "--heldout", "--labels", "--batch-size", "--mode",
                "--exporter", "--opset", "--external-data", "--atol", "--rtol", "--timeout", "--overwrite", "--json"],
    "inspect": ["--weights", "--data", "--batch-size", "--json"],
    "sweep": ["--output", "--sparsity", "--method", "--compensate", "--weights", "--recipe", "--data", "--heldout",
              "--batch-size", "--runs", "--overwrite", "--json"],
}

LIGHT = """
import json, sys
from typer.testing import CliRunner
from actsparse_deploy.app import cli
runner = CliRunner()
results = {}
for args in [["--version"], ["--help"]] + [[name, "--help"] for name in NAMES]:
    result = runner.invoke(cli.app, args, env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    results[" ".join(args)] = [result.exit_code, result.stdout]
heavy = sorted(m for m in ("torch", "onnx", "onnxruntime", "numpy") if m in sys.modules)
print(json.dumps({"heavy": heavy, "results": results}))
"""


def test_version_and_help_do_not_import_torch_or_onnx():
    code = LIGHT.replace("NAMES", repr(list(OPTIONS)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          env={"PATH": "", "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["heavy"] == [], seen["heavy"]
    from actsparse_deploy.base.version import __version__

    assert seen["results"]["--version"] == [0, f"actsparse {__version__}\n"]
    main_help = seen["results"]["--help"]
    assert main_help[0] == 0 and all(name in main_help[1] for name in OPTIONS), main_help
    for name, options in OPTIONS.items():
        code, text = seen["results"][f"{name} --help"]
        assert code == 0, text
        missing = [option for option in options if option not in text]
        assert missing == [], f"{name} --help lacks {missing}"


def test_the_light_constants_are_the_stages_own():
    """One definition each: the stages use the names the CLI shows."""
    import importlib

    from actsparse_deploy.base import constants
    from actsparse_deploy.calibration.functions import AGGREGATE_FNS

    export, squash, validate = (importlib.import_module(f"actsparse_deploy.{m}") for m in ("onnx.export", "bake.squash", "onnx.validate"))

    assert squash.MODES is constants.MODES and export.EXPORTERS is constants.EXPORTERS
    assert export.DEFAULT_EXPORTER == constants.DEFAULT_EXPORTER and validate.DEFAULT_ATOL == constants.DEFAULT_ATOL
    built_in = sorted(n for n in AGGREGATE_FNS.names() if AGGREGATE_FNS._fns[n].impl.__module__ == "actsparse_deploy.calibration.functions")
    assert tuple(built_in) == constants.BUILTIN_AGGREGATES and constants.DEFAULT_AGGREGATE in built_in
