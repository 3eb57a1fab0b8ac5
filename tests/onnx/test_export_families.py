"""Export on the models users bring (issue 11, item 2): names from the model,
dynamic batch and sequence axes from the data (or ``--dynamic-axis``), ``auto``
falling back from one exporter to the other and saying so, exporter chatter
never on stdout (native prints included), validation at two sequence lengths."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from actsparse_deploy.base.constants import DEFAULT_EXPORTER
from actsparse_deploy.base.errors import ExportError, UsageError, ValidationError
from actsparse_deploy.data.iospec import IOSpec, output_names_of, parse_dynamic_axis
from actsparse_deploy.onnx.export import export_onnx
from actsparse_deploy.onnx.validate import validate

from ..helpers import invoke, one_line_error, start_cli, user_module, user_module_source

VOCAB, SEQ = 256, 12

#: a user's module: a tiny Llama (random init, from a config) wrapped to return
#: {"logits": ...}; a model TorchScript cannot export (aten::diff, as HF decoders
#: without an attention mask); a sequence model over float frames
USER_MODULE = user_module_source(extra=f'''
class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size={VOCAB}, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, use_cache=False)
        self.lm = LlamaForCausalLM(config)

    def forward(self, input_ids, attention_mask):
        return {{"logits": self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits}}


def tiny_lm():
    torch.manual_seed(0)
    return TinyLM().eval()


class Differ(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        return torch.diff(self.fc(x), dim=-1)


def differ():
    torch.manual_seed(0)
    return Differ()
''')


def _tokens(samples: int, seq: int = SEQ, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((samples, seq), dtype=np.int64)
    mask[::2, seq - 3:] = 0  # right padding on every other sample
    return {"input_ids": rng.integers(0, VOCAB, (samples, seq)).astype(np.int64), "attention_mask": mask}


def _declared(path, kind: str = "input") -> dict[str, list[int | str]]:
    proto = onnx.load(str(path), load_external_data=False)
    values = proto.graph.input if kind == "input" else proto.graph.output
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


@pytest.fixture
def user(tmp_path, monkeypatch):
    with user_module(tmp_path, USER_MODULE, monkeypatch) as name:
        yield name, __import__(name)


# --- names and dynamic axes come from the model and its data -----------------------------------------


def test_llama_dict_batches_export_named_with_batch_and_sequence_axes(user, tmp_path):
    """A user's tiny Llama returning {"logits": ...} on dict batches: inputs
    input_ids / attention_mask [batch, sequence], output logits [batch, sequence, 256];
    validated at the held-out length and a shorter one."""
    _, module = user
    model = module.tiny_lm()
    held = [{k: torch.from_numpy(v) for k, v in _tokens(6).items()}]
    example = {k: v[:2] for k, v in held[0].items()}
    path = tmp_path / "lm.onnx"
    result = export_onnx(model, example, path, exporter="torchscript")
    assert result.io.input_names == ("input_ids", "attention_mask") and result.io.output_names == ("logits",)
    assert _declared(path) == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert _declared(path, "output") == {"logits": ["batch", "sequence", VOCAB]}
    report = validate(path, model, held, io_spec=result.io)
    assert report.sequence_lengths == {"sequence": [SEQ, SEQ // 2]}
    assert {"input_ids": [1, SEQ], "attention_mask": [1, SEQ]} in report.shapes
    assert {"input_ids": [5, SEQ // 2], "attention_mask": [5, SEQ // 2]} in report.shapes
    assert report.to_json()["sequence_lengths"] == {"sequence": [SEQ, SEQ // 2]}
    # without the I/O spec, validation reads the sequence axis off the ONNX model's declared inputs
    assert validate(path, model, held).sequence_lengths == {"sequence": [SEQ, SEQ // 2]}


def test_tensor_inputs_are_named_by_forward_and_outputs_by_their_fields(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, features, scale):
            return {"scores": self.fc(features) * scale, "parts": (features.sum(-1), features.mean(-1))}

    torch.manual_seed(0)
    model = Two().eval()
    path = tmp_path / "two.onnx"
    result = export_onnx(model, (torch.randn(2, 3), torch.randn(2, 1)), path, exporter="torchscript")
    assert result.io.input_names == ("features", "scale")
    assert result.io.output_names == ("scores", "parts_0", "parts_1")
    assert list(_declared(path)) == ["features", "scale"] and list(_declared(path, "output")) == ["scores", "parts_0", "parts_1"]
    # a float (batch, 3) input is not a sequence: only the batch axis is dynamic
    assert _declared(path)["features"] == ["batch", 3]
    # validation without the I/O spec feeds them by the same names, and finds no sequence axis
    assert validate(path, model, [(torch.randn(6, 3), torch.randn(6, 1))]).sequence_lengths == {}


def test_output_names_of_model_outputs():
    from transformers.modeling_outputs import CausalLMOutput

    t = torch.zeros(1)
    assert output_names_of(CausalLMOutput(logits=t)) == ("logits",)
    assert output_names_of((t,)) == ("output",) and output_names_of([t, None, t]) == ("output_0", "output_2")
    assert output_names_of({"input_ids": t}, taken=("input_ids",)) == ("input_ids_output",)


def test_an_axis_whose_length_differs_across_batches_is_dynamic(tmp_path):
    """Float frames (batch, time, 4): not a sequence by dtype, but the data's
    batches differ in length on axis 1, so it is exported dynamic."""
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    data = [torch.randn(4, 5, 4), torch.randn(4, 7, 4)]
    path = tmp_path / "frames.onnx"
    result = export_onnx(model, data[0][:2], path, exporter="torchscript", data=data)
    assert _declared(path) == {"input": ["batch", "sequence", 4]}
    assert _declared(path, "output") == {"output": ["batch", "sequence", 3]}
    report = validate(path, model, data, io_spec=result.io)
    assert report.sequence_lengths == {"sequence": [5, 7, 2, 3]}


def test_dynamic_axis_named_by_the_user_and_checked(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    frames = torch.randn(2, 6, 4)
    path = tmp_path / "frames.onnx"
    export_onnx(model, frames, path, exporter="torchscript")
    assert _declared(path) == {"input": ["batch", 6, 4]}  # nothing says axis 1 varies
    result = export_onnx(model, frames, path, exporter="torchscript", dynamic_axes=["input:1:time"])
    assert _declared(path) == {"input": ["batch", "time", 4]} and _declared(path, "output") == {"output": ["batch", "time", 3]}
    assert validate(path, model, [torch.randn(6, 6, 4)], io_spec=result.io).sequence_lengths == {"time": [6, 3]}
    with pytest.raises(UsageError, match="the model has no input 'frames'; its inputs: input"):
        export_onnx(model, frames, path, dynamic_axes=["frames:1:time"])
    with pytest.raises(UsageError, match="input 'input' has 3 axes .*give an axis from 0 to 2"):
        export_onnx(model, frames, path, dynamic_axes=["input:3:time"])
    with pytest.raises(ExportError, match=r"NAME:AXIS:LABEL \(e.g. input_ids:1:sequence\), got 'input:x:time'"):
        parse_dynamic_axis("input:x:time")


class _Viewed(nn.Module):
    """Flattens its (batch, time, 4) input with ``view``, as GPT-2's Conv1D does:
    a non-contiguous tensor cannot be viewed so."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(-1, 4)).view(x.shape[0], x.shape[1], 3)


def test_the_second_length_is_contiguous_for_models_that_view(tmp_path):
    model = _Viewed().eval()
    path = tmp_path / "viewed.onnx"
    result = export_onnx(model, torch.randn(2, 6, 4), path, exporter="torchscript", dynamic_axes=["x:1:time"])
    assert validate(path, model, [torch.randn(6, 6, 4)], io_spec=result.io).sequence_lengths == {"time": [6, 3]}


def test_validation_needs_a_second_sequence_length(tmp_path):
    """A model declared dynamic on its sequence axis but held-out data of
    length 1 there: one length is not enough, and the message says why."""
    model = nn.Sequential(nn.Embedding(VOCAB, 4)).eval()
    path = tmp_path / "emb.onnx"
    result = export_onnx(model, torch.zeros(2, 5, dtype=torch.int64), path, exporter="torchscript")
    with pytest.raises(ValidationError, match="cannot validate a second length of the dynamic axis 'sequence'.*length 1 there"):
        validate(path, model, [torch.zeros(6, 1, dtype=torch.int64)], io_spec=result.io)


def test_fixed_sequence_length_fails_validation_at_the_shorter_length(tmp_path):
    """An ONNX model exported at a fixed sequence length (what the dynamo
    default did) fails validation at the second length: never passes on one."""
    model = nn.Sequential(nn.Embedding(VOCAB, 4)).eval()
    path = tmp_path / "fixed.onnx"
    export_onnx(model, torch.zeros(2, 8, dtype=torch.int64), path, exporter="torchscript",
                io_spec=IOSpec(("input",), ("output",), {"input": {0: "batch"}, "output": {0: "batch"}}))
    spec = IOSpec(("input",), ("output",), {"input": {0: "batch", 1: "sequence"}, "output": {0: "batch", 1: "sequence"}})
    with pytest.raises(ValidationError, match="input input axis 1: the ONNX model fixes it to 8, the I/O spec makes it dynamic"):
        validate(path, model, [torch.zeros(6, 8, dtype=torch.int64)], io_spec=spec)


# --- auto: one exporter, then the other, said once; chatter never on stdout ---------------------------


def test_auto_is_the_default_and_falls_back_saying_so(user, tmp_path, capfd):
    _, module = user
    told: list[str] = []
    assert DEFAULT_EXPORTER == "auto"
    result = export_onnx(module.differ(), torch.randn(2, 4), tmp_path / "d.onnx", on_fallback=told.append)
    assert result.exporter == "dynamo" and result.requested == "auto"
    assert len(told) == 1 and "the torchscript exporter failed" in told[0] and "aten::diff" in told[0]
    assert told[0].endswith("exporting with dynamo instead") and "aten::diff" in result.fallback
    assert result.to_json()["requested_exporter"] == "auto" and result.to_json()["exporter"] == "dynamo"
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # the IR dump went nowhere; the notice went to on_fallback
    assert validate(tmp_path / "d.onnx", module.differ(), [torch.randn(6, 4)]).passed
    # a model both exporters take: auto uses the first, says nothing
    result = export_onnx(nn.Sequential(nn.Linear(4, 2)), torch.randn(2, 4), tmp_path / "l.onnx", on_fallback=told.append)
    assert result.exporter == "torchscript" and result.fallback is None and len(told) == 1


@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True])
def test_native_exporter_output_never_reaches_stdout(user, tmp_path, capfd, verbose):
    """The TorchScript exporter prints its IR from C++ (file descriptor 1) when
    it fails: not on stdout; on stderr with verbose."""
    _, module = user
    with pytest.raises(ExportError, match="aten::diff"):
        export_onnx(module.differ(), torch.randn(2, 4), tmp_path / "d.onnx", exporter="torchscript", verbose=verbose)
    out, err = capfd.readouterr()
    assert out == ""
    assert ("Torch IR graph at exception" in err) == verbose


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    process = start_cli(tmp_path, *args)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.slow  # a real process importing torch, exporting twice (torchscript fails, then dynamo)
def test_cli_json_parses_when_an_exporter_fails(user, tmp_path):
    """A real process: `export --json` on a model TorchScript cannot export: stdout
    is one JSON document (no IR dump), stderr says it fell back in one line."""
    name, _ = user
    np.save(tmp_path / "held.npy", np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32))
    done = _run(tmp_path, "export", f"{name}:differ", "--heldout", "held.npy", "-o", "d.onnx", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["export"]["exporter"] == "dynamo" and report["export"]["requested_exporter"] == "auto"
    assert "aten::diff" in report["export"]["fallback"] and report["export"]["inputs"] == ["x"]
    notices = [line for line in done.stderr.splitlines() if "exporting with dynamo instead" in line]
    assert len(notices) == 1 and "Torch IR" not in done.stderr


# --- convert end to end: a user's Llama on dict batches, and --dynamic-axis -----------------------------


def test_convert_user_llama_on_npz_dict_batches(user, tmp_path):
    name, _ = user
    np.savez(tmp_path / "calib.npz", **_tokens(8, seed=1))
    np.savez(tmp_path / "held.npz", **_tokens(6, seed=2))
    result = invoke(
        "convert", f"{name}:tiny_lm", "--data", tmp_path / "calib.npz", "--heldout", tmp_path / "held.npz",
        "--layers", "lm.model.layers.0.mlp.down_proj", "--sparsity", "0.5", "--mode", "mul", "--no-latency",
        "-o", tmp_path / "out", "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["export"]["inputs"] == ["input_ids", "attention_mask"] and report["export"]["outputs"] == ["logits"]
    assert report["export"]["dynamic_axes"]["logits"] == {"0": "batch", "1": "sequence"}
    assert report["validation"]["sequence_lengths"] == {"sequence": [SEQ, SEQ // 2]}
    assert {"input_ids": [5, SEQ // 2], "attention_mask": [5, SEQ // 2]} in report["validation"]["shapes"]
    assert _declared(tmp_path / "out" / "model.onnx", "output") == {"logits": ["batch", "sequence", VOCAB]}


def test_convert_dynamic_axis_option(user, tmp_path):
    name, _ = user
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.normal(size=(8, 6, 4)).astype(np.float32))
    np.save(tmp_path / "held.npy", rng.normal(size=(6, 6, 4)).astype(np.float32))
    args = ["convert", f"{name}:build", "--data", str(tmp_path / "calib.npy"), "--heldout", str(tmp_path / "held.npy"),
            "--layers", "fc2", "--sparsity", "0.5", "--no-latency", "--json"]
    result = invoke(*args, "-o", tmp_path / "out", "--dynamic-axis", "x:1:time")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["export"]["dynamic_axes"]["x"] == {"0": "batch", "1": "time"}
    assert report["validation"]["sequence_lengths"] == {"time": [6, 3]}
    assert _declared(tmp_path / "out" / "model.onnx") == {"x": ["batch", "time", 4]}
    bad = invoke(*args, "-o", tmp_path / "bad", "--dynamic-axis", "x:one:time")
    one_line_error(bad, 2, "NAME:AXIS:LABEL")  # a usage error
    assert not (tmp_path / "bad").exists()


class _Categorical(nn.Module):
    """Ten integer category columns, embedded then flattened: a fixed width, not a sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.fc = nn.Linear(40, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x).flatten(1))


class _Flat(nn.Module):
    """Token features flattened: the output's axis 1 is 4 x the sequence length."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids).flatten(1)


def test_integer_columns_of_a_fixed_width_stay_fixed(tmp_path):
    """Axis 1 of an integer (batch, N) input is only guessed to be a sequence: a
    model that cannot take another width keeps it fixed (exported at 55566fd; the
    guess made it exit 9)."""
    model = _Categorical().eval()
    x = torch.randint(0, 7, (2, 10))
    path = tmp_path / "cat.onnx"
    result = export_onnx(model, x, path, exporter="torchscript", data=[torch.randint(0, 7, (6, 10))])
    assert _declared(path) == {"x": ["batch", 10]}
    assert validate(path, model, [torch.randint(0, 7, (6, 10))], io_spec=result.io).passed
    with pytest.raises(ExportError, match="fails on the example cut shorter"):  # named by the user: an error, not a guess
        export_onnx(model, x, path, exporter="torchscript", dynamic_axes=["x:1:columns"])


def test_an_output_axis_of_another_length_gets_its_own_label(tmp_path):
    model = _Flat().eval()
    path = tmp_path / "flat.onnx"
    result = export_onnx(model, torch.randint(0, VOCAB, (2, 10)), path, exporter="torchscript")
    assert _declared(path) == {"ids": ["batch", "sequence"]}
    assert _declared(path, "output") == {"output": ["batch", "output_axis1"]}  # 4 x sequence, not sequence
    assert validate(path, model, [torch.randint(0, VOCAB, (4, 8))], io_spec=result.io).passed


@pytest.mark.parametrize("text", ["x:\u00b2:t", "x:1", "bogus"])
def test_a_malformed_dynamic_axis_is_one_line(text):
    with pytest.raises(ExportError, match="NAME:AXIS:LABEL"):
        parse_dynamic_axis(text)


class _NoOutput(nn.Module):
    def forward(self, x: torch.Tensor) -> None:
        return None


class _WithScalar(nn.Module):
    """Logits and a scalar (a regulariser, a count) beside them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.fc(x)
        return logits, logits.sum()


def test_a_model_that_returns_nothing_is_not_exported(tmp_path):
    with pytest.raises(ExportError, match="returns no tensor"):
        export_onnx(_NoOutput(), torch.randn(2, 4), tmp_path / "none.onnx", exporter="torchscript")
    assert not (tmp_path / "none.onnx").exists()


def test_cosine_of_a_scalar_output_is_one_value_per_batch():
    from actsparse_deploy.onnx.metrics import cosine_stats

    torch.manual_seed(0)
    dense, sparse = _WithScalar().eval(), _WithScalar().eval()
    stats = cosine_stats(dense, sparse, [torch.randn(5, 4), torch.randn(3, 4)])
    assert [row["output"] for row in stats] == [0, 1] and all(-1.0 <= row["cosine_mean"] <= 1.0 for row in stats)
