"""What the command line shows, read from typed reports: the budget's verdicts, an
exporter's fallback and the validated sequence lengths in convert's summary, an
ONNX file's graph, a sweep's table."""

from __future__ import annotations

import io
from pathlib import Path

from actsparse_deploy.app import render
from actsparse_deploy.app.render import SafeConsole
from actsparse_deploy.app.report import Report, SweepResult

BUDGET = {"budget": "cosine=0.98", "levels": {"fc2": 0.5}, "overall_sparsity": 0.4, "uniform_level": 0.3, "tuning_cost": 0.98123,
          "tuning_samples": 40, "evaluations": 12}


def text(*items) -> str:
    console = SafeConsole(width=200, soft_wrap=True, record=True, file=io.StringIO())
    for item in items:
        console.print(item)
    return console.export_text()


def test_the_budget_says_within_missed_or_not_measured():
    within = text(*render.budget_lines(Report(budget={**BUDGET, "heldout_cost": 0.99, "heldout_within": True}).budget))
    assert "budget cosine=0.98: overall sparsity 40.0% (uniform start 30.0%), cost 0.9812 on the tuning split " \
           "(40 calibration samples, 12 allocations measured)" in within
    assert "budget cosine=0.98: held-out cost 0.99: within the budget" in within and "fc2" in within
    missed = text(*render.budget_lines(Report(budget={**BUDGET, "heldout_cost": 0.97, "heldout_within": False}).budget))
    assert "held-out cost 0.97: MISSED, the held-out data exceeds the budget" in missed
    note = "no held-out data: the held-out cost was not measured"
    unmeasured = Report(budget={**BUDGET, "heldout_cost": None, "heldout_within": None, "heldout_note": note}).budget
    assert f"budget cosine=0.98: {note}" in text(*render.budget_lines(unmeasured))
    assert "held-out cost not measured" in text(*render.budget_lines(Report(budget=BUDGET).budget))
    assert render.budget_lines(None) == []


def test_convert_summary_names_the_fallback_and_the_sequence_lengths():
    export = {"path": "m.onnx", "exporter": "dynamo", "opset": 18, "inputs": ["x"], "outputs": ["y"], "dynamic_axes": {},
              "seconds": 1.0, "external_data": False, "size_bytes": 10, "requested_exporter": "auto",
              "fallback": "aten::diff has no symbolic", "requested_opset": None}
    validation = {"onnx": "m.onnx", "passed": True, "atol": 1e-4, "rtol": 0.0, "batch_sizes": [1, 3], "samples": 8,
                  "max_abs_diff": 1e-6, "outputs": [], "sequence_lengths": {"sequence": [6, 3]}}
    report = Report(model="m", layers=[], export=export, validation=validation)
    shown = text(*render.convert_summary(report))
    assert "ONNX (dynamo, opset 18) vs PyTorch: max abs diff 1.00e-06 <= 0.0001 at batch sizes [1, 3], sequence lengths [6, 3]: PASSED" in shown
    assert "exporter auto: aten::diff has no symbolic; exported with dynamo" in shown
    no_fallback = Report(model="m", layers=[], export={**export, "fallback": None}, validation=validation)
    assert "exported with" not in text(*render.convert_summary(no_fallback))


def test_an_onnx_files_graph_is_shown():
    graph = {"input_shapes": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
             "output_shapes": [{"name": "y", "dtype": "float32", "shape": None}], "file_bytes": 100, "ir_version": 9,
             "producer": "pytorch", "opsets": {"ai.onnx": 18}, "nodes": 3, "ops": {"Gemm": 2, "Relu": 1}, "initializers": 4,
             "parameters": 1234, "initializer_bytes": 2_000_000, "metadata": {},
             "data_files": [{"location": "m.onnx.data", "tensors": 2, "bytes": None, "present": False}]}
    export = {"path": "m.onnx", "exporter": "pytorch", "opset": 18, "inputs": ["x"], "outputs": ["y"], "dynamic_axes": {},
              "seconds": None, "external_data": True, "size_bytes": 100, **graph}
    shown = text(*render.onnx_lines("m.onnx", Report(export=export)))
    assert "m.onnx: ONNX model (ai.onnx 18; 3 nodes, 4 initializers, 1,234 parameters, 1.9 MB)" in shown
    assert "batchx4" in shown and "operators: Gemm 2, Relu 1" in shown
    assert "external data: m.onnx.data (2 tensors, missing or not a regular file)" in shown
    # a small (an int8 digits) model's weights are not "0.0 MB"
    small = {**export, "initializer_bytes": 30_000, "data_files": [{"location": "m.onnx.data", "tensors": 2, "bytes": 20_000, "present": True}]}
    shown = text(*render.onnx_lines("m.onnx", Report(export=small)))
    assert "1,234 parameters, 29.3 KB)" in shown and "external data: m.onnx.data (2 tensors, 19.5 KB)" in shown


def test_a_sweep_is_a_table_of_typed_rows():
    row = {"method": "topk", "level": 0.5, "overall_sparsity": 0.49, "output": "logits", "cosine_mean": 0.99, "cosine_min": 0.9,
           "heldout_samples": 64, "latency_ratio": 0.8, "dense_ms": 1.0, "sparse_ms": 0.8, "threads": 1,
           "onnx_max_abs_diff": 0.0}
    result = SweepResult.from_json({"model": "digits-mlp", "levels": [0.5], "methods": ["topk"], "compensate": None,
                                    "heldout_samples": 64, "latency": {"batches": 2, "runs": 3, "threads": 1},
                                    "validation": {"atol": 1e-4, "rtol": 1e-3},
                                    "rows": [{**row, "accuracy_dense": 0.95, "accuracy_sparse": 0.93}, {**row, "method": "recipe"}]})
    shown = text(*render.sweep_lines(result, Path("out")))
    assert "digits-mlp: held-out cost and onnxruntime latency (1 thread)" in shown
    assert "0.9300 (dense 0.9500)" in shown and "0.9900 / 0.9000" in shown and "0.800x" in shown
    assert f"written: {Path('out') / 'sweep.json'}, {Path('out') / 'sweep.png'}" in shown


def test_a_small_models_memory_is_not_zero_gigabytes():
    memory = {"peak_bytes": 412_000_000, "weights_bytes": 120_000, "budget_bytes": 1_000_000_000, "apart": False, "one_at_a_time": False}
    shown = text(*render.memory_lines(Report(memory=memory)))
    assert "calibrated with the weights (120.00 kB) in memory; peak memory 412.00 MB of 1.00 GB" in shown
    blocks = text(*render.memory_lines(Report(memory={**memory, "by_block": True})))
    assert "the weights, 120.00 kB, read from their files" in blocks
    files = render.files_line(Report(memory=memory, files={"model.onnx": 2048}, seconds={"total": 1.0}))
    assert files.endswith("peak memory 412.00 MB")


def test_a_quantized_models_check_shows_its_other_text_cost():
    from actsparse_deploy.app.report import QuantizedCheck

    checked = QuantizedCheck(ops={"MatMulInteger": 15}, budget="perplexity-ratio=1.2", heldout_cost=0.9876, within=True,
                             other_text_samples=4, other_text_cost=0.99853, other_text_within=True)
    shown = " ".join(text(*render.quantized_check_lines(checked)).split())
    assert "held-out cost perplexity-ratio=0.9876 against the dense model: within the budget perplexity-ratio=1.2" in shown
    assert "other text (4 samples): perplexity-ratio=0.9985: within the budget (reported, not held" in shown
    over = QuantizedCheck(ops={"MatMulInteger": 15}, budget="cosine=0.99", heldout_cost=0.995, within=True,
                          other_text_samples=64, other_text_cost=0.93, other_text_within=False)
    assert "other text (64 samples): cosine=0.9300: over the budget" in " ".join(text(*render.quantized_check_lines(over)).split())
