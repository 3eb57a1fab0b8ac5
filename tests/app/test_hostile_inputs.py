"""Hostile masks files, recipes and models: each is refused up front with the
documented exit code and one line naming the problem, and nothing is left behind.

Each case builds its input here; files are real, the CLI is the real typer app.
The one mocked fault is a full disk (it cannot be caused without privileges).
"""

from __future__ import annotations

import copy
import errno
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from actsparse_deploy import ActivationSparsifier, Recipe, calibrate
from actsparse_deploy.bake.squash import squash
from actsparse_deploy.base.errors import CalibrationError, ConfigError, MaskError, RecipeError, WeightsError
from actsparse_deploy.calibration.masks import LayerMask, Masks

from ..helpers import UserFolder, invoke, one_line_error, user_module, user_module_source

USER_MODULE = user_module_source(extra='''
def nan_weights():
    model = build()
    with torch.no_grad():
        model.fc1.weight[2, 1] = float("nan")
    return model


def inf_buffer():
    model = build()
    model.fc1.register_buffer("scale", torch.tensor([1.0, float("nan")]))
    return model
''')


class World(UserFolder):
    def data(self, name: str = "calib.npy") -> Path:
        path = self.file(name)
        if not path.exists():
            np.save(path, np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32))
        return path


@pytest.fixture
def world(tmp_path, monkeypatch):
    with user_module(tmp_path, USER_MODULE, monkeypatch) as name:
        yield World(tmp_path, name)


def _refused(w: World, args: list[Any], code: int, message: str) -> None:
    """The CLI exits with ``code``, one line on stderr holding ``message``, no
    traceback, no new file (except the user module's __pycache__)."""
    before = {p.name for p in w.tmp.iterdir()}
    one_line_error(invoke(*args), code, message)
    after = {p.name for p in w.tmp.iterdir()}
    assert after - before <= {"__pycache__"}, f"left {after - before}"


# --- masks files ---------------------------------------------------------------------


def _good_masks(w: World, per_feature: bool = False) -> Path:
    """A valid masks file for the user model's fc2 (8 input features)."""
    if per_feature:
        lm = LayerMask(mask=(torch.zeros(1), torch.ones(1)), features=(1, 3), feature_dim=1, input_shape=(8,))
    else:
        lm = LayerMask(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]), input_shape=(8,))
    path = w.file("good-per-feature.safetensors" if per_feature else "good.safetensors")
    Masks({"fc2": lm}, num_samples=20, num_batches=1).save(path)
    return path


def _edited(
    w: World,
    per_feature: bool = False,
    tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda t: t,
    meta: Callable[[dict[str, str]], dict[str, str]] = lambda m: m,
    rows: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
) -> Path:
    """A good masks file with its tensors and / or metadata edited (by hand, as an attacker would)."""
    source = _good_masks(w, per_feature)
    with safe_open(str(source), "pt") as f:
        metadata = dict(f.metadata())
    if rows is not None:
        metadata["layers"] = json.dumps(rows(json.loads(metadata["layers"])))
    path = w.file("hostile.safetensors")
    save_file(tensors(load_file(str(source))), str(path), metadata=meta(metadata))
    source.unlink()
    return path


def _set_row(**changes: Any) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    return lambda rows: [{**rows[0], **changes}]


def _mask_values(values: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda t: {"fc2": values}


def _deep_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


MASKS_CASES: dict[str, tuple[Callable[[World], Path], str]] = {
    "nan values": (lambda w: _edited(w, tensors=_mask_values(torch.tensor([1.0, float("nan")] * 4))), "mask of layer 'fc2' holds NaN or Inf"),
    "inf values": (lambda w: _edited(w, tensors=_mask_values(torch.tensor([1.0, float("-inf")] * 4))), "mask of layer 'fc2' holds NaN or Inf"),
    "complex values": (lambda w: _edited(w, tensors=_mask_values(torch.ones(8, dtype=torch.complex64))), "mask of layer 'fc2' is complex64"),
    "integer values": (lambda w: _edited(w, tensors=_mask_values(torch.ones(8, dtype=torch.int64))), "mask of layer 'fc2' is int64"),
    "huge input_shape": (lambda w: _edited(w, True, rows=_set_row(input_shape=[10**12])), "input shape [1000000000000]"),
    "features not integers": (lambda w: _edited(w, True, rows=_set_row(features=["x", "y"])), "features of layer 'fc2' must be"),
    "features out of range": (lambda w: _edited(w, True, rows=_set_row(features=[1, 500])), "feature 500 of layer 'fc2' is out of range"),
    "features empty": (lambda w: _edited(w, True, rows=_set_row(features=[], mask_shape=[])), "features of layer 'fc2' must be"),
    "features negative": (lambda w: _edited(w, True, rows=_set_row(features=[-1, -128])), "feature -1 of layer 'fc2' is negative"),
    "features duplicated": (lambda w: _edited(w, True, rows=_set_row(features=[3, 3])), "feature 3 of layer 'fc2' is given twice"),
    "feature_dim the batch axis": (lambda w: _edited(w, True, rows=_set_row(feature_dim=0)), "feature_dim 0 of layer 'fc2'"),
    "feature_dim not an integer": (lambda w: _edited(w, True, rows=_set_row(feature_dim="1")), "feature_dim of layer 'fc2' must be"),
    "input_shape not integers": (lambda w: _edited(w, rows=_set_row(input_shape=["8"])), "input shape of layer 'fc2' must be"),
    "format_version negative": (lambda w: _edited(w, meta=lambda m: {**m, "format_version": "-7"}), "format_version '-7' is not a positive integer"),
    "format_version fraction": (lambda w: _edited(w, meta=lambda m: {**m, "format_version": "1.5"}), "format_version '1.5' is not a positive integer"),
    "format_version zero": (lambda w: _edited(w, meta=lambda m: {**m, "format_version": "0"}), "format_version '0' is not a positive integer"),
    "deeply nested layers json": (lambda w: _edited(w, meta=lambda m: {**m, "layers": _deep_json()}), "nested too deeply"),
    "deeply nested extra json": (lambda w: _edited(w, meta=lambda m: {**m, "extra": _deep_json()}), "nested too deeply"),
    "deeply nested recipe toml": (lambda w: _edited(w, meta=lambda m: {**m, "recipe": "a = " + "[" * 100_000 + "]" * 100_000}), "nested too deeply"),
    "recipe in masks invalid": (lambda w: _edited(w, meta=lambda m: {**m, "recipe": "[defaults\n"}), "is not valid TOML"),
}


@pytest.mark.parametrize("case", list(MASKS_CASES))
def test_hostile_masks_file_refused_by_squash(case, world):
    build, message = MASKS_CASES[case]
    path = build(world)
    _refused(world, ["squash", world.user(), "--masks", path, "--heldout", world.data(), "-o", world.file("m.pt2")], 8, message)


@pytest.mark.parametrize("case", ["nan values", "inf values", "complex values", "features negative", "huge input_shape"])
def test_hostile_masks_file_refused_by_export_and_inspect(case, world):
    build, message = MASKS_CASES[case]
    path = build(world)
    _refused(world, ["export", world.user(), "--masks", path, "--heldout", world.data(), "-o", world.file("m.onnx")], 8, message)
    _refused(world, ["inspect", path], 8, message)


def test_good_masks_files_still_load(world):
    """The edits above are the only thing wrong: the untouched files work."""
    for per_feature in (False, True):
        path = _good_masks(world, per_feature)
        result = invoke("squash", world.user(), "--masks", path, "--heldout", world.data(), "-o", world.file("m.pt2"), "--overwrite")
        assert result.exit_code == 0, result.output
    bool_mask = _edited(world, tensors=_mask_values(torch.tensor([True, False] * 4)))
    assert Masks.load(bool_mask)["fc2"].sparsity == 0.5


def test_mask_values_checked_in_python_too():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(MaskError, match="mask of layer '0' holds NaN or Inf"):
        squash(model, Masks({"0": LayerMask(torch.tensor([1.0, float("nan"), 1.0, 1.0]))}))
    with pytest.raises(MaskError, match="mask of layer 'fc' is int64"):
        Masks({"fc": LayerMask(torch.ones(4, dtype=torch.int64))})
    with pytest.raises(MaskError, match="feature 7 of layer 'fc' is out of range"):
        Masks({"fc": LayerMask(mask=(torch.ones(1),), features=(7,), feature_dim=1, input_shape=(4,))})
    good = Masks({"0": LayerMask(torch.ones(4))})
    good["0"].mask[1] = float("inf")  # changed after construction: squash checks again
    with pytest.raises(MaskError, match="mask of layer '0' holds NaN or Inf"):
        squash(model, good)


def test_declared_input_shape_checked_against_the_model():
    """A per-feature mask whose declared input size is not the layer's: refused before
    any tensor of that size is made."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    lm = LayerMask(mask=(torch.zeros(1),), features=(1,), feature_dim=1, input_shape=(40_000_000,))
    with pytest.raises(MaskError, match="input shape \\[40000000\\] .* takes 4 input features"):
        squash(model, Masks({"2": lm}))


# --- masks from a live sparsifier ---------------------------------------------------------


def _stepped(mask_fn: Callable[..., torch.Tensor]) -> tuple[nn.Module, ActivationSparsifier]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    sp = ActivationSparsifier(model, aggregate_fn=lambda a, x: a + x, reduce_fn=lambda d: d.mean(0), mask_fn=mask_fn)
    sp.register_layer(model[2])
    with torch.no_grad():
        model(torch.randn(3, 4))
    sp.step()
    sp.squash_mask(attach_sparsify_hook=False)
    return model, sp


@pytest.mark.parametrize(
    "mask_fn, error, message",
    [
        (lambda d: d / 0.0 * 0.0, CalibrationError, "mask of layer '2' holds NaN or Inf"),
        (lambda d: torch.ones(5), CalibrationError, "does not broadcast against the layer's input"),
        (lambda d: torch.ones(6, dtype=torch.complex64), CalibrationError, "mask of layer '2' is complex64"),
    ],
    ids=["nan", "wrong shape", "complex"],
)
def test_from_sparsifier_checks_like_calibration(mask_fn, error, message):
    model, sp = _stepped(mask_fn)
    with pytest.raises(error, match=message):
        Masks.from_sparsifier(sp)
    with pytest.raises(error, match=message):
        squash(model, sp)


def test_from_sparsifier_keeps_good_masks():
    model, sp = _stepped(lambda d: (d.abs() > 0.1).float())
    masks = Masks.from_sparsifier(sp)
    torch.testing.assert_close(masks["2"].mask, sp.get_mask("2"))
    assert masks["2"].input_shape == (6,)


# --- recipes -------------------------------------------------------------------------


RECIPE_HEAD = '[defaults]\nsparse_config = { sparsity_level = 0.5 }\n[[layers]]\nname = "fc2"\n'

RECIPE_CASES: dict[str, tuple[str, str]] = {
    "deeply nested toml": ("x = " + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
    "deeply nested inline tables": ("x = " + "{a = " * 50_000 + "1" + "}" * 50_000 + "\n", "nested too deeply"),
    "axis a string": ('[defaults]\nreduce_fn = { name = "feature_mean", axis = "0" }\nsparse_config = { sparsity_level = 0.5 }\n[[layers]]\nname = "fc2"\n', "'feature_mean' parameter axis must be an integer, got '0'"),
    "axis a float": ('[defaults]\nreduce_fn = { name = "feature_mean", axis = 0.5 }\nsparse_config = { sparsity_level = 0.5 }\n[[layers]]\nname = "fc2"\n', "'feature_mean' parameter axis must be an integer, got 0.5"),
    "features negative": (RECIPE_HEAD + "features = [-1, -128]\nfeature_dim = 1\n", "features must not be negative, got -1"),
    "features duplicated": (RECIPE_HEAD + "features = [1, 2, 1]\nfeature_dim = 1\n", "feature 1 is given twice"),
    "features many duplicates": (RECIPE_HEAD + "features = [" + ", ".join(["0"] * 200_000) + "]\nfeature_dim = 1\n", "feature 0 is given twice"),
    "features empty": (RECIPE_HEAD + "features = []\nfeature_dim = 1\n", "features must be a non-empty list"),
    "features out of range": (RECIPE_HEAD + "features = [1, 500]\nfeature_dim = 1\n", "feature 500 of layer 'fc2' is out of range"),
    "feature_dim the batch axis": (RECIPE_HEAD + "features = [1]\nfeature_dim = 0\n", "feature_dim 0 is the batch axis"),
    "block shape float": ('[defaults]\nmask_fn = "block"\nsparse_config = { sparsity_level = 0.5, sparse_block_shape = [1e12] }\n[[layers]]\nname = "fc2"\n', "sparse_block_shape must be positive integers"),
    "block shape huge": ('[defaults]\nmask_fn = "block"\nsparse_config = { sparsity_level = 0.5, sparse_block_shape = [1000000000000] }\n[[layers]]\nname = "fc2"\n', "layer 'fc2': sparse_block_shape [1000000000000] is larger than"),
    "block shape negative": ('[defaults]\nmask_fn = "block"\nsparse_config = { sparsity_level = 0.5, sparse_block_shape = [-4] }\n[[layers]]\nname = "fc2"\n', "sparse_block_shape must be positive integers"),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_hostile_recipe_refused(case, world):
    text, message = RECIPE_CASES[case]
    args = ["calibrate", world.user(), "--data", world.data(), "--recipe", world.recipe(text), "-o", world.file("m.safetensors")]
    _refused(world, args, 3, message)


def test_recipe_checks_in_python():
    with pytest.raises(RecipeError, match="feature_dim 0 is the batch axis"):
        Recipe.from_dict({"defaults": {"features": [1], "feature_dim": 0}, "layers": [{"name": "x"}]})
    with pytest.raises(RecipeError, match="nested too deeply"):
        Recipe.from_toml("x = " + "[" * 100_000 + "]" * 100_000)
    from actsparse_deploy.calibration.recipe import LayerRule, LayerSettings

    for settings, message in (
        (LayerSettings(features=(1,), feature_dim=0), "feature_dim 0 is the batch axis"),
        (LayerSettings(features=(2, 2), feature_dim=1), "feature 2 is given twice"),
        (LayerSettings(features=(-3,), feature_dim=1), "must not be negative, got -3"),
        (LayerSettings(features=(), feature_dim=1), "non-empty list"),
    ):
        with pytest.raises(RecipeError, match=message):
            Recipe(layers=(LayerRule(name=("fc",), settings=settings),), defaults=LayerSettings(sparse_config=(("sparsity_level", 0.5),)))


def test_sparsifier_refuses_bad_features_at_first_forward():
    torch.manual_seed(0)
    for features, feature_dim, message in (([-1], 1, "negative"), ([0], 0, "batch axis")):
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        sp = ActivationSparsifier(model, "sum_abs", "mean", "topk", sparsity_level=0.5)
        sp.register_layer(model[2], features=features, feature_dim=feature_dim)
        with pytest.raises(ConfigError, match=message), torch.no_grad():
            model(torch.randn(3, 4))


# --- the model's own weights -------------------------------------------------------------


def test_nan_weights_blamed_on_the_weights(world):
    args = ["calibrate", world.user("nan_weights"), "--data", world.data(), "--recipe", world.recipe(RECIPE_HEAD), "-o", world.file("m.safetensors")]
    _refused(world, args, 5, "parameter 'fc1.weight' of the model holds NaN or Inf (1 of 32 values)")
    args[1] = world.user("inf_buffer")
    _refused(world, args, 5, "buffer 'fc1.scale' of the model holds NaN")


def test_nan_weights_in_python():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].bias[1] = float("inf")
    with pytest.raises(WeightsError, match="parameter '0.bias'"):
        calibrate(model, Recipe.simple(layers=["2"], sparsity=0.5), [torch.randn(3, 4)])


def test_inf_buffers_are_allowed():
    """Attention masks are often buffers full of -inf: only NaN is refused there."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model.register_buffer("causal", torch.full((2, 2), float("-inf")))
    masks = calibrate(model, Recipe.simple(layers=["2"], sparsity=0.5), [torch.randn(3, 4)])
    assert masks["2"].sparsity == 0.5


# --- a full disk ---------------------------------------------------------------------------


class _FullDisk:
    """``open()`` that gives, for files in ``directory`` opened for writing, a file
    whose writes fail with ENOSPC, as on a full disk."""

    def __init__(self, directory: Path) -> None:
        import builtins

        self.directory = str(directory)
        self.real_open = builtins.open

    def __call__(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = self.real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, Path)) and str(file).startswith(self.directory) and "w" in mode:
            return _NoSpace(handle)
        return handle


class _NoSpace:
    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def write(self, data: Any) -> int:
        if len(data) > 16:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.handle.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def __enter__(self) -> _NoSpace:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.close()


def _native_writes_fail(directory: Path):
    """safetensors' own (Rust) writer failing as it does on a full disk."""
    from safetensors import SafetensorError

    def save_file(tensors: Any, filename: Any, metadata: Any = None) -> None:
        if str(filename).startswith(str(directory)):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
        raise AssertionError("unexpected save")

    return save_file


@pytest.fixture
def full_disk(world, monkeypatch):
    import builtins

    import safetensors.torch

    out = world.tmp / "out"
    out.mkdir()
    monkeypatch.setattr(builtins, "open", _FullDisk(out))
    native = _native_writes_fail(out)
    monkeypatch.setattr(safetensors.torch, "save_file", native)
    import actsparse_deploy.base.serialize as serialize

    if getattr(serialize, "save_file", None) is not None and serialize.save_file.__module__.startswith("safetensors"):
        monkeypatch.setattr(serialize, "save_file", native)  # the code before the fix wrote through it
    return out


def test_disk_full_during_calibrate(world, full_disk):
    target = full_disk / "masks.safetensors"
    args = ["calibrate", world.user(), "--data", world.data(), "--recipe", world.recipe(RECIPE_HEAD), "-o", target]
    one_line_error(invoke(*args), 11, "the disk is full", str(target))
    assert list(full_disk.iterdir()) == []


def test_disk_full_saving_sparsifier_state(full_disk):
    from actsparse_deploy.base.errors import OutputError

    model = nn.Sequential(nn.Linear(4, 4))
    sp = ActivationSparsifier(model, "sum_abs", "mean", "topk", sparsity_level=0.5)
    sp.register_layer(model[0])
    with torch.no_grad():
        model(torch.randn(2, 4))
    with pytest.raises(OutputError, match="the disk is full"):
        sp.save(full_disk / "state.safetensors")
    assert list(full_disk.iterdir()) == []


def test_saved_files_are_what_safetensors_reads(tmp_path):
    """Writing through Python gives the same file safetensors' own writer does."""
    masks = Masks({"fc": LayerMask(torch.tensor([1.0, 0.0, 1.0]), input_shape=(3,))}, num_samples=4)
    masks.save(tmp_path / "m.safetensors")
    loaded = Masks.load(tmp_path / "m.safetensors")
    torch.testing.assert_close(loaded["fc"].mask, masks["fc"].mask)
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "actsparse.masks"


# --- masks that zero everything ---------------------------------------------------------


def test_notes_name_layers_whose_mask_zeroes_everything():
    masks = Masks({
        "fc1": LayerMask(torch.zeros(4)),
        "fc2": LayerMask(torch.tensor([1.0, 0.0])),
        "fc3": LayerMask(mask=(torch.zeros(1), torch.zeros(1)), features=(0, 1), feature_dim=1, input_shape=(2,)),
        "fc4": LayerMask(mask=(torch.zeros(1),), features=(0,), feature_dim=1, input_shape=(2,)),
    })
    notes = masks.notes()
    assert len(notes) == 2
    assert notes[0].startswith("layer 'fc1': its mask zeroes 100% of its input")
    assert notes[1].startswith("layer 'fc3': its mask zeroes 100% of its input")
    assert Masks({"fc": LayerMask(torch.ones(2))}).notes() == []


def test_notes_after_calibrating_at_sparsity_one():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    masks = calibrate(model, Recipe.simple(layers=["2"], sparsity=1.0), [torch.randn(3, 4)])
    assert masks["2"].sparsity == 1.0
    assert [n.split(":")[0] for n in masks.notes()] == ["layer '2'"]
    assert "the model's output does not depend on its input there" in masks.notes()[0]


# --- the squash report after rounding -------------------------------------------------


def test_squash_reports_the_sparsity_it_achieved():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 4, 3, padding=1)).eval()
    mask = torch.ones(32)
    mask[:10] = 0  # 10 masked = 31.2 %; 22 kept -> 24 (a multiple of 8): 8 removed
    masks = Masks({"2": LayerMask(mask=mask.reshape(32, 1, 1), input_shape=(32, 6, 6))})
    result = squash(model, masks, "auto", example=torch.rand(2, 2, 6, 6))
    assert result.model[2].in_channels == 24
    assert result.sparsity["2"] == 0.25
    assert result.report()[0]["sparsity"] == 0.25
    assert result.reasons["2"] == (
        "removed 8 of 32 features from 0 and this layer (10 are masked: 2 stay, zeroed in the weight, "
        "so that 24 channels, a multiple of 8, are kept)"
    )
    copy_model = copy.deepcopy(model)
    exact = squash(copy_model, masks, "auto", example=torch.rand(2, 2, 6, 6), channel_multiple=1)
    assert exact.sparsity["2"] == pytest.approx(10 / 32) and exact.reasons["2"] == "removed 10 of 32 features from 0 and this layer"


def test_squash_reports_all_zero_mask_with_one_feature_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    masks = Masks({"2": LayerMask(torch.zeros(6))})
    result = squash(model, masks, "prune", example=torch.randn(2, 4))
    assert result.sparsity["2"] == pytest.approx(5 / 6)
    assert result.reasons["2"] == (
        "removed 5 of 6 features from 0 and this layer (6 are masked: 1 stays, zeroed in the weight, "
        "so that no tensor is empty)"
    )


# --- sparsifier state files ---------------------------------------------------------------


def _state_file(tmp_path: Path, edit: Callable[[dict[str, str]], dict[str, str]]) -> Path:
    model = nn.Sequential(nn.Linear(4, 4))
    sp = ActivationSparsifier(model, "sum_abs", "mean", "topk", sparsity_level=0.5)
    sp.register_layer(model[0])
    with torch.no_grad():
        model(torch.randn(2, 4))
    good = tmp_path / "good.safetensors"
    sp.save(good)
    with safe_open(str(good), "pt") as f:
        metadata = dict(f.metadata())
    path = tmp_path / "state.safetensors"
    save_file(load_file(str(good)), str(path), metadata=edit(metadata))
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: {**m, "state": _deep_json()}, "nested too deeply"),
        (lambda m: {**m, "format_version": "-7"}, "format_version '-7' is not a positive integer"),
    ],
    ids=["deep json", "negative version"],
)
def test_hostile_sparsifier_state_refused(tmp_path, edit, message):
    path = _state_file(tmp_path, edit)
    fresh = ActivationSparsifier(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(MaskError, match=message):
        fresh.load(path)
    assert not fresh.data_groups


# --- masks files with compensation edits (issue 10): the new tensors checked on load ---------


def _good_edited_masks(w: World) -> Path:
    """A valid masks file for fc2 (8 inputs, 2 outputs) with a new weight and bias."""
    lm = LayerMask(
        torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]), input_shape=(8,),
        weight=torch.ones(2, 8), bias=torch.zeros(2), method="obs", compensate="lstsq", damping=0.01,
    )
    path = w.file("good-edited.safetensors")
    Masks({"fc2": lm}, num_samples=20, num_batches=1).save(path)
    return path


def _edited_edits(
    w: World,
    tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda t: t,
    row: dict[str, Any] | None = None,
) -> Path:
    source = _good_edited_masks(w)
    with safe_open(str(source), "pt") as f:
        metadata = dict(f.metadata())
    if row is not None:
        metadata["layers"] = json.dumps([{**json.loads(metadata["layers"])[0], **row}])
    path = w.file("hostile.safetensors")
    save_file(tensors(load_file(str(source))), str(path), metadata=metadata)
    source.unlink()
    return path


def _with(**new: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda t: {**t, **{f"fc2::{k}": v for k, v in new.items()}}


EDIT_CASES: dict[str, tuple[Callable[[World], Path], str]] = {
    "weight nan": (lambda w: _edited_edits(w, _with(weight=torch.full((2, 8), float("nan")))), "weight of layer 'fc2' holds NaN or Inf"),
    "bias inf": (lambda w: _edited_edits(w, _with(bias=torch.tensor([0.0, float("inf")]))), "bias of layer 'fc2' holds NaN or Inf"),
    "weight integer": (lambda w: _edited_edits(w, _with(weight=torch.ones(2, 8, dtype=torch.int64))), "weight of layer 'fc2' is int64"),
    "weight too wide": (
        lambda w: _edited_edits(w, _with(weight=torch.ones(2, 9)), {"weight_shape": [2, 9]}),
        "weight of layer 'fc2' has 9 input features, its mask of shape [8] does not",
    ),
    "bias of other outputs": (lambda w: _edited_edits(w, _with(bias=torch.zeros(3)), {"bias_shape": [3]}), "bias of layer 'fc2' has shape [3]"),
    "weight shape not as declared": (lambda w: _edited_edits(w, row={"weight_shape": [8, 2]}), "its metadata says [8, 2]"),
    "weight undeclared": (lambda w: _edited_edits(w, row={"weight_shape": None}), "its metadata does not describe"),
    "weight declared but missing": (lambda w: _edited_edits(w, lambda t: {k: v for k, v in t.items() if k != "fc2::weight"}), "tensor fc2::weight is missing"),
    "unknown compensation": (lambda w: _edited_edits(w, row={"compensate": "ridge"}), "compensate 'ridge' of layer 'fc2'"),
    "negative damping": (lambda w: _edited_edits(w, row={"damping": -1}), "damping -1 of layer 'fc2'"),
    "method not a name": (lambda w: _edited_edits(w, row={"method": ["obs"]}), "method \"['obs']\" of layer 'fc2'"),
}


@pytest.mark.parametrize("case", list(EDIT_CASES))
def test_hostile_compensation_edits_refused_by_squash(case, world):
    build, message = EDIT_CASES[case]
    path = build(world)
    _refused(world, ["squash", world.user(), "--masks", path, "--heldout", world.data(), "-o", world.file("m.pt2")], 8, message)


def test_good_edited_masks_load():
    import tempfile

    path = Path(tempfile.mkdtemp()) / "m.safetensors"
    lm = LayerMask(torch.ones(8), input_shape=(8,), weight=torch.ones(2, 8), bias=torch.zeros(2), method="obs", compensate="lstsq", damping=0.0)
    Masks({"fc2": lm}).save(path)
    loaded = Masks.load(path)["fc2"]
    assert torch.equal(loaded.weight, lm.weight) and torch.equal(loaded.bias, lm.bias)
    assert (loaded.method, loaded.compensate, loaded.damping) == ("obs", "lstsq", 0.0)
