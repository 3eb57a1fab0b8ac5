"""Figures from outputs already computed (actsparse_deploy.data.scores): the arithmetic, no model run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actsparse_deploy.base.errors import DataError
from actsparse_deploy.data.scores import Tally, cost_error, cost_figure, figure_needs, nll_sum, sample_cosines


def _token_batch(seed: int, rows: int = 3, tokens: int = 6, vocab: int = 11) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, tokens), generator=g)
    mask = torch.ones(rows, tokens, dtype=torch.long)
    mask[0, 4:] = 0  # a padded row: its last tokens are not predicted
    return {"input_ids": ids, "attention_mask": mask}, torch.randn(rows, tokens, vocab, generator=g)


def test_compare_folds_max_abs_diff_and_per_sample_cosines_over_batches():
    torch.manual_seed(0)
    dense = [(torch.randn(4, 3), torch.tensor(2.0)), (torch.randn(2, 3), torch.tensor(1.0))]  # a scalar output: one value
    sparse = [(d + 0.1 * torch.randn_like(d), s * 3) for d, s in dense]
    tally = Tally(("model", "model"), compare=True, count=True)
    for (a, s), (b, t) in zip(dense, sparse):
        tally.add(torch.zeros(len(a), 1), (a, s), (b, t))
    cosines = torch.cat([torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1) for (a, _), (b, _) in zip(dense, sparse)])
    rows = tally.output_stats(["features", "loss"])
    assert [row["output"] for row in rows] == ["features", "loss"] and tally.samples == 6
    assert rows[0]["max_abs_diff"] == pytest.approx(max(float((a - b).abs().max()) for (a, _), (b, _) in zip(dense, sparse)))
    assert rows[0]["cosine_mean"] == pytest.approx(float(cosines.mean())) and rows[0]["cosine_min"] == pytest.approx(float(cosines.min()))
    assert rows[1]["max_abs_diff"] == 4.0 and rows[1]["cosine_min"] == pytest.approx(1.0)
    assert tally.output_stats()[0]["output"] == 0  # unnamed: the index
    torch.testing.assert_close(sample_cosines(dense[0][0], sparse[0][0]), cosines[:4])


def test_compare_takes_onnxruntime_arrays_as_they_come():
    torch.manual_seed(1)
    dense = torch.randn(4, 3)
    onnx = (dense + 0.1 * torch.randn_like(dense)).numpy()  # what onnxruntime returns
    as_arrays, as_tensors = Tally(("model", "ONNX model"), compare=True), Tally(("model", "ONNX model"), compare=True)
    as_arrays.add(dense, (dense,), (onnx,))
    as_tensors.add(dense, (dense,), (torch.from_numpy(onnx),))
    assert as_arrays.output_stats() == as_tensors.output_stats()


def test_figures_are_what_the_tally_counts():
    batch, logits = _token_batch(0)
    tally = Tally(("ONNX model",), tokens=True, classes=True)
    tally.add(batch, (logits.numpy(),))
    labels = torch.from_numpy(tally.predictions_of(0)[:, 0])
    assert tally.figures(0, None) == (tally.perplexity_of(0), None)
    with pytest.raises(DataError):  # predictions per token: not one per labelled sample
        tally.figures(0, labels)
    assert Tally(classes=True).figures() == (None, None)  # no labels: no accuracy


def test_tokens_sum_the_next_token_nll_the_mask_keeps_per_side():
    batches = [_token_batch(seed) for seed in range(3)]
    tally = Tally(("model", "ONNX model"), tokens=True)
    for batch, logits in batches:
        tally.add(batch, (logits,), (logits.numpy() * 2,))  # an onnxruntime side: numpy arrays
    for side, scale in ((0, 1.0), (1, 2.0)):
        total, count = 0.0, 0
        for batch, logits in batches:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            nll = torch.nn.functional.cross_entropy((scale * logits[:, :-1]).double().transpose(1, 2), ids[:, 1:], reduction="none")
            total += float(nll[mask[:, 1:].bool()].sum())
            count += int(mask[:, 1:].sum())
        assert count == 3 * (3 * 5 - 2) and tally.perplexity_of(side) == pytest.approx(math.exp(total / count))
    with pytest.raises(DataError, match="no next token"):
        Tally(tokens=True).perplexity_of(0)
    with pytest.raises(DataError, match="ONNX model's first output must be logits"):
        nll_sum(torch.randn(3, 4), batches[0][0], "ONNX model")


def test_classes_give_predictions_in_order_and_accuracy_on_labels():
    logits = [torch.tensor([[0.0, 1.0], [3.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    tally = Tally(("model", "ONNX model"), classes=True, keep=True)
    for x in logits:
        tally.add(x, (x,), (-x.numpy(),))
    np.testing.assert_array_equal(tally.predictions_of(0), [1, 0, 1])
    np.testing.assert_array_equal(tally.predictions_of(1), [0, 1, 0])
    assert tally.accuracy_of(0, torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)
    assert tally.kept[0] == [[logits[0]], [logits[1]]] and len(tally.kept[1]) == 2
    with pytest.raises(DataError, match=r"the ONNX model's first output gives predictions of shape \[3\] for 2 labels"):
        tally.accuracy_of(1, torch.tensor([1, 0]))
    assert Tally(classes=True).predictions_of(0).shape == (0,)


def test_cost_figures_of_two_output_lists():
    dense = [[torch.tensor([[2.0, 0.0], [0.0, 1.0]])], [torch.tensor([[1.0, 3.0]])]]
    sparse = [[torch.tensor([[2.0, 0.0], [1.0, 0.0]])], [torch.tensor([[1.0, 3.0]])]]
    batches = [torch.zeros(2, 1), torch.zeros(1, 1)]
    assert cost_figure("cosine", dense, sparse, batches) == pytest.approx(2 / 3)
    assert cost_figure("accuracy-drop", dense, sparse, batches) == pytest.approx(1 / 3)  # no labels: changed predictions
    assert cost_figure("accuracy-drop", dense, sparse, batches, torch.tensor([0, 1, 1])) == pytest.approx(1 / 3)
    with pytest.raises(DataError, match="2 labels for predictions of shape"):
        cost_figure("accuracy-drop", dense, sparse, batches, torch.tensor([0, 1]))
    batch, logits = _token_batch(5)
    ratio = cost_figure("perplexity-ratio", [[logits]], [[logits * 2]], [batch])
    direct = Tally(("model", "model"), tokens=True)
    direct.add(batch, (logits,), (logits * 2,))
    assert ratio == pytest.approx(direct.perplexity_of(1) / direct.perplexity_of(0))


def test_cost_errors_are_the_standard_errors_of_the_figures():
    dense = [[torch.tensor([[2.0, 0.0], [0.0, 1.0]])], [torch.tensor([[1.0, 3.0]])]]
    sparse = [[torch.tensor([[2.0, 0.0], [1.0, 0.0]])], [torch.tensor([[1.0, 3.0]])]]
    batches = [torch.zeros(2, 1), torch.zeros(1, 1)]
    cosines = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)  # per sample
    assert cost_error("cosine", dense, sparse, batches) == pytest.approx(float(cosines.std() / math.sqrt(3)))
    assert cost_error("accuracy-drop", dense, sparse, batches) == pytest.approx(math.sqrt(0.4 * 0.6 / 3))  # (1 + 1) / (3 + 2) changed
    assert cost_error("accuracy-drop", dense, dense, batches) == pytest.approx(math.sqrt(0.2 * 0.8 / 3))  # none changed: still not certain
    assert cost_error("cosine", dense, dense, batches) == pytest.approx(0.0, abs=1e-12)  # the same model: no spread
    batch, logits = _token_batch(5)
    assert cost_error("perplexity-ratio", [[logits]], [[logits]], [batch]) == 0.0
    noisy = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    error = cost_error("perplexity-ratio", [[logits]], [[noisy]], [batch])
    # by hand: each row's summed NLL gap, a ratio estimator's standard error, times the ratio
    gaps, counts = [], []
    for i in range(3):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        (d, n), (s_, _) = nll_sum(logits[i:i + 1], row, "model"), nll_sum(noisy[i:i + 1], row, "model")
        gaps.append(s_ - d)
        counts.append(n)
    r = sum(gaps) / sum(counts)
    spread = math.sqrt(sum((g - r * n) ** 2 for g, n in zip(gaps, counts)) * 3 / 2) / sum(counts)
    assert error == pytest.approx(math.exp(r) * spread) and error > 0


def test_figure_needs_name_what_the_outputs_lack():
    batch, logits = _token_batch(1)
    assert figure_needs([[logits]], [batch]) == {"cosine": "", "accuracy-drop": "", "perplexity-ratio": ""}
    needs = figure_needs([[torch.randn(3, 4)]], [torch.randn(3, 2)])
    assert needs["cosine"] == needs["accuracy-drop"] == "" and needs["perplexity-ratio"].startswith("a language model")
    assert "a classifier" in figure_needs([[torch.randn(3)]], [torch.randn(3, 2)])["accuracy-drop"]
    assert "an output to compare" in figure_needs([[]], [torch.randn(3, 2)])["cosine"]


def test_a_batchs_logits_are_scored_a_few_rows_at_a_time_to_the_same_figures(monkeypatch):
    """Before, the perplexity and the per-sample cosines copied a whole batch's output to float64 (and its
    log-softmax as much again): a 128k vocabulary's logits on 8 x 64 tokens, over a gigabyte each. Now rows go a
    group at a time under ``ROW_VALUES``, to the same figures."""
    from actsparse_deploy.data import scores

    batch, logits = _token_batch(3, rows=5, tokens=6, vocab=11)
    other = logits + 0.1 * torch.randn_like(logits)
    whole_nll = nll_sum(logits, batch, "model")
    whole = Tally(("a", "b"), compare=True, tokens=True)
    whole.add(batch, [logits], [other])
    seen: list[int] = []
    real_entropy, real_cosines = torch.nn.functional.cross_entropy, scores.sample_cosines
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda x, *a, **k: (seen.append(x.numel()), real_entropy(x, *a, **k))[1])
    monkeypatch.setattr(scores, "sample_cosines", lambda x, y: (seen.append(x.numel()), real_cosines(x, y))[1])
    monkeypatch.setattr(scores, "ROW_VALUES", 2 * 6 * 11)  # two rows of logits at a time
    parted_nll = nll_sum(logits, batch, "model")
    parted = Tally(("a", "b"), compare=True, tokens=True)
    parted.add(batch, [logits], [other])
    # three groups each: the perplexity alone, the tally's perplexity of either side, its cosines
    assert max(seen) <= 2 * 6 * 11 and len(seen) == 12
    assert parted_nll[1] == whole_nll[1] and parted_nll[0] == pytest.approx(whole_nll[0], rel=1e-12)
    assert parted.output_stats() == whole.output_stats() and all(p[1] == w[1] and p[0] == pytest.approx(w[0], rel=1e-12) for p, w in zip(parted.nll, whole.nll))
