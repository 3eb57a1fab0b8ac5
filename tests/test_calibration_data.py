"""What calibration reads: the first ``--max-samples`` samples only, and token
batches without their padding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from actsparse_deploy.batches import first_samples
from actsparse_deploy.errors import DataError
from actsparse_deploy.masks import Masks
from actsparse_deploy.pipeline import ConvertOptions

from .helpers import invoke, user_module

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
