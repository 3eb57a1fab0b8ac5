"""What calibration reads: the first ``--max-samples`` samples only, and token
batches without their padding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from actsparse_deploy.app.pipeline import ConvertOptions
from actsparse_deploy.base.errors import DataError
from actsparse_deploy.calibration.masks import Masks
from actsparse_deploy.data.batches import first_samples

from ..helpers import invoke, user_module

TOKENS = '''
import torch
from torch import nn


class Tokens(nn.Module):
    """Token 1 embeds to [1, 2, 3, 4]; the padding token 0 to [100, 0, 0, 0]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(2, 4)
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor([[100.0, 0, 0, 0], [1.0, 2, 3, 4]]))
        self.fc = nn.Linear(4, 2)

    def forward(self, input_ids, attention_mask):
        return self.fc(self.embed(input_ids) * 1.0)


def build():
    torch.manual_seed(0)
    return Tokens()
'''


def test_first_samples_cuts_across_batches_and_reads_no_further():
    batches = [torch.arange(4), torch.arange(4, 7), torch.arange(7, 10)]
    assert [b.tolist() for b in first_samples(batches, 5)] == [[0, 1, 2, 3], [4]]
    assert first_samples(batches, None) is batches
    read = []

    def stream():
        for b in batches:
            read.append(len(b))
            yield b

    assert [b.tolist() for b in first_samples(stream(), 4)] == [[0, 1, 2, 3]]
    assert read == [4]  # the second batch is never read


def test_unpadded_leaves_a_stream_unread():
    """Regrouping token batches by length reads them all: a stream (not a list) passes through as it is."""
    from actsparse_deploy.data.batches import unpadded

    batch = {"input_ids": torch.tensor([[1, 2, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    stream = iter([batch])
    assert unpadded(stream) is stream and next(stream) is batch
    assert unpadded([batch])[0]["input_ids"].tolist() == [[1, 2]]


def test_max_samples_on_calibrate_and_convert(tmp_path: Path):
    result = invoke("calibrate", "digits-mlp", "--max-samples", 50, "-o", tmp_path / "m.safetensors", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["calibration"] == {"samples": 50, "batches": 2}  # batches of 32: 32 + 18
    assert Masks.load(tmp_path / "m.safetensors").num_samples == 50
    for bad in (0, -1):
        result = invoke("convert", "digits-mlp", "--max-samples", bad, "-o", tmp_path / "out")
        assert result.exit_code == 2 and "--max-samples" in result.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="max_samples must be a positive integer"):
        ConvertOptions(max_samples=0)


def test_token_batches_calibrate_without_their_padding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The padding token's large activation is not a real token's: the max_abs
    statistic, and so the mask, ignore it (feature 0 is the weakest of a real token)."""
    ids = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=np.int64)
    np.savez(tmp_path / "tokens.npz", input_ids=ids, attention_mask=(ids != 0).astype(np.int64))
    with user_module(tmp_path, TOKENS, monkeypatch) as name:
        result = invoke("calibrate", f"{name}:build", "--data", tmp_path / "tokens.npz", "--layers", "fc", "--sparsity", 0.25,
                        "--aggregate", "max_abs", "--structured", "-o", tmp_path / "m.safetensors")
        assert result.exit_code == 0, result.output
    mask = Masks.load(tmp_path / "m.safetensors")["fc"].mask.reshape(-1)
    assert mask.tolist() == [0.0, 1.0, 1.0, 1.0]  # with the padding seen, feature 0 (100) would stay and feature 1 go


@pytest.mark.slow
def test_mask_shapes_broadcast_as_torch_does_without_importing_sympy():
    """masks.broadcast_shape replaces torch.broadcast_shapes (which imports sympy,
    0.4 s per command): same answers, and calibrating digits imports no sympy."""
    import itertools
    import subprocess
    import sys

    from actsparse_deploy.calibration.masks import broadcast_shape

    dims = [(), (1,), (3,), (0,), (1, 3), (2, 1), (2, 3), (3, 2), (4, 1, 3), (1, 1, 1)]
    for a, b in itertools.product(dims, repeat=2):
        try:
            expected = tuple(torch.broadcast_shapes(a, b))
        except RuntimeError:
            expected = None
        assert broadcast_shape(a, b) == expected, (a, b)
    code = ("import sys; from actsparse_deploy import calibrate; from actsparse_deploy.models.zoo import load_builtin, builtin_recipe_path, "
            "calibration_batches; calibrate(load_builtin('digits-mlp'), builtin_recipe_path('digits-mlp'), calibration_batches('digits-mlp')); "
            "print('sympy' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_cost_on_token_batches_without_padding_is_the_padded_cost():
    """sparsification_cost compares MiniLM's outputs on the held-out sentences
    regrouped without padding: the same cosine figures as on the padded batches."""
    import copy

    from actsparse_deploy.app.workload import load_workload
    from actsparse_deploy.data.batches import unpadded
    from actsparse_deploy.onnx.metrics import cosine_stats

    work = load_workload("minilm")
    held = work.require_heldout()[:3]
    assert any(bool((b["attention_mask"] == 0).any()) for b in held)  # there is padding to drop
    sparse = copy.deepcopy(work.model)
    with torch.no_grad():
        sparse.get_submodule("bert.encoder.layer.0.output.dense").weight[:, ::3] = 0.0
    padded, regrouped = cosine_stats(work.model, sparse, held), cosine_stats(work.model, sparse, unpadded(held))
    assert [row["output"] for row in padded] == [row["output"] for row in regrouped]
    for a, b in zip(padded, regrouped):
        for key in ("cosine_mean", "cosine_min", "max_abs_diff"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["output"], key)
        assert a["cosine_mean"] < 0.9999  # the layer change is visible
