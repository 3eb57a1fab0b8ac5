"""Compensation of the consumer (actsparse_deploy.calibration.compensate): ``bias`` adds the
removed features' mean contribution to the bias, ``lstsq`` refits the kept
columns and the bias by ridge least squares on the augmented Gram matrix. Checked
where they are exact: constant features (bias), features that are linear
combinations of others (lstsq), and against torch.linalg.lstsq."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from actsparse_deploy.base.errors import ConfigError
from actsparse_deploy.calibration.compensate import COMPENSATIONS, DAMPING_GRID, compensate, gcv_scores, lstsq_refit
from actsparse_deploy.calibration.functions import AGGREGATE_FNS, LayerStats


def _stats(x: torch.Tensor, aggregate: str, sample_ndim: int = 1) -> LayerStats:
    """The statistic collection would give for the batches ``x`` (split unevenly)."""
    agg = AGGREGATE_FNS.get(aggregate)
    stat = None
    for chunk in (x[:3], x[3:]):
        stat = agg.update(stat, chunk, sample_ndim=sample_ndim)
    assert stat is not None
    return LayerStats(stat=stat, input_shape=tuple(x.shape[1:]), aggregate=aggregate, num_samples=len(x), num_batches=2)


def _apply(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias = nn.Parameter(bias.clone())
    return layer


def _dependent_inputs(n: int = 64) -> torch.Tensor:
    """8 features; 5 = 0 + 2 * 1 - 0.5, 6 = 3 - 4 + 1.25, 7 = 2 * 2: affine combinations of 0-4."""
    torch.manual_seed(0)
    base = torch.randn(n, 5)
    extra = torch.stack([base[:, 0] + 2 * base[:, 1] - 0.5, base[:, 3] - base[:, 4] + 1.25, 2 * base[:, 2]], dim=1)
    return torch.cat([base, extra], dim=1)


def test_lstsq_recovers_dense_output_when_removed_features_are_linear_combinations():
    torch.manual_seed(1)
    layer = nn.Linear(8, 4)
    x = _dependent_inputs()
    dense = layer(x).detach()
    mask = torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 0])
    weight, bias = compensate(layer, _stats(x, "gram"), mask, "lstsq", damping=0.0)
    assert weight.shape == layer.weight.shape and bias.shape == (4,)
    assert bool((weight[:, 5:] == 0).all())  # removed columns are zero
    uncompensated = layer(x * mask).detach()
    assert float((uncompensated - dense).abs().max()) > 0.1
    assert_close(_apply(layer, weight, bias)(x * mask), dense, atol=1e-4, rtol=1e-4)


def test_lstsq_on_sequences_uses_every_token():
    torch.manual_seed(2)
    layer = nn.Linear(8, 3)
    x = _dependent_inputs(60).reshape(6, 10, 8)  # (batch, tokens, features)
    dense = layer(x).detach()
    mask = torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 0])
    weight, bias = compensate(layer, _stats(x, "gram", sample_ndim=2), mask, "lstsq", damping=0.0)
    assert_close(_apply(layer, weight, bias)(x * mask), dense, atol=1e-4, rtol=1e-4)


def test_lstsq_without_damping_equals_torch_lstsq():
    torch.manual_seed(3)
    layer = nn.Linear(8, 5).double()
    x = torch.randn(200, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64) + 0.3
    mask = torch.tensor([1.0, 0, 1, 1, 0, 1, 0, 1], dtype=torch.float64)
    kept = mask.nonzero().flatten()
    target = layer(x).detach()
    design = torch.cat([x[:, kept], torch.ones(200, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, target).solution.T  # (5, kept + 1)
    weight, bias = compensate(layer, _stats(x, "gram"), mask, "lstsq", damping=0.0)
    assert_close(weight[:, kept], solution[:, :-1], atol=1e-8, rtol=1e-8)
    assert_close(bias, solution[:, -1], atol=1e-8, rtol=1e-8)
    assert bool((weight[:, mask == 0] == 0).all())


def test_lstsq_damping_pulls_towards_the_original_weights_and_is_relative_to_the_mean_diagonal():
    """The ridge is ``l ||W'_K - W_K||^2`` (the bias as the constant feature's
    column): ``W'_K = (W G[:, K'] + l W_K') (G[K', K'] + l I)^-1``; a large
    damping keeps the kept columns and the bias as they were."""
    torch.manual_seed(4)
    layer = nn.Linear(6, 2).double()
    x = torch.randn(100, 6, dtype=torch.float64)
    mask = torch.tensor([1.0, 1, 0, 1, 0, 1], dtype=torch.float64)
    kept = torch.tensor([0, 1, 3, 5, 6])
    original = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], dim=1)  # [W, b]

    def refit(damping: float) -> torch.Tensor:
        weight, bias = compensate(layer, _stats(x, "gram"), mask, "lstsq", damping=damping)
        assert bool((weight[:, mask == 0] == 0).all())
        return torch.cat([weight, bias[:, None]], dim=1)[:, kept]

    distances = [float((refit(d) - original[:, kept]).norm()) for d in (0.0, 0.1, 10.0, 1e6)]
    assert distances[0] > distances[1] > distances[2] > distances[3]
    assert_close(refit(1e9), original[:, kept], atol=1e-6, rtol=1e-6)
    # relative to the mean diagonal of the kept block (constant included), as documented
    g = torch.cat([x, torch.ones(100, 1, dtype=torch.float64)], dim=1)
    g = g.T @ g / 100
    block = g[kept][:, kept]
    lam = 0.1 * block.diagonal().mean()
    expected = (original @ g[:, kept] + lam * original[:, kept]) @ torch.linalg.inv(block + lam * torch.eye(5, dtype=torch.float64))
    assert_close(refit(0.1), expected)


@pytest.mark.parametrize("kind", COMPENSATIONS)
@pytest.mark.parametrize("has_bias", [True, False])
def test_a_layer_that_loses_no_feature_is_left_bit_identical(kind, has_bias):
    torch.manual_seed(8)
    layer = nn.Linear(8, 4, bias=has_bias)
    x = _dependent_inputs()  # dependent features: a refit of all of them would move the weight
    for damping in (0.0, 0.001, 0.1):
        weight, bias = compensate(layer, _stats(x, "gram"), torch.ones(8), kind, damping=damping)
        assert torch.equal(weight, layer.weight.detach()), (kind, damping)
        assert torch.equal(bias, layer.bias.detach() if has_bias else torch.zeros(4)), (kind, damping)


def test_a_conv_that_loses_no_channel_is_left_bit_identical():
    torch.manual_seed(9)
    x = _dependent_inputs(7 * 16).reshape(7, 4, 4, 8).permute(0, 3, 1, 2).contiguous()
    for layer, kind in ((nn.Conv2d(8, 3, 1), "lstsq"), (nn.Conv2d(8, 3, 3), "bias")):
        weight, bias = compensate(layer, _stats(x, "gram"), torch.ones(8, 1, 1), kind, damping=0.001)
        assert torch.equal(weight, layer.weight.detach()) and torch.equal(bias, layer.bias.detach()), kind


def test_gcv_scores_equal_generalised_cross_validation_on_the_data_and_lstsq_refit_takes_the_least():
    """``RSS / (1 - tr(H) / n)^2`` from the Gram matrix equals the same computed on
    the samples with the explicit hat matrix; the refit is compensate's at the damping chosen."""
    torch.manual_seed(10)
    n, d = 60, 20
    x = torch.randn(n, d, dtype=torch.float64) @ torch.randn(d, d, dtype=torch.float64) * 0.5 + 0.2
    layer = nn.Linear(d, 3).double()
    mask = torch.ones(d, dtype=torch.float64)
    mask[::3] = 0
    stats = _stats(x, "gram")
    z = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    kept = torch.cat([mask.nonzero().flatten(), torch.tensor([d])])
    scale = float((z[:, kept].T @ z[:, kept] / n).diagonal().mean())
    expected = []
    for damping in DAMPING_GRID:
        weight, bias = compensate(layer, stats, mask, "lstsq", damping=damping)
        rss = float(((layer(x).detach() - (x @ weight.T + bias)) ** 2).sum()) / n
        hat = z[:, kept] @ torch.linalg.inv(z[:, kept].T @ z[:, kept] + n * damping * scale * torch.eye(len(kept), dtype=torch.float64)) @ z[:, kept].T
        expected.append(rss / (1 - float(hat.trace()) / n) ** 2)
    augmented = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], dim=1)
    scores = gcv_scores(z.T @ z / n, kept, augmented, n, DAMPING_GRID)
    assert_close(torch.tensor(scores), torch.tensor(expected), rtol=1e-9, atol=0)
    weight, bias, chosen = lstsq_refit(layer, stats, mask)
    assert chosen == DAMPING_GRID[min(range(len(scores)), key=scores.__getitem__)]
    fixed = compensate(layer, stats, mask, "lstsq", damping=chosen)
    assert_close(weight, fixed[0], rtol=1e-9, atol=1e-12)
    assert_close(bias, fixed[1], rtol=1e-9, atol=1e-12)


def test_gcv_takes_little_damping_where_the_kept_features_explain_the_removed_ones_and_more_where_they_do_not():
    torch.manual_seed(11)
    layer = nn.Linear(8, 4).double()
    mask = torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 0], dtype=torch.float64)
    exact = _dependent_inputs(200).double()  # removed features are affine combinations of the kept ones
    assert lstsq_refit(layer, _stats(exact, "gram"), mask)[2] == DAMPING_GRID[0]
    noisy = torch.randn(12, 8, dtype=torch.float64)  # few samples, independent features: the refit fits noise
    assert lstsq_refit(layer, _stats(noisy, "gram"), mask)[2] > DAMPING_GRID[0]
    with pytest.raises(ConfigError, match="damping grid"):
        lstsq_refit(layer, _stats(noisy, "gram"), mask, grid=(0.0, 0.1))


@pytest.mark.parametrize("aggregate", ["moments", "gram"])
def test_bias_on_constant_features_recovers_dense_output_exactly(aggregate):
    torch.manual_seed(5)
    layer = nn.Linear(6, 3)
    x = torch.randn(40, 6)
    x[:, 2] = 3.0
    x[:, 5] = -1.5
    dense = layer(x).detach()
    mask = torch.tensor([1.0, 1, 0, 1, 1, 0])
    weight, bias = compensate(layer, _stats(x, aggregate), mask, "bias", damping=0.01)
    assert_close(weight, layer.weight.detach())  # bias compensation changes the bias only
    assert_close(_apply(layer, weight, bias)(x * mask), dense, atol=1e-5, rtol=1e-5)


def test_layer_without_bias_gets_one():
    layer = nn.Linear(4, 2, bias=False)
    x = torch.randn(10, 4)
    x[:, 1] = 2.0
    weight, bias = compensate(layer, _stats(x, "moments"), torch.tensor([1.0, 0, 1, 1]), "bias", damping=0.0)
    assert_close(bias, layer.weight.detach()[:, 1] * 2.0)


def test_conv_bias_compensation_with_constant_channels():
    torch.manual_seed(6)
    layer = nn.Conv2d(4, 5, 3)
    x = torch.randn(7, 4, 6, 6)
    x[:, 1] = 0.75
    x[:, 3] = -2.0
    dense = layer(x).detach()
    mask = torch.tensor([1.0, 0, 1, 0]).reshape(4, 1, 1)
    weight, bias = compensate(layer, _stats(x, "moments"), mask, "bias", damping=0.0)
    assert_close(_apply(layer, weight, bias)(x * mask), dense, atol=1e-5, rtol=1e-5)


def test_conv_1x1_lstsq_is_exact_and_larger_kernels_refuse_lstsq():
    torch.manual_seed(7)
    layer = nn.Conv2d(8, 3, 1)
    x = _dependent_inputs(7 * 16).reshape(7, 4, 4, 8).permute(0, 3, 1, 2).contiguous()
    dense = layer(x).detach()
    mask = torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 0]).reshape(8, 1, 1)
    weight, bias = compensate(layer, _stats(x, "gram"), mask, "lstsq", damping=0.0)
    assert_close(_apply(layer, weight, bias)(x * mask), dense, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="kernel .* larger than 1"):
        compensate(nn.Conv2d(8, 3, 3), _stats(x, "gram"), mask, "lstsq", damping=0.0)


def test_bad_arguments_are_refused():
    layer = nn.Linear(4, 2)
    x = torch.randn(10, 4)
    assert COMPENSATIONS == ("none", "bias", "lstsq")
    with pytest.raises(ConfigError, match="compensation 'ridge' is not one of none, bias, lstsq"):
        compensate(layer, _stats(x, "gram"), torch.ones(4), "ridge", damping=0.0)
    with pytest.raises(ConfigError, match="needs the 'gram' statistic"):
        compensate(layer, _stats(x, "moments"), torch.ones(4), "lstsq", damping=0.0)
    with pytest.raises(ConfigError, match="damping"):
        compensate(layer, _stats(x, "gram"), torch.ones(4), "lstsq", damping=-1.0)
    with pytest.raises(ConfigError, match="4 input features.*mask of 3"):
        compensate(layer, _stats(x, "gram"), torch.ones(3), "bias", damping=0.0)


def test_gpt2_conv1d_lstsq_and_methods_read_its_transposed_weight():
    """GPT-2's Conv1D keeps its weight as (in, out): compensation returns a weight
    of that shape that recovers the dense output, and methods score its columns."""
    from transformers.pytorch_utils import Conv1D

    from actsparse_deploy.calibration.methods import weight_columns

    torch.manual_seed(4)
    layer = Conv1D(4, 8)  # nf=4 out, nx=8 in: weight (8, 4)
    x = _dependent_inputs().reshape(8, 8, 8)  # (batch, tokens, features)
    dense = layer(x).detach()
    assert_close(weight_columns(layer)[:, :, 0], layer.weight.detach().double().T)
    mask = torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 0])
    weight, bias = compensate(layer, _stats(x, "gram", sample_ndim=2), mask, "lstsq", damping=0.0)
    assert weight.shape == layer.weight.shape == (8, 4) and bias.shape == (4,)
    assert bool((weight[5:] == 0).all())  # removed input rows are zero
    assert float((layer(x * mask).detach() - dense).abs().max()) > 0.1
    assert_close(_apply(layer, weight, bias)(x * mask), dense, atol=1e-4, rtol=1e-4)
