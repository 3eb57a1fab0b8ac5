"""A sweep: held-out cost and onnxruntime latency for each sparsity level and method.

For each method (default: the model's recipe as it is, plus the activation
``topk`` baseline: ``max_abs`` statistic, no method, no compensation) the
statistics are collected once on the calibration data; for each level the
masks are selected from them, squashed (``auto``: pruned where exact), exported
to ONNX, validated against the squashed PyTorch model on the held-out data (as
``convert`` does, by the same stage runner: :class:`actsparse_deploy.app.pipeline.Stages`;
each row's ``onnx_max_abs_diff``), and measured: the cost on the held-out data (cosine of each output to
the dense model's; accuracy for a classifier with labels) and the latency ratio
to the dense export under onnxruntime (:func:`actsparse_deploy.onnx.latency.latency_ratio`).
``sweep.json`` holds every row; ``sweep.png`` plots cost against sparsity per
method with the latency ratio on a second axis. With ``quantize`` (``int8``,
``int8-static``), each level's float model is also smoothed as ``convert --quantize``
smooths it (unless ``smooth=False``), exported, validated and quantized by onnxruntime,
and measured the same way (a row per mode, its ``quantize``), and the dense export
quantized alone (onnxruntime's one call: what a user ships instead) is measured once
(``int8_alone``); ``sweep.png`` then also plots cost against latency, every row, with
the dense model and int8 alone as the reference points. Both are written like
``convert``'s outputs (:mod:`actsparse_deploy.base.files`): the folder locked for
the run, both staged and moved into place together or not at all, a link at
either name replaced (with ``overwrite``), never written through.

    >>> import tempfile
    >>> from actsparse_deploy.app.sweep import parse_levels, sweep
    >>> parse_levels("0.1:0.8:0.1")[:3], len(parse_levels("0.1:0.8:0.1"))
    ([0.1, 0.2, 0.3], 8)
    >>> result = sweep("digits-mlp", tempfile.mkdtemp(), levels=[0.25, 0.5], runs=2)
    >>> sorted({row["method"] for row in result["rows"]}), len(result["rows"])
    (['recipe', 'topk'], 4)
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base.constants import MAX_RUNS
from ..base.errors import RecipeError, UsageError
from ..calibration.recipe import LayerSettings, Recipe
from .options import ValidateOptions

if TYPE_CHECKING:
    from .pipeline import Stages

__all__ = ["BASELINE", "MAX_LEVELS", "OUT_FILES", "QUANTIZE", "RECIPE", "parse_levels", "parse_quantize", "plot_sweep", "sweep"]

#: the method names a sweep knows besides those of --method: the recipe as is, and the topk baseline
RECIPE = "recipe"
BASELINE = "topk"
_BASELINE_FNS = {"aggregate_fn": "max_abs", "reduce_fn": "feature_mean", "mask_fn": "topk"}
#: the most levels one sweep measures (each is a calibration, an export and a latency run)
MAX_LEVELS = 1000
OUT_FILES = ("sweep.json", "sweep.png")
_FORMS = "give START:STOP:STEP (0.1:0.8:0.1) or a list (0.25,0.5)"
#: what a sweep's ``quantize`` takes besides ``none`` (the float rows, always measured)
QUANTIZE = ("int8", "int8-static")


def parse_quantize(modes: str | Sequence[str]) -> list[str]:
    """``none,int8,int8-static`` (a string or its parts) as the int8 modes a sweep measures besides
    the float models (``none``: those alone). ``auto`` chooses and a sweep measures: refused.

    >>> parse_quantize("none,int8"), parse_quantize(["int8-static", "int8"])
    (['int8'], ['int8-static', 'int8'])
    """
    parts = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if m.strip()]
    wrong = [m for m in parts if m not in ("none", *QUANTIZE)]
    if wrong:
        raise UsageError(f"a sweep's quantize {wrong[0]!r} is not none, int8 or int8-static (auto chooses one; a sweep "
                         "measures each: list them, e.g. none,int8)")
    return list(dict.fromkeys(m for m in parts if m != "none"))


def parse_levels(text: str) -> list[float]:
    """``START:STOP:STEP`` (inclusive, e.g. ``0.1:0.8:0.1``) or ``A,B,C``: levels in [0, 1),
    at most :data:`MAX_LEVELS` of them (counted before any is made).

    >>> parse_levels("0:1:1e-9")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    actsparse_deploy.base.errors.RecipeError: sparsity levels '0:1:1e-9' make 1000000000 levels: a sweep measures at most 1000; give a larger ...
    """
    shown = text if len(text) <= 40 else f"{text[:40]}..."
    try:
        if ":" in text:
            start, stop, step = (float(p) for p in text.split(":"))
            count = _range_count(start, stop, step)
        else:
            count = text.count(",") + 1
        if count is None or count > MAX_LEVELS:
            many = "countless" if count is None else str(count)
            raise RecipeError(f"sparsity levels {shown!r} make {many} levels: a sweep measures at most {MAX_LEVELS}; "
                              "give a larger step or fewer values")
        if ":" in text:
            levels = [round(start + i * step, 10) for i in range(count)]
        else:
            levels = [float(p) for p in text.split(",")]
    except RecipeError:
        raise
    except ValueError as e:
        raise RecipeError(f"sparsity levels {shown!r}: {e}; {_FORMS}") from None
    if not levels or not all(0 <= v < 1 for v in levels):
        raise RecipeError(f"sparsity levels {shown!r} must be one or more numbers in [0, 1): {_FORMS}")
    return levels


def _range_count(start: float, stop: float, step: float) -> int | None:
    """How many levels ``START:STOP:STEP`` makes (None: more than a float counts)."""
    if not all(math.isfinite(v) for v in (start, stop, step)):
        raise ValueError("every part must be a finite number")
    if not step > 0:
        raise ValueError("the step must be positive")
    span = (stop - start) / step + 1e-9
    return max(math.floor(span) + 1, 0) if math.isfinite(span) else None


def _baseline(recipe: Recipe) -> Recipe:
    """``recipe``'s layers with the plain activation top-k: no method, no compensation."""
    clear = dict.fromkeys(("method", "compensate", "damping"))

    def plain(settings: LayerSettings) -> LayerSettings:
        return dataclasses.replace(settings, aggregate_fn=None, reduce_fn=None, mask_fn=None, **clear)

    defaults = LayerSettings.from_dict({**_BASELINE_FNS, **plain(recipe.defaults).to_dict()}, "baseline")
    rules = tuple(dataclasses.replace(rule, settings=plain(rule.settings)) for rule in recipe.layers)
    return dataclasses.replace(recipe, defaults=defaults, layers=rules)


def _recipes(work: Any, recipe: Recipe | str | Path | None, methods: Sequence[str] | None,
             compensate: str | None, heads: bool = False) -> dict[str, Recipe]:
    from ..models.loading import load_recipe

    base = load_recipe(work, recipe, heads=heads)
    if heads and methods and BASELINE in methods:
        raise UsageError(f"--heads with the {BASELINE} baseline: it masks single features, not whole heads; "
                         "sweep recipe or a selection method (wanda, fluctuation, obs)")
    if not methods:
        methods = [RECIPE] if heads else [RECIPE, BASELINE]
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
    validation: ValidateOptions | None = None,
    quantize: str | Sequence[str] = (),
    smooth: bool = True,
    heads: bool = False,
) -> dict[str, Any]:
    """Measure every level x method (see the module docstring), each model timed
    ``runs`` times (1 to :data:`~actsparse_deploy.base.constants.MAX_RUNS`) and
    validated against PyTorch on the held-out data (``validation``: the tolerances;
    a model outside them stops the sweep with a ValidationError, writing nothing);
    ``quantize``: the int8 modes also measured (:func:`parse_quantize`), ``smooth``: smoothed
    before (as ``convert --quantize``); ``heads``: attention heads pruned too (as ``convert --heads``;
    the ``topk`` baseline, which cannot select heads, is then left out of the default methods); write ``outdir/sweep.json`` and ``outdir/sweep.png``;
    return what ``sweep.json`` holds."""
    from ..base.files import staging_dir
    from .options import LoadOptions
    from .pipeline import Stages, locked_outputs, publish_staged

    if isinstance(runs, bool) or not isinstance(runs, int) or not 1 <= runs <= MAX_RUNS:
        raise UsageError(f"`runs` must be an integer from 1 to {MAX_RUNS}, got {runs!r}")
    modes = parse_quantize(quantize)
    load = LoadOptions(weights=weights, data=data, heldout=heldout, batch_size=batch_size)
    checks = validation if validation is not None else ValidateOptions()
    int8 = _Int8(tuple(modes), smooth)
    outdir = Path(outdir)
    with locked_outputs(outdir, OUT_FILES, overwrite):  # one run at a time writes here
        stages = Stages(load.workload(model))
        recipes = _recipes(stages.work, recipe, methods, compensate, heads)
        with staging_dir(outdir) as staging:  # the scratch exports too: removed with it, or by the next run if killed
            result = _measure(stages, recipes, compensate, staging, levels, runs, on_step, checks, int8)
            writers = {"sweep.json": lambda path: path.write_text(json.dumps(result, indent=2) + "\n"),
                       "sweep.png": lambda path: plot_sweep(result, path)}
            publish_staged(staging, outdir, writers, OUT_FILES, overwrite, what="the sweep")
    return result


@dataclasses.dataclass(frozen=True)
class _Int8:
    """A sweep's int8: the modes measured besides the float models, smoothed before or not."""

    modes: tuple[str, ...]
    smooth: bool


def _measure(stages: Stages, recipes: dict[str, Recipe], compensate: str | None, scratch: Path, levels: Sequence[float],
             runs: int, on_step: Callable[[str], None] | None, checks: ValidateOptions, int8: _Int8) -> dict[str, Any]:
    """The rows of every level x method (:func:`_level`): ONNX exports in ``scratch``; what ``sweep.json`` holds."""
    from .options import ExportOptions

    work = stages.work
    timing_batches = list(itertools.islice(work.require_heldout(), 2))
    rows: list[dict[str, Any]] = []
    dense = stages.export(work.model, scratch / "dense.onnx", ExportOptions())
    alone = {mode: _int8_alone(stages, dense, mode, timing_batches, runs) for mode in int8.modes}
    for index, (method, the_recipe) in enumerate(recipes.items()):
        if on_step is not None:
            on_step(f"{method}: collecting statistics")
        with stages.timer("calibrate"):
            stats = stages.statistics(the_recipe, work.require_calibration())
        for level in levels:
            if on_step is not None:
                on_step(f"{method} at {level:.0%}")
            path = scratch / f"{index}-{len(rows)}.onnx"
            measured = _level(stages, stats, the_recipe.with_sparsity(level), path, dense.path, timing_batches, runs, checks, int8)
            rows += [{"method": method, "level": level, **row} for row in measured]
    return {
        "model": work.name, "levels": list(levels), "methods": list(recipes), "compensate": compensate,
        "heldout_samples": rows[0]["heldout_samples"] if rows else 0,
        "latency": {"batches": len(timing_batches), "runs": runs, "threads": rows[0]["threads"] if rows else None},
        "validation": {"atol": checks.atol, "rtol": checks.rtol},
        **({"quantize": list(int8.modes), "smooth": int8.smooth, "int8_alone": alone} if int8.modes else {}),
        "rows": rows,
    }


def _level(stages: Stages, stats: Any, recipe: Recipe, path: Path, dense: Path, timing: list[Any], runs: int,
           checks: ValidateOptions, int8: _Int8) -> list[dict[str, Any]]:
    """One level's rows: the masks of ``recipe`` (at its level) from ``stats``, squashed
    (``auto``), exported to ``path``, validated against the squashed PyTorch model,
    its held-out cost and its latency against ``dense``; then each mode of ``int8``
    (:func:`_int8_row`). The exports are removed after."""
    from ..calibration.calibrate import select
    from ..onnx.export import layer_metadata
    from ..onnx.latency import latency_ratio
    from ..onnx.quantize import model_bytes
    from .options import ExportOptions

    masks = select(stats, recipe, model=stages.work.model)
    squashed = stages.squash(masks, "auto")
    exported = stages.export(squashed.model, path, ExportOptions(), layer_metadata(squashed.report(), "auto"))
    checked = stages.validate(path, squashed.model, exported, checks)
    cost, _ = stages.cost(squashed.model)
    with stages.timer("latency"):
        speed = latency_ratio(dense, path, timing, io_spec=exported.io, runs=runs, warmup=min(3, runs))
    rows = [{**_row(masks, cost, speed, checked.max_abs), **({"quantize": "none", "size_bytes": model_bytes(path)} if int8.modes else {})}]
    for mode in int8.modes:
        rows.append(_int8_row(stages, squashed.model, mode, int8.smooth, exported, dense, timing, runs, checks)
                    | {"overall_sparsity": masks.overall_sparsity(), "heldout_samples": rows[0]["heldout_samples"]})
    path.unlink()
    return rows


def _int8_alone(stages: Stages, dense: Any, mode: str, timing: list[Any], runs: int) -> dict[str, Any]:
    """The dense export quantized by ``mode`` as onnxruntime's one call does it (no smoothing): its latency
    against the dense export and its cost against the dense PyTorch model on the held-out data."""
    return _quantized(stages, dense.path, dense.path.with_name(f"dense.{mode}.onnx"), mode, dense.io, dense.path, timing, runs)


def _quantized(stages: Stages, source: Path, out: Path, mode: str, io: Any, dense: Path, timing: list[Any], runs: int) -> dict[str, Any]:
    """The float export at ``source`` (inputs ``io``) quantized by ``mode`` to ``out`` (``int8-static``: ranges from the
    calibration data), then its row figures: its last output's cosine to the dense PyTorch model, accuracy / perplexity
    where the model has them, size, and its latency against the dense export at ``dense``."""
    from ..onnx.latency import latency_ratio
    from ..onnx.quantize import quantize_onnx, variant_costs

    work, target = stages.work, stages.target
    checked_io = target.validation_io(io)
    static = target.batches(work.require_calibration()) if mode == "int8-static" else None
    quantize_onnx(source, out, mode, calibration=static, io_spec=checked_io)
    cost = variant_costs(target.model(work.model), {mode: out}, target.batches(work.require_heldout()), io_spec=checked_io,
                         tokens=work.causal_lm, labels=work.labels)[mode]
    with stages.timer("latency"):
        speed = latency_ratio(dense, out, timing, io_spec=io, runs=runs, warmup=min(3, runs))
    last, measured = cost.outputs[-1], cost.to_json()
    return {"output": last["output"], "cosine_mean": last["cosine_mean"], "cosine_min": last["cosine_min"],
            **({"accuracy_dense": cost.dense_accuracy, "accuracy_sparse": cost.accuracy} if cost.accuracy is not None else {}),
            **({"perplexity_ratio": measured["perplexity_ratio"]} if cost.perplexity is not None else {}),
            "size_bytes": cost.size_bytes, "latency_ratio": speed["ratio"], "dense_ms": speed["dense_ms"],
            "sparse_ms": speed["sparse_ms"], "threads": speed["threads"]}


def _int8_row(stages: Stages, model: Any, mode: str, smooth: bool, exported: Any, dense: Path, timing: list[Any], runs: int,
              tolerance: ValidateOptions) -> dict[str, Any]:
    """The squashed ``model`` (its float export: ``exported``) quantized by ``mode``: smoothed first where
    ``smooth`` (exported beside it and validated strictly, as ``convert --quantize`` does; the model as it
    was after), then measured as :func:`_int8_alone` measures int8 alone; how many products were smoothed."""
    from ..bake.smooth import smoothed
    from .options import ExportOptions
    from .quantize import smoothing_plan
    from .workload import check_batches

    path = exported.path
    plan = smoothing_plan(model, stages.work.require_calibration(), mode) if smooth else None
    source, out = path, path.with_name(f"{path.stem}.{mode}.onnx")
    with smoothed(model, plan, check=check_batches(stages.work)) if plan is not None else contextlib.nullcontext(model):
        if plan is not None and plan.smoothed:
            source = path.with_name(f"{path.stem}.smoothed.onnx")
            stages.validate(source, model, stages.export(model, source, ExportOptions()), tolerance)
    row = _quantized(stages, source, out, mode, exported.io, dense, timing, runs)
    for done in {source, out} - {path}:
        done.unlink()
    return {**row, "quantize": mode, "smoothed": len(plan.smoothed) if plan is not None else 0}


def _row(masks: Any, cost: dict[str, Any], speed: dict[str, Any], max_abs_diff: float) -> dict[str, Any]:
    last = cost["outputs"][-1]
    row: dict[str, Any] = {
        "overall_sparsity": masks.overall_sparsity(),
        "output": last["output"], "cosine_mean": last["cosine_mean"], "cosine_min": last["cosine_min"],
        "heldout_samples": cost["heldout_samples"],
        "latency_ratio": speed["ratio"], "dense_ms": speed["dense_ms"], "sparse_ms": speed["sparse_ms"], "threads": speed["threads"],
        "onnx_max_abs_diff": max_abs_diff,
    }
    if "accuracy_sparse" in cost:
        row["accuracy_dense"], row["accuracy_sparse"] = cost["accuracy_dense"], cost["accuracy_sparse"]
    if "other_text" in cost:
        row["other_text"] = cost["other_text"]
    return row


@contextlib.contextmanager
def _without_mplbackend() -> Iterator[None]:
    """``MPLBACKEND`` hidden while matplotlib is first imported: it names an
    interactive backend, which a plot written to a file never uses, and a
    name matplotlib does not know stops its import."""
    saved = os.environ.pop("MPLBACKEND", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["MPLBACKEND"] = saved


def plot_sweep(result: dict[str, Any], path: Path) -> None:
    """Cost (accuracy where known, else mean cosine) against sparsity per method;
    the latency ratio to dense on a second axis (dashed). With int8 rows, a second
    panel: cost against latency, every method and mode, the dense model and int8 alone
    marked. Drawn with matplotlib's Agg canvas: no backend, display or pyplot state involved."""
    with _without_mplbackend():
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

    rows = result["rows"]
    accuracy = bool(rows) and all("accuracy_sparse" in r for r in rows)
    key, label = ("accuracy_sparse", "held-out accuracy") if accuracy else ("cosine_mean", "held-out cosine to dense (mean)")
    quantized = bool(result.get("int8_alone"))
    fig = Figure(figsize=(13, 4.5) if quantized else (7, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2) if quantized else [fig.subplots()]
    ax = axes[0]
    latency = ax.twinx()
    for i, method in enumerate(result["methods"]):
        mine = sorted((r for r in rows if r["method"] == method and r.get("quantize", "none") == "none"), key=lambda r: r["level"])
        color = f"C{i}"
        ax.plot([r["level"] for r in mine], [r[key] for r in mine], "o-", color=color, label=f"{method}: {label.split(' (')[0]}")
        latency.plot([r["level"] for r in mine], [r["latency_ratio"] for r in mine], "s--", color=color, alpha=0.6,
                     label=f"{method}: latency / dense")
    ax.set_xlabel("sparsity level (fraction of the recipe layers' input features masked)")
    ax.set_ylabel(label)
    latency.set_ylabel("onnxruntime latency / dense")
    ax.set_title(f"{result['model']}: cost and latency per sparsity level{' (float)' if quantized else ''}")
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = latency.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    if quantized:
        _plot_frontier(axes[1], result, key, label)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")


def _plot_frontier(ax: Any, result: dict[str, Any], key: str, label: str) -> None:
    """Cost against latency: one line per method and mode (float: ``none``) through its levels, the
    dense model at 1.00x and each int8 mode alone (the dense export quantized) as the reference points."""
    rows = result["rows"]
    dense = rows[0]["accuracy_dense"] if key == "accuracy_sparse" else 1.0
    ax.plot([1.0], [dense], "k*", markersize=12, label="dense")
    for j, (mode, alone) in enumerate(result["int8_alone"].items()):
        ax.plot([alone["latency_ratio"]], [alone[key]], "P", color="black", alpha=0.5 + 0.5 * (j == 0), markersize=11,
                label=f"{mode} alone (the dense export)")
    for i, method in enumerate(result["methods"]):
        for k, mode in enumerate(["none", *result["quantize"]]):
            mine = sorted((r for r in rows if r["method"] == method and r.get("quantize") == mode), key=lambda r: r["level"])
            ax.plot([r["latency_ratio"] for r in mine], [r[key] for r in mine], ("o-", "s--", "^:")[k % 3], color=f"C{i}",
                    label=f"{method}{'' if mode == 'none' else ' + ' + mode}")
    ax.set_xlabel("onnxruntime latency / dense (lower is faster)")
    ax.set_ylabel(label)
    ax.set_title("what each choice costs against what it saves")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
