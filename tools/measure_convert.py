"""Measure `actsparse convert` on every built-in model with both exporters.

For each (model, exporter): the wall time of the real command (a subprocess,
imports included), the export time, the ONNX-vs-PyTorch max abs diff, the
sparsity, the accuracy / cosine cost from report.json, the ONNX file size, and
the onnxruntime latency of the exported model (median of timed runs after
warm-up, one thread) on a fixed held-out batch: the figures behind the choice
of the default exporter.

    python tools/measure_convert.py                    # table on stdout
    python tools/measure_convert.py --json out.json    # and the rows as JSON
    python tools/measure_convert.py --models digits-cnn --runs 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from actsparse_deploy.data.batches import resize_batches
from actsparse_deploy.models import zoo

EXPORTERS = ("torchscript", "dynamo")


def ort_latency_ms(path: Path, model: str, batch: int, runs: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    piece = resize_batches(zoo.heldout_batches(model), batch, batch)[0]
    names = [i.name for i in session.get_inputs()]
    feeds = {n: t.numpy() for n, t in piece.items()} if isinstance(piece, dict) else {names[0]: piece.numpy()}
    for _ in range(5):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(model: str, exporter: str, runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "actsparse_deploy", "convert", model, "-o", str(out), "--exporter", exporter, "--json"],
            capture_output=True, text=True, check=False,
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"convert {model} --exporter {exporter} failed: {proc.stderr.strip()}")
        report = json.loads(proc.stdout)
        row: dict[str, Any] = {
            "model": model,
            "exporter": exporter,
            "convert_wall_s": round(wall, 2),
            "export_s": report["export"]["seconds"],
            "ort_max_abs_diff": report["validation"]["max_abs_diff"],
            "sparsity": round(report["overall_sparsity"], 4),
            "onnx_mb": round(report["files"]["model.onnx"] / 2**20, 2),
            "ort_ms_batch8": round(ort_latency_ms(out / "model.onnx", model, 8, runs), 3),
        }
        cost = report["cost"]
        if "accuracy_dense" in cost:
            row["cost"] = f"accuracy {cost['accuracy_dense']:.4f} -> {cost['accuracy_sparse']:.4f}"
        else:
            sentence = {o["output"]: o for o in cost["outputs"]}["sentence_embedding"]
            row["cost"] = f"cosine mean {sentence['cosine_mean']:.4f} worst {sentence['cosine_min']:.4f}"
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=zoo.builtin_names())
    parser.add_argument("--runs", type=int, default=30, help="timed onnxruntime runs per model")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = [measure(model, exporter, args.runs) for model in args.models for exporter in EXPORTERS]
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
