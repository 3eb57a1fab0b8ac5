"""The batch union in one module (batches.py), the one output comparator
(compare.py), the one accuracy (metrics.py), the one disk-full message
(files.os_reason), the one recipe loader (recipe.resolve_recipe) and convert's
checked options (pipeline.ConvertOptions)."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch
from torch import nn

from actsparse_deploy.app.pipeline import ConvertOptions, convert
from actsparse_deploy.base.errors import (
    DataError,
    ExportError,
    RecipeError,
    SquashError,
    UsageError,
    ValidationError,
)
from actsparse_deploy.base.files import os_reason
from actsparse_deploy.calibration.recipe import resolve_recipe
from actsparse_deploy.data import batches as B
from actsparse_deploy.data.compare import OutputDiff, Tolerance, compare_outputs
from actsparse_deploy.data.iospec import IOSpec
from actsparse_deploy.models.zoo import builtin_recipe_path
from actsparse_deploy.onnx.export import export_onnx
from actsparse_deploy.onnx.metrics import accuracy


class Two(nn.Module):
    """``model(a, b)``: logits of three classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(5, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([a, b], dim=-1))


def _forms() -> dict[str, B.Batch]:
    a, b = torch.arange(12.0).reshape(4, 3), torch.ones(4, 2)
    return {"tensor": torch.cat([a, b], -1), "tuple": (a, b), "list": [a, b], "dict": {"a": a, "b": b}}


# --- batches.py ------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["tuple", "list", "dict"])
def test_run_batch_calls_the_model_by_the_batch_form(form):
    model = Two()
    batch = _forms()[form]
    want = model(*_forms()["tuple"])
    torch.testing.assert_close(B.run_batch(model, batch), want)
    args, kwargs = B.call_args(batch)
    assert (len(args), sorted(kwargs)) == ((0, ["a", "b"]) if form == "dict" else (2, []))


def test_size_description_names_and_positional_arguments():
    forms = _forms()
    assert {name: B.batch_size(b) for name, b in forms.items()} == dict.fromkeys(forms, 4)
    assert B.describe_batch(forms["dict"]) == "a float32[4, 3], b float32[4, 2]"
    assert B.describe_batch(forms["tuple"]) == "float32[4, 3], float32[4, 2]"
    assert B.input_names(forms["tensor"]) == ("input",)
    assert B.input_names(forms["list"]) == ("input_0", "input_1")
    assert B.input_names(forms["dict"]) == ("a", "b")
    b_first = B.positional(forms["dict"], ("b", "a"))
    assert [tuple(t.shape) for t in b_first] == [(4, 2), (4, 3)]
    assert B.as_positional([forms["dict"], forms["tensor"]], ("b", "a"))[0][0] is forms["dict"]["b"]
    assert B.named_tensors(forms["tuple"], ("a", "b"))["b"] is forms["tuple"][1]
    assert B.total_samples([forms["dict"], forms["tensor"][:1]]) == 5
    assert B.total_samples(iter([forms["dict"]])) is None  # a one-shot iterable is not used up


def test_slicing_and_rebatching_keep_the_form_and_other_axes():
    seq = {"ids": torch.arange(7 * 5).reshape(7, 5), "mask": torch.ones(7, 5)}
    pieces = B.resize_batches([seq, {"ids": torch.zeros(2, 9, dtype=torch.int64), "mask": torch.ones(2, 9)}], 3)
    assert [B.describe_batch(p) for p in pieces] == ["ids int64[3, 5], mask float32[3, 5]"] * 2
    assert torch.equal(pieces[1]["ids"], seq["ids"][3:6])
    assert len(B.resize_batches([seq], 3, max_samples=4)) == 1
    assert [B.batch_size(p) for p in B.split_batch((torch.ones(7, 2), torch.ones(7)), 3)] == [3, 3, 1]
    assert isinstance(B.slice_batch([torch.ones(4), torch.ones(4)], 0, 2), tuple)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: B.run_batch(Two(), "text"), DataError, "a batch must be a tensor, a tuple of tensors or a dict of tensors, not str"),
        (lambda: B.batch_size(()), DataError, "at least one tensor with a batch axis"),
        (lambda: B.batch_size(torch.tensor(1.0)), DataError, "at least one tensor with a batch axis"),
        (lambda: B.named_tensors((torch.ones(2),), ("a", "b")), DataError, "holds 1 input tensor(s) but the I/O spec names 2 (a, b)"),
        (lambda: B.flatten_outputs({"x": 3}), ExportError, "model output of type int"),
    ],
    ids=["not-a-batch", "empty-tuple", "scalar", "names-count", "output-type"],
)
def test_a_batch_of_the_wrong_form_is_named(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)


def test_flatten_outputs_skips_none_and_keeps_order():
    a, b, c = torch.ones(1), torch.zeros(1), torch.full((1,), 2.0)
    assert B.flatten_outputs({"x": a, "y": (None, [b, c])}) == (a, b, c)


def test_the_old_import_paths_still_work():
    from actsparse_deploy.calibration.calibrate import batch_size, describe_batch, run_batch
    from actsparse_deploy.data.iospec import positional_inputs
    from actsparse_deploy.onnx.export import flatten_outputs
    from actsparse_deploy.onnx.validate import resize_batches

    assert (batch_size, describe_batch, run_batch, flatten_outputs, resize_batches) == (
        B.batch_size, B.describe_batch, B.run_batch, B.flatten_outputs, B.resize_batches
    )
    assert positional_inputs({"a": torch.ones(1), "b": torch.zeros(1)}, ("b", "a"))[0].item() == 0.0


# --- compare.py --------------------------------------------------------------------------------


def test_the_comparator_measures_and_judges():
    want = torch.tensor([[1.0, -2.0], [4.0, 0.5]])
    got = want + torch.tensor([[0.0, 1e-3], [0.0, 0.0]])
    diffs, problems = compare_outputs([got], [want], Tolerance(atol=1e-2))
    assert problems == [] and diffs[0].max_abs == pytest.approx(1e-3, rel=1e-4)
    assert diffs[0].max_tolerance_used == pytest.approx(0.1, rel=1e-3)
    _, problems = compare_outputs([got], [want], Tolerance(atol=1e-4), sides=("ONNX", "PyTorch"))
    assert problems == ["output 0: max abs diff 0.001, max rel diff 0.0005 over tolerance atol 0.0001 + rtol 0 * |PyTorch|"]
    # atol scaled by the output's magnitude (prune's check): 1e-4 * 4 covers 1e-3? no; 1e-3 * 4 does
    assert compare_outputs([got], [want], Tolerance(atol=1e-3, scale_atol=True))[1] == []
    assert compare_outputs([got, got], [want], Tolerance(atol=1))[1] == ["got has 2 outputs, want 1"]


def test_integer_outputs_must_be_equal_whatever_the_tolerance():
    want = torch.tensor([20000, 3])
    _, problems = compare_outputs([want + torch.tensor([1, 0])], [want], Tolerance(atol=1e-5, rtol=1e-4, scale_atol=True))
    assert problems and "max abs diff 1" in problems[0]
    assert compare_outputs([want.clone()], [want], Tolerance(atol=0))[1] == []


def test_non_finite_values_fail_unless_both_sides_agree_where_asked():
    want = torch.tensor([1.0, float("nan"), float("inf")])
    diff = OutputDiff("y")
    diff.update(want.clone(), want, Tolerance(atol=1e-3))
    assert diff.non_finite == {"NaN in the ONNX output": 1, "Inf in the ONNX output": 1, "NaN in the PyTorch output": 1,
                               "Inf in the PyTorch output": 1}
    assert compare_outputs([want.clone()], [want], Tolerance(atol=1e-3, nan_equal=True))[1] == []
    _, problems = compare_outputs([torch.tensor([1.0, 0.0, float("inf")])], [want], Tolerance(atol=1e-3, nan_equal=True))
    assert problems and "NaN in the want output (1 of 3 values)" in problems[0]


def test_shape_and_dtype_mismatches_are_recorded_not_compared():
    diff = OutputDiff("y")
    diff.compare(np.zeros((2, 3), np.float32), torch.zeros(2, 4, dtype=torch.float64), Tolerance(atol=1), where="size 2: ")
    assert diff.shape_errors == ["size 2: ONNX [2, 3] vs PyTorch [2, 4]"]
    assert diff.dtype_error == "ONNX float32 vs PyTorch float64" and diff.values == 0 and diff.failed


@pytest.mark.parametrize("bad", [{"atol": -1.0}, {"atol": float("nan")}, {"atol": 0.0, "rtol": -0.5}])
def test_a_tolerance_must_be_a_non_negative_number(bad):
    with pytest.raises(ValueError, match="must be a non-negative number"):
        Tolerance(**bad)


# --- metrics.py: one accuracy, for PyTorch and ONNX models -------------------------------------


def test_accuracy_of_a_two_input_onnx_model_on_tuple_batches(tmp_path):
    """Tuple batches are named by the model's I/O spec: the ONNX accuracy feeds
    them as ``a`` / ``b`` (not ``input_0`` / ``input_1``) and agrees with PyTorch."""
    model = Two().eval()
    spec = IOSpec(("a", "b"), ("logits",), {"a": {0: "batch"}, "b": {0: "batch"}, "logits": {0: "batch"}})
    path = tmp_path / "two.onnx"
    export_onnx(model, (torch.randn(2, 3), torch.randn(2, 2)), path, exporter="torchscript", io_spec=spec)
    torch.manual_seed(1)
    data = [(torch.randn(5, 3), torch.randn(5, 2)) for _ in range(3)]
    labels = torch.cat([model(*b).argmax(-1) for b in data])
    labels[0] = (labels[0] + 1) % 3  # one of 15 wrong
    assert accuracy(model, data, labels) == pytest.approx(14 / 15)
    assert accuracy(path, data, labels, spec) == pytest.approx(14 / 15)
    with pytest.raises(DataError, match="ONNX model's first output gives predictions of shape \\[15\\] for 14 labels"):
        accuracy(path, data, labels[1:], spec)


def test_accuracy_restores_the_training_flags():
    model = Two().train()
    accuracy(model, [(torch.randn(2, 3), torch.randn(2, 2))], torch.zeros(2, dtype=torch.int64))
    assert model.training


# --- files.os_reason, recipe.resolve_recipe, pipeline.ConvertOptions ---------------------------


def test_one_disk_full_message():
    assert os_reason(OSError(errno.ENOSPC, "No space left on device")) == "the disk is full"
    assert os_reason(OSError(errno.EACCES, "Permission denied")) == "Permission denied"
    assert os_reason(RuntimeError("exporter says no")) == "exporter says no"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"recipe": "r.toml", "layers": ["fc*"], "sparsity": 0.5}, "`recipe` cannot be combined with `layers` or `layer_types`"),
        ({"layers": ["fc*"]}, "`layers` / `layer_types` need `sparsity` or `threshold`"),
        ({"threshold": 0.1}, "`threshold`, `structured` and `aggregate` describe a recipe from `layers`"),
        ({}, "'mine:build' has no built-in recipe: pass `recipe` (a recipe file), or `layers` with `sparsity`"),
    ],
)
def test_the_recipe_loader_names_parameters(kwargs, message):
    with pytest.raises(RecipeError) as info:
        resolve_recipe("mine:build", None, **kwargs)
    assert message in str(info.value) and "--" not in str(info.value)


def test_the_recipe_loader_applies_sparsity_to_the_builtin_recipe():
    recipe = resolve_recipe("digits-cnn", builtin_recipe_path("digits-cnn"), sparsity=0.3)
    assert ("sparsity_level", 0.3) in recipe.defaults.sparse_config
    assert resolve_recipe("x:y", None, layer_types=["Linear"], threshold=0.2, structured=True).defaults.mask_fn.name == "threshold"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"mode": "squeeze"}, SquashError, "unknown squash mode 'squeeze'; known: auto, mul, fold, prune"),
        ({"exporter": "tf"}, ExportError, "unknown exporter 'tf'; known: auto, dynamo, torchscript"),
        ({"atol": -1.0}, ValidationError, "tolerances must be non-negative numbers"),
        ({"rtol": float("nan")}, ValidationError, "tolerances must be non-negative numbers"),
        ({"timeout": 0}, ValidationError, "timeout must be a positive number of seconds"),
        ({"batch_size": 0}, DataError, "batch size must be a positive integer"),
        ({"opset": -3}, UsageError, "opset -3 is not one the exporters support"),
    ],
)
def test_convert_options_are_checked_before_any_work(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        ConvertOptions(**kwargs)
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        convert("digits-mlp", out, **kwargs)
    assert not out.exists()  # refused before the output directory was made


def test_convert_options_are_frozen():
    options = ConvertOptions(mode="fold")
    with pytest.raises(AttributeError):
        options.mode = "prune"  # type: ignore[misc]
