"""Weight access lives in the layer kind: a kind registered for a user's own
module type says its weight layout, and the selection methods (wanda,
fluctuation, obs) and compensation (bias, lstsq) read and write its weight
through it, as they do a Linear's."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from actsparse_deploy import Recipe, calibrate
from actsparse_deploy.base.errors import ConfigError
from actsparse_deploy.calibration.compensate import compensate
from actsparse_deploy.calibration.functions import AGGREGATE_FNS, LayerStats
from actsparse_deploy.calibration.methods import METHODS, weight_columns, weight_from_columns
from actsparse_deploy.nn.layers import LayerKind, layer_kind, register_layer_kind, unregister_layer_kind


class KernelDense(nn.Module):
    """A Linear as Flax / Keras keep it: ``kernel`` of shape ``(in, out)``, no ``weight`` attribute."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(d_in, d_out) * 0.5)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kernel + self.bias


class KernelDenseKind(LayerKind):
    """Sizes, the feature axis and the weight layout: nothing else."""

    def in_features(self, layer: nn.Module) -> int:
        return int(layer.kernel.shape[0])

    def out_features(self, layer: nn.Module) -> int:
        return int(layer.kernel.shape[1])

    def feature_axis(self, layer: nn.Module) -> int | None:
        return -1

    def standard_weight(self, layer: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
        return (layer.kernel if weight is None else weight).T

    def native_weight(self, layer: nn.Module, standard: torch.Tensor) -> torch.Tensor:
        return standard.T


@pytest.fixture
def kernel_dense():
    register_layer_kind(KernelDense)(KernelDenseKind)
    try:
        yield
    finally:
        unregister_layer_kind(KernelDense)


def _twins(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The same network twice: its last layer a KernelDense, then an nn.Linear with the transposed kernel."""
    torch.manual_seed(seed)
    own = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), KernelDense(8, 3))
    linear = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        linear[0].load_state_dict(own[0].state_dict())
        linear[2].weight.copy_(own[2].kernel.T)
        linear[2].bias.copy_(own[2].bias)
    return own, linear


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(16, 6, generator=g) for _ in range(4)]


def test_weight_columns_and_back_go_through_the_kind(kernel_dense):
    layer = KernelDense(4, 2)
    columns = weight_columns(layer)
    assert columns.dtype == torch.float64 and columns.shape == (2, 4, 1)
    assert_close(columns[:, :, 0], layer.kernel.detach().double().T)
    assert layer_kind(layer).weight_columns(layer).shape == (2, 4, 1)
    back = weight_from_columns(layer, columns * 2)
    assert back.shape == (4, 2) and back.dtype == layer.kernel.dtype
    assert_close(back, layer.kernel.detach() * 2)


def test_a_kind_without_a_weight_layout_is_still_refused():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.weight

    @register_layer_kind(Scale)
    class ScaleKind(LayerKind):
        def in_features(self, layer):
            return 4

        out_features = in_features

    try:
        with pytest.raises(ConfigError, match="methods and compensation need the consumer's weight columns"):
            weight_columns(Scale())
    finally:
        unregister_layer_kind(Scale)


@pytest.mark.parametrize("method", ["wanda", "fluctuation", "obs"])
def test_methods_and_lstsq_treat_a_registered_kind_like_a_linear(kernel_dense, method):
    own, linear = _twins()
    recipe = Recipe.from_dict({"defaults": {"sparse_config": {"sparsity_level": 0.5}, "method": method, "compensate": "lstsq"}, "layers": [{"name": "2"}]})
    got, want = calibrate(own, recipe, _batches())["2"], calibrate(linear, recipe, _batches())["2"]
    assert int((got.mask == 0).sum()) == 4
    assert torch.equal(got.mask, want.mask)
    assert got.method == method and got.compensate == "lstsq"
    # the masks file's layout, (out, in): the same as the Linear's
    assert got.weight.shape == (3, 8)
    assert_close(got.weight, want.weight, rtol=1e-5, atol=1e-6)
    assert_close(got.bias, want.bias, rtol=1e-5, atol=1e-6)


def _stats(x: torch.Tensor, aggregate: str) -> LayerStats:
    stat = AGGREGATE_FNS.get(aggregate).update(None, x, sample_ndim=1)
    return LayerStats(stat=stat, input_shape=tuple(x.shape[1:]), aggregate=aggregate, num_samples=len(x), num_batches=1)


def test_lstsq_recovers_the_dense_output_in_the_kinds_own_layout(kernel_dense):
    torch.manual_seed(2)
    base = torch.randn(64, 5)
    x = torch.cat([base, (base[:, 0] - 2 * base[:, 1] + 0.5)[:, None], 3 * base[:, 2:4]], dim=1)  # 5-7 depend on 0-4
    layer = KernelDense(8, 3)
    dense = layer(x).detach()
    # obs removes one feature of each dependent group ({0, 1, 5}, {2, 6}, {3, 7}), at no error
    mask = METHODS.get("obs")(layer, _stats(x, "gram"), 3 / 8, damping=0.0)
    removed = set(torch.nonzero(mask == 0).flatten().tolist())
    assert len(removed) == 3 and all(len(removed & group) == 1 for group in ({0, 1, 5}, {2, 6}, {3, 7}))
    weight, bias = compensate(layer, _stats(x, "gram"), mask, "lstsq", damping=0.0)
    assert weight.shape == layer.kernel.shape == (8, 3) and bias.shape == (3,)
    assert bool((weight[sorted(removed)] == 0).all())  # the removed features' rows of the kernel are zero
    refit = KernelDense(8, 3)
    with torch.no_grad():
        refit.kernel.copy_(weight)
        refit.bias.copy_(bias)
    assert float((layer(x * mask).detach() - dense).abs().max()) > 0.1
    assert_close(refit(x * mask).detach(), dense, atol=1e-4, rtol=1e-4)
    # bias compensation reads the kind's weight too, and leaves it as it is
    weight, _ = compensate(layer, _stats(x, "moments"), mask, "bias")
    assert torch.equal(weight, layer.kernel.detach())
