"""Every registered built-in function against an independent numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actsparse_deploy.base.errors import ConfigError, UnknownFunctionError
from actsparse_deploy.calibration.functions import (
    AGGREGATE_FNS,
    MASK_FNS,
    REDUCE_FNS,
    Registry,
    RunningStat,
    check_mask_config,
)

RNG = np.random.default_rng(0)
X = RNG.normal(size=(5, 3, 4)).astype(np.float32)  # 5 x 3 samples of 4 features

AGGREGATE_EXPECTED = {
    "sum": lambda a: a.sum(axis=(0, 1)),
    "sum_abs": lambda a: np.abs(a).sum(axis=(0, 1)),
    "sum_sq": lambda a: (a.astype(np.float64) ** 2).sum(axis=(0, 1)),
    "max_abs": lambda a: np.abs(a).max(axis=(0, 1)),
    "moments": lambda a: np.stack([a.astype(np.float64).sum(axis=(0, 1)), (a.astype(np.float64) ** 2).sum(axis=(0, 1))]),
    "gram": lambda a: _gram(a.reshape(-1, a.shape[-1])),
}


def _gram(rows: np.ndarray) -> np.ndarray:
    """sum over rows z of z z^T, z = [x; 1] (float64)."""
    z = np.concatenate([rows.astype(np.float64), np.ones((rows.shape[0], 1))], axis=1)
    return z.T @ z


def test_every_registered_function_is_tested():
    assert set(AGGREGATE_FNS.names()) == set(AGGREGATE_EXPECTED)
    assert set(REDUCE_FNS.names()) == set(REDUCE_EXPECTED)
    assert set(MASK_FNS.names()) == {"threshold", "topk", "block"}


@pytest.mark.parametrize("name", sorted(AGGREGATE_EXPECTED))
def test_aggregate_over_batches_equals_whole(name):
    agg = AGGREGATE_FNS.get(name)
    stat = None
    for chunk in (X[:2], X[2:3], X[3:]):  # uneven batches
        stat = agg.update(stat, torch.from_numpy(chunk), sample_ndim=2)
    expected = AGGREGATE_EXPECTED[name](X)
    assert stat.count == 15 and stat.value.shape == expected.shape and stat.value.dtype == torch.float64
    np.testing.assert_allclose(stat.value.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_aggregate_upstream_calling_convention():
    agg = AGGREGATE_FNS.get("sum_abs")
    stat = agg(None, torch.from_numpy(X[:, 0]))
    stat = agg(stat, torch.from_numpy(X[:, 1]))
    np.testing.assert_allclose(stat.per_sample.numpy(), np.abs(X[:, :2]).mean(axis=(0, 1)), rtol=1e-6)


def _stat(combine):
    value = torch.from_numpy(np.abs(X).sum(axis=0).astype(np.float64))  # (3, 4)
    return RunningStat(value, 5, combine)


REDUCE_EXPECTED = {
    "mean": lambda v, combine: v / 5 if combine == "sum" else v,
    "feature_mean": lambda v, combine: (v / 5 if combine == "sum" else v).mean(axis=1, keepdims=True),
}


@pytest.mark.parametrize("combine", ["sum", "max"])
@pytest.mark.parametrize("name", sorted(REDUCE_EXPECTED))
def test_reduce(name, combine):
    stat = _stat(combine)
    out = REDUCE_FNS.get(name)(stat)
    np.testing.assert_allclose(out.numpy(), REDUCE_EXPECTED[name](stat.value.numpy(), combine), rtol=1e-12)


def test_feature_mean_axis_and_plain_tensor():
    stat = _stat("sum")
    out = REDUCE_FNS.get("feature_mean", axis=-1)(stat)
    np.testing.assert_allclose(out.numpy(), (stat.value.numpy() / 5).mean(axis=0, keepdims=True))
    assert out.shape == (1, 4)
    # a raw batch-first tensor (from a user aggregate) is averaged over its first axis
    raw = torch.from_numpy(X)
    np.testing.assert_allclose(REDUCE_FNS.get("mean")(raw).numpy(), X.mean(axis=0), rtol=1e-6)
    with pytest.raises(ConfigError, match="out of range"):
        REDUCE_FNS.get("feature_mean", axis=5)(stat)
    with pytest.raises(ConfigError, match="no parameter 'dim'"):
        REDUCE_FNS.get("feature_mean", dim=1)


def test_threshold():
    data = torch.tensor([0.1, 0.5, 0.49, 2.0, -1.0])
    np.testing.assert_array_equal(MASK_FNS.get("threshold")(data, threshold=0.5).numpy(), [0, 1, 0, 1, 0])
    with pytest.raises(ConfigError, match="threshold must be a finite number, got nan"):
        MASK_FNS.get("threshold")(data, threshold=float("nan"))


@pytest.mark.parametrize("level", [0.0, 0.25, 0.5, 0.7, 1.0])
def test_topk_zeroes_smallest_magnitudes(level):
    data = torch.from_numpy(RNG.normal(size=(4, 5)))
    mask = MASK_FNS.get("topk")(data, sparsity_level=level).numpy()
    k = int(round(level * 20))
    assert mask.shape == (4, 5) and int((mask == 0).sum()) == k
    order = np.argsort(np.abs(data.numpy()).reshape(-1), kind="stable")
    expected = np.ones(20)
    expected[order[:k]] = 0
    np.testing.assert_array_equal(mask.reshape(-1), expected)


@pytest.mark.parametrize("level", [-0.1, 1.5, "half"])
def test_topk_refuses_bad_level(level):
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        MASK_FNS.get("topk")(torch.ones(4), sparsity_level=level)


def _block_expected(data, block, level):
    rows, cols = data.shape
    br, bc = block
    nr, nc = -(-rows // br), -(-cols // bc)
    padded = np.zeros((nr * br, nc * bc))
    padded[:rows, :cols] = data
    norms = np.array([[np.linalg.norm(padded[i * br : (i + 1) * br, j * bc : (j + 1) * bc]) for j in range(nc)] for i in range(nr)])
    k = int(round(level * norms.size))
    keep = np.ones(norms.size)
    keep[np.argsort(norms.reshape(-1), kind="stable")[:k]] = 0
    keep = keep.reshape(nr, nc).repeat(br, axis=0).repeat(bc, axis=1)
    return keep[:rows, :cols]


@pytest.mark.parametrize("shape, block", [((4, 8), (1, 4)), ((6, 10), (2, 4)), ((3, 7), (3, 2))])
@pytest.mark.parametrize("level", [0.25, 0.5])
def test_block(shape, block, level):
    data = RNG.normal(size=shape)
    mask = MASK_FNS.get("block")(torch.from_numpy(data), sparsity_level=level, sparse_block_shape=block)
    np.testing.assert_array_equal(mask.numpy(), _block_expected(data, block, level))


def test_block_1d_and_bad_shape():
    data = torch.tensor([1.0, 1.0, 0.1, 0.1, 3.0, 3.0])
    mask = MASK_FNS.get("block")(data, sparsity_level=1 / 3, sparse_block_shape=[2])
    np.testing.assert_array_equal(mask.numpy(), [1, 1, 0, 0, 1, 1])
    with pytest.raises(ConfigError, match="sparse_block_shape"):
        MASK_FNS.get("block")(data, sparsity_level=0.5, sparse_block_shape=(0,))
    with pytest.raises(ConfigError, match="more axes"):
        MASK_FNS.get("block")(data, sparsity_level=0.5, sparse_block_shape=(1, 2))


def test_unknown_names_list_known_ones():
    for registry, known in ((AGGREGATE_FNS, "gram, max_abs, moments, sum, sum_abs, sum_sq"), (REDUCE_FNS, "feature_mean, mean"), (MASK_FNS, "block, threshold, topk")):
        with pytest.raises(UnknownFunctionError) as info:
            registry.get("nope")
        assert str(info.value).endswith(f"known: {known}")


def test_register_decorator_and_duplicates():
    registry: Registry = Registry("mask")

    @registry.register("half")
    def half(data, scale=0.5):
        return data * scale

    assert registry.names() == ["half"]
    assert float(registry.get("half")(torch.tensor(2.0))) == 1.0
    assert registry.get("half", scale=2.0).spec == {"name": "half", "scale": 2.0}
    with pytest.raises(ValueError, match="already registered"):
        registry.register("half")(half)


def test_mask_config_check():
    topk = MASK_FNS.get("topk")
    check_mask_config(topk, {"sparsity_level": 0.5, "threshold": 0.1})  # other built-ins' keys pass
    with pytest.raises(ConfigError, match="no sparse_config key 'sparsity'"):
        check_mask_config(topk, {"sparsity": 0.5})
    with pytest.raises(ConfigError, match="needs sparse_config 'sparsity_level'"):
        check_mask_config(topk, {})
    # only the function's own keys reach it
    np.testing.assert_array_equal(topk(torch.tensor([1.0, 2.0]), sparsity_level=0.5, threshold=9).numpy(), [0, 1])


# --- moments and gram: per channel over positions for a conv ------------------------

IMAGES = RNG.normal(size=(6, 3, 4, 5)).astype(np.float32)  # 6 images, 3 channels, 4 x 5 positions


def _channel_rows(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1])  # one row per (image, position)


@pytest.mark.parametrize("name", ["moments", "gram"])
def test_conv_statistic_per_channel_over_positions(name):
    agg = AGGREGATE_FNS.get(name)
    stat = None
    for chunk in (IMAGES[:1], IMAGES[1:4], IMAGES[4:]):  # batch-size independent
        stat = agg.update(stat, torch.from_numpy(chunk), sample_ndim=1)
    rows = _channel_rows(IMAGES)
    if name == "moments":
        expected = np.stack([rows.mean(axis=0), (rows.astype(np.float64) ** 2).mean(axis=0)])
    else:
        expected = _gram(rows) / rows.shape[0]
    assert stat.count == 6 and stat.combine == "sum"
    np.testing.assert_allclose(stat.per_sample.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["moments", "gram"])
def test_statistic_of_half_inputs_accumulates_in_float32(name):
    big = torch.full((64, 8), 300.0, dtype=torch.float16)  # 300^2 * 64 overflows float16
    stat = AGGREGATE_FNS.get(name).update(None, big, sample_ndim=1)
    assert bool(torch.isfinite(stat.value).all())
    assert float(stat.value.max()) == 300.0**2 * 64


@pytest.mark.parametrize("width", [96, 300, 1100])  # 300 and 1100: computed in 2 and 8 column blocks, mirrored
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_of_wide_inputs_equals_numpy(dtype, width):
    """Wide inputs, float32 and float64: symmetric, and equal to numpy."""
    wide = RNG.normal(size=(7, 5, width))
    stat = None
    for chunk in (wide[:3], wide[3:]):
        stat = AGGREGATE_FNS.get("gram").update(stat, torch.from_numpy(chunk).to(dtype), sample_ndim=2)
    expected = _gram(wide.reshape(-1, width))
    assert torch.equal(stat.value, stat.value.T)
    np.testing.assert_allclose(stat.value.numpy(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-4)
