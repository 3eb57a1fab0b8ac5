"""Measure attention heads beside MLP features: MiniLM converted with and without ``--heads``.

Each run is the real ``actsparse convert minilm`` (one thread, onnxruntime latency on
the held-out sentences), at a fixed level or to a cost budget, with and without
``--heads``; printed per run: the latency over dense, the sentence embedding's cosine to
the dense model (mean / worst) on the held-out sentences (the calibration text's source)
and on the built-in other text (another source), the share of MLP features and of
attention heads removed, and for a budget the heads kept per layer.

    python tools/measure_heads.py                                   # 0.25 and cosine=0.98, each with and without --heads
    python tools/measure_heads.py --runs 0.25 cosine=0.98 --json heads.json
    python tools/measure_heads.py --runs cosine=0.98 --extra --method wanda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def run_convert(model: str, flags: list[str], out: Path) -> dict[str, Any]:
    """``actsparse convert MODEL FLAGS`` on one thread into ``out``, its report (a failure ends the script, saying why)."""
    command = [sys.executable, "-m", "actsparse_deploy", "convert", model, *flags, "--threads", "1", "-o", str(out), "--json", "--overwrite"]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"convert {model} {' '.join(flags)} failed ({proc.returncode}): {proc.stderr.strip()}")
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def convert(run: str, heads: bool, out: Path, extra: list[str]) -> dict[str, Any]:
    """``actsparse convert minilm`` at level or budget ``run`` (``0.25`` or ``cosine=0.98``), its report."""
    level = ["--max-cost", run] if "=" in run else ["--sparsity", run]
    return run_convert("minilm", [*level, *(["--heads"] if heads else []), *extra], out)


def _sentence(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(o for o in outputs if o["output"] == "sentence_embedding")


def row(run: str, heads: bool, report: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run."""
    layers = report["layers"]
    mlp = [r for r in layers if "attention" not in r["layer"]]
    attention = [r for r in layers if "attention" in r["layer"]]
    held, other = _sentence(report["cost"]["outputs"]), _sentence(report["cost"]["other_text"]["outputs"])
    budget = report.get("budget") or {}
    return {
        "run": run, "heads": heads, "latency": round(report["latency"]["ratio"], 3),
        "heldout_mean": round(held["cosine_mean"], 4), "heldout_worst": round(held["cosine_min"], 3),
        "other_mean": round(other["cosine_mean"], 4), "other_worst": round(other["cosine_min"], 3),
        "mlp_sparsity": round(sum(r["sparsity"] for r in mlp) / len(mlp), 3),
        "heads_removed": [round(r["sparsity"] * 12) for r in attention],
        "heldout_within": budget.get("heldout_within"), "seconds": round(report["seconds"].get("total", 0.0), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["0.25", "cosine=0.98"], help="levels (0.25) or budgets (cosine=0.98)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more convert options, for every run")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    rows = []
    print("| run | heads | latency / dense | held-out mean / worst | other text mean / worst | MLP sparsity | heads removed per layer | budget held-out |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            for heads in (False, True):
                r = row(run, heads, convert(run, heads, Path(tmp) / "out", args.extra))
                rows.append(r)
                print(f"| {run} | {'yes' if heads else 'no'} | {r['latency']:.3f}x | {r['heldout_mean']:.4f} / {r['heldout_worst']:.3f} | "
                      f"{r['other_mean']:.4f} / {r['other_worst']:.3f} | {r['mlp_sparsity']:.1%} | {r['heads_removed'] or '-'} | "
                      f"{'' if r['heldout_within'] is None else 'within' if r['heldout_within'] else 'MISSED'} |", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
