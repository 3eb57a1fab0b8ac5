"""The whole pipeline from the command line: squash, export, validate, convert, inspect."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import typer
from onnx import numpy_helper
from torch.testing import assert_close

from actsparse_deploy import Masks
from actsparse_deploy.app.cli import app
from actsparse_deploy.app.workload import load_workload
from actsparse_deploy.bake.squash import squash
from actsparse_deploy.base.errors import ExportError, MaskError, ValidationError
from actsparse_deploy.models import minilm

from ..helpers import MINILM_OUTDIRS, invoke


@pytest.fixture
def digits_masks(digits_files):
    return digits_files.masks("digits-cnn")


def test_convert_digits_cnn(tmp_path):
    out = tmp_path / "out"
    result = invoke("convert", "digits-cnn", "-o", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["masks.safetensors", "model.onnx", "report.json"]
    for text in ("conv2", "prune", "fold", "PASSED", "accuracy dense 0.9800 -> sparse 0.9775 (ONNX 0.9775)", "model.onnx"):
        assert text in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["validation"]["passed"] and report["validation"]["max_abs_diff"] <= 1e-4
    assert {row["layer"]: row["mode"] for row in report["layers"]} == {"conv2": "fold", "fc1": "fold", "fc2": "prune"}
    assert report["cost"]["accuracy_dense"] == 0.98 and report["cost"]["accuracy_onnx"] == report["cost"]["accuracy_sparse"]
    assert report["files"]["model.onnx"] == (out / "model.onnx").stat().st_size
    # an existing output is kept unless --overwrite
    again = invoke("convert", "digits-cnn", "-o", out)
    assert again.exit_code == 11 and "--overwrite" in again.stderr
    assert invoke("convert", "digits-cnn", "-o", out, "--overwrite", "--mode", "mul", "--json").exit_code == 0


@pytest.fixture(params=["torchscript", "dynamo"])
def minilm_convert(request, background):
    """The session's one `actsparse convert minilm` per exporter (torchscript: the default)."""
    done = background.result(f"minilm-{request.param}")
    out = background.folder("minilm") / MINILM_OUTDIRS[request.param]
    return request.param, out, json.loads((out / "report.json").read_text()), done.stdout


@pytest.mark.slow
@pytest.mark.background("minilm-torchscript", "minilm-dynamo")
def test_convert_minilm_end_to_end(minilm_convert):
    exporter, out, report, stdout = minilm_convert
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "masks.safetensors", "model.onnx", "report.json",  # and what loaders read beside model.onnx
                                                 "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert "PASSED" in stdout and "sentence_embedding" in stdout  # the summary, as in the README
    assert report["export"]["exporter"] == exporter
    assert report["calibration"]["samples"] == {"torchscript": 808, "dynamo": 64}[exporter]  # dynamo: --max-samples 64
    assert (report["latency"] is None) == (exporter == "dynamo")  # --no-latency
    assert report["validation"]["passed"] and report["validation"]["max_abs_diff"] <= 1e-4
    assert [o["output"] for o in report["validation"]["outputs"]] == ["token_embeddings", "sentence_embedding"]
    assert len(report["layers"]) == 6 and all(row["mode"] == "prune" and row["sparsity"] == 0.25 for row in report["layers"])
    assert "removed 384 of 1536 features from bert.encoder.layer.0.intermediate.dense" in report["layers"][0]["reason"]
    assert [row["layer"] for row in report["layers"]] == [f"bert.encoder.layer.{i}.output.dense" for i in range(6)]
    cosine = {row["output"]: row for row in report["cost"]["outputs"]}["sentence_embedding"]
    assert 0.8 < cosine["cosine_mean"] < 1.0
    # dynamic batch and sequence axes on both inputs
    proto = onnx.load(str(out / "model.onnx"))
    for graph_input in proto.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param, graph_input.name
    assert [o.name for o in proto.graph.output] == ["token_embeddings", "sentence_embedding"]


def test_minilm_heldout_has_several_sequence_lengths():
    work = load_workload("minilm")
    lengths = {b["input_ids"].shape[1] for b in work.heldout}
    assert len(lengths) > 3
    def sentences(batches):  # token ids without padding (id 0)
        return {tuple(t for t in row if t) for b in batches for row in b["input_ids"].tolist()}

    calib, held = sentences(work.calibration), sentences(work.heldout)
    assert len(calib) == 808 and len(held) == 256 and not calib & held  # every clean sentence not held out


def test_squash_to_pt2_round_trip_and_export_from_it(tmp_path, digits_files, digits_masks):
    pt2 = digits_files.pt2("digits-cnn")  # `actsparse squash digits-cnn --masks digits_masks`
    stdout = digits_files.outputs[pt2.name]
    assert "prune" in stdout and "fold" in stdout
    program = torch.export.load(str(pt2))
    work = load_workload("digits-cnn")
    reference = squash(work.model, Masks.load(digits_masks)).model
    for size in (1, 7):
        x = work.heldout[0][:size]
        assert_close(program.module()(x), reference(x), rtol=1e-5, atol=1e-6)
    onnx_path = tmp_path / "from_pt2.onnx"
    result = invoke("export", pt2, "-o", onnx_path, "--exporter", "dynamo")
    assert result.exit_code == 0, result.output
    result = invoke("validate", onnx_path, pt2)
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.stdout
    result = invoke("export", pt2, "-o", tmp_path / "x.onnx", "--exporter", "torchscript")  # explicit: refused
    assert result.exit_code == ExportError.exit_code and "dynamo only" in result.stderr


def test_export_and_validate_commands(tmp_path, digits_masks):
    onnx_path = tmp_path / "model.onnx"
    result = invoke("export", "digits-cnn", "--masks", digits_masks, "-o", onnx_path, "--json")
    assert result.exit_code == 0, result.output
    exported = json.loads(result.stdout)
    assert exported["export"]["exporter"] == "torchscript" and exported["export"]["outputs"] == ["logits"]
    result = invoke("validate", onnx_path, "digits-cnn", "--masks", digits_masks)
    assert result.exit_code == 0, result.output
    assert "accuracy dense 0.9800 -> sparse 0.9775" in result.stdout
    # the dense model is not what this ONNX computes
    result = invoke("validate", onnx_path, "digits-cnn")
    assert result.exit_code == ValidationError.exit_code
    assert "logits: max abs diff" in result.stderr and "Traceback" not in result.output
    dense = tmp_path / "dense.onnx"
    assert invoke("export", "digits-cnn", "-o", dense).exit_code == 0
    assert invoke("validate", dense, "digits-cnn").exit_code == 0


def test_validate_fails_on_mask_altered_after_export(tmp_path, digits_masks):
    onnx_path = tmp_path / "model.onnx"
    assert invoke("export", "digits-cnn", "--masks", digits_masks, "--mode", "mul", "-o", onnx_path).exit_code == 0
    proto = onnx.load(str(onnx_path))
    altered = 0
    for init in proto.graph.initializer:
        if init.name.endswith("fc1.mask"):  # inverted: compensation zeroed the masked features' weight columns
            array = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((1.0 - array).astype(array.dtype), init.name))
            altered += 1
    assert altered == 1
    onnx.save(proto, str(onnx_path))
    result = invoke("validate", onnx_path, "digits-cnn", "--masks", digits_masks, "--mode", "mul")
    assert result.exit_code == ValidationError.exit_code
    assert "does not match" in result.stderr and "max abs diff" in result.stderr and "atol 0.0001" in result.stderr


def test_inspect(digits_masks):
    result = invoke("inspect", digits_masks)
    assert result.exit_code == 0 and "16x1x1" in result.stdout and "sparsity_level = 0.125" in result.stdout
    rows = json.loads(invoke("inspect", "digits-cnn", "--json").stdout)["layers"]
    by_name = {row["layer"]: row for row in rows}
    assert by_name["conv2"] == {"layer": "conv2", "type": "Conv2d", "input_shape": [8, 16, 8, 8], "foldable": True}
    assert by_name["act1"]["foldable"] is False
    minilm = json.loads(invoke("inspect", "minilm", "--json").stdout)["layers"]
    dense = {r["layer"]: r for r in minilm}["bert.encoder.layer.0.output.dense"]
    assert dense["input_shape"][-1] == 1536 and dense["foldable"]


def test_bad_mode_and_masks_from_another_model(tmp_path, digits_masks):
    result = invoke("squash", "digits-cnn", "--masks", digits_masks, "--mode", "sideways", "-o", tmp_path / "m.pt2")
    assert result.exit_code == 2 and "'sideways' is not one of" in result.stderr  # a usage error: --mode is a choice
    result = invoke("export", "digits-mlp", "--masks", digits_masks, "-o", tmp_path / "m.onnx")
    assert result.exit_code == MaskError.exit_code and "another model" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["calibrate", "squash", "export", "validate", "convert", "inspect", "models"])
def test_every_command_has_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert f" {command} [OPTIONS]" in result.stdout
    spec = typer.main.get_command(app).commands[command]
    words = " ".join(result.stdout.split())
    assert " ".join(spec.help.split("\n\n")[0].split()) in words  # the command's summary
    options = [name for param in spec.params for name in param.opts if name.startswith("--")]
    assert "--verbose" in options and [o for o in options if o not in result.stdout] == []  # every option listed



USER_MODULE = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))
'''


def test_convert_user_model_with_data_files(tmp_path, monkeypatch):
    (tmp_path / "pipeline_user_model.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.normal(size=(64, 6)).astype(np.float32))
    np.save(tmp_path / "heldout.npy", rng.normal(size=(40, 6)).astype(np.float32))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[defaults]\nsparse_config = { sparsity_level = 0.5 }\n[[layers]]\nname = ["2", "4"]\n')
    base = ["convert", "pipeline_user_model:build", "--recipe", recipe, "--data", tmp_path / "calib.npy"]
    missing = invoke(*base, "-o", tmp_path / "no-heldout")
    assert missing.exit_code == 6 and "--heldout" in missing.stderr
    result = invoke(*base, "--heldout", tmp_path / "heldout.npy", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["validation"]["passed"] and report["validation"]["batch_sizes"] == [1, 3, 5]
    assert [(r["layer"], r["mode"], r["sparsity"]) for r in report["layers"]] == [("2", "prune", 0.5), ("4", "prune", 0.5)]
    assert report["cost"]["heldout_samples"] == 40 and "accuracy_dense" not in report["cost"]


@pytest.mark.slow
@pytest.mark.background("minilm-pt2")
def test_minilm_pt2_loads_and_computes_what_the_onnx_model_does(background):
    """A MiniLM program written by `actsparse squash` passes the .pt2 checker and
    loads (two inputs, two outputs, dynamic batch and sequence); it computes what
    the ONNX model of the same masks does. Exporting a .pt2 and validating against
    it is the digits test above."""
    import onnxruntime as ort

    from actsparse_deploy.bake.pt2 import load_pt2

    squashed = background.result("minilm-pt2")
    assert {row["mode"] for row in json.loads(squashed.stdout)["layers"]} == {"prune"}
    program, meta = load_pt2(background.folder("minilm") / "minilm.pt2")
    assert meta["model"] == "minilm" and meta["inputs"] == list(minilm.INPUT_NAMES)
    onnx_path = background.folder("minilm") / MINILM_OUTDIRS["torchscript"] / "model.onnx"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batches = minilm.minilm_batches("heldout", batch_size=8)[:3]
    assert len({b["input_ids"].shape[1] for b in batches}) == 3 and all((b["attention_mask"] == 0).any() for b in batches)
    for batch in (batches[0], {k: v[:3] for k, v in batches[1].items()}, batches[2]):
        with torch.no_grad():
            got = program.module()(batch["input_ids"], batch["attention_mask"])
        want = session.run(None, {name: batch[name].numpy() for name in minilm.INPUT_NAMES})
        assert len(got) == len(want) == 2  # token and sentence embeddings
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-4, atol=1e-4)
