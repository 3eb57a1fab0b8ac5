"""What a new user meets first: help texts at 80 columns, flags that look like
flags, options given twice, a cost budget that cannot be measured, an opset or a
dynamic axis the exporters cannot take, layers the forward pass never calls,
readable numbers and filled report fields. Through the real CLI: exit code,
exactly one line on stderr, nothing written where the run failed."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import typer.main

from actsparse_deploy.app.cli import app

from ..helpers import invoke, one_line_error, user_module, user_module_source

ONNX_MAX = onnx.defs.onnx_opset_version()
NARROW = {"COLUMNS": "80"}


def _squeezed(text: str) -> str:
    return "".join(text.split())


COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]


# --- help: flags look like flags, every text whole at 80 columns -----------------------------


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_at_80_columns_is_whole_and_shows_flags_as_flags(name):
    result = invoke(name, "--help", env=NARROW)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "…" not in out and "<bool>" not in out, out
    assert max(len(line) for line in out.splitlines()) <= 80, out
    for param in COMMANDS[name].params:
        if param.help:
            assert _squeezed(param.help) in _squeezed(out), (param.name, param.help, out)
        if getattr(param, "is_flag", False):  # `--overwrite`, never `--overwrite <value>`
            flag = max(param.opts, key=len)
            pair = f"{flag} / {param.secondary_opts[0]}" if getattr(param, "secondary_opts", None) else None  # --cache / --no-cache
            assert any(line.split()[-1] == flag or f"{flag}  " in line or (pair and pair in line)
                       for line in out.splitlines() if flag in line), out


def test_main_help_lists_each_command_with_its_whole_summary():
    result = invoke("--help", env=NARROW)
    assert result.exit_code == 0, result.output
    for name, command in COMMANDS.items():
        summary = inspect.cleandoc(command.help or "").split("\n\n")[0]
        assert _squeezed(summary) in _squeezed(result.stdout), (name, result.stdout)
    commands = result.stdout.split("Commands:")[1]
    assert "..." not in commands and "…" not in result.stdout, result.stdout


@pytest.mark.parametrize("value", ["true", "false"])
def test_a_flag_given_a_value_says_it_takes_none(tmp_path, value):
    result = invoke("calibrate", "digits-mlp", "-o", tmp_path / "m.safetensors", "--overwrite", value)
    one_line_error(result, 2, "--overwrite", "no value")
    assert list(tmp_path.iterdir()) == []


# --- an option that takes one value, given twice ---------------------------------------------


@pytest.mark.parametrize(("flag", "args"), [
    ("--max-cost", ["calibrate", "digits-mlp", "--max-cost", "cosine=0.9", "--max-cost", "cosine=0.99", "-o", "OUT/m.safetensors"]),
    ("--sparsity", ["calibrate", "digits-mlp", "-s", "0.5", "--sparsity", "0.25", "-o", "OUT/m.safetensors"]),
    ("--max-cost", ["convert", "digits-mlp", "--max-cost", "cosine=0.9", "--max-cost", "accuracy-drop=0.01", "-o", "OUT/out"]),
    ("--output", ["export", "digits-mlp", "-o", "OUT/a.onnx", "--output", "OUT/b.onnx"]),
    ("--opset", ["export", "digits-mlp", "--opset", "17", "--opset", "18", "-o", "OUT/a.onnx"]),
], ids=["max-cost", "sparsity-alias", "convert-max-cost", "output-alias", "opset"])
def test_an_option_of_one_value_given_twice_is_a_usage_error(tmp_path, flag, args):
    result = invoke(*(a.replace("OUT", str(tmp_path)) for a in args))
    one_line_error(result, 2, flag, "once")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "env"), [
    (["calibrate", "digits-mlp", "-o", "OUT/x", "-s", "0.5", "-s", "0.6", "--help"], {}),
    (["export", "digits-mlp", "--opset", "17", "--help", "--opset", "18"], {}),
    (["export", "--help"], {"WORLD_SIZE": "2"}),
    (["squash", "digits-mlp", "-o", "OUT/m.pt2", "--help"], {"WORLD_SIZE": "2"}),
    (["validate", "model.onnx", "--timeout", "5", "--timeout", "6", "--help"], {"WORLD_SIZE": "2"}),
], ids=["repeated-calibrate", "repeated-export", "torchrun-export", "torchrun-squash", "torchrun-repeated"])
def test_help_prints_help_whatever_else_is_wrong_with_the_line(tmp_path, args, env):
    """--help was refused (exit 2) for an option given twice, or for a command of
    one process under torchrun: help always prints and exits 0, and writes nothing."""
    result = invoke(*(a.replace("OUT", str(tmp_path)) for a in args), env={**NARROW, **env})
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Usage: actsparse {args[0]} ") and result.stderr == "", result.output
    assert list(tmp_path.iterdir()) == []


def test_repeatable_options_and_flags_may_repeat(tmp_path):
    out = tmp_path / "m.safetensors"
    result = invoke("calibrate", "digits-mlp", "--layers", "fc2", "--layers", "fc3", "--sparsity", "0.5",
                    "-o", out, "--overwrite", "--overwrite", "--json")
    assert result.exit_code == 0, result.output
    assert [row["layer"] for row in json.loads(result.stdout)["layers"]] == ["fc2", "fc3"]


# --- --max-cost: a cost that cannot be measured is a recipe error (exit 3) -------------------


COSTS = '''
def returns_text(dense, sparse, batches):
    return "low"


def fails(dense, sparse, batches):
    raise ZeroDivisionError("division by zero in my metric")


NOT_CALLABLE = 3
'''


@pytest.fixture
def costs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with user_module(tmp_path, COSTS, monkeypatch) as name:
        yield name


@pytest.mark.parametrize("command", ["calibrate", "convert"])
@pytest.mark.parametrize(("spec", "needles"), [
    ("os:getcwd", ["os:getcwd", "(dense, sparse, batches)"]),
    ("no_such_module_here:cost", ["no_such_module_here"]),
    ("{m}:NOT_CALLABLE", ["NOT_CALLABLE", "not a callable"]),
    ("{m}:missing", ["missing"]),
], ids=["wrong-signature", "no-module", "not-callable", "no-attribute"])
def test_a_budget_function_that_is_not_a_cost_function_fails_before_the_model_loads(tmp_path, costs, command, spec, needles):
    out = tmp_path / ("out" if command == "convert" else "m.safetensors")
    result = invoke(command, "no_such_model_module:build", "--max-cost", spec.format(m=costs) + "=0.5", "-o", out)
    one_line_error(result, 3, *needles)  # a model that cannot load would be exit 4: the budget is checked first
    assert not out.exists()


@pytest.mark.parametrize(("name", "needles"), [
    ("returns_text", ["returned str, not a number"]),
    ("fails", ["ZeroDivisionError", "division by zero in my metric"]),
])
def test_a_budget_function_that_fails_or_returns_no_number_is_exit_3(tmp_path, costs, name, needles):
    out = tmp_path / "m.safetensors"
    result = invoke("calibrate", "digits-mlp", "--max-cost", f"{costs}:{name}=0.5", "-o", out)
    one_line_error(result, 3, f"{costs}:{name}", *needles)
    assert not out.exists()


@pytest.mark.parametrize("command", ["calibrate", "convert"])
def test_a_budget_metric_the_model_does_not_have_names_those_it_has(tmp_path, command):
    out = tmp_path / ("out" if command == "convert" else "m.safetensors")
    result = invoke(command, "digits-mlp", "--max-cost", "perplexity-ratio=1.05", "-o", out)
    err = one_line_error(result, 3, "perplexity-ratio", "language model", "cosine", "accuracy-drop")
    assert "(perplexity-ratio)'s" not in err
    assert not out.exists()


# --- --opset: a usage error outside what the exporters support; auto never changes it silently --


@pytest.mark.parametrize(("exporter", "opset", "needles"), [
    (None, 99999, ["99999", "7 to 20", f"14 to {ONNX_MAX}"]),
    ("torchscript", 21, ["21", "torchscript", "7 to 20"]),
    ("dynamo", 13, ["13", "dynamo", f"14 to {ONNX_MAX}"]),
    (None, 6, ["6", "7 to 20"]),
], ids=["auto-huge", "torchscript-21", "dynamo-13", "auto-6"])
@pytest.mark.parametrize("command", ["export", "convert"])
def test_an_opset_no_exporter_supports_is_a_usage_error(tmp_path, command, exporter, opset, needles):
    out = tmp_path / ("m.onnx" if command == "export" else "out")
    args = [command, "digits-mlp", "-o", out, "--opset", opset] + (["--exporter", exporter] if exporter else [])
    one_line_error(invoke(*args), 2, "--opset", *needles)
    assert list(tmp_path.iterdir()) == []


def test_the_opset_ranges_are_what_the_exporters_write():
    """TorchScript: torch.onnx's own constants. Dynamo builds at 18 and converts to
    the opset asked for from 14 up to the newest onnx knows (below 14 it keeps 18
    without a word: so 14 is its lowest here)."""
    from torch.onnx import _constants

    from actsparse_deploy.onnx.export import OPSETS

    assert OPSETS == {"torchscript": (_constants.ONNX_MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET),
                      "dynamo": (14, ONNX_MAX)}
    assert "torchscript 7 to 20, dynamo 14 to the newest onnx knows" in " ".join(invoke("export", "--help", env=NARROW).stdout.split())


@pytest.mark.parametrize("opset", [15, 17, ONNX_MAX])
def test_dynamo_writes_every_opset_of_its_range(tmp_path, opset):
    result = invoke("export", "digits-mlp", "-o", tmp_path / "m.onnx", "--exporter", "dynamo", "--opset", opset, "--json")
    assert result.exit_code == 0, result.output
    assert _opset(tmp_path / "m.onnx") == opset == json.loads(result.stdout)["export"]["opset"]


def test_an_exporter_writing_another_opset_than_asked_is_an_export_error(tmp_path):
    """Dynamo converts digits-mlp down to 15 but not to 14, and keeps 18 without a
    word: the opset written is checked against the one asked for."""
    result = invoke("export", "digits-mlp", "-o", tmp_path / "m.onnx", "--exporter", "dynamo", "--opset", "14")
    one_line_error(result, 9, "dynamo", "opset 18", "opset 14")
    assert list(tmp_path.iterdir()) == []


def _opset(path: Path) -> int:
    return next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))


def test_auto_above_the_torchscript_range_exports_with_dynamo_and_says_so(tmp_path):
    result = invoke("export", "digits-mlp", "-o", tmp_path / "m.onnx", "--opset", "21", "--json")
    assert result.exit_code == 0, result.output
    export = json.loads(result.stdout)["export"]
    assert (export["exporter"], export["opset"], export["requested_opset"]) == ("dynamo", 21, 21)
    assert "opset 21" in export["fallback"] and "torchscript" in export["fallback"]
    assert "opset 21" in result.stderr and len(result.stderr.splitlines()) == 1
    assert _opset(tmp_path / "m.onnx") == 21


def test_auto_falling_back_below_the_dynamo_range_says_which_opset_it_wrote(tmp_path):
    from actsparse_deploy.onnx.export import export_onnx

    class Differ(torch.nn.Module):  # aten::diff: the torchscript exporter fails on it
        def forward(self, x):
            return torch.diff(x, dim=-1)

    told: list[str] = []
    result = export_onnx(Differ(), torch.randn(2, 4), tmp_path / "d.onnx", opset=12, on_fallback=told.append)
    assert (result.exporter, result.opset, result.requested_opset) == ("dynamo", 14, 12)
    assert _opset(tmp_path / "d.onnx") == 14
    assert len(told) == 1 and "opset 14" in told[0] and "opset 12" in told[0], told
    assert "opset 14" in result.fallback and result.to_json()["requested_opset"] == 12


# --- --dynamic-axis: an axis the input does not have is a usage error ------------------------


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo", "auto"])
@pytest.mark.parametrize(("axis", "needles"), [
    ("input:99:foo", ["input:99:foo", "4 axes", "0 to 3"]),
    ("nosuch:1:foo", ["nosuch:1:foo", "no input 'nosuch'", "input"]),
], ids=["rank", "name"])
def test_a_dynamic_axis_the_inputs_do_not_have_is_a_usage_error(tmp_path, exporter, axis, needles):
    out = tmp_path / "m.onnx"
    result = invoke("export", "digits-cnn", "--dynamic-axis", axis, "--exporter", exporter, "-o", out)
    one_line_error(result, 2, "--dynamic-axis", *needles)
    assert list(tmp_path.iterdir()) == []


def test_a_dynamic_axis_past_the_rank_in_convert_is_a_usage_error(tmp_path):
    result = invoke("convert", "digits-mlp", "--dynamic-axis", "input:7:foo", "-o", tmp_path / "out")
    one_line_error(result, 2, "input:7:foo")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


# --- a .pt2 exports with the axis names the README promises ----------------------------------


def _dims(path: Path) -> dict[str, list[object]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.output]}


@pytest.mark.parametrize("exporter", ["dynamo", "auto"])
def test_a_pt2_exports_with_a_batch_axis_named_batch(tmp_path, digits_files, exporter):
    out = tmp_path / "m.onnx"
    result = invoke("export", digits_files.pt2("digits-mlp"), "-o", out, "--exporter", exporter)
    assert result.exit_code == 0, result.output
    assert _dims(out) == {"input": ["batch", 1, 8, 8], "logits": ["batch", 10]}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_model_exports_with_a_batch_axis_named_batch(tmp_path, exporter):
    out = tmp_path / "m.onnx"
    result = invoke("export", "digits-mlp", "-o", out, "--exporter", exporter)
    assert result.exit_code == 0, result.output
    assert _dims(out) == {"input": ["batch", 1, 8, 8], "logits": ["batch", 10]}


# --- figures a person reads: no e-notation for large numbers; report fields filled -----------


def test_latency_and_large_figures_print_without_e_notation(capsys):
    from actsparse_deploy.app.cli import print_convert_summary
    from actsparse_deploy.app.report import Cost, Latency, Report

    report = Report(
        model="m", layers=[], files={}, seconds={"total": 1.0}, threads=1,
        cost=Cost(outputs=[{"output": "logits", "cosine_mean": 0.99, "cosine_min": 0.9, "max_abs_diff": 12345.6}], heldout_samples=64),
        latency=Latency(dense_ms=1090.4, sparse_ms=998.7, ratio=0.916, verdict="faster than dense: 0.92x", samples=64, runs=7,
                        warmup=2, threads=1),
    )
    print_convert_summary(report)
    out = capsys.readouterr().out
    assert "e+" not in out, out
    assert "dense 1.09 s, converted 999 ms" in out and "max abs diff 12346" in out, out


@pytest.mark.parametrize(("value", "shown"), [(0.213, "0.213 ms"), (41.25, "41.2 ms"), (999.4, "999 ms"), (999.7, "1 s"),
                                              (1090.4, "1.09 s"), (123456.0, "123 s"), (2_345_678.0, "2346 s")])
def test_milliseconds_read_as_milliseconds_or_seconds(value, shown):
    from actsparse_deploy.app.cli import milliseconds

    assert milliseconds(value) == shown


def test_heldout_samples_is_counted_for_data_that_does_not_know_its_size():
    from actsparse_deploy.app.cost import sparsification_cost
    from actsparse_deploy.app.workload import load_workload
    from actsparse_deploy.data.batches import Generated

    work = load_workload("digits-mlp")
    held = list(work.require_heldout())
    work.heldout = Generated(lambda: iter(held))  # a stream that cannot say how many samples it holds
    cost = sparsification_cost(work, work.model)
    assert cost["heldout_samples"] == sum(len(b) for b in held) == 400


TOKENS = '''
class Tokens(nn.Module):
    """(batch, tokens) ids -> (batch, tokens, 4): its Linears see (batch, tokens, 8)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, input_ids):
        return self.fc2(torch.relu(self.fc1(self.embed(input_ids))))


def build_tokens():
    torch.manual_seed(0)
    return Tokens()
'''


def test_a_token_layers_input_shape_names_its_sequence_axis(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 16, size=(24, 5)))
    with user_module(tmp_path, user_module_source(extra=TOKENS), monkeypatch) as name:
        result = invoke("calibrate", f"{name}:build_tokens", "--data", "ids.npy", "--layers", "fc2", "--sparsity", "0.5",
                        "--structured", "-o", "m.safetensors", "--json")
        assert result.exit_code == 0, result.output
        row = json.loads(result.stdout)["layers"][0]
        assert row["input_shape"] == ["sequence", 8] and row["mask_shape"] == [8], row
        table = invoke("inspect", "m.safetensors", env={"COLUMNS": "120"})
        assert table.exit_code == 0 and "<sequence>x8" in table.stdout, table.output


# --- layers the forward pass never calls: skipped with a note, as inspect leaves them out -----


def test_a_rule_matching_a_never_called_layer_skips_it_as_inspect_does(attending):
    result = invoke("calibrate", attending.user("build_attending"), "--data", "calib.npy", "--layer-type", "Linear",
                    "--sparsity", "0.5", "-o", "m.safetensors", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    listed = invoke("inspect", attending.user("build_attending"), "--data", "calib.npy", "--json")
    assert listed.exit_code == 0, listed.output
    linear = [row["layer"] for row in json.loads(listed.stdout)["layers"] if row["type"] == "Linear"]
    assert [row["layer"] for row in report["layers"]] == linear == ["inp", "head"]
    skipped = [note for note in report["notes"] if "attn.out_proj" in note]
    assert len(skipped) == 1 and "never called" in skipped[0] and "attn (MultiheadAttention)" in skipped[0], report["notes"]
    printed = invoke("calibrate", attending.user("build_attending"), "--data", "calib.npy", "--layer-type", "Linear",
                     "--sparsity", "0.5", "-o", "m.safetensors", "--overwrite")
    assert printed.exit_code == 0 and printed.stderr.count("note:") == 1 and "attn.out_proj" in printed.stderr, printed.output
    assert "attn.out_proj" in " ".join(invoke("inspect", "m.safetensors").stderr.split())  # the note travels with the file


def test_convert_skips_a_never_called_layer_and_reports_why(attending):
    result = invoke("convert", attending.user("build_attending"), "--data", "calib.npy", "--heldout", "held.npy",
                    "--layer-type", "Linear", "--sparsity", "0.5", "--no-latency", "-o", "out")
    assert result.exit_code == 0, result.output
    report = json.loads((attending.tmp / "out" / "report.json").read_text())
    assert [row["layer"] for row in report["layers"]] == ["inp", "head"]
    assert any("attn.out_proj" in note and "never called" in note for note in report["notes"]), report["notes"]


def test_a_rule_matching_only_never_called_layers_is_a_calibration_error(attending):
    result = invoke("calibrate", attending.user("build_attending"), "--data", "calib.npy", "--layers", "attn.*",
                    "--sparsity", "0.5", "-o", "m.safetensors")
    one_line_error(result, 7, "attn.*", "attn.out_proj", "never calls", "inspect")
    assert not (attending.tmp / "m.safetensors").exists()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_repeatable_options_show_one_value_not_a_list(name):
    out = invoke(name, "--help", env=NARROW).stdout
    options = [line for line in out.split("Options:")[-1].splitlines() if line.lstrip().startswith("-")]
    assert not any("<list[" in line for line in options), options


def test_stats_only_skips_a_never_called_layer_with_a_note(attending):
    result = invoke("calibrate", attending.user("build_attending"), "--data", "calib.npy", "--layer-type", "Linear",
                    "--sparsity", "0.5", "--stats-only", "-o", "part.stats.safetensors")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("note:") == 1 and "attn.out_proj" in result.stderr and "never called" in result.stderr


def test_a_budget_prints_its_value_without_e_notation():
    from actsparse_deploy.app.budget import Budget

    assert str(Budget.parse("my_pkg.costs:latency_us=2000000")) == "my_pkg.costs:latency_us=2000000"
    assert str(Budget.parse("cosine=0.98")) == "cosine=0.98"
