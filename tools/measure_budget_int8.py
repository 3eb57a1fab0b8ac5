"""Measure ``convert --quantize int8 --max-cost``: one budget across sparsity and int8, and the frontier it reports.

For each ``MODEL=BUDGET`` pair the real command runs (``actsparse convert MODEL
--quantize int8 --max-cost BUDGET --json --threads 1``; its own recipe and data).
Printed per run: the budget search (int8 alone on the tuning split, the budget the
sparsity was searched to, the searches, the int8 model's tuning cost), the overall
sparsity, the held-out cost of the int8 model against the budget, and the report's
frontier (dense export / int8 alone / sparse / sparse + int8: latency over the dense
export on the held-out batches, cost against the dense PyTorch model, size).

    python tools/measure_budget_int8.py                       # minilm cosine=0.98, tiny-lm perplexity-ratio=1.03, digits-mlp
    python tools/measure_budget_int8.py digits-mlp=cosine=0.99 --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from actsparse_deploy.app.render import size  # a digits model is 20-70 KB, not "0.0 MB"

DEFAULT_RUNS = ("minilm=cosine=0.98", "tiny-lm=perplexity-ratio=1.03", "digits-mlp=accuracy-drop=0.01")


def run(model: str, budget: str, out: Path) -> dict[str, Any]:
    """The command's report; where it failed (exit 10: the int8 model over the budget on the held-out data), its exit code and message."""
    command = [sys.executable, "-m", "actsparse_deploy", "convert", model, "-o", str(out), "--json", "--threads", "1",
               "--quantize", "int8", "--max-cost", budget]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"exit": proc.returncode, "error": proc.stderr.strip()}
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def _cost(row: dict[str, Any]) -> str:
    parts = []
    if "perplexity_ratio" in row:
        parts.append(f"perplexity x{row['perplexity_ratio']:.4f}")
    if "accuracy" in row:
        parts.append(f"accuracy {row['accuracy']:.4f}")
    shown = next((o for o in row["outputs"] if o.get("output") == "logits"), row["outputs"][-1])
    parts.append(f"cosine {shown['cosine_mean']:.4f} / {shown['cosine_min']:.4f}")
    return ", ".join(parts)


def table(model: str, budget: str, report: dict[str, Any]) -> str:
    if "error" in report:
        return f"### {model}, --quantize int8 --max-cost {budget}\n\nexit {report['exit']}: {report['error']}"
    search, kept = report["budget"], report["quantization"].get("budget", {})
    q = search.get("quantization", {})
    lines = [f"### {model}, --quantize int8 --max-cost {budget}", "",
             f"- int8 alone on the tuning split: {q.get('share')}; sparsity searched to {q.get('searched_budget')} "
             f"in {q.get('searches')} search(es); the int8 model on the tuning split: {q.get('int8_tuning_cost')}",
             f"- overall sparsity {report['overall_sparsity']:.3f}; held-out cost of the int8 model: {kept.get('heldout_cost')} "
             f"(within: {kept.get('within')})", "",
             "| variant | latency / dense | decode ms/token (/ dense) | cost against dense PyTorch (mean / worst) | on the other text | size |",
             "|---|---|---|---|---|---|"]
    for row in report["quantization"].get("frontier") or []:
        other = _cost(row["other_text"]) if "other_text" in row else "-"
        decode = f"{row['decode_ms_per_token']:.2f} ({row['decode_ratio']:.3f}x)" if "decode_ratio" in row else "-"
        lines.append(f"| {row['variant']} | {row['latency_ratio']:.3f}x | {decode} | {_cost(row)} | {other} | {size(row['size_bytes'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", default=list(DEFAULT_RUNS), help="MODEL=BUDGET, e.g. minilm=cosine=0.98")
    parser.add_argument("--json", type=Path, help="write every report here")
    args = parser.parse_args()
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(args.runs):
            model, _, budget = spec.partition("=")
            reports[spec] = run(model, budget, Path(tmp) / str(i))
            print(table(model, budget, reports[spec]), "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()
