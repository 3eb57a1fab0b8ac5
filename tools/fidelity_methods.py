"""Fidelity of the selection methods and compensations on MiniLM (issue 10).

The built-in recipe's layers (the inputs of the six MLP ``output.dense``), the
built-in calibration sentences, the held-out sentences: for each sparsity level
and each (method, compensation) the held-out sentence-embedding cosine to the
dense model (mean / worst), the masked model run in ``mul`` mode with the
compensation's edits applied (the model squash builds). Also the calibration
cost: the time to collect the ``moments`` and the ``gram`` statistics over the
calibration batches, divided by one plain forward pass over the same batches
(one thread).

With ``--allocation``: what non-uniform allocation adds (``obs`` + ``lstsq``).
For each budget, :func:`actsparse_deploy.app.budget.search_budget` chooses a level
per layer (tuning on the last 20 % of the calibration sentences, statistics from
the rest); the uniform allocation at the same overall sparsity (every layer at
that level, the same number of features masked, selected from the same
statistics) is compared with it on the held-out sentences, and the search's own
uniform starting point (the highest uniform level within the budget) is shown.

    python tools/fidelity_methods.py                          # calibration cost and the full table
    python tools/fidelity_methods.py --parts timing           # the calibration cost only
    python tools/fidelity_methods.py --levels 0.5 --damping 0.001 0.01 0.1
    python tools/fidelity_methods.py --calibration-sentences 256 --json out.json
    python tools/fidelity_methods.py --parts allocation --budgets cosine=0.98 cosine=0.96
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from torch import nn

from actsparse_deploy import Masks, Recipe, collect, select
from actsparse_deploy.app.workload import load_workload
from actsparse_deploy.calibration.methods import DEFAULT_DAMPING
from actsparse_deploy.data.batches import run_batch
from actsparse_deploy.models.zoo import builtin_recipe_path
from actsparse_deploy.nn.modules import eval_mode

METHODS = ("wanda", "fluctuation", "obs")
PARTS = ("timing", "table", "allocation")
COMPENSATIONS = ("none", "bias", "lstsq")


def embeddings(model: nn.Module, batches: list[Any]) -> torch.Tensor:
    with eval_mode(model):
        return torch.cat([run_batch(model, b)[1] for b in batches])


def edited(model: nn.Module, masks: Masks) -> nn.Module:
    """A copy of ``model`` with each layer's edits applied and its input multiplied by the mask."""
    model = copy.deepcopy(model)
    for name, lm in masks.layers.items():
        layer = model.get_submodule(name)
        if lm.weight is not None:
            layer.weight = nn.Parameter(lm.weight.clone(), requires_grad=False)
        if lm.bias is not None:
            layer.bias = nn.Parameter(lm.bias.clone(), requires_grad=False)
        layer.register_forward_pre_hook(_multiply(lm.dense()))
    return model


def _multiply(mask: torch.Tensor) -> Any:
    return lambda module, inputs: (inputs[0] * mask, *inputs[1:])


def cosine(model: nn.Module, masks: Masks, heldout: list[Any], dense: torch.Tensor) -> tuple[float, float]:
    cos = nn.functional.cosine_similarity(embeddings(edited(model, masks), heldout), dense, dim=-1)
    return float(cos.mean()), float(cos.min())


def timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--damping", type=float, nargs="+", default=[DEFAULT_DAMPING], help="damping of obs and lstsq (several: a sweep)")
    parser.add_argument("--calibration-sentences", type=int, default=None, help="use only the first N calibration sentences")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--compensations", nargs="+", default=list(COMPENSATIONS))
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=["timing", "table"],
                        help="what to measure: the calibration cost, the method x compensation table, the allocation comparison")
    parser.add_argument("--allocation", action="store_true", help="add the allocation comparison to --parts")
    parser.add_argument("--budgets", nargs="+", default=["cosine=0.98", "cosine=0.96"],
                        help="the budgets of the allocation comparison (about 35 %% and 50 %% overall on MiniLM)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    parts = set(args.parts) | ({"allocation"} if args.allocation else set())
    torch.set_num_threads(1)
    torch.manual_seed(0)

    work = load_workload("minilm")
    model, heldout = work.model, work.require_heldout()
    calibration = list(work.require_calibration())
    if args.calibration_sentences is not None:
        kept, count = [], 0
        for batch in calibration:
            if count >= args.calibration_sentences:
                break
            kept.append({k: v[: args.calibration_sentences - count] for k, v in batch.items()})
            count += len(kept[-1]["input_ids"])
        calibration = kept
    sentences = sum(len(b["input_ids"]) for b in calibration)
    recipe = Recipe.load(builtin_recipe_path("minilm"))

    out: dict[str, Any] = {"sentences": sentences}
    today = gram = None

    # --- calibration cost: plain forward, today's statistic, moments, gram (same batches, one thread)
    if "timing" in parts:
        def forward() -> None:
            with eval_mode(model):
                for b in calibration:
                    run_batch(model, b)

        forward()  # warm-up
        _, plain = timed(forward)
        today, t_today = timed(lambda: collect(model, recipe, calibration))
        _, t_moments = timed(lambda: collect(model, recipe.with_method("fluctuation", "bias"), calibration))
        gram, t_gram = timed(lambda: collect(model, recipe.with_method("obs", "lstsq"), calibration))
        print(f"calibration over {sentences} sentences ({len(calibration)} batches), one thread: plain forward {plain:.2f} s")
        for label, t in (("max_abs (today)", t_today), ("moments", t_moments), ("gram", t_gram)):
            print(f"  collect {label:<16} {t:6.2f} s  = {t / plain:.2f}x plain forward")
        out.update(plain_s=plain, collect_s={"max_abs": t_today, "moments": t_moments, "gram": t_gram})

    dense = embeddings(model, heldout)

    if "table" in parts:
        today = today if today is not None else collect(model, recipe, calibration)
        gram = gram if gram is not None else collect(model, recipe.with_method("obs", "lstsq"), calibration)
        out["rows"] = table(args, model, recipe, today, gram, heldout, dense)
    if "allocation" in parts:
        out["allocation"] = allocation(args.budgets, model, recipe, calibration, heldout, dense, args.damping[0])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


def table(args: argparse.Namespace, model: nn.Module, recipe: Recipe, today: Any, gram: Any,
          heldout: list[Any], dense: torch.Tensor) -> list[dict[str, Any]]:
    """Every level x method x compensation (x damping): held-out cosine mean / worst."""
    rows: list[dict[str, Any]] = []

    def record(level: float, method: str, comp: str, damping: float | None, masks: Masks, seconds: float) -> None:
        mean, worst = cosine(model, masks, heldout, dense)
        row = {"level": level, "method": method, "compensate": comp, "damping": damping, "mean": mean, "worst": worst, "select_s": seconds}
        rows.append(row)
        damp = "" if damping is None else f"{damping:g}"
        print(f"{level:>6.0%} {method:<22} {comp:<7} {damp:<7} {mean:.4f} / {worst:.4f}   (select {seconds:.1f} s)", flush=True)

    print(f"\n{'level':>6} {'method':<22} {'comp':<7} {'damp':<7} held-out cosine mean / worst")
    for level in args.levels:
        masks, seconds = timed(lambda level=level: select(today, recipe.with_sparsity(level)))
        record(level, "activation (max_abs)", "none", None, masks, seconds)
        for method in args.methods:
            for comp in args.compensations:
                dampings = args.damping if (method == "obs" or comp == "lstsq") else [args.damping[0]]
                for damping in dampings:
                    chosen = recipe.with_sparsity(level).with_method(method, comp, damping)
                    masks, seconds = timed(lambda chosen=chosen: select(gram, chosen, model=model))
                    record(level, method, comp, damping if (method == "obs" or comp == "lstsq") else None, masks, seconds)
    return rows


def allocation(budgets: list[str], model: nn.Module, recipe: Recipe, calibration: list[Any],
               heldout: list[Any], dense: torch.Tensor, damping: float) -> list[dict[str, Any]]:
    """Per budget: the budget search's per-layer levels vs every layer at the
    same overall level (obs + lstsq, the same statistics), on the held-out sentences."""
    from actsparse_deploy.app import budget as budget_search
    from actsparse_deploy.app.budget import Budget, search_budget
    from actsparse_deploy.bake.squash import squash
    from actsparse_deploy.data.batches import split_tuning

    chosen = recipe.with_method("obs", "lstsq", damping)
    part, tuning = split_tuning(calibration)
    # the statistics the search collects: the calibration part without the tuning split (without padding where it drops it)
    prepare = getattr(budget_search, "unpadded", lambda batches: batches)
    stats = collect(model, chosen, prepare(part))
    rows: list[dict[str, Any]] = []
    print(f"\nallocation (obs + lstsq, damping {damping:g}; tuning split {sum(len(b['input_ids']) for b in tuning)} sentences,"
          f" statistics from {sum(len(b['input_ids']) for b in part)})")
    print(f"{'budget':<14} {'allocation':<11} {'overall':>7} {'tuning':>7}  held-out cosine mean / worst   levels")
    for text in budgets:
        budget = Budget.parse(text)
        # held at the tuning split's own figure (no margin): the comparison is the allocation against uniform levels
        result, seconds = timed(lambda budget=budget: search_budget(model, chosen, calibration, budget, doubt=0.0))
        overall = result.masks.overall_sparsity()
        variants = {
            "searched": (result.masks, result.levels),
            "uniform": (select(stats, chosen.with_sparsity(overall), model=model), None),
            "start": (select(stats, chosen.with_sparsity(result.uniform_level), model=model), None),
        }
        for label, (masks, levels) in variants.items():
            tune = budget.measure(model, squash(model, masks, "mul").model, tuning)
            mean, worst = cosine(model, masks, heldout, dense)
            row = {"budget": text, "allocation": label, "overall_sparsity": masks.overall_sparsity(), "tuning_cost": tune,
                   "mean": mean, "worst": worst, "levels": levels, "search_s": seconds, "evaluations": result.evaluations}
            rows.append(row)
            shown = " ".join(f"{v:.3f}" for v in levels.values()) if levels else ""
            print(f"{text:<14} {label:<11} {row['overall_sparsity']:>7.1%} {tune:>7.4f}  {mean:.4f} / {worst:.4f}"
                  f"              {shown}", flush=True)
        print(f"{'':<14} (search: {result.evaluations} evaluations, {seconds:.0f} s)")
    return rows

if __name__ == "__main__":
    main()
