"""Which ``lstsq`` refit generalises: ridge towards zero or towards the original
weights, a fixed damping or one chosen per layer by cross-validation (issue 21).

For MiniLM and tiny-lm, the built-in recipe's layers and method (``obs``
masks, selected once per level from the calibration statistics), four refits
of each masked layer's kept columns and bias:

* ``zero``: ``[W', b'] = W G[:, K'] (G[K', K'] + l I)^-1``, the ridge pulls towards
  zero (the refit before issue 21), ``l = damping * mean(diag(G[K', K']))``;
* ``original``: ``(W G[:, K'] + l W_K') (G[K', K'] + l I)^-1``, the ridge pulls
  towards the original weights (:func:`~actsparse_deploy.calibration.compensate.compensate`);
* ``gcv``: ``original`` with the damping of each layer chosen by generalised
  cross-validation on the calibration statistics
  (:func:`~actsparse_deploy.calibration.compensate.lstsq_refit`, the default);
* ``kfold``: ``original`` with the damping chosen by k-fold cross-validation
  over the calibration batches (one Gram matrix per fold: what GCV approximates
  from one Gram matrix).

For reference (``--refits none bias ...``): the mask alone, and ``bias``
compensation (the removed features' mean moved into the bias).

Each on the held-out data and on the built-ins' second source, text of another
kind than the calibration and held-out data (MiniLM: ``work.builtin.other_data``,
what ``convert`` reports as ``cost.other_text``; tiny-lm, which has none: the
same sentences, tokenized by tiny-lm's tokenizer, in rows of 64 tokens). MiniLM:
the sentence-embedding cosine to the dense model, mean / worst; tiny-lm:
next-token perplexity / the mean KL divergence of the next-token distribution
from the dense model's (on the other text, far from the Python documentation
tiny-lm knows, the dense perplexity is in the thousands and masking can lower
it: the divergence says how far the model moved). The masked model runs in ``mul`` mode with
the refit's weight and bias. One torch thread; about two minutes in all.

    python tools/measure_refit.py
    python tools/measure_refit.py --models tiny-lm --levels 0.5 --damping 0.001 0.01
    python tools/measure_refit.py --json refit.json
    python tools/measure_refit.py --refits none bias gcv         # what the refit adds at all
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, replace
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from torch import nn

from actsparse_deploy import Masks, Recipe, collect, select
from actsparse_deploy.app.workload import load_workload
from actsparse_deploy.bake.squash import squash
from actsparse_deploy.calibration.compensate import DAMPING_GRID, compensate, lstsq_refit
from actsparse_deploy.calibration.functions import LayerStats, RunningStat
from actsparse_deploy.calibration.methods import DEFAULT_DAMPING, gram_matrix, weight_columns
from actsparse_deploy.calibration.stats import Statistics
from actsparse_deploy.data.batches import run_batch
from actsparse_deploy.models.zoo import builtin_recipe_path
from actsparse_deploy.nn.modules import eval_mode
from actsparse_deploy.onnx.metrics import perplexity

REFITS = ("zero", "original", "gcv", "kfold")
#: for reference, not run unless asked: the mask alone, and ``bias`` compensation
REFERENCES = ("none", "bias")


@dataclass
class Setup:
    name: str
    model: nn.Module
    calibration: list[Any]
    heldout: list[Any]
    other: list[Any]
    dense: dict[str, Any]


def load(name: str) -> Setup:
    """The built-in, its calibration and held-out batches, its other text, and the dense model's figures."""
    work = load_workload(name)
    model, heldout = work.model, list(work.require_heldout())
    calibration = list(work.require_calibration())
    builtin = work.builtin
    if builtin is not None and builtin.other_data is not None:
        other = list(builtin.other_data(builtin.batch_size))
    else:  # tiny-lm: MiniLM's other sentences in tiny-lm's tokens
        from actsparse_deploy.models.minilm import english_sentences
        from actsparse_deploy.models.tinylm import SEQ_LEN, encode_texts, load_tokenizer

        stream = encode_texts(english_sentences("other"), load_tokenizer())
        rows = stream[: len(stream) // SEQ_LEN * SEQ_LEN].reshape(-1, SEQ_LEN)
        other = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows.split(8)]
    setup = Setup(name, model, calibration, heldout, other, {})
    setup.dense = {"heldout": _outputs(setup, model, heldout), "other": _outputs(setup, model, other)}
    return setup


def _outputs(setup: Setup, model: nn.Module, batches: list[Any]) -> Any:
    """tiny-lm: perplexity and the next-token log-probabilities; MiniLM: the sentence embeddings."""
    with eval_mode(model), torch.no_grad():
        if setup.name == "tiny-lm":
            return perplexity(model, batches), [torch.log_softmax(run_batch(model, b), dim=-1) for b in batches]
        return torch.cat([run_batch(model, b)[1] for b in batches])


def score(setup: Setup, model: nn.Module) -> dict[str, Any]:
    """Per text: perplexity (tiny-lm) or the cosine to the dense embeddings, mean and worst."""
    out: dict[str, Any] = {}
    for text in ("heldout", "other"):
        got = _outputs(setup, model, getattr(setup, text))
        if setup.name == "tiny-lm":  # and the mean KL divergence of the next-token distributions from the dense model's
            kl = [nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1) for q, p in zip(got[1], setup.dense[text][1])]
            out[text] = {"perplexity": got[0], "kl": float(torch.cat([k.flatten() for k in kl]).mean())}
        else:
            cos = nn.functional.cosine_similarity(got, setup.dense[text], dim=-1)
            out[text] = {"mean": float(cos.mean()), "worst": float(cos.min())}
    return out


# --- the refits ---------------------------------------------------------------------


def ridge_to_zero(layer: nn.Module, ls: LayerStats, mask: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The refit before issue 21: ``W G[:, K'] (G[K', K'] + l I)^-1``."""
    g = gram_matrix(ls)
    d = g.shape[0] - 1
    augmented = _augmented(layer)
    kept = torch.cat([(mask.reshape(-1) != 0).nonzero().flatten(), torch.tensor([d])])
    block = g[kept][:, kept]
    lhs = block + damping * float(block.diagonal().mean()) * torch.eye(len(kept), dtype=g.dtype)
    new = torch.zeros_like(augmented)
    new[:, kept] = torch.linalg.solve(lhs, augmented @ g[:, kept], left=False)
    return new[:, :d].to(layer.weight.dtype), new[:, d].to(layer.weight.dtype)


def _augmented(layer: nn.Module) -> torch.Tensor:
    columns = weight_columns(layer)[:, :, 0]
    bias = layer.bias if getattr(layer, "bias", None) is not None else torch.zeros(columns.shape[0])
    return torch.cat([columns, bias.detach().to(columns.dtype)[:, None]], dim=1)


def kfold_damping(layer: nn.Module, total: LayerStats, folds: list[LayerStats], mask: torch.Tensor) -> float:
    """The damping of the grid whose ridge-to-original refit, fit on all folds
    but one, leaves the least output error on the one left out, summed over folds."""
    errors = [0.0] * len(DAMPING_GRID)
    whole = _sum(total)
    for fold in folds:
        held = _sum(fold)
        rest = LayerStats(RunningStat(whole.value - held.value, whole.count - held.count, "sum"), total.input_shape, aggregate="gram")
        g_held = held.per_sample.to(torch.float64)
        for i, damping in enumerate(DAMPING_GRID):
            weight, bias = compensate(layer, rest, mask, "lstsq", damping)
            error = _augmented(layer) - torch.cat([weight.double(), bias.double()[:, None]], dim=1)
            errors[i] += float((error @ g_held * error).sum()) * held.count
    return DAMPING_GRID[min(range(len(errors)), key=errors.__getitem__)]


def _sum(ls: LayerStats) -> RunningStat:
    assert isinstance(ls.stat, RunningStat)
    return ls.stat


def refit_masks(setup: Setup, masks: Masks, refit: str, damping: float, total: Statistics,
                folds: list[Statistics]) -> tuple[Masks, dict[str, float]]:
    """``masks`` with each layer's refit (its weight and bias) and the damping each layer got."""
    layers, chosen = {}, {}
    for name, lm in masks.layers.items():
        layer, ls, mask = setup.model.get_submodule(name), total[name], lm.dense().reshape(-1)
        if refit in ("none", "bias"):
            weight, bias = compensate(layer, ls, mask, refit)
        elif refit == "zero":
            weight, bias = ridge_to_zero(layer, ls, mask, damping)
        elif refit == "gcv":
            weight, bias, damping = lstsq_refit(layer, ls, mask)
        else:
            if refit == "kfold":
                damping = kfold_damping(layer, ls, [f[name] for f in folds], mask)
            weight, bias = compensate(layer, ls, mask, "lstsq", damping)
        layers[name], chosen[name] = replace(lm, weight=weight, bias=bias, compensate="lstsq" if refit in REFITS else refit), damping
    return Masks(layers=layers, recipe=masks.recipe), chosen


# --- the table ----------------------------------------------------------------------


def measure(name: str, levels: list[float], dampings: list[float], n_folds: int, refits: list[str]) -> list[dict[str, Any]]:
    start = time.perf_counter()
    setup = load(name)
    recipe = Recipe.load(builtin_recipe_path(name))
    chosen = recipe.with_method("obs", "lstsq")
    parts = [setup.calibration[i::n_folds] for i in range(n_folds)]
    folds = [collect(setup.model, chosen, part) for part in parts]
    total = folds[0]
    for fold in folds[1:]:
        total = total.merge(fold)
    print(f"\n{name}: {total.num_samples} calibration samples in {n_folds} folds; dense {_dense(setup)}; "
          f"loaded and collected in {time.perf_counter() - start:.0f} s")
    print(f"{'level':>6} {'refit':<9} {'damping':<8} {'held-out':<18} {'other text':<18} dampings chosen per layer")
    rows = []
    for level in levels:
        masks = select(total, chosen.with_sparsity(level).with_method("obs", "none"), model=setup.model)
        for refit in refits:
            for damping in (dampings if refit in ("zero", "original") else [None]):  # None: chosen (or none)
                refitted, per_layer = refit_masks(setup, masks, refit, DEFAULT_DAMPING if damping is None else damping, total, folds)
                figures = score(setup, squash(setup.model, refitted, "mul").model)  # each layer's edits, its input masked
                row = {"model": name, "level": level, "refit": refit, "damping": damping,
                       "layers": per_layer if refit in REFITS else None, **figures}
                rows.append(row)
                chosen_by = "cv" if refit in ("gcv", "kfold") else "-"
                shown = " ".join(f"{v:g}" for v in per_layer.values()) if chosen_by == "cv" else ""
                print(f"{level:>6.0%} {refit:<9} {chosen_by if damping is None else f'{damping:g}':<8} "
                      f"{_figure(figures['heldout']):<18} {_figure(figures['other']):<18} {shown}", flush=True)
    return rows


def _dense(setup: Setup) -> str:
    if setup.name == "tiny-lm":
        return f"perplexity held-out {setup.dense['heldout'][0]:.3f}, other text {setup.dense['other'][0]:.3f}"
    return f"{len(setup.dense['heldout'])} held-out and {len(setup.dense['other'])} other sentences"


def _figure(figures: dict[str, float]) -> str:
    if "perplexity" in figures:
        return f"{figures['perplexity']:.3f} / {figures['kl']:.4f}"
    return f"{figures['mean']:.4f} / {figures['worst']:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "tiny-lm"])
    parser.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--damping", type=float, nargs="+", default=[DEFAULT_DAMPING], help="fixed dampings of zero and original")
    parser.add_argument("--refits", nargs="+", choices=REFERENCES + REFITS, default=list(REFITS))
    parser.add_argument("--folds", type=int, default=4, help="folds of kfold (batches dealt round robin)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = [row for name in args.models for row in measure(name, args.levels, args.damping, args.folds, args.refits)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
