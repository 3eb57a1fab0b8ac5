"""Squash: every mode gives what the sparsifier's own sparsify hooks give."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from actsparse_deploy import ActivationSparsifier, Masks, Recipe, calibrate, squash_
from actsparse_deploy.bake.squash import MaskedInput, squash
from actsparse_deploy.base.errors import MaskError, SquashError
from actsparse_deploy.calibration.masks import LayerMask

from ..helpers import TinyConv, TinyMLP


def _hooked(model, configure, batches):
    """The reference: the sparsifier's squash_mask() hooks on a copy of model."""
    ref = copy.deepcopy(model)
    sp = ActivationSparsifier(ref)
    configure(sp, ref)
    with torch.no_grad():
        for b in batches:
            ref(b)
    sp.step()
    masks = Masks.from_sparsifier(sp)
    sp.squash_mask()
    return ref, masks, sp


CASES = {
    "mlp_structured": (
        TinyMLP,
        lambda sp, m: [sp.register_layer(layer, "sum_abs", "mean", "topk", sparsity_level=0.5) for layer in (m.fc2, m.fc3)],
        lambda g: [torch.randn(5, 6, generator=g) for _ in range(3)],
        {"fc2": "fold", "fc3": "fold"},
    ),
    "conv_channels_and_elements": (
        TinyConv,
        lambda sp, m: (
            sp.register_layer(m.conv2, "sum_sq", "feature_mean", "topk", sparsity_level=0.5),
            sp.register_layer(m.conv1, "max_abs", "mean", "threshold", threshold=0.5),
            sp.register_layer(m.fc, "sum_abs", "mean", "block", sparsity_level=0.4, sparse_block_shape=(2,)),
        ),
        lambda g: [torch.rand(4, 1, 8, 8, generator=g) for _ in range(2)],
        {"conv1": "mul", "conv2": "fold", "fc": "fold"},
    ),
    "per_feature": (
        TinyMLP,
        lambda sp, m: sp.register_layer(m.fc2, "sum_abs", "mean", "threshold", features=[0, 3, 5], feature_dim=-1, threshold=0.3),
        lambda g: [torch.randn(5, 6, generator=g) for _ in range(2)],
        {"fc2": "fold"},
    ),
    "per_feature_conv_spatial": (
        TinyConv,
        lambda sp, m: sp.register_layer(m.conv2, "sum_abs", "mean", "topk", features=[1, 2], feature_dim=1, sparsity_level=0.5),
        lambda g: [torch.rand(4, 1, 8, 8, generator=g) for _ in range(2)],
        {"conv2": "mul"},
    ),
}


@pytest.mark.parametrize("mode", ["auto", "mul", "fold"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_squash_matches_sparsify_hooks(case, mode):
    factory, configure, data, auto_modes = CASES[case]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = factory()
    ref, masks, _ = _hooked(model, configure, data(g))
    if mode == "fold" and "mul" in auto_modes.values():
        with pytest.raises(SquashError, match="cannot be folded"):
            squash(model, masks, "fold")
        return
    result = squash(model, masks, mode)
    expected_modes = auto_modes if mode == "auto" else {k: mode for k in auto_modes}
    assert result.modes == expected_modes
    for module in result.model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
    x = data(torch.Generator().manual_seed(7))[0]
    with torch.no_grad():
        expected = ref(x)
        assert_close(result.model(x), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(model(x), expected)  # the masks matter and the input model is untouched


def test_fold_zeroes_weight_columns_and_adds_no_module():
    torch.manual_seed(0)
    model = TinyMLP()
    masks = calibrate(model, Recipe.simple(layers=["fc2"], sparsity=0.5), [torch.randn(16, 6)])
    result = squash(model, masks, "fold")
    keep = masks["fc2"].mask.bool()
    assert torch.all(result.model.fc2.weight[:, ~keep] == 0)
    assert torch.equal(result.model.fc2.weight[:, keep], model.fc2.weight[:, keep])
    assert isinstance(result.model.fc2, nn.Linear)


def test_mul_wraps_with_a_buffer_and_squash_in_place():
    torch.manual_seed(0)
    model = TinyMLP()
    masks = calibrate(model, Recipe.simple(layers=["fc2"], sparsity=0.5), [torch.randn(16, 6)])
    out = squash_(model, masks, "mul")
    assert out.model is model and isinstance(model.fc2, MaskedInput)
    assert_close(model.fc2.mask, masks["fc2"].mask)
    assert "fc2.mask" in model.state_dict()


def test_squash_from_live_sparsifier():
    torch.manual_seed(0)
    model = TinyMLP()
    ref, _, sp = _hooked(model, CASES["mlp_structured"][1], [torch.randn(8, 6)])
    result = squash(model, sp)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert_close(result.model(x), ref(x))


def test_sequence_inputs_fold():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 12), nn.GELU(), nn.Linear(12, 4))
    batches = [torch.randn(2, t, 4) for t in (3, 7)]
    masks = calibrate(model, Recipe.simple(layers=["2"], sparsity=0.5, structured=True), batches)
    result = squash(model, masks)
    assert result.modes == {"2": "fold"}
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        expected = model[2](model[1](model[0](x)) * masks["2"].mask)
        assert_close(result.model(x), expected, rtol=1e-5, atol=1e-6)


def test_grouped_conv_falls_back_to_mul():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU())
    masks = calibrate(model, Recipe.simple(layers=["0"], sparsity=0.5, structured=True), [torch.randn(2, 4, 6, 6)])
    result = squash(model, masks)
    assert result.modes == {"0": "mul"} and "groups" in result.reasons["0"]


def test_masks_from_another_model_are_refused():
    torch.manual_seed(0)
    mlp = TinyMLP()
    masks = calibrate(mlp, Recipe.simple(layers=["fc2"], sparsity=0.5), [torch.randn(4, 6)])
    with pytest.raises(MaskError, match="does not have"):
        squash(TinyConv(), masks)
    wide = TinyMLP(hidden=10)
    with pytest.raises(MaskError, match="10 input features"):
        squash(wide, masks)
    with pytest.raises(SquashError, match="unknown squash mode"):
        squash(mlp, masks, "prune-ish")


def test_batch_shaped_user_mask_is_refused():
    torch.manual_seed(0)
    model = TinyMLP()
    sp = ActivationSparsifier(model, aggregate_fn=lambda a, b: a + b, reduce_fn=lambda d: d, mask_fn=lambda d: (d > 0).float())
    sp.register_layer(model.fc2)
    with torch.no_grad():
        model(torch.randn(4, 6))
    sp.step()
    with pytest.raises(MaskError, match="batch axis"):
        squash(model, sp)


def test_fold_keeps_a_tied_weight_elsewhere():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = model[0].weight  # tied
    masks = Masks({"2": LayerMask(torch.tensor([1.0, 0.0, 1.0, 0.0]), input_shape=(4,))})
    result = squash(model, masks, "fold")
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = model[2](model[1](model[0](x)) * masks["2"].mask)
        assert_close(result.model(x), expected)
        assert torch.equal(result.model[0].weight, model[0].weight)


def test_failed_squash_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Conv1d(4, 4, 1, groups=2))
    from actsparse_deploy.calibration.masks import LayerMask

    masks = Masks({
        "0": LayerMask(torch.tensor([1.0, 0.0, 1.0, 0.0]), input_shape=(4,)),
        "2": LayerMask(torch.tensor([1.0, 0.0, 1.0, 0.0]).reshape(4, 1), input_shape=(4, 3)),
    })
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SquashError, match="cannot be folded"):
        squash_(model, masks, "fold")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
