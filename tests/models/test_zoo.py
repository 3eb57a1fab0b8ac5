"""Tests of the built-in digits data, models and shipped weights (actsparse_deploy.models.zoo)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from actsparse_deploy.base.errors import DataError, ModelLoadError
from actsparse_deploy.models import zoo

MIN_ACCURACY = {"digits-cnn": 0.97, "digits-mlp": 0.95}
SPLITS = ("train", "calibration", "test")


def _rows(images: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in images.reshape(len(images), -1)}


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize(("split", "size"), [("train", 1197), ("calibration", 200), ("test", 400)])
def test_split_shapes_dtypes_and_range(split: str, size: int) -> None:
    images, labels = zoo.digits_split(split)
    assert tuple(images.shape) == (size, 1, 8, 8)
    assert images.dtype == torch.float32
    assert labels.shape == (size,)
    assert labels.dtype == torch.int64
    assert images.min().item() == 0.0
    assert images.max().item() == 1.0
    assert set(labels.tolist()) == set(range(10))


def test_splits_are_disjoint_and_cover_the_dataset() -> None:
    rows = {split: _rows(zoo.digits_split(split)[0]) for split in SPLITS}
    assert [len(rows[s]) for s in SPLITS] == [1197, 200, 400]  # no duplicate images inside
    assert not rows["train"] & rows["calibration"]
    assert not rows["train"] & rows["test"]
    assert not rows["calibration"] & rows["test"]
    assert len(rows["train"] | rows["calibration"] | rows["test"]) == 1797


def test_splits_are_deterministic_and_fresh_copies() -> None:
    images, labels = zoo.digits_split("calibration")
    reference_images, reference_labels = images.clone(), labels.clone()
    images.fill_(-1.0)
    labels.fill_(-1)
    again_images, again_labels = zoo.digits_split("calibration")
    torch.testing.assert_close(again_images, reference_images, rtol=0, atol=0)
    torch.testing.assert_close(again_labels, reference_labels, rtol=0, atol=0)


@pytest.mark.slow
def test_shipped_digits_are_scikit_learns_and_read_without_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """models/digits.npz holds load_digits() exactly (tools/make_digits_data.py
    --check compares them); the splits come from it; a missing file is a DataError."""
    import subprocess
    import sys

    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    with np.load(zoo.models_dir() / zoo.DIGITS_DATA, allow_pickle=False) as shipped:
        np.testing.assert_array_equal(shipped["images"], digits.data)
        np.testing.assert_array_equal(shipped["target"], digits.target)
    everything = torch.cat([zoo.digits_split(s)[0] for s in SPLITS]).reshape(-1, 64) * 16
    assert _rows(everything) == _rows(torch.from_numpy(digits.data.astype(np.float32)))
    code = "import sys; from actsparse_deploy.models import zoo; zoo.digits_split('test'); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    monkeypatch.setenv(zoo.MODELS_DIR_ENV, str(tmp_path))
    zoo._digits_splits.cache_clear()
    try:
        with pytest.raises(DataError, match="python tools/make_digits_data.py"):
            zoo.digits_split("test")
    finally:
        monkeypatch.undo()
        zoo._digits_splits.cache_clear()


def test_unknown_split_lists_valid_ones() -> None:
    with pytest.raises(DataError) as info:
        zoo.digits_split("validation")
    message = str(info.value)
    assert "'validation'" in message
    for split in SPLITS:
        assert split in message


@pytest.mark.parametrize("name", ["digits-cnn", "digits-mlp"])
def test_calibration_batches_cover_the_split_in_order(name: str) -> None:
    batches = zoo.calibration_batches(name, batch_size=64)
    assert [len(b) for b in batches] == [64, 64, 64, 8]
    expected, _ = zoo.digits_split("calibration")
    torch.testing.assert_close(torch.cat(batches), expected, rtol=0, atol=0)


def test_heldout_batches_cover_the_test_split_in_order() -> None:
    batches = zoo.heldout_batches("digits-mlp", batch_size=32)
    assert [len(b) for b in batches] == [32] * 12 + [16]
    expected, _ = zoo.digits_split("test")
    torch.testing.assert_close(torch.cat(batches), expected, rtol=0, atol=0)


@pytest.mark.parametrize("batch_size", [0, -3])
def test_batches_reject_non_positive_batch_size(batch_size: int) -> None:
    with pytest.raises(DataError, match="batch_size"):
        zoo.calibration_batches("digits-cnn", batch_size=batch_size)


# ------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("model_cls", "names"),
    [
        (
            zoo.DigitsCNN,
            ["conv1", "act1", "conv2", "act2", "pool", "flatten", "fc1", "act3", "fc2"],
        ),
        (zoo.DigitsMLP, ["flatten", "fc1", "act1", "fc2", "act2", "fc3"]),
    ],
)
def test_architectures_have_stable_names_and_run_in_order(
    model_cls: type[torch.nn.Module], names: list[str]
) -> None:
    torch.manual_seed(0)
    model = model_cls().eval()
    assert [name for name, _ in model.named_children()] == names
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.nn.Sequential(*model.children())(x)
        actual = model(x)
    assert actual.shape == (5, 10)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_registry_names_and_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(zoo.MODELS_DIR_ENV, raising=False)
    assert zoo.builtin_names() == ["digits-cnn", "digits-mlp", "minilm", "tiny-lm"]
    entry = zoo.get_builtin("digits-cnn")
    assert entry.task == "classification"
    assert entry.factory is zoo.DigitsCNN
    assert zoo.builtin_recipe_path("digits-mlp") == zoo.models_dir() / "recipes" / "digits-mlp.toml"
    repo_models = Path(zoo.__file__).resolve().parents[2] / "models"
    assert zoo.builtin_weights_path("digits-cnn") == repo_models / "digits-cnn.safetensors"


@pytest.mark.parametrize(
    "call",
    [zoo.get_builtin, zoo.load_builtin, zoo.builtin_recipe_path, zoo.calibration_batches],
)
def test_unknown_model_lists_known_names(call: Callable[[str], object]) -> None:
    with pytest.raises(ModelLoadError) as info:
        call("digits-resnet")
    message = str(info.value)
    assert "'digits-resnet'" in message
    assert "digits-cnn" in message and "digits-mlp" in message


# --------------------------------------------------------------- shipped weights


@pytest.mark.parametrize("name", ["digits-cnn", "digits-mlp"])
def test_shipped_weights_load_strictly_and_match_recorded_accuracy(name: str) -> None:
    model = zoo.load_builtin(name)
    assert not model.training
    stored = load_file(zoo.builtin_weights_path(name))
    assert set(stored) == set(model.state_dict())
    metadata = zoo.builtin_metadata(name)
    assert metadata["model"] == name
    assert metadata["test_size"] == "400"
    assert metadata["calibration_size"] == "200"
    assert metadata["split_seed"] == str(zoo.SPLIT_SEED)
    accuracy = zoo.classification_accuracy(model, split="test")
    assert accuracy == pytest.approx(float(metadata["test_accuracy"]), abs=1e-4)
    assert accuracy >= MIN_ACCURACY[name]


def test_classification_accuracy_restores_training_mode() -> None:
    model = zoo.load_builtin("digits-mlp").train()
    zoo.classification_accuracy(model, "calibration")
    assert model.training


def test_models_dir_override_without_weights_names_the_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(zoo.MODELS_DIR_ENV, str(tmp_path))
    assert zoo.builtin_recipe_path("digits-cnn") == tmp_path / "recipes" / "digits-cnn.toml"
    for call in (zoo.load_builtin, zoo.builtin_metadata):
        with pytest.raises(ModelLoadError) as info:
            call("digits-cnn")
        message = str(info.value)
        assert str(tmp_path / "digits-cnn.safetensors") in message
        assert "tools/train_digits.py" in message
