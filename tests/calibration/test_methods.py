"""Selection methods that see the consumer (actsparse_deploy.calibration.methods): ``wanda``,
``fluctuation`` and ``obs``, registered like the built-in functions, usable from
recipes (``method = "obs"``) and from Python; select computes the masks with the
method and the consumer's new weight / bias with the recipe's ``compensate``."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from actsparse_deploy import Masks, Recipe, Statistics, calibrate, collect, select
from actsparse_deploy.base.errors import ConfigError, MaskError, RecipeError, UnknownFunctionError
from actsparse_deploy.calibration.functions import AGGREGATE_FNS, LayerStats
from actsparse_deploy.calibration.methods import METHODS, Method, register_method

from ..helpers import TinyConv, TinyMLP

#: every built-in method -> the tests of its numbers (checked below: a new method needs its own)
METHOD_TESTS = {
    "wanda": ["test_wanda_scores_activation_norm_times_weight_column_norm"],
    "fluctuation": ["test_fluctuation_scores_variance_times_squared_weight_column_norm"],
    "obs": ["test_obs_removing_one_feature_picks_the_least_reconstruction_error", "test_obs_removes_dependent_features_at_no_error"],
}


def _stats(x: torch.Tensor, aggregate: str, sample_ndim: int = 1) -> LayerStats:
    stat = AGGREGATE_FNS.get(aggregate).update(None, x, sample_ndim=sample_ndim)
    return LayerStats(stat=stat, input_shape=tuple(x.shape[1:]), aggregate=aggregate, num_samples=len(x), num_batches=1)


def _data(n: int = 80, d: int = 8) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n, d) * torch.linspace(0.2, 2.0, d) + torch.linspace(-1.0, 1.0, d)


def _kept(scores: torch.Tensor, level: float) -> torch.Tensor:
    """The reference top-k: drop the round(level * d) smallest scores."""
    k = round(level * scores.numel())
    keep = torch.ones(scores.numel())
    keep[torch.argsort(scores, stable=True)[:k]] = 0.0
    return keep


@pytest.mark.parametrize("level", [0.25, 0.5])
def test_wanda_scores_activation_norm_times_weight_column_norm(level):
    torch.manual_seed(1)
    layer, x = nn.Linear(8, 5), _data()
    mask = METHODS.get("wanda")(layer, _stats(x, "moments"), level)
    xn = np.sqrt((x.double().numpy() ** 2).mean(axis=0))
    wn = np.linalg.norm(layer.weight.detach().double().numpy(), axis=0)
    assert_close(mask, _kept(torch.from_numpy(xn * wn), level))
    assert int((mask == 0).sum()) == round(level * 8)


@pytest.mark.parametrize("level", [0.25, 0.5])
def test_fluctuation_scores_variance_times_squared_weight_column_norm(level):
    torch.manual_seed(2)
    layer, x = nn.Linear(8, 5), _data()
    mask = METHODS.get("fluctuation")(layer, _stats(x, "moments"), level)
    var = x.double().numpy().var(axis=0)
    wn2 = (layer.weight.detach().double().numpy() ** 2).sum(axis=0)
    assert_close(mask, _kept(torch.from_numpy(var * wn2), level))
    # the same from the Gram statistic (a superset of the moments)
    assert_close(METHODS.get("fluctuation")(layer, _stats(x, "gram"), level), mask)


def _lstsq_error(layer: nn.Linear, x: torch.Tensor, kept: list[int]) -> float:
    """Squared error of the best affine refit of the layer's output from the kept features."""
    target = layer(x).detach().double()
    design = torch.cat([x.double()[:, kept], torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, target).solution
    return float(((design @ solution - target) ** 2).sum())


def test_obs_removing_one_feature_picks_the_least_reconstruction_error():
    torch.manual_seed(3)
    x = torch.randn(300, 6) @ torch.randn(6, 6)  # correlated features
    for seed in range(5):
        torch.manual_seed(seed)
        layer = nn.Linear(6, 4)
        mask = METHODS.get("obs")(layer, _stats(x, "gram"), 1 / 6, damping=0.0)
        errors = [_lstsq_error(layer, x, [k for k in range(6) if k != j]) for j in range(6)]
        assert int(mask.argmin()) == int(np.argmin(errors)), (seed, errors)


def _obs_reference(layer: nn.Module, stats: LayerStats, level: float, damping: float, group: int) -> torch.Tensor:
    """Greedy OBS written plainly: the whole (d+1) x (d+1) inverse updated after every group."""
    h = stats.stat.per_sample.double()
    d = h.shape[0] - 1
    hinv = torch.linalg.inv(h + damping * float(h.diagonal().mean()) * torch.eye(d + 1, dtype=torch.float64))
    w = torch.cat([layer.weight.detach().double(), torch.zeros(layer.weight.shape[0], 1, dtype=torch.float64)], 1)
    removed = torch.zeros(d + 1, dtype=torch.bool)
    removed[d] = True
    keep = torch.ones(d)
    left = round(level * d)
    while left:
        error = torch.where(removed, math.inf, (w * w).sum(0) / hinv.diagonal())
        chosen = torch.topk(error, min(group, left), largest=False, sorted=True).indices
        rows = hinv[chosen]
        inv_block = torch.linalg.pinv(rows[:, chosen], hermitian=True)
        w -= (w[:, chosen] @ inv_block) @ rows
        hinv -= rows.T @ (inv_block @ rows)
        removed[chosen] = True
        keep[chosen] = 0.0
        left -= len(chosen)
    return keep


@pytest.mark.parametrize("level", [0.1, 0.5, 0.9])
def test_obs_low_rank_steps_equal_the_plain_full_update(monkeypatch, level):
    """obs keeps H^-1 as its start less low-rank terms (methods.obs_steps): the
    masks equal those of the plain algorithm, in groups of 4 here (d=40, width 10)."""
    from actsparse_deploy.calibration import methods

    monkeypatch.setattr(methods, "OBS_EXACT_WIDTH", 10)
    torch.manual_seed(5)
    layer = nn.Linear(40, 12)
    x = torch.randn(400, 40) @ torch.randn(40, 40) * 0.3 + torch.randn(40)
    stats = _stats(x, "gram")
    mask = METHODS.get("obs")(layer, stats, level, damping=0.01)
    assert_close(mask.reshape(-1), _obs_reference(layer, stats, level, 0.01, group=4))
    assert int((mask == 0).sum()) == round(level * 40)


def test_obs_removes_dependent_features_at_no_error():
    torch.manual_seed(4)
    base = torch.randn(100, 5)
    x = torch.cat([base, (base[:, :1] - base[:, 1:2]) * 3 + 1, base[:, 2:3] + base[:, 4:5]], dim=1)  # 7 features, 2 dependent
    layer = nn.Linear(7, 3)
    mask = METHODS.get("obs")(layer, _stats(x, "gram"), 2 / 7, damping=0.0)
    kept = [j for j in range(7) if mask[j] == 1]
    assert len(kept) == 5 and _lstsq_error(layer, x, kept) < 1e-6
    # a magnitude score would not find them
    exhaustive = min(_lstsq_error(layer, x, list(c)) for c in itertools.combinations(range(7), 5))
    assert exhaustive < 1e-6


def test_methods_on_a_conv_give_structured_masks_per_channel():
    torch.manual_seed(5)
    layer = nn.Conv2d(6, 4, 3, padding=1)
    x = torch.randn(5, 6, 7, 7)
    for name in METHODS.names():
        mask = METHODS.get(name)(layer, _stats(x, METHODS.get(name).needs), 0.5)
        assert mask.shape == (6, 1, 1) and int((mask == 0).sum()) == 3


def test_every_registered_method_is_exercised():
    assert set(METHODS.names()) == {"wanda", "fluctuation", "obs"}
    assert set(METHOD_TESTS) == set(METHODS.names())
    assert all(callable(globals().get(test)) for tests in METHOD_TESTS.values() for test in tests)
    assert {name: METHODS.get(name).needs for name in METHODS.names()} == {"wanda": "moments", "fluctuation": "moments", "obs": "gram"}


def test_unknown_method_lists_known_ones():
    with pytest.raises(UnknownFunctionError, match=r"unknown method 'nope'; known: fluctuation, obs, wanda$"):
        METHODS.get("nope")


def test_methods_refuse_what_they_cannot_use():
    layer = nn.Linear(8, 2)
    with pytest.raises(ConfigError, match="needs the 'gram' statistic"):
        METHODS.get("obs")(layer, _stats(_data(), "moments"), 0.5)
    with pytest.raises(ConfigError, match="sparsity_level"):
        METHODS.get("wanda")(layer, _stats(_data(), "moments"), 1.5)
    with pytest.raises(ConfigError, match="ReLU"):
        METHODS.get("wanda")(nn.ReLU(), _stats(_data(), "moments"), 0.5)
    with pytest.raises(ConfigError, match="8 input features.*takes 5"):
        METHODS.get("wanda")(nn.Linear(5, 2), _stats(_data(), "moments"), 0.5)


def test_register_method_decorator():
    @register_method("first_half", needs="moments")
    def first_half(layer, stats, sparsity_level, **config):
        d = layer.weight.shape[1]
        return (torch.arange(d) < d * (1 - sparsity_level)).float()

    try:
        assert isinstance(METHODS.get("first_half"), Method)
        assert METHODS.get("first_half")(nn.Linear(4, 2), _stats(torch.randn(3, 4), "moments"), 0.5).tolist() == [1, 1, 0, 0]
        with pytest.raises(ValueError, match="already registered"):
            register_method("first_half", needs="moments")(first_half)
        with pytest.raises(ValueError, match="needs"):
            register_method("other", needs="sum")(first_half)
    finally:
        METHODS.unregister("first_half")


# --- recipes and select -------------------------------------------------------------


def _mlp() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP()


def _batches() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(16, 6) for _ in range(3)]


def _recipe(**settings) -> Recipe:
    return Recipe.from_dict({"defaults": {"sparse_config": {"sparsity_level": 0.5}, **settings}, "layers": [{"name": "fc3"}]})


@pytest.mark.parametrize(
    ("settings", "aggregate"),
    [
        ({"method": "wanda"}, "moments"),
        ({"method": "fluctuation", "compensate": "bias"}, "moments"),
        ({"method": "fluctuation", "compensate": "lstsq"}, "gram"),
        ({"method": "obs"}, "gram"),
        ({"aggregate_fn": "max_abs", "method": "obs", "compensate": "lstsq", "damping": 0.1}, "gram"),
    ],
)
def test_collect_gathers_what_method_and_compensation_need(settings, aggregate):
    stats = collect(_mlp(), _recipe(**settings), _batches())
    assert stats["fc3"].aggregate == aggregate


def _output_with_edits(model: nn.Module, masks: Masks, x: torch.Tensor) -> torch.Tensor:
    """The model with each layer's edits applied and its input multiplied by the mask (``mul``)."""
    import copy

    model = copy.deepcopy(model)
    for name, lm in masks.layers.items():
        layer = model.get_submodule(name)
        with torch.no_grad():
            if lm.weight is not None:
                layer.weight = nn.Parameter(lm.weight.clone())
            if lm.bias is not None:
                layer.bias = nn.Parameter(lm.bias.clone())
        mask = lm.mask
        layer.register_forward_pre_hook(lambda m, inp, mask=mask: (inp[0] * mask,))
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("compensation", ["none", "bias", "lstsq"])
def test_calibrate_with_a_method_computes_masks_and_edits(compensation, tmp_path):
    model, batches = _mlp(), _batches()
    recipe = _recipe(method="obs", compensate=compensation, damping=0.01)
    masks = calibrate(model, recipe, batches)
    lm = masks["fc3"]
    assert lm.mask.shape == (8,) and lm.sparsity == 0.5
    assert (lm.method, lm.compensate, lm.damping) == ("obs", compensation, 0.01)
    if compensation == "none":
        assert lm.weight is None and lm.bias is None
    else:
        assert lm.weight.shape == (3, 8) and lm.bias.shape == (3,)
    path = tmp_path / "masks.safetensors"
    masks.save(path)
    loaded = Masks.load(path)["fc3"]
    for a, b in ((loaded.weight, lm.weight), (loaded.bias, lm.bias)):
        assert (a is None and b is None) or torch.equal(a, b)
    assert (loaded.method, loaded.compensate, loaded.damping) == ("obs", compensation, 0.01)
    # compensation lowers the error on the calibration data
    x = torch.cat(batches)
    dense = model(x).detach()
    error = float(((_output_with_edits(model, masks, x) - dense) ** 2).mean())
    plain = calibrate(model, _recipe(method="obs"), batches)
    plain_error = float(((_output_with_edits(model, plain, x) - dense) ** 2).mean())
    if compensation != "none":
        assert error < plain_error


def test_lstsq_chooses_its_damping_per_layer_unless_the_recipe_sets_one_and_the_masks_record_it():
    from actsparse_deploy.calibration.compensate import DAMPING_GRID, lstsq_refit

    model, batches = _mlp(), _batches()
    stats = collect(model, _recipe(method="obs", compensate="lstsq"), batches)
    lm = select(stats, model=model)["fc3"]
    weight, bias, damping = lstsq_refit(model.fc3, stats["fc3"], lm.mask)
    assert lm.damping == damping and damping in DAMPING_GRID
    assert torch.equal(lm.weight, weight) and torch.equal(lm.bias, bias)
    assert select(stats, model=model).summary()[0]["damping"] == damping  # the layer row says how it was compensated
    lm.check("fc3")
    fixed = select(stats, _recipe(method="obs", compensate="lstsq", damping=0.05), model=model)["fc3"]
    assert fixed.damping == 0.05 and not torch.equal(fixed.weight, lm.weight)


def test_select_needs_the_model_for_a_method():
    model = _mlp()
    stats = collect(model, _recipe(method="wanda"), _batches())
    with pytest.raises(ConfigError, match="method 'wanda' .* needs the model: pass model="):
        select(stats)
    assert select(stats, model=model)["fc3"].sparsity == 0.5
    saved = Statistics(layers=stats.layers, recipe=stats.recipe, num_samples=stats.num_samples, num_batches=stats.num_batches)
    other = _recipe(method="fluctuation", compensate="bias")  # same aggregate: selects again from the same statistics
    assert select(saved, other, model=model)["fc3"].bias is not None
    with pytest.raises(RecipeError, match="collected with aggregate_fn 'moments'.* 'gram'"):
        select(saved, _recipe(method="obs"), model=model)


def test_recipes_without_a_method_give_the_same_masks_as_before():
    model, batches = _mlp(), _batches()
    recipe = Recipe.from_dict({"defaults": {"aggregate_fn": "max_abs", "reduce_fn": "feature_mean", "sparse_config": {"sparsity_level": 0.5}}, "layers": [{"name": "fc3"}]})
    stats = collect(model, recipe, batches)
    assert stats["fc3"].aggregate == "max_abs"
    a, b = select(stats)["fc3"], select(stats, model=model)["fc3"]
    x = torch.cat(batches)
    h = model.act(model.fc2(model.act(model.fc1(x)))).abs().amax(0)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.mask, _kept(h, 0.5))
    assert a.weight is None and a.method is None and a.compensate is None


def test_conv_model_with_method_and_bias_compensation():
    torch.manual_seed(0)
    model = TinyConv()
    x = torch.randn(6, 1, 8, 8)
    recipe = Recipe.from_dict({"defaults": {"method": "fluctuation", "compensate": "lstsq", "sparse_config": {"sparsity_level": 0.5}}, "layers": [{"name": "conv2"}, {"name": "fc"}]})
    masks = calibrate(model, recipe, [x[:3], x[3:]])
    assert masks["conv2"].mask.shape == (4, 1, 1) and masks["fc"].mask.shape == (5,)
    # a 3x3 conv cannot be refit per position: bias compensation, and the reason recorded
    assert masks["conv2"].compensate == "bias" and "3x3" in (masks["conv2"].note or "")
    assert masks["fc"].compensate == "lstsq"
    assert any("conv2" in line and "bias" in line for line in masks.notes())


def test_layer_mask_edits_are_checked():
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    from actsparse_deploy.calibration.masks import LayerMask

    good = LayerMask(mask, input_shape=(4,), weight=torch.ones(2, 4), bias=torch.zeros(2), method="wanda", compensate="bias", damping=0.0)
    Masks({"fc": good})
    for kwargs, message in (
        ({"weight": torch.full((2, 4), float("nan"))}, "weight of layer 'fc' holds NaN or Inf"),
        ({"weight": torch.ones(2, 5)}, "weight of layer 'fc' has 5 input features"),
        ({"bias": torch.zeros(3)}, "bias of layer 'fc' has shape \\[3\\]"),
        ({"bias": torch.zeros(2, dtype=torch.int64)}, "bias of layer 'fc' is int64"),
        ({"compensate": "ridge"}, "compensate 'ridge' of layer 'fc'"),
        ({"damping": math.inf}, "damping inf of layer 'fc'"),
        ({"method": ""}, "method '' of layer 'fc'"),
    ):
        with pytest.raises(MaskError, match=message):
            Masks({"fc": LayerMask(**{**good.__dict__, **kwargs})})


@pytest.mark.parametrize("method", ["fluctuation", "obs"])
def test_method_statistics_merge_save_and_select_like_one_collection(method, tmp_path):
    """moments / gram statistics of two batch sets merged equal those collected
    over both (batch sizes differ), survive a file, and select the same masks and edits."""
    model, batches = _mlp(), _batches()
    torch.manual_seed(9)
    more = [torch.randn(5, 6), torch.randn(11, 6)]
    recipe = _recipe(method=method, compensate="lstsq")
    both = collect(model, recipe, batches + more)
    merged = collect(model, recipe, batches).merge(collect(model, recipe, more))
    assert merged["fc3"].count == both["fc3"].count == 64
    assert_close(merged["fc3"].stat.value, both["fc3"].stat.value, rtol=1e-12, atol=1e-9)
    merged.save(tmp_path / "stats.safetensors")
    loaded = Statistics.load(tmp_path / "stats.safetensors")
    a, b = select(loaded, model=model)["fc3"], select(both, model=model)["fc3"]
    assert torch.equal(a.mask, b.mask)
    assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-6)
    assert_close(a.bias, b.bias, rtol=1e-6, atol=1e-6)
