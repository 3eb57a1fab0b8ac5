"""Comparing outputs (:mod:`actsparse_deploy.data.compare`): the figures of a large output are those of
the whole, found a chunk at a time, and a chunk is all it holds in float64."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from actsparse_deploy.data import compare as C


def _whole(got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> dict[str, float]:
    """The figures computed over the whole arrays at once, finite values only."""
    g, w = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    finite = np.isfinite(g) & np.isfinite(w)
    d, s = np.abs(g[finite] - w[finite]), np.abs(w[finite])
    return {"max_abs": float(d.max()), "max_rel": float((d / np.maximum(s, np.finfo(np.float32).tiny)).max()),
            "used": float((d / (atol + rtol * s)).max()), "peak": float(np.abs(w[np.isfinite(w)]).max())}


@pytest.mark.parametrize("nan_equal", [False, True])
def test_a_large_outputs_figures_are_the_whole_outputs(nan_equal):
    rng = np.random.default_rng(0)
    size = 3 * C.CHUNK + 17  # chunks and a short last one
    want = rng.standard_normal(size).astype(np.float32)
    got = want + rng.standard_normal(size).astype(np.float32) * 1e-5
    got[C.CHUNK + 5] += 3e-2  # the worst difference in the second chunk, over the tolerance
    want[2 * C.CHUNK + 1] = 40.0  # the peak in the third
    got[2 * C.CHUNK + 1] = 40.0
    for where in (7, 3 * C.CHUNK + 3):  # a NaN on both sides in the first chunk, an Inf on both in the last
        got[where] = want[where] = np.nan if where == 7 else np.inf
    tolerance = C.Tolerance(1e-4, 1e-3, scale_atol=True, nan_equal=nan_equal)
    diff = C.OutputDiff("logits")
    diff.compare(torch.from_numpy(got.reshape(-1, 1)), want.reshape(-1, 1), tolerance)
    whole = _whole(got, want, 1e-4 * 40.0, 1e-3)
    assert diff.values == size and diff.peak == whole["peak"] == 40.0
    assert diff.max_abs == pytest.approx(whole["max_abs"], rel=1e-12) and diff.max_rel == pytest.approx(whole["max_rel"], rel=1e-12)
    assert diff.max_tolerance_used == pytest.approx(whole["used"], rel=1e-12)
    assert diff.over_tolerance and diff.max_abs_over == pytest.approx(whole["max_abs"], rel=1e-12)
    # the same NaN and Inf on both sides agree only with nan_equal; else each side's is counted
    assert diff.non_finite == ({} if nan_equal else {"NaN in the ONNX output": 1, "Inf in the ONNX output": 1,
                                                      "NaN in the PyTorch output": 1, "Inf in the PyTorch output": 1})


def test_integer_outputs_are_compared_exactly_across_chunks():
    want = np.arange(2 * C.CHUNK + 3, dtype=np.int64)
    got = want.copy()
    got[C.CHUNK + 1] += 1
    diff = C.OutputDiff("ids")
    diff.compare(got, torch.from_numpy(want), C.Tolerance(1e-4))
    assert diff.over_tolerance and diff.max_abs == 1.0 and diff.max_abs_over == 1.0 and diff.max_tolerance_used == np.inf


def test_a_large_output_is_compared_in_a_few_chunks_not_in_float64_copies_of_it():
    """Before, an output was copied to float64 whole, with a dozen temporaries as large: comparing a 1B decoder's
    logits on one held-out batch (8 x 64 tokens x 128k vocabulary: 268 MB in float32) took gigabytes."""
    want = torch.randn(1 << 22)  # 16 MB in float32
    got = want + 1e-6
    tracemalloc.start()
    try:
        diff = C.OutputDiff("logits")
        diff.compare(got, want, C.Tolerance(1e-4))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not diff.failed and diff.max_abs == pytest.approx(1e-6, rel=0.1)
    assert peak < 32 << 20  # a chunk's float64 copies and temporaries (2 MB each at most), not the output's (32 MB each)
