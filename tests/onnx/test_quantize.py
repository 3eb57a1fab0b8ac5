"""int8 quantization of ONNX exports by onnxruntime's quantizer, what it costs, and the
variants timed side by side (actsparse_deploy.onnx.quantize, onnx.latency.latencies)."""

from __future__ import annotations

import errno
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from actsparse_deploy.base.errors import DataError, ExportError, OutputError, UsageError, ValidationError
from actsparse_deploy.models.decoder import WithPast, decoder_batch, decoder_example
from actsparse_deploy.models.zoo import calibration_batches, get_builtin, heldout_batches, load_builtin
from actsparse_deploy.onnx.export import export_onnx
from actsparse_deploy.onnx.latency import latencies
from actsparse_deploy.onnx.quantize import model_bytes, quantize_onnx, variant_costs
from actsparse_deploy.onnx.validate import check_external_data, onnx_session

VOCAB = 256


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The built-in digits MLP, its float export and its int8 model."""
    folder = tmp_path_factory.mktemp("digits")
    model, entry = load_builtin("digits-mlp"), get_builtin("digits-mlp")
    export_onnx(model, heldout_batches("digits-mlp")[0], folder / "dense.onnx", io_spec=entry.io_spec())
    result = quantize_onnx(folder / "dense.onnx", folder / "int8.onnx")
    return model, folder, result


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_int8_quantizes_every_layer_and_keeps_the_digits_accuracy(digits):
    model, folder, result = digits
    assert result.mode == "int8" and result.quantized == {"Gemm": 3} and result.nodes_quantized == 3
    assert result.size_before == (folder / "dense.onnx").stat().st_size
    assert result.size_after == (folder / "int8.onnx").stat().st_size < result.size_before / 2
    assert not result.external_data and result.preprocess == "shapes and graph"
    ops = {node.op_type for node in onnx.load(str(folder / "int8.onnx")).graph.node}
    assert "MatMulInteger" in ops and "Gemm" not in ops
    out = result.to_json()
    assert out["nodes_quantized"] == 3 and out["size_ratio"] == pytest.approx(result.size_after / result.size_before)
    assert _entries(folder) == ["dense.onnx", "int8.onnx"]  # no staging folder, lock or data file left


def test_variant_costs_compare_each_file_with_the_dense_model_and_its_source(digits):
    model, folder, _ = digits
    labels = get_builtin("digits-mlp").labels()
    costs = variant_costs(model, {"dense": folder / "dense.onnx", "int8": folder / "int8.onnx"}, heldout_batches("digits-mlp"),
                          references={"int8": "dense"}, labels=labels)
    dense, int8 = costs["dense"], costs["int8"]
    assert list(costs) == ["dense", "int8"]
    assert dense.outputs[0]["output"] == "logits" and dense.outputs[0]["cosine_min"] > 1 - 1e-6
    assert dense.accuracy == dense.dense_accuracy  # the float export is the model
    # close, not bit-exact (how close depends on the CPU: with AVX512-VNNI onnxruntime's int8 products do not saturate, with AVX2 they may)
    assert 1 - 1e-7 > int8.cosine_mean > 0.99 and int8.outputs[0]["max_abs_diff"] > 1e-4
    assert abs(int8.accuracy - dense.accuracy) <= 0.01
    assert int8.reference == "dense" and int8.against_reference[0]["cosine_mean"] == pytest.approx(int8.cosine_mean, abs=1e-6)
    out = int8.to_json()
    assert out["accuracy_drop"] == pytest.approx(int8.dense_accuracy - int8.accuracy)
    assert out["size_bytes"] == model_bytes(folder / "int8.onnx") and "against_reference" not in dense.to_json()


class Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_variant_costs_run_the_dense_model_once_per_batch(digits):
    model, folder, _ = digits
    counting, held = Counting(model), heldout_batches("digits-mlp")
    files = {name: folder / "int8.onnx" for name in ("a", "b", "c")}
    costs = variant_costs(counting, files, held, references={"b": "a", "c": "a"})
    assert counting.calls == len(held)
    assert costs["b"].against_reference[0]["max_abs_diff"] == 0.0 and costs["a"].against_reference == []
    assert costs["a"].perplexity is None and costs["a"].accuracy is None and costs["a"].outputs == costs["c"].outputs


def test_the_weights_take_about_a_quarter_of_the_float_bytes(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)).eval()
    x = torch.randn(8, 256)
    export_onnx(model, x, tmp_path / "float.onnx")
    result = quantize_onnx(tmp_path / "float.onnx", tmp_path / "int8.onnx")
    assert 0.24 < result.size_after / result.size_before < 0.28
    [y] = onnx_session(tmp_path / "int8.onnx").run(None, {"input": x.numpy()})
    cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(y), model(x).detach(), dim=1)
    assert cosine.min() > 0.97 and not torch.equal(torch.from_numpy(y), model(x).detach())


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """A tiny Llama as its decoder with a KV cache (as convert exports a causal LM), its held-out first steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2))
    model = WithPast(lm.eval()).eval()
    folder = tmp_path_factory.mktemp("llama")
    g = torch.Generator().manual_seed(1)
    raw = [{"input_ids": torch.randint(3, VOCAB, (4, 16), generator=g), "attention_mask": torch.ones(4, 16, dtype=torch.long)}
           for _ in range(2)]
    exported = export_onnx(model, decoder_example(raw[0], model.layout), folder / "decoder.onnx", exporter="dynamo",
                           io_spec=model.layout.io_spec())
    return model, folder, [decoder_batch(b, model.layout) for b in raw], exported


@pytest.mark.slow  # a dynamo export with a cache: about 15 s
def test_a_decoder_quantized_keeps_its_perplexity(decoder):
    model, folder, held, _ = decoder
    result = quantize_onnx(folder / "decoder.onnx", folder / "decoder.int8.onnx")
    assert result.quantized["MatMul"] >= 2 * 7 and result.quantized.get("Gather") == 1  # q k v o gate up down, the embedding
    costs = variant_costs(model, {"float": folder / "decoder.onnx", "int8": folder / "decoder.int8.onnx"}, held,
                          io_spec=model.layout.first_step_spec(), tokens=True, references={"int8": "float"})
    ratio = costs["int8"].to_json()["perplexity_ratio"]
    assert costs["float"].to_json()["perplexity_ratio"] == pytest.approx(1, abs=1e-5)
    assert ratio != 1 and ratio == pytest.approx(1, abs=0.01)
    assert [o["output"] for o in costs["int8"].outputs][:2] == ["logits", "present.0.key"]
    assert costs["int8"].outputs[0]["cosine_min"] > 0.99


@pytest.mark.slow  # the decoder fixture's dynamo export, then four decoders timed token by token
def test_a_decoder_frontier_has_each_alternative_s_decode_speed(decoder, tmp_path):
    """Before, the frontier timed a decoder's first step only: what a user compares is ms per generated token."""
    from actsparse_deploy.onnx.quantize import measure_frontier

    model, folder, held, _ = decoder
    dense = tmp_path / "decoder.onnx"
    dense.write_bytes((folder / "decoder.onnx").read_bytes())
    quantize_onnx(dense, tmp_path / "sparse.int8.onnx")
    rows = measure_frontier(model, {"dense": dense, "sparse": dense, "sparse+int8": tmp_path / "sparse.int8.onnx"}, held,
                            io=model.layout.first_step_spec(), mode="int8", tokens=True, decode_prompt=[5, 6, 7, 8]).rows
    assert rows[0]["decode_ratio"] == 1.0 and all(row["decode_ms_per_token"] > 0 for row in rows)
    assert all(row["decode_ratio"] == pytest.approx(row["decode_ms_per_token"] / rows[0]["decode_ms_per_token"]) for row in rows)


def test_static_int8_calibrates_on_our_batches(digits, tmp_path):
    model, folder, _ = digits
    result = quantize_onnx(folder / "dense.onnx", tmp_path / "static.onnx", "int8-static",
                           calibration=calibration_batches("digits-mlp"), io_spec=get_builtin("digits-mlp").io_spec())
    assert result.mode == "int8-static" and result.quantized == {"Gemm": 3} and result.calibration_samples == 128
    ops = {node.op_type for node in onnx.load(str(tmp_path / "static.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Gemm"} <= ops
    costs = variant_costs(model, {"static": tmp_path / "static.onnx"}, heldout_batches("digits-mlp"),
                          labels=get_builtin("digits-mlp").labels())
    assert abs(costs["static"].accuracy - costs["static"].dense_accuracy) <= 0.01
    assert result.to_json()["calibration_samples"] == 128


def test_static_int8_leaves_matrix_products_outputs_in_float(digits, tmp_path):
    """Before, the static quantizer also quantized each MatMul / Gemm output: MiniLM's MLP outputs reach 195, a grid
    step of 0.78 on uint8, and static int8 cost 0.066 cosine (0.011 with the outputs left float)."""
    _, folder, _ = digits
    quantize_onnx(folder / "dense.onnx", tmp_path / "static.onnx", "int8-static", calibration=calibration_batches("digits-mlp"),
                  io_spec=get_builtin("digits-mlp").io_spec())
    graph = onnx.load(str(tmp_path / "static.onnx")).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    requantized = [node.name for node in graph.node if node.op_type == "QuantizeLinear" and made_by.get(node.input[0]) in ("Gemm", "MatMul")]
    assert requantized == [], requantized
    assert made_by[graph.output[0].name] != "DequantizeLinear"  # the logits come from the float product


def test_batches_that_do_not_fit_write_nothing(digits, tmp_path):
    _, folder, _ = digits
    with pytest.raises(ValidationError, match="inputs do not fit"):
        quantize_onnx(folder / "dense.onnx", tmp_path / "static.onnx", "int8-static", calibration=[torch.randn(4, 7)])
    assert _entries(tmp_path) == []


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_inputs_are_one_line_errors(digits, tmp_path):
    _, folder, result = digits
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    with pytest.raises(ValidationError, match="cannot load the ONNX model") as e:
        quantize_onnx(tmp_path / "junk.onnx", tmp_path / "out.onnx")
    _one_line(e)
    with pytest.raises(ValidationError, match="does not exist") as e:
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    with pytest.raises(ValidationError, match="is a directory") as e:
        quantize_onnx(tmp_path, tmp_path / "out.onnx")
    with pytest.raises(UsageError, match="unknown quantization mode 'int4'; known: int8, int8-static") as e:
        quantize_onnx(folder / "dense.onnx", tmp_path / "out.onnx", "int4")
    with pytest.raises(UsageError, match="overwrite its float source") as e:
        quantize_onnx(folder / "dense.onnx", folder / "dense.onnx")
    with pytest.raises(UsageError, match=r"quantized already \(3 DynamicQuantizeLinear, 3 MatMulInteger\)") as e:
        quantize_onnx(result.path, tmp_path / "out.onnx")
    _one_line(e)
    with pytest.raises(DataError, match="needs calibration batches"):
        quantize_onnx(folder / "dense.onnx", tmp_path / "out.onnx", "int8-static")
    (tmp_path / "taken.onnx").write_bytes(b"")
    with pytest.raises(OutputError, match="already exists"):
        quantize_onnx(folder / "dense.onnx", tmp_path / "taken.onnx", overwrite=False)
    with pytest.raises(UsageError, match="references name variants not given: sparse"):
        variant_costs(nn.Identity(), {"int8": result.path}, [], references={"int8": "sparse"})
    assert _entries(tmp_path) == ["junk.onnx", "taken.onnx"]


def test_external_data_stays_external(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8)).eval()
    x = torch.randn(4, 64)
    export_onnx(model, x, tmp_path / "float.onnx", external_data=True)
    assert (tmp_path / "float.onnx.data").is_file()
    result = quantize_onnx(tmp_path / "float.onnx", tmp_path / "int8.onnx")
    assert result.external_data and check_external_data(tmp_path / "int8.onnx") == {
        "int8.onnx.data": (tmp_path / "int8.onnx.data").stat().st_size}
    assert result.size_after == model_bytes(tmp_path / "int8.onnx") > (tmp_path / "int8.onnx").stat().st_size
    assert result.size_before == model_bytes(tmp_path / "float.onnx")
    [y] = onnx_session(tmp_path / "int8.onnx").run(None, {"input": x.numpy()})
    assert torch.nn.functional.cosine_similarity(torch.from_numpy(y), model(x).detach(), dim=1).min() > 0.95
    single = quantize_onnx(tmp_path / "float.onnx", tmp_path / "one.onnx", external_data=False)
    assert not single.external_data and not (tmp_path / "one.onnx.data").exists()
    assert _entries(tmp_path) == ["float.onnx", "float.onnx.data", "int8.onnx", "int8.onnx.data", "one.onnx"]


def test_latencies_time_several_files_on_the_same_batches(digits):
    _, folder, _ = digits
    x = heldout_batches("digits-mlp")[0]
    files = {"dense": folder / "dense.onnx", "int8": folder / "int8.onnx", "again": folder / "dense.onnx"}
    before = torch.get_num_threads()
    speed = latencies(files, [x, x[:5]], threads=1, warmup=1, runs=3)
    assert torch.get_num_threads() == before
    assert list(speed["ms"]) == ["dense", "int8", "again"] and all(ms > 0 for ms in speed["ms"].values())
    assert speed["baseline"] == "dense" and speed["ratio"]["dense"] == 1.0
    assert speed["ratio"]["int8"] == pytest.approx(speed["ms"]["int8"] / speed["ms"]["dense"])
    assert speed["samples"] == len(x) + 5 and speed["runs"] == 3 and speed["threads"] == 1
    with pytest.raises(ValidationError, match="at least one ONNX model"):
        latencies({}, [x])


@pytest.mark.parametrize("error, kind, message", [
    (RuntimeError("Unable to find data type\nsecond line"), ExportError,
     r"onnxruntime's quantizer failed on dense.onnx \(int8\): Unable to find data type$"),
    (OSError(errno.ENOSPC, "No space left on device"), OutputError, r"cannot quantize dense.onnx \(int8\): the disk is full$"),
])
def test_a_quantizer_failure_is_one_line_and_writes_nothing(digits, tmp_path, monkeypatch, error, kind, message):
    import onnxruntime.quantization

    _, folder, _ = digits

    def failing(source, target, **options):
        Path(target).write_bytes(b"half a model")
        raise error

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", failing)
    with pytest.raises(kind, match=message) as e:
        quantize_onnx(folder / "dense.onnx", tmp_path / "out.onnx")
    _one_line(e)
    assert _entries(tmp_path) == []


@pytest.mark.slow  # a BERT convert and its quantization: about 7 s
def test_a_failed_shape_inference_leaves_nothing_in_the_working_directory(tmp_path, monkeypatch):
    """onnxruntime's symbolic shape inference fails on BERT-like exports and leaves its temporary
    model and data file in the working directory: before, two files (87 MB for MiniLM) per run."""
    from ..helpers import invoke
    from ..models.test_hf import HFFiles

    hf = HFFiles(tmp_path / "sources")
    result = invoke("convert", hf.bert, "--task", "feature-extraction", "--text", hf.calib, "--heldout-text", hf.held,
                    "--max-length", 8, "--no-latency", "--threads", 1, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    done = quantize_onnx(tmp_path / "out" / "model.onnx", tmp_path / "int8.onnx")
    assert done.preprocess.startswith("graph only (symbolic shape inference:")
    assert list(work.iterdir()) == [] and Path.cwd() == work


def test_the_frontier_measures_the_other_text_too_and_calibrates_static_on_calibration_data(digits, tmp_path):
    """Before, the frontier's cost was on held-out data only, and its int8-static dense model took its ranges from the held-out data."""
    from actsparse_deploy.onnx.quantize import measure_frontier

    model, folder, _ = digits
    io = get_builtin("digits-mlp").io_spec()
    (tmp_path / "dense.onnx").write_bytes((folder / "dense.onnx").read_bytes())  # the frontier quantizes beside it
    held, other = heldout_batches("digits-mlp")[:2], heldout_batches("digits-mlp")[2:4]
    files = {"dense": tmp_path / "dense.onnx", "sparse": tmp_path / "dense.onnx", "sparse+int8": folder / "int8.onnx"}
    rows = measure_frontier(model, files, held, io=io, mode="int8", tokens=False, other=other).rows
    assert [row["variant"] for row in rows] == ["dense", "int8", "sparse", "sparse+int8"]
    alone = variant_costs(model, {"x": folder / "int8.onnx"}, other, io_spec=io)["x"]
    assert rows[3]["other_text"]["outputs"] == alone.outputs and rows[0]["other_text"]["outputs"][0]["cosine_mean"] == pytest.approx(1.0)
    assert rows[3]["other_text"]["samples"] == sum(len(b) for b in other)
    assert "other_text" not in measure_frontier(model, files, held, io=io, mode="int8", tokens=False).rows[0]
    with pytest.raises(UsageError, match="int8-static needs calibration batches"):
        measure_frontier(model, files, held, io=io, mode="int8-static", tokens=False)
    static = measure_frontier(model, files, held, io=io, mode="int8-static", tokens=False,
                              calibration=calibration_batches("digits-mlp")[:2]).rows
    assert static[1]["variant"] == "int8" and static[1]["reference"] == "dense"
