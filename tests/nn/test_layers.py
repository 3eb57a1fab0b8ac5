"""The layer-kind registry: one adapter per module type, lookups instead of type switches."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from actsparse_deploy import Recipe, calibrate
from actsparse_deploy.bake.squash import PrunedInput, fold_vector, squash
from actsparse_deploy.base.errors import ConfigError, MaskError, SquashError
from actsparse_deploy.calibration.masks import LayerMask, Masks
from actsparse_deploy.calibration.sparsifier import sample_ndim
from actsparse_deploy.nn.layers import (
    Cut,
    LayerKind,
    WeightedKind,
    layer_kind,
    register_layer_kind,
    unregister_layer_kind,
    why_unregistered,
)

from ..helpers import TinyMLP


def _mask(values):
    return LayerMask(torch.tensor(values, dtype=torch.float32), input_shape=(len(values),))


# --- SquashError split out of MaskError ----------------------------------------------


def test_unknown_squash_mode_is_a_squash_error_not_a_masks_file_error(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    masks = Masks({"fc2": _mask([1, 0, 1, 0, 1, 0, 1, 0])})
    with pytest.raises(SquashError, match="unknown squash mode 'bogus'; known: auto, mul, fold, prune") as info:
        squash(model, masks, mode="bogus")
    assert not isinstance(info.value, MaskError) and info.value.exit_code == 12
    # a masks file problem is still a MaskError, exit code 8
    bad = tmp_path / "masks.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(MaskError, match="not a readable .safetensors file") as info:
        Masks.load(bad)
    assert not isinstance(info.value, SquashError) and info.value.exit_code == 8
    # and so are masks that do not fit the model
    with pytest.raises(MaskError, match="10 input features"):
        squash(TinyMLP(hidden=10), masks)


def test_squash_failures_are_squash_errors_naming_parameters_not_flags():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Conv1d(4, 4, 1, groups=2))
    masks = Masks({"2": LayerMask(torch.tensor([1.0, 0.0, 1.0, 0.0]).reshape(4, 1), input_shape=(4, 3))})
    for mode, done in (("fold", "folded"), ("prune", "pruned")):
        with pytest.raises(SquashError, match=f"layer '2' cannot be {done}: Conv1d with groups") as info:
            squash(model, masks, mode, example=torch.randn(2, 4, 3))
        assert "--mode" not in str(info.value) and "mode='mul'" in str(info.value)
    with pytest.raises(SquashError, match="prune needs an example batch"):
        squash(TinyMLP(), Masks({"fc2": _mask([1, 0] * 4)}), "prune")


# --- lookups ---------------------------------------------------------------------------


class MyLinear(nn.Linear):
    """A subclass: found through its MRO."""


def test_lookup_by_exact_type_then_mro_and_unknown_types():
    linear = layer_kind(nn.Linear(3, 2))
    assert linear is not None and linear.name == "linear"
    assert layer_kind(MyLinear(3, 2)) is linear and layer_kind(MyLinear) is linear
    assert layer_kind(nn.ReLU()) is None
    assert why_unregistered(nn.ReLU()) == "ReLU has no weight to fold into"
    weighted = nn.Module()
    weighted.weight = nn.Parameter(torch.ones(2, 2))
    assert "not a registered layer kind" in why_unregistered(weighted)
    assert "register_layer_kind" in why_unregistered(weighted)
    conv, tconv = layer_kind(nn.Conv2d(3, 4, 3)), layer_kind(nn.ConvTranspose2d(3, 4, 3))
    assert conv is not None and tconv is not None and conv is not tconv
    bn = layer_kind(nn.BatchNorm2d(4))
    assert bn is not None and bn.per_feature and not conv.per_feature


def test_registering_a_type_twice_is_refused():
    with pytest.raises(ConfigError, match="Linear already has a layer kind"):
        register_layer_kind(nn.Linear)(WeightedKind)
    with pytest.raises(ConfigError, match="not an nn.Module type"):
        register_layer_kind(int)(WeightedKind)
    with pytest.raises(ConfigError, match="no layer kind registered for ReLU"):
        unregister_layer_kind(nn.ReLU)


@pytest.mark.parametrize(
    ("layer", "ndim", "axis", "n_in", "samples"),
    [
        (nn.Linear(5, 3), 3, -1, 5, 2),
        (nn.Linear(5, 3), 1, -1, 5, 0),
        (nn.Conv1d(4, 2, 3), 3, -2, 4, 1),
        (nn.Conv2d(4, 2, 3), 4, -3, 4, 1),
        (nn.Conv2d(4, 2, 3), 3, -3, 4, 0),  # unbatched
        (nn.Conv3d(4, 2, 3), 5, -4, 4, 1),
        (nn.ConvTranspose2d(4, 2, 3), 4, -3, 4, 1),
    ],
)
def test_axes_and_sizes(layer, ndim, axis, n_in, samples):
    kind = layer_kind(layer)
    assert kind is not None
    assert (kind.feature_axis(layer), kind.in_features(layer), kind.sample_ndim(layer, ndim)) == (axis, n_in, samples)
    assert sample_ndim(layer, ndim) == samples  # the sparsifier's helper delegates


def test_sample_ndim_of_other_layers_is_unchanged():
    # not a registered weight layer: (batch, features) and (batch, seq, features) are vectors, 4-d and up images
    for layer in (nn.ReLU(), nn.BatchNorm1d(4), nn.LayerNorm(4)):
        assert [sample_ndim(layer, n) for n in (2, 3, 4, 5)] == [1, 2, 1, 1]
    assert sample_ndim(nn.Conv2d(4, 4, 3, groups=2), 4) == 1


def test_why_not_foldable_or_prunable():
    assert layer_kind(nn.Linear(3, 2)).why_not_prunable(nn.Linear(3, 2)) is None
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    assert layer_kind(grouped).why_not_foldable(grouped) == "Conv2d with groups has no weight to fold into"
    assert "groups" in layer_kind(grouped).why_not_prunable(grouped)
    tconv = nn.ConvTranspose1d(4, 2, 3)
    assert layer_kind(tconv).why_not_foldable(tconv) is None  # folds; the producer side cannot shrink
    assert "transposed" in layer_kind(tconv).why_not_prunable(tconv)
    lazy = nn.LazyLinear(3)
    assert "lazy" in layer_kind(lazy).why_not_prunable(lazy)
    bn = nn.BatchNorm1d(4)
    assert layer_kind(bn).why_not_foldable(bn) == "BatchNorm1d has no weight to fold into"


@pytest.mark.parametrize(
    ("layer", "x"),
    [
        (nn.Linear(4, 3), torch.randn(2, 5, 4)),
        (nn.Conv1d(4, 3, 3), torch.randn(2, 4, 7)),
        (nn.Conv2d(4, 3, 3), torch.randn(2, 4, 6, 6)),
        (nn.Conv3d(4, 3, 2), torch.randn(2, 4, 3, 3, 3)),
        (nn.ConvTranspose2d(4, 3, 3), torch.randn(2, 4, 5, 5)),
    ],
)
def test_fold_and_shrink_match_masking_the_input(layer, x):
    torch.manual_seed(0)
    kind = layer_kind(layer)
    vector = torch.tensor([1.0, 0.0, 0.5, 0.0])
    shape = [1] * x.ndim
    shape[kind.feature_axis(layer)] = -1
    with torch.no_grad():
        want = layer(x * vector.reshape(shape))
        folded = copy.deepcopy(layer)
        kind.fold(folded, vector)
        assert_close(folded(x), want, rtol=1e-5, atol=1e-6)
        keep = torch.tensor([0, 2])
        out_keep = torch.tensor([0, 2])
        small = kind.shrink(layer, Cut(in_scale=vector, in_keep=keep, out_keep=out_keep))
        assert type(small) is type(layer) and kind.in_features(small) == 2 and kind.out_features(small) == 2
        got = small(x.index_select(kind.axis(layer, x.ndim), keep))
        assert_close(got, want.index_select(kind.output_axis(layer, want.ndim), out_keep), rtol=1e-5, atol=1e-6)


def test_fold_makes_a_new_parameter_and_keeps_a_tied_weight():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    before = a.weight.detach().clone()
    layer_kind(b).fold(b, torch.tensor([0.0, 1.0, 2.0]))
    assert b.weight is not a.weight and torch.equal(a.weight, before)
    assert torch.equal(b.weight, before * torch.tensor([0.0, 1.0, 2.0]))


def test_batchnorm_is_a_per_feature_kind_that_shrinks():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    kind = layer_kind(bn)
    keep = torch.tensor([1, 3])
    small = kind.shrink(bn, Cut(out_keep=keep))
    x = torch.randn(2, 4, 3, 3)
    assert small.num_features == 2 and kind.axis(bn, 4) == 1 and kind.in_features(small) == 2
    with torch.no_grad():
        assert_close(small(x[:, keep]), bn(x)[:, keep])


# --- a new module type, registered in the test, with no library change ------------------


class ScaledLinear(nn.Module):
    """Not an ``nn.Linear``: ``(x W^T + b) * scale``, weight (out, in), bias (out)."""

    def __init__(self, n_in: int, n_out: int, scale: float = 0.5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * self.scale


class ScaledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = ScaledLinear(6, 8), nn.ReLU(), ScaledLinear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@pytest.fixture
def scaled_linear_kind():
    class ScaledLinearKind(WeightedKind):
        """Features on the last axis, weight (out, in), one ``aten.linear`` op."""

        name = "scaled linear"
        ops = frozenset({torch.ops.aten.linear.default})

    register_layer_kind(ScaledLinear)(ScaledLinearKind)
    yield ScaledLinearKind
    unregister_layer_kind(ScaledLinear)


def test_an_unregistered_type_is_only_masked():
    torch.manual_seed(0)
    model = ScaledNet()
    masks = Masks({"fc2": _mask([1, 0, 1, 0, 0, 1, 1, 0])})
    assert fold_vector(model.fc2, masks["fc2"].mask)[0] is None
    result = squash(model, masks)
    assert result.modes == {"fc2": "mul"} and "not a registered layer kind" in result.reasons["fc2"]
    assert layer_kind(model.fc2) is None


def test_a_registered_type_calibrates_folds_and_prunes(scaled_linear_kind):
    torch.manual_seed(0)
    model = ScaledNet().eval()
    assert isinstance(layer_kind(model.fc2), scaled_linear_kind) and isinstance(layer_kind(model.fc2), LayerKind)
    # calibration: the adapter's sample axes give one value per input feature, even on a 4-d input
    masks = calibrate(model, Recipe.simple(layers=["fc2"], sparsity=0.5), [torch.randn(2, 3, 4, 6)])
    assert masks["fc2"].mask.shape == (8,) and int((masks["fc2"].mask == 0).sum()) == 4
    x = torch.randn(5, 6)
    with torch.no_grad():
        want = squash(model, masks, "mul").model(x)
        folded = squash(model, masks, "fold")
        assert folded.modes == {"fc2": "fold"} and type(folded.model.fc2) is ScaledLinear
        assert_close(folded.model(x), want)
        keep = masks["fc2"].mask.bool()
        assert torch.all(folded.model.fc2.weight[:, ~keep] == 0)
        pruned = squash(model, masks, "prune", example=torch.randn(2, 6))
        assert pruned.modes == {"fc2": "prune"}
        assert pruned.reasons["fc2"] == "removed 4 of 8 features from fc1 and this layer"
        assert pruned.model.fc1.weight.shape == (4, 6) and pruned.model.fc1.bias.shape == (4,)
        assert pruned.model.fc2.weight.shape == (3, 4) and type(pruned.model.fc2) is ScaledLinear
        assert_close(pruned.model(x), want, rtol=1e-5, atol=1e-6)
        assert pruned.max_abs_diff is not None and pruned.max_abs_diff < 1e-5


def test_a_registered_consumer_after_a_residual_is_gathered(scaled_linear_kind):
    """The consumer side alone: the producer's output is also read elsewhere."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = ScaledLinear(6, 8), ScaledLinear(8, 8)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            return self.fc2(h) + h

    torch.manual_seed(0)
    model = Residual().eval()
    masks = Masks({"fc2": _mask([1, 0, 1, 0, 0, 1, 1, 0])})
    result = squash(model, masks, "prune", example=torch.randn(2, 6))
    assert isinstance(result.model.fc2, PrunedInput) and result.model.fc2.module.weight.shape == (8, 4)
    assert result.model.fc1.weight.shape == (8, 6) and "consumer only" in result.reasons["fc2"]
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert_close(result.model(x), squash(model, masks, "mul").model(x), rtol=1e-5, atol=1e-6)


def test_a_kind_must_say_its_sizes_and_says_why_it_cannot_fold_or_prune():
    """No silent stub: a kind without sizes is refused at registration, and the
    default fold / shrink / axis of a kind that cannot do them raise SquashError
    with the kind's own reason."""
    from actsparse_deploy.base.errors import ConfigError, SquashError
    from actsparse_deploy.nn.layers import Cut, LayerKind, register_layer_kind

    class Opaque(nn.Module):
        def forward(self, x):
            return x

    class NoSizes(LayerKind):
        pass

    with pytest.raises(ConfigError, match="must say in_features, out_features"):
        register_layer_kind(Opaque)(NoSizes)

    class Sized(LayerKind):
        def in_features(self, layer):
            return 4

        def out_features(self, layer):
            return 4

    kind, layer = Sized(), Opaque()
    with pytest.raises(SquashError, match="Opaque has no weight to fold into"):
        kind.fold(layer, torch.ones(4))
    with pytest.raises(SquashError, match="Opaque cannot be pruned"):
        kind.shrink(layer, Cut(in_keep=torch.arange(2)))
    with pytest.raises(SquashError, match="not on a fixed axis"):
        kind.axis(layer, 3)


class _LoraLinear(nn.Linear):
    """A LoRA-style Linear: its forward adds an adapter that reads the input too."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__(i, o)
        self.lora_a = nn.Parameter(torch.randn(2, i) * 0.3)
        self.lora_b = nn.Parameter(torch.randn(o, 2) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + x @ self.lora_a.T @ self.lora_b.T


class _RenamedLinear(nn.Linear):
    """A subclass that keeps Linear's forward."""


@pytest.mark.parametrize("consumer", [_LoraLinear, _RenamedLinear])
def test_a_subclass_that_overrides_forward_is_not_folded(consumer):
    """Folding scales the weight only: a subclass whose forward reads the input
    elsewhere would silently change. Fold refuses it with the reason, auto keeps
    the multiply; a subclass with Linear's own forward still folds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), consumer(16, 4)).eval()
    mask = torch.ones(16)
    mask[::2] = 0
    masks = Masks({"2": LayerMask(mask)})
    x = torch.randn(5, 8)
    reference = squash(model, masks, "mul").model(x)
    overrides = consumer is _LoraLinear
    if overrides:
        with pytest.raises(SquashError, match="_LoraLinear overrides Linear.forward"):
            squash(model, masks, "fold")
    for mode in ("auto",) if overrides else ("auto", "fold"):
        result = squash(model, masks, mode)
        assert result.modes == {"2": "mul" if overrides else "fold"}
        assert_close(result.model(x), reference, atol=1e-6, rtol=1e-5)


def test_non_finite_weights_are_counted_a_slice_at_a_time(monkeypatch) -> None:
    """The check reads a weight a slice at a time (never a flag per value of a whole large weight): the
    count is the same across slices."""
    import pytest
    import torch
    from torch import nn

    from actsparse_deploy.base.errors import WeightsError
    from actsparse_deploy.nn import modules

    monkeypatch.setattr(modules, "_CHECK_ELEMENTS", 5)
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight[0, 1] = float("nan")
        layer.weight[3, 2] = float("inf")  # in another slice than the NaN
    with pytest.raises(WeightsError, match=r"NaN or Inf \(2 of 16 values\)"):
        modules.check_finite_weights(layer)
