"""Half-precision sources (issue: real model sizes): a bfloat16 / float16 Hugging Face
directory is calibrated and squashed in its own dtype (statistics in float64), and
exported with float16 weights by default (onnxruntime has no bfloat16 MatMul on CPU),
or float32 with ``--dtype float32``; a float32 model exported with ``--dtype float16``
halves its weights. The float16 export is validated with a tolerance that fits
float16, said in the report.

The models are tiny and random (built from configs, saved with ``save_pretrained``),
as in ``test_hf.py``."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

from ..helpers import invoke, one_line_error
from .test_hf import HELD, LINES, _bert, _llama, _tokenizer


class HalfFiles:
    """A BERT directory saved in bfloat16, float16 and float32, a Llama one in bfloat16, and text files."""

    def __init__(self, root: Path) -> None:
        tokenizer = _tokenizer()
        vocab = len(tokenizer)
        self.dirs: dict[str, Path] = {}
        for name, model, dtype in (("bert-bf16", _bert(vocab), torch.bfloat16), ("bert-fp16", _bert(vocab), torch.float16),
                                   ("bert-fp32", _bert(vocab), torch.float32), ("llama-bf16", _llama(vocab), torch.bfloat16)):
            self.dirs[name] = root / name
            model.to(dtype).save_pretrained(self.dirs[name])
            tokenizer.save_pretrained(self.dirs[name])
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)  # wide enough that float16's rounding shows in a 64-token pass
        wide = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                                            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128))
        self.dirs["llama-wide-bf16"] = root / "llama-wide-bf16"
        wide.to(torch.bfloat16).save_pretrained(self.dirs["llama-wide-bf16"])
        tokenizer.save_pretrained(self.dirs["llama-wide-bf16"])
        self.calib, self.held = root / "calib.txt", root / "held.txt"
        self.calib.write_text("\n".join([*LINES, " ".join(LINES)]) + "\n")  # one line of 64 tokens and more
        self.held.write_text("\n".join(HELD) + "\n")

    def report(self, name: str, out: Path, *extra: object) -> dict:
        """``convert`` of model ``name`` into ``out``: it passed; its report, the export's dtypes checked against its weights."""
        result = self.convert(name, out, *extra)
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        names = {"float16": "FLOAT16", "float32": "FLOAT"}
        assert _weight_types(out / "model.onnx") == {names[report["export"]["dtype"]]}
        return report

    def convert(self, name: str, out: Path, *extra: object):
        return invoke("convert", self.dirs[name], "--text", self.calib, "--heldout-text", self.held, "-o", out, "--json",
                      "--no-latency", *extra)


@pytest.fixture(scope="module")
def half(tmp_path_factory: pytest.TempPathFactory) -> HalfFiles:
    return HalfFiles(tmp_path_factory.mktemp("half"))


def _weight_types(path: Path) -> set[str]:
    """The element types of the ONNX model's float initializers of two or more dimensions (the layers' weights)."""
    graph = onnx.load(str(path)).graph
    return {onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer
            if len(t.dims) >= 2 and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)}


def _float_bytes(path: Path) -> int:
    """The bytes of the ONNX model's floating initializers."""
    graph = onnx.load(str(path)).graph
    return sum(len(t.raw_data) for t in graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))


def test_bfloat16_directory_exports_float16_validated_at_a_float16_tolerance(half: HalfFiles, tmp_path: Path) -> None:
    report = half.report("bert-bf16", tmp_path / "out")
    assert report["export"]["dtype"] == "float16" and report["export"]["source_dtype"] == "bfloat16"
    assert report["validation"]["passed"] is True
    assert report["validation"]["atol"] > 1e-4  # float16's tolerance, not float32's
    note = next(note for note in report["notes"] if "float16" in note and "bfloat16" in note)
    from actsparse_deploy.base.threads import half_arithmetic

    # a CPU without float16 arithmetic runs float16 slower than float32: the note says so, and what to do
    assert ("--dtype float32: faster" in note) is (half_arithmetic() is False)
    # the cost is measured against the bfloat16 model as it was loaded: small, not zero
    assert 0.99 < report["cost"]["outputs"][0]["cosine_mean"] <= 1.0


def test_dtype_float32_writes_float32_weights_at_the_float32_tolerance(half: HalfFiles, tmp_path: Path) -> None:
    report = half.report("bert-bf16", tmp_path / "out", "--dtype", "float32")
    assert report["export"]["dtype"] == "float32" and report["export"]["source_dtype"] == "bfloat16"
    assert report["validation"]["passed"] is True and report["validation"]["atol"] == 1e-4


def test_float16_directory_stays_float16(half: HalfFiles, tmp_path: Path) -> None:
    report = half.report("bert-fp16", tmp_path / "out")
    assert report["export"]["dtype"] == "float16" and report["export"]["source_dtype"] == "float16"


def test_float32_model_with_dtype_float16_halves_its_weights(half: HalfFiles, tmp_path: Path) -> None:
    full, halved = tmp_path / "full", tmp_path / "half"
    assert half.convert("bert-fp32", full).exit_code == 0
    result = half.convert("bert-fp32", halved, "--dtype", "float16")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["export"]["dtype"] == "float16" and report["export"]["source_dtype"] == "float32"
    assert _weight_types(halved / "model.onnx") == {"FLOAT16"} and _weight_types(full / "model.onnx") == {"FLOAT"}
    assert _float_bytes(halved / "model.onnx") * 2 == _float_bytes(full / "model.onnx")
    assert (halved / "model.onnx").stat().st_size < 0.7 * (full / "model.onnx").stat().st_size


def test_bfloat16_decoder_without_a_cache_converts(half: HalfFiles, tmp_path: Path) -> None:
    result = half.convert("llama-bf16", tmp_path / "out", "--task", "causal-lm", "--no-cache")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["export"]["dtype"] == "float16" and report["validation"]["passed"] is True
    assert report["cost"]["perplexity_sparse"] > 0


def test_a_float16_model_prunes_checked_at_float16s_tolerance(half: HalfFiles, tmp_path: Path) -> None:
    """The pruned model is checked against the mul squash in the model's own dtype: float16's rounding
    is not a dataflow bug (auto used to fall back from prune on every layer of a half-precision model). auto keeps
    prune only where that check passes: every layer pruned is every layer's check passed."""
    result = half.convert("llama-wide-bf16", tmp_path / "auto", "--task", "causal-lm", "--no-cache", "--mode", "auto")
    assert result.exit_code == 0, result.output
    assert {row["mode"] for row in json.loads(result.stdout)["layers"]} == {"prune"}


@pytest.mark.slow  # a dynamo export with a cache and the generation check
def test_bfloat16_decoder_with_its_cache_converts_and_generates(half: HalfFiles, tmp_path: Path) -> None:
    result = half.convert("llama-bf16", tmp_path / "out", "--task", "causal-lm")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["export"]["cache"] is True and report["export"]["dtype"] == "float16"
    assert report["validation"]["generation"]["passed"] is True
    inputs = {i.name: i for i in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.input}
    assert inputs["past_key_values.0.key"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_quantize_exports_float32_and_refuses_float16(half: HalfFiles, tmp_path: Path) -> None:
    one_line_error(half.convert("bert-bf16", tmp_path / "no", "--dtype", "float16", "--quantize", "int8"), 2, "float16", "quantize")
    assert not (tmp_path / "no").exists()
    result = half.convert("bert-bf16", tmp_path / "out", "--quantize", "int8")  # auto: float32 for the quantizer
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["export"]["dtype"] == "float32" and report["quantization"]["quantized"].get("MatMul", 0) > 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_the_written_config_says_the_dtype(half: HalfFiles, tmp_path: Path) -> None:
    assert half.convert("bert-bf16", tmp_path / "out").exit_code == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"


def test_an_unknown_dtype_is_one_line(half: HalfFiles, tmp_path: Path) -> None:
    result = half.convert("bert-fp32", tmp_path / "out", "--dtype", "int8")
    one_line_error(result, 2, "--dtype", "int8")
    assert not (tmp_path / "out").exists()


def test_the_python_api_takes_dtype(half: HalfFiles, tmp_path: Path) -> None:
    from actsparse_deploy import convert
    from actsparse_deploy.base.errors import ExportError

    with pytest.raises(ExportError, match="dtype"):
        convert(str(half.dirs["bert-fp32"]), tmp_path / "x", dtype="bfloat16")
    report = convert(str(half.dirs["bert-fp32"]), tmp_path / "out", text=str(half.calib), heldout_text=str(half.held),
                     dtype="float16", latency=False)
    assert report is not None and report.export is not None and report.export.dtype == "float16"
