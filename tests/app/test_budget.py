"""Per-layer sparsity to a cost budget (actsparse_deploy.app.budget) and --max-cost."""

from __future__ import annotations

import json

import pytest
import torch

from actsparse_deploy.app.budget import Budget, search_budget
from actsparse_deploy.app.workload import load_workload
from actsparse_deploy.bake.squash import squash
from actsparse_deploy.base.errors import RecipeError
from actsparse_deploy.calibration.recipe import Recipe
from actsparse_deploy.data.batches import split_tuning, total_samples
from actsparse_deploy.models.zoo import builtin_recipe_path
from tests.helpers import invoke, one_line_error


def disagreement(dense, sparse, batches) -> float:
    """A user metric: the fraction of samples whose predicted class changes."""
    with torch.no_grad():
        changed = sum(int((dense(b).argmax(-1) != sparse(b).argmax(-1)).sum()) for b in batches)
    return changed / sum(len(b) for b in batches)


def recipe_of(work) -> Recipe:
    return Recipe.load(builtin_recipe_path(work.name))


@pytest.fixture(scope="module")
def work():
    return load_workload("digits-mlp")


def test_budget_parse_accepted_forms_and_errors():
    assert Budget.parse("cosine=0.98") == Budget("cosine", 0.98)
    assert Budget.parse("accuracy-drop=0.01").within(0.01) and not Budget.parse("accuracy-drop=0.01").within(0.02)
    assert Budget.parse("cosine=0.98").within(0.99) and not Budget.parse("cosine=0.98").within(0.97)
    assert Budget.parse("perplexity-ratio=1.05") == Budget("perplexity-ratio", 1.05)
    user = Budget.parse("tests.app.test_budget:disagreement=0.5")
    assert (user.kind, user.function, user.value) == ("user", "tests.app.test_budget:disagreement", 0.5)
    for bad in ("cosine", "cosine=", "cosine=abc", "cosine=1.5", "speed=2", "accuracy-drop=-1", "cosine=nan", "=3", "a:=1"):
        with pytest.raises(RecipeError, match="cosine=0.98") as caught:
            Budget.parse(bad)
        assert caught.value.exit_code == 3


def test_tuning_split_is_every_fifth_calibration_sample_and_not_heldout(work):
    """Spread through the data (calibration data often comes in its source's
    order: the last fifth would be a corner of it), across batch boundaries."""
    calibration, tuning = split_tuning(list(work.calibration))
    assert total_samples(calibration) == 160 and total_samples(tuning) == 40
    everything = torch.cat(list(work.calibration))
    every_fifth = torch.arange(200) % 5 == 4
    torch.testing.assert_close(torch.cat(tuning), everything[every_fifth])
    torch.testing.assert_close(torch.cat(calibration), everything[~every_fifth])
    uneven = [everything[:7], everything[7:9], everything[9:]]  # batches of 7, 2 and 191 samples
    calibration, tuning = split_tuning(uneven)
    torch.testing.assert_close(torch.cat(tuning), everything[every_fifth])
    torch.testing.assert_close(torch.cat(calibration), everything[~every_fifth])
    _, one = split_tuning([everything[:3]])
    assert total_samples(one) == 1  # at least one sample tunes
    held = torch.cat(work.heldout).flatten(1)
    for row in torch.cat(tuning).flatten(1):
        assert not bool((held == row).all(dim=1).any())


def _tuning_cost(work, result) -> float:
    _, tuning = split_tuning(list(work.calibration))
    sparse = squash(work.model, result.masks, "mul").model
    return result.budget.measure(work.model, sparse, tuning)


@pytest.mark.parametrize("text", ["cosine=0.97", "accuracy-drop=0.02"])
def test_search_respects_the_budget_on_the_tuning_split(work, text):
    budget = Budget.parse(text)
    result = search_budget(work.model, recipe_of(work), list(work.calibration), budget)
    assert budget.within(result.tuning_cost)
    assert result.tuning_cost == pytest.approx(_tuning_cost(work, result))  # measured, not guessed
    assert set(result.levels) == {"fc2", "fc3"}
    assert result.masks.overall_sparsity() > 0.1 and result.evaluations >= 2
    assert {name: result.masks[name].sparsity for name in result.levels} == pytest.approx(result.levels, abs=0.01)


def test_the_search_keeps_a_continuous_budget_by_three_standard_errors(work):
    """The tuning split is a sample: a candidate just inside the budget there lands outside it on other
    samples about half the time. cosine / perplexity-ratio candidates are held to the budget with their
    figure moved DOUBT standard errors towards the worse side; accuracy-drop's are not (a count)."""
    from actsparse_deploy.app.budget import DOUBT, _Meter, _outputs
    from actsparse_deploy.data.batches import unpadded
    from actsparse_deploy.data.scores import cost_error

    budget = Budget.parse("cosine=0.97")
    recipe = recipe_of(work)
    held = search_budget(work.model, recipe, list(work.calibration), budget)
    bare = search_budget(work.model, recipe, list(work.calibration), budget, doubt=0.0)
    _, tuning = split_tuning(list(work.calibration))
    sparse = squash(work.model, held.masks, "mul").model
    error = cost_error("cosine", _outputs(work.model, tuning), _outputs(sparse, tuning), tuning)
    assert held.tuning_error == pytest.approx(error) and error > 0
    assert held.tuning_cost - DOUBT * error >= 0.97  # kept with the margin
    assert held.to_json()["tuning_error"] == pytest.approx(error) and held.to_json()["doubt"] == DOUBT
    assert bare.tuning_cost - DOUBT * bare.tuning_error < 0.97 <= bare.tuning_cost  # without it, the search goes to the edge
    assert held.masks.overall_sparsity() < bare.masks.overall_sparsity()
    assert _Meter(budget, work.model, list(unpadded(tuning))).doubt == DOUBT
    assert _Meter(Budget.parse("accuracy-drop=0.02"), work.model, tuning).doubt == 0.0


def test_a_looser_budget_never_gives_less_sparsity(work):
    recipe = recipe_of(work)
    found = [
        search_budget(work.model, recipe, list(work.calibration), Budget.parse(f"cosine={c}")).masks.overall_sparsity()
        for c in (0.999, 0.99, 0.95, 0.8)
    ]
    assert found == sorted(found) and found[-1] > found[0], found


def test_a_user_metric_function_is_the_cost(work):
    budget = Budget.parse("tests.app.test_budget:disagreement=0.05")
    result = search_budget(work.model, recipe_of(work), list(work.calibration), budget)
    _, tuning = split_tuning(list(work.calibration))
    sparse = squash(work.model, result.masks, "mul").model
    assert result.tuning_cost == pytest.approx(disagreement(work.model, sparse, tuning)) and result.tuning_cost <= 0.05
    assert result.masks.overall_sparsity() > 0.1


def test_convert_with_max_cost_reports_levels_and_heldout_cost(tmp_path):
    result = invoke("convert", "digits-mlp", "-o", tmp_path / "out", "--max-cost", "accuracy-drop=0.02", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    budget = report["budget"]
    assert budget["budget"] == "accuracy-drop=0.02" and set(budget["levels"]) == {"fc2", "fc3"}
    assert budget["tuning_cost"] <= 0.02 and budget["tuning_samples"] == 40
    drop = report["cost"]["accuracy_dense"] - report["cost"]["accuracy_sparse"]
    assert budget["heldout_cost"] == pytest.approx(drop) and budget["heldout_within"] == (drop <= 0.02)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["budget"] == budget
    text = invoke("convert", "digits-mlp", "-o", tmp_path / "out2", "--max-cost", "accuracy-drop=0.02")
    assert text.exit_code == 0 and "budget accuracy-drop=0.02" in text.stdout and "fc2" in text.stdout


def test_calibrate_with_max_cost_writes_masks_at_the_levels(tmp_path):
    out = tmp_path / "m.safetensors"
    result = invoke("calibrate", "digits-mlp", "-o", out, "--max-cost", "cosine=0.98", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert out.is_file() and report["budget"]["tuning_cost"] >= 0.98
    budget = report["budget"]
    assert budget["doubt"] == 3.0 and budget["tuning_cost"] - 3.0 * budget["tuning_error"] >= 0.98  # kept with the margin
    text = invoke("calibrate", "digits-mlp", "-o", tmp_path / "n.safetensors", "--max-cost", "cosine=0.98")
    assert text.exit_code == 0 and f"+- {budget['tuning_error']:.2g} (kept by 3 standard errors)" in text.stdout, text.stdout
    assert {row["layer"]: row["sparsity"] for row in report["layers"]} == pytest.approx(report["budget"]["levels"], abs=0.01)


@pytest.mark.parametrize("command", ["convert", "calibrate"])
def test_max_cost_with_sparsity_is_a_usage_error_and_bad_budget_a_recipe_error(tmp_path, command):
    out = tmp_path / ("out" if command == "convert" else "m.safetensors")
    both = invoke(command, "digits-mlp", "-o", out, "--max-cost", "cosine=0.9", "--sparsity", "0.5")
    assert both.exit_code == 2 and "--max-cost" in both.stderr and "--sparsity" in both.stderr, both.output
    bad = invoke(command, "digits-mlp", "-o", out, "--max-cost", "speed=3")
    one_line_error(bad, 3, "cosine=0.98")
    assert list(tmp_path.iterdir()) == []


def test_cost_on_other_data_of_a_builtin_is_reported_and_printed(work):
    """The "other text" line: a built-in's other data (MiniLM: dataset descriptions) gets its own cosine."""
    import dataclasses

    from actsparse_deploy.app.cost import sparsification_cost
    from actsparse_deploy.app.report import Report

    other = torch.rand(24, 1, 8, 8)
    entry = dataclasses.replace(work.builtin, other_data=lambda size: list(other.split(size)))
    with_other = dataclasses.replace(work, builtin=entry, other=entry.other_batches())  # what loading does with it
    sparse = squash(work.model, search_budget(work.model, recipe_of(work), list(work.calibration),
                                               Budget.parse("cosine=0.9")).masks, "mul").model
    cost = sparsification_cost(with_other, sparse)
    row = cost["other_text"]["outputs"][0]
    assert cost["other_text"]["samples"] == 24 and row["output"] == "logits" and 0.5 < row["cosine_mean"] < 1
    assert "other_text" not in sparsification_cost(work, sparse)
    from actsparse_deploy.app.render import cost_lines

    said = "\n".join(cost_lines(Report(cost=cost).cost))
    assert f"other text (24 samples), logits: cosine to dense mean {row['cosine_mean']:.4f}" in said


# --- obs: removal order computed once, threshold allocation -------------------------


def test_obs_order_prefixes_are_the_obs_masks_at_every_grid_level():
    """The order computed once at the top level gives, at each level, the mask the
    ``obs`` method gives when run at that level (also a width whose groups do not
    divide the levels: 600 features remove 2 per step)."""
    from actsparse_deploy.app.budget import GRID, obs_order
    from actsparse_deploy.calibration.functions import AGGREGATE_FNS, LayerStats
    from actsparse_deploy.calibration.methods import METHODS

    for d, out in ((40, 6), (600, 3)):
        torch.manual_seed(d)
        x = torch.randn(700, d) @ torch.randn(d, d) * 0.3 + torch.randn(d)
        stats = LayerStats(AGGREGATE_FNS.get("gram").update(None, x, sample_ndim=1), (d,), aggregate="gram")
        layer = torch.nn.Linear(d, out)
        levels = range(GRID) if d < 100 else (1, 5, 13, 31)
        order, error = obs_order(layer, stats, round((GRID - 1) / GRID * d), 0.001)
        assert len(set(order.tolist())) == len(order) and bool((error[1:] >= error[:-1]).all())
        for k in levels:
            keep = torch.ones(d)
            keep[order[: round(k / GRID * d)]] = 0.0
            torch.testing.assert_close(METHODS.get("obs")(layer, stats, k / GRID), keep, rtol=0, atol=0)


class _TwoConsumers(torch.nn.Module):
    """``robust`` reads 32 features that are linear combinations of 4 (lstsq
    recovers them exactly from a few), ``sensitive`` reads 32 independent ones."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mix = torch.nn.Linear(4, 32)
        self.robust = torch.nn.Linear(32, 8)
        self.sensitive = torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.robust(self.mix(x[:, :4])) + self.sensitive(x[:, 4:])


def test_obs_budget_keeps_a_sensitive_layer_below_the_uniform_level():
    model = _TwoConsumers().eval()
    torch.manual_seed(1)
    batches = list(torch.randn(320, 36).split(32))
    recipe = Recipe.from_dict({"defaults": {"sparse_config": {"sparsity_level": 0.5}, "method": "obs", "compensate": "lstsq"},
                               "layers": [{"name": ["robust", "sensitive"]}]})
    budget = Budget.parse("cosine=0.97")
    result = search_budget(model, recipe, batches, budget)
    assert budget.within(result.tuning_cost)
    _, tuning = split_tuning(batches)
    assert result.tuning_cost == pytest.approx(budget.measure(model, squash(model, result.masks, "mul").model, tuning))
    assert result.levels["sensitive"] < result.uniform_level < result.levels["robust"], result.to_json()
    assert result.masks.overall_sparsity() > result.uniform_level
    lm = result.masks["robust"]
    assert (lm.method, lm.compensate) == ("obs", "lstsq")
    assert lm.weight is not None and lm.weight.shape == model.robust.weight.shape


def test_token_batches_are_regrouped_without_padding_and_others_kept():
    from actsparse_deploy.data.batches import unpadded

    lengths = [3, 5, 3, 1, 5, 5]
    ids = torch.zeros(6, 5, dtype=torch.long)
    mask = torch.zeros(6, 5, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(1, n + 1) + 10 * i
        mask[i, :n] = 1
    batches = [{"input_ids": ids[:4], "attention_mask": mask[:4]}, {"input_ids": ids[4:], "attention_mask": mask[4:]}]
    out = unpadded(batches, size=2)
    assert [tuple(b["input_ids"].shape) for b in out] == [(1, 1), (2, 3), (2, 5), (1, 5)]
    assert all(bool((b["attention_mask"] == 1).all()) for b in out)
    rows = sorted(tuple(r.tolist()) for b in out for r in b["input_ids"])
    assert rows == sorted(tuple(ids[i, :n].tolist()) for i, n in enumerate(lengths))
    left = [{"input_ids": ids, "attention_mask": mask.flip(1)}]  # left padding: not regrouped
    assert unpadded(left) is left
    plain = [torch.rand(4, 3)]
    assert unpadded(plain) is plain


def test_a_budget_held_on_other_data_too_keeps_it_there_and_prunes_less(work):
    """--max-cost-other: each candidate's cost is the worse of the tuning split's and the other data's."""
    calibration = list(work.calibration)
    alone = search_budget(work.model, recipe_of(work), calibration, Budget.parse("cosine=0.99"))
    g = torch.Generator().manual_seed(0)
    other = [torch.rand(32, 1, 8, 8, generator=g) for _ in range(2)]  # noise: unlike any digit
    both = search_budget(work.model, recipe_of(work), calibration, Budget.parse("cosine=0.99"), other=other)
    assert alone.other_text is None and both.other_text["samples"] == 64
    assert both.other_text["tuning_cost"] >= 0.99 and both.tuning_cost >= 0.99  # both keep the budget
    assert both.masks.overall_sparsity() < alone.masks.overall_sparsity()  # the other data is the harder one here
    assert both.tuning_error > 0 and both.doubt == 3.0  # the tuning split's error, though the other data held the budget
    sparse = squash(work.model, alone.masks, "mul").model
    assert Budget.parse("cosine=0.99").measure(work.model, sparse, other) < 0.99  # what held on the tuning split alone misses there
