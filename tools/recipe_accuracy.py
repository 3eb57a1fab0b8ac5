"""Test accuracy of each built-in digits model, dense and with its built-in
recipe's masks and compensation edits squashed in (mode ``mul``), the masks
calibrated on the model's calibration split as ``actsparse calibrate`` does.

    python tools/recipe_accuracy.py            # a table
    python tools/recipe_accuracy.py --json     # the same as JSON
"""

from __future__ import annotations

import argparse
import json

from actsparse_deploy import Recipe, calibrate
from actsparse_deploy.bake.squash import squash
from actsparse_deploy.models.zoo import builtin_names, builtin_recipe_path, calibration_batches, classification_accuracy, get_builtin, load_builtin


def measure(name: str) -> dict[str, float | str]:
    model = load_builtin(name)
    dense = classification_accuracy(model)
    masks = calibrate(model, Recipe.load(builtin_recipe_path(name)), calibration_batches(name), model_name=name)
    sparse = squash(model, masks, "mul").model
    return {"model": name, "dense_accuracy": round(dense, 4), "sparse_accuracy": round(classification_accuracy(sparse), 4),
            "overall_sparsity": round(masks.overall_sparsity(), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [measure(name) for name in builtin_names() if get_builtin(name).task == "classification"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'model':<12} {'dense':>7} {'sparse':>7} {'features masked':>16}")
    for row in rows:
        print(f"{row['model']:<12} {row['dense_accuracy']:>7.4f} {row['sparse_accuracy']:>7.4f} {row['overall_sparsity']:>16.1%}")


if __name__ == "__main__":
    main()
