"""A second text, everywhere: ``--other-text FILE`` for any text model and the built-ins' own
second source, its cost beside the held-out cost, and a budget that holds on both when asked."""

from __future__ import annotations

import json

import pytest
import torch

from actsparse_deploy.app.pipeline import convert
from actsparse_deploy.app.workload import load_workload
from actsparse_deploy.models.tinylm import CONFIG, SEQ_LEN

from ..helpers import invoke, one_line_error
from .test_hf import HFFiles

OTHER = ["an entirely different kind of sentence about the weather", "rain falls on the quiet town tonight",
         "markets opened higher after the long weekend", "the river runs cold in early spring"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> HFFiles:
    files = HFFiles(tmp_path_factory.mktemp("hf-other"))
    files.other = files.text("other.txt", "\n".join(OTHER) + "\n")  # type: ignore[attr-defined]
    return files


def test_a_hugging_face_decoder_reports_its_cost_on_the_other_text(hf, tmp_path):
    """Before, only MiniLM had a second text: --other-text did not exist."""
    result = invoke("convert", hf.llama, "--text", hf.calib, "--heldout-text", hf.held, "--other-text", hf.other,
                    "--max-length", 8, "--no-latency", "--no-cache", "--threads", "1", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    other = report["cost"]["other_text"]
    assert other["samples"] == len(OTHER) and other["outputs"][0]["output"] == "logits"
    assert other["perplexity_dense"] > 1 and other["perplexity_sparse"] > 1  # a language model: perplexity on it too
    assert "other text (4 samples)" in result.stdout and "perplexity" in result.stdout.split("other text (4 samples)")[1]


def test_an_encoder_and_the_python_api_take_it_too(hf, tmp_path):
    report = convert(str(hf.bert), tmp_path / "out", task="feature-extraction", text=str(hf.calib), heldout_text=str(hf.held),
                     other_text=str(hf.other), max_length=8, latency=False, threads=1)
    assert report.cost.other_text.samples == len(OTHER) and 0 < report.cost.other_text.outputs[-1]["cosine_mean"] <= 1 + 1e-6


def test_other_text_that_is_the_calibration_or_held_out_text_or_for_a_model_without_text_is_refused(hf, tmp_path):
    for same, what in ((hf.calib, "calibration"), (hf.held, "held-out")):
        result = invoke("convert", hf.llama, "--text", hf.calib, "--heldout-text", hf.held, "--other-text", same, "-o", tmp_path / "x")
        one_line_error(result, 6, f"other text {same} is the {what} text")
    one_line_error(invoke("convert", "digits-mlp", "--other-text", hf.other, "-o", tmp_path / "y"), 2, "--other-text needs a text model")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_tiny_lm_has_a_second_source_of_its_own():
    work = load_workload("tiny-lm")
    other = list(work.other)
    ids = torch.cat([b["input_ids"] for b in other])
    assert ids.shape[1] == SEQ_LEN and 8 <= len(ids) and int(ids.max()) < CONFIG["vocab_size"]
    held = torch.cat([b["input_ids"] for b in work.heldout])
    assert not any(torch.equal(row, h) for row in ids for h in held)  # not the held-out text
    assert load_workload("minilm").other is not None and load_workload("digits-mlp").other is None


def test_a_user_other_text_replaces_the_built_in_one(hf, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("\n".join(OTHER * 20) + "\n")
    work = load_workload("tiny-lm", model_options=_options(other_text=str(text)))
    rows = sum(b["input_ids"].shape[0] for b in work.other)
    assert rows == len(torch.cat([b["input_ids"] for b in work.other])) and rows >= 1


def test_without_a_second_text_the_summary_says_what_the_held_out_text_is(hf, tmp_path):
    result = invoke("convert", hf.llama, "--text", hf.calib, "--heldout-text", hf.held, "--max-length", 8, "--no-latency",
                    "--no-cache", "--threads", "1", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "note: no --other-text" in result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert any("--other-text" in note for note in report["notes"])


def test_the_budget_can_hold_on_the_other_text_as_well(hf, tmp_path):
    both = convert(str(hf.llama), tmp_path / "both", text=str(hf.calib), heldout_text=str(hf.held), other_text=str(hf.other),
                   max_length=8, latency=False, threads=1, cache=False, max_cost="perplexity-ratio=1.2", max_cost_other=True)
    budget = both.budget
    assert budget.other_text is not None and budget.other_text["samples"] == len(OTHER)
    assert budget.other_text["tuning_cost"] <= 1.2 and budget.tuning_cost <= 1.2  # the search kept the worse of the two
    assert budget.other_text["cost"] <= 1.2 and budget.other_text["within"] is True  # the final model, on all of it
    one_line_error(invoke("convert", hf.llama, "--text", hf.calib, "--heldout-text", hf.held, "--max-cost", "perplexity-ratio=1.2",
                          "--max-cost-other", "-o", tmp_path / "none"), 2, "--max-cost-other", "--other-text")


def _options(**keywords):
    from actsparse_deploy.models.loading import ModelOptions

    return ModelOptions(**keywords)


def test_with_int8_the_budget_holds_the_int8_model_on_the_other_text_too(hf, tmp_path, monkeypatch):
    """Before, ``--max-cost-other --quantize int8`` held the float sparse model on the other text and never the
    int8 model that is written: the report's other-text cost was the float model's (0.99897 where the int8 model
    costs 0.99853), and the search's int8 candidates were measured on the tuning split only. The int8 model is now
    measured there too (each candidate of the search, and the model written), its figure in ``quantization.budget``
    and the summary."""
    from actsparse_deploy.app import pipeline
    from actsparse_deploy.data.batches import total_samples

    measured: list[int | None] = []  # the samples each quantized candidate of the search is measured on
    real = pipeline.quantized_cost

    def spied(dense, path, batches, *args, **kwargs):
        measured.append(total_samples(batches))
        return real(dense, path, batches, *args, **kwargs)

    monkeypatch.setattr(pipeline, "quantized_cost", spied)
    out = tmp_path / "int8"
    result = invoke("convert", hf.llama, "--text", hf.calib, "--heldout-text", hf.held, "--other-text", hf.other, "--max-length", "8",
                    "--threads", "1", "--no-cache", "--max-cost", "perplexity-ratio=1.2", "--max-cost-other", "--quantize", "int8",
                    "-o", out)
    assert result.exit_code == 0, result.output
    assert measured.count(len(OTHER)) >= 2 and len(measured) == 2 * measured.count(len(OTHER))  # int8 alone, each candidate: both sets
    report = json.loads((out / "report.json").read_text())
    kept, rows = report["quantization"]["budget"], {row["variant"]: row for row in report["quantization"]["frontier"]}
    assert kept["other_text_cost"] == rows["sparse+int8"]["other_text"]["perplexity_ratio"] and kept["other_text_within"] is True
    assert kept["heldout_cost"] == rows["sparse+int8"]["perplexity_ratio"]
    said = " ".join(result.stdout.split())
    assert f"the int8 model {kept['other_text_cost']:.4g} on it: within the budget" in said
    assert f"held-out cost of the int8 model {kept['heldout_cost']:.4g}: within the budget" in said
    # the folder's int8 model validates by the same budget, to the same figure (a tolerance cannot hold it)
    checked = invoke("validate", out / "model.onnx", hf.llama, "--task", "causal-lm", "--heldout-text", hf.held, "--max-length", "8",
                     "--masks", out / "masks.safetensors", "--max-cost", "perplexity-ratio=1.2", "--json", "--threads", "1")
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout)["quantized"]["heldout_cost"] == pytest.approx(kept["heldout_cost"], rel=1e-9)
    # ... and with the other text, its cost there beside the held-out one (before: --other-text was read and left unused)
    quantized = json.loads(invoke("validate", out / "model.onnx", hf.llama, "--task", "causal-lm", "--heldout-text", hf.held,
                                  "--max-length", "8", "--other-text", hf.other, "--max-cost", "perplexity-ratio=1.2", "--json",
                                  "--threads", "1").stdout)["quantized"]
    assert quantized["other_text_cost"] == pytest.approx(kept["other_text_cost"], rel=1e-9) and quantized["other_text_within"] is True
    assert quantized["other_text_samples"] == len(OTHER)


def test_an_int8_model_over_the_budget_on_the_other_text_is_a_validation_failure(hf, tmp_path):
    from actsparse_deploy.app.budget import Budget
    from actsparse_deploy.base.errors import ValidationError
    from actsparse_deploy.onnx.export import export_onnx
    from actsparse_deploy.onnx.quantize import check_quantized, quantize_onnx, variant_costs

    work = load_workload(str(hf.llama), model_options=_options(text=str(hf.calib), heldout_text=str(hf.held), other_text=str(hf.other),
                                                                max_length=8))
    export_onnx(work.model, next(iter(work.require_heldout())), tmp_path / "m.onnx", io_spec=work.io)
    quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", "int8", io_spec=work.io)
    held, other = list(work.require_heldout()), list(work.other)
    figures = {where: variant_costs(work.model, {"q": tmp_path / "q.onnx"}, batches, io_spec=work.io, tokens=True)["q"].figure("cosine")
               for where, batches in (("held", held), ("other", other))}
    assert figures["held"] != figures["other"]
    worse, better = min(figures.values()), max(figures.values())  # cosine: lower is worse
    budget = Budget("cosine", (worse + better) / 2)  # kept on one text, missed on the other
    if figures["other"] < figures["held"]:
        with pytest.raises(ValidationError, match="the int8 model's cost on the other text"):
            check_quantized(budget, work.model, tmp_path / "q.onnx", held, io=work.io, tokens=True, other=other)
    else:
        with pytest.raises(ValidationError, match="the int8 model's held-out cost"):
            check_quantized(budget, work.model, tmp_path / "q.onnx", held, io=work.io, tokens=True, other=other)
    kept = check_quantized(Budget("cosine", worse * 0.99), work.model, tmp_path / "q.onnx", held, io=work.io, tokens=True, other=other)
    assert kept["other_text_cost"] == figures["other"] and kept["other_text_within"] is True

