"""What sparsification cost (actsparse_deploy.app.cost): the report's figures and the budget's held-out cost from one set of passes."""

from __future__ import annotations

import pytest
import torch

from actsparse_deploy.app.budget import Budget, BudgetResult, heldout_budget
from actsparse_deploy.app.cost import cost_stage, sparsification_cost
from actsparse_deploy.data.batches import Generated, unpadded
from actsparse_deploy.data.workload import Workload
from actsparse_deploy.onnx.metrics import accuracy, cosine_stats
from tests.onnx.test_metrics import Counting, LanguageModel, TokenModel, padded_batches, sparse_copy


def _result(text: str) -> BudgetResult:
    return BudgetResult(Budget.parse(text), {}, None, 0.0, 0.0, 0, 0)  # type: ignore[arg-type]


def disagreement(dense, sparse, batches) -> float:
    """A user cost: the share of samples whose class changes."""
    changed = sum(int((dense(**b)[0].argmax(-1) != sparse(**b)[0].argmax(-1)).sum()) for b in batches)
    return changed / sum(len(b["input_ids"]) for b in batches)


@pytest.fixture(scope="module")
def token_work():
    torch.manual_seed(0)
    model = TokenModel()
    return Workload("tokens", model, heldout=padded_batches(seed=3), labels=torch.randint(0, 3, (12,))), sparse_copy(model)


def test_cost_of_a_token_classifier(token_work):
    """Cosine on the token batches without their padding, accuracy on the held-out batches in the labels' order."""
    work, sparse = token_work
    cost = sparsification_cost(work, sparse)
    assert list(cost) == ["outputs", "heldout_samples", "accuracy_dense", "accuracy_sparse"]
    assert cost["outputs"] == cosine_stats(work.model, sparse, unpadded(work.heldout)) and cost["heldout_samples"] == 12
    assert cost["accuracy_dense"] == accuracy(work.model, work.heldout, work.labels)
    assert cost["accuracy_sparse"] == accuracy(sparse, work.heldout, work.labels)
    assert cost_stage(work, sparse) == (cost, None)


@pytest.mark.parametrize("text", ["cosine=0.9", "accuracy-drop=0.1"])
def test_a_budget_is_measured_from_the_outputs_of_the_cost_passes(token_work, text):
    """The held-out cost of a built-in budget kind: the figure it has when the
    models run again, without running them again."""
    work, sparse = token_work
    measured = heldout_budget(_result(text), work, sparse).heldout
    dense, counted = Counting(work.model), Counting(sparse)
    counting = Workload(work.name, dense, heldout=work.heldout, labels=work.labels)
    cost, budget = cost_stage(counting, counted, budget=_result(text))
    assert budget is not None and budget.heldout == measured and cost == sparsification_cost(work, sparse)
    assert dense.calls == counted.calls == len(unpadded(work.heldout)) + len(work.heldout)  # the cost's two passes, nothing more


def test_a_language_models_budget_and_perplexity_share_the_passes():
    torch.manual_seed(1)
    model = LanguageModel()
    sparse = sparse_copy(model)
    held = padded_batches(seed=4)
    work = Workload("lm", model, heldout=held, task="causal-lm")
    measured = heldout_budget(_result("perplexity-ratio=2"), work, sparse).heldout
    cost, budget = cost_stage(work, sparse, budget=_result("perplexity-ratio=2"))
    assert budget is not None and budget.heldout == measured
    assert {"perplexity_dense", "perplexity_sparse"} <= set(cost) and "accuracy_dense" not in cost
    stream = Workload("lm", model, heldout=Generated(lambda: iter(held)), task="causal-lm")  # a size it does not know: counted
    assert cost_stage(stream, sparse)[0] == {**cost, "heldout_samples": 12} and cost["heldout_samples"] == 12


def test_a_user_budget_runs_its_function_on_the_models(token_work):
    work, sparse = token_work
    cost, budget = cost_stage(work, sparse, budget=_result("tests.app.test_cost:disagreement=0.5"))
    assert budget is not None and budget.heldout["heldout_cost"] == pytest.approx(disagreement(work.model.eval(), sparse.eval(), work.heldout))
    assert budget.heldout["heldout_within"] is (budget.heldout["heldout_cost"] <= 0.5)
