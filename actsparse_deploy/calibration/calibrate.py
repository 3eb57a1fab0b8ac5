"""Stage 1: model + recipe + batches -> statistics -> masks.

Two steps. :func:`collect` runs the model over calibration batches (or a
``forward_loop(model)`` of the user's) with an :class:`ActivationSparsifier`
attached to the layers the recipe selects, and keeps each layer's statistic
(:class:`~actsparse_deploy.calibration.stats.Statistics`: merge them, save them, select
again with another sparsity). :func:`select` turns statistics into masks with
the recipe's reduce and mask functions, or, where the recipe sets a
``method``, with that method and the ``compensate`` edits of the layer's weight
and bias (then select needs the model). :func:`calibrate` is the two in one
call. Hooks are always removed afterwards, also on error; the model itself is
not changed.

    >>> import torch
    >>> from torch import nn
    >>> from actsparse_deploy import calibrate, collect, select, Recipe
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> recipe = Recipe.simple(layers=["2"], sparsity=0.5)
    >>> masks = calibrate(model, recipe, [torch.randn(4, 8) for _ in range(3)])
    >>> masks["2"].sparsity, masks.num_samples
    (0.5, 12)
    >>> stats = collect(model, recipe, forward_loop=lambda m: [m(torch.randn(5, 8)) for _ in range(2)])
    >>> stats.num_samples, select(stats, recipe.with_sparsity(0.25))["2"].sparsity
    (10, 0.25)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base.errors import ActsparseError, ConfigError, DataError, RecipeError, first_line
from ..data.batches import Batch, batch_size, describe_batch, model_device, run_batch, to_device
from ..nn.attention import find_heads
from ..nn.layers import layer_kind
from ..nn.modules import check_finite_weights, eval_mode, resident
from .compensate import compensate, effective_compensation, lstsq_refit
from .functions import LayerStats, RunningStat
from .masks import LayerMask, Masks, checked_layer_mask
from .recipe import Recipe, ResolvedLayer, uncalled_layers
from .sparsifier import ActivationSparsifier
from .stats import Statistics, model_fingerprint

__all__ = [
    "Batch",
    "batch_size",
    "calibrate",
    "calibrate_in_passes",
    "collect",
    "describe_batch",
    "run_batch",
    "select",
]


@contextlib.contextmanager
def _attached(sparsifier: ActivationSparsifier) -> Iterator[ActivationSparsifier]:
    """The sparsifier's hooks exist only inside the block."""
    try:
        yield sparsifier
    finally:
        for name in list(sparsifier.data_groups):
            sparsifier.unregister_layer(name)


def collect(
    model: nn.Module,
    recipe: Recipe | str | Path | Mapping[str, Any],
    batches: Iterable[Batch] | None = None,
    *,
    forward_loop: Callable[[nn.Module], Any] | None = None,
    model_name: str | None = None,
    on_batch: Callable[[int], None] | None = None,
    group: Any = None,
    shard: bool = True,
) -> Statistics:
    """The statistics of the layers ``recipe`` selects, from ``batches`` (tensors,
    tuples or dicts of tensors) or from ``forward_loop(model)``, a callable that
    runs the model however it likes while the hooks collect (then the sample and
    batch counts are those of the selected layer that saw the most inputs).
    Pass exactly one of the two. Batches are moved to the device of the model's
    parameters; the statistics accumulate there, in float64.

    ``on_batch(n_samples)`` is called after each of ``batches`` (progress bars).

    Distributed (:mod:`actsparse_deploy.calibration.distributed`): with ``group`` a
    ``torch.distributed`` process group, or None while the default group is
    initialised with more than one process, each rank takes its share of
    ``batches`` (batch ``i`` on rank ``i % world``; ``shard=False``: the batches
    given are this rank's already, as with ``forward_loop``) and every rank
    returns the statistics of all ranks' batches. ``group=False``: this process alone.
    """
    if (batches is None) == (forward_loop is None):
        raise ConfigError("pass exactly one of batches= (an iterable of batches) or forward_loop= (a callable)")
    if forward_loop is not None and not callable(forward_loop):
        raise ConfigError(f"forward_loop must be a callable taking the model, got {type(forward_loop).__name__}")
    recipe = Recipe.coerce(recipe)
    layers = recipe.select(model)
    session = None
    if group is not False:
        from .distributed import check_reducible, session_for

        session = session_for(group)
        if session is not None:
            check_reducible(layers)  # before any work
            if batches is not None and shard:
                batches = session.shard(batches)
    if session is None:
        skipped: dict[str, str] = {}

        def skip(unreached: list[str]) -> list[str]:
            skipped.update(uncalled_layers(model, recipe, unreached))
            return list(skipped)

        per_layer, num_samples, num_batches = _collect_local(model, layers, batches, forward_loop, on_batch, skip=skip)
        assert per_layer is not None  # not empty_ok: no batch raised
        return Statistics(layers=per_layer, recipe=recipe, num_samples=num_samples, num_batches=num_batches, model=model_name,
                          fingerprint=model_fingerprint(model, per_layer), skipped=skipped)
    try:
        position = (lambda i: session.rank + i * session.world) if batches is not None and shard else None
        local = _collect_local(model, layers, batches, forward_loop, on_batch, empty_ok=True, position=position, skip=list)
    except BaseException as e:
        session.fail(e, "collecting statistics")
    return session.reduce(local, model, list(layers), recipe=recipe, model=model_name)


class _Stop(Exception):
    """Raised after the last module a pass needs (:func:`calibrate_in_passes`): the rest of the forward pass is not run."""


def _stop(module: nn.Module, args: Any, output: Any) -> None:
    raise _Stop


def _collect_local(
    model: nn.Module, layers: Mapping[str, ResolvedLayer], batches: Iterable[Batch] | None,
    forward_loop: Callable[[nn.Module], Any] | None, on_batch: Callable[[int], None] | None, empty_ok: bool = False,
    position: Callable[[int], int] | None = None, skip: Callable[[list[str]], list[str]] | None = None,
) -> tuple[dict[str, LayerStats] | None, int, int]:
    """This process's statistics, samples and batches (None statistics for no
    batch where ``empty_ok``: a rank whose share is empty); ``position``: this
    process's batch number -> its number in all the data (a rank's share);
    ``skip(unreached)``: the layers never called to leave out (else they are an error).
    A forward pass that raises :class:`_Stop` has run all it needed (:func:`calibrate_in_passes`)."""
    check_finite_weights(model)
    if batches is not None:
        device = model_device(model)
        batches = (to_device(batch, device) for batch in batches)
    sparsifier = ActivationSparsifier(model)
    num_samples = num_batches = 0
    with eval_mode(model), _attached(sparsifier):
        for name, config in layers.items():
            sparsifier.register_layer(model.get_submodule(name), **config.register_kwargs())
        if forward_loop is not None:
            _run_forward_loop(model, forward_loop)
            if all(config.get("data") is None for config in sparsifier.data_groups.values()):
                raise DataError("forward_loop ran nothing through the model's selected layers: it must call the model on data")
            _drop_uncalled(sparsifier, skip)
            per_layer = sparsifier.statistics()
            num_samples = max(ls.num_samples for ls in per_layer.values())
            num_batches = max(ls.num_batches for ls in per_layer.values())
        else:
            for batch in batches:  # type: ignore[union-attr]
                n = batch_size(batch)
                try:
                    run_batch(model, batch)
                except _Stop:
                    pass
                except ActsparseError:
                    raise
                except (RuntimeError, TypeError, ValueError, IndexError) as e:
                    raise DataError(
                        f"the model failed on calibration batch {position(num_batches) if position else num_batches} "
                        f"({describe_batch(batch)}): "
                        f"{type(e).__name__}: {first_line(e)}"
                    ) from e
                num_samples += n
                num_batches += 1
                if on_batch is not None:
                    on_batch(n)
            if num_batches == 0:
                if empty_ok:
                    return None, 0, 0
                raise DataError("no calibration batches: the data source is empty")
            _drop_uncalled(sparsifier, skip)
            per_layer = sparsifier.statistics()
    return per_layer, num_samples, num_batches


def calibrate_in_passes(
    model: nn.Module, recipe: Recipe | str | Path | Mapping[str, Any], batches: Iterable[Batch],
    passes: Sequence[tuple[Sequence[str], str | None]], *, model_name: str | None = None, on_batch: Callable[[int], None] | None = None,
) -> Masks:
    """:func:`calibrate` with the statistics of a few layers at a time: per pass ``(layers, stop_after)`` the
    batches run through the model (each forward pass stopped after ``stop_after``, None: run whole) with only
    ``layers`` hooked, their masks are selected and their statistics let go before the next pass. The masks
    are :func:`calibrate`'s (the same dense model, the same batches); the statistics held at once are one
    pass's. ``batches`` must be iterable again; ``on_batch`` is called in the first pass only.

        >>> import torch
        >>> from torch import nn
        >>> from actsparse_deploy import Recipe
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> recipe = Recipe.simple(layers=["2", "4"], sparsity=0.5)
        >>> batches = [torch.randn(4, 8) for _ in range(3)]
        >>> masks = calibrate_in_passes(model, recipe, batches, [(["2"], "2"), (["4"], None)])
        >>> whole = calibrate(model, recipe, batches)
        >>> all(torch.equal(masks[n].mask, whole[n].mask) for n in ("2", "4"))
        True
    """
    recipe = Recipe.coerce(recipe)
    layers = recipe.select(model)
    found: dict[str, LayerMask] = {}
    skipped: dict[str, str] = {}
    num_samples = num_batches = 0
    def skip(unreached: list[str]) -> list[str]:
        skipped.update(uncalled_layers(model, recipe, unreached))
        return unreached

    for i, (names, stop) in enumerate(passes):
        part = {name: layers[name] for name in names}
        handle = model.get_submodule(stop).register_forward_hook(_stop) if stop is not None else None
        try:
            per_layer, num_samples, num_batches = _collect_local(model, part, batches, None, on_batch if i == 0 else None, skip=skip)
        finally:
            if handle is not None:
                handle.remove()
        assert per_layer is not None
        found.update({name: layer_mask(name, ls, layers[name], model) for name, ls in per_layer.items()})
        del per_layer  # this pass's statistics let go before the next
    return Masks(layers={name: found[name] for name in layers if name in found}, recipe=recipe, num_samples=num_samples,
                 num_batches=num_batches, model=model_name, extra={"skipped": skipped} if skipped else {})


def _drop_uncalled(sparsifier: ActivationSparsifier, skip: Callable[[list[str]], list[str]] | None) -> None:
    """Unregister the layers ``skip`` leaves out of those the forward pass never called."""
    unreached = [name for name, config in sparsifier.data_groups.items() if config.get("data") is None]
    if unreached and skip is not None:
        for name in skip(unreached):
            sparsifier.unregister_layer(name)


def _run_forward_loop(model: nn.Module, forward_loop: Callable[[nn.Module], Any]) -> None:
    try:
        forward_loop(model)
    except ActsparseError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise DataError(f"the model failed inside forward_loop: {type(e).__name__}: {first_line(e)}") from e


def select(
    stats: Statistics, recipe: Recipe | str | Path | Mapping[str, Any] | None = None, model: nn.Module | None = None
) -> Masks:
    """The masks of ``stats``: per layer (per selected feature where the recipe
    sets ``features``) ``mask_fn(reduce_fn(statistic), **sparse_config)`` with the
    recipe's functions; ``recipe`` defaults to the one the statistics were
    collected with (pass another to select with, say, another sparsity).

    A layer whose recipe sets a ``method`` gets the method's mask and, with
    ``compensate``, the layer's new weight and bias
    (:func:`actsparse_deploy.calibration.compensate.compensate`): both read the layer's
    weight, so ``model`` (the model the statistics came from) is needed then."""
    chosen = Recipe.coerce(recipe) if recipe is not None else stats.recipe
    if chosen is None:
        raise RecipeError("the statistics hold no recipe: pass recipe=")
    result = {name: layer_mask(name, stats[name], config, model) for name, config in stats.resolve(chosen).items()}
    return Masks(layers=result, recipe=chosen, num_samples=stats.num_samples, num_batches=stats.num_batches, model=stats.model,
                 extra={"skipped": dict(stats.skipped)} if stats.skipped else {})


def layer_mask(name: str, ls: LayerStats, config: ResolvedLayer, model: nn.Module | None) -> LayerMask:
    """Layer ``name``'s mask from its statistics ``ls`` and its resolved ``config`` (see :func:`select`)."""
    ls = _on_cpu(ls)  # statistics stay on the model's device until masks are selected
    if config.method is not None:
        return method_mask(name, ls, config, model)
    mask = ls.mask(name, config.reduce_fn, config.mask_fn, config.sparse_config)
    return checked_layer_mask(name, mask, config.features, config.feature_dim, (1, *ls.input_shape))


def method_mask(name: str, ls: LayerStats, config: ResolvedLayer, model: nn.Module | None) -> LayerMask:
    """Layer ``name``'s mask from its method, with the compensation's edits."""
    method = config.method
    assert method is not None
    if model is None:
        raise ConfigError(
            f"layer {name!r}: method {method.name!r} (and compensation) reads the layer's weight, so select needs the model: "
            "pass model= (the model the statistics were collected on)"
        )
    try:
        layer = model.get_submodule(name)
    except AttributeError as e:
        raise ConfigError(f"layer {name!r} of the statistics is not in the model passed to select: pass the model they came from") from e
    with resident(layer):  # a layer whose weights wait on disk (calibrated block by block): read while its mask is chosen
        return _method_mask(name, ls, config, model, layer)


def _method_mask(name: str, ls: LayerStats, config: ResolvedLayer, model: nn.Module, layer: nn.Module) -> LayerMask:
    method = config.method
    assert method is not None
    how, note = effective_compensation(layer, config.compensate)
    try:
        block = find_heads(model, name).block if config.heads else 1
        mask = method(layer, ls, config.sparse_config["sparsity_level"], block=block, damping=config.damping)
        lm = checked_layer_mask(name, _as_dtype(mask, ls.input_dtype), None, None, (1, *ls.input_shape))
        weight = bias = None
        damping = config.damping
        if how != "none" and not bool((mask != 0).all()):  # a layer that loses no feature keeps its weight and bias
            if how == "lstsq" and config.refit_damping is None:  # the damping chosen by cross-validation, recorded
                weight, bias, damping = lstsq_refit(layer, ls, mask)
            else:
                weight, bias = compensate(layer, ls, mask, how, config.damping)
            kind = layer_kind(layer)
            assert kind is not None  # the method read its weight columns
            weight = kind.standard_weight(layer, weight).contiguous()  # a masks file's layout, (out, in, *kernel)
    except ConfigError as e:
        raise ConfigError(f"layer {name!r}: {e}") from e
    return replace(lm, weight=weight, bias=bias, method=method.name, compensate=how, damping=damping, note=note)


def _on_cpu(ls: LayerStats) -> LayerStats:
    parts = tuple(RunningStat(p.value.cpu(), p.count, p.combine) if isinstance(p, RunningStat) else p.cpu() for p in ls.parts)
    return replace(ls, stat=parts if isinstance(ls.stat, tuple) else parts[0])


def _as_dtype(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return mask.to(dtype) if dtype.is_floating_point else mask


def calibrate(
    model: nn.Module,
    recipe: Recipe | str | Path | Mapping[str, Any],
    batches: Iterable[Batch],
    *,
    model_name: str | None = None,
    on_batch: Callable[[int], None] | None = None,
    group: Any = None,
    shard: bool = True,
) -> Masks:
    """Compute the recipe's masks from ``batches`` (tensors, tuples or dicts of
    tensors): ``select(collect(...))``.

    ``on_batch(n_samples)`` is called after each batch (progress bars);
    ``group`` / ``shard``: distributed, as for :func:`collect` (every rank
    returns the masks of all ranks' batches).
    """
    stats = collect(model, recipe, batches, model_name=model_name, on_batch=on_batch, group=group, shard=shard)
    return select(stats, model=model)
