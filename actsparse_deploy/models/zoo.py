"""Built-in models and data: two small digits classifiers and their data splits,
the MiniLM sentence encoder and ``tiny-lm``, a small Llama-architecture causal
LM (``actsparse_deploy.models.tinylm``, held-out perplexity as its quality metric).

The data is scikit-learn's bundled 8x8 digits set (no download), cut once into a
fixed train / calibration / test split. The weights ship in ``models/`` and are
made by ``python tools/train_digits.py``.

    >>> from actsparse_deploy.models.zoo import builtin_names, digits_split, DigitsMLP
    >>> builtin_names()
    ['digits-cnn', 'digits-mlp', 'minilm', 'tiny-lm']
    >>> images, labels = digits_split("calibration")
    >>> tuple(images.shape), labels.dtype
    ((200, 1, 8, 8), torch.int64)
    >>> tuple(DigitsMLP()(images[:4]).shape)
    (4, 10)

With the weights in place (``load_builtin`` raises ``ModelLoadError`` if not):

    model = load_builtin("digits-cnn")
    classification_accuracy(model, "test")   # 0.98 or so
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from actsparse_deploy.base.constants import MODELS_DIR_ENV, models_dir
from actsparse_deploy.base.errors import DataError, ModelLoadError, WeightsError, first_line
from actsparse_deploy.base.serialize import reason, unreadable
from actsparse_deploy.models import minilm, tinylm

if TYPE_CHECKING:
    from actsparse_deploy.data.iospec import IOSpec

__all__ = [
    "SPLIT_SEED",
    "SPLIT_SIZES",
    "MODELS_DIR_ENV",
    "TASKS",
    "TRAIN_SCRIPT",
    "BuiltinModel",
    "DigitsCNN",
    "DigitsMLP",
    "builtin_metadata",
    "builtin_names",
    "builtin_recipe_path",
    "builtin_weights_path",
    "calibration_batches",
    "classification_accuracy",
    "digits_split",
    "get_builtin",
    "heldout_batches",
    "load_builtin",
    "models_dir",
]

SPLIT_SEED = 20240607
"""Seed of the numpy permutation that cuts the digits set into splits."""

SPLIT_SIZES: dict[str, int] = {"train": 1197, "calibration": 200, "test": 400}
"""Split sizes, in the order they are taken from the permutation."""

TASKS = ("classification", "embedding", "causal-lm")
"""What a built-in does; a ``causal-lm``'s cost is its held-out perplexity (dense, sparse, ONNX)."""

"""Environment variable that overrides where the shipped weights are looked up."""

TRAIN_SCRIPT = "python tools/train_digits.py"
"""The command that (re)creates the built-in weights."""

_DIGITS_PIXEL_MAX = 16.0
DIGITS_DATA = "digits.npz"
"""scikit-learn's digits (uint8 pixels 0-16 and labels) in the models directory."""


# --------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=1)
def _digits_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Load the digits once and cut them into the fixed splits (cached, read-only use).
    The data is scikit-learn's ``load_digits()`` as shipped in ``models/digits.npz``
    (``python tools/make_digits_data.py`` writes it; reading it needs no scikit-learn)."""
    path = models_dir() / DIGITS_DATA
    try:
        with np.load(path, allow_pickle=False) as shipped:
            images = np.asarray(shipped["images"], dtype=np.float32) / _DIGITS_PIXEL_MAX
            labels = np.asarray(shipped["target"], dtype=np.int64)
    except (OSError, KeyError, ValueError) as e:
        raise DataError(
            f"cannot read the built-in digits data {path} ({type(e).__name__}: {first_line(e)}); "
            "recreate it with `python tools/make_digits_data.py`"
        ) from e
    if len(images) != sum(SPLIT_SIZES.values()):
        raise DataError(
            f"scikit-learn's digits set has {len(images)} samples, expected "
            f"{sum(SPLIT_SIZES.values())}; the built-in splits need that exact set"
        )
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    start = 0
    for split, size in SPLIT_SIZES.items():
        index = order[start : start + size]
        start += size
        split_images = torch.from_numpy(images[index].reshape(-1, 1, 8, 8).copy())
        splits[split] = (split_images, torch.from_numpy(labels[index].copy()))
    return splits


def digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 8, 8)`` float32 in [0, 1] and int64 labels of one split.

    ``split`` is ``"train"`` (1197), ``"calibration"`` (200) or ``"test"`` (400).
    The tensors are fresh copies: changing them does not change later calls.
    """
    splits = _digits_splits()
    if split not in splits:
        raise DataError(
            f"unknown digits split {split!r}; valid splits: {', '.join(SPLIT_SIZES)}"
        )
    images, labels = splits[split]
    return images.clone(), labels.clone()


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")


def _batches(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    _check_batch_size(batch_size)
    return list(torch.split(images, batch_size))


def calibration_batches(name: str, batch_size: int | None = None) -> list[Any]:
    """Built-in ``name``'s calibration data, in order, in batches (default: its
    own batch size). Digits: 200 images, 64 per batch give 64, 64, 64, 8."""
    entry = get_builtin(name)
    if batch_size is not None:
        _check_batch_size(batch_size)
    return entry.data("calibration", batch_size or entry.batch_size)  # type: ignore[misc]


def heldout_batches(name: str, batch_size: int | None = None) -> list[Any]:
    """Built-in ``name``'s held-out data (never used for calibration), in batches."""
    entry = get_builtin(name)
    if batch_size is not None:
        _check_batch_size(batch_size)
    return entry.data("heldout", batch_size or entry.batch_size)  # type: ignore[misc]


# ------------------------------------------------------------------------- models


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool and two linear layers: (N,1,8,8) -> (N,10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.act3 = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        x = self.flatten(self.pool(x))
        x = self.act3(self.fc1(x))
        return self.fc2(x)


class DigitsMLP(nn.Module):
    """Flatten and three linear layers (64 -> 128 -> 64 -> 10) with ReLUs between."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 128)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(128, 64)
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.fc1(self.flatten(x)))
        x = self.act2(self.fc2(x))
        return self.fc3(x)


# ----------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BuiltinModel:
    """A shipped model: how to build and load it, its data, recipe and I/O.

    ``factory`` builds the architecture; ``loader`` (default: ``factory`` plus
    ``models/<weights_filename>``) gives the trained model. ``data(split,
    batch_size)`` returns ``"calibration"`` or ``"heldout"`` batches; ``labels()``
    the held-out labels of a classifier. ``input_names``, ``output_names`` and
    ``axes`` (each tensor's dynamic axes; default: the batch axis of every one)
    are the model's one I/O spec (:meth:`io_spec`), which export, ``.pt2``
    capture and validation all use. ``other_data(batch_size)``: inputs of
    another kind than the calibration and held-out data (MiniLM: English that
    is not documentation), on which the cost is also reported (domain shift).
    ``train_script``: the command that makes its shipped files.
    """

    name: str
    description: str
    factory: Callable[[], nn.Module]
    weights_filename: str | None
    recipe_filename: str
    task: str = "classification"
    loader: Callable[[], nn.Module] | None = None
    data: Callable[[str, int], list[Any]] | None = None
    labels: Callable[[], torch.Tensor] | None = None
    input_names: tuple[str, ...] = ("input",)
    output_names: tuple[str, ...] = ("logits",)
    axes: Mapping[str, Mapping[int, str]] | None = None
    batch_size: int = 32
    other_data: Callable[[int], list[Any]] | None = None
    #: a text model's batches of texts (one per line of a user's ``--other-text``): ``text_data(texts, batch_size)``
    text_data: Callable[[list[str], int], list[Any]] | None = None
    train_script: str = TRAIN_SCRIPT

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a built-in model needs a name")
        if not callable(self.factory):
            raise TypeError(f"built-in {self.name!r}: factory must be callable")
        if self.weights_filename is not None and not self.weights_filename.endswith(".safetensors"):
            raise ValueError(
                f"built-in {self.name!r}: weights file {self.weights_filename!r} "
                "must be a .safetensors file"
            )
        if not self.recipe_filename.endswith(".toml"):
            raise ValueError(
                f"built-in {self.name!r}: recipe file {self.recipe_filename!r} "
                "must be a .toml file"
            )
        if self.task not in TASKS:
            raise ValueError(f"built-in {self.name!r}: unknown task {self.task!r}")
        tensors = set(self.input_names + self.output_names)
        if self.axes is not None and (set(self.axes) != tensors or not all(0 in a for a in self.axes.values())):
            raise ValueError(
                f"built-in {self.name!r}: axes must give each input and output ({', '.join(sorted(tensors))}) "
                "its dynamic axes, the batch axis 0 included"
            )

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Each input's and output's dynamic axes (``{name: {axis: dim_name}}``)."""
        if self.axes is None:
            return {name: {0: "batch"} for name in self.input_names + self.output_names}
        return {name: dict(axes) for name, axes in self.axes.items()}

    def io_spec(self) -> IOSpec:
        """The model's I/O spec: names and dynamic axes of its inputs and outputs."""
        from actsparse_deploy.data.iospec import IOSpec

        return IOSpec(self.input_names, self.output_names, self.dynamic_axes())

    def other_batches(self) -> list[Any] | None:
        """Inputs from another source than its calibration and held-out data (the cost under domain
        shift), in its batch size; None where it has none."""
        return list(self.other_data(self.batch_size)) if self.other_data is not None else None


def _digits_data(split: str, batch_size: int) -> list[torch.Tensor]:
    return _batches(digits_split("test" if split == "heldout" else split)[0], batch_size)


def _digits_builtin(name: str, description: str, factory: Callable[[], nn.Module]) -> BuiltinModel:
    return BuiltinModel(
        name=name,
        description=description,
        factory=factory,
        weights_filename=f"{name}.safetensors",
        recipe_filename=f"{name}.toml",
        data=_digits_data,
        labels=lambda: digits_split("test")[1],
    )


def _minilm_factory() -> nn.Module:
    from .minilm import load_minilm

    return load_minilm()


def _minilm_data(split: str, batch_size: int) -> list[Any]:
    from .minilm import minilm_batches

    return minilm_batches(split, batch_size)


def _minilm_other(batch_size: int) -> list[Any]:
    return _minilm_data("other", batch_size)


def _minilm_text(texts: list[str], batch_size: int) -> list[Any]:
    from .minilm import text_batches

    return text_batches(texts, batch_size)


def _tiny_lm_other(batch_size: int) -> list[Any]:
    from .tinylm import other_batches

    return other_batches(batch_size)


def _tiny_lm_text(texts: list[str], batch_size: int) -> list[Any]:
    from .tinylm import text_batches

    return text_batches(texts, batch_size)


def _tiny_lm_factory() -> nn.Module:
    from .tinylm import build_tiny_lm

    return build_tiny_lm()


def _tiny_lm_loader() -> nn.Module:
    from .tinylm import load_tiny_lm

    return load_tiny_lm(models_dir() / tinylm.WEIGHTS_FILENAME)


def _tiny_lm_data(split: str, batch_size: int) -> list[Any]:
    from .tinylm import tiny_lm_batches

    return tiny_lm_batches(split, batch_size)


_BUILTINS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        _digits_builtin(
            "digits-cnn", "small CNN on 8x8 scikit-learn digits (2 conv + 2 linear)", DigitsCNN
        ),
        _digits_builtin("digits-mlp", "3-layer MLP on 8x8 scikit-learn digits", DigitsMLP),
        BuiltinModel(
            name="minilm",
            description="all-MiniLM-L6-v2 sentence encoder (packaged, offline): token + sentence embeddings",
            factory=_minilm_factory,
            weights_filename=None,
            recipe_filename="minilm.toml",
            task="embedding",
            loader=_minilm_factory,
            data=_minilm_data,
            input_names=minilm.INPUT_NAMES,
            output_names=minilm.OUTPUT_NAMES,
            axes=minilm.DYNAMIC_AXES,
            batch_size=8,
            other_data=_minilm_other,
            text_data=_minilm_text,
        ),
        BuiltinModel(
            name="tiny-lm",
            description="4.5 M-parameter Llama causal LM (SwiGLU) trained on Python's pydoc_data documentation",
            factory=_tiny_lm_factory,
            weights_filename=tinylm.WEIGHTS_FILENAME,
            recipe_filename="tiny-lm.toml",
            task="causal-lm",
            loader=_tiny_lm_loader,
            data=_tiny_lm_data,
            input_names=tinylm.INPUT_NAMES,
            output_names=tinylm.OUTPUT_NAMES,
            axes=tinylm.DYNAMIC_AXES,
            batch_size=8,
            other_data=_tiny_lm_other,
            text_data=_tiny_lm_text,
            train_script=tinylm.TRAIN_SCRIPT,
        ),
    )
}


def builtin_names() -> list[str]:
    """Names of the built-in models, sorted."""
    return sorted(_BUILTINS)


def get_builtin(name: str) -> BuiltinModel:
    """The registry entry of built-in ``name``; unknown names list the known ones."""
    try:
        return _BUILTINS[name]
    except (KeyError, TypeError):
        raise ModelLoadError(
            f"unknown built-in model {name!r}; known models: {', '.join(builtin_names())}"
        ) from None


def builtin_weights_path(name: str) -> Path | None:
    """Path of built-in ``name``'s weights file (it may not exist); None where
    the weights come from elsewhere (MiniLM: its package)."""
    filename = get_builtin(name).weights_filename
    return models_dir() / filename if filename is not None else None


def builtin_recipe_path(name: str) -> Path:
    """Path of built-in ``name``'s recipe, ``models/recipes/<name>.toml`` (it may not exist)."""
    return models_dir() / "recipes" / get_builtin(name).recipe_filename


def _existing_weights(name: str) -> Path:
    path = builtin_weights_path(name)
    if path is None:
        raise ModelLoadError(f"built-in model {name!r} has no weights file in {models_dir()}")
    if not path.is_file():
        raise ModelLoadError(
            f"weights of built-in model {name!r} not found at {path}; "
            f"run `{get_builtin(name).train_script}` to create them"
        )
    return path


def load_builtin(name: str) -> nn.Module:
    """Build built-in ``name``, load its shipped weights strictly, return it in eval mode."""
    entry = get_builtin(name)
    if entry.loader is not None:
        return entry.loader().eval()
    path = _existing_weights(name)
    try:
        state_dict = load_file(path)
    except BaseException as e:
        if not unreadable(e):
            raise
        raise WeightsError(f"cannot read weights file {path}: {reason(e)}") from e
    model = entry.factory()
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise WeightsError(
            f"weights file {path} does not fit built-in model {name!r}: {e}; "
            f"run `{entry.train_script}` to recreate it"
        ) from e
    return model.eval()


def builtin_metadata(name: str) -> dict[str, str]:
    """The string metadata stored in built-in ``name``'s weights file (test accuracy etc.)."""
    path = _existing_weights(name)
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
    except BaseException as e:
        if not unreadable(e):
            raise
        raise WeightsError(f"cannot read weights file {path}: {reason(e)}") from e
    return dict(metadata or {})


def classification_accuracy(model: nn.Module, split: str = "test") -> float:
    """Top-1 accuracy of ``model`` on a digits split, in eval mode without gradients
    (:func:`actsparse_deploy.onnx.metrics.accuracy`). The model's train / eval mode is restored afterwards.
    """
    from actsparse_deploy.onnx.metrics import accuracy

    images, labels = digits_split(split)
    return accuracy(model, [images], labels)
