"""Measure the Hugging Face default recipe's level on text the model was not calibrated on.

A Hugging Face model directory converted without a recipe gets
``models.hf.default_recipe``: its MLP output projections' inputs, ``obs`` + ``lstsq``,
at ``DEFAULT_SPARSITY``. This converts the packaged all-MiniLM-L6-v2 *directory* (the
Hugging Face path, not the built-in ``minilm``) with that recipe at several levels
(``--sparsity``), on the built-in MiniLM's sentence splits written out as text files:
calibration (Python's documentation), held-out (the same source) and other text
(scikit-learn's dataset descriptions, ``--other-text``). Printed per level: the
sentence embedding's cosine to the dense model, mean / worst, held-out and on the other
text, and the overall sparsity. One thread, ``--no-latency``.

    python tools/measure_hf_default.py                       # levels 0.125 0.25 0.375 0.5
    python tools/measure_hf_default.py --levels 0.25 --json hf-default.json
    python tools/measure_hf_default.py --levels 0.25 0.5 --other tools/everyday.txt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def text_files(folder: Path) -> dict[str, Path]:
    """The built-in MiniLM's three sentence splits, one sentence per line."""
    from actsparse_deploy.models.minilm import english_sentences

    files = {}
    for split in ("calibration", "heldout", "other"):
        files[split] = folder / f"{split}.txt"
        files[split].write_text("\n".join(english_sentences(split)) + "\n", encoding="utf-8")
    return files


def convert(directory: Path, files: dict[str, Path], level: float, out: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "actsparse_deploy", "convert", str(directory), "--task", "sentence-embedding",
               "--text", str(files["calibration"]), "--heldout-text", str(files["heldout"]), "--other-text", str(files["other"]),
               "--sparsity", str(level), "--no-latency", "--threads", "1", "-o", str(out), "--json"]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"convert at {level} failed ({proc.returncode}): {proc.stderr.strip()}")
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=float, nargs="+", default=[0.125, 0.25, 0.375, 0.5])
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--other", type=Path, help="another text to measure on instead of scikit-learn's descriptions "
                        "(tools/everyday.txt: twenty everyday sentences, written for this and never calibrated on)")
    args = parser.parse_args()
    from actsparse_deploy.models.minilm import model_dir

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = text_files(Path(tmp))
        if args.other is not None:
            files["other"] = args.other
        print("| level | overall sparsity | held-out cosine mean / worst | other text mean / worst |\n|---|---|---|---|")
        for i, level in enumerate(args.levels):
            report = convert(model_dir(), files, level, Path(tmp) / f"out{i}")
            held, other = report["cost"]["outputs"][-1], report["cost"]["other_text"]["outputs"][-1]
            rows.append({"level": level, "overall_sparsity": report["overall_sparsity"], "heldout": held, "other_text": other})
            print(f"| {level:.3f} | {report['overall_sparsity']:.3f} | {held['cosine_mean']:.4f} / {held['cosine_min']:.3f} | "
                  f"{other['cosine_mean']:.4f} / {other['cosine_min']:.3f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
