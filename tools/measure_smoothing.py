"""Measure what smoothing before int8 changes: the real ``convert --quantize MODE``, with and without ``--no-smooth``.

For each built-in model and each mode (``int8``, ``int8-static``), the command converts it twice
(``actsparse convert NAME --quantize MODE [--no-smooth] --json --threads 1``: its own recipe, one
thread) and this reads each run's ``report.json``: the sparse int8 model's latency against the dense
export (the frontier's, alternated with the others in the same run), its cost against the dense
PyTorch model on the held-out data (MiniLM: the sentence embedding's mean cosine; tiny-lm: the
perplexity ratio; the digits MLP: accuracy), its closeness to its float source (the sentence
embedding's or the logits' mean cosine: the quantization's own share), and how many matrix
products were smoothed. Prints a Markdown table; ``--json`` writes every row.

    python tools/measure_smoothing.py                                 # minilm, tiny-lm; int8 and int8-static
    python tools/measure_smoothing.py --models minilm --modes int8-static --json smoothing.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def convert(model: str, mode: str, smooth: bool, out: Path) -> dict[str, Any]:
    """The command's ``convert MODEL --quantize MODE`` into ``out`` (``--no-smooth`` where not ``smooth``); its report."""
    command = [sys.executable, "-m", "actsparse_deploy", "convert", model, "-o", str(out), "--json", "--threads", "1",
               "--quantize", mode, *([] if smooth else ["--no-smooth"])]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"convert {model} --quantize {mode} failed ({proc.returncode}): {proc.stderr.strip()}")
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def cost(row: dict[str, Any]) -> str:
    """A frontier row's cost against the dense model, in the model's own figure."""
    if row.get("perplexity_ratio") is not None:
        return f"perplexity x{row['perplexity_ratio']:.4f}"
    if row.get("accuracy") is not None:
        return f"accuracy {row['accuracy']:.4f}"
    return f"cosine {row['outputs'][-1]['cosine_mean']:.4f}"


def measure(model: str, mode: str, smooth: bool, folder: Path) -> dict[str, Any]:
    report = convert(model, mode, smooth, folder / f"{model}-{mode}-{'smooth' if smooth else 'plain'}")
    q = report["quantization"]
    rows = {row["variant"]: row for row in q["frontier"]}
    stacked = rows["sparse+int8"]
    return {"model": model, "mode": mode, "smooth": smooth, "smoothed": (q.get("smoothing") or {}).get("smoothed", 0),
            "products": len((q.get("smoothing") or {}).get("layers", [])), "latency_ratio": stacked["latency_ratio"],
            "int8_alone_latency_ratio": rows["int8"]["latency_ratio"], "cost": cost(stacked), "int8_alone_cost": cost(rows["int8"]),
            "to_float_source": stacked["against_reference"][-1]["cosine_mean"], "seconds": report["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "tiny-lm"])
    parser.add_argument("--modes", nargs="+", default=["int8", "int8-static"])
    parser.add_argument("--json", type=Path, help="write every row here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for mode in args.modes:
                for smooth in (False, True):
                    rows.append(measure(model, mode, smooth, Path(tmp)))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| model | mode | smoothed | sparse+int8 latency / dense | cost against dense | to its float source | int8 alone (latency, cost) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        smoothed = f"{r['smoothed']} of {r['products']}" if r["smooth"] else "off"
        print(f"| {r['model']} | {r['mode']} | {smoothed} | {r['latency_ratio']:.2f}x | {r['cost']} | {r['to_float_source']:.4f} | "
              f"{r['int8_alone_latency_ratio']:.2f}x, {r['int8_alone_cost']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
