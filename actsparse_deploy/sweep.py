"""A sweep: held-out cost and onnxruntime latency for each sparsity level and method.

For each method (default: the model's recipe as it is, plus the activation
``topk`` baseline: ``max_abs`` statistic, no method, no compensation) the
statistics are collected once on the calibration data; for each level the
masks are selected from them, squashed (``auto``: pruned where exact), exported
to ONNX, and measured: the cost on the held-out data (cosine of each output to
the dense model's; accuracy for a classifier with labels) and the latency ratio
to the dense export under onnxruntime (:func:`actsparse_deploy.latency.latency_ratio`).
``sweep.json`` holds every row; ``sweep.png`` plots cost against sparsity per
method with the latency ratio on a second axis.

    >>> import tempfile
    >>> from actsparse_deploy.sweep import parse_levels, sweep
    >>> parse_levels("0.1:0.8:0.1")[:3], len(parse_levels("0.1:0.8:0.1"))
    ([0.1, 0.2, 0.3], 8)
    >>> result = sweep("digits-mlp", tempfile.mkdtemp(), levels=[0.25, 0.5], runs=2)
    >>> sorted({row["method"] for row in result["rows"]}), len(result["rows"])
    (['recipe', 'topk'], 4)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import OutputError, RecipeError
from .recipe import LayerSettings, Recipe

__all__ = ["BASELINE", "RECIPE", "parse_levels", "plot_sweep", "sweep"]

#: the method names a sweep knows besides those of --method: the recipe as is, and the topk baseline
RECIPE = "recipe"
BASELINE = "topk"
_BASELINE_FNS = {"aggregate_fn": "max_abs", "reduce_fn": "feature_mean", "mask_fn": "topk"}


def parse_levels(text: str) -> list[float]:
    """``START:STOP:STEP`` (inclusive, e.g. ``0.1:0.8:0.1``) or ``A,B,C``: levels in [0, 1)."""
    try:
        if ":" in text:
            start, stop, step = (float(p) for p in text.split(":"))
            if not step > 0:
                raise ValueError("the step must be positive")
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            levels = [round(start + i * step, 10) for i in range(max(n, 0))]
        else:
            levels = [float(p) for p in text.split(",")]
    except ValueError as e:
        raise RecipeError(f"sparsity levels {text!r}: {e}; give START:STOP:STEP (0.1:0.8:0.1) or a list (0.25,0.5)") from None
    if not levels or not all(0 <= v < 1 for v in levels):
        raise RecipeError(f"sparsity levels {text!r} must be one or more numbers in [0, 1): give START:STOP:STEP (0.1:0.8:0.1) or a list (0.25,0.5)")
    return levels


def _baseline(recipe: Recipe) -> Recipe:
    """``recipe``'s layers with the plain activation top-k: no method, no compensation."""
    clear = dict.fromkeys(("method", "compensate", "damping"))

    def plain(settings: LayerSettings) -> LayerSettings:
        return dataclasses.replace(settings, aggregate_fn=None, reduce_fn=None, mask_fn=None, **clear)

    defaults = LayerSettings.from_dict({**_BASELINE_FNS, **plain(recipe.defaults).to_dict()}, "baseline")
    rules = tuple(dataclasses.replace(rule, settings=plain(rule.settings)) for rule in recipe.layers)
    return dataclasses.replace(recipe, defaults=defaults, layers=rules)


def _recipes(work: Any, recipe: Recipe | str | Path | None, methods: Sequence[str] | None,
             compensate: str | None) -> dict[str, Recipe]:
    from .workload import load_recipe

    base = load_recipe(work, recipe)
    if not methods:
        methods = [RECIPE, BASELINE]
    out: dict[str, Recipe] = {}
    for name in methods:
        if name == RECIPE:
            chosen = base
        elif name == BASELINE:
            chosen = _baseline(base)
        else:
            chosen = base.with_method(method=name)
        if compensate is not None and name != BASELINE:
            chosen = chosen.with_method(compensate=compensate)
        out[name] = chosen
    return out


def sweep(
    model: str,
    outdir: str | Path,
    *,
    levels: Sequence[float],
    methods: Sequence[str] | None = None,
    compensate: str | None = None,
    recipe: Recipe | str | Path | None = None,
    weights: str | Path | None = None,
    data: str | None = None,
    heldout: str | None = None,
    batch_size: int | None = None,
    runs: int = 15,
    overwrite: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure every level x method (see the module docstring); write
    ``outdir/sweep.json`` and ``outdir/sweep.png``; return what ``sweep.json`` holds."""
    from .budget import _select
    from .calibrate import collect
    from .export import export_onnx
    from .latency import latency_ratio
    from .metrics import sparsification_cost
    from .workload import load_workload, squash_workload

    outdir = Path(outdir)
    for name in ("sweep.json", "sweep.png"):
        if (outdir / name).exists() and not overwrite:
            raise OutputError(f"{outdir / name} exists: pass `overwrite` to replace it")
    work = load_workload(model, weights, data, heldout, batch_size)
    held = work.require_heldout()
    timing_batches = list(itertools.islice(held, 2))
    recipes = _recipes(work, recipe, methods, compensate)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_path = Path(tmp) / "dense.onnx"
        export_onnx(work.model, work.example(), dense_path, io_spec=work.io)
        for method, the_recipe in recipes.items():
            if on_step is not None:
                on_step(f"{method}: collecting statistics")
            stats = collect(work.model, the_recipe, work.require_calibration(), model_name=work.name)
            for level in levels:
                if on_step is not None:
                    on_step(f"{method} at {level:.0%}")
                masks = _select(stats, the_recipe.with_sparsity(level), work.model)
                squashed = squash_workload(work, masks, "auto")
                path = Path(tmp) / f"{method}-{level}.onnx"
                export_onnx(squashed.model, work.example(), path, io_spec=work.io)
                cost = sparsification_cost(work, squashed.model)
                speed = latency_ratio(dense_path, path, timing_batches, io_spec=work.io, runs=runs, warmup=min(3, runs))
                rows.append(_row(method, level, masks, cost, speed))
    result = {
        "model": work.name, "levels": list(levels), "methods": list(recipes), "compensate": compensate,
        "heldout_samples": rows[0]["heldout_samples"] if rows else 0,
        "latency": {"batches": len(timing_batches), "runs": runs, "threads": rows[0]["threads"] if rows else None},
        "rows": rows,
    }
    outdir.mkdir(parents=True, exist_ok=True)
    try:
        (outdir / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_sweep(result, outdir / "sweep.png")
    except OSError as e:
        raise OutputError(f"cannot write the sweep to {outdir}: {e}") from e
    return result


def _row(method: str, level: float, masks: Any, cost: dict[str, Any], speed: dict[str, Any]) -> dict[str, Any]:
    last = cost["outputs"][-1]
    row: dict[str, Any] = {
        "method": method, "level": level, "overall_sparsity": masks.overall_sparsity(),
        "output": last["output"], "cosine_mean": last["cosine_mean"], "cosine_min": last["cosine_min"],
        "heldout_samples": cost["heldout_samples"],
        "latency_ratio": speed["ratio"], "dense_ms": speed["dense_ms"], "sparse_ms": speed["sparse_ms"], "threads": speed["threads"],
    }
    if "accuracy_sparse" in cost:
        row["accuracy_dense"], row["accuracy_sparse"] = cost["accuracy_dense"], cost["accuracy_sparse"]
    if "other_text" in cost:
        row["other_text"] = cost["other_text"]
    return row


def plot_sweep(result: dict[str, Any], path: Path) -> None:
    """Cost (accuracy where known, else mean cosine) against sparsity per method;
    the latency ratio to dense on a second axis (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    accuracy = bool(rows) and all("accuracy_sparse" in r for r in rows)
    key, label = ("accuracy_sparse", "held-out accuracy") if accuracy else ("cosine_mean", "held-out cosine to dense (mean)")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    latency = ax.twinx()
    for i, method in enumerate(result["methods"]):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["level"])
        color = f"C{i}"
        ax.plot([r["level"] for r in mine], [r[key] for r in mine], "o-", color=color, label=f"{method}: {label.split(' (')[0]}")
        latency.plot([r["level"] for r in mine], [r["latency_ratio"] for r in mine], "s--", color=color, alpha=0.6,
                     label=f"{method}: latency / dense")
    ax.set_xlabel("sparsity level (fraction of the recipe layers' input features masked)")
    ax.set_ylabel(label)
    latency.set_ylabel("onnxruntime latency / dense")
    ax.set_title(f"{result['model']}: cost and latency per sparsity level")
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = latency.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

