"""The drop-in ActivationSparsifier: upstream behaviour with user callables, and
our additions with built-in functions."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.pruning._experimental.activation_sparsifier.activation_sparsifier import (
    ActivationSparsifier as UpstreamSparsifier,
)
from torch.testing import assert_close

from actsparse_deploy import ActivationSparsifier
from actsparse_deploy.base.errors import CalibrationError, ConfigError, DataError, LayerNotFoundError, UnknownFunctionError
from actsparse_deploy.calibration.functions import RunningStat

# --- user callables, as upstream's docs and tests write them ---------------------


def agg_fn(x, y):
    return x + y


def reduce_fn(x):
    return torch.mean(x, dim=0)


def mask_fn(data, threshold):
    return (data.abs() >= threshold).float()


def max_agg(x, y):
    return torch.maximum(x, y.abs())


def batches(n=3, size=4, d=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, d, generator=g) for _ in range(n)]


def build_pair(model, cls_a=UpstreamSparsifier, cls_b=ActivationSparsifier):
    """The same setup on two deep copies of model, one sparsifier class each."""
    out = []
    for cls in (cls_a, cls_b):
        m = copy.deepcopy(model)
        sp = cls(m, aggregate_fn=agg_fn, reduce_fn=reduce_fn, mask_fn=mask_fn, threshold=1.0)
        sp.register_layer(m.fc2)
        sp.register_layer(m.fc3, aggregate_fn=max_agg, features=[0, 2, 5], feature_dim=1, threshold=0.2)
        out.append((m, sp))
    return out


def _as_list(x):
    return list(x) if isinstance(x, list) else [x]


def test_side_by_side_with_torch_upstream(mlp):
    (m_up, up), (m_our, our) = build_pair(mlp)
    with torch.no_grad():
        for b in batches():
            assert_close(m_up(b), m_our(b))

    # aggregates: identical, per selected feature as a list
    for name in ("fc2", "fc3"):
        for a, b in zip(_as_list(up.data_groups[name]["data"]), _as_list(our.data_groups[name]["data"]), strict=True):
            assert_close(a, b, rtol=0, atol=0)
    assert isinstance(our.data_groups["fc3"]["data"], list) and len(our.data_groups["fc3"]["data"]) == 3

    up.step()
    our.step()
    for name in ("fc2", "fc3"):
        assert "data" not in our.data_groups[name]
        for a, b in zip(_as_list(up.get_mask(name)), _as_list(our.get_mask(name)), strict=True):
            assert_close(a, b, rtol=0, atol=0)
    assert 0 < float(our.get_mask("fc2").mean()) < 1  # the mask really masks something

    up.squash_mask()
    our.squash_mask()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert_close(m_up(x), m_our(x), rtol=0, atol=0)
        assert not torch.allclose(m_our(x), mlp(x))  # the masks change the output

    # the serialisable state has the same shape of content
    s_up, s_our = up.state_dict(), our.state_dict()
    assert set(s_our) == {"state", "data_groups", "defaults"}
    assert set(s_our["defaults"]) == set(s_up["defaults"])
    for name in ("fc2", "fc3"):
        assert set(s_our["data_groups"][name]) == set(s_up["data_groups"][name])
        for a, b in zip(_as_list(s_up["state"][name]["mask"]), _as_list(s_our["state"][name]["mask"]), strict=True):
            assert b.layout == torch.sparse_coo
            assert_close(a.to_dense(), b.to_dense())


def _side_by_side_stages(model, cls, data):
    """The upstream workflow with autograd on (no torch.no_grad(), parameters
    requiring grad): yield (stage, sparsifier) at each point."""
    sp = cls(model, aggregate_fn=agg_fn, reduce_fn=reduce_fn, mask_fn=mask_fn, threshold=0.5)
    sp.register_layer(model.fc2)
    sp.register_layer(model.fc3, aggregate_fn=max_agg, features=[0, 2, 5], feature_dim=1, threshold=0.2)
    yield "registered", sp
    model(data[0])
    yield "aggregating", sp
    model(data[1])
    sp.step()
    yield "stepped", sp
    sp.squash_mask()
    yield "squashed", sp


@pytest.mark.parametrize("stage", ["registered", "aggregating", "stepped", "squashed"])
def test_side_by_side_state_round_trip_with_autograd_on(mlp, stage):
    """Drop-in: forward passes without no_grad, then state_dict() / load_state_dict()
    at every point of the workflow, finished on the reloaded sparsifier: ours works
    where torch's class works and gives its outputs; no aggregate holds a graph."""
    assert all(p.requires_grad for p in mlp.parameters())
    data = batches(3, 4)
    outputs = []
    for cls in (UpstreamSparsifier, ActivationSparsifier):
        original = copy.deepcopy(mlp)
        for at, sp in _side_by_side_stages(original, cls, data):  # noqa: B007 (sp is used after the loop)
            if at == stage:
                break
        if cls is ActivationSparsifier:
            for config in sp.data_groups.values():
                for t in _as_list(config.get("data", [])):
                    assert t.grad_fn is None and not t.requires_grad
        fresh = copy.deepcopy(mlp)
        loaded = cls(fresh)
        loaded.load_state_dict(sp.state_dict())
        if stage == "registered":
            fresh(data[0])
        if stage in ("registered", "aggregating"):
            fresh(data[1])
            loaded.step()
        if stage != "squashed":
            loaded.squash_mask()
        out = fresh(data[2])
        assert out.requires_grad  # autograd stayed on throughout
        outputs.append(out.detach())
        assert not torch.allclose(outputs[-1], mlp(data[2]).detach())  # the masks change the output
    assert_close(outputs[1], outputs[0], rtol=0, atol=0)


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test compares what each class raises
        return e
    raise AssertionError("nothing raised")


def test_side_by_side_errors_and_state_protocol(mlp):
    """Where upstream raises, ours raises an error that is also of upstream's type,
    with a readable message; upstream's __get_state__ / __set_state__ exist and agree."""
    for _, sp in build_pair(mlp):  # a pair of its own: upstream's unregister_layer leaves an empty group behind
        assert isinstance(_raised(lambda sp=sp: sp.unregister_layer("nope")), KeyError)
    (m_up, up), (m_our, our) = build_pair(mlp)
    e = _raised(lambda: our.unregister_layer("nope"))
    assert str(e) == "layer 'nope' is not registered; registered: fc2, fc3"
    assert isinstance(e, LayerNotFoundError)
    for sp in (up, our):
        assert isinstance(_raised(lambda sp=sp: sp.get_mask("nope")), ValueError)
        assert isinstance(_raised(lambda sp=sp: sp.register_layer(nn.Linear(2, 2))), AssertionError)

    with torch.no_grad():
        for b in batches():
            m_up(b)
            m_our(b)
    up.step()
    our.step()
    for sp in (up, our):  # a second step with no new data
        assert isinstance(_raised(sp.step), KeyError)
    e = _raised(our.step)
    assert isinstance(e, CalibrationError) and str(e).startswith("layer(s) fc2, fc3 have no aggregated data")

    # __get_state__ is state_dict's content; __set_state__ restores it on a fresh sparsifier
    s_up, s_our = up.__get_state__(), our.__get_state__()
    assert set(s_our) == set(s_up) == {"defaults", "state", "data_groups"}
    for name in ("fc2", "fc3"):
        assert set(s_our["data_groups"][name]) == set(s_up["data_groups"][name])
    for cls, state in ((UpstreamSparsifier, s_up), (ActivationSparsifier, s_our)):
        model = copy.deepcopy(mlp)
        fresh = cls(model)
        fresh.__set_state__(copy.deepcopy(state))
        for name in ("fc2", "fc3"):
            for a, b in zip(_as_list(up.get_mask(name)), _as_list(fresh.get_mask(name)), strict=True):
                assert b.layout == torch.strided
                assert_close(a, b, rtol=0, atol=0)
            assert fresh.data_groups[name]["layer"] is model.get_submodule(name)

    # squash_mask without hooks: the same hook_state, no hooks, and after a
    # state round trip both attach the sparsify hook
    up.squash_mask(attach_sparsify_hook=False)
    our.squash_mask(attach_sparsify_hook=False)
    for name in ("fc2", "fc3"):
        assert our.data_groups[name]["hook_state"] == up.data_groups[name]["hook_state"] == "sparsify"
        assert not m_our.get_submodule(name)._forward_pre_hooks
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(9))
    reloaded = []
    for cls, sp in ((UpstreamSparsifier, up), (ActivationSparsifier, our)):
        model = copy.deepcopy(mlp)
        fresh = cls(model)
        fresh.load_state_dict(sp.state_dict())
        assert len(model.fc2._forward_pre_hooks) == 1
        with torch.no_grad():
            reloaded.append(model(x))
    assert_close(reloaded[1], reloaded[0], rtol=0, atol=0)


def test_expected_aggregate_and_mask_independently(mlp):
    """The fold of aggregate_fn over raw inputs, then mask_fn(reduce_fn(.)), by hand."""
    model = copy.deepcopy(mlp)
    sp = ActivationSparsifier(model, aggregate_fn=agg_fn, reduce_fn=reduce_fn, mask_fn=mask_fn, threshold=1.0)
    sp.register_layer(model.fc2)
    seen = []
    model.fc2.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().numpy().copy()))
    with torch.no_grad():
        for b in batches():
            model(b)
    total = np.sum(seen, axis=0)
    np.testing.assert_allclose(sp.data_groups["fc2"]["data"].numpy(), total, rtol=1e-6)
    sp.step()
    expected = (np.abs(total.mean(axis=0)) >= 1.0).astype(np.float32)
    assert 0 < expected.sum() < expected.size
    np.testing.assert_array_equal(sp.get_mask("fc2").numpy(), expected)


def test_defaults_and_register_merging(mlp):
    sp = ActivationSparsifier(mlp, aggregate_fn=agg_fn, reduce_fn=reduce_fn, mask_fn=mask_fn, threshold=0.3, other=1)
    assert set(sp.defaults) == {"sparse_config", "aggregate_fn", "reduce_fn", "mask_fn", "features", "feature_dim"}
    assert sp.defaults["features"] is None and sp.defaults["feature_dim"] is None
    assert sp.defaults["sparse_config"] == {"threshold": 0.3, "other": 1}
    sp.register_layer(mlp.fc3, reduce_fn=torch.sum, threshold=0.7)
    config = sp.data_groups["fc3"]
    assert config["sparse_config"] == {"threshold": 0.7, "other": 1}
    assert config["reduce_fn"] is torch.sum and config["aggregate_fn"] is agg_fn
    assert config["layer"] is mlp.fc3 and config["hook_state"] == "aggregate"
    assert sp.defaults["sparse_config"] == {"threshold": 0.3, "other": 1}  # defaults untouched
    assert sp.state["fc3"]["mask"] is None


def test_register_again_warns_and_replaces(mlp):
    sp = ActivationSparsifier(mlp, aggregate_fn=agg_fn, reduce_fn=reduce_fn, mask_fn=mask_fn, threshold=0.3)
    sp.register_layer(mlp.fc2)
    with pytest.warns(UserWarning, match="already attached"):
        sp.register_layer(mlp.fc2, threshold=0.9)
    assert sp.data_groups["fc2"]["sparse_config"]["threshold"] == 0.9
    assert len(mlp.fc2._forward_pre_hooks) == 1  # the old hook is gone


def test_refuses_bad_config(mlp):
    sp = ActivationSparsifier(mlp, aggregate_fn=agg_fn, reduce_fn=reduce_fn, mask_fn=mask_fn)
    with pytest.raises(AssertionError, match="feature dim"):
        sp.register_layer(mlp.fc2, features=[0, 1])
    with pytest.raises(ConfigError, match="callable"):
        ActivationSparsifier(mlp, aggregate_fn=agg_fn, reduce_fn=reduce_fn, mask_fn=mask_fn).register_layer(
            mlp.fc2, mask_fn=3
        )
    with pytest.raises(AssertionError, match="must be callable"):
        ActivationSparsifier(mlp, aggregate_fn=agg_fn, reduce_fn=reduce_fn).register_layer(mlp.fc2)
    with pytest.raises(UnknownFunctionError, match="known: block, threshold, topk"):
        ActivationSparsifier(mlp, mask_fn="top_k")
    assert not mlp.fc2._forward_pre_hooks


def test_get_mask_errors(mlp):
    sp = ActivationSparsifier(mlp, aggregate_fn=agg_fn, reduce_fn=reduce_fn, mask_fn=mask_fn, threshold=0.1)
    sp.register_layer(mlp.fc2)
    with pytest.raises(ValueError, match="forward"):
        sp.get_mask("fc2")
    with pytest.raises(ValueError, match="not found"):
        sp.get_mask("nope")
    with torch.no_grad():
        mlp(batches()[0])
    assert sp.get_mask(layer=mlp.fc2) is sp.get_mask("fc2")


def test_unregister_and_squash_without_hooks(mlp):
    reference = copy.deepcopy(mlp)
    sp = ActivationSparsifier(mlp, "sum_abs", "mean", "topk", sparsity_level=0.5)
    sp.register_layer(mlp.fc2)
    sp.register_layer(mlp.fc3)
    x = batches()[0]
    with torch.no_grad():
        mlp(x)
    sp.step()
    sp.squash_mask(attach_sparsify_hook=False)
    assert not mlp.fc2._forward_pre_hooks and not mlp.fc3._forward_pre_hooks
    assert sp.data_groups["fc2"]["hook_state"] == "sparsify"  # as upstream records it
    with torch.no_grad():
        assert_close(mlp(x), reference(x), rtol=0, atol=0)
    sp.squash_mask()
    assert len(mlp.fc2._forward_pre_hooks) == 1
    sp.unregister_layer("fc2")
    assert not mlp.fc2._forward_pre_hooks and "fc2" not in sp.state and "fc2" not in sp.data_groups


def _workflow_stages(model, make_sparsifier, data, grad=False):
    """Yield (stage, sparsifier, model) at each point of the workflow (forward
    passes under no_grad, or with autograd on where ``grad``)."""
    sp = make_sparsifier(model)
    yield "registered", sp
    with torch.set_grad_enabled(grad):
        model(data[0])
    yield "aggregating", sp
    with torch.set_grad_enabled(grad):
        model(data[1])
    sp.step()
    yield "stepped", sp
    sp.squash_mask()
    yield "squashed", sp


def _finish(model, sp, stage, data, grad=False):
    """Run the rest of the workflow from stage and return the squashed output."""
    with torch.set_grad_enabled(grad):
        if stage == "registered":
            model(data[0])
        if stage in ("registered", "aggregating"):
            model(data[1])
            sp.step()
        if stage != "squashed":
            sp.squash_mask()
        return model(data[2]).detach()


def _make_builtin(model):
    sp = ActivationSparsifier(model, "sum_abs", "mean", "topk", sparsity_level=0.5)
    sp.register_layer(model.fc2)
    sp.register_layer(model.fc3, mask_fn="threshold", features=[1, 4], feature_dim=-1, threshold=0.05)
    return sp


def _make_user(model):
    sp = ActivationSparsifier(model, aggregate_fn=agg_fn, reduce_fn=reduce_fn, mask_fn=mask_fn, threshold=1.0)
    sp.register_layer(model.fc2)
    sp.register_layer(model.fc3, features=[0, 3], feature_dim=1)
    return sp


@pytest.mark.parametrize("stage", ["registered", "aggregating", "stepped", "squashed"])
@pytest.mark.parametrize(
    "make, via",
    # user callables have no portable name: safetensors refuses them (test below)
    [(_make_user, "state_dict"), (_make_builtin, "state_dict"), (_make_builtin, "safetensors")],
    ids=["user_fns-state_dict", "builtin_fns-state_dict", "builtin_fns-safetensors"],
)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd_on"])
def test_state_round_trip_at_every_stage(mlp, make, stage, via, grad, tmp_path):
    data = batches(3, 4)
    original = copy.deepcopy(mlp)
    for at, sp in _workflow_stages(original, make, data, grad):  # noqa: B007 (sp is used after the loop)
        if at == stage:
            break
    fresh = copy.deepcopy(mlp)
    loaded = ActivationSparsifier(fresh)
    if via == "state_dict":
        state = sp.state_dict()
        loaded.load_state_dict(state)
    else:
        sp.save(tmp_path / "state.safetensors")
        loaded.load(tmp_path / "state.safetensors")
    assert loaded.defaults.keys() == sp.defaults.keys()
    for name, config in sp.data_groups.items():
        assert loaded.data_groups[name]["hook_state"] == config["hook_state"]
        assert loaded.data_groups[name]["sparse_config"] == config["sparse_config"]
        assert loaded.data_groups[name]["layer"] is fresh.get_submodule(name)
        hooks = fresh.get_submodule(name)._forward_pre_hooks
        assert len(hooks) == 1
        if stage != "registered":
            for a, b in zip(_as_list(sp.get_mask(name)), _as_list(loaded.get_mask(name)), strict=True):
                assert b.layout == torch.strided
                assert_close(a, b, rtol=0, atol=0)
    out_original = _finish(original, sp, stage, data, grad)
    out_loaded = _finish(fresh, loaded, stage, data, grad)
    assert_close(out_loaded, out_original, rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(out_original, mlp(data[2]))


def test_safetensors_refuses_user_fns(mlp, tmp_path):
    sp = _make_user(mlp)
    with pytest.raises(ConfigError, match="user function"):
        sp.save(tmp_path / "s.safetensors")
    assert not list(tmp_path.iterdir())


# --- built-in functions ------------------------------------------------------------


def _numpy_sum_abs_mean(chunks, axes):
    total = sum(np.abs(c.numpy().astype(np.float64)).sum(axis=axes) for c in chunks)
    count = sum(np.prod([c.shape[a] for a in axes]) for c in chunks)
    return total / count


def test_builtin_statistics_ignore_batch_size(mlp):
    g = torch.Generator().manual_seed(3)
    full = torch.randn(20, 6, generator=g)
    results = []
    for sizes in ([20], [10, 7, 3], [1] * 20):
        model = copy.deepcopy(mlp)
        sp = ActivationSparsifier(model, "sum_abs", "mean", "topk", sparsity_level=0.5)
        sp.register_layer(model.fc2)
        captured = []
        model.fc2.register_forward_pre_hook(lambda m, i, captured=captured: captured.append(i[0].detach()))
        with torch.no_grad():
            for chunk in torch.split(full, sizes):
                model(chunk)
        stat = sp.data_groups["fc2"]["data"]
        assert isinstance(stat, RunningStat) and stat.count == 20 and stat.value.shape == (8,)
        np.testing.assert_allclose(stat.per_sample.numpy(), _numpy_sum_abs_mean(captured, (0,)), rtol=1e-6)  # float32 per batch, float64 across batches
        sp.step()
        results.append(sp.get_mask("fc2"))
        assert results[-1].shape == (8,) and int(results[-1].sum()) == 4
    for mask in results[1:]:
        assert_close(mask, results[0], rtol=0, atol=0)


def test_builtin_sequence_lengths_and_per_feature():
    torch.manual_seed(0)
    layer_model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))
    sp = ActivationSparsifier(layer_model, "sum_abs", "mean", "threshold", threshold=0.3)
    sp.register_layer(layer_model[2])
    sp.register_layer(layer_model[0], features=[0, 2, 4], feature_dim=2, threshold=0.8)
    g = torch.Generator().manual_seed(5)
    data = [torch.randn(b, t, 5, generator=g) for b, t in ((2, 9), (3, 4), (1, 13))]
    hidden = []
    layer_model[2].register_forward_pre_hook(lambda m, i: hidden.append(i[0].detach()))
    with torch.no_grad():
        for x in data:
            layer_model(x)
    per_feature = sp.data_groups["0"]["data"]
    assert len(per_feature) == 3 and all(s.value.shape == (1,) for s in per_feature)
    assert per_feature[0].count == 2 * 9 + 3 * 4 + 13
    sp.step()
    expected_h = _numpy_sum_abs_mean(hidden, (0, 1))
    np.testing.assert_array_equal(sp.get_mask("2").numpy(), (expected_h >= 0.3).astype(np.float32))
    expected_in = _numpy_sum_abs_mean(data, (0, 1))
    for mask, f in zip(sp.get_mask("0"), [0, 2, 4]):
        assert mask.shape == (1,)
        assert float(mask) == float(expected_in[f] >= 0.8)
    # the sparsify hook applies per-feature masks to any sequence length
    sp.squash_mask()
    x = torch.randn(2, 6, 5, generator=g)
    masked = x.clone()
    for mask, f in zip(sp.get_mask("0"), [0, 2, 4]):
        masked[..., f] *= mask
    with torch.no_grad():
        expected = layer_model[2](layer_model[1](layer_model[0](masked)) * sp.get_mask("2"))
        assert_close(layer_model(x), expected)


def test_builtin_conv_memory_does_not_grow(conv):
    sp = ActivationSparsifier(conv, "sum_sq", {"name": "feature_mean", "axis": 0}, "topk", sparsity_level=0.5)
    sp.register_layer(conv.conv2)
    sp.register_layer(conv.fc, aggregate_fn="max_abs", reduce_fn="mean")
    g = torch.Generator().manual_seed(0)
    seen = []
    conv.conv2.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach()))
    with torch.no_grad():
        conv(torch.randn(2, 1, 8, 8, generator=g))
        first = sp.data_groups["conv2"]["data"].value.shape
        for _ in range(5):
            conv(torch.randn(64, 1, 8, 8, generator=g))
    assert sp.data_groups["conv2"]["data"].value.shape == first == (4, 8, 8)
    assert sp.data_groups["conv2"]["data"].count == 2 + 5 * 64
    sp.step()
    mask = sp.get_mask("conv2")
    assert mask.shape == (4, 1, 1)
    mean_sq = sum((s.double() ** 2).sum(dim=(0, 2, 3)) for s in seen) / (sum(s.shape[0] for s in seen) * 64)
    keep = torch.ones(4)
    keep[torch.argsort(mean_sq)[:2]] = 0
    assert_close(mask.reshape(-1), keep)
    assert sp.get_mask("fc").shape == (5,)


def test_never_reached_layer_is_named(mlp):
    extra = nn.Linear(2, 2)
    mlp.unused = extra
    sp = ActivationSparsifier(mlp, "sum_abs", "mean", "topk", sparsity_level=0.5)
    sp.register_layer(mlp.fc2)
    sp.register_layer(extra)
    with torch.no_grad():
        mlp(batches()[0])
    with pytest.raises(CalibrationError, match="unused"):
        sp.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("make", [_make_user, _make_builtin], ids=["user_fns", "builtin_fns"])
def test_non_finite_input_names_layer(mlp, bad, make):
    clean = copy.deepcopy(mlp)
    reference = make(clean)  # the same sparsifier on a copy that only sees the clean batch
    sp = make(mlp)
    x = batches()[0]
    with torch.no_grad():
        mlp(x)
        clean(x)
        mlp.fc1.bias.data[0] = bad  # the NaN appears inside the model, at fc2's input
        with pytest.raises(DataError, match="'fc2'.*NaN or Inf"):
            mlp(x)
    sp.step()
    reference.step()
    for name in ("fc2", "fc3"):  # the refused batch left nothing in the statistics
        for got, want in zip(_as_list(sp.get_mask(name)), _as_list(reference.get_mask(name)), strict=True):
            assert_close(got, want, rtol=0, atol=0)


def test_no_warnings_on_normal_use(mlp):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp = _make_builtin(mlp)
        with torch.no_grad():
            mlp(batches()[0])
        sp.step()
        sp.squash_mask()


def test_repr_names_layers_and_functions(mlp):
    text = repr(_make_builtin(mlp))
    assert "name: fc2" in text and "mask_fn: topk" in text and "threshold" in text


def test_other_layers_on_sequences_of_different_lengths():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2))
    sp = ActivationSparsifier(model, "sum_abs", "mean", "topk", sparsity_level=0.5)
    sp.register_layer(model[1])  # a GELU sees (batch, sequence, features)
    with torch.no_grad():
        for t in (3, 8):
            model(torch.randn(2, t, 4))
    assert sp.data_groups["1"]["data"].value.shape == (6,) and sp.data_groups["1"]["data"].count == 2 * 3 + 2 * 8
    conv_like = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU())
    sp2 = ActivationSparsifier(conv_like, "sum_abs", "mean", "topk", sparsity_level=0.5)
    sp2.register_layer(conv_like[1])
    with torch.no_grad():
        conv_like(torch.randn(2, 1, 4, 4))
        with pytest.raises(CalibrationError, match="layer '1'.*per-sample shape changed"):
            conv_like(torch.randn(2, 1, 5, 5))


# --- statistics larger than the mask -------------------------------------------------


def _gram(x, dims):
    """A d x d statistic of d-wide inputs: the sum over samples of x x^T."""
    flat = x.reshape(-1, x.shape[-1])
    return flat.T @ flat


def _gram_diag(data):
    return data.per_sample.diagonal()


@pytest.fixture
def gram_fns(monkeypatch):
    """A custom aggregate whose statistic is d x d and a reduce_fn that maps it to d."""
    from actsparse_deploy.calibration.functions import AGGREGATE_FNS, REDUCE_FNS, Aggregate, BuiltinFn

    monkeypatch.setitem(AGGREGATE_FNS._fns, "gram", Aggregate("aggregate", "gram", _gram, combine="sum"))
    monkeypatch.setitem(REDUCE_FNS._fns, "gram_diag", BuiltinFn("reduce", "gram_diag", _gram_diag))


def test_statistic_larger_than_the_mask(mlp, gram_fns):
    """The mask placeholder takes the mask's shape (d, from the layer's input),
    not the statistic's (d x d): squash before step runs, step gives a d mask."""
    data = [torch.randn(b, t, 6, generator=torch.Generator().manual_seed(b)) for b, t in ((2, 3), (4, 5))]
    model = copy.deepcopy(mlp)
    sp = ActivationSparsifier(model, "gram", "gram_diag", "topk", sparsity_level=0.5)
    sp.register_layer(model.fc2)
    seen = []
    model.fc2.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach().double().reshape(-1, 8)))
    with torch.no_grad():
        model(data[0])
        assert sp.data_groups["fc2"]["data"].value.shape == (8, 8)
        assert sp.get_mask("fc2").shape == (8,)
        model(data[1])
    stat = sp.data_groups["fc2"]["data"]
    assert stat.count == 2 * 3 + 4 * 5
    hidden = torch.cat(seen)
    assert_close(stat.value, hidden.T @ hidden, rtol=1e-6, atol=1e-6)  # float32 per batch
    sp.step()
    mean_sq = (hidden**2).mean(0)
    keep = torch.ones(8)
    keep[torch.argsort(mean_sq, stable=True)[:4]] = 0
    assert_close(sp.get_mask("fc2"), keep, rtol=0, atol=0)
    sp.squash_mask()
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert_close(model(x), mlp.fc3(mlp.act(mlp.fc2(mlp.act(mlp.fc1(x)) * keep))))


def test_squash_before_step_with_a_larger_statistic(mlp, gram_fns):
    """Upstream semantics: squash_mask before step feeds the layer input * ones."""
    sp = ActivationSparsifier(mlp, "gram", "gram_diag", "topk", sparsity_level=0.5)
    sp.register_layer(mlp.fc2)
    reference = copy.deepcopy(mlp)
    x = torch.randn(5, 6)
    with torch.no_grad():
        mlp(x)
        sp.squash_mask()
        assert_close(mlp(x), reference(x), rtol=0, atol=0)
