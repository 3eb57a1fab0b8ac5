"""One input / output spec per model: what export declares, what ``.pt2`` capture
makes dynamic and what validation checks come from the same spec; a declared
output shape that lies fails validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from actsparse_deploy.base.constants import DEFAULT_EXPORTER
from actsparse_deploy.base.errors import ExportError, ValidationError
from actsparse_deploy.data.iospec import IOSpec, export_plan
from actsparse_deploy.models import minilm, zoo
from actsparse_deploy.onnx.export import export_onnx
from actsparse_deploy.onnx.validate import validate

from ..helpers import MINILM_OUTDIRS, invoke, one_line_error, user_module, user_module_source

USER_MODULE = user_module_source(3)


def _declared(proto: onnx.ModelProto, name: str) -> list[int | str]:
    value = next(v for v in proto.graph.output if v.name == name)
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


# --- the spec itself -------------------------------------------------------------------------


class _Twice(nn.Module):
    def forward(self, x):
        return {"doubled": x * 2}


def test_the_export_plan_holds_what_the_exporter_is_handed():
    """One call: the inputs in order, the model behind a positional adapter, the names,
    the axes (the user's added) and the dynamo exporter's dynamic shapes."""
    x = torch.randn(2, 3)
    plan = export_plan(_Twice(), x, dynamic_axes=[("x", 1, "width")])
    assert plan.spec == IOSpec(("x",), ("doubled",), {"x": {0: "batch", 1: "width"}, "doubled": {0: "batch", 1: "width"}})
    torch.testing.assert_close(plan.args[0], x)
    torch.testing.assert_close(plan.module(*plan.args)[0], x * 2)
    assert plan.dynamic_shapes is not None and plan.shapes_error is None
    assert [{a: d.__name__ for a, d in per.items()} for per in plan.dynamic_shapes] == [{0: "batch", 1: "width"}]


def test_a_label_torch_export_cannot_name_fails_the_dynamo_exporter_only(tmp_path):
    plan = export_plan(_Twice(), torch.randn(2, 3), dynamic_axes=[("x", 1, "my-axis")])
    assert plan.dynamic_shapes is None and plan.shapes_error is not None
    with pytest.raises(ExportError, match=r"^the dynamo exporter failed: AssertionError: .*my-axis; try `exporter` torchscript$"):
        export_onnx(_Twice(), torch.randn(2, 3), tmp_path / "d.onnx", exporter="dynamo", dynamic_axes=["x:1:my-axis"])
    result = export_onnx(_Twice(), torch.randn(2, 3), tmp_path / "t.onnx", exporter="torchscript", dynamic_axes=["x:1:my-axis"])
    assert dict(result.io.dynamic_axes["x"]) == {0: "batch", 1: "my-axis"}


def test_builtin_specs_give_each_tensor_its_own_axes():
    spec = zoo.get_builtin("minilm").io_spec()
    assert spec.input_names == minilm.INPUT_NAMES and spec.output_names == minilm.OUTPUT_NAMES
    assert dict(spec.dynamic_axes["sentence_embedding"]) == {0: "batch"}
    assert dict(spec.dynamic_axes["token_embeddings"]) == {0: "batch", 1: "sequence"}
    assert dict(spec.dynamic_axes["input_ids"]) == {0: "batch", 1: "sequence"}
    digits = zoo.get_builtin("digits-mlp").io_spec()
    assert digits == IOSpec(("input",), ("logits",), {"input": {0: "batch"}, "logits": {0: "batch"}})


@pytest.mark.slow
@pytest.mark.background("minilm-torchscript", "minilm-dynamo")
def test_minilm_export_declares_its_outputs(background):
    """The session's MiniLM converts (`actsparse convert minilm`, both exporters:
    export, then validation, which reads the declared output shapes too) declare
    sentence_embedding [batch, 384] (not [batch, sequence]), as the one spec says."""
    assert DEFAULT_EXPORTER == "auto"
    spec = zoo.get_builtin("minilm").io_spec()
    assert dict(spec.dynamic_axes["sentence_embedding"]) == {0: "batch"}
    for exporter, outdir in MINILM_OUTDIRS.items():
        assert background.result(f"minilm-{exporter}").returncode == 0
        report = json.loads((background.folder("minilm") / outdir / "report.json").read_text())
        assert report["export"]["exporter"] == exporter  # auto: torchscript works on MiniLM, the first it tries
        proto = onnx.load(str(background.folder("minilm") / outdir / "model.onnx"), load_external_data=False)
        assert _declared(proto, "sentence_embedding") == ["batch", minilm.HIDDEN_SIZE], exporter
        assert _declared(proto, "token_embeddings") == ["batch", "sequence", minilm.HIDDEN_SIZE], exporter


# --- validation reads the declared output shapes ---------------------------------------------


@pytest.fixture
def lying(tmp_path, monkeypatch):
    """A tiny user model exported with the torchscript exporter, and a copy whose
    declared output shape the ``edit`` function changes."""
    np.save(tmp_path / "heldout.npy", np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32))
    with user_module(tmp_path, USER_MODULE, monkeypatch) as name:
        module = __import__(name)
        good = tmp_path / "good.onnx"
        export_onnx(module.build(), torch.randn(2, 4), good, exporter="torchscript")

        def make(edit) -> Path:
            proto = onnx.load(str(good))
            edit(proto.graph.output[0].type.tensor_type.shape)
            path = tmp_path / "lying.onnx"
            onnx.save(proto, str(path))
            return path

        yield module, make, tmp_path


def _fixed(axis: int, value: int):
    def edit(shape) -> None:
        shape.dim[axis].Clear()
        shape.dim[axis].dim_value = value

    return edit


def _extra_axis(shape) -> None:
    shape.dim.add().dim_value = 1


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (_fixed(1, 5), "output output axis 1: the ONNX model fixes it to 5, PyTorch gives 3"),
        (_fixed(0, 7), "output output axis 0: the ONNX model fixes it to 7, PyTorch gives"),
        (_extra_axis, "output output: the ONNX model declares rank 3"),
    ],
    ids=["wrong-feature-dim", "fixed-batch", "wrong-rank"],
)
def test_a_declared_output_shape_that_lies_fails(lying, edit, phrase):
    module, make, tmp = lying
    path = make(edit)
    with pytest.raises(ValidationError, match="declared output shapes do not fit") as info:
        validate(path, module.build(), [torch.randn(12, 4)])
    assert phrase in str(info.value)
    one_line_error(invoke("validate", path, f"{module.__name__}:build", "--heldout", tmp / "heldout.npy"), 10, phrase)


def test_a_true_declared_output_shape_passes(lying):
    module, make, _ = lying
    path = make(lambda shape: None)
    assert validate(path, module.build(), [torch.randn(12, 4)]).passed


def test_an_output_axis_the_spec_makes_dynamic_must_not_be_fixed(lying):
    module, make, _ = lying
    path = make(_fixed(0, 3))  # true for batch size 3 only: the spec says the batch axis is dynamic
    spec = IOSpec(("x",), ("output",), {"x": {0: "batch"}, "output": {0: "batch"}})
    with pytest.raises(ValidationError, match="output output axis 0: the ONNX model fixes it to 3, the I/O spec makes it dynamic"):
        validate(path, module.build(), [torch.randn(12, 4)], io_spec=spec, batch_sizes=(3, 1))


class _Pool(nn.Module):
    """Two inputs, token features [batch, sequence, 4] and their mean [batch, 4]."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = input_ids.float().unsqueeze(-1).expand(-1, -1, 4) * attention_mask.unsqueeze(-1)
        return tokens, tokens.mean(dim=1)


def test_pt2_capture_uses_the_model_spec(tmp_path):
    """save_pt2 captures with the workload's one spec and stores it: the pooled
    output keeps only its batch axis dynamic, and the program runs at other
    batch sizes and sequence lengths."""
    from actsparse_deploy.bake.pt2 import load_pt2, pt2_io, save_pt2
    from actsparse_deploy.bake.squash import SquashResult
    from actsparse_deploy.data.workload import Workload

    spec = IOSpec(("input_ids", "attention_mask"), ("tokens", "pooled"), {
        "input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
        "tokens": {0: "batch", 1: "sequence"}, "pooled": {0: "batch"},
    })
    batches = [{"input_ids": torch.randint(0, 9, (4, 5)), "attention_mask": torch.ones(4, 5, dtype=torch.int64)}]
    model = _Pool().eval()
    path = tmp_path / "pool.pt2"
    save_pt2(Workload("pool", model, heldout=batches, io=spec), SquashResult(model, {}, {}, {}), path)
    program, meta = load_pt2(path)
    assert pt2_io(meta) == spec
    ids, mask = torch.randint(0, 9, (3, 7)), torch.ones(3, 7, dtype=torch.int64)
    for got, want in zip(program.module()(ids, mask), model(ids, mask)):
        torch.testing.assert_close(got, want)
