"""Recipes: TOML and Python objects, layer selection, overrides, errors."""

from __future__ import annotations

import pytest
from torch import nn

from actsparse_deploy.base.errors import RecipeError
from actsparse_deploy.calibration.recipe import FnSpec, LayerRule, LayerSettings, Recipe
from actsparse_deploy.models.zoo import builtin_names, builtin_recipe_path, load_builtin

from ..helpers import TinyConv, TinyMLP

FULL = """
version = 1

[defaults]
aggregate_fn = "sum_sq"
reduce_fn = { name = "feature_mean", axis = 0 }
mask_fn = "topk"
sparse_config = { sparsity_level = 0.5 }

[[layers]]
name = "fc*"
type = "Linear"

[[layers]]
name = "fc3"
mask_fn = "threshold"
sparse_config = { threshold = 0.2 }

[[layers]]
type = "Conv2d"
features = [0, 2]
feature_dim = 1
"""


def test_selection_and_overrides():
    recipe = Recipe.from_toml(FULL)
    model = TinyMLP()
    model.conv = nn.Conv2d(1, 3, 1)
    selected = recipe.select(model)
    assert list(selected) == ["fc1", "fc2", "fc3", "conv"]
    assert selected["conv"].features == [0, 2] and selected["conv"].feature_dim == 1
    assert selected["fc1"].features is None
    fc2, fc3 = selected["fc2"], selected["fc3"]
    assert (fc2.aggregate_fn.name, fc2.reduce_fn.spec, fc2.mask_fn.name) == ("sum_sq", {"name": "feature_mean", "axis": 0}, "topk")
    assert fc2.sparse_config == {"sparsity_level": 0.5}
    assert fc3.mask_fn.name == "threshold"
    assert fc3.sparse_config == {"sparsity_level": 0.5, "threshold": 0.2}  # merged key by key
    assert fc3.register_kwargs()["threshold"] == 0.2


def test_type_rule_matches_module_class():
    recipe = Recipe.from_dict(
        {"defaults": {"sparse_config": {"sparsity_level": 0.25}}, "layers": [{"type": "Conv2d", "features": [0, 2], "feature_dim": 1}]}
    )
    selected = recipe.select(TinyConv())
    assert list(selected) == ["conv1", "conv2"]
    assert selected["conv2"].features == [0, 2] and selected["conv2"].feature_dim == 1
    assert Recipe.simple(layer_types=["torch.nn.modules.conv.Conv2d"], sparsity=0.1).select(TinyConv()).keys() == {"conv1", "conv2"}


def test_tool_defaults_fill_unset_functions():
    recipe = Recipe.from_dict({"layers": [{"name": "fc2", "sparse_config": {"sparsity_level": 0.5}}]})
    layer = recipe.select(TinyMLP())["fc2"]
    assert (layer.aggregate_fn.name, layer.reduce_fn.name, layer.mask_fn.name) == ("sum_abs", "mean", "topk")


def test_python_objects_equal_toml():
    from_toml = Recipe.from_toml(FULL)
    built = Recipe(
        defaults=LayerSettings(
            aggregate_fn=FnSpec("sum_sq"),
            reduce_fn=FnSpec("feature_mean", (("axis", 0),)),
            mask_fn=FnSpec("topk"),
            sparse_config=(("sparsity_level", 0.5),),
        ),
        layers=(
            LayerRule(name=("fc*",), type=("Linear",)),
            LayerRule(name=("fc3",), settings=LayerSettings(mask_fn=FnSpec("threshold"), sparse_config=(("threshold", 0.2),))),
            LayerRule(type=("Conv2d",), settings=LayerSettings(features=(0, 2), feature_dim=1)),
        ),
    )
    assert built == from_toml


@pytest.mark.parametrize("text", [FULL, *(p.read_text() for p in map(builtin_recipe_path, builtin_names()))])
def test_parse_dump_parse_is_identity(text):
    recipe = Recipe.from_toml(text)
    again = Recipe.from_toml(recipe.dumps())
    assert again == recipe
    assert again.dumps() == recipe.dumps()


def test_with_sparsity_overrides_every_level():
    recipe = Recipe.load(builtin_recipe_path("digits-cnn")).with_sparsity(0.75)
    selected = recipe.select(load_builtin("digits-cnn"))
    assert {c.sparse_config["sparsity_level"] for c in selected.values()} == {0.75}


BAD = {
    "not TOML": ("[defaults\nmask_fn = 1", "not valid TOML"),
    "unknown top key": ('layer = 1\n[[layers]]\nname = "fc1"', "unknown key(s) 'layer'"),
    "unknown layer key": ('[[layers]]\nname = "fc1"\nsparsity = 0.5', "unknown key(s) 'sparsity'"),
    "unknown function": ('[defaults]\nmask_fn = "top_k"\n[[layers]]\nname = "fc1"', "known: block, threshold, topk"),
    "unknown reduce param": ('[defaults]\nreduce_fn = { name = "feature_mean", dim = 1 }\n[[layers]]\nname = "fc1"', "no parameter 'dim'"),
    "sparsity above 1": ('[defaults]\nsparse_config = { sparsity_level = 1.5 }\n[[layers]]\nname = "fc1"', "[0, 1]"),
    "sparsity below 0": ('[[layers]]\nname = "fc1"\nsparse_config = { sparsity_level = -0.1 }', "[0, 1]"),
    "features without feature_dim": ('[defaults]\nsparse_config = { sparsity_level = 0.5 }\n[[layers]]\nname = "fc1"\nfeatures = [1]', "without feature_dim"),
    "missing mask config": ('[[layers]]\nname = "fc1"', "needs sparse_config 'sparsity_level'"),
    "unknown mask config": ('[[layers]]\nname = "fc1"\nsparse_config = { sparsity_level = 0.5, levle = 1 }', "no sparse_config key 'levle'"),
    "no layers": ("[defaults]\nmask_fn = 'topk'", "selects no layers"),
    "rule without selector": ("[[layers]]\nmask_fn = 'topk'", "needs 'name'"),
    "newer version": ('version = 2\n[[layers]]\nname = "fc1"', "version 2 is not supported"),
    "bad features": ('[[layers]]\nname = "fc1"\nfeatures = ["a"]\nfeature_dim = 1', "list of integer"),
    "unknown method": ('[defaults]\nmethod = "optimal"\n[[layers]]\nname = "fc1"', "unknown method 'optimal'; known: fluctuation, obs, wanda"),
    "method not a name": ('[[layers]]\nname = "fc1"\nmethod = 3', "unknown method 3"),
    "unknown compensation": ('[defaults]\nmethod = "obs"\ncompensate = "ridge"\n[[layers]]\nname = "fc1"', "compensate must be one of none, bias, lstsq, got 'ridge'"),
    "negative damping": ('[defaults]\nmethod = "obs"\ndamping = -0.1\n[[layers]]\nname = "fc1"', "damping must be a finite number >= 0"),
    "nan damping": ('[defaults]\nmethod = "obs"\ndamping = nan\n[[layers]]\nname = "fc1"', "damping must be a finite number >= 0"),
    "damping a string": ('[defaults]\nmethod = "obs"\ndamping = "0.1"\n[[layers]]\nname = "fc1"', "damping must be a finite number >= 0"),
    "compensation without method": ('[defaults]\ncompensate = "bias"\nsparse_config = { sparsity_level = 0.5 }\n[[layers]]\nname = "fc1"', "compensate = 'bias' needs a method"),
    "method with features": ('[defaults]\nmethod = "wanda"\nsparse_config = { sparsity_level = 0.5 }\n[[layers]]\nname = "fc1"\nfeatures = [1]\nfeature_dim = -1', "does not take per-feature masks"),
    "gram with features": ('[defaults]\naggregate_fn = "gram"\nsparse_config = { sparsity_level = 0.5 }\n[[layers]]\nname = "fc1"\nfeatures = [1]\nfeature_dim = -1', "does not take per-feature masks"),
    "method without sparsity": ('[defaults]\nmethod = "wanda"\nsparse_config = { threshold = 0.5 }\n[[layers]]\nname = "fc1"', "needs sparse_config.sparsity_level"),
}

METHOD_RECIPE = """
version = 1

[defaults]
aggregate_fn = "max_abs"
method = "obs"
compensate = "lstsq"
damping = 0.05
sparse_config = { sparsity_level = 0.5 }

[[layers]]
name = "fc2"
method = "fluctuation"
compensate = "bias"

[[layers]]
name = "fc3"
"""


def test_method_keys_parse_dump_and_resolve():
    recipe = Recipe.from_toml(METHOD_RECIPE)
    assert Recipe.from_toml(recipe.dumps()) == recipe
    assert recipe.defaults.method == "obs" and recipe.layers[0].settings.compensate == "bias"
    selected = recipe.select(TinyMLP())
    fc2, fc3 = selected["fc2"], selected["fc3"]
    assert (fc2.method.name, fc2.compensate, fc2.damping, fc2.aggregate_fn.name) == ("fluctuation", "bias", 0.05, "moments")
    assert (fc3.method.name, fc3.compensate, fc3.damping, fc3.aggregate_fn.name) == ("obs", "lstsq", 0.05, "gram")
    plain = Recipe.simple(layers=["fc1"], sparsity=0.5, aggregate_fn="sum_sq").select(TinyMLP())["fc1"]
    assert (plain.method, plain.compensate, plain.aggregate_fn.name) == (None, "none", "sum_sq")


def test_with_method_overrides_every_rule():
    recipe = Recipe.from_toml(METHOD_RECIPE).with_method("wanda", "none")
    selected = recipe.select(TinyMLP())
    assert {(c.method.name, c.compensate, c.aggregate_fn.name) for c in selected.values()} == {("wanda", "none", "moments")}
    with pytest.raises(RecipeError, match="unknown method 'x'"):
        recipe.with_method("x")
    with pytest.raises(RecipeError, match="compensate must be one of"):
        recipe.with_method(compensate="x")


def test_bad_method_in_recipe_exits_3(tmp_path):
    from ..helpers import invoke

    path = tmp_path / "r.toml"
    path.write_text(BAD["unknown method"][0])
    result = invoke("calibrate", "digits-mlp", "--recipe", path, "-o", tmp_path / "m.safetensors")
    assert result.exit_code == 3, result.output
    assert "unknown method 'optimal'; known: fluctuation, obs, wanda" in result.stderr
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("case", sorted(BAD))
def test_recipe_errors(case, tmp_path):
    text, message = BAD[case]
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        Recipe.load(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_pattern_that_matches_nothing_names_the_rule():
    recipe = Recipe.simple(layers=["decoder.*"], sparsity=0.5)
    with pytest.raises(RecipeError, match=r"layers\[0\] \(name=decoder\.\*\) matches no module.*fc1 \(Linear\)"):
        recipe.select(TinyMLP())


def test_missing_file():
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.load("/nonexistent/recipe.toml")


def test_simple_needs_one_of_sparsity_threshold():
    with pytest.raises(RecipeError, match="exactly one"):
        Recipe.simple(layers=["fc1"])
    with pytest.raises(RecipeError, match="name the layers"):
        Recipe.simple(sparsity=0.5)
    model = nn.Sequential(nn.Linear(2, 2))
    assert Recipe.simple(layers=["0"], threshold=0.1).select(model)["0"].mask_fn.name == "threshold"
