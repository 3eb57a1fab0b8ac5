"""What the stages need to know about a whole model: eval mode for a while (one
definition for calibration, squash, export, validation and the budget), weights
that are finite, the dtype they are stored in, and weights that wait on disk
until a layer runs (a model calibrated block by block: :func:`resident`).

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    >>> with eval_mode(model):
    ...     model.training
    False
    >>> model.training
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..base.errors import WeightsError

__all__ = [
    "block_bytes", "block_device_map", "check_finite_weights", "eval_mode", "float_dtype", "is_offloaded", "largest_blocks", "release_weights", "resident",
    "weight_bytes",
]


def is_offloaded(module: nn.Module) -> bool:
    """Whether ``module``'s own weights wait on disk, read only while it runs (a model loaded
    block by block: accelerate's offloading hook on the module, its parameters on the meta device)."""
    hook = getattr(module, "_hf_hook", None)
    return bool(getattr(hook, "offload", False))


@contextlib.contextmanager
def resident(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with its own weights in memory for the duration: read from disk and let go after
    where they wait there (:func:`is_offloaded`), as they are otherwise.

    >>> layer = nn.Linear(2, 2)
    >>> with resident(layer) as same:
    ...     same is layer
    True
    """
    if not is_offloaded(module):
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module


def check_finite_weights(model: nn.Module) -> None:
    """Raise :class:`WeightsError` naming the first parameter that holds NaN or
    Inf, or buffer that holds NaN (buffers may hold -inf on purpose: attention
    masks). Calibration on such a model would blame the data for the NaN.
    Weights that wait on disk are read a module at a time (:func:`resident`)."""
    seen: set[int] = set()  # tensors shared by two modules, checked once (those read from disk live only while checked: each time)
    for prefix, module in model.named_modules():
        offloaded = is_offloaded(module)
        with resident(module):
            for kind, named in (("parameter", module.named_parameters(recurse=False)), ("buffer", module.named_buffers(recurse=False))):
                for name, t in named:
                    if (not offloaded and id(t) in seen) or not (t.is_floating_point() or t.is_complex()):
                        continue
                    if not offloaded:
                        seen.add(id(t))
                    _check_values(kind, f"{prefix}.{name}" if prefix else name, t)


def _check_values(kind: str, name: str, t: torch.Tensor) -> None:
    count = _bad_values(t, nan_only=kind == "buffer")
    if count:
        what = "NaN or Inf" if kind == "parameter" else "NaN"
        raise WeightsError(
            f"{kind} {name!r} of the model holds {what} ({count} of {t.numel()} values): "
            "the weights are corrupted; check the weights file or the training run that made it"
        )


@contextlib.contextmanager
def eval_mode(*models: Any) -> Iterator[None]:
    """eval mode and no grad for the duration; every module's training flag restored
    after. A torch.export program's module (a ``GraphModule``) cannot switch modes
    and is run as it is (it was captured in eval); what is no module is passed over."""
    modes = {
        m: m.training for model in models if isinstance(model, nn.Module) and not isinstance(model, torch.fx.GraphModule)
        for m in model.modules()
    }
    for module in modes:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.train(training)


#: the elements checked at once (a few MB of flags, never a copy of a whole weight)
_CHECK_ELEMENTS = 2**22


def _bad_values(t: torch.Tensor, nan_only: bool = False) -> int:
    """How many values of ``t`` are NaN or infinite (``nan_only``: NaN), a slice at a time."""
    flat = t.detach().reshape(-1)
    count = 0
    for start in range(0, flat.numel(), _CHECK_ELEMENTS):
        piece = flat[start:start + _CHECK_ELEMENTS]
        good = ~torch.isnan(piece) if nan_only else torch.isfinite(piece)
        if not bool(good.all()):
            count += int(piece.numel() - good.count_nonzero())
    return count


def float_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype that holds most of ``model``'s parameter elements (float32 for a
    model without floating parameters): the dtype its weights were stored in.

    >>> float_dtype(nn.Linear(2, 2).to(torch.bfloat16)), float_dtype(nn.Module())
    (torch.bfloat16, torch.float32)
    """
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=lambda d: counts[d]) if counts else torch.float32


def release_weights(*models: nn.Module) -> None:
    """The weights of ``models`` let go: every parameter and buffer moved to the meta device in
    place (names, shapes and dtypes kept; no memory), for a model no stage runs any more.

    >>> model = nn.Linear(2, 2)
    >>> release_weights(model)
    >>> model.weight.is_meta, tuple(model.weight.shape)
    (True, (2, 2))
    """
    for model in models:
        model.to("meta")


def weight_bytes(model: nn.Module) -> int:
    """The bytes of ``model``'s parameters and buffers (a tensor shared by two names once).

    >>> weight_bytes(nn.Linear(4, 2))
    40
    """
    seen = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


def largest_blocks(model: nn.Module) -> str | None:
    """The name of the ``nn.ModuleList`` of two or more modules that holds most of ``model``'s parameter
    elements (a transformer's layers: each block runs after the one before), None where no list holds half.

    >>> model = nn.Sequential(nn.Embedding(10, 4), nn.ModuleList(nn.Linear(4, 4) for _ in range(3)))
    >>> largest_blocks(model), largest_blocks(nn.Linear(4, 4))
    ('1', None)
    """
    total = sum(p.numel() for p in model.parameters())
    lists = [(sum(p.numel() for p in m.parameters()), name) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    best = max(lists, default=None)
    return best[1] if best is not None and total and 2 * best[0] >= total else None


def block_bytes(model: nn.Module, blocks: str) -> int:
    """The weights of the largest block of ``model``'s list ``blocks`` (:func:`largest_blocks`), in bytes,
    wherever they are (on the meta device too).

    >>> block_bytes(nn.Sequential(nn.Embedding(10, 4), nn.ModuleList(nn.Linear(4, 4) for _ in range(3))), "1")
    80
    """
    return max((weight_bytes(block) for block in model.get_submodule(blocks).children()), default=0)


def block_device_map(model: nn.Module, blocks: str) -> dict[str, str] | None:
    """A device map (as ``transformers``' ``from_pretrained`` takes it) that leaves every block of the list
    ``blocks`` on disk and the rest of ``model`` in memory: each module on the way to the list is opened into
    its children. None where a module on the way holds parameters of its own (it cannot be split).

    >>> model = nn.Sequential(nn.Embedding(10, 4), nn.ModuleList(nn.Linear(4, 4) for _ in range(2)))
    >>> block_device_map(model, "1")
    {'0': 'cpu', '1.0': 'disk', '1.1': 'disk'}
    """
    device_map: dict[str, str] = {}
    path = blocks.split(".")
    module, prefix = model, ""
    for part in path:
        if any(True for _ in module.parameters(recurse=False)):
            return None
        for name, _ in module.named_children():
            if name != part:
                device_map[prefix + name] = "cpu"
        module, prefix = module.get_submodule(part), f"{prefix}{part}."
    for name, _ in module.named_children():
        device_map[prefix + name] = "disk"
    return device_map
