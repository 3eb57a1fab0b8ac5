"""Prune and fold on the model families users bring: SwiGLU joins (Llama), GPT-2's
``Conv1D``, depthwise-separable CNNs; and ``auto`` never picks a gather alone."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from actsparse_deploy import Recipe, calibrate
from actsparse_deploy.bake.graph import Chain, Dataflow
from actsparse_deploy.bake.squash import MaskedInput, PrunedInput, squash
from actsparse_deploy.base.errors import SquashError
from actsparse_deploy.calibration.masks import LayerMask, Masks
from actsparse_deploy.calibration.sparsifier import sample_ndim
from actsparse_deploy.nn.layers import layer_kind
from actsparse_deploy.onnx.export import export_onnx
from actsparse_deploy.onnx.latency import ort_session
from actsparse_deploy.onnx.validate import validate

from ..helpers import assert_same_outputs

transformers = pytest.importorskip("transformers", reason="the Llama / GPT-2 families come from transformers")


def half_mask(n, seed=0, scaled=True):
    """Half of ``n`` features masked (chosen at random); the kept ones scaled (non-binary) when ``scaled``."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, generator=g) + 0.5 if scaled else torch.ones(n)
    values[torch.randperm(n, generator=g)[: n // 2]] = 0
    return values


def kept(values):
    return torch.nonzero(values).flatten()


# --- models -------------------------------------------------------------------------------


class LogitsOnly(nn.Module):
    """A Hugging Face causal LM called on ``input_ids``, returning its logits only."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids).logits


def tiny_llama(intermediate=256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, use_cache=False,
    )
    return LogitsOnly(LlamaForCausalLM(config)).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, use_cache=False)
    config.bos_token_id = config.eos_token_id = 0
    return LogitsOnly(GPT2LMHeadModel(config)).eval()


def ids(batch=2, length=8, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


LLAMA_DOWN = [f"lm.model.layers.{i}.mlp.down_proj" for i in range(2)]
GPT2_PROJ = [f"lm.transformer.h.{i}.mlp.c_proj" for i in range(2)]


class FusedMLP(nn.Module):
    """Phi-3 style: one gate_up_proj of 2 x intermediate rows, chunked in two."""

    def __init__(self, hidden=16, intermediate=32):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SwiGLU(nn.Module):
    """LlamaMLP in plain torch, with an optional extra on the way."""

    def __init__(self, extra="none"):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.other = nn.Linear(8, 16)
        self.extra = extra

    def forward(self, x):
        up = self.up(x)
        if self.extra == "same":  # one producer on both sides of the join
            return self.down(F.silu(up) * up)
        if self.extra == "cat":  # a join with features that no layer makes
            return self.down(F.silu(self.gate(x)) * up + torch.cat([x, x], -1))
        if self.extra == "broadcast":  # a join with a per-token scale
            return self.down(F.silu(self.gate(x)) * up.mean(-1, keepdim=True))
        h = F.silu(self.gate(x)) * up
        if self.extra == "tap":  # up's output also read elsewhere
            return self.down(h) + up.sum(-1, keepdim=True)
        if self.extra == "gelu3":  # a three-way join of sums and products
            h = h + self.other(x) * F.gelu(up) - 0.5
        return self.down(h)


class DSCNN(nn.Module):
    """Depthwise-separable: stem -> BN -> ReLU -> depthwise -> BN -> ReLU -> pointwise
    -> BN -> ReLU -> depthwise (no bias) -> ReLU -> pointwise -> pool -> fc."""

    def __init__(self, middle_groups=None):
        super().__init__()
        self.stem, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.dw1, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=middle_groups or 16), nn.BatchNorm2d(16)
        self.pw1, self.bn3 = nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32)
        self.dw2 = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.pw2 = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.bn2(self.dw1(F.relu(self.bn1(self.stem(x))))))
        h = F.relu(self.dw2(F.relu(self.bn3(self.pw1(h)))))
        return self.fc(F.adaptive_avg_pool2d(self.pw2(h), 1).flatten(1))


class Multiplier(nn.Module):
    """A depthwise conv with channel multiplier 2 (groups = in, out = 2 x in): not per channel."""

    def __init__(self):
        super().__init__()
        self.stem, self.dw, self.pw = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.pw(F.relu(self.dw(F.relu(self.stem(x)))))


def ds_cnn(middle_groups=None):
    torch.manual_seed(0)
    model = DSCNN(middle_groups).eval()
    with torch.no_grad():  # eval BatchNorms that are not the identity
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model


def images(n=2, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def conv_mask(values):
    return LayerMask(values.reshape(-1, 1, 1))


# --- SwiGLU: joins ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    masks = Masks({name: LayerMask(half_mask(256, seed=i)) for i, name in enumerate(LLAMA_DOWN)})
    reference = squash(model, masks, "mul").model
    pruned = squash(model, masks, "prune", example=ids(), check_batches=[ids(3, 5, seed=1)])
    return model, masks, reference, pruned


def test_llama_down_proj_prunes_gate_up_and_down(llama):
    model, masks, reference, result = llama
    assert result.modes == {name: "prune" for name in LLAMA_DOWN}
    for i, name in enumerate(LLAMA_DOWN):
        mlp, original = result.model.lm.model.layers[i].mlp, model.lm.model.layers[i].mlp
        prefix = f"lm.model.layers.{i}.mlp"
        assert result.reasons[name] == f"removed 128 of 256 features from {prefix}.gate_proj, {prefix}.up_proj and this layer"
        assert result.sparsity[name] == 0.5
        assert [type(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)] == [nn.Linear] * 3
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (128, 64)
        assert mlp.down_proj.weight.shape == (64, 128) and mlp.down_proj.in_features == 128
        index = kept(masks[name].mask)
        assert_close(mlp.gate_proj.weight, original.gate_proj.weight[index])
        assert_close(mlp.up_proj.weight, original.up_proj.weight[index])
        assert_close(mlp.down_proj.weight, (original.down_proj.weight * masks[name].mask)[:, index])
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    assert_same_outputs(result.model, reference, [ids(2, 11, seed=2), ids(1, 3, seed=3)])


def test_llama_auto_prunes_too(llama):
    model, masks, reference, _ = llama
    auto = squash(model, masks, "auto", example=ids())
    assert auto.modes == {name: "prune" for name in LLAMA_DOWN}
    assert auto.model.lm.model.layers[1].mlp.up_proj.out_features == 128
    assert_same_outputs(auto.model, reference, [ids(2, 6, seed=4)])


def test_chain_keeps_single_producer_api():
    chain = Chain("fc1", ("bn",), ("aten.relu",))
    assert chain.producers == ("fc1",) and chain.producer == "fc1"
    assert Chain(("a", "b")).producer == "a, b"
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    found, why = Dataflow(model, torch.randn(3, 4)).producer("2")
    assert why == "" and found.producers == ("0",) and found.ops == ("aten.relu",)


@pytest.mark.parametrize(
    ("extra", "producers"),
    [("none", ("gate", "up")), ("same", ("up",)), ("gelu3", ("gate", "up", "other"))],
)
def test_joins_prune_every_producer(extra, producers):
    torch.manual_seed(0)
    model = SwiGLU(extra).eval()
    values = half_mask(16)
    masks = Masks({"down": LayerMask(values)})
    x = torch.randn(2, 3, 8)
    chain, why = Dataflow(model, x).producer("down")
    assert why == "" and chain is not None and set(chain.producers) == set(producers)
    result = squash(model, masks, "prune", example=x)
    assert result.modes == {"down": "prune"} and result.reasons["down"].startswith("removed 8 of 16 features from")
    for name in producers:
        assert getattr(result.model, name).out_features == 8
        assert_close(getattr(result.model, name).bias, getattr(model, name).bias[kept(values)])
    assert result.model.down.in_features == 8
    assert_same_outputs(result.model, squash(model, masks, "mul").model, [torch.randn(4, 5, 8)])


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ("tap", "the output of aten.linear in up is also read by aten.sum"),
        ("broadcast", "aten.mul"),
        ("cat", "aten.cat sits between down and the layer that makes its input"),
    ],
)
def test_joins_that_cannot_prune_say_why(extra, why):
    torch.manual_seed(0)
    model = SwiGLU(extra).eval()
    masks = Masks({"down": LayerMask(half_mask(16))})
    x = torch.randn(2, 8)
    chain, reason = Dataflow(model, x).producer("down")
    assert chain is None and why in reason
    auto = squash(model, masks, "auto", example=x)
    assert auto.modes == {"down": "fold"} and why in auto.reasons["down"]
    assert model.up.out_features == 16 and auto.model.up.out_features == 16
    assert_same_outputs(auto.model, squash(model, masks, "mul").model, [torch.randn(3, 8)])


def test_fused_gate_up_projection_is_refused_with_a_reason():
    torch.manual_seed(0)
    model = FusedMLP().eval()
    masks = Masks({"down_proj": LayerMask(half_mask(32))})
    x = torch.randn(2, 4, 16)
    chain, why = Dataflow(model, x).producer("down_proj")
    assert chain is None
    assert why == (
        "aten.chunk splits the output of gate_up_proj into parts (a fused projection): "
        "prune cannot shrink it; split it into separate layers to prune it"
    )
    pruned = squash(model, masks, "prune", example=x)
    assert pruned.reasons["down_proj"].startswith("consumer only: removed 16 of 32 input features")
    assert why in pruned.reasons["down_proj"] and pruned.model.gate_up_proj.out_features == 64
    auto = squash(model, masks, "auto", example=x)
    assert auto.modes == {"down_proj": "fold"} and why in auto.reasons["down_proj"]
    reference = squash(model, masks, "mul").model
    assert_same_outputs(pruned.model, reference, [torch.randn(3, 2, 16)])
    assert_same_outputs(auto.model, reference, [torch.randn(3, 2, 16)])


# --- auto never gathers alone --------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc2(h) + h


def test_auto_folds_where_only_a_gather_would_prune_and_says_why():
    torch.manual_seed(0)
    model = Residual().eval()
    masks = Masks({"fc2": LayerMask(half_mask(8))})
    x = torch.randn(3, 6)
    auto = squash(model, masks, "auto", example=x)
    assert auto.modes == {"fc2": "fold"} and type(auto.model.fc2) is nn.Linear
    reason = auto.reasons["fc2"]
    assert "not pruned: the output of aten.relu" in reason
    assert "a gather before this layer alone runs slower than dense, so auto does not choose it" in reason
    pruned = squash(model, masks, "prune", example=x)  # asked for: the gather, and the reason says it may be slower
    assert isinstance(pruned.model.fc2, PrunedInput)
    assert "consumer only" in pruned.reasons["fc2"] and "may run slower than dense" in pruned.reasons["fc2"]


# --- GPT-2 Conv1D ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_gpt2()
    masks = Masks({name: LayerMask(half_mask(256, seed=10 + i)) for i, name in enumerate(GPT2_PROJ)})
    return model, masks, squash(model, masks, "mul").model


def test_conv1d_is_a_layer_kind_calibration_sees():
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(12, 5)  # nf (out) = 12, nx (in) = 5: weight (5, 12)
    kind = layer_kind(layer)
    assert kind is not None and kind.name == "conv1d"
    assert (kind.in_features(layer), kind.out_features(layer), kind.feature_axis(layer)) == (5, 12, -1)
    assert sample_ndim(layer, 3) == 2
    model = tiny_gpt2()
    masks = calibrate(model, Recipe.simple(layers=GPT2_PROJ, sparsity=0.5, structured=True), [ids(2, 8, seed=s) for s in range(2)])
    for name in GPT2_PROJ:
        assert masks[name].dense().shape == (256,) and int((masks[name].dense() == 0).sum()) == 128


def test_gpt2_c_proj_folds(gpt2):
    model, masks, reference = gpt2
    result = squash(model, masks, "fold")
    assert result.modes == {name: "fold" for name in GPT2_PROJ}
    for i, name in enumerate(GPT2_PROJ):
        c_proj = result.model.lm.transformer.h[i].mlp.c_proj
        original = model.lm.transformer.h[i].mlp.c_proj
        assert_close(c_proj.weight, original.weight * masks[name].mask[:, None])
    assert_same_outputs(result.model, reference, [ids(2, 7, seed=5)])


def test_gpt2_c_proj_prunes_c_fc(gpt2):
    model, masks, reference = gpt2
    for mode in ("prune", "auto"):
        result = squash(model, masks, mode, example=ids(), check_batches=[ids(1, 5, seed=6)])
        assert result.modes == {name: "prune" for name in GPT2_PROJ}
        for i, name in enumerate(GPT2_PROJ):
            mlp, original = result.model.lm.transformer.h[i].mlp, model.lm.transformer.h[i].mlp
            assert result.reasons[name] == f"removed 128 of 256 features from lm.transformer.h.{i}.mlp.c_fc and this layer"
            assert mlp.c_fc.weight.shape == (64, 128) and mlp.c_fc.bias.shape == (128,) and mlp.c_fc.nf == 128
            assert mlp.c_proj.weight.shape == (128, 64) and mlp.c_proj.nx == 128 and mlp.c_proj.nf == 64
            index = kept(masks[name].mask)
            assert_close(mlp.c_fc.weight, original.c_fc.weight[:, index])
            assert_close(mlp.c_proj.weight, (original.c_proj.weight * masks[name].mask[:, None])[index])
        assert_same_outputs(result.model, reference, [ids(2, 9, seed=7), ids(3, 4, seed=8)])


def test_gpt2_attention_projection_folds_with_a_reason():
    """attn.c_proj reads the merged heads (a reshape across the feature axis): fold, not prune."""
    model = tiny_gpt2()
    name = "lm.transformer.h.0.attn.c_proj"
    masks = Masks({name: LayerMask(half_mask(64))})
    auto = squash(model, masks, "auto", example=ids())
    assert auto.modes == {name: "fold"} and "not pruned" in auto.reasons[name]
    assert_same_outputs(auto.model, squash(model, masks, "mul").model, [ids(2, 5, seed=9)])


# --- depthwise convolutions ---------------------------------------------------------------


def test_depthwise_convs_are_walked_through_and_pruned():
    model = ds_cnn()
    v1, v2 = half_mask(16, seed=1), half_mask(32, seed=2)
    masks = Masks({"pw1": conv_mask(v1), "pw2": conv_mask(v2)})
    reference = squash(model, masks, "mul").model
    for mode in ("prune", "auto"):
        result = squash(model, masks, mode, example=images(), check_batches=[images(3, seed=1)])
        assert result.modes == {"pw1": "prune", "pw2": "prune"}
        assert result.reasons["pw1"] == "removed 8 of 16 features from stem (and bn1, dw1, bn2) and this layer"
        assert result.reasons["pw2"] == "removed 16 of 32 features from pw1 (and bn3, dw2) and this layer"
        m = result.model
        assert m.stem.weight.shape == (8, 3, 3, 3) and m.bn1.num_features == 8
        assert m.dw1.weight.shape == (8, 1, 3, 3) and m.dw1.bias.shape == (8,)
        assert (m.dw1.in_channels, m.dw1.out_channels, m.dw1.groups) == (8, 8, 8)
        assert m.pw1.weight.shape == (16, 8, 1, 1) and m.bn3.num_features == 16
        assert m.dw2.weight.shape == (16, 1, 3, 3) and m.dw2.bias is None and m.dw2.groups == 16
        assert m.pw2.weight.shape == (16, 16, 1, 1)
        assert_close(m.dw1.weight, model.dw1.weight[kept(v1)])
        assert_close(m.dw2.weight, model.dw2.weight[kept(v2)])
        assert_same_outputs(m, reference, [images(4, seed=2)])


def test_a_masked_depthwise_conv_folds():
    model = ds_cnn()
    values = half_mask(32, seed=3)
    masks = Masks({"dw2": conv_mask(values)})
    reference = squash(model, masks, "mul").model
    for mode in ("fold", "auto", "prune"):
        result = squash(model, masks, mode, example=images())
        assert result.modes["dw2"] == ("prune" if mode == "prune" else "fold")
        assert type(result.model.dw2) is nn.Conv2d and result.model.dw2.out_channels == 32
        assert_close(result.model.dw2.weight, model.dw2.weight * values.reshape(-1, 1, 1, 1))
        assert_same_outputs(result.model, reference, [images(3, seed=4)])
    assert "a depthwise conv's input channels are its output channels" in squash(model, masks, "prune", example=images()).reasons["dw2"]


def test_grouped_convs_are_refused_with_a_reason():
    model = ds_cnn(middle_groups=4)  # dw1 is a grouped conv (4 groups), not depthwise
    masks = Masks({"pw1": conv_mask(half_mask(16, seed=1))})
    chain, why = Dataflow(model, images()).producer("pw1")
    assert chain is None
    assert why == (
        "the input of pw1 is made by aten.conv2d in dw1, which prune cannot shrink: Conv2d has groups=4 "
        "(not depthwise): a grouped conv would have to lose whole groups, which prune does not do"
    )
    auto = squash(model, masks, "auto", example=images())
    assert auto.modes == {"pw1": "fold"} and why in auto.reasons["pw1"]
    assert_same_outputs(auto.model, squash(model, masks, "mul").model, [images(3, seed=5)])
    torch.manual_seed(0)
    multiplier = Multiplier().eval()
    chain, why = Dataflow(multiplier, images()).producer("pw")
    assert chain is None and "Conv2d has groups=8 (not depthwise)" in why


# --- through ONNX -----------------------------------------------------------------------------


def _initializers(path):
    return {init.name: tuple(init.dims) for init in onnx.load(str(path)).graph.initializer}


def test_pruned_mlps_and_cnn_export_with_smaller_initializers(llama, gpt2, tmp_path):
    """The pruned blocks through the ONNX export (TorchScript: fast; the whole decoders: the slow test below)."""
    hidden = torch.randn(2, 5, 64)
    llama_mlp = llama[3].model.lm.model.layers[0].mlp
    model, masks, _ = gpt2
    gpt2_mlp = squash(model, masks, "prune", example=ids()).model.lm.transformer.h[1].mlp
    for name, block, want in (
        ("llama", llama_mlp, [(64, 128), (64, 128), (128, 64)]),  # gate, up: (128, 64) as (in, out); down
        ("gpt2", gpt2_mlp, [(64, 128), (128,), (128, 64), (64,)]),  # c_fc weight, bias; c_proj weight, bias
    ):
        path = tmp_path / f"{name}-mlp.onnx"
        export_onnx(block, hidden, path, exporter="torchscript", sequence_axis=True)
        shapes = [s for s in _initializers(path).values() if len(s) > 0]
        assert sorted(shapes) == sorted(want) or sorted(tuple(reversed(s)) for s in shapes) == sorted(want), (name, shapes)
        session = ort_session(path)
        for x in (torch.randn(2, 7, 64), torch.randn(3, 4, 64)):  # own runs: validate slices GPT-2's view-using input
            (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
            with torch.no_grad():
                assert_close(torch.from_numpy(got), block(x), atol=1e-5, rtol=1e-4)
    cnn = ds_cnn()
    masks = Masks({"pw1": conv_mask(half_mask(16, seed=1)), "pw2": conv_mask(half_mask(32, seed=2))})
    pruned = squash(cnn, masks, "prune", example=images()).model
    path = tmp_path / "cnn.onnx"
    export_onnx(pruned, images(), path, exporter="torchscript")
    shapes = list(_initializers(path).values())
    for shape in ((8, 3, 3, 3), (8, 1, 3, 3), (16, 8, 1, 1), (16, 1, 3, 3), (16, 16, 1, 1)):
        assert shape in shapes
    assert not [s for s in shapes if len(s) == 4 and 32 in s]
    assert validate(path, pruned, [images(2, seed=3), images(5, seed=4)]).passed


@pytest.mark.slow
def test_pruned_llama_exports_whole_with_dynamo(llama, tmp_path):
    """The whole pruned decoder (TorchScript fails on its aten::diff: the exporter owner's issue)."""
    _, _, _, result = llama
    path = tmp_path / "llama.onnx"
    export_onnx(result.model, ids(), path, exporter="dynamo")
    shapes = _initializers(path).values()
    # gate / up / down of both layers at 128 (the dynamo exporter stores them transposed) ...
    assert sorted(s for s in shapes if 128 in s) == [(64, 128)] * 4 + [(128, 64)] * 2
    # ... and nothing at 256 but the embedding and the LM head (vocabulary 256)
    assert len([s for s in shapes if 256 in s]) == 2
    assert validate(path, result.model, [ids(6, 8, seed=11)]).passed


def test_prune_check_still_catches_a_wrong_join_plan(monkeypatch):
    """Pretend the walk found only one of the join's producers: the check against mul catches it."""
    torch.manual_seed(0)
    model = SwiGLU().eval()
    masks = Masks({"down": LayerMask(half_mask(16))})
    monkeypatch.setattr(Dataflow, "producer", lambda self, name, masked=(): (Chain("gate"), ""))
    with pytest.raises(SquashError, match="fails on check batch|not exact"):
        squash(model, masks, "prune", example=torch.randn(2, 8))
    assert isinstance(squash(model, masks, "mul").model.down, MaskedInput)
