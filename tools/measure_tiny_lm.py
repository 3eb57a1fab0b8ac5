"""Measure what sparsity costs ``tiny-lm``: held-out perplexity and onnxruntime latency.

For each sparsity level and squash mode, runs the real command

    python -m actsparse_deploy convert tiny-lm -o DIR --sparsity S --mode M --json

and reads its ``report.json``: the held-out perplexity of the dense, the sparse
(PyTorch) and the exported (onnxruntime) model, and ``convert``'s own latency
measurement (dense and converted ONNX model, alternated, median; its threads).
Prints a Markdown table (the README's) and, with ``--json``, writes the rows.

    OMP_NUM_THREADS=1 python tools/measure_tiny_lm.py
    OMP_NUM_THREADS=1 python tools/measure_tiny_lm.py --levels 0.25 0.5 --modes prune fold --json rows.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def measure(level: float, mode: str, extra: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        command = [sys.executable, "-m", "actsparse_deploy", "convert", "tiny-lm", "-o", str(out),
                   "--sparsity", str(level), "--mode", mode, "--json", *extra]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(command[1:])} failed ({proc.returncode}): {proc.stderr.strip()}")
        report = json.loads((out / "report.json").read_text())
    cost, latency = report["cost"], report.get("latency") or {}
    return {
        "sparsity": level,
        "mode": mode,
        "modes": sorted({row.get("mode") for row in report["layers"]}),
        "exporter": report["export"]["exporter"],
        "perplexity_dense": cost["perplexity_dense"],
        "perplexity_sparse": cost["perplexity_sparse"],
        "perplexity_onnx": cost.get("perplexity_onnx"),
        "dense_ms": latency.get("dense_ms"),
        "sparse_ms": latency.get("sparse_ms"),
        "latency_ratio": latency.get("ratio"),
        "threads": latency.get("threads"),
        "command": " ".join(["actsparse", *command[3:5], "-o", "OUT", *command[7:]]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=float, nargs="*", default=[0.25, 0.5])
    parser.add_argument("--modes", nargs="*", default=["prune", "fold"])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("extra", nargs="*", help="more convert options, after --")
    args = parser.parse_args()
    rows = [measure(level, mode, args.extra) for level in args.levels for mode in args.modes]
    print(f"dense held-out perplexity: {rows[0]['perplexity_dense']:.3f}\n")
    print("| sparsity | mode | perplexity (PyTorch / ONNX) | x dense | ONNX latency dense -> converted | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        latency = f"{r['dense_ms']:.1f} ms -> {r['sparse_ms']:.1f} ms" if r["dense_ms"] is not None else "-"
        ratio = f"{r['latency_ratio']:.3f}x" if r["latency_ratio"] is not None else "-"
        got = "/".join(r["modes"])
        mode = r["mode"] if got == r["mode"] else f"{r['mode']} ({got})"
        print(f"| {r['sparsity']:.0%} | {mode} | {r['perplexity_sparse']:.3f} / {r['perplexity_onnx']:.3f} "
              f"| {r['perplexity_sparse'] / r['perplexity_dense']:.3f} | {latency} | {ratio} |")
    print(f"\nlatency: convert's own measurement ({rows[0]['threads']} thread(s)); exporter {rows[0]['exporter']}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
