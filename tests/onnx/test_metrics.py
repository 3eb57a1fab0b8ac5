"""The cost's model runs (actsparse_deploy.onnx.metrics): each model once per batch, every figure from one pass."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from actsparse_deploy.data.batches import unpadded
from actsparse_deploy.data.scores import Tally
from actsparse_deploy.onnx.metrics import accuracy, cosine_stats, cost_tallies, perplexity, predictions, run


class Counting(nn.Module):
    """A model that counts the batches it is called on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls, self.modes = inner, 0, set()

    def forward(self, *args, **kwargs):
        self.calls += 1
        self.modes.add((self.training, torch.is_grad_enabled()))
        return self.inner(*args, **kwargs)


class TokenModel(nn.Module):
    """Token ids in: (class logits (batch, 3), per-token logits (batch, tokens, vocabulary))."""

    def __init__(self, vocab: int = 13) -> None:
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(vocab, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.lm = nn.Linear(8, vocab)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.mix(self.embed(input_ids))) * attention_mask[..., None]
        pooled = h.sum(1) / attention_mask.sum(1, keepdim=True)
        return self.head(pooled), self.lm(h)


class LanguageModel(TokenModel):
    def forward(self, input_ids, attention_mask):
        classes, logits = super().forward(input_ids, attention_mask)
        return logits, classes


def sparse_copy(model: nn.Module) -> nn.Module:
    sparse = copy.deepcopy(model)
    with torch.no_grad():
        for p in sparse.parameters():
            if p.ndim == 2:
                p[:, ::2] = 0
    return sparse


def padded_batches(seed: int = 0, batches: int = 3, rows: int = 4, tokens: int = 7) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(1, 13, (rows, tokens), generator=g)
        mask = torch.ones(rows, tokens, dtype=torch.long)
        for r in range(rows):
            n = int(torch.randint(2, tokens + 1, (), generator=g))
            ids[r, n:], mask[r, n:] = 0, 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_one_pass_feeds_every_tally_and_restores_the_mode():
    torch.manual_seed(0)
    dense, sparse = Counting(nn.Linear(4, 3)), Counting(nn.Linear(4, 3))
    dense.train(), sparse.eval()
    batches = [torch.randn(5, 4), torch.randn(2, 4)]
    closeness, classes = Tally(("model", "model"), compare=True), Tally(("model", "model"), classes=True)
    run((dense, sparse), batches, closeness, classes)
    assert (dense.calls, sparse.calls) == (2, 2) and dense.modes == sparse.modes == {(False, False)}
    assert dense.training and not sparse.training
    assert closeness.output_stats() == cosine_stats(dense, sparse, batches)
    np.testing.assert_array_equal(classes.predictions_of(1), predictions(sparse, batches))


def test_plain_batches_are_one_pass_for_every_figure():
    """Batches that regrouping leaves as they are: dense and sparse run once per batch for cosine, accuracy and the kept outputs."""
    torch.manual_seed(1)
    dense = Counting(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)))
    sparse = Counting(sparse_copy(dense.inner))
    held = [torch.randn(8, 6), torch.randn(8, 6), torch.randn(3, 6)]
    labels = torch.randint(0, 4, (19,))
    tallies = cost_tallies(dense, sparse, held, classes=True, keep=True)
    assert (dense.calls, sparse.calls) == (3, 3) and tallies.heldout.samples == 19
    assert tallies.ordered.accuracy_of(0, labels) == accuracy(dense.inner, held, labels)
    assert tallies.ordered.accuracy_of(1, labels) == accuracy(sparse.inner, held, labels)
    assert tallies.heldout.output_stats() == cosine_stats(dense.inner, sparse.inner, held)
    with torch.no_grad():
        for kept, batch in zip(tallies.ordered.kept[1], held):
            torch.testing.assert_close(kept[0], sparse.inner(batch), rtol=0, atol=0)
    assert tallies.other is None and tallies.onnx is None


def test_token_batches_compare_without_padding_and_classify_in_label_order():
    torch.manual_seed(2)
    model = TokenModel()
    dense, sparse = Counting(model), Counting(sparse_copy(model))
    held = padded_batches()
    regrouped = unpadded(held)
    labels = torch.randint(0, 3, (12,))
    tallies = cost_tallies(dense, sparse, held, classes=True, other=padded_batches(seed=5, batches=1))
    assert dense.calls == len(regrouped) + len(held) + len(unpadded(padded_batches(seed=5, batches=1)))  # the labels need a pass of their own
    assert tallies.heldout.output_stats() == cosine_stats(model, sparse.inner, regrouped)
    assert tallies.heldout.output_stats() != cosine_stats(model, sparse.inner, held)
    assert tallies.ordered.accuracy_of(0, labels) == accuracy(model, held, labels)
    assert tallies.ordered.accuracy_of(1, labels) == accuracy(sparse.inner, held, labels)
    assert tallies.other is not None
    assert tallies.other.output_stats() == cosine_stats(model, sparse.inner, unpadded(padded_batches(seed=5, batches=1)))
    calls = dense.calls
    cost_tallies(dense, sparse, held)  # no labels, nothing kept: the regrouped pass alone
    assert dense.calls - calls == len(regrouped)


def test_language_model_perplexity_comes_from_the_same_pass():
    torch.manual_seed(3)
    model = LanguageModel()
    dense, sparse = Counting(model), Counting(sparse_copy(model))
    held = padded_batches(seed=7)
    tallies = cost_tallies(dense, sparse, held, tokens=True)
    assert dense.calls == len(unpadded(held))
    assert tallies.heldout.perplexity_of(0) == pytest.approx(perplexity(model, unpadded(held)), rel=1e-12)
    assert tallies.heldout.perplexity_of(1) == pytest.approx(perplexity(sparse.inner, unpadded(held)), rel=1e-12)
    assert tallies.heldout.perplexity_of(0) == pytest.approx(perplexity(model, held), rel=1e-5)  # padding: the same figure


def test_the_onnx_model_runs_once_for_its_perplexity_and_accuracy(tmp_path):
    from actsparse_deploy.onnx.export import export_onnx

    torch.manual_seed(4)
    model = LanguageModel().eval()
    held = [{"input_ids": b["input_ids"], "attention_mask": torch.ones_like(b["attention_mask"])} for b in padded_batches(seed=9)]
    path = tmp_path / "lm.onnx"
    exported = export_onnx(model, held[0], path, exporter="torchscript", data=held)
    tallies = cost_tallies(model, model, held, tokens=True, onnx_path=path, io_spec=exported.io)
    assert tallies.onnx is not None
    assert tallies.onnx.perplexity_of(0) == pytest.approx(perplexity(path, held, exported.io), rel=1e-12)
    assert tallies.onnx.perplexity_of(0) == pytest.approx(tallies.heldout.perplexity_of(0), rel=1e-4)
    labels = torch.zeros(12, 7, dtype=torch.long)  # the first output's arg-max per token
    both = cost_tallies(model, model, held, classes=True, onnx_path=path, io_spec=exported.io)
    assert both.onnx is not None and both.onnx.accuracy_of(0, labels) == accuracy(path, held, labels, exported.io)
