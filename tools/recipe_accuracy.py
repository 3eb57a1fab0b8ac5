"""Test accuracy of each built-in digits model, dense and with its built-in
recipe's masks applied (through the sparsifier's own sparsify hooks).

    python tools/recipe_accuracy.py            # a table
    python tools/recipe_accuracy.py --json     # the same as JSON
"""

from __future__ import annotations

import argparse
import json

import torch

from actsparse_deploy import ActivationSparsifier, Recipe
from actsparse_deploy.zoo import builtin_names, builtin_recipe_path, calibration_batches, classification_accuracy, get_builtin, load_builtin


def measure(name: str) -> dict[str, float | str]:
    model = load_builtin(name)
    dense = classification_accuracy(model)
    sparsifier = ActivationSparsifier(model)
    for layer, config in Recipe.load(builtin_recipe_path(name)).select(model).items():
        sparsifier.register_layer(model.get_submodule(layer), **config.register_kwargs())
    with torch.no_grad():
        for batch in calibration_batches(name):
            model(batch)
    sparsifier.step()
    sparsifier.squash_mask()
    return {"model": name, "dense_accuracy": round(dense, 4), "sparse_accuracy": round(classification_accuracy(model), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [measure(name) for name in builtin_names() if get_builtin(name).task == "classification"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'model':<12} {'dense':>7} {'sparse':>7}")
    for row in rows:
        print(f"{row['model']:<12} {row['dense_accuracy']:>7.4f} {row['sparse_accuracy']:>7.4f}")


if __name__ == "__main__":
    main()
