"""Property-based tests: random small models, recipes and masks.

Derandomized so that CI runs the same examples every time.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from actsparse_deploy import ActivationSparsifier, Masks
from actsparse_deploy.bake.squash import squash
from actsparse_deploy.calibration.masks import LayerMask
from actsparse_deploy.calibration.recipe import Recipe
from actsparse_deploy.onnx.export import export_onnx
from actsparse_deploy.onnx.validate import validate

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


class Chain(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class Convs(nn.Module):
    def __init__(self, c: list[int], k: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c[0], c[1], 3, padding=1)
        self.conv2 = nn.Conv2d(c[1], c[2], k, padding=k // 2)
        self.fc = nn.Linear(c[2], 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3)))


@st.composite
def models(draw):
    """(model, batches, layer names, feature_dim) with a seeded random model."""
    torch.manual_seed(draw(st.integers(0, 10_000)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3).filter(lambda s: sum(s) >= 3))
    if draw(st.booleans()):
        dims = draw(st.lists(st.integers(2, 8), min_size=3, max_size=5))  # >= 2: features 0 and 1 exist
        seq = draw(st.sampled_from([None, 3]))
        shape = (lambda b: (b, dims[0])) if seq is None else (lambda b: (b, seq, dims[0]))
        model = Chain(dims)
        names = [f"layers.{i}" for i in range(1, len(dims) - 1)]
        batches = [torch.randn(*shape(b), generator=g) for b in sizes]
        return model.eval(), batches, names, -1
    c = draw(st.lists(st.integers(2, 5), min_size=3, max_size=3))
    model = Convs(c, draw(st.sampled_from([1, 3])))
    batches = [torch.rand(b, c[0], 5, 5, generator=g) for b in sizes]
    return model.eval(), batches, ["conv2", "fc"], 1


@st.composite
def layer_configs(draw, feature_dim: int):
    config = {
        "aggregate_fn": draw(st.sampled_from(["sum", "sum_abs", "sum_sq", "max_abs"])),
        "reduce_fn": draw(st.sampled_from(["mean", "feature_mean"])),
    }
    mask = draw(st.sampled_from(["topk", "threshold", "block"]))
    config["mask_fn"] = mask
    if mask == "threshold":
        config["threshold"] = draw(st.floats(0.0, 1.0))
    else:
        config["sparsity_level"] = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]))
    if mask == "block":
        config["sparse_block_shape"] = (draw(st.integers(1, 3)),)
    if draw(st.integers(0, 3)) == 0:
        config["features"] = draw(st.lists(st.integers(0, 1), min_size=1, max_size=2, unique=True))
        config["feature_dim"] = feature_dim
    return config


def _sparsify(model, batches, configs, step=True):
    sp = ActivationSparsifier(model)
    for name, config in configs.items():
        sp.register_layer(model.get_submodule(name), **config)
    with torch.no_grad():
        for b in batches:
            model(b)
    if step:
        sp.step()
    return sp


@SETTINGS
@given(data=st.data())
def test_every_squash_mode_agrees_with_sparsify_hooks_and_exports(data):
    model, batches, names, feature_dim = data.draw(models())
    chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    configs = {name: data.draw(layer_configs(feature_dim)) for name in chosen}
    hooked = copy.deepcopy(model)
    sp = _sparsify(hooked, batches, configs)
    masks = Masks.from_sparsifier(sp)
    sp.squash_mask()
    x = batches[0]
    with torch.no_grad():
        expected = hooked(x)
    for mode in ("mul", "auto"):
        result = squash(model, masks, mode)
        with torch.no_grad():
            assert_close(result.model(x), expected, rtol=1e-5, atol=1e-5)
        assert not any(m._forward_pre_hooks for m in result.model.modules())
    folded = {n for n, m in squash(model, masks, "auto").modes.items() if m == "fold"}
    if folded == set(chosen):
        with torch.no_grad():
            assert_close(squash(model, masks, "fold").model(x), expected, rtol=1e-5, atol=1e-5)
    # the squashed model exports and validates under onnxruntime
    sparse = squash(model, masks, "auto").model
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(sparse, batches[0][:1].expand(2, *batches[0].shape[1:]).clone(), path, exporter="torchscript",
                    sequence_axis=batches[0].ndim == 3)
        held = [torch.cat(batches)] if all(b.shape[1:] == batches[0].shape[1:] for b in batches) else batches
        validate(path, sparse, held, batch_sizes=(1, 3), max_samples=6)


@st.composite
def layer_masks(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    values = st.sampled_from([0.0, 1.0, 0.5])
    if draw(st.booleans()):
        n = draw(st.integers(1, 3))
        masks = tuple(torch.tensor(draw(st.lists(values, min_size=1, max_size=1))) for _ in range(n))
        return LayerMask(mask=masks, features=tuple(range(n)), feature_dim=-1, input_shape=(*shape[:-1], 4))
    flat = draw(st.lists(values, min_size=int(torch.tensor(shape).prod()), max_size=int(torch.tensor(shape).prod())))
    return LayerMask(mask=torch.tensor(flat).reshape(shape), input_shape=shape)


names = st.from_regex(r"[a-z][a-z0-9_]{0,6}(\.[a-z0-9_]{1,5}){0,2}", fullmatch=True)


@SETTINGS
@given(layers=st.dictionaries(names, layer_masks(), min_size=1, max_size=4), samples=st.integers(0, 10_000))
def test_masks_file_round_trips_exactly(layers, samples):
    masks = Masks(layers=layers, num_samples=samples, model="random")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        masks.save(path)
        loaded = Masks.load(path)
    assert list(loaded) == list(masks) and loaded.num_samples == samples and loaded.model == "random"
    for name, lm in masks.layers.items():
        other = loaded[name]
        assert other.features == lm.features and other.feature_dim == lm.feature_dim and other.input_shape == lm.input_shape
        for a, b in zip(lm.tensors, other.tensors, strict=True):
            assert torch.equal(a, b)


FN = st.sampled_from(["sum", "sum_abs", "sum_sq", "max_abs"])


@st.composite
def recipe_dicts(draw):
    def settings_dict():
        out = {}
        if draw(st.booleans()):
            out["aggregate_fn"] = draw(FN)
        if draw(st.booleans()):
            out["reduce_fn"] = draw(st.sampled_from(["mean", "feature_mean", {"name": "feature_mean", "axis": 0}]))
        if draw(st.booleans()):
            out["mask_fn"] = draw(st.sampled_from(["topk", "block"]))
        if draw(st.booleans()):
            out["sparse_config"] = {"sparsity_level": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))}
        if draw(st.booleans()):
            out["features"] = draw(st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True))
            out["feature_dim"] = draw(st.sampled_from([-3, -2, -1, 1, 2, 3]))
        return out

    defaults = settings_dict()
    defaults["sparse_config"] = {"sparsity_level": draw(st.sampled_from([0.25, 0.75])), **defaults.get("sparse_config", {})}
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        rule = settings_dict()
        if draw(st.booleans()):
            rule["name"] = draw(st.sampled_from(["fc*", "encoder.?.dense", ["a", "b.*"]]))
        else:
            rule["type"] = draw(st.sampled_from(["Linear", ["Conv2d", "Conv1d"]]))
        layers.append(rule)
    return {"version": 1, "defaults": defaults, "layers": layers}


@SETTINGS
@given(recipe_dicts())
def test_recipe_parse_dump_parse_is_identity(data):
    recipe = Recipe.from_dict(data)
    text = recipe.dumps()
    again = Recipe.from_toml(text)
    assert again == recipe and again.dumps() == text
    assert Recipe.from_dict(recipe.to_dict()) == recipe
