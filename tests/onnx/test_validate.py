"""Strict, robust validation and export: non-finite outputs, input names / ranks /
dtypes / fixed dimensions, interruptible and time-limited onnxruntime runs, no
onnxruntime log lines, a full disk and long names during export, one message per
problem, and a result table that shows the figure the verdict used."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from actsparse_deploy.base.errors import OutputError, ValidationError
from actsparse_deploy.data.iospec import IOSpec
from actsparse_deploy.onnx.export import export_onnx
from actsparse_deploy.onnx.validate import validate

from ..helpers import UserFolder, invoke, one_line_error, user_module, user_module_source

USER_MODULE = user_module_source(
    forward_first='''
    marker = os.environ.get("ACTSPARSE_TEST_MARKER")
    if marker:
        pathlib.Path(marker).touch()  # the PyTorch side ran: onnxruntime runs next
''',
    extra='''
class Two(Net):
    def forward(self, x):
        y = super().forward(x)
        return y, y * 2


class NonFinite(Net):
    """Computes NaN (or Inf) in output column 1 from finite weights and inputs."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        y = super().forward(x)
        bad = torch.sqrt(-1 - y[:, 1].abs()) if self.kind == "nan" else 1 / (y[:, 1] * 0).abs()
        return torch.stack([y[:, 0], bad], dim=1)


def build_nan():
    torch.manual_seed(0)
    return NonFinite("nan")


def build_inf():
    torch.manual_seed(0)
    return NonFinite("inf")


def build_two():
    torch.manual_seed(0)
    return Two()
''',
)


class World(UserFolder):
    @property
    def data(self) -> Path:
        return self.tmp / "data.npy"

    def model(self, factory: str = "build") -> torch.nn.Module:
        return getattr(sys.modules[self.module], factory)()

    def onnx(self, factory: str = "build", name: str = "model.onnx") -> Path:
        path = self.file(name)
        export_onnx(self.model(factory), torch.randn(2, 4), path, exporter="torchscript")
        return path

    def leftovers(self, *keep: str) -> list[str]:
        ignore = {f"{self.module}.py", "data.npy", "__pycache__", "marker", *keep}
        return sorted(p.name for p in self.tmp.iterdir() if p.name not in ignore)


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.delenv("ACTSPARSE_TEST_MARKER", raising=False)
    np.save(tmp_path / "data.npy", np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32))
    with user_module(tmp_path, USER_MODULE, monkeypatch) as name:
        __import__(name)
        yield World(tmp_path, name)


def _validate_cli(w: World, onnx_path: Path, factory: str = "build", *extra: str):
    return invoke("validate", onnx_path, w.user(factory), "--heldout", w.data, *extra)


# --- ONNX models built for the cases ---------------------------------------------------


def _edit(src: Path, dst: Path, fn) -> Path:
    proto = onnx.load(str(src))
    fn(proto)
    onnx.save(proto, str(dst))
    return dst


def _set_bias(value: float):
    def fn(proto: onnx.ModelProto) -> None:
        init = next(i for i in proto.graph.initializer if i.name.endswith("fc2.bias"))
        array = numpy_helper.to_array(init).copy()
        array[1] = value
        init.CopyFrom(numpy_helper.from_array(array, init.name))

    return fn


def _rename_input(proto: onnx.ModelProto) -> None:
    old = proto.graph.input[0].name
    proto.graph.input[0].name = "renamed"
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = "renamed"


def _fix_batch(size: int):
    def fn(proto: onnx.ModelProto) -> None:
        dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = size

    return fn


def _huge_loop(path: Path, trips: int = 10**12, quantized: bool = False) -> Path:
    """``output = Loop(trips){v + 0}(input) @ W``: valid, and runs practically forever (``quantized``: the loop's
    result through a QuantizeLinear / DequantizeLinear pair before the product, as a static int8 model has it)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "zero"], ["v_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    qdq = [helper.make_node("QuantizeLinear", ["looped", "scale", "zero_point"], ["q"]),
           helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["dq"])] if quantized else []
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "input"], ["looped"], body=body), *qdq,
         helper.make_node("MatMul", ["dq" if quantized else "looped", "W"], ["output"])],
        "huge_loop",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 2])],
        [
            numpy_helper.from_array(np.array(trips, np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "cond"),
            numpy_helper.from_array(np.ones((4, 2), np.float32), "W"),
            numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
            numpy_helper.from_array(np.array(0, np.int8), "zero_point"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _huge_allocation(path: Path) -> Path:
    """A valid model whose ConstantOfShape asks for 4 EiB: onnxruntime fails (and logs)."""
    graph = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["big"], value=numpy_helper.from_array(np.array([1.0], np.float32))),
            helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
            helper.make_node("MatMul", ["input", "W"], ["y"]),
            helper.make_node("Add", ["y", "total"], ["output"]),
        ],
        "huge_allocation",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(np.array([2**40, 2**20], np.int64), "shape"), numpy_helper.from_array(np.ones((4, 2), np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


# --- NaN / Inf -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "onnx_bias, reference, word, side",
    [
        (float("nan"), "build", "NaN", "ONNX"),
        (float("inf"), "build", "Inf", "ONNX"),
        (None, "build_nan", "NaN", "PyTorch"),
        (None, "build_inf", "Inf", "PyTorch"),
    ],
    ids=["nan-onnx", "inf-onnx", "nan-pytorch", "inf-pytorch"],
)
def test_non_finite_output_fails_because_of_it(world, onnx_bias, reference, word, side):
    path = world.onnx()
    if onnx_bias is not None:
        path = _edit(path, world.file("bad.onnx"), _set_bias(onnx_bias))
    message = one_line_error(_validate_cli(world, path, reference), 10)
    assert f"output: {word} in the {side} output" in message, message
    assert "max abs diff 0 " not in message


def test_non_finite_on_both_sides_still_fails(world):
    path = world.onnx("build_nan")  # the exported model computes NaN exactly where PyTorch does
    with pytest.raises(ValidationError, match=r"output: NaN in the ONNX output \(20 of 40 values\).*NaN in the PyTorch output"):
        validate(path, world.model("build_nan"), [torch.randn(20, 4)], batch_sizes=(5,))


# --- inputs ----------------------------------------------------------------------------


def test_renamed_input_fails(world):
    renamed = _edit(world.onnx(), world.file("renamed.onnx"), _rename_input)
    assert _validate_cli(world, world.onnx(name="good.onnx")).exit_code == 0
    message = one_line_error(_validate_cli(world, renamed), 10)
    assert "input names do not match the ONNX model's: it takes renamed; given x" in message, message


def test_renamed_input_fails_against_the_io_spec(world):
    renamed = _edit(world.onnx(), world.file("renamed.onnx"), _rename_input)
    spec = IOSpec(("x",), ("output",), {"x": {0: "batch"}})
    with pytest.raises(ValidationError, match="it takes renamed; given x"):
        validate(renamed, world.model(), [torch.randn(8, 4)], io_spec=spec)
    renamed_spec = IOSpec(("renamed",), ("output",), {"renamed": {0: "batch"}})
    assert validate(renamed, world.model(), [torch.randn(8, 4)], io_spec=renamed_spec).passed


def test_fixed_dimension_against_the_batch_and_the_io_spec(world):
    fixed = _edit(world.onnx(), world.file("fixed.onnx"), _fix_batch(3))
    message = one_line_error(_validate_cli(world, fixed), 10)
    assert "input x axis 0: the ONNX model fixes it to 3, the batch has 1" in message, message
    # at the one batch size it fixes, onnxruntime runs; the I/O spec still says the axis is dynamic
    spec = IOSpec(("x",), ("output",), {"x": {0: "batch"}, "output": {0: "batch"}})
    with pytest.raises(ValidationError, match="input x axis 0: the ONNX model fixes it to 3, the I/O spec makes it dynamic"):
        validate(fixed, world.model(), [torch.randn(9, 4)], batch_sizes=(3,), io_spec=spec)


def test_input_rank_and_dtype_are_checked_before_running(world):
    path = world.onnx()
    with pytest.raises(ValidationError, match=r"input x: the ONNX model declares rank 2 \(\['batch', 4\]\), the batch has rank 3"):
        validate(path, world.model(), [torch.randn(8, 1, 4)])
    with pytest.raises(ValidationError, match="input x: the ONNX model takes float32, the batch is float64"):
        validate(path, world.model().double(), [torch.randn(8, 4, dtype=torch.float64)])


# --- interrupts and the timeout --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_onnxruntime(world, sig, code):
    loop = _huge_loop(world.file("loop.onnx"))
    marker = world.file("marker")
    env = {**os.environ, "ACTSPARSE_TEST_MARKER": str(marker), "PYTHONPATH": str(world.tmp), "OMP_NUM_THREADS": "1"}
    args = ["validate", str(loop), world.user(), "--heldout", str(world.data)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "actsparse_deploy", *args], cwd=world.tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, f"never reached onnxruntime: {proc.returncode}"
            time.sleep(0.05)
        time.sleep(0.5)  # the PyTorch side is done: onnxruntime is in the loop
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    assert world.leftovers("loop.onnx") == []


def test_timeout_fails_validation(world):
    loop = _huge_loop(world.file("loop.onnx"))
    message = one_line_error(_validate_cli(world, loop, "build", "--timeout", "0.4"), 10)
    assert "timed out after 0.4 s" in message and "onnxruntime was stopped" in message, message
    with pytest.raises(ValidationError, match="timed out after 0.2 s"):
        validate(loop, world.model(), [torch.randn(8, 4)], timeout=0.2)
    with pytest.raises(ValidationError, match="timeout must be a positive number of seconds"):
        validate(loop, world.model(), [torch.randn(8, 4)], timeout=0)


def test_timeout_stops_the_cost_check_of_a_quantized_model(world):
    """Before, `validate --max-cost` of a quantized model left --timeout out: a model that runs forever hung it."""
    loop = _huge_loop(world.file("loop.int8.onnx"), quantized=True)
    message = one_line_error(_validate_cli(world, loop, "build", "--max-cost", "cosine=0.1", "--timeout", "0.3"), 10)
    assert "timed out after 0.3 s" in message and "quantized" in message, message


def test_onnxruntime_logs_nothing(world, capfd):
    path = _huge_allocation(world.file("alloc.onnx"))
    message = one_line_error(_validate_cli(world, path), 10)
    assert "onnxruntime failed at batch size 1" in message, message
    assert capfd.readouterr().err == ""  # nothing from onnxruntime's own logger on file descriptor 2


# --- messages and the table -------------------------------------------------------------


def test_output_count_mismatch_said_once(world):
    path = world.onnx("build_two")
    message = one_line_error(_validate_cli(world, path), 10)
    assert message.count("2 outputs") == 1, message
    assert "the ONNX model has 2 outputs, the PyTorch model 1" in message


def test_directory_as_onnx_path(world):
    folder = world.file("folder.onnx")
    folder.mkdir()
    message = one_line_error(_validate_cli(world, folder), 10)
    assert f"{folder} is a directory" in message and "does not exist" not in message, message


def test_table_shows_the_figure_the_verdict_used(world):
    path = world.onnx()
    result = _validate_cli(world, path)
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.stdout and "max abs diff" in result.stdout and "<= atol 1.00e-04" in result.stdout
    assert "rel" not in result.stdout  # rtol 0: the relative difference played no part
    result = _validate_cli(world, path, "build", "--rtol", "0.001")
    assert result.exit_code == 0, result.output
    assert "max rel diff" in result.stdout and "diff / tolerance" in result.stdout


# --- export: a full disk and long names --------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _disk_full_at(where: str, monkeypatch) -> str:
    """Inject ENOSPC where the ONNX is written; returns the exporter that writes there."""
    if where == "torchscript-write":
        from torch.onnx._internal.torchscript_exporter import onnx_proto_utils

        monkeypatch.setattr(onnx_proto_utils, "_export_file", _enospc)
        return "torchscript"
    if where == "dynamo-save":
        from torch.onnx._internal.exporter import _onnx_program

        monkeypatch.setattr(_onnx_program.ONNXProgram, "save", _enospc)
        return "dynamo"
    if where == "save_model":
        monkeypatch.setattr(onnx, "save_model", _enospc)
    elif where == "rename":
        monkeypatch.setattr(os, "replace", _enospc)
    elif where == "staging":
        import tempfile

        monkeypatch.setattr(tempfile, "mkstemp", _enospc)  # the staging folder's lock file, made first
    return "torchscript"


@pytest.mark.parametrize("where", ["torchscript-write", "dynamo-save", "save_model", "rename", "staging"])
def test_export_on_full_disk(world, monkeypatch, where):
    exporter = _disk_full_at(where, monkeypatch)
    out = world.file("model.onnx")
    result = invoke("export", world.user(), "--heldout", world.data, "--exporter", exporter, "-o", out)
    message = one_line_error(result, 11)
    assert "the disk is full" in message and "try --exporter" not in message, message
    assert (f"cannot write to {world.tmp}:" if where == "staging" else f"cannot write {out}:") in message, message
    assert world.leftovers() == []


def _wide(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # 4 KB of weights: over save_model's threshold for external data
    return torch.nn.Sequential(torch.nn.Linear(4, 256), torch.nn.ReLU(), torch.nn.Linear(256, 2))


def test_export_external_data_of_a_tiny_model(world):
    out = world.file("model.onnx")
    result = export_onnx(world.model(), torch.randn(2, 4), out, exporter="torchscript", external_data=True)
    assert not result.external_data and world.leftovers() == ["model.onnx"]  # every tensor under the threshold
    assert validate(out, world.model(), [torch.randn(8, 4)]).passed


def test_export_rename_failure_restores_the_external_data(world, monkeypatch):
    out = world.file("model.onnx")
    assert export_onnx(_wide(0), torch.randn(2, 4), out, exporter="torchscript", external_data=True).external_data
    before = {name: world.file(name).read_bytes() for name in ("model.onnx", "model.onnx.data")}
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == out:
            _enospc()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputError, match="the disk is full"):
        export_onnx(_wide(1), torch.randn(2, 4), out, exporter="torchscript", external_data=True, overwrite=True)
    assert {name: world.file(name).read_bytes() for name in before} == before  # the old pair, intact
    assert world.leftovers() == ["model.onnx", "model.onnx.data"]
    monkeypatch.setattr(os, "replace", real_replace)
    assert validate(out, _wide(0), [torch.randn(8, 4)]).passed


@pytest.mark.parametrize("length", [240, 250, 255])
def test_export_with_a_long_legal_name(world, length):
    name = "m" * (length - len(".onnx")) + ".onnx"
    result = invoke("export", world.user(), "--heldout", world.data, "-o", world.file(name))
    assert result.exit_code == 0, result.output
    assert world.leftovers() == [name]
    assert validate(world.file(name), world.model(), [torch.randn(8, 4)]).passed


@pytest.mark.parametrize("length, external", [(256, False), (300, False), (252, True)])
def test_export_with_a_too_long_name(world, length, external):
    name = "m" * (length - len(".onnx")) + ".onnx"
    too_long = length + len(".data") if external else length
    with pytest.raises(OutputError, match=f"is {too_long} bytes long; the file system allows at most 255 bytes"):
        export_onnx(world.model(), torch.randn(2, 4), world.file(name), exporter="torchscript", external_data=external)
    assert world.leftovers() == []


def test_export_cli_with_a_too_long_name(world):
    name = "m" * 295 + ".onnx"
    result = invoke("export", world.user(), "--heldout", world.data, "-o", world.file(name))
    message = one_line_error(result, 11)
    assert "is 300 bytes long; the file system allows at most 255 bytes" in message, message
    assert world.leftovers() == []
