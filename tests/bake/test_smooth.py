"""Smoothing before int8: per-feature scales moved from a matrix product's input into its weight."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from actsparse_deploy.bake.apply import MaskedInput
from actsparse_deploy.bake.smooth import apply_smoothing, fake_int8, plan_smoothing, smoothed
from actsparse_deploy.base.errors import SquashError
from actsparse_deploy.onnx.export import export_onnx
from actsparse_deploy.onnx.quantize import quantize_onnx


def _outlier_batches(count: int, seed: int = 0) -> list[torch.Tensor]:
    """Inputs whose first three features are 30-60x the others (what a transformer's residual stream carries)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(32)
    scale[:3] = torch.tensor([60.0, -45.0, 30.0])
    return [torch.randn(64, 32, generator=g) * scale for _ in range(count)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)).eval()


def _int8_error(model: nn.Module, folder, name: str, batches: list[torch.Tensor]) -> float:
    """The relative error of onnxruntime's int8 model of ``model`` against the float one, on ``batches``."""
    float_path, int8_path = folder / f"{name}.onnx", folder / f"{name}.int8.onnx"
    export_onnx(model, batches[0][:2], float_path)
    quantize_onnx(float_path, int8_path, "int8")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    x = torch.cat(batches)
    with torch.no_grad():
        want = model(x).numpy()
    got = session.run(None, {feed: x.numpy()})[0]
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_smoothing_lowers_onnxruntime_s_int8_error_on_outlier_features_and_keeps_the_float_model(tmp_path):
    calibration, tuning, held = _outlier_batches(6), _outlier_batches(2, seed=1), _outlier_batches(4, seed=2)
    model = _model()
    plain = _int8_error(model, tmp_path, "plain", held)
    with torch.no_grad():
        before = model(held[0])
    plan = plan_smoothing(model, calibration, tuning)
    row = plan.layers["0"]
    assert row.smoothed and row.alpha is not None and row.smoothed_error < 0.7 * row.error, row
    assert row.why.startswith(f"smoothed at a {row.alpha:g}")
    apply_smoothing(model, plan, check=held[:1])
    assert isinstance(model[0], MaskedInput)
    with torch.no_grad():
        torch.testing.assert_close(model(held[0]), before, atol=1e-4, rtol=1e-4)  # the same function in float
    smoothed_error = _int8_error(model, tmp_path, "smoothed", held)
    assert smoothed_error < 0.7 * plain, (plain, smoothed_error)  # onnxruntime agrees with the plan's estimate


def test_fake_int8_is_onnxruntime_s_dynamic_int8_product(tmp_path):
    model = nn.Sequential(nn.Linear(32, 16, bias=False)).eval()
    x = _outlier_batches(1)[0]
    export_onnx(model, x[:2], tmp_path / "m.onnx")
    quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", "int8")
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        exact, estimate = model(x).numpy(), fake_int8(x, model[0].weight).numpy()
    # the estimate is onnxruntime's rounding: far closer to it than either is to the float product
    assert np.abs(estimate - got).max() < 0.2 * np.abs(got - exact).max()


def test_a_layer_where_smoothing_does_not_help_is_left_as_it_is_and_says_why():
    model = _model()
    flat = [torch.randn(64, 32) for _ in range(3)]  # no outlier feature
    plan = plan_smoothing(model, flat[:2], flat[2:], alphas=(0.5,), min_gain=0.9)
    assert plan.smoothed == []
    assert all(row.why.startswith("not smoothed: its int8 error") and "falls by under 90%" in row.why for row in plan.layers.values())
    apply_smoothing(model, plan)
    assert isinstance(model[0], nn.Linear)
    assert plan.summary() == "0 of 2 matrix products smoothed before int8"


def test_tied_weights_and_convolutions_are_not_smoothed():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(32, 32, 1)
            self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(self.conv(x.unsqueeze(-1)).squeeze(-1)))

    model = Tied().eval()
    plan = plan_smoothing(model, _outlier_batches(2), _outlier_batches(1, seed=1))
    assert set(plan.layers) == {"a", "b"}  # a convolution stays float in onnxruntime's int8: not a candidate
    assert plan.layers["a"].why == "not smoothed: its weight is also b's (a tied weight keeps its values)"
    assert not plan.layers["b"].smoothed


class _ReadsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x @ self.fc.weight.T  # the weight read besides the layer's call


def test_a_weight_read_outside_its_layer_fails_the_check_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = _ReadsWeight().eval()
    weight = model.fc.weight
    plan = plan_smoothing(model, _outlier_batches(3), _outlier_batches(1, seed=1))
    assert plan.layers["fc"].smoothed
    with pytest.raises(SquashError, match="smoothing changed the model's outputs"):
        apply_smoothing(model, plan, check=_outlier_batches(1, seed=2))
    assert type(model.fc) is nn.Linear and model.fc.weight is weight


def test_a_maker_is_kept_only_where_it_takes_the_division_on_a_calibration_and_a_tuning_batch():
    """Before, one calibration batch decided: a ReLU6 its values stayed under passed a scale through there, not elsewhere."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU6(), nn.Linear(32, 8)).eval()
    small = [torch.randn(64, 32) * 0.05 for _ in range(3)]  # under 6 after the first layer: ReLU6 is a ReLU there
    large = [torch.randn(64, 32) * 40 for _ in range(2)]
    plan = plan_smoothing(model, small, large, min_gain=-100.0)  # smoothed whatever its error
    row = plan.layers["2"]
    assert row.smoothed and row.producer is None and row.why.endswith("; a Mul before it (0 does not take it exactly)"), row
    with torch.no_grad():
        before = model(large[1])
    apply_smoothing(model, plan, check=large)
    with torch.no_grad():
        torch.testing.assert_close(model(large[1]), before, atol=1e-4, rtol=1e-4)


def test_smoothed_for_a_block_checks_the_outputs_where_given_batches():
    torch.manual_seed(0)
    model = _ReadsWeight().eval()
    weight = model.fc.weight
    plan = plan_smoothing(model, _outlier_batches(3), _outlier_batches(1, seed=1))
    with pytest.raises(SquashError, match="smoothing changed the model's outputs"):
        with smoothed(model, plan, check=_outlier_batches(1, seed=2)):
            pass
    assert type(model.fc) is nn.Linear and model.fc.weight is weight


def test_smoothed_for_a_block_gives_the_model_back_with_its_own_parameters():
    model = _model()
    weights = [model[0].weight, model[2].weight]
    plan = plan_smoothing(model, _outlier_batches(3), _outlier_batches(1, seed=1))
    with smoothed(model, plan):
        assert isinstance(model[0], MaskedInput) and model[0].module.weight is not weights[0]
    assert [model[0].weight, model[2].weight] == weights and isinstance(model[0], nn.Linear)


def test_static_int8_plans_with_the_calibration_range():
    model = _model()
    calibration, tuning = [b * 4 for b in _outlier_batches(3)], _outlier_batches(1, seed=1)  # calibration 4x wider
    dynamic, static = plan_smoothing(model, calibration, tuning), plan_smoothing(model, calibration, tuning, "int8-static")
    assert static.mode == "int8-static" and static.summary().endswith(")") and "before int8-static" in static.summary()
    # static rounds the tuning inputs on the calibration's fixed range, 4x wider than their own: larger steps
    assert static.layers["0"].error > 2 * dynamic.layers["0"].error


class _Normed(nn.Module):
    """A LayerNorm that makes a Linear's input; with ``residual``, its output is also added to the Linear's."""

    def __init__(self, residual: bool) -> None:
        super().__init__()
        self.norm, self.fc, self.residual = nn.LayerNorm(32), nn.Linear(32, 32), residual
        with torch.no_grad():
            self.norm.weight.copy_(torch.ones(32) + 30 * (torch.arange(32) < 3))  # three outlier features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.fc(h) + h if self.residual else self.fc(h)


def test_the_division_goes_into_the_norm_that_makes_the_input_where_that_is_exact():
    torch.manual_seed(0)
    batches = [torch.randn(64, 32) for _ in range(4)]
    for residual in (False, True):
        model = _Normed(residual).eval()
        with torch.no_grad():
            before = model(batches[0])
        plan = plan_smoothing(model, batches[:3], batches[3:])
        row = plan.layers["fc"]
        assert row.smoothed, row
        apply_smoothing(model, plan, check=batches[:1])
        with torch.no_grad():
            torch.testing.assert_close(model(batches[0]), before, atol=1e-4, rtol=1e-4)
        if residual:  # the norm's output is also the residual: dividing it there would change the sum
            assert row.producer is None and row.to_json()["divided_in"] == "mul" and isinstance(model.fc, MaskedInput)
            assert row.why.endswith("; a Mul before it (norm does not take it exactly)")
        else:  # no Mul: the norm's weight and bias take the division
            assert row.producer == "norm" and row.to_json()["divided_in"] == "norm" and isinstance(model.fc, nn.Linear)
            assert "divided out of norm's weight (no Mul)" in row.why


def test_a_decoder_s_rms_norms_take_the_division_of_its_projections():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, use_cache=False)
    model = LlamaForCausalLM(config).eval()
    batches = [{"input_ids": torch.randint(0, 100, (4, 16))} for _ in range(4)]
    norms = {name: model.get_submodule(name).weight for name in ("model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm")}
    with torch.no_grad():
        before = model(**batches[0]).logits
    plan = plan_smoothing(model, batches[:3], batches[3:], min_gain=0.0)
    layer = "model.layers.0."
    groups = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
    smoothed_norms = set()
    for norm, names in groups.items():
        rows = [plan.layers[layer + name] for name in names]
        assert len({row.alpha for row in rows}) == 1  # one input, one scale
        if rows[0].smoothed:
            assert all(row.producer == layer + norm for row in rows)
            smoothed_norms.add(layer + norm)
    assert smoothed_norms  # min_gain 0: at least one of them smoothed
    down = plan.layers[layer + "mlp.down_proj"]  # its input is act(gate(x)) * up(x): up's output rows take the division
    assert down.smoothed and down.producer == layer + "mlp.up_proj" and "divided out of model.layers.0.mlp.up_proj's output rows" in down.why
    up_weight = model.get_submodule(layer + "mlp.up_proj").weight
    apply_smoothing(model, plan, check=batches[:1])
    with torch.no_grad():
        torch.testing.assert_close(model(**batches[0]).logits, before, atol=1e-4, rtol=1e-4)
    for name in smoothed_norms:
        assert model.get_submodule(name).weight is not norms[name]
    assert not any(isinstance(m, MaskedInput) for n, m in model.named_modules() if "q_proj" in n or "gate_proj" in n or "down_proj" in n)
    assert model.get_submodule(layer + "mlp.up_proj").weight is not up_weight
