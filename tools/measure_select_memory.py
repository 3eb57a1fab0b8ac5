"""What choosing one layer's mask with ``obs`` and its ``lstsq`` refit holds, in the layer's Gram matrices.

Collects a Linear layer's statistics (``n`` input features, 1024 outputs, bfloat16 like the
language models, a ReLU's inputs) and selects its mask at 25 %; prints the peak resident memory
of the selection over the memory the process held before it, in bytes and in Gram matrices
(``8 (n + 1)^2`` bytes). ``calibrate``'s memory plan counts ``SELECT`` of them for the widest
layer with a method (``actsparse_deploy/calibration/stats.py``). Run it in a fresh process.

    OMP_NUM_THREADS=2 python tools/measure_select_memory.py 2816
"""

from __future__ import annotations

import argparse
import gc
import json
import resource

import torch
from torch import nn

from actsparse_deploy import Recipe, collect, select
from actsparse_deploy.base.memory import resident_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("features", type=int, help="the layer's input features (a down_proj's intermediate size)")
    parser.add_argument("--samples", type=int, default=1024)
    args = parser.parse_args()
    torch.manual_seed(0)
    n = args.features
    model = nn.Sequential(nn.Linear(64, n), nn.ReLU(), nn.Linear(n, 1024)).to(torch.bfloat16)
    recipe = Recipe.simple(layers=["2"], sparsity=0.25, structured=True).with_method("obs", "lstsq")
    stats = collect(model, recipe, [torch.randn(256, 64, dtype=torch.bfloat16) for _ in range(max(1, args.samples // 256))])
    gc.collect()
    before = resident_memory()
    select(stats, model=model)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gram = 8 * (n + 1) ** 2
    print(json.dumps({"features": n, "gram_bytes": gram, "held_before": before, "peak": peak,
                      "selection_bytes": peak - before, "in_grams": round((peak - before) / gram, 2)}))


if __name__ == "__main__":
    main()
