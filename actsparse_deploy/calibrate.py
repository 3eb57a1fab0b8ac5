"""Stage 1: model + recipe + batches -> masks.

Runs the model over calibration batches with an :class:`ActivationSparsifier`
attached to the layers the recipe selects, then computes the masks. Hooks are
always removed afterwards, also on error; the model itself is not changed.

    >>> import torch
    >>> from torch import nn
    >>> from actsparse_deploy import calibrate, Recipe
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> recipe = Recipe.simple(layers=["2"], sparsity=0.5)
    >>> masks = calibrate(model, recipe, [torch.randn(4, 8) for _ in range(3)])
    >>> masks["2"].sparsity, masks.num_samples
    (0.5, 12)
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from .errors import ActsparseError, DataError, WeightsError, first_line
from .masks import Masks, checked_layer_mask
from .recipe import Recipe
from .sparsifier import ActivationSparsifier

__all__ = ["Batch", "batch_size", "calibrate", "check_finite_weights", "describe_batch", "eval_mode", "run_batch"]

Batch = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor] | Mapping[str, torch.Tensor]


def run_batch(model: nn.Module, batch: Batch) -> Any:
    """``model(t)``, ``model(*t)`` or ``model(**d)`` by the batch's form."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise DataError(f"a batch must be a tensor, a tuple of tensors or a dict of tensors, not {type(batch).__name__}")


def batch_size(batch: Batch) -> int:
    """The length of the batch's first tensor's first axis."""
    first = batch if isinstance(batch, torch.Tensor) else next(iter(batch.values() if isinstance(batch, Mapping) else batch), None)
    if not isinstance(first, torch.Tensor) or first.ndim == 0:
        raise DataError("a batch must hold at least one tensor with a batch axis")
    return int(first.shape[0])


def describe_batch(batch: Batch) -> str:
    """Shapes and dtypes, for error messages: ``input_ids int64[8, 128], ...``."""

    def one(t: Any) -> str:
        if not isinstance(t, torch.Tensor):
            return type(t).__name__
        return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"

    if isinstance(batch, Mapping):
        return ", ".join(f"{k} {one(v)}" for k, v in batch.items())
    if isinstance(batch, (tuple, list)):
        return ", ".join(one(t) for t in batch)
    return one(batch)


def check_finite_weights(model: nn.Module) -> None:
    """Raise :class:`WeightsError` naming the first parameter that holds NaN or
    Inf, or buffer that holds NaN (buffers may hold -inf on purpose: attention
    masks). Calibration on such a model would blame the data for the NaN."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if not (t.is_floating_point() or t.is_complex()):
                continue
            bad = ~torch.isfinite(t) if kind == "parameter" else torch.isnan(t)
            count = int(bad.sum())
            if count:
                what = "NaN or Inf" if kind == "parameter" else "NaN"
                raise WeightsError(
                    f"{kind} {name!r} of the model holds {what} ({count} of {t.numel()} values): "
                    "the weights are corrupted; check the weights file or the training run that made it"
                )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """eval mode and no grad for the duration; the training flags restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.train(training)


@contextlib.contextmanager
def _attached(sparsifier: ActivationSparsifier) -> Iterator[ActivationSparsifier]:
    """The sparsifier's hooks exist only inside the block."""
    try:
        yield sparsifier
    finally:
        for name in list(sparsifier.data_groups):
            sparsifier.unregister_layer(name)


def calibrate(
    model: nn.Module,
    recipe: Recipe | str | Path | Mapping[str, Any],
    batches: Iterable[Batch],
    *,
    model_name: str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Masks:
    """Compute the recipe's masks from ``batches`` (tensors, tuples or dicts of tensors).

    ``on_batch(n_samples)`` is called after each batch (progress bars).
    """
    recipe = Recipe.coerce(recipe)
    layers = recipe.select(model)
    check_finite_weights(model)
    sparsifier = ActivationSparsifier(model)
    num_samples = num_batches = 0
    with eval_mode(model), _attached(sparsifier):
        for name, config in layers.items():
            sparsifier.register_layer(model.get_submodule(name), **config.register_kwargs())
        for batch in batches:
            n = batch_size(batch)
            try:
                run_batch(model, batch)
            except ActsparseError:
                raise
            except (RuntimeError, TypeError, ValueError, IndexError) as e:
                raise DataError(
                    f"the model failed on calibration batch {num_batches} ({describe_batch(batch)}): "
                    f"{type(e).__name__}: {first_line(e)}"
                ) from e
            num_samples += n
            num_batches += 1
            if on_batch is not None:
                on_batch(n)
        if num_batches == 0:
            raise DataError("no calibration batches: the data source is empty")
        sparsifier.step()
        result = {
            name: checked_layer_mask(
                name, sparsifier.get_mask(name), config.features, config.feature_dim, sparsifier.input_shape(name)
            )
            for name, config in layers.items()
        }
    return Masks(layers=result, recipe=recipe, num_samples=num_samples, num_batches=num_batches, model=model_name)

