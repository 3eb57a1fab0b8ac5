"""Measure ``--recover``: MiniLM converted at a level with and without recovery.

Each run is the real ``actsparse convert`` (one thread, ``--no-latency``) at the
given levels, with and without ``--recover`` (and ``--heads`` with ``--heads``);
printed per run: the sentence embedding's cosine to the dense model (mean / worst)
on the held-out sentences (the calibration text's source) and on the built-in other
text (another source); for a language model, also the held-out perplexity over the dense
model's; and the seconds recovery took (the report's ``seconds.recover``).

    python tools/measure_recovery.py                         # minilm at 0.25 and 0.5
    python tools/measure_recovery.py --levels 0.5 --heads --json recovery.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any


def convert(model: str, level: float, recover: bool, heads: bool, out: Path) -> dict[str, Any]:
    from measure_heads import run_convert  # tools/ is on the path of a script run from it

    return run_convert(model, ["--sparsity", str(level), "--no-latency", *(["--recover"] if recover else []),
                               *(["--heads"] if heads else [])], out)


def _last(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    return outputs[-1]  # the sentence embedding (MiniLM), the logits (a language model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--heads", action="store_true", help="prune attention heads too")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    rows = []
    print("| level | recover | held-out mean / worst | other text mean / worst | perplexity ratio | recovery seconds | convert seconds |\n"
          "|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for level in args.levels:
            for recover in (False, True):
                report = convert(args.model, level, recover, args.heads, Path(tmp) / "out")
                held, other = _last(report["cost"]["outputs"]), _last(report["cost"]["other_text"]["outputs"])
                cost = report["cost"]
                ratio = cost["perplexity_sparse"] / cost["perplexity_dense"] if cost.get("perplexity_dense") else None
                row = {"level": level, "recover": recover, "heads": args.heads, "heldout": [held["cosine_mean"], held["cosine_min"]],
                       "perplexity_ratio": ratio,
                       "other": [other["cosine_mean"], other["cosine_min"]], "recover_seconds": report["seconds"].get("recover"),
                       "seconds": report["seconds"]["total"]}
                rows.append(row)
                print(f"| {level} | {'yes' if recover else 'no'} | {held['cosine_mean']:.4f} / {held['cosine_min']:.3f} | "
                      f"{other['cosine_mean']:.4f} / {other['cosine_min']:.3f} | {'-' if ratio is None else f'x{ratio:.4f}'} | "
                      f"{row['recover_seconds'] or '-'} | {row['seconds']:.0f} |",
                      flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
