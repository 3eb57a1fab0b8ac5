"""The built-in models as ``actsparse models`` lists them.

    >>> rows = builtin_models()
    >>> rows[0]["name"], sorted(rows[0])
    ('digits-cnn', ['description', 'heldout_perplexity', 'name', 'recipe', 'task', 'test_accuracy', 'weights'])
"""

from __future__ import annotations

from typing import Any

from ..models import zoo

__all__ = ["builtin_models"]


def builtin_models() -> list[dict[str, Any]]:
    """Each built-in model's name, description, task, test accuracy and held-out
    perplexity (where its weights are present: None otherwise), weights and recipe files."""
    rows: list[dict[str, Any]] = []
    for name in zoo.builtin_names():
        entry = zoo.get_builtin(name)
        weights = zoo.builtin_weights_path(name)
        meta = zoo.builtin_metadata(name) if weights is not None and weights.is_file() else {}
        rows.append(
            {
                "name": name,
                "description": entry.description,
                "task": entry.task,
                "test_accuracy": float(meta["test_accuracy"]) if "test_accuracy" in meta else None,
                "heldout_perplexity": float(meta["heldout_perplexity"]) if "heldout_perplexity" in meta else None,
                "weights": str(weights) if weights is not None else None,
                "recipe": str(zoo.builtin_recipe_path(name)),
            }
        )
    return rows
