"""Prune: masked features leave the model, and the model still computes what mul computes."""

from __future__ import annotations

import copy
import itertools
import json

import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from actsparse_deploy import Recipe, calibrate, squash_
from actsparse_deploy.app.workload import load_workload
from actsparse_deploy.bake.graph import Chain, Dataflow
from actsparse_deploy.bake.squash import MaskedInput, PrunedInput, squash
from actsparse_deploy.base.errors import SquashError
from actsparse_deploy.calibration.masks import LayerMask, Masks
from actsparse_deploy.models.loading import load_recipe
from actsparse_deploy.onnx.export import export_onnx
from actsparse_deploy.onnx.validate import validate

from ..helpers import MINILM_OUTDIRS, LinearPair, assert_same_outputs

EXPORTERS = ["torchscript", "dynamo"]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def zeros(masks, name):
    return int((masks[name].dense() == 0).sum())


# --- small models built here --------------------------------------------------------


class Chain3(nn.Module):
    """fc1 -> ReLU -> fc2 -> GELU -> fc3: fc2 both consumes and produces pruned features."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(6, 12), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(12, 10), nn.GELU()
        self.fc3 = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


class Residual(nn.Module):
    """The activation feeds fc2 and a residual add: fc1 must keep every feature."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8)

    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(h) + h


class TwoReaders(nn.Module):
    """fc1's output is read by the ReLU before fc2 and by fc3."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        y = self.fc1(x)
        return self.fc2(F.relu(y)) + self.fc3(y)


class Functional(nn.Module):
    """Functional per-feature ops between the layers, on (batch, tokens, features)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(6, 16), nn.Linear(16, 6)

    def forward(self, x):
        h = F.silu(self.up(x)) * 2.0 + 0.5
        h = F.dropout(torch.tanh(F.leaky_relu(h, 0.2)), 0.1, self.training)
        return self.down(h)


class ConvNet(nn.Module):
    """conv1 -> BN -> ReLU -> conv2 (reflect padding) -> ReLU -> pool -> flatten -> fc."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.act = nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, padding_mode="reflect")
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(6 * 3 * 3, 4)

    def forward(self, x):
        h = self.act(self.conv2(self.act(self.bn(self.conv1(x)))))
        return self.fc(self.pool(h).flatten(1))


class SharedProducer(nn.Module):
    """fc1 runs twice: removing its output features would change both calls."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(F.relu(self.fc1(x)))))


def _conv_net():
    torch.manual_seed(0)
    model = ConvNet().eval()
    with torch.no_grad():  # an eval BatchNorm that is not the identity
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    return model


def _mask(values, *trailing):
    return LayerMask(torch.tensor(values, dtype=torch.float32).reshape(-1, *trailing))


@pytest.fixture
def chain3():
    torch.manual_seed(0)
    model = Chain3().eval()
    masks = Masks({
        "fc2": _mask([1, 0, 0.5, 1, 0, 0, 2, 1, 1, 0, 1, 0.25]),  # non-binary: kept features are scaled
        "fc3": _mask([0, 1, 1, 0, 1, 1, 0, 1, 1, 1]),
    })
    return model, masks


def test_chain_prunes_both_sides_and_composes(chain3):
    model, masks = chain3
    x = torch.randn(5, 6)
    result = squash(model, masks, "prune", example=x, check_batches=[torch.randn(7, 6)])
    pruned, reference = result.model, squash(model, masks, "mul").model
    assert result.modes == {"fc2": "prune", "fc3": "prune"}
    assert result.reasons["fc2"] == "removed 4 of 12 features from fc1 and this layer"
    assert result.reasons["fc3"] == "removed 3 of 10 features from fc2 and this layer"
    # fc2 lost 4 input and 3 output features; all layers are plain Linears at their names
    assert [type(m) for m in (pruned.fc1, pruned.fc2, pruned.fc3)] == [nn.Linear] * 3
    assert (pruned.fc1.out_features, pruned.fc2.in_features, pruned.fc2.out_features, pruned.fc3.in_features) == (8, 8, 7, 7)
    kept2 = masks["fc2"].mask.nonzero().flatten()
    kept3 = masks["fc3"].mask.nonzero().flatten()
    assert_close(pruned.fc1.weight, model.fc1.weight[kept2])
    assert_close(pruned.fc2.weight, (model.fc2.weight * masks["fc2"].mask)[kept3][:, kept2])
    assert_close(pruned.fc2.bias, model.fc2.bias[kept3])
    assert n_params(pruned) < n_params(model)
    assert_same_outputs(pruned, reference, [torch.randn(9, 6), torch.randn(1, 6)])
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-5
    assert_same_outputs(squash(model, masks, "auto", example=x).model, reference, [torch.randn(9, 6)])


def test_auto_without_example_keeps_fold_and_prune_needs_one(chain3):
    model, masks = chain3
    assert squash(model, masks).modes == {"fc2": "fold", "fc3": "fold"}
    with pytest.raises(SquashError, match="prune needs an example batch"):
        squash(model, masks, "prune")


def test_residual_keeps_the_producer():
    torch.manual_seed(0)
    model = Residual().eval()
    masks = Masks({"fc2": _mask([1, 0, 1, 0, 0.5, 1, 0, 1])})
    x = torch.randn(4, 6)
    reference = squash(model, masks, "mul").model
    pruned = squash(model, masks, "prune", example=x)
    assert pruned.modes == {"fc2": "prune"}
    assert pruned.reasons["fc2"].startswith("consumer only: removed 3 of 8 input features")
    assert "also read by aten.add" in pruned.reasons["fc2"]
    assert pruned.model.fc1.out_features == 8  # the residual needs every feature
    assert isinstance(pruned.model.fc2, PrunedInput) and pruned.model.fc2.module.in_features == 5
    assert pruned.model.fc2.index.tolist() == [0, 2, 4, 5, 7]
    auto = squash(model, masks, "auto", example=x)
    assert auto.modes == {"fc2": "fold"} and "not pruned: the output of aten.relu" in auto.reasons["fc2"]
    assert auto.model.fc2.in_features == 8 and auto.model.fc1.out_features == 8
    for result in (pruned, auto):
        assert_same_outputs(result.model, reference, [torch.randn(6, 6)])


def test_producer_read_twice_is_not_pruned():
    torch.manual_seed(0)
    model = TwoReaders().eval()
    masks = Masks({"fc2": _mask([0, 1, 1, 0, 1, 1, 0, 1])})
    result = squash(model, masks, "prune", example=torch.randn(3, 6))
    assert "also read by aten.linear in fc3" in result.reasons["fc2"]
    assert result.model.fc1.out_features == 8 and result.model.fc2.module.in_features == 5
    assert_same_outputs(result.model, squash(model, masks, "mul").model, [torch.randn(5, 6)])


def test_producer_called_twice_is_not_pruned():
    torch.manual_seed(0)
    model = SharedProducer().eval()
    masks = Masks({"fc2": _mask([0, 1, 1, 0, 1, 1, 0, 1])})
    result = squash(model, masks, "auto", example=torch.randn(3, 8))
    assert result.modes == {"fc2": "fold"} and "fc1 runs 2" in result.reasons["fc2"]
    assert result.model.fc1.out_features == 8
    assert_same_outputs(result.model, squash(model, masks, "mul").model, [torch.randn(5, 8)])


def test_functional_ops_between_are_followed():
    torch.manual_seed(0)
    model = Functional().eval()
    values = torch.rand(16)
    values[::3] = 0
    masks = Masks({"down": LayerMask(values)})
    x = torch.randn(2, 5, 6)
    result = squash(model, masks, "auto", example=x)
    assert result.modes == {"down": "prune"} and result.reasons["down"] == "removed 6 of 16 features from up and this layer"
    assert result.model.up.out_features == 10 and result.model.down.in_features == 10
    assert_same_outputs(result.model, squash(model, masks, "mul").model, [torch.randn(3, 7, 6)])


def test_conv_batchnorm_chain():
    model = _conv_net()
    masks = Masks({
        "conv2": _mask([1, 0, 0.5, 0, 1, 1, 0, 2], 1, 1),  # per channel, through BN and ReLU to conv1
        "fc": _mask([float(i % 3 != 0) for i in range(54)]),  # flatten in between: consumer only / fold
    })
    x = torch.rand(4, 2, 6, 6)
    reference = squash(model, masks, "mul").model
    pruned = squash(model, masks, "prune", example=x, check_batches=[torch.rand(3, 2, 6, 6)], channel_multiple=1)
    assert pruned.modes == {"conv2": "prune", "fc": "prune"}
    assert pruned.reasons["conv2"] == "removed 3 of 8 features from conv1 (and bn) and this layer"
    assert "aten.flatten" in pruned.reasons["fc"] and pruned.reasons["fc"].startswith("consumer only: removed 18 of 54")
    m = pruned.model
    assert (m.conv1.out_channels, m.bn.num_features, m.conv2.in_channels) == (5, 5, 5)
    assert m.conv1.weight.shape == (5, 2, 3, 3) and m.conv2.weight.shape == (6, 5, 3, 3)
    assert m.bn.running_mean.shape == m.bn.running_var.shape == m.bn.weight.shape == m.bn.bias.shape == (5,)
    assert_close(m.bn.running_var, model.bn.running_var[[0, 2, 4, 5, 7]])
    assert type(m.bn) is nn.BatchNorm2d and m.conv2.padding_mode == "reflect"
    assert m.fc.module.in_features == 36
    auto = squash(model, masks, "auto", example=x, channel_multiple=1)
    assert auto.modes == {"conv2": "prune", "fc": "fold"}
    # by default convs keep a multiple of 8 channels: 5 kept of 8 rounds up to all 8
    aligned = squash(model, masks, "auto", example=x)
    assert aligned.modes == {"conv2": "fold", "fc": "fold"}
    assert "kept whole: pruned convs keep a multiple of 8 channels" in aligned.reasons["conv2"]
    for result in (pruned, auto, aligned):
        assert_same_outputs(result.model, reference, [torch.rand(5, 2, 6, 6)])


def test_conv_channels_rounded_up_to_a_multiple():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 20, 3, padding=1), nn.ReLU(), nn.Conv2d(20, 4, 3, padding=1)).eval()
    mask = torch.ones(20)
    mask[[1, 3, 5, 7, 9, 11, 13]] = 0  # 13 kept -> 16 kept, 4 removed
    masks = Masks({"2": LayerMask(mask=mask.reshape(20, 1, 1), input_shape=(20, 6, 6))})
    x = torch.rand(3, 2, 6, 6)
    result = squash(model, masks, "auto", example=x)
    assert result.model[0].out_channels == result.model[2].in_channels == 16
    assert result.reasons["2"] == (
        "removed 4 of 20 features from 0 and this layer (7 are masked: 3 stay, zeroed in the weight, "
        "so that 16 channels, a multiple of 8, are kept)"
    )
    assert result.sparsity["2"] == 4 / 20  # what was removed, not the 7 / 20 masked
    assert_same_outputs(result.model, squash(model, masks, "mul").model, [torch.rand(4, 2, 6, 6)])


def test_masked_module_on_the_path_stops_producer_pruning():
    torch.manual_seed(0)
    model = Chain3().eval()
    masks = Masks({"act2": LayerMask(torch.rand(3, 10)), "fc3": _mask([0, 1, 1, 0, 1, 1, 0, 1, 1, 1])})
    x = torch.randn(3, 6)
    result = squash(model, masks, "auto", example=x)
    assert result.modes == {"act2": "mul", "fc3": "fold"}
    assert "act2, itself masked" in result.reasons["fc3"] and result.model.fc2.out_features == 10
    assert_same_outputs(result.model, squash(model, masks, "mul").model, [torch.randn(3, 6)])
    with pytest.raises(SquashError, match="'act2' cannot be pruned"):
        squash(model, masks, "prune", example=x)


def test_all_zero_mask_keeps_one_feature_at_zero(chain3):
    model, _ = chain3
    masks = Masks({"fc3": LayerMask(torch.zeros(10))})
    result = squash(model, masks, "prune", example=torch.randn(2, 6))
    assert result.model.fc2.out_features == 1 and result.model.fc3.in_features == 1
    assert torch.all(result.model.fc3.weight == 0)
    assert_same_outputs(result.model, squash(model, masks, "mul").model, [torch.randn(4, 6)])


class SumReader(nn.Module):
    """fc1's features also reach the output through a sum: same shapes if they are removed."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc2(h) + h.sum(-1, keepdim=True)


@pytest.mark.parametrize(("factory", "error"), [(SumReader, "not exact"), (Residual, "fails on check batch 0")])
def test_a_wrong_plan_raises_and_is_undone(monkeypatch, factory, error):
    torch.manual_seed(0)
    model = factory().train()
    masks = Masks({"fc2": _mask([1, 0, 1, 0, 0.5, 1, 0, 1])})
    before = copy.deepcopy(model)
    # pretend the analysis missed the other reader: the check against mul must catch it
    monkeypatch.setattr(Dataflow, "producer", lambda self, name, masked=(): (Chain("fc1"), ""))
    with pytest.raises(SquashError, match=f"{error}.*the model is left as it was"):
        squash_(model, masks, "prune", example=torch.randn(4, 6))
    assert type(model.fc1) is nn.Linear and type(model.fc2) is nn.Linear and model.training
    for (name, a), (_, b) in zip(model.state_dict().items(), before.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    monkeypatch.undo()
    result = squash_(model, masks, "prune", example=torch.randn(4, 6))
    assert result.model is model and model.training and isinstance(model.fc2, PrunedInput)
    assert_same_outputs(model, squash(before, masks, "mul").model, [torch.randn(5, 6)])


def test_calibrated_masks_and_mul_fallback_in_auto():
    torch.manual_seed(0)
    model = Chain3().eval()
    batches = [torch.randn(8, 4, 6) for _ in range(3)]
    masks = calibrate(model, Recipe.simple(layers=["fc2", "fc3"], sparsity=0.5, structured=True), batches)
    masks.layers["fc1"] = LayerMask((torch.rand(4, 6) > 0.5).float())  # one value per (token, feature): mul only
    result = squash(model, masks, "auto", example=batches[0], check_batches=batches[1:])
    assert result.modes == {"fc2": "prune", "fc3": "prune", "fc1": "mul"}
    assert isinstance(result.model.fc1, MaskedInput)
    assert result.model.fc1.module.out_features == 12 - zeros(masks, "fc2")
    assert_same_outputs(result.model, squash(model, masks, "mul").model, batches)


class ShapeBranch(nn.Module):
    """Adds its input back when the widths match: they do not, until fc1 is pruned."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 6)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.shape[-1] == x.shape[-1]:
            h = h[..., :6] + x
        return self.fc2(h) if h.shape[-1] == 8 else h


def test_control_flow_on_a_pruned_shape_is_caught():
    """The graph is the one traced on the example; code that branches on a width prune
    changes is beyond the analysis: the check against mul catches it, nothing is kept."""
    torch.manual_seed(0)
    model = ShapeBranch().eval()
    masks = Masks({"fc2": _mask([1, 0, 1, 1, 0, 1, 1, 1])})
    with pytest.raises(SquashError, match="not exact|fails on check batch"):
        squash_(model, masks, "auto", example=torch.randn(3, 6))
    assert type(model.fc1) is nn.Linear and model.fc1.out_features == 8 and type(model.fc2) is nn.Linear


class DataDependent(nn.Module):
    """A branch on a tensor's value: torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.relu(h) if x.sum() > 0 else h)


def test_a_model_torch_export_cannot_capture():
    torch.manual_seed(0)
    model = DataDependent().eval()
    masks = Masks({"fc2": _mask([1, 0, 1, 0, 1, 1, 0, 1])})
    x = torch.randn(3, 4)
    with pytest.raises(SquashError, match="torch.export cannot capture the model on the example batch"):
        squash(model, masks, "prune", example=x)
    result = squash(model, masks, "auto", example=x)  # auto folds and says why it did not prune
    assert result.modes == {"fc2": "fold"} and "not pruned: torch.export cannot capture" in result.reasons["fc2"]
    assert_same_outputs(result.model, squash(model, masks, "mul").model, [x, -x])


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "silu": F.silu,
    "none": lambda h: h,
    "scaled_leaky": lambda h: F.leaky_relu(h * 2.0 - 0.5, 0.1),
}


class RandomNet(nn.Module):
    """Linear layers; after each but the last an activation, and then either nothing
    ("plain"), a residual add of the layer's input ("residual"), or a second reader of
    the layer's output ("tap")."""

    def __init__(self, dims, acts, joins):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.acts, self.joins = acts, joins

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            y = layer(x)
            if i == len(self.layers) - 1:
                return y
            h = ACTIVATIONS[self.acts[i]](y)
            if self.joins[i] == "residual":
                h = h + x
            elif self.joins[i] == "tap":
                h = h + y.mean(-1, keepdim=True)
            x = h


@st.composite
def random_nets(draw):
    dims = draw(st.lists(st.integers(2, 7), min_size=3, max_size=5))
    n = len(dims) - 1
    acts = draw(st.lists(st.sampled_from(sorted(ACTIVATIONS)), min_size=n, max_size=n))
    joins = [draw(st.sampled_from(["plain", "plain", "tap"] + ["residual"] * (a == b))) for a, b in itertools.pairwise(dims)]
    torch.manual_seed(draw(st.integers(0, 10_000)))
    model = RandomNet(dims, acts, joins).eval()
    chosen = draw(st.lists(st.integers(1, n - 1), min_size=1, unique=True))
    masks = Masks({
        f"layers.{i}": LayerMask(torch.tensor(draw(st.lists(st.sampled_from([0.0, 0.0, 1.0, 0.5, 2.0]), min_size=dims[i], max_size=dims[i]))))
        for i in chosen
    })
    shape = (3, dims[0]) if draw(st.booleans()) else (2, 4, dims[0])
    return model, masks, shape


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=random_nets())
def test_random_linear_nets_prune_exactly(case):
    model, masks, shape = case
    reference = squash(model, masks, "mul").model
    pruned = squash(model, masks, "prune", example=torch.randn(shape))
    auto = squash(model, masks, "auto", example=torch.randn(shape))
    batches = [torch.randn(shape), torch.randn(5, *shape[1:])]
    assert_same_outputs(pruned.model, reference, batches)
    assert_same_outputs(auto.model, reference, batches)
    for name in masks:
        i = int(name.split(".")[1])
        mask = masks[name].dense()
        n_kept = max(1, int((mask != 0).sum()))
        layer = pruned.model.layers[i]
        assert (layer.module if isinstance(layer, PrunedInput) else layer).in_features == n_kept
        producer_pruned = n_kept < mask.numel() and model.joins[i - 1] == "plain"
        assert pruned.reasons[name].startswith("removed") == producer_pruned
        assert auto.modes[name] == ("prune" if producer_pruned else "fold")
        producer = pruned.model.layers[i - 1]
        producer = producer.module if isinstance(producer, PrunedInput) else producer
        assert producer.out_features == (n_kept if producer_pruned else mask.numel())


# --- built-in models ---------------------------------------------------------------------

EXPECTED = {
    "digits-mlp": {
        "auto": {"fc2": "prune", "fc3": "prune"},
        "prune": {"fc2": "prune", "fc3": "prune"},
        "producers": {"fc2": "fc1", "fc3": "fc2"},
    },
    "digits-cnn": {
        # conv2: 2 of 16 channels masked, kept 14 -> 16 (a multiple of 8): folded
        "auto": {"conv2": "fold", "fc1": "fold", "fc2": "prune"},
        "prune": {"conv2": "prune", "fc1": "prune", "fc2": "prune"},
        "producers": {"fc2": "fc1"},
    },
    "minilm": {
        "auto": {f"bert.encoder.layer.{i}.output.dense": "prune" for i in range(6)},
        "prune": {f"bert.encoder.layer.{i}.output.dense": "prune" for i in range(6)},
        "producers": {f"bert.encoder.layer.{i}.output.dense": f"bert.encoder.layer.{i}.intermediate.dense" for i in range(6)},
    },
}


@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.slow) if name == "minilm" else name for name in sorted(EXPECTED)])
def builtin(request):
    """(name, workload, masks of the built-in recipe, {mode: squash result}), made once per model."""
    work = load_workload(request.param)
    calibration = work.calibration[:8] if request.param == "minilm" else work.calibration
    masks = calibrate(work.model, load_recipe(work, None), calibration)
    squashed = {"mul": squash(work.model, masks, "mul")}
    for mode in ("auto", "prune"):
        squashed[mode] = squash(work.model, masks, mode, example=work.example(), check_batches=work.heldout[:2])
    return request.param, work, masks, squashed


def test_builtin_modes_reasons_and_exactness(builtin):
    name, work, masks, squashed = builtin
    for mode in ("auto", "prune"):
        result = squashed[mode]
        assert result.modes == EXPECTED[name][mode]
        for layer, producer in EXPECTED[name]["producers"].items():
            n = masks[layer].dense().numel()
            edited = [what for what in ("weight", "bias") if getattr(masks[layer], what) is not None]
            compensated = f"; compensated ({masks[layer].compensate}): new {' and '.join(edited)}" if edited else ""
            assert result.reasons[layer] == f"removed {zeros(masks, layer)} of {n} features from {producer} and this layer{compensated}"
        assert_same_outputs(result.model, squashed["mul"].model, work.heldout[2:6])
        assert n_params(result.model) < n_params(work.model)
    if name == "digits-cnn":
        assert "aten.flatten in flatten" in squashed["auto"].reasons["fc1"]
        assert squashed["prune"].reasons["fc1"].startswith("consumer only: removed 128 of 512 input features")


def test_builtin_layers_really_shrink(builtin):
    name, _, masks, squashed = builtin
    m = squashed["prune"].model
    if name == "minilm":
        for i in range(6):
            layer = m.bert.encoder.layer[i]
            n = 1536 - zeros(masks, f"bert.encoder.layer.{i}.output.dense")
            assert n < 1536
            assert type(layer.intermediate.dense) is nn.Linear and layer.intermediate.dense.out_features == n
            assert layer.intermediate.dense.weight.shape == (n, 384) and layer.intermediate.dense.bias.shape == (n,)
            assert layer.output.dense.weight.shape == (384, n)
    elif name == "digits-mlp":
        assert (m.fc1.out_features, m.fc2.in_features) == (128 - zeros(masks, "fc2"),) * 2
        assert (m.fc2.out_features, m.fc3.in_features) == (64 - zeros(masks, "fc3"),) * 2
    else:
        assert (m.conv1.out_channels, m.conv2.in_channels) == (16, 16)  # 14 kept, rounded up to 16
        assert m.fc1.module.weight.shape == (64 - zeros(masks, "fc2"), 512 - zeros(masks, "fc1"))
        assert m.fc2.in_features == 64 - zeros(masks, "fc2")
        assert squashed["auto"].model.fc1.weight.shape == (64 - zeros(masks, "fc2"), 512)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("builtin", ["digits-cnn", "digits-mlp"], indirect=True)  # MiniLM: the test below
def test_pruned_builtin_exports_and_validates(builtin, exporter, tmp_path):
    name, work, masks, squashed = builtin
    model = squashed["prune"].model
    path = tmp_path / "model.onnx"
    export_onnx(model, work.example(), path, exporter=exporter, io_spec=work.io)
    report = validate(path, model, work.heldout)
    assert report.passed and report.max_abs <= 1e-4 and len(report.batch_sizes) >= 2
    dims = {d for init in onnx.load(str(path)).graph.initializer for d in init.dims}
    if name == "digits-mlp":
        assert 128 not in dims and 128 - zeros(masks, "fc2") in dims


@pytest.mark.slow
@pytest.mark.background("minilm-torchscript", "minilm-dynamo")
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_pruned_minilm_exports_and_validates(background, exporter):
    """MiniLM through the session's one `actsparse convert minilm` per exporter (auto
    mode prunes every layer); its held-out data has several sequence lengths
    (test_pipeline.py::test_minilm_heldout_has_several_sequence_lengths)."""
    background.result(f"minilm-{exporter}")
    out = background.folder("minilm") / MINILM_OUTDIRS[exporter]
    report = json.loads((out / "report.json").read_text())
    masks = Masks.load(out / "masks.safetensors")
    assert report["export"]["exporter"] == exporter
    assert {row["layer"]: row["mode"] for row in report["layers"]} == EXPECTED["minilm"]["prune"]
    validation = report["validation"]
    assert validation["passed"] and validation["max_abs_diff"] <= 1e-4 and len(validation["batch_sizes"]) >= 2
    dims = [d for init in onnx.load(str(out / "model.onnx")).graph.initializer for d in init.dims]
    assert 1536 not in dims
    for layer in EXPECTED["minilm"]["prune"]:  # each MLP's hidden width, as pruned
        assert 1536 - zeros(masks, layer) in dims


class _LazyCache(nn.Module):
    """Builds a tensor cache on its first forward (as rotary caches often do)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "_cache"):
            self._cache = torch.arange(8.0) / 8
        return self.fc2(torch.relu(self.fc1(x + self._cache)))


def test_capture_leaves_no_fake_tensor_in_attributes_a_forward_creates():
    """torch.export runs forward on fake tensors: an attribute the forward creates
    is removed after the capture, so the model copies and runs as before (it was a
    raw RuntimeError from deepcopy: "Cannot access data pointer of Tensor")."""
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    mask = torch.ones(16)
    mask[::2] = 0
    masks = Masks({"fc2": LayerMask(mask)})
    model = _LazyCache().eval()
    reference = squash(model, masks, "mul").model
    for mode in ("prune", "auto"):
        result = squash(model, masks, mode, example=x, check_batches=[torch.randn(5, 8)])
        assert result.modes == {"fc2": "prune"}
        assert_same_outputs(result.model, reference, [x])
    fresh = _LazyCache().eval()
    fresh.load_state_dict(model.state_dict())
    assert_same_outputs(copy.deepcopy(model), fresh, [x])  # the model itself still copies and computes as before


class _WeightReadTwice(LinearPair):
    """fc is called, and its weight is also read by code of the model itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.fc(h) + F.linear(h, self.fc.weight)


def test_a_layer_whose_weight_is_also_read_elsewhere_keeps_its_mask_a_multiply():
    """The mask is on fc's call only. Before: mul gave a model that failed
    (AttributeError: the wrapper had no `weight`), prune and auto failed the same
    way, and fold silently changed the other product too. Now mul runs, auto keeps
    the mask a multiply and says why, prune refuses with the same reason; every
    result computes what the sparsifier's hooks do."""
    torch.manual_seed(0)
    model = _WeightReadTwice().eval()
    mask = torch.ones(8)
    mask[::2] = 0
    masks = Masks({"fc": LayerMask(mask)})
    x, more = torch.randn(2, 4), [torch.randn(5, 4)]
    want = [model.fc(torch.relu(model.a(b)) * mask) + F.linear(torch.relu(model.a(b)), model.fc.weight) for b in [x, *more]]
    mul = squash(model, masks, "mul").model
    for b, w in zip([x, *more], want, strict=True):
        assert_close(mul(b), w)
    auto = squash(model, masks, "auto", example=x, check_batches=more)
    assert auto.modes == {"fc": "mul"}
    assert "fc.weight is also read by" in auto.reasons["fc"]
    for b, w in zip([x, *more], want, strict=True):
        assert_close(auto.model(b), w)
    with pytest.raises(SquashError, match=r"layer 'fc' cannot be pruned: fc.weight is also read by"):
        squash(model, masks, "prune", example=x, check_batches=more)
    with pytest.raises(SquashError, match=r"layer 'fc' cannot be folded: fc.weight is also read by aten.linear"):
        squash(model, masks, "fold", example=x)


class _NoCopy(nn.Linear):
    """A layer that refuses to be copied: a squash that copies the whole model fails on it."""

    def __deepcopy__(self, memo):
        raise AssertionError("a layer the squash does not change was copied")


def test_prune_copies_only_the_layers_it_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), _NoCopy(4, 3))
    masks = Masks({"2": _mask([1, 0, 1, 0, 0.5, 1, 0, 1])})
    x = torch.randn(5, 6)
    with torch.no_grad():
        want = model[4](model[3](model[2](model[1](model[0](x)) * masks["2"].mask)))
    result = squash_(model, masks, "prune", example=torch.randn(4, 6), check_batches=[torch.randn(3, 6)])
    assert result.model is model and model[0].out_features == 5 and isinstance(model[4], _NoCopy)
    with torch.no_grad():
        assert_close(model(x), want, rtol=1e-4, atol=1e-5)
