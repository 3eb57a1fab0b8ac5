"""The report typed end to end: the budget, perplexity, other-text, latency, export
request, ONNX graph and sweep results are sections with fields; their JSON keeps
the keys (and their order) ``report.json`` and ``--json`` always had, and the
command line reads typed fields only, never ``extra``."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from actsparse_deploy.app import cli
from actsparse_deploy.app.report import (
    KEYS,
    BudgetSearch,
    Cost,
    Export,
    HeldoutCost,
    Latency,
    OtherText,
    Perplexity,
    Report,
    SweepResult,
    Validation,
)

#: what budget.BudgetResult.to_json() gives after the held-out cost was measured
BUDGET = {
    "budget": "cosine=0.98", "levels": {"fc2": 0.5, "fc3": 0.25}, "overall_sparsity": 0.4, "uniform_level": 0.3,
    "tuning_cost": 0.981, "tuning_samples": 40, "evaluations": 12, "heldout_cost": 0.979, "heldout_within": False,
}
#: what cost.sparsification_cost gives for a language model with other text
COST = {
    "outputs": [{"output": "logits", "max_abs_diff": 0.5, "cosine_mean": 0.99, "cosine_min": 0.98}],
    "heldout_samples": 64,
    "other_text": {"outputs": [{"output": "logits", "max_abs_diff": 0.7, "cosine_mean": 0.97, "cosine_min": 0.9}], "samples": 24},
    "perplexity_dense": 94.788, "perplexity_sparse": 96.667, "perplexity_onnx": 96.6671,
}
LATENCY = {"dense_ms": 2.0, "sparse_ms": 1.5, "ratio": 0.75, "verdict": "faster than dense: 0.75x", "samples": 64, "runs": 7,
           "warmup": 2, "threads": 1}


def _round_trip(report: Report) -> dict:
    data = json.loads(json.dumps(report.to_json()))
    assert Report.from_json(data) == report
    assert Report.from_json(data).to_json() == data
    return data


def test_budget_perplexity_other_text_and_latency_are_typed_and_round_trip():
    report = Report(model="tiny-lm", cost=COST, latency=LATENCY).replace(budget=BUDGET)
    budget, cost = report.budget, report.cost
    assert isinstance(budget, BudgetSearch) and budget.levels == {"fc2": 0.5, "fc3": 0.25} and budget.evaluations == 12
    assert budget.heldout == HeldoutCost(cost=0.979, within=False)
    assert isinstance(cost, Cost) and cost.perplexity == Perplexity(dense=94.788, sparse=96.667, onnx=96.6671)
    assert cost.other_text == OtherText(outputs=COST["other_text"]["outputs"], samples=24)
    assert report.latency == Latency(**LATENCY)
    data = _round_trip(report)
    # the same keys, in the same order, as before the sections were typed
    assert list(data) == [*KEYS, "budget"] and data["budget"] == BUDGET and list(data["budget"]) == list(BUDGET)
    assert data["cost"] == COST and list(data["cost"]) == list(COST)
    assert data["latency"] == LATENCY
    assert cost.unknown == {} and budget.unknown == {}  # every key has its field


def test_absent_sections_leave_no_keys():
    report = Report(model="m", cost={"outputs": [], "heldout_samples": 3})
    data = _round_trip(report)
    assert list(data) == list(KEYS) and data["cost"] == {"outputs": [], "heldout_samples": 3}
    assert report.budget is None and report.cost.perplexity is None and report.cost.other_text is None
    no_heldout = {**BUDGET, "heldout_cost": None, "heldout_within": None,
                  "heldout_note": "no held-out data: the held-out cost was not measured"}
    budget = BudgetSearch.from_json(no_heldout)
    assert budget.heldout == HeldoutCost(cost=None, within=None, note=no_heldout["heldout_note"])
    assert budget.to_json() == no_heldout
    assert Perplexity(dense=2.0, sparse=3.0).to_json() == {"dense": 2.0, "sparse": 3.0}  # no ONNX figure: no key


def test_export_request_and_validation_lengths_are_typed():
    exported = {"path": "m.onnx", "exporter": "dynamo", "opset": 18, "inputs": ["x"], "outputs": ["y"], "dynamic_axes": {},
                "seconds": 1.5, "external_data": False, "size_bytes": 10,
                "requested_exporter": "auto", "fallback": "aten::diff has no symbolic", "requested_opset": None}
    export = Export.from_json(exported)
    assert export.request is not None and export.request.fallback == "aten::diff has no symbolic"
    assert export.request.requested_exporter == "auto" and export.graph is None and export.to_json() == exported
    assert list(export.to_json()) == list(exported)
    checked = {"onnx": "m.onnx", "passed": True, "atol": 1e-4, "rtol": 0.0, "batch_sizes": [1, 4], "samples": 8,
               "max_abs_diff": 0.0, "outputs": [], "shapes": [{"x": [1, 6, 4]}], "sequence_lengths": {"sequence": [6, 3]}}
    validation = Validation.from_json(checked)
    assert validation.sequence_lengths == {"sequence": [6, 3]} and validation.to_json() == checked


def test_an_onnx_files_graph_is_typed():
    graph = {"input_shapes": [{"name": "x", "dtype": "float32", "shape": [None, 4]}], "output_shapes": [],
             "file_bytes": 100, "ir_version": 9, "producer": "pytorch 2.5", "opsets": {"ai.onnx": 18}, "nodes": 3,
             "ops": {"Gemm": 2, "Relu": 1}, "initializers": 4, "parameters": 50, "initializer_bytes": 200,
             "metadata": {}, "data_files": []}
    found = {"path": "m.onnx", "exporter": "pytorch 2.5", "opset": 18, "inputs": ["x"], "outputs": [], "dynamic_axes": {},
             "seconds": None, "external_data": False, "size_bytes": 100, **graph}
    export = Export.from_json(found)
    assert export.graph is not None and export.graph.ops == {"Gemm": 2, "Relu": 1} and export.request is None
    assert export.to_json() == found and list(export.to_json()) == list(found)


def test_a_statistics_report_says_its_fingerprint_and_parts():
    report = Report(model="m", fingerprint="abc", parts=3)
    data = _round_trip(report)
    assert list(data) == [*KEYS, "fingerprint", "parts"] and (data["fingerprint"], data["parts"]) == ("abc", 3)
    assert "parts" not in Report(model="m", fingerprint="abc").to_json()


def test_sweep_results_are_typed_and_round_trip():
    row = {"method": "topk", "level": 0.5, "overall_sparsity": 0.49, "output": "logits", "cosine_mean": 0.99,
           "cosine_min": 0.9, "heldout_samples": 64, "latency_ratio": 0.8, "dense_ms": 1.0, "sparse_ms": 0.8, "threads": 1,
           "onnx_max_abs_diff": 2e-7, "accuracy_dense": 0.95, "accuracy_sparse": 0.93}
    data = {"model": "digits-mlp", "levels": [0.5], "methods": ["topk"], "compensate": None, "heldout_samples": 64,
            "latency": {"batches": 2, "runs": 3, "threads": 1}, "validation": {"atol": 1e-4, "rtol": 1e-3}, "rows": [row, {**row, "method": "recipe"}]}
    result = SweepResult.from_json(data)
    assert result.validation.atol == 1e-4 and result.rows[0].onnx_max_abs_diff == 2e-7
    assert result.latency.threads == 1 and [r.method for r in result.rows] == ["topk", "recipe"]
    assert result.rows[0].accuracy_sparse == 0.93 and result.rows[0].other_text is None
    assert result.to_json() == data and list(result.to_json()["rows"][0]) == list(row)
    without = {k: v for k, v in row.items() if not k.startswith("accuracy")}
    assert SweepResult.from_json({**data, "rows": [without]}).to_json()["rows"] == [without]


def test_the_command_line_reads_no_extra():
    source = Path(cli.__file__).read_text()
    reads = [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Attribute) and node.attr == "extra"]
    assert reads == [], f"cli.py reads .extra at lines {reads}"
    assert ".extra" not in source
