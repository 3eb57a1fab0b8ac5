"""Measure the frontier a user chooses from: dense / int8 alone / sparse / sparse + int8.

For each built-in model: the real command converts it (``actsparse convert NAME --json
--threads 1``: its own recipe, the sparse ONNX model), the dense model is exported the
same way (the converted model's exporter and opset; a causal LM as its decoder with a KV
cache), and both float exports are quantized by
:func:`actsparse_deploy.onnx.quantize.quantize_onnx` (``--mode``, default ``int8``).
Then, on the held-out batches as the ONNX models take them (a decoder's: first steps,
an empty cache), one thread:

- latency: the four ONNX files alternated on the first ``--samples`` held-out samples
  (:func:`actsparse_deploy.onnx.latency.latencies`, median of ``--runs``), each over dense;
- cost against the dense PyTorch model (:func:`actsparse_deploy.onnx.quantize.variant_costs`):
  MiniLM the sentence embedding's mean cosine, tiny-lm the perplexity ratio, the digits
  MLP the accuracy; and each int8 model's cosine to its float source;
- size on disk (the model with its external data).

Prints a Markdown table and, with ``--json``, writes every figure.

    python tools/measure_quantize.py                                 # minilm, tiny-lm, digits-mlp
    python tools/measure_quantize.py --models digits-mlp --runs 9 --json frontier.json
    python tools/measure_quantize.py --models minilm tiny-lm --tokens 128   # timed on 8 x 128 tokens
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

VARIANTS = ("dense", "int8", "sparse", "sparse+int8")
REFERENCES = {"int8": "dense", "sparse+int8": "sparse"}


def convert(model: str, out: Path) -> dict[str, Any]:
    """The command's own conversion of ``model`` into ``out``, one thread; its report."""
    command = [sys.executable, "-m", "actsparse_deploy", "convert", model, "-o", str(out), "--json", "--threads", "1"]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"convert {model} failed ({proc.returncode}): {proc.stderr.strip()}")
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def long_batches(batches: Any, tokens: int, rows: int = 8) -> list[dict[str, Any]]:
    """Latency batches of ``rows`` x ``tokens`` token ids: the held-out batches' real tokens one
    after another, cut into rows (sentences run into each other: the timing does not read them)."""
    import torch

    stream = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches])
    count = len(stream) // tokens
    ids = stream[: count * tokens].reshape(count, tokens)
    return [{"input_ids": ids[i:i + rows], "attention_mask": torch.ones_like(ids[i:i + rows])} for i in range(0, count - rows + 1, rows)]


def exports(model: str, folder: Path, mode: str, tokens: int | None = None) -> tuple[Any, dict[str, Path], dict[str, Any], dict[str, Any]]:
    """The model converted, its dense export beside it, both quantized: the workload's
    pieces (dense model as exported, held-out batches as the ONNX takes them, I/O spec, labels,
    task, the batches timed: the held-out ones, or with ``tokens`` rows of that many tokens),
    the four files, the report and the quantizers' results."""
    from actsparse_deploy.app.workload import load_workload
    from actsparse_deploy.models.decoder import export_target
    from actsparse_deploy.onnx.export import export_onnx
    from actsparse_deploy.onnx.quantize import quantize_onnx

    report = convert(model, folder / "sparse")
    work = load_workload(model)
    target = export_target(work, None)
    dense = target.model(work.model)
    exported = export_onnx(dense, target.example(work), folder / "dense.onnx", exporter=report["export"]["exporter"],
                           opset=report["export"]["opset"], io_spec=target.io(work))
    held = list(target.batches(work.require_heldout()))
    io = target.validation_io(exported.io)
    files = {"dense": folder / "dense.onnx", "sparse": folder / "sparse" / "model.onnx"}
    calibration = list(target.batches(work.calibration)) if mode == "int8-static" else None
    quantized = {}
    for name, source in (("int8", files["dense"]), ("sparse+int8", files["sparse"])):
        files[name] = folder / f"{name.replace('+', '-')}.onnx"
        quantized[name] = quantize_onnx(source, files[name], mode, calibration=calibration, io_spec=io).to_json()
    task = work.builtin.task if work.builtin is not None else work.task
    timed = list(target.batches(long_batches(work.require_heldout(), tokens))) if tokens else held
    return (dense, held, io, work.labels, task, timed), {v: files[v] for v in VARIANTS}, report, quantized


def measure(model: str, folder: Path, mode: str, samples: int, runs: int, warmup: int, tokens: int | None = None) -> dict[str, Any]:
    """Every figure of one model's four variants."""
    from actsparse_deploy.base.threads import use_threads
    from actsparse_deploy.data.batches import head_samples
    from actsparse_deploy.onnx.latency import latencies
    from actsparse_deploy.onnx.quantize import variant_costs

    (dense, held, io, labels, task, timed), files, report, quantized = exports(model, folder, mode, tokens)
    with use_threads(1):
        costs = variant_costs(dense, files, held, references=REFERENCES, io_spec=io, tokens=task == "causal-lm",
                              labels=labels)
        speed = latencies(files, list(head_samples(timed, samples)), io_spec=io, threads=1, warmup=warmup, runs=runs)
    return {"model": model, "task": task, "overall_sparsity": report["overall_sparsity"], "latency": speed,
            "costs": {name: cost.to_json() for name, cost in costs.items()}, "quantize": quantized,
            "convert_latency_ratio": report["latency"]["ratio"]}


def cost_cell(row: dict[str, Any], variant: str) -> str:
    cost = row["costs"][variant]
    if row["task"] == "causal-lm":
        return f"perplexity x{cost['perplexity_ratio']:.4f}"
    if "accuracy" in cost:
        return f"accuracy {cost['accuracy']:.4f}"
    last = cost["outputs"][-1]
    return f"cosine {last['cosine_mean']:.4f} / {last['cosine_min']:.3f}"


def size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | variant | latency / dense | ms | cost (mean / worst) | to its float source | size |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        speed = row["latency"]
        for variant in VARIANTS:
            cost = row["costs"][variant]
            source = cost.get("against_reference")
            to_source = f"cosine {source[0 if row['task'] == 'causal-lm' else -1]['cosine_mean']:.4f}" if source else "-"
            lines.append(
                f"| {row['model']} | {variant} | {speed['ratio'][variant]:.3f}x | {speed['ms'][variant]:.4g} | "
                f"{cost_cell(row, variant)} | {to_source} | {size(cost['size_bytes'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "tiny-lm", "digits-mlp"])
    parser.add_argument("--mode", default="int8", choices=["int8", "int8-static"])
    parser.add_argument("--samples", type=int, default=64, help="held-out samples timed (the convert command's 64)")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tokens", type=int, help="time rows of this many tokens (8 per batch) instead of the held-out batches")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            folder = Path(tmp) / model
            folder.mkdir()
            rows.append(measure(model, folder, args.mode, args.samples, args.runs, args.warmup, args.tokens if model != "digits-mlp" else None))
            print(f"{model}: done", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
