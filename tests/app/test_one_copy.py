"""``convert`` holds one copy of the weights (issue: real model sizes): the dense model's
outputs are recorded on the data the later stages compare against, and squash then
changes the model in place, so that no stage after squash holds the dense weights
beside the squashed ones. Counted by the live tensors of the layers' weight shape at
each stage (``on_stage``), the figures checked against the dense model as before."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from actsparse_deploy import convert
from actsparse_deploy.app.calibrate import recipe_from_flags

from ..helpers import invoke, user_module

#: a model whose weights have a shape nothing else has: (WIDE, 6)
WIDE = 37
MODULE = f'''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, {WIDE})
        self.fc2 = nn.Linear({WIDE}, 6)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def build():
    torch.manual_seed(0)
    return Net()
'''


@pytest.fixture
def frozen():
    """The objects alive before the test are set aside from the collector: ``_copies`` then scans only what the test
    made (a collection over a whole test session's objects takes a second or more; the weights counted are all new)."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def _copies() -> int:
    """How many tensors of fc1's weight shape hold memory (distinct storages; the exporters' fake and meta tensors hold none)."""
    from torch._subclasses.fake_tensor import FakeTensor

    gc.collect()
    return len({o.untyped_storage().data_ptr() for o in gc.get_objects()
                if isinstance(o, torch.Tensor) and not isinstance(o, FakeTensor) and not o.is_meta and tuple(o.shape) == (WIDE, 6)})


@pytest.fixture
def user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.standard_normal((64, 6)).astype(np.float32))
    np.save(tmp_path / "held.npy", rng.standard_normal((16, 6)).astype(np.float32))
    with user_module(tmp_path, MODULE, monkeypatch) as name:
        yield tmp_path, f"{name}:build"


@pytest.mark.parametrize("mode", ["fold", "prune"])
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_no_stage_after_squash_holds_the_dense_weights(user, frozen, mode: str, quantize: str) -> None:
    tmp, spec = user
    seen: dict[str, int] = {}
    recipe, sparsity = recipe_from_flags(spec, None, 0.5, layers=["fc2"])
    report = convert(spec, tmp / "out", data=str(tmp / "calib.npy"), heldout=str(tmp / "held.npy"), recipe=recipe, sparsity=sparsity,
                     mode=mode, quantize=quantize, threads=1, on_stage=lambda name, total: seen.setdefault(name, _copies()))
    assert report is not None and report.validation is not None and report.validation.passed
    # fold keeps fc1's shape (one copy: the squashed model's); prune cuts fc1's rows (none of the dense shape left);
    # the latency stage runs onnxruntime's sessions only: the PyTorch weights are let go before it
    after = {name: count for name, count in seen.items() if name not in ("calibrating", "recording the dense model", "squashing")}
    assert seen["measuring latency"] == 0 and after and set(after.values()) == {1 if mode == "fold" else 0, 0}, seen
    assert seen["validating"] == (1 if mode == "fold" else 0), seen
    # the cost is still against the dense model: nonzero, and the held-out cosine below 1
    assert report.cost is not None and 0.0 < report.cost.outputs[0]["max_abs_diff"]
    assert report.latency is not None and report.latency.ratio > 0


def test_a_budget_function_keeps_the_dense_model(user) -> None:
    """A user's budget function is called on the dense PyTorch model: it is kept (squash works on a copy)."""
    tmp, spec = user
    module = spec.split(":")[0]
    (tmp / f"{module}_budget.py").write_text("def cost(dense, sparse, batches):\n    return 0.0\n")
    result = invoke("convert", spec, "--data", tmp / "calib.npy", "--heldout", tmp / "held.npy", "--layers", "fc2",
                    "--max-cost", f"{module}_budget:cost=0.5", "-o", tmp / "out", "--json", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["budget"]["heldout_cost"] == 0.0


def test_the_recorded_dense_model_refuses_inputs_it_did_not_see() -> None:
    from actsparse_deploy.nn.recorded import Recorded

    dense = torch.nn.Linear(2, 2)
    recorded = Recorded.of(dense, [[torch.ones(1, 2)], [torch.zeros(3, 2), torch.ones(1, 2)]])
    with pytest.raises(RuntimeError, match="not recorded"):
        recorded(torch.zeros(1, 2))
    assert len(recorded.outputs) == 2  # a batch seen twice ran once
    assert torch.equal(recorded(torch.zeros(3, 2)), dense(torch.zeros(3, 2)))


# --- --max-memory -----------------------------------------------------------------------------------------


def test_a_memory_budget_under_one_copy_in_each_runtime_is_exit_13_before_any_work(tmp_path: Path) -> None:
    from ..helpers import one_line_error

    line = one_line_error(invoke("convert", "digits-mlp", "-o", tmp_path / "out", "--max-memory", "1MB"), 13, "--max-memory 1.00 MB",
                          "PyTorch", "onnxruntime")
    assert "need about" in line and "`calibrate --max-memory` makes the masks" in line  # where a model that does not fit still goes
    assert not (tmp_path / "out").exists()
    one_line_error(invoke("convert", "digits-mlp", "-o", tmp_path / "out", "--max-memory", "lots"), 2, "--max-memory", "lots")


def test_without_a_budget_what_the_machine_has_free_is_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from actsparse_deploy.base import memory

    from ..helpers import one_line_error

    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    one_line_error(invoke("convert", "digits-mlp", "-o", tmp_path / "out"), 13, "this machine has free")


def test_where_two_sessions_do_not_fit_the_latency_check_times_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from actsparse_deploy.base import memory
    from actsparse_deploy.models.loading import load_model
    from actsparse_deploy.nn.modules import weight_bytes

    weights = weight_bytes(load_model("digits-mlp").module)
    monkeypatch.setattr(memory, "resident_memory", lambda: 0)  # the budget in weights alone: validation fits, two sessions do not
    report = convert("digits-mlp", tmp_path / "out", max_memory=int(weights * (memory.VALIDATE + memory.SIDE_BY_SIDE) / 2), threads=1)
    assert report is not None and report.latency is not None and report.latency.one_at_a_time is True
    assert report.latency.ratio > 0
    side = convert("digits-mlp", tmp_path / "side", max_memory="100GB", threads=1)
    assert side is not None and side.latency is not None and side.latency.one_at_a_time is None


def test_where_only_one_copy_fits_validation_runs_in_two_passes_with_the_same_figures(tmp_path: Path, monkeypatch) -> None:
    from actsparse_deploy.base import memory
    from actsparse_deploy.models.loading import load_model
    from actsparse_deploy.nn.modules import weight_bytes

    weights = weight_bytes(load_model("digits-mlp").module)
    monkeypatch.setattr(memory, "resident_memory", lambda: 0)
    side = convert("digits-mlp", tmp_path / "side", max_memory="100GB", threads=1, latency=False)
    apart = convert("digits-mlp", tmp_path / "apart", max_memory=int(weights * (memory.APART + memory.VALIDATE) / 2), threads=1)
    assert side is not None and apart is not None and apart.validation is not None and apart.validation.passed
    assert apart.latency is not None and apart.latency.one_at_a_time is True
    assert apart.memory is not None and apart.memory.apart and apart.memory.weights_bytes == weights and apart.memory.peak_bytes > 0
    assert side.memory is not None and not side.memory.apart and not side.memory.one_at_a_time  # asked for: said
    assert convert("digits-mlp", tmp_path / "plain", threads=1, latency=False).memory is None  # neither asked for nor needed
    assert apart.validation.to_json()["outputs"] == side.validation.to_json()["outputs"]  # the same comparison, in two passes
    assert apart.cost is not None and side.cost is not None
    assert apart.cost.to_json() == side.cost.to_json()  # the sparse model's recorded outputs give the same cost
    from actsparse_deploy.base.errors import MemoryBudgetError

    with pytest.raises(MemoryBudgetError, match="once by PyTorch, then by onnxruntime"):  # not even one copy at a time
        convert("digits-mlp", tmp_path / "none", max_memory=int(weights * memory.APART * 0.9), threads=1)
    assert not (tmp_path / "none").exists()


def test_two_pass_validation_lets_the_weights_go_between_the_passes(tmp_path: Path, frozen) -> None:
    from actsparse_deploy.nn.modules import release_weights
    from actsparse_deploy.onnx.export import export_onnx
    from actsparse_deploy.onnx.validate import validate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, WIDE), torch.nn.ReLU(), torch.nn.Linear(WIDE, 3))
    batches = [torch.randn(8, 6), torch.randn(5, 6)]
    export_onnx(model, batches[0], tmp_path / "m.onnx")
    once = validate(tmp_path / "m.onnx", model, batches)
    released: list[int] = []
    twice = validate(tmp_path / "m.onnx", model, batches, release=lambda: (released.append(_copies()), release_weights(model)))
    assert released == [1] and model[0].weight.is_meta and _copies() == 0
    assert twice.passed and twice.to_json()["outputs"] == once.to_json()["outputs"] and twice.samples == once.samples


def test_validate_in_two_passes_under_max_memory_gives_the_same_report(tmp_path: Path, monkeypatch) -> None:
    import json as _json

    from actsparse_deploy.base import memory
    from actsparse_deploy.models.loading import load_model
    from actsparse_deploy.nn.modules import weight_bytes

    out = tmp_path / "out"
    assert invoke("convert", "digits-mlp", "-o", out, "--no-latency", "--threads", "1").exit_code == 0
    weights = weight_bytes(load_model("digits-mlp").module)
    monkeypatch.setattr(memory, "resident_memory", lambda: 0)
    runs = {}
    for name, budget in (("side", "100GB"), ("apart", str(int(weights * (memory.APART + memory.VALIDATE) / 2)))):
        result = invoke("validate", out / "model.onnx", "digits-mlp", "--masks", out / "masks.safetensors", "--json",
                        "--max-memory", budget, "--threads", "1")
        assert result.exit_code == 0, result.output
        runs[name] = _json.loads(result.stdout)
    assert runs["apart"]["validation"]["outputs"] == runs["side"]["validation"]["outputs"]
    assert runs["apart"]["cost"] == runs["side"]["cost"]
    from actsparse_deploy.app import commands

    from ..helpers import one_line_error

    def never(*args, **kwargs):
        raise AssertionError("squash ran before the memory check")

    monkeypatch.setattr(commands, "squash_workload", never)  # the check comes once the model loads, before any work
    one_line_error(invoke("validate", out / "model.onnx", "digits-mlp", "--masks", out / "masks.safetensors", "--max-memory", "1kB"),
                   13, "--max-memory", "to validate")


def test_a_float16_export_counts_onnxruntime_holding_its_weights_as_float32(tmp_path: Path, monkeypatch) -> None:
    """onnxruntime's CPU provider keeps a float16 model's weights cast to float32: twice the bytes PyTorch holds.
    A budget that fits float16 weights counted once on each side does not fit that: validation runs in two passes."""
    from actsparse_deploy.base import memory
    from actsparse_deploy.models.loading import load_model
    from actsparse_deploy.nn.modules import weight_bytes

    half = weight_bytes(load_model("digits-mlp").module) // 2  # the weights as the float16 run holds them
    monkeypatch.setattr(memory, "resident_memory", lambda: 0)
    budget = int(half * 2.5)  # over VALIDATE (2.2) float16 weights, under one float16 copy and one float32 copy (3.4)
    report = convert("digits-mlp", tmp_path / "half", dtype="float16", max_memory=budget, threads=1, latency=False)
    assert report is not None and report.export.dtype == "float16" and report.validation is not None and report.validation.passed
    assert report.memory is not None and report.memory.weights_bytes == half and report.memory.apart
    full = convert("digits-mlp", tmp_path / "full", max_memory=int(half * 2 * 2.5), threads=1, latency=False)  # float32: fits
    assert full is not None and full.memory is not None and not full.memory.apart


def test_the_latency_check_times_one_session_at_a_time_where_what_the_stages_left_held_is_over_the_budget(tmp_path: Path,
                                                                                                          monkeypatch) -> None:
    """The plan made at load counts the weights; what the stages before the latency check leave held (a decoder's
    cache validation, an exporter's leftovers) is known only then: two sessions over the budget by then, one at a time."""
    from actsparse_deploy.base import memory
    from actsparse_deploy.models.loading import load_model
    from actsparse_deploy.nn.modules import weight_bytes

    weights = weight_bytes(load_model("digits-mlp").module)
    budget = weights * 10
    held = {"now": 0}
    monkeypatch.setattr(memory, "resident_memory", lambda: held["now"])

    def on_stage(stage: str, total: int | None) -> None:
        if stage == "measuring cost":  # the stage before the latency check: the process holds most of the budget from here on
            held["now"] = budget - weights

    report = convert("digits-mlp", tmp_path / "late", max_memory=budget, threads=1, on_stage=on_stage)
    assert report is not None and report.latency is not None and report.latency.one_at_a_time is True
    assert report.memory is not None and report.memory.one_at_a_time and not report.memory.apart
    from actsparse_deploy.app.render import convert_summary, files_line

    said = " ".join(str(line) for line in convert_summary(report))
    assert "one model at a time to keep within the memory budget" in said and "peak memory" in files_line(report)
    held["now"] = 0
    roomy = convert("digits-mlp", tmp_path / "roomy", max_memory=budget, threads=1)
    assert roomy is not None and roomy.latency is not None and not roomy.latency.one_at_a_time
    assert "one model at a time" not in " ".join(str(line) for line in convert_summary(roomy))


def test_validate_of_a_quantized_model_keeps_within_max_memory(tmp_path: Path, monkeypatch) -> None:
    """Before, ``validate --max-cost`` of an int8 model read ``--max-memory`` and never used it: a budget the dense
    model cannot fit in ran anyway. Now it is planned as a float model's validation is: over the budget even in two
    passes, exit 13 before any work; between, the dense (and the squashed float) outputs are recorded, the weights
    let go, and onnxruntime runs alone, to the same figures."""
    from actsparse_deploy.app import commands
    from actsparse_deploy.base import memory
    from actsparse_deploy.models.loading import load_model
    from actsparse_deploy.nn.modules import weight_bytes

    from ..helpers import one_line_error

    out = tmp_path / "out"
    assert invoke("convert", "digits-mlp", "-o", out, "--no-latency", "--threads", "1", "--quantize", "int8").exit_code == 0
    weights = weight_bytes(load_model("digits-mlp").module)
    monkeypatch.setattr(memory, "resident_memory", lambda: 0)
    released = []
    real = commands.release_weights
    monkeypatch.setattr(commands, "release_weights", lambda *models: (released.append(len(models)), real(*models)))
    runs = {}
    for name, budget in (("side", "100GB"), ("apart", str(int(weights * (memory.APART + memory.VALIDATE) / 2)))):
        result = invoke("validate", out / "model.onnx", "digits-mlp", "--masks", out / "masks.safetensors", "--json",
                        "--max-cost", "cosine=0.9", "--max-memory", budget, "--threads", "1")
        assert result.exit_code == 0, result.output
        runs[name] = json.loads(result.stdout)["quantized"]
    assert released == [1]  # the second run only
    assert runs["apart"] == runs["side"] and runs["side"]["float_source"] is not None

    def never(*args, **kwargs):
        raise AssertionError("the quantized model was measured before the memory check")

    monkeypatch.setattr(commands, "check_quantized", never)
    one_line_error(invoke("validate", out / "model.onnx", "digits-mlp", "--max-cost", "cosine=0.9", "--max-memory", "1kB"),
                   13, "--max-memory", "to validate")
