"""Recovery after the one-shot step: the masked layers refit end to end.

Selection and compensation look at one layer at a time. Recovery then trains the
masked layers' own weights and biases (the consumers: the layers whose input is
masked, nothing else) so that the masked model's outputs come closer to the dense
model's on the calibration batches: a few epochs of Adam on ``1 - cosine`` of
every floating output (over its last axis, every position), the masks applied as
in ``mul``, every other parameter frozen. The result is the masks' new weight and
bias per layer (what compensation gives, and what every squash mode bakes in), so
the masks file still reproduces the model; each layer's ``note`` says it was
recovered. Deterministic: a fixed seed, the batches in their order.

    >>> import torch
    >>> from torch import nn
    >>> from actsparse_deploy import Recipe, calibrate
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> batches = [torch.randn(32, 8) for _ in range(4)]
    >>> masks = calibrate(model, Recipe.simple(layers=["2"], sparsity=0.5), batches)
    >>> recovered, recovery = recover(model, masks, batches, epochs=5)
    >>> recovery.after < recovery.before, recovered["2"].weight.shape
    (True, torch.Size([4, 16]))
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..base.errors import UsageError
from ..calibration.masks import LayerMask, Masks
from ..data.batches import Batch, flatten_outputs, run_batch
from ..nn.layers import WeightedKind, layer_kind
from ..nn.modules import eval_mode
from .apply import MaskedInput, edited, replace_module
from .plan import layer_edits

__all__ = ["RECOVER_EPOCHS", "RECOVER_LR", "Recovery", "recover"]

#: epochs over the calibration batches, and Adam's step (MiniLM at 50 %: 3 epochs at 1e-4 gained 0.007 held-out
#: and 0.006 on the other text; 3e-4 lost both; tools/measure_recovery.py)
RECOVER_EPOCHS = 3
RECOVER_LR = 1e-4


@dataclass(frozen=True)
class Recovery:
    """What recovery did: ``epochs`` over ``batches`` batches, ``layers`` layers trained
    (``parameters`` values), the mean ``1 - cosine`` to the dense outputs on those batches
    ``before`` and ``after``, in ``seconds``."""

    epochs: int
    batches: int
    layers: int
    parameters: int
    before: float
    after: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "batches": self.batches, "layers": self.layers, "parameters": self.parameters,
                "before": self.before, "after": self.after, "seconds": round(self.seconds, 3)}

    def note(self) -> str:
        return (f"recovered: {self.layers} masked layers ({self.parameters} weights) trained {self.epochs} epochs on "
                f"{self.batches} calibration batches towards the dense outputs, cosine error {self.before:.5f} -> "
                f"{self.after:.5f} on them, {self.seconds:.0f} s")


def _distance(outputs: tuple[torch.Tensor, ...], targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The mean of ``1 - cosine`` over the last axis of every floating output."""
    terms = [1 - nn.functional.cosine_similarity(out.float(), want, dim=-1).mean()
             for out, want in zip(outputs, targets, strict=True) if want.is_floating_point() and want.ndim >= 1]
    if not terms:
        raise UsageError("recovery trains towards the dense model's floating outputs, and this model has none")
    return torch.stack(terms).mean()


def _trainable(name: str, layer: nn.Module, lm: LayerMask) -> nn.Module:
    """A copy of ``layer`` with the masks' weight and bias (as squash applies them), those two trainable
    (a layer without a bias gains one of zeros)."""
    kind = layer_kind(layer)
    if not isinstance(kind, WeightedKind) or not isinstance(getattr(layer, "weight", None), torch.Tensor):
        raise UsageError(f"recovery trains the masked layers' weights, and layer {name!r} ({type(layer).__name__}) has none")
    new = edited(layer, layer_edits(name, layer, lm))
    if not isinstance(getattr(new, "bias", None), torch.Tensor):
        new.bias = nn.Parameter(torch.zeros(kind.out_features(layer), dtype=layer.weight.dtype))
    for p in (new.weight, new.bias):
        p.requires_grad_(True)
    return new


@contextmanager
def _masked_and_trainable(model: nn.Module, masks: Masks) -> Iterator[dict[str, nn.Module]]:
    """``model`` with every masked layer swapped for a trainable copy behind its mask, every other
    parameter frozen; the model as it was afterwards (the copies are yielded)."""
    originals = {name: model.get_submodule(name) for name in masks}
    flags = {p: p.requires_grad for p in model.parameters()}
    copies: dict[str, nn.Module] = {}
    try:
        for p in flags:
            p.requires_grad_(False)
        for name, layer in originals.items():
            copies[name] = _trainable(name, layer, masks[name])
            replace_module(model, name, MaskedInput(copies[name], masks[name].dense().detach().to(layer.weight.dtype)))
        yield copies
    finally:
        for name, layer in originals.items():
            replace_module(model, name, layer)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _mean_distance(model: nn.Module, batches: list[Batch], targets: list[tuple[torch.Tensor, ...]]) -> float:
    with torch.no_grad():
        return float(sum(float(_distance(flatten_outputs(run_batch(model, b)), t)) for b, t in zip(batches, targets, strict=True))
                     / len(batches))


def recover(model: nn.Module, masks: Masks, batches: Iterable[Batch], *, epochs: int = RECOVER_EPOCHS, lr: float = RECOVER_LR,
            seed: int = 0) -> tuple[Masks, Recovery]:
    """The masks with each masked layer's weight and bias trained end to end towards ``model``'s own
    outputs on ``batches`` (see the module's doc); ``model`` is left as it was. Float32 models only."""
    start = time.perf_counter()
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        raise UsageError("recovery trains in float32, and the model's weights are half precision: leave out --recover, or --dtype float32")
    batches = list(batches)
    if not batches or epochs < 1:
        raise UsageError("recovery needs calibration batches and at least one epoch")
    with eval_mode(model):  # dropout off; eval_mode's no-grad ends with the block
        targets = [tuple(t.detach() for t in flatten_outputs(run_batch(model, b))) for b in batches]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with _masked_and_trainable(model, masks) as copies:
            before = _mean_distance(model, batches, targets)
            parameters = [p for layer in copies.values() for p in (layer.weight, layer.bias)]
            optimizer = torch.optim.Adam(parameters, lr=lr)
            for _ in range(epochs):
                for batch, target in zip(batches, targets, strict=True):
                    optimizer.zero_grad()
                    with torch.enable_grad():
                        loss = _distance(flatten_outputs(run_batch(model, batch)), target)
                        loss.backward()
                    optimizer.step()
            after = _mean_distance(model, batches, targets)
            layers = {name: _recovered(masks[name], layer, epochs) for name, layer in copies.items()}
    finally:
        model.train(was_training)
        torch.random.set_rng_state(generator_state)
    recovery = Recovery(epochs, len(batches), len(layers), sum(p.numel() for p in parameters), before, after,
                        time.perf_counter() - start)
    return replace(masks, layers={**masks.layers, **layers}), recovery


def _recovered(lm: LayerMask, layer: nn.Module, epochs: int) -> LayerMask:
    kind = layer_kind(layer)
    assert kind is not None
    weight = kind.standard_weight(layer, layer.weight.detach()).contiguous()
    note = f"recovered ({epochs} epochs towards the dense outputs)"
    return replace(lm, weight=weight, bias=layer.bias.detach().clone(), weight_layout="out-in",
                   note=f"{lm.note}; {note}" if lm.note else note)
