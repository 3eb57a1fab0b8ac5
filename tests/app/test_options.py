"""convert's options (actsparse_deploy.app.options): one frozen group per stage,
each checked once in its own ``__post_init__``; flat keywords go to their group."""

from __future__ import annotations

import dataclasses

import pytest

from actsparse_deploy.app.calibrate import recipe_from_flags
from actsparse_deploy.app.options import (
    CalibrateOptions,
    ConvertOptions,
    ExportOptions,
    LoadOptions,
    SquashOptions,
    ValidateOptions,
)
from actsparse_deploy.app.pipeline import convert
from actsparse_deploy.base.errors import DataError, ExportError, ModelLoadError, RecipeError, SquashError, UsageError, ValidationError
from actsparse_deploy.calibration.recipe import Recipe
from actsparse_deploy.models.loading import ModelOptions


@pytest.mark.parametrize(
    ("group", "kwargs", "error", "message"),
    [
        (LoadOptions, {"batch_size": 0}, DataError, "batch size must be a positive integer"),
        (LoadOptions, {"batch_size": True}, DataError, "batch size must be a positive integer"),
        (CalibrateOptions, {"max_samples": 0}, DataError, "max_samples must be a positive integer"),
        (CalibrateOptions, {"compensate": "magic"}, RecipeError, "unknown compensation 'magic'; known: none, bias, lstsq"),
        (CalibrateOptions, {"method": ""}, RecipeError, "method must be the name of a selection method"),
        (CalibrateOptions, {"max_cost": "cosine=0.9", "sparsity": 0.5}, RecipeError, r"give a sparsity or a cost budget \(max_cost\), not both"),
        (CalibrateOptions, {"max_cost": "cosine=0.9", "group": object()}, RecipeError, "not supported in distributed calibration"),
        (CalibrateOptions, {"max_cost": "cosine=2"}, RecipeError, "outside"),
        (CalibrateOptions, {"device": "tpu"}, UsageError, "is not one of cpu, cuda, cuda:N"),
        (CalibrateOptions, {"max_cost": "cosine=0.9", "device": "cuda"}, UsageError, "the cost budget search runs on the CPU"),
        (SquashOptions, {"mode": "squeeze"}, SquashError, "unknown squash mode 'squeeze'; known: auto, mul, fold, prune"),
        (ExportOptions, {"exporter": "tf"}, ExportError, "unknown exporter 'tf'"),
        (ExportOptions, {"opset": -3}, UsageError, "opset -3 is not one the exporters support"),
        (ExportOptions, {"dynamic_axes": ("input",)}, ExportError, "a dynamic axis is NAME:AXIS:LABEL"),
        (ValidateOptions, {"atol": float("inf")}, ValidationError, "tolerances must be non-negative numbers, finite"),
        (ValidateOptions, {"timeout": -1}, ValidationError, "timeout must be a positive number of seconds"),
    ],
)
def test_each_group_checks_itself(group, kwargs, error, message):
    with pytest.raises(error, match=message):
        group(**kwargs)
    with pytest.raises(error, match=message):  # the same check, once, from the flat keywords
        ConvertOptions(**kwargs)


def test_flat_keywords_go_to_their_group():
    flat = ConvertOptions(weights="w.safetensors", batch_size=8, task="causal-lm", sparsity=0.25, method="wanda", mode="fold",
                          opset=17, dynamic_axes=["x:1:seq"], atol=1e-3, overwrite=True, threads=2, latency=False)
    grouped = ConvertOptions(
        LoadOptions(weights="w.safetensors", batch_size=8, model=ModelOptions(task="causal-lm")),
        CalibrateOptions(sparsity=0.25, method="wanda"), SquashOptions("fold"), ExportOptions(opset=17, dynamic_axes=("x:1:seq",)),
        ValidateOptions(atol=1e-3), overwrite=True, threads=2, latency=False,
    )
    assert flat == grouped
    assert flat.export.dynamic_axes == ("x:1:seq",)  # a list given is kept as a tuple (frozen all the way down)
    assert flat.load.model == ModelOptions(task="causal-lm") and flat.writer


def test_defaults_are_the_groups_defaults():
    options = ConvertOptions()
    assert (options.load, options.calibrate, options.squash, options.export, options.validate) == (
        LoadOptions(), CalibrateOptions(), SquashOptions(), ExportOptions(), ValidateOptions())
    assert (options.overwrite, options.threads, options.latency, options.on_stage) == (False, None, True, None)


def test_a_group_and_its_keywords_or_an_unknown_keyword_are_refused():
    with pytest.raises(TypeError, match="`squash` and its keyword 'mode'"):
        ConvertOptions(squash=SquashOptions("fold"), mode="prune")
    with pytest.raises(TypeError, match="`model` and its keyword 'task'"):
        ConvertOptions(LoadOptions(), task="causal-lm")
    with pytest.raises(TypeError, match="unexpected keyword argument 'sparsty'"):
        ConvertOptions(sparsty=0.5)


def test_replace_checks_the_new_group_and_keeps_the_others():
    options = ConvertOptions(mode="fold", atol=1e-3)
    changed = dataclasses.replace(options, calibrate=CalibrateOptions(sparsity=0.5), overwrite=True)
    assert changed.calibrate.sparsity == 0.5 and changed.squash.mode == "fold" and changed.overwrite
    with pytest.raises(ModelLoadError, match="unknown `task` 'poetry'"):
        dataclasses.replace(options.load, model=ModelOptions(task="poetry"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.squash.mode = "prune"  # type: ignore[misc]


def test_convert_takes_one_options_object_or_its_keywords_not_both(tmp_path):
    with pytest.raises(TypeError, match="`options` and the keyword 'overwrite'"):
        convert("digits-mlp", tmp_path / "out", ConvertOptions(), overwrite=True)
    assert not (tmp_path / "out").exists()


def test_convert_with_an_options_object_is_convert_with_its_keywords(tmp_path):
    options = ConvertOptions(LoadOptions(batch_size=50), squash=SquashOptions("mul"), latency=False)
    report = convert("digits-mlp", tmp_path / "a", options)
    same = convert("digits-mlp", tmp_path / "b", batch_size=50, mode="mul", latency=False)
    assert report is not None and same is not None
    assert report.squash_mode == same.squash_mode == "mul" and report.latency is None
    assert report.overall_sparsity == same.overall_sparsity and report.layers == same.layers


def test_the_recipe_flags_make_one_rule_that_holds_the_level():
    recipe, sparsity = recipe_from_flags("digits-mlp", None, 0.5, layers=["fc1"])
    assert isinstance(recipe, Recipe) and sparsity is None
    assert [rule.name for rule in recipe.layers] == [("fc1",)]
    budget_recipe, _ = recipe_from_flags("digits-mlp", None, None, max_cost="cosine=0.9", layers=["fc1"])
    assert budget_recipe.defaults.sparse_config == (("sparsity_level", 0.0),)  # a level to start from: the search sets each
    assert recipe_from_flags("digits-mlp", "r.toml", 0.25) == ("r.toml", 0.25)  # no rule flags: as given
    with pytest.raises(RecipeError, match="give `layers` too"):
        recipe_from_flags("digits-mlp", None, None, threshold=0.1)
