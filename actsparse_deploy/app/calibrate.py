"""``calibrate``'s work from what its command line gives: the recipe the flags
describe (:class:`RecipeFlags`, :func:`build_recipe`; a Hugging Face model given
none gets its MLPs' default), the model loaded where calibration runs (block by block where its weights do
not fit the memory budget: :func:`calibration_memory`), then
:func:`~actsparse_deploy.app.commands.calibrate_to_file`.

    >>> from actsparse_deploy.app.calibrate import RecipeFlags, build_recipe
    >>> flags = RecipeFlags(layers=["fc*"], sparsity=0.5, method="wanda")
    >>> recipe = build_recipe("mine:build", False, None, flags.layers, None, flags.sparsity, None, None, False, flags.method)
    >>> [rule.name for rule in recipe.layers], recipe.defaults.sparse_config, recipe.defaults.method
    ([('fc*',)], (('sparsity_level', 0.5),), 'wanda')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base.errors import MemoryBudgetError
from ..base.files import check_output_path
from ..base.memory import CalibrationPlan, calibration_plan, format_bytes, parse_memory, peak_memory, resident_memory
from .report import Memory

if TYPE_CHECKING:
    from ..calibration.recipe import Recipe
    from ..models.loading import LoadedModel, ModelOptions
    from .report import Report

__all__ = ["Passes", "RecipeFlags", "build_recipe", "calibrate_model", "calibration_memory", "passes", "recipe_for", "recipe_from_flags"]


@dataclass(frozen=True)
class RecipeFlags:
    """The recipe a command line describes: a ``recipe`` file, or a one-rule recipe
    from ``layers`` / ``layer_types`` (with ``sparsity`` or ``threshold``,
    ``aggregate``, ``structured``), else the model's own; ``sparsity`` alone,
    ``method`` and ``compensate`` override a file's or the model's recipe."""

    recipe: Path | None = None
    layers: list[str] | None = None
    layer_types: list[str] | None = None
    sparsity: float | None = None
    threshold: float | None = None
    aggregate: str | None = None
    structured: bool = False
    method: str | None = None
    compensate: str | None = None
    #: attention heads too (``--heads``: :meth:`~actsparse_deploy.calibration.recipe.Recipe.with_heads`)
    heads: bool = False
    #: the masked layers trained towards the dense outputs after selection (``--recover``)
    recover: bool = False

    @property
    def one_rule(self) -> bool:
        """Whether the flags name the layers (a one-rule recipe)."""
        return bool(self.layers or self.layer_types)

    def for_budget(self, max_cost: str | None) -> RecipeFlags:
        """The flags under a cost budget: a one-rule recipe needs a level, which
        the search then sets per layer (0); as they are without a budget."""
        return dataclasses.replace(self, sparsity=0.0) if max_cost is not None and self.one_rule else self


def build_recipe(
    model_name: str,
    builtin: bool,
    recipe: Recipe | str | Path | None,
    layers: list[str] | None,
    layer_types: list[str] | None,
    sparsity: float | None,
    threshold: float | None,
    aggregate: str | None,
    structured: bool,
    method: str | None = None,
    compensate: str | None = None,
) -> Recipe:
    """The recipe the flags describe: a file, a one-rule recipe from flags, or
    the built-in model's own (with --sparsity, --method and --compensate applied
    to it); see :func:`actsparse_deploy.calibration.recipe.resolve_recipe`."""
    from ..calibration.recipe import resolve_recipe
    from ..models.zoo import builtin_recipe_path

    return resolve_recipe(
        model_name, builtin_recipe_path(model_name) if builtin else None, recipe, layers=layers, layer_types=layer_types,
        sparsity=sparsity, threshold=threshold, aggregate=aggregate, structured=structured, method=method, compensate=compensate,
    )


def recipe_from_flags(
    model: str, recipe: Recipe | str | Path | None, sparsity: float | None, *, max_cost: str | None = None,
    layers: list[str] | None = None, layer_types: list[str] | None = None, threshold: float | None = None,
    aggregate: str | None = None, structured: bool = False,
) -> tuple[Recipe | str | Path | None, float | None]:
    """``(recipe, sparsity)`` for :class:`~actsparse_deploy.app.options.CalibrateOptions`
    from a command line's recipe flags, before the model loads: ``layers`` /
    ``layer_types`` (with ``threshold``, ``aggregate``, ``structured``) make a
    one-rule recipe that holds the sparsity (:func:`build_recipe`; a cost budget sets
    its level per layer); otherwise ``recipe`` and ``sparsity`` as given (the model's
    own recipe is resolved once it is loaded).

    >>> recipe, sparsity = recipe_from_flags("digits-mlp", None, 0.5, layers=["fc1"])
    >>> recipe.layers[0].name, recipe.defaults.sparse_config, sparsity
    (('fc1',), (('sparsity_level', 0.5),), None)
    """
    flags = RecipeFlags(None, layers, layer_types, sparsity, threshold, aggregate, structured).for_budget(max_cost)
    if not (flags.one_rule or threshold is not None or aggregate is not None or structured):
        return recipe, sparsity
    # a one-rule recipe, or the error that the flags need layers: never the model's own recipe
    one_rule = build_recipe(model, False, recipe, flags.layers, flags.layer_types, flags.sparsity, threshold, aggregate, structured)
    return one_rule, None  # the method and compensation are applied by convert


def recipe_for(model: str, loaded: LoadedModel, flags: RecipeFlags) -> Recipe:
    """The recipe ``flags`` describe for ``loaded`` (named ``model`` on the command
    line); a Hugging Face model without a recipe or layers: its MLPs' default."""
    base: Recipe | Path | None = flags.recipe
    if flags.recipe is None and not flags.one_rule and loaded.hf is not None:
        from ..models.hf import default_recipe

        base = default_recipe(loaded.module)
    recipe = build_recipe(model, loaded.builtin, base, flags.layers, flags.layer_types, flags.sparsity, flags.threshold,
                          flags.aggregate, flags.structured, flags.method, flags.compensate)
    if flags.heads:
        from ..nn.attention import attention_outputs

        recipe = recipe.with_heads(attention_outputs(loaded.module))
    return recipe


def calibrate_model(
    model: str, output: str | Path, flags: RecipeFlags, *, weights: str | Path | None = None,
    model_options: ModelOptions | None = None, data: str | None = None, batch_size: int = 32, max_cost: str | None = None,
    max_samples: int | None = None, stats_only: bool = False, device: Any = None, group: Any = None, overwrite: bool = False,
    on_stage: Callable[[str, int | None], None] | None = None, on_batch: Callable[[int], None] | None = None,
    max_memory: str | int | None = None,
) -> Report | None:
    """``actsparse calibrate``: check the budget (before the model loads) and the
    output (on the rank that writes it), load ``model`` on ``device``, calibrate
    it with the recipe ``flags`` describe and write ``output``. ``group``: a
    distributed session, whose other ranks than 0 return None (rank 0 reports).
    ``max_memory``: the memory it keeps within (default: what the machine has free); a Hugging Face
    directory whose weights do not fit is calibrated block by block (:func:`calibration_memory`)."""
    from ..calibration.stats import selection_bytes, statistics_bytes
    from ..models.loading import load_model
    from ..nn.modules import weight_bytes
    from .commands import calibrate_to_file

    if max_cost is not None:
        from .budget import check_budget

        check_budget(max_cost)  # a malformed budget fails before the model loads
    flags = flags.for_budget(max_cost)
    if getattr(group, "writer", True):
        check_output_path(Path(output), overwrite)
    plan, in_passes = calibration_memory(model, model_options, flags, max_memory,
                                         in_passes=not (stats_only or max_cost is not None or flags.recover or group is not None))
    by_block = plan is not None and plan.by_block
    if plan is not None and by_block and (max_cost is not None or flags.recover or group is not None):
        raise MemoryBudgetError(f"{_NEEDS_ALL[0 if max_cost is not None else 1 if flags.recover else 2]}, and the model's weights "
                                f"({format_bytes(plan.weights)}) are over the memory budget: calibrate without it, or on a machine with more")
    loaded = load_model(model, weights, model_options, device=device, by_block=by_block)
    recipe = recipe_for(model, loaded, flags)
    if plan is None and max_memory is not None:  # not a Hugging Face directory: its size is known once it is built
        size = weight_bytes(loaded.module)
        layers = recipe.select(loaded.module)
        plan = calibration_plan(size, parse_memory(max_memory), held=max(0, resident_memory() - size), asked=True,
                                statistics=statistics_bytes(loaded.module, layers), selecting=selection_bytes(loaded.module, layers))
    report = calibrate_to_file(
        loaded, recipe, output, data=data, batch_size=batch_size, on_stage=on_stage, on_batch=on_batch,
        max_cost=max_cost, model_options=model_options, max_samples=max_samples, stats_only=stats_only, group=group,
        recover=flags.recover, passes=in_passes,
    )
    if report is None or plan is None or not (plan.by_block or plan.asked or in_passes):
        return report
    return dataclasses.replace(report, memory=Memory(
        peak_bytes=peak_memory(), weights_bytes=plan.weights, budget_bytes=plan.budget, apart=False, one_at_a_time=False,
        by_block=True if plan.by_block else None, passes=len(in_passes) if in_passes else None))


#: what needs the whole model in memory (it cannot run block by block)
_NEEDS_ALL = ("a cost budget (--max-cost) measures sparse copies of the model", "--recover trains the masked layers",
              "a distributed calibration runs a model in each process")


Passes = list[tuple[list[str], str | None]]


def calibration_memory(model: str, options: ModelOptions | None, flags: RecipeFlags, max_memory: str | int | None,
                       in_passes: bool = True) -> tuple[CalibrationPlan | None, Passes | None]:
    """How ``calibrate`` keeps ``model`` within ``max_memory`` (default: what the machine has free), decided before it
    loads for a Hugging Face directory (:func:`~actsparse_deploy.base.memory.calibration_plan`, exit 13 where it does not
    fit even block by block): from its files' size and its layout on the meta device (the statistics of the recipe
    ``flags`` describe, its blocks; ``in_passes``: the statistics may be collected a few blocks at a time). The plan and,
    where it takes the statistics a few blocks at a time, its :func:`passes`; ``(None, None)`` for another model."""
    from ..calibration.stats import layer_statistics_bytes, selection_bytes, statistics_bytes
    from ..models.loading import load_layout
    from ..nn.modules import block_bytes, largest_blocks, weight_bytes

    found = load_layout(model, options)
    if found is None:
        return None, None
    layout, stored = found
    module = layout.module
    layers = recipe_for(model, layout, flags).select(module)
    scale = stored / max(1, weight_bytes(module))  # the layout need not be in the files' dtype (half precision)
    blocks = largest_blocks(module)
    rest = block = per_block = None
    if blocks is not None:
        rest, block = int(scale * (weight_bytes(module) - weight_bytes(module.get_submodule(blocks)))), int(scale * block_bytes(module, blocks))
        if in_passes:
            per_block = [0] * (len(module.get_submodule(blocks)) + 1)  # each block's statistics, then the layers' outside them
            for name, config in layers.items():
                per_block[_block_of(name, blocks, len(per_block) - 1)] += layer_statistics_bytes(module, name, config)
    budget = parse_memory(max_memory) if max_memory is not None else None
    plan = calibration_plan(stored, budget, asked=max_memory is not None, statistics=statistics_bytes(module, layers), rest=rest, block=block,
                            per_block=per_block, selecting=selection_bytes(module, layers))
    if plan.blocks_per_pass is None or blocks is None:
        return plan, None
    return plan, passes(layers, blocks, len(module.get_submodule(blocks)), plan.blocks_per_pass)


def _block_of(layer: str, blocks: str, outside: int) -> int:
    """The index of the block of list ``blocks`` that holds ``layer``; ``outside`` for a layer in none."""
    head, _, tail = layer.partition(blocks + ".")
    index = tail.split(".", 1)[0]
    return int(index) if head == "" and index.isdigit() else outside


def passes(layers: Iterable[str], blocks: str, count: int, per_pass: int) -> Passes:
    """The passes of :func:`~actsparse_deploy.calibration.calibrate.calibrate_in_passes` over ``count`` blocks of the list
    ``blocks``, ``per_pass`` at a time: each pass's layers and the block after which its forward passes stop (the last
    pass, with the layers outside the blocks, runs whole).

    >>> passes(["m.0.fc", "m.1.fc", "m.2.fc", "head"], "m", 3, 2)
    [(['m.0.fc', 'm.1.fc'], 'm.1'), (['m.2.fc', 'head'], None)]
    """
    where = {name: _block_of(name, blocks, count) for name in layers}
    found: Passes = []
    for start in range(0, count, per_pass):
        last = start + per_pass >= count  # the last pass takes the layers outside the blocks (index ``count``) too
        inside = [name for name, index in where.items() if start <= index < start + per_pass or (last and index == count)]
        found.append((inside, None if last else f"{blocks}.{start + per_pass - 1}"))
    return [(names, stop) for names, stop in found if names]
