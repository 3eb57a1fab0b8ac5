"""Does allocating one overall sparsity by each layer's sensitivity beat the same level everywhere? (issue 21)

For a built-in model, its recipe's statistics (``obs`` + ``lstsq``) collected once on the calibration
split that ``--max-cost`` uses (every fifth sample left out for tuning), then at each overall level:

* ``uniform``: every layer at the level (what ``--sparsity`` does);
* ``allocated``: the budget search's slopes (:func:`actsparse_deploy.app.budget._slopes`: each
  layer's ``obs`` curve scaled by one measurement of that layer alone near the level) taken in order,
  least marginal cost per feature first, until the same share of all features is removed.

Each masked model (``mul``) is measured against the dense model on the tuning split, the held-out
data and the built-in's other text (MiniLM: cosine of the sentence embedding; tiny-lm: perplexity
ratio). One thread; MiniLM about 90 s, tiny-lm about 30 s.

    python tools/measure_allocation.py --model tiny-lm --levels 0.25 0.5
    python tools/measure_allocation.py --model minilm --levels 0.25 0.5
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

from actsparse_deploy.app import budget as B  # noqa: E402
from actsparse_deploy.app.workload import load_workload  # noqa: E402
from actsparse_deploy.calibration.calibrate import collect  # noqa: E402
from actsparse_deploy.calibration.recipe import Recipe  # noqa: E402
from actsparse_deploy.data.batches import split_tuning, unpadded  # noqa: E402
from actsparse_deploy.models.loading import load_recipe  # noqa: E402

KINDS = {"minilm": "cosine=0.98", "tiny-lm": "perplexity-ratio=1.05"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(KINDS), default="tiny-lm")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5])
    args = parser.parse_args()
    work = load_workload(args.model)
    recipe, budget, model = Recipe.coerce(load_recipe(work)), B.Budget.parse(KINDS[args.model]), work.model
    calibration, tuning = split_tuning(work.calibration)
    stats = collect(model, recipe, unpadded(calibration), model_name=args.model)
    names = list(stats.layers)
    configs = {n: stats.resolve(B._one_layer_recipe(recipe, stats, n, 0.0))[n] for n in names}
    orders = B._obs_orders(model, stats, configs, B.OBS_GRID, {})
    grid = B.OBS_GRID

    def candidates(batches):  # the masked models measured on ``batches``, as measured, no margin
        meter = B._Meter(budget, model, list(unpadded(batches)), doubt=0)
        return B._Candidates(model, recipe, stats, meter, orders, grid, args.model, 10**6)

    sets = {"tuning": candidates(tuning), "held-out": candidates(work.require_heldout())}
    if work.other is not None:
        sets["other text"] = candidates(work.other)
    tune = sets["tuning"]
    sizes, total = tune.unit_sizes, sum(tune.unit_sizes.values())
    print(f"{args.model}: {budget.kind}, layers {', '.join(names)}")
    for level in args.levels:
        k = round(level * grid)
        allocated = dict.fromkeys(names, 0)
        for _, i, step in B._slopes(tune, k, budget):
            if sum(allocated[u] / grid * sizes[u] for u in names) >= level * total - 1e-9:
                break
            allocated[names[i]] = max(allocated[names[i]], step)
        for label, ks in (("uniform", dict.fromkeys(names, k)), ("allocated", allocated)):
            removed = sum(ks[u] / grid * sizes[u] for u in names) / total
            figures = "  ".join(f"{where} {c.figure(ks):.4f}" for where, c in sets.items())
            levels = "/".join(f"{ks[u] / grid:.0%}" for u in names)
            print(f"{level:.0%} {label:9s} removed {removed:.1%} (levels {levels}): {figures}", flush=True)


if __name__ == "__main__":
    main()
