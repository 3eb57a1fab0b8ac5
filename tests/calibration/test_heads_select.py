"""Selecting whole attention heads: ``heads = true`` in a recipe makes the layer's method
remove whole heads (``round(level x heads)`` of them; grouped-query attention: whole
key/value groups), with ``obs`` scoring each head's joint removal; the recipe refuses
what cannot work before any data is read."""

from __future__ import annotations

import pytest
import torch
import transformers

from actsparse_deploy import Recipe, calibrate
from actsparse_deploy.base.errors import ConfigError, RecipeError
from actsparse_deploy.calibration.methods import METHODS, register_method
from actsparse_deploy.nn.attention import head_blocks

LAYER = "encoder.layer.{}.attention.output.dense"


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, vocab_size=50)
    return transformers.BertModel(config).eval()


def _batches() -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(2)
    return [{"input_ids": torch.randint(0, 50, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)} for _ in range(3)]


def _recipe(method: str, level: float, **extra) -> Recipe:
    return Recipe.from_dict({"version": 1, "defaults": {"method": method, "sparse_config": {"sparsity_level": level}, **extra},
                             "layers": [{"name": LAYER.format("*"), "heads": True}]})


@pytest.fixture(scope="module")
def collected():
    """The tiny BERT and its statistics (``gram``: what every method reads), collected once."""
    from actsparse_deploy.calibration.calibrate import collect

    model = _bert()
    return model, collect(model, _recipe("obs", 0.5), _batches())


@pytest.mark.parametrize("method", ["obs", "wanda", "fluctuation"])
@pytest.mark.parametrize(("level", "removed"), [(0.25, 1), (0.5, 2), (0.6, 2), (0.0, 0)])
def test_each_method_removes_whole_heads(collected, method, level, removed):
    from actsparse_deploy.calibration.calibrate import select

    model, stats = collected
    masks = select(stats, _recipe(method, level), model=model)
    for i in range(2):
        vector = masks[LAYER.format(i)].dense().reshape(-1)
        assert head_blocks(vector, 8)
        assert int((vector.reshape(4, 8)[:, 0] == 0).sum()) == removed


def test_obs_removes_the_head_whose_removal_costs_least():
    model = _bert()
    with torch.no_grad():  # head 2's output columns of layer 0 barely matter: obs must take it first
        model.encoder.layer[0].attention.output.dense.weight[:, 16:24] *= 1e-4
    masks = calibrate(model, _recipe("obs", 0.25), _batches())
    assert masks[LAYER.format(0)].dense().reshape(4, 8)[:, 0].tolist() == [1.0, 1.0, 0.0, 1.0]


def test_the_recipe_refuses_heads_it_cannot_select():
    with pytest.raises(RecipeError, match="heads = true selects whole attention heads with a method"):
        Recipe.from_dict({"version": 1, "defaults": {"sparse_config": {"sparsity_level": 0.5}},
                          "layers": [{"name": "x", "heads": True}]}).select(torch.nn.Sequential())
    with pytest.raises(RecipeError, match=r"heads must be true or false, got 'yes'"):
        Recipe.from_dict({"version": 1, "layers": [{"name": "x", "heads": "yes"}]})


def test_heads_on_a_layer_that_is_not_attention_name_it():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    recipe = Recipe.from_dict({"version": 1, "defaults": {"method": "obs", "sparse_config": {"sparsity_level": 0.5}},
                               "layers": [{"name": "2", "heads": True}]})
    with pytest.raises(ConfigError, match="layer '2'.*not an attention output projection"):
        calibrate(model, recipe, [torch.randn(8, 8)])


def test_a_method_of_yours_that_splits_heads_is_refused():
    @register_method("first_half", needs="moments")
    def first_half(layer, stats, sparsity_level, **config):
        keep = torch.ones(layer.in_features)
        keep[: layer.in_features // 2 + 1] = 0
        return keep

    try:
        with pytest.raises(ConfigError, match="splits blocks of 8 features"):
            calibrate(_bert(), _recipe("first_half", 0.5), _batches())
    finally:
        METHODS.unregister("first_half")


def test_heads_round_trip_through_the_recipe_file():
    recipe = Recipe.from_toml(_recipe("obs", 0.5).dumps())
    assert recipe.layers[0].settings.heads is True
