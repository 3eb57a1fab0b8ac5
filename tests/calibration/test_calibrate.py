"""The calibration stage and the masks file."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.testing import assert_close

from actsparse_deploy import Masks, Recipe, __version__, calibrate
from actsparse_deploy.base.errors import CalibrationError, DataError, MaskError
from actsparse_deploy.calibration.functions import MASK_FNS, BuiltinFn
from actsparse_deploy.calibration.masks import LayerMask
from actsparse_deploy.models.zoo import builtin_recipe_path, calibration_batches, load_builtin

from ..helpers import TinyConv


def _capture(model, names):
    seen = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, i, n=n: seen[n].append(i[0].detach().double().numpy()))
        for n in names
    ]
    return seen, handles


def _topk_keep(scores, level):
    flat = scores.reshape(-1)
    keep = np.ones(flat.size, dtype=np.float32)
    keep[np.argsort(flat, kind="stable")[: int(round(level * flat.size))]] = 0
    return keep.reshape(scores.shape)


#: digits-cnn's recipe with the drop-in functions (the built-in one selects with ``obs``)
CLASSIC_CNN_RECIPE = {
    "version": 1,
    "defaults": {"aggregate_fn": "max_abs", "reduce_fn": {"name": "feature_mean", "axis": 0}, "mask_fn": "topk"},
    "layers": [{"name": n, "sparse_config": {"sparsity_level": level}} for n, level in (("conv2", 0.125), ("fc1", 0.25), ("fc2", 0.5))],
}


def test_digits_cnn_builtin_recipe_selects_with_obs_and_compensates():
    model = load_builtin("digits-cnn")
    masks = calibrate(model, builtin_recipe_path("digits-cnn"), calibration_batches("digits-cnn"), model_name="digits-cnn")
    for name, level in (("conv2", 0.125), ("fc1", 0.25), ("fc2", 0.5)):
        layer = masks[name]
        assert layer.mask.numel() - int(layer.mask.count_nonzero()) == round(level * layer.mask.numel())
        assert layer.bias is not None and layer.compensate == ("bias" if name == "conv2" else "lstsq")
        assert ("bias compensation used" in (layer.note or "")) == (name == "conv2")  # conv2 is 3x3: the removed channels' mean


def test_digits_cnn_classic_recipe_matches_numpy():
    model = load_builtin("digits-cnn")
    batches = calibration_batches("digits-cnn", batch_size=48)  # 48 x 4 + 8: a partial batch
    reference = copy.deepcopy(model)
    seen, handles = _capture(reference, ["conv2", "fc1", "fc2"])
    with torch.no_grad():
        for b in batches:
            reference(b)
    masks = calibrate(model, CLASSIC_CNN_RECIPE, batches, model_name="digits-cnn")
    # max_abs over samples, feature_mean over the channel (conv) / feature (linear) axis, topk
    conv = np.abs(np.concatenate(seen["conv2"])).max(axis=0).mean(axis=(1, 2))
    np.testing.assert_array_equal(masks["conv2"].mask.numpy().reshape(-1), _topk_keep(conv, 0.125))
    assert masks["conv2"].mask.shape == (16, 1, 1)
    for name, level in (("fc1", 0.25), ("fc2", 0.5)):
        scores = np.abs(np.concatenate(seen[name])).max(axis=0)
        np.testing.assert_array_equal(masks[name].mask.numpy(), _topk_keep(scores, level))
    assert masks.num_samples == 200 and masks.num_batches == 5
    assert [round(masks[n].sparsity, 4) for n in masks] == [0.125, 0.25, 0.5]
    assert masks["fc1"].input_shape == (512,)
    for h in handles:
        h.remove()


def test_model_unchanged_and_hooks_removed(mlp):
    reference = copy.deepcopy(mlp)
    mlp.train()
    x = torch.randn(7, 6)
    calibrate(mlp, Recipe.simple(layers=["fc*"], sparsity=0.5), [x[:4], x[4:]])
    assert mlp.training and all(m.training for m in mlp.modules())
    for m in mlp.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
    with torch.no_grad():
        assert_close(mlp(x), reference(x), rtol=0, atol=0)
    for a, b in zip(mlp.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


def test_hooks_removed_on_error(mlp):
    def batches():
        yield torch.randn(4, 6)
        yield torch.randn(4, 5)  # wrong width: the model fails

    with pytest.raises(DataError, match=r"batch 1 \(float32\[4, 5\]\)"):
        calibrate(mlp, Recipe.simple(layers=["fc2"], sparsity=0.5), batches())
    assert not any(m._forward_pre_hooks for m in mlp.modules())


def test_nan_data_names_layer(mlp):
    x = torch.randn(4, 6)
    x[1, 2] = float("nan")
    with pytest.raises(DataError, match="'fc1'.*NaN"):
        calibrate(mlp, Recipe.simple(layers=["fc*"], sparsity=0.5), [x])
    assert not any(m._forward_pre_hooks for m in mlp.modules())


def test_empty_data(mlp):
    with pytest.raises(DataError, match="empty"):
        calibrate(mlp, Recipe.simple(layers=["fc2"], sparsity=0.5), [])


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x, scale):
        return self.b(self.a(x) * scale)


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_batch_forms(form):
    torch.manual_seed(0)
    model = TwoInputs()
    xs = [torch.randn(5, 3) for _ in range(2)]
    scales = [torch.rand(5, 1) for _ in range(2)]
    batches = [(x, s) if form == "tuple" else {"x": x, "scale": s} for x, s in zip(xs, scales)]
    masks = calibrate(model, Recipe.simple(layers=["b"], threshold=0.2), batches)
    with torch.no_grad():
        hidden = torch.cat([model.a(x) * s for x, s in zip(xs, scales)])
    expected = (hidden.abs().mean(0) >= 0.2).float()
    assert_close(masks["b"].mask, expected)
    assert masks.num_samples == 10


def test_sequence_batches_of_different_lengths_structured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 4))
    batches = [torch.randn(2, t, 4) for t in (5, 9, 3)]
    masks = calibrate(model, Recipe.simple(layers=["2"], sparsity=0.5, structured=True), batches)
    with torch.no_grad():
        hidden = torch.cat([model[1](model[0](b)).reshape(-1, 6) for b in batches])
    assert_close(masks["2"].mask, torch.from_numpy(_topk_keep(hidden.abs().double().mean(0).numpy(), 0.5)))


def test_wrong_mask_shape_is_refused(mlp, monkeypatch):
    def bad_mask(data, sparsity_level):
        return torch.ones(3, 3)

    monkeypatch.setitem(MASK_FNS._fns, "bad", BuiltinFn("mask", "bad", bad_mask))
    recipe = Recipe.from_dict({"defaults": {"mask_fn": "bad", "sparse_config": {"sparsity_level": 0.5}}, "layers": [{"name": "fc2"}]})
    with pytest.raises(CalibrationError, match=r"'fc2' has shape \(3, 3\).*does not broadcast"):
        calibrate(mlp, recipe, [torch.randn(2, 6)])


# --- the masks file ----------------------------------------------------------------


def _masks(tmp_path):
    torch.manual_seed(0)
    model = TinyConv()
    recipe = Recipe.from_dict(
        {
            "defaults": {"aggregate_fn": "sum_abs", "reduce_fn": "feature_mean", "sparse_config": {"sparsity_level": 0.4}},
            "layers": [
                {"name": "conv2"},
                {"name": "fc", "mask_fn": "threshold", "features": [0, 3], "feature_dim": 1, "sparse_config": {"threshold": 0.05}},
            ],
        }
    )
    masks = calibrate(model, recipe, [torch.rand(6, 1, 8, 8), torch.rand(3, 1, 8, 8)], model_name="tiny")
    path = tmp_path / "masks.safetensors"
    masks.save(path)
    return masks, path


def test_masks_file_round_trip_and_metadata(tmp_path):
    masks, path = _masks(tmp_path)
    loaded = Masks.load(path)
    assert list(loaded) == ["conv2", "fc"]
    assert_close(loaded["conv2"].mask, masks["conv2"].mask, rtol=0, atol=0)
    assert loaded["fc"].features == (0, 3) and loaded["fc"].feature_dim == 1
    for a, b in zip(loaded["fc"].mask, masks["fc"].mask, strict=True):
        assert_close(a, b, rtol=0, atol=0)
    assert loaded.recipe == masks.recipe
    assert loaded.num_samples == 9 and loaded.model == "tiny" and loaded.tool_version == __version__
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["tool_version"] == __version__ and meta["num_samples"] == "9"
    rows = {r["layer"]: r for r in json.loads(meta["layers"])}
    assert rows["conv2"]["mask_shape"] == [4, 1, 1]
    assert rows["conv2"]["sparsity"] == pytest.approx(0.5)  # round(0.4 * 4) channels
    assert rows["conv2"]["input_shape"] == [4, 8, 8]
    assert Recipe.from_toml(meta["recipe"]) == masks.recipe
    assert loaded.to_json() == masks.to_json()


def test_masks_file_errors(tmp_path):
    _, path = _masks(tmp_path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(MaskError, match="not a readable"):
        Masks.load(truncated)
    with pytest.raises(MaskError, match="does not exist"):
        Masks.load(tmp_path / "none.safetensors")
    newer = tmp_path / "newer.safetensors"
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(path)), str(newer), metadata={**meta, "format_version": "99"})
    with pytest.raises(MaskError, match="format version 99 by a newer"):
        Masks.load(newer)
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, str(other))
    with pytest.raises(MaskError, match="not a actsparse.masks file"):
        Masks.load(other)


def test_layer_mask_checks():
    with pytest.raises(MaskError, match="a per-feature mask needs its features"):
        LayerMask(mask=(torch.ones(1),))  # per-feature masks without features
    assert LayerMask(mask=torch.tensor([0.0, 0.0, 1.0, 1.0])).sparsity == 0.5
