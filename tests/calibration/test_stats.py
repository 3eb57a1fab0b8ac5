"""Calibration in two steps: collect -> Statistics -> select. Statistics merge
associatively (equal to collecting over both batch sets), save to and load from
.safetensors (hostile files refused, exit code 8), and select gives the masks
calibrate gives."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.testing import assert_close

from actsparse_deploy import (
    ActivationSparsifier,
    Recipe,
    Statistics,
    calibrate,
    collect,
    select,
)
from actsparse_deploy.base.errors import (
    CalibrationError,
    ConfigError,
    DataError,
    MaskError,
    RecipeError,
)
from actsparse_deploy.calibration.functions import (
    AGGREGATE_FNS,
    REDUCE_FNS,
    Aggregate,
    BuiltinFn,
    RunningStat,
)

from ..helpers import TinyConv, TinyMLP

MLP_RECIPE = {
    "defaults": {"aggregate_fn": "sum_abs", "sparse_config": {"sparsity_level": 0.5}},
    "layers": [
        {"name": "fc2"},
        {"name": "fc3", "aggregate_fn": "max_abs", "mask_fn": "threshold", "features": [1, 4, 6], "feature_dim": -1, "sparse_config": {"threshold": 0.2}},
    ],
}
CONV_RECIPE = {
    "defaults": {"aggregate_fn": "sum_sq", "reduce_fn": {"name": "feature_mean", "axis": 0}, "sparse_config": {"sparsity_level": 0.5}},
    "layers": [{"type": "Conv2d"}, {"name": "fc", "aggregate_fn": "max_abs", "reduce_fn": "mean"}],
}


def _mlp() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP()


def _conv() -> TinyConv:
    torch.manual_seed(0)
    return TinyConv()


def _batches(shapes: list[tuple[int, ...]], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in shapes]


# sequences of different lengths for the MLP (a Linear's sample axes: batch and sequence)
SETS: dict[str, tuple[Any, ...]] = {
    "mlp": (_mlp, MLP_RECIPE, [(3, 6), (2, 4, 6), (5, 6)], [(4, 7, 6), (1, 6)], [(2, 2, 6)]),
    "conv": (_conv, CONV_RECIPE, [(2, 1, 8, 8), (3, 1, 8, 8)], [(4, 1, 8, 8)], [(1, 1, 8, 8), (2, 1, 8, 8)]),
}


def _data(case: str) -> tuple[nn.Module, Recipe, list[list[torch.Tensor]]]:
    build, recipe, *sets = SETS[case]
    return build(), Recipe.from_dict(recipe), [_batches(s, seed=i) for i, s in enumerate(sets)]


def _parts(stats: Statistics, name: str) -> list[RunningStat]:
    return list(stats[name].parts)  # type: ignore[arg-type]


def _assert_same_stats(a: Statistics, b: Statistics, exact: bool = False) -> None:
    assert list(a) == list(b)
    assert (a.num_samples, a.num_batches, a.recipe, a.model) == (b.num_samples, b.num_batches, b.recipe, b.model)
    for name in a:
        la, lb = a[name], b[name]
        assert (la.count, la.combine, la.aggregate, la.features, la.feature_dim) == (lb.count, lb.combine, lb.aggregate, lb.features, lb.feature_dim)
        assert (la.input_shape, la.input_dtype, la.num_samples, la.num_batches, la.layer_types) == (
            lb.input_shape, lb.input_dtype, lb.num_samples, lb.num_batches, lb.layer_types
        )
        for pa, pb in zip(_parts(a, name), _parts(b, name), strict=True):
            assert pa.value.dtype == pb.value.dtype == torch.float64
            if exact:
                assert_close(pa.value, pb.value, rtol=0, atol=0)
            else:
                assert_close(pa.value, pb.value)


def _assert_same_masks(a: Any, b: Any) -> None:
    assert list(a) == list(b)
    for name in a:
        for ta, tb in zip(a[name].tensors, b[name].tensors, strict=True):
            assert ta.dtype == tb.dtype
            assert_close(ta, tb, rtol=0, atol=0)
        assert (a[name].features, a[name].feature_dim, a[name].input_shape) == (b[name].features, b[name].feature_dim, b[name].input_shape)


# --- merge ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["mlp", "conv"])
def test_merge_equals_collecting_over_both(case):
    model, recipe, (a_set, b_set, _) = _data(case)
    a = collect(model, recipe, a_set, model_name="m")
    b = collect(model, recipe, b_set, model_name="m")
    both = collect(model, recipe, a_set + b_set, model_name="m")
    merged = a.merge(b)
    _assert_same_stats(merged, both)
    assert merged.num_samples == sum(x.shape[0] for x in a_set + b_set) and merged.num_batches == len(a_set + b_set)
    _assert_same_masks(select(merged), calibrate(model, recipe, a_set + b_set, model_name="m"))
    # the inputs are untouched by merging
    _assert_same_stats(a, collect(model, recipe, a_set, model_name="m"), exact=True)


@pytest.mark.parametrize("case", ["mlp", "conv"])
def test_merge_is_associative(case):
    model, recipe, sets = _data(case)
    a, b, c = (collect(model, recipe, s) for s in sets)
    left, right = a.merge(b).merge(c), a.merge(b.merge(c))
    _assert_same_stats(left, right)
    _assert_same_stats(left, collect(model, recipe, [x for s in sets for x in s]))


def test_merge_of_a_max_statistic_takes_the_max():
    model, recipe, (a_set, b_set, _) = _data("mlp")
    a, b = collect(model, recipe, a_set), collect(model, recipe, b_set)
    for pa, pb, pm in zip(_parts(a, "fc3"), _parts(b, "fc3"), _parts(a.merge(b), "fc3"), strict=True):
        assert pm.combine == "max"
        assert_close(pm.value, torch.maximum(pa.value, pb.value), rtol=0, atol=0)
        assert pm.count == pa.count + pb.count


def test_merge_refuses_what_does_not_fit():
    model, recipe, (a_set, b_set, _) = _data("mlp")
    a = collect(model, recipe, a_set)
    other_layers = collect(model, Recipe.simple(layers=["fc2"], sparsity=0.5), b_set)
    with pytest.raises(CalibrationError, match=r"layers \['fc2', 'fc3'\] and \['fc2'\] cannot be merged"):
        a.merge(other_layers)
    other_agg = Recipe.from_dict({**MLP_RECIPE, "defaults": {**MLP_RECIPE["defaults"], "aggregate_fn": "sum_sq"}})
    with pytest.raises(CalibrationError, match="different recipes"):
        a.merge(collect(model, other_agg, b_set))
    no_recipe = collect(model, other_agg, b_set)
    no_recipe.recipe = None
    with pytest.raises(CalibrationError, match="layer 'fc2': statistics with aggregate 'sum_abs' and 'sum_sq' cannot be merged"):
        a.merge(no_recipe)
    with pytest.raises(CalibrationError, match="of model 'x' and of model 'y'"):
        collect(model, recipe, a_set, model_name="x").merge(collect(model, recipe, b_set, model_name="y"))
    # a conv's per-sample shape follows the image size
    conv, conv_recipe, _ = _data("conv")
    small = collect(conv, conv_recipe, _batches([(2, 1, 8, 8)], 0))
    large = collect(conv, conv_recipe, _batches([(2, 1, 6, 6)], 0))
    with pytest.raises(CalibrationError, match=r"layer 'conv1': statistics with statistic shape \[1, 8, 8\] and \[1, 6, 6\]"):
        small.merge(large)


def _user_stats(model: nn.Module, data: list[torch.Tensor]) -> Statistics:
    sp = ActivationSparsifier(model, aggregate_fn=lambda a, x: a + x, reduce_fn=lambda d: d.mean(0), mask_fn=lambda d: (d > 0).float())
    sp.register_layer(model.fc2)
    with torch.no_grad():
        for x in data:
            model(x)
    return Statistics(sp.statistics(), num_samples=sum(x.shape[0] for x in data), num_batches=len(data))


def test_user_aggregates_are_kept_but_not_merged_or_saved(tmp_path):
    model = _mlp()
    stats = _user_stats(model, _batches([(4, 6), (4, 6)], 0))
    ls = stats["fc2"]
    assert ls.combine is None and ls.aggregate is None and ls.count == 8 and ls.num_batches == 2
    assert isinstance(ls.stat, torch.Tensor) and ls.stat.shape == (4, 8)  # upstream's raw aggregate, batch first
    with pytest.raises(CalibrationError, match="layer 'fc2': a statistic of a user aggregate function cannot be merged"):
        stats.merge(stats)
    with pytest.raises(ConfigError, match="layer 'fc2': the statistic of a user aggregate function cannot be saved"):
        stats.save(tmp_path / "s.safetensors")
    assert not list(tmp_path.iterdir())


# --- collect / select ------------------------------------------------------------------


def test_collect_takes_exactly_one_data_source():
    model, recipe, (a_set, _, _) = _data("mlp")
    with pytest.raises(ConfigError, match="exactly one of batches= .* or forward_loop="):
        collect(model, recipe)
    with pytest.raises(ConfigError, match="exactly one"):
        collect(model, recipe, a_set, forward_loop=lambda m: None)
    with pytest.raises(ConfigError, match="forward_loop must be a callable"):
        collect(model, recipe, forward_loop=3)  # type: ignore[arg-type]


def test_forward_loop_equals_batches():
    model, recipe, (a_set, _, _) = _data("mlp")
    calls = []

    def forward_loop(m: nn.Module) -> None:
        calls.append(torch.is_grad_enabled())
        for x in a_set:
            m(x)

    via_loop = collect(model, recipe, forward_loop=forward_loop)
    via_batches = collect(model, recipe, a_set)
    _assert_same_stats(via_loop, via_batches, exact=True)  # counts from the hooks: 3 + 2 + 5 samples, 3 batches
    assert via_loop.num_samples == 10 and via_loop.num_batches == 3 and calls == [False]
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_forward_loop_failures():
    model, recipe, _ = _data("mlp")

    def bad(m: nn.Module) -> None:
        m(torch.randn(2, 5))

    with pytest.raises(DataError, match="the model failed inside forward_loop: RuntimeError"):
        collect(model, recipe, forward_loop=bad)
    with pytest.raises(DataError, match="forward_loop ran nothing through the model's selected layers"):
        collect(model, recipe, forward_loop=lambda m: None)
    with pytest.raises(CalibrationError, match=r"layers\[1\] \(name=fc3\) selects only layers the forward pass never calls.*: fc3"):
        collect(model, recipe, forward_loop=lambda m: m.fc2(torch.randn(2, 8)))
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_select_with_another_sparsity_equals_calibrate():
    model, recipe, (a_set, _, _) = _data("conv")
    stats = collect(model, recipe, a_set, model_name="tiny")
    for level in (0.25, 0.75):
        other = recipe.with_sparsity(level)
        _assert_same_masks(select(stats, other), calibrate(model, other, a_set, model_name="tiny"))
    masks = select(stats)
    assert masks.recipe == recipe and masks.num_samples == 5 and masks.num_batches == 2 and masks.model == "tiny"


def test_select_refuses_a_recipe_the_statistics_do_not_fit():
    model, recipe, (a_set, _, _) = _data("mlp")
    stats = collect(model, recipe, a_set)
    with pytest.raises(RecipeError, match=r"layers\[0\] \(name=fc1\) matches no layer of the statistics; layers: fc2, fc3"):
        select(stats, Recipe.simple(layers=["fc1"], sparsity=0.5))
    with pytest.raises(RecipeError, match="layer 'fc2': the statistics were collected with aggregate_fn 'sum_abs', the recipe asks for 'max_abs'"):
        select(stats, Recipe.simple(layers=["fc2"], sparsity=0.5, aggregate_fn="max_abs"))
    with pytest.raises(RecipeError, match=r"layer 'fc3': the statistics were collected for features \(1, 4, 6\)"):
        select(stats, Recipe.simple(layers=["fc3"], sparsity=0.5, aggregate_fn="max_abs"))
    # a subset of the layers, and rules by type name (short or qualified)
    sub = select(stats, Recipe.from_dict({"defaults": {"sparse_config": {"sparsity_level": 0.5}}, "layers": [{"type": "torch.nn.modules.linear.Linear", "name": "fc2"}]}))
    assert list(sub) == ["fc2"]
    stats.recipe = None
    with pytest.raises(RecipeError, match="pass recipe="):
        select(stats)


def test_sparsifier_statistics_round_trip():
    """statistics() out of a sparsifier, load_statistics() into a fresh one: step()
    gives the masks select gives; aggregation goes on from loaded statistics."""
    model, recipe, (a_set, b_set, _) = _data("mlp")
    stats = collect(model, recipe, a_set)
    fresh = copy.deepcopy(model)
    sp = ActivationSparsifier(fresh)
    for name, config in recipe.select(fresh).items():
        sp.register_layer(fresh.get_submodule(name), **config.register_kwargs())
    sp.load_statistics(stats.layers)
    assert sp.get_mask("fc2").shape == (8,) and [m.shape for m in sp.get_mask("fc3")] == [(1,)] * 3
    with torch.no_grad():
        for x in b_set:
            fresh(x)
    _assert_same_stats(Statistics(sp.statistics(), recipe=recipe, num_samples=stats.num_samples + 5, num_batches=5), collect(model, recipe, a_set + b_set))
    sp.step()
    expected = calibrate(model, recipe, a_set + b_set)
    for name in expected:
        for a, b in zip(expected[name].tensors, sp.get_mask(name) if name == "fc3" else [sp.get_mask(name)], strict=True):
            assert_close(a, b, rtol=0, atol=0)
    other = ActivationSparsifier(fresh, "sum_sq", "mean", "topk", sparsity_level=0.5)
    other.register_layer(fresh.fc2)
    with pytest.raises(ConfigError, match="layer 'fc2': statistics of aggregate 'sum_abs', features None do not fit its config"):
        other.load_statistics({"fc2": stats["fc2"]})


def test_statistics_handed_out_or_loaded_do_not_change_when_collection_goes_on():
    """Batches fold into a layer's running sum in place, but never into tensors
    the caller holds: a statistics() snapshot, or statistics given to
    load_statistics(), stay as they were while the hooks go on collecting."""
    model, _, (a_set, b_set, _) = _data("mlp")
    recipe = Recipe.simple(layers=["fc2"], sparsity=0.5, aggregate_fn="gram")
    sp = ActivationSparsifier(model)
    for name, config in recipe.select(model).items():
        sp.register_layer(model.get_submodule(name), **config.register_kwargs())
    with torch.no_grad():
        for x in a_set:
            model(x)
        snapshot = sp.statistics()["fc2"]
        before = snapshot.stat.value.clone()
        for x in b_set:
            model(x)
    sp.unregister_layer("fc2")
    collected = collect(model, recipe, a_set)
    assert_close(snapshot.stat.value, before, rtol=0, atol=0)
    assert snapshot.count == collected["fc2"].count
    held = collected["fc2"].stat.value.clone()
    fresh = ActivationSparsifier(model)
    fresh.register_layer(model.fc2, **recipe.select(model)["fc2"].register_kwargs())
    fresh.load_statistics(collected.layers)
    with torch.no_grad():
        for x in b_set:
            model(x)
    assert_close(collected["fc2"].stat.value, held, rtol=0, atol=0)
    went_on = fresh.statistics()["fc2"].stat
    fresh.unregister_layer("fc2")
    both = collect(model, recipe, a_set + b_set)["fc2"].stat
    assert_close(went_on.value, both.value, rtol=1e-12, atol=1e-9)
    assert went_on.count == both.count


# --- statistics larger than the mask ----------------------------------------------------


def _gram(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    return flat.T @ flat


@pytest.fixture
def gram(monkeypatch):
    monkeypatch.setitem(AGGREGATE_FNS._fns, "gram", Aggregate("aggregate", "gram", _gram, combine="sum"))
    monkeypatch.setitem(REDUCE_FNS._fns, "gram_diag", BuiltinFn("reduce", "gram_diag", lambda data: data.per_sample.diagonal()))


def test_gram_statistic_collects_merges_saves_and_selects(gram, tmp_path):
    """A d x d statistic for a d-wide input: the mask is d, as sum_sq gives."""
    model, _, (a_set, b_set, _) = _data("mlp")
    recipe = Recipe.simple(layers=["fc2"], sparsity=0.5, aggregate_fn="gram")
    recipe = Recipe.from_dict({**recipe.to_dict(), "defaults": {**recipe.to_dict()["defaults"], "reduce_fn": "gram_diag"}})
    stats = collect(model, recipe, a_set).merge(collect(model, recipe, b_set))
    assert stats["fc2"].stat_shape == [8, 8] and stats["fc2"].input_shape == (8,)
    stats.save(tmp_path / "gram.safetensors")
    masks = select(Statistics.load(tmp_path / "gram.safetensors"))
    expected = calibrate(model, Recipe.simple(layers=["fc2"], sparsity=0.5, aggregate_fn="sum_sq"), a_set + b_set)
    assert masks["fc2"].mask.shape == (8,)
    assert_close(masks["fc2"].mask, expected["fc2"].mask, rtol=0, atol=0)


# --- files ---------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    for case in ("mlp", "conv"):
        model, recipe, (a_set, _, _) = _data(case)
        stats = collect(model, recipe, a_set, model_name=case)
        path = tmp_path / f"{case}.safetensors"
        stats.save(path)
        loaded = Statistics.load(path)
        _assert_same_stats(loaded, stats, exact=True)
        _assert_same_masks(select(loaded), select(stats))
        assert loaded.tool_version == stats.tool_version
    with safe_open(str(tmp_path / "mlp.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "actsparse.statistics" and meta["format_version"] == "1"
    assert keys == {"fc2", "fc3::0", "fc3::1", "fc3::2"}
    rows = {row["layer"]: row for row in json.loads(meta["layers"])}
    assert rows["fc3"]["combine"] == "max" and rows["fc3"]["stat_shape"] == [[1], [1], [1]] and rows["fc2"]["count"] == 3 + 8 + 5


def _edited(tmp_path: Path, edit_meta: Callable[[dict[str, Any]], None] | None = None, edit_tensors: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    model, recipe, (a_set, _, _) = _data("mlp")
    good = tmp_path / "good.safetensors"
    collect(model, recipe, a_set).save(good)
    tensors = load_file(str(good))
    with safe_open(str(good), "pt") as f:
        meta: dict[str, Any] = dict(f.metadata())
    meta["layers"] = json.loads(meta["layers"])
    if edit_meta is not None:
        edit_meta(meta)
    if edit_tensors is not None:
        edit_tensors(tensors)
    meta["layers"] = meta["layers"] if isinstance(meta["layers"], str) else json.dumps(meta["layers"])
    path = tmp_path / "hostile.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def _row(field: str, value: Any, layer: int = 0) -> Callable[[dict[str, Any]], None]:
    def edit(meta: dict[str, Any]) -> None:
        meta["layers"][layer][field] = value

    return edit


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda meta: meta.__setitem__(key, value)


def _tensor(key: str, value: torch.Tensor | None) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value

    return edit


def _deep(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


HOSTILE = {
    "other format": (_set("format", "actsparse.masks"), None, "is not a actsparse.statistics file"),
    "newer version": (_set("format_version", "9"), None, "format version 9 by a newer"),
    "bad version": (_set("format_version", "1e9"), None, "format_version '1e9' is not a positive integer"),
    "layers not a list": (_set("layers", '{"a": 1}'), None, "'layers' must be a list of tables"),
    "deep json": (_set("layers", _deep()), None, "nested too deeply"),
    "layer listed twice": (lambda m: m["layers"].append(dict(m["layers"][0])), None, "'fc2' is listed twice"),
    "unknown aggregate": (_row("aggregate", "evil"), None, "unknown aggregate function 'evil'"),
    "combine lies": (_row("combine", "max"), None, "aggregate 'sum_abs' does not combine by 'max'"),
    "count zero": (_row("count", 0), None, "sample count 0 is not a positive integer"),
    "count huge": (_row("count", 2**70), None, "is not a positive integer"),
    "count a string": (_row("count", "12"), None, "sample count '12'"),
    "num_samples negative": (_set("num_samples", "-3"), None, "num_samples '-3' is not a non-negative integer"),
    "layer num_batches negative": (_row("num_batches", -1), None, "num_batches of layer 'fc2' must be a non-negative integer"),
    "input shape huge": (_row("input_shape", [2**20, 2**20]), None, "has more than 1073741824 values"),
    "input shape zero": (_row("input_shape", [0]), None, "input_shape of layer 'fc2' must be a list of integers >= 1"),
    "input dtype unknown": (_row("input_dtype", "object"), None, "input dtype 'object' is not one of"),
    "stat shape lies": (_row("stat_shape", [9]), None, r"statistic 'fc2' is float64\[8\], its metadata says float64\[9\]"),
    "stat shape not a list": (_row("stat_shape", "8"), None, "stat_shape of layer 'fc2' must be a list"),
    "tensor wrong dtype": (None, _tensor("fc2", torch.ones(8)), r"statistic 'fc2' is float32\[8\]"),
    "tensor NaN": (None, _tensor("fc2", torch.full((8,), float("nan"), dtype=torch.float64)), "layer 'fc2' holds NaN or Inf"),
    "tensor missing": (None, _tensor("fc3::1", None), "tensor 'fc3::1' is missing"),
    "tensor extra": (None, _tensor("payload", torch.ones(3)), r"holds tensors \['payload'\] its metadata does not describe"),
    "features out of range": (_row("features", [1, 4, 99], layer=1), None, "feature 99 of layer 'fc3' is out of range"),
    "features negative": (_row("features", [1, -4, 6], layer=1), None, "feature -4 of layer 'fc3' is negative"),
    "feature_dim batch axis": (_row("feature_dim", 0, layer=1), None, "feature_dim 0 of layer 'fc3' must name a non-batch axis"),
    "layer types not strings": (_row("layer_types", [1]), None, "layer_types of layer 'fc2' must be a list of class names"),
    "recipe broken": (_set("recipe", "[[layers]]\nname = 3"), None, "recipe in"),
    "field missing": (lambda m: m["layers"][0].pop("count"), None, "incomplete or malformed"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_statistics_files_refused(tmp_path, case):
    edit_meta, edit_tensors, message = HOSTILE[case]
    path = _edited(tmp_path, edit_meta, edit_tensors)
    with pytest.raises(MaskError, match=message) as info:
        Statistics.load(path)
    assert info.value.exit_code == 8 and str(path) in str(info.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(MaskError, match="statistics file .* does not exist"):
        Statistics.load(tmp_path / "none.safetensors")
    good = _edited(tmp_path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:64])
    with pytest.raises(MaskError, match="not a readable .safetensors file"):
        Statistics.load(truncated)
    assert list(Statistics.load(good)) == ["fc2", "fc3"]


def test_statistics_checked_in_python_too():
    model, recipe, (a_set, _, _) = _data("mlp")
    ls = collect(model, recipe, a_set)["fc2"]
    bad = RunningStat(torch.full((8,), float("inf"), dtype=torch.float64), 3, "sum")
    from dataclasses import replace

    with pytest.raises(MaskError, match="'fc2' holds NaN or Inf"):
        Statistics({"fc2": replace(ls, stat=bad)})
    with pytest.raises(MaskError, match="sample count -1"):
        Statistics({"fc2": replace(ls, stat=RunningStat(ls.stat.value, -1, "sum"))})  # type: ignore[union-attr]
    with pytest.raises(MaskError, match="num_samples must be a non-negative integer"):
        Statistics({"fc2": ls}, num_samples=-1)
