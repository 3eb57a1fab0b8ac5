"""Does more calibration text bring tiny-lm at 50 % under perplexity x1.05? (issue 21)

tiny-lm's recipe (``obs`` + ``lstsq`` on each ``down_proj`` input) calibrated on token rows of 64
from: the built-in calibration data (128 rows of the calibration split), every row of the
calibration split, and rows of the training split (the text the model was trained on: what
calibrating on pre-training data, as one-shot pruning methods do, would give; the held-out split
shares no topic with either). The masks at 25 % and 50 % of every layer (``mul``), the held-out
perplexity ratio to the dense model. One thread, about a minute.

    python tools/measure_calibration_size.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

from actsparse_deploy.app import budget as B  # noqa: E402
from actsparse_deploy.app.workload import load_workload  # noqa: E402
from actsparse_deploy.calibration.calibrate import collect  # noqa: E402
from actsparse_deploy.calibration.recipe import Recipe  # noqa: E402
from actsparse_deploy.models import tinylm  # noqa: E402
from actsparse_deploy.models.loading import load_recipe  # noqa: E402


def rows(stream: torch.Tensor, count: int) -> list[dict[str, torch.Tensor]]:
    ids = tinylm.token_rows(stream, count)
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(8)]


def main() -> None:
    work = load_workload("tiny-lm")
    recipe, model = Recipe.coerce(load_recipe(work)), work.model
    budget = B.Budget.parse("perplexity-ratio=1.05")
    calibration, train = tinylm.token_stream("calibration"), tinylm.token_stream("train")
    every = len(calibration) // tinylm.SEQ_LEN
    print(f"tokens: calibration split {len(calibration)}, training split {len(train)}")
    sets = {"built-in": list(work.calibration), "calibration split, every row": rows(calibration, every),
            "training split, 256 rows": rows(train, 256), "training split, 1024 rows": rows(train, 1024),
            "both, every row + 1024": rows(calibration, every) + rows(train, 1024)}
    for name, batches in sets.items():
        stats = collect(model, recipe, batches, model_name="tiny-lm")
        names = list(stats.layers)
        configs = {n: stats.resolve(B._one_layer_recipe(recipe, stats, n, 0.0))[n] for n in names}
        orders = B._obs_orders(model, stats, configs, B.OBS_GRID, {})
        meter = B._Meter(budget, model, list(work.require_heldout()), doubt=0)
        held = B._Candidates(model, recipe, stats, meter, orders, B.OBS_GRID, "tiny-lm", 10**6)
        count = sum(int(b["input_ids"].shape[0]) for b in batches)
        at = {level: held.figure(dict.fromkeys(names, round(level * B.OBS_GRID))) for level in (0.25, 0.5)}
        print(f"{name} ({count} rows): held-out x{at[0.25]:.4f} at 25 %, x{at[0.5]:.4f} at 50 %", flush=True)


if __name__ == "__main__":
    main()
