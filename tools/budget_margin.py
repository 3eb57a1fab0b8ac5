"""What the budget search's margin does: the same search held at the tuning split's own figure
(``doubt=0``) and with its three standard errors (the default), each result's held-out cost.

A built-in model, its recipe, its calibration and held-out data; ``search_budget`` as ``convert
--max-cost`` runs it; the masks applied in ``mul`` mode (the model squash builds), the budget's
figure on the held-out data:

    OMP_NUM_THREADS=1 python tools/budget_margin.py tiny-lm perplexity-ratio=1.03
    OMP_NUM_THREADS=1 python tools/budget_margin.py minilm cosine=0.98 --json margin.json
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from actsparse_deploy.app.budget import DOUBT, Budget, search_budget
from actsparse_deploy.app.workload import load_workload
from actsparse_deploy.bake.squash import squash
from actsparse_deploy.calibration.recipe import Recipe
from actsparse_deploy.data.batches import unpadded
from actsparse_deploy.models.zoo import builtin_recipe_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a built-in model (minilm, tiny-lm, digits-mlp, ...)")
    parser.add_argument("budget", help="cosine=0.98, perplexity-ratio=1.03, ...")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = load_workload(args.model)
    recipe, budget = Recipe.load(builtin_recipe_path(args.model)), Budget.parse(args.budget)
    held = list(unpadded(list(work.heldout or [])))
    rows = []
    for doubt in (0.0, DOUBT):
        result = search_budget(work.model, recipe, list(work.calibration), budget, doubt=doubt)
        heldout = budget.measure(work.model, squash(work.model, result.masks, "mul").model, held, labels=work.labels)
        rows.append({"doubt": doubt, "sparsity": result.masks.overall_sparsity(), "tuning_cost": result.tuning_cost,
                     "tuning_error": result.tuning_error, "heldout_cost": heldout, "heldout_within": budget.within(heldout)})
        print(f"{args.model} {budget} margin {doubt:g} standard errors: {result.masks.overall_sparsity():.1%} of the features, "
              f"tuning {result.tuning_cost:.4f} +- {result.tuning_error:.4f}, held-out {heldout:.4f} "
              f"({'within' if budget.within(heldout) else 'MISSED'})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
