"""--threads (torch and onnxruntime share the cores, set explicitly) and
convert's dense vs converted onnxruntime latency (actsparse_deploy.base.threads,
actsparse_deploy.onnx.latency). No test checks a wall-clock value: only that the
figures exist, are positive and agree with each other."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from torch import nn

from actsparse_deploy.app.report import Report
from actsparse_deploy.base.errors import UsageError
from actsparse_deploy.base.threads import current_threads, default_threads, machine_threads, session_options, use_threads
from actsparse_deploy.onnx.export import export_onnx
from actsparse_deploy.onnx.latency import latency_ratio, ort_session, slower_note, verdict
from actsparse_deploy.onnx.validate import onnx_session
from tests.helpers import invoke, one_line_error, user_module, user_module_source

#: commands that run a model, with the arguments that make each one valid but for --threads
COMMANDS = {
    "convert": ["convert", "digits-mlp", "-o", "{out}"],
    "calibrate": ["calibrate", "digits-mlp", "-o", "{out}/m.safetensors"],
    "squash": ["squash", "digits-mlp", "--masks", "{out}/m.safetensors", "-o", "{out}/m.pt2"],
    "export": ["export", "digits-mlp", "-o", "{out}/m.onnx"],
    "validate": ["validate", "{out}/m.onnx", "digits-mlp"],
    "sweep": ["sweep", "digits-mlp", "-o", "{out}"],
    "inspect": ["inspect", "digits-mlp"],
}

#: a user model whose forward records torch's thread count
THREADS_MODULE = user_module_source(
    forward_first="SEEN.append(torch.get_num_threads())",
    extra='''
SEEN = []


def batches():
    torch.manual_seed(1)
    return [torch.randn(8, 4) for _ in range(3)]
''',
)


@pytest.fixture
def tiny_onnx(tmp_path):
    x = torch.randn(4, 16)
    export_onnx(nn.Linear(16, 8), x, tmp_path / "tiny.onnx")
    return tmp_path / "tiny.onnx"


# --- the setting -------------------------------------------------------------------------


def test_use_threads_sets_torch_and_every_onnxruntime_session_then_restores(tiny_onnx):
    torch_before, ort_before = torch.get_num_threads(), current_threads()
    with use_threads(3) as n:
        assert n == 3 and torch.get_num_threads() == 3 and current_threads() == 3
        for session in (onnx_session(tiny_onnx), ort_session(tiny_onnx, None)):  # validation / cost and latency sessions
            options = session.get_session_options()
            assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
        assert ort_session(tiny_onnx, 2).get_session_options().intra_op_num_threads == 2  # an explicit count wins
    assert torch.get_num_threads() == torch_before and current_threads() == ort_before


def test_outside_a_command_sessions_still_get_explicit_threads(tiny_onnx, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    options = onnx_session(tiny_onnx).get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)  # not onnxruntime's own default (0)


def test_default_is_omp_num_threads_where_set_else_the_cores(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine (the real one may not be)
    assert default_threads() == machine_threads() == cores
    with use_threads() as n:
        assert n == cores and torch.get_num_threads() == cores
    for bad in ("", "0", "-2", "two", "99999"):  # not the user's choice of a count: the cores
        monkeypatch.setenv("OMP_NUM_THREADS", bad)
        assert default_threads() == cores, bad
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3 and session_options().intra_op_num_threads == 3


@pytest.mark.parametrize(("cores", "load", "expected"), [(2, 0.2, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 7.5, 1), (16, 3.4, 13), (16, 0.0, 16)])
def test_default_leaves_the_cores_other_processes_use(monkeypatch, cores, load, expected):
    """Two threads on a 2-core machine where another process runs are many times
    slower than one (README: Threads): the default is the cores less the 1-minute
    load average of the others, at least 1. The load is set here: a real one takes
    a minute to show in the average."""
    from actsparse_deploy.base import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "machine_threads", lambda: cores)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert threads.default_threads() == expected
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice wins
    assert threads.default_threads() == 2


@pytest.mark.parametrize("bad", [0, -1, 1025, 2.0, "2", True, None])
def test_bad_thread_counts_are_usage_errors(bad, tmp_path):
    from actsparse_deploy.app.pipeline import ConvertOptions, convert

    with pytest.raises(UsageError, match="threads.*integer from 1 to 1024") as e:
        if bad is None:
            session_options(0)
        else:
            ConvertOptions(threads=bad)
    assert e.value.exit_code == 2
    if bad is not None:
        with pytest.raises(UsageError):
            convert("digits-mlp", tmp_path / "out", threads=bad)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("bad", ["0", "-3", "abc", "1.5", "5000"])
def test_threads_option_on_every_command_refuses_bad_values(command, bad, tmp_path):
    args = [a.format(out=tmp_path / "out") for a in COMMANDS[command]]
    result = invoke(*args, "--threads", bad)
    one_line_error(result, 2, "Invalid value for '--threads'")  # the option exists: not "No such option"
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_a_command_runs_the_model_at_its_thread_count_and_reports_it(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    with user_module(tmp_path, THREADS_MODULE, monkeypatch) as name:
        import importlib

        module = importlib.import_module(name)
        result = invoke("calibrate", f"{name}:build", "--data", f"{name}:batches", "--layers", "fc2", "--sparsity", "0.5",
                        "-o", tmp_path / "m.safetensors", "--threads", "3", "--json")
        assert result.exit_code == 0, result.output
        assert module.SEEN and set(module.SEEN) == {3}
        assert json.loads(result.stdout)["threads"] == 3
    assert torch.get_num_threads() == before  # the command gave the process its count back


# --- convert: threads and latency in the report ---------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from actsparse_deploy.app.pipeline import convert

    out = tmp_path_factory.mktemp("convert") / "out"
    return out, convert("digits-mlp", out, threads=2)


def test_convert_reports_threads_and_dense_vs_converted_latency(converted):
    out, report = converted
    written = json.loads((out / "report.json").read_text())
    assert report.threads == written["threads"] == 2
    latency = written["latency"]
    assert set(latency) == {"dense_ms", "sparse_ms", "ratio", "verdict", "samples", "runs", "warmup", "threads"}
    assert latency["dense_ms"] > 0 and latency["sparse_ms"] > 0 and latency["ratio"] > 0
    assert latency["ratio"] == pytest.approx(latency["sparse_ms"] / latency["dense_ms"], rel=1e-12)
    assert latency["verdict"] == verdict(latency["ratio"])
    assert latency["threads"] == 2 and latency["runs"] >= 3 and latency["warmup"] >= 1
    assert 0 < latency["samples"] <= report.cost.heldout_samples
    assert Report.from_json(written).latency == report.latency
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["masks.safetensors", "model.onnx", "report.json"]


def test_convert_cli_summary_says_threads_and_latency_and_no_latency_omits_it(tmp_path):
    result = invoke("convert", "digits-mlp", "-o", tmp_path / "a", "--threads", "1")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    ratio = report["latency"]["ratio"]
    line = next(line for line in result.stdout.splitlines() if line.startswith("onnxruntime latency"))
    assert verdict(ratio) in line and "1 thread" in line
    assert f"{report['latency']['dense_ms']:.3g} ms" in line and f"{report['latency']['sparse_ms']:.3g} ms" in line

    result = invoke("convert", "digits-mlp", "-o", tmp_path / "b", "--threads", "1", "--no-latency", "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["latency"] is None and printed["threads"] == 1 and "latency" not in printed["seconds"]
    assert json.loads((tmp_path / "b" / "report.json").read_text())["latency"] is None
    result = invoke("convert", "digits-mlp", "-o", tmp_path / "c", "--threads", "1", "--no-latency")
    assert result.exit_code == 0 and "onnxruntime latency" not in result.stdout
    assert result.stdout.splitlines()[-1].endswith("s in all, 1 thread")


def test_sweep_times_at_the_thread_count_given(tmp_path):
    result = invoke("sweep", "digits-mlp", "--sparsity", "0.5", "--method", "topk", "--runs", "1", "--threads", "2",
                    "-o", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)[0]["rows"][0]
    assert row["threads"] == 2 and row["latency_ratio"] > 0


# --- the ratio in words ------------------------------------------------------------------


def test_verdict_and_the_note_where_prune_made_it_slower():
    assert verdict(1.19) == "slower than dense: 1.19x"
    assert verdict(0.83) == "faster than dense: 0.83x"
    assert verdict(1.01) == "as fast as dense: 1.01x"
    assert "prune was asked for" in slower_note("prune", ["prune"], 1.19) and "1.19x" in slower_note("prune", ["prune"], 1.19)
    assert "auto chose prune" in slower_note("auto", ["fold", "prune"], 1.25)
    assert slower_note("auto", ["fold", "mul"], 1.25) is None  # no prune: slower is what mul / fold cost
    assert slower_note("fold", ["fold"], 1.5) is None and slower_note("prune", ["prune"], 0.8) is None
    assert slower_note("prune", ["prune"], 1.01) is None  # within the noise band


def test_summary_says_slower_in_words_where_prune_was_asked(converted, capsys):
    from actsparse_deploy.app.cli import print_convert_summary

    _, report = converted
    latency = dataclasses.replace(report.latency, dense_ms=1.0, sparse_ms=1.19, ratio=1.19, verdict=verdict(1.19))
    print_convert_summary(report.replace(latency=latency, squash_mode="prune"))
    out = capsys.readouterr().out
    assert "slower than dense: 1.19x" in out


def test_latency_ratio_takes_the_command_thread_count(tiny_onnx):
    x = torch.randn(4, 16)
    with use_threads(2):
        result = latency_ratio(tiny_onnx, tiny_onnx, [x, x[:2]], runs=2, warmup=0)
    assert result["threads"] == 2 and result["samples"] == 6 and result["ratio"] > 0


def test_a_superscript_digit_in_omp_num_threads_is_not_a_count(monkeypatch):
    """'²' passes str.isdigit but not int(): the default then ignores it (it was an internal error)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "\u00b2")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert default_threads() == machine_threads()


def test_a_slower_prune_is_noted_in_the_report_after_the_other_notes(tmp_path, monkeypatch):
    # a converted model slower than dense cannot be caused on demand: the timing is replaced, the rest is real
    from actsparse_deploy.app import pipeline

    slow = {"dense_ms": 1.0, "sparse_ms": 1.3, "ratio": 1.3, "samples": 8, "runs": 3, "warmup": 1, "threads": 1}
    monkeypatch.setattr(pipeline, "dense_latency", lambda *a, **k: dict(slow))
    report = pipeline.convert("digits-mlp", tmp_path / "out", threads=1, mode="prune")
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["latency"] == {**slow, "verdict": "slower than dense: 1.30x"}
    assert written["notes"][-1] == slower_note("prune", ["prune"], 1.3)
    assert report.notes == written["notes"] and Report.from_json(written).latency == report.latency
