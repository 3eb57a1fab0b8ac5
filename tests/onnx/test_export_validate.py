"""Export to ONNX and validation under onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from actsparse_deploy import calibrate
from actsparse_deploy.app.workload import load_workload
from actsparse_deploy.bake.squash import squash
from actsparse_deploy.base.errors import ExportError, ValidationError
from actsparse_deploy.data.batches import resize_batches
from actsparse_deploy.data.iospec import IOSpec
from actsparse_deploy.models.loading import load_recipe
from actsparse_deploy.onnx.export import export_onnx, layer_metadata
from actsparse_deploy.onnx.validate import validate

EXPORTERS = ["torchscript", "dynamo"]


@pytest.fixture(scope="module")
def digits():
    work = load_workload("digits-cnn")
    masks = calibrate(work.model, load_recipe(work, None), work.calibration)
    return work, masks


def _ops(path):
    return [node.op_type for node in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("mode", ["fold", "mul"])
def test_export_validates_with_dynamic_batch(digits, tmp_path, exporter, mode):
    work, masks = digits
    result = squash(work.model, masks, mode)
    path = tmp_path / "model.onnx"
    exported = export_onnx(
        result.model, work.example(), path, exporter=exporter, io_spec=work.io, metadata=layer_metadata(result.report(), mode)
    )
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # one file, nothing left over
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["actsparse_deploy.version"] and meta["actsparse_deploy.squash_mode"] == mode
    assert meta["actsparse_deploy.exporter"] == exporter
    layers = {row["layer"]: row for row in json.loads(meta["actsparse_deploy.layers"])}
    assert layers["fc2"]["sparsity"] == 0.5 and layers["conv2"]["mode"] == mode
    # fold: no multiply in the graph at all; mul: one per masked layer
    assert _ops(path).count("Mul") == (0 if mode == "fold" else 3)
    report = validate(path, result.model, work.heldout, output_names=("logits",))
    assert report.passed and report.batch_sizes == [1, 3, 5] and 2 not in report.batch_sizes
    assert report.max_abs <= 1e-4
    assert exported.opset == proto.opset_import[0].version


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_opset_and_external_data(digits, tmp_path, exporter):
    work, masks = digits
    model = squash(work.model, masks).model
    path = tmp_path / "m.onnx"
    result = export_onnx(model, work.example(), path, exporter=exporter, opset=18, external_data=True, io_spec=work.io)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert result.external_data and result.opset == 18
    assert next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")) == 18
    assert validate(path, model, work.heldout).passed


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_is_quiet(digits, tmp_path, capfd, exporter):
    work, masks = digits
    export_onnx(squash(work.model, masks).model, work.example(), tmp_path / "m.onnx", exporter=exporter)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def _alter_initializer(path, name_hint, out):
    """Invert a baked mask after export (re-enabling only the masked features would
    change nothing where compensation zeroed their weight columns)."""
    proto = onnx.load(str(path))
    for init in proto.graph.initializer:
        array = numpy_helper.to_array(init)
        if name_hint(init.name, array):
            array = (1.0 - array).astype(array.dtype)
            init.CopyFrom(numpy_helper.from_array(array, init.name))
            onnx.save(proto, str(out))
            return
    raise AssertionError("no initializer to alter")


def test_validation_fails_on_altered_mask(digits, tmp_path):
    work, masks = digits
    model = squash(work.model, masks, "mul").model
    path = tmp_path / "m.onnx"
    export_onnx(model, work.example(), path, exporter="torchscript", io_spec=work.io)
    bad = tmp_path / "bad.onnx"
    _alter_initializer(path, lambda name, a: a.ndim == 1 and a.size == 512 and set(np.unique(a)) <= {0.0, 1.0}, bad)
    with pytest.raises(ValidationError) as info:
        validate(bad, model, work.heldout)
    message = str(info.value)
    assert "logits: max abs diff" in message and "over tolerance atol 0.0001" in message and "max rel" in message


def test_validation_errors(digits, tmp_path):
    work, masks = digits
    model = squash(work.model, masks).model
    path = tmp_path / "m.onnx"
    export_onnx(model, work.example(), path, exporter="torchscript", io_spec=work.io)
    with pytest.raises(ValidationError, match="output names"):
        validate(path, model, work.heldout, output_names=("output",))
    with pytest.raises(ValidationError, match="takes input; given a, b"):
        validate(path, model, [{"a": torch.ones(4, 1, 8, 8), "b": torch.ones(4, 1)}])
    corrupted = tmp_path / "corrupt.onnx"
    corrupted.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValidationError, match="cannot load"):
        validate(corrupted, model, work.heldout)
    with pytest.raises(ValidationError, match="does not exist"):
        validate(tmp_path / "none.onnx", model, work.heldout)
    with pytest.raises(ValidationError, match="too little held-out data"):
        validate(path, model, [work.heldout[0][:2]], batch_sizes=(3, 5))


def test_shape_mismatch_is_reported(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, torch.randn(2, 4), path, exporter="torchscript")
    other = nn.Sequential(nn.Linear(4, 5)).eval()
    with pytest.raises(ValidationError, match=r"output: shape mismatch \(batch size 1: ONNX \[1, 3\] vs PyTorch \[1, 5\]"):
        validate(path, other, [torch.randn(8, 4)])


@pytest.mark.parametrize(
    "exporter, op, other", [("dynamo", "aten._linalg_svd", "torchscript"), ("torchscript", "aten::linalg_svd", "dynamo")]
)
def test_export_failure_names_exporter_op_and_leaves_nothing(tmp_path, exporter, op, other):
    class SingularValues(nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x)[1]  # no ONNX op for it

    with pytest.raises(ExportError) as info:
        export_onnx(SingularValues(), torch.randn(3, 4), tmp_path / "m.onnx", exporter=exporter)
    message = str(info.value)
    assert f"the {exporter} exporter failed" in message and op in message and f"try `exporter` {other}" in message
    assert list(tmp_path.iterdir()) == []


def test_resize_batches_keeps_each_batch_shape():
    batches = [{"ids": torch.ones(5, 7)}, {"ids": torch.ones(4, 3)}]
    pieces = resize_batches(batches, 2)
    assert [tuple(p["ids"].shape) for p in pieces] == [(2, 7), (2, 7), (2, 3), (2, 3)]
    assert len(resize_batches(batches, 2, max_samples=5)) == 2


def test_io_spec_infer():
    spec = IOSpec.infer({"a": torch.ones(1), "b": torch.ones(1)}, 2, sequence_axis=True)
    assert spec.input_names == ("a", "b") and spec.output_names == ("output_0", "output_1")
    assert spec.dynamic_axes["a"] == {0: "batch", 1: "sequence"}


def test_validation_runs_a_training_mode_model_in_eval_and_restores_it(digits, tmp_path):
    work, masks = digits
    model = squash(work.model, masks).model
    path = tmp_path / "m.onnx"
    export_onnx(model, work.example(), path, io_spec=work.io)
    dropout = nn.Sequential(model, nn.Dropout(0.9)).train()  # in training mode dropout would break validation
    export_onnx(dropout, work.example(), tmp_path / "d.onnx")
    assert dropout.training  # export restored it
    assert validate(tmp_path / "d.onnx", dropout, work.heldout).passed
    assert dropout.training
