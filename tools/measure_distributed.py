"""Wall time of `actsparse calibrate` (default: minilm, the calibration stage of
`convert minilm`) or of `actsparse convert` (`--command convert`) in 1 and in N
processes on this machine, one thread each (OMP_NUM_THREADS=1), the N launched
as torchrun launches them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); checks
that the masks are the same. Two times per run: the whole run (process start
to exit: imports, model load and data preparation included, which every
process pays) and the calibration stage alone (rank 0's report: collection,
the all-reduce, and selecting the masks).

    $ .venv/bin/python tools/measure_distributed.py            # calibrate minilm, 1 and 2 processes
    $ .venv/bin/python tools/measure_distributed.py --command convert -- --no-latency
    $ .venv/bin/python tools/measure_distributed.py --model digits-cnn --procs 1 2 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: str, model: str, procs: int, out: Path, extra: list[str]) -> tuple[float, float]:
    """(whole-run seconds, calibration-stage seconds of rank 0's report)."""
    argv = [sys.executable, "-m", "actsparse_deploy", command, model, "-o", str(out), "--overwrite", "--json", *extra]
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    if procs == 1:
        children = [subprocess.Popen(argv, env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    else:
        port = _port()
        children = [
            subprocess.Popen(argv, env={**base, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(procs),
                                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in range(procs)
        ]
    done = [c.communicate() for c in children]
    seconds = time.perf_counter() - start
    if any(c.returncode for c in children):
        raise SystemExit(f"{procs} process(es) failed: {[c.returncode for c in children]}\n" + "\n".join(e[-2000:] for _, e in done))
    if any(out_text.strip() for out_text, _ in done[1:]):
        raise SystemExit(f"a rank other than 0 printed: {[o[:200] for o, _ in done[1:]]}")
    report = json.loads(done[0][0])
    return seconds, float(report["seconds"]["calibrate"])


def _same(a: object, b: object) -> bool:
    import torch

    parts_a, parts_b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return len(parts_a) == len(parts_b) and all(torch.equal(x, y) for x, y in zip(parts_a, parts_b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--command", choices=["calibrate", "convert"], default="calibrate")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=1, help="runs per process count (the best is reported)")
    parser.add_argument("extra", nargs="*", help="more flags of the command (after --)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from actsparse_deploy.calibration.masks import Masks

    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for n in args.procs:
            out = Path(tmp) / (f"masks-{n}.safetensors" if args.command == "calibrate" else f"out-{n}")
            seconds, stage = min(run(args.command, args.model, n, out, args.extra) for _ in range(args.repeat))
            rows.append((n, seconds, stage, Masks.load(out if args.command == "calibrate" else out / "masks.safetensors")))
        first = rows[0][3]
        print(f"actsparse {args.command} {args.model}: OMP_NUM_THREADS=1 per process, {os.cpu_count()} CPUs; whole run "
              "(process start to exit) and rank 0's calibration stage")
        print(f"{'processes':>9} {'run s':>7} {'calibrate s':>11} {'speed-up':>8} {'samples':>7}  masks equal to {args.procs[0]} process(es)")
        for n, seconds, stage, masks in rows:
            same = list(masks.layers) == list(first.layers) and all(
                _same(masks.layers[k].mask, first.layers[k].mask)
                and all((getattr(masks.layers[k], f) is None and getattr(first.layers[k], f) is None)
                        or torch.equal(getattr(masks.layers[k], f), getattr(first.layers[k], f)) for f in ("weight", "bias"))
                for k in first.layers
            )
            print(f"{n:>9} {seconds:>7.1f} {stage:>11.1f} {rows[0][2] / stage:>7.2f}x {masks.num_samples:>7}  {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
