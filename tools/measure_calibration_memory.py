"""Peak memory of calibration on 1x and 20x the data (issue 12, item 3): data
streams, so the peak must not grow with the size of the data set.

Writes synthetic digits-shaped inputs ((N, 1, 8, 8) float32, 256 bytes a sample)
as one ``.npy`` of 1x and one of 20x, and the 20x set as a glob of 20 shards,
then runs ``actsparse calibrate MODEL --data FILE -o ...`` in a fresh process for
each and reports the child's peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss``,
one child at a time through a small runner process) and its wall time.

    OMP_NUM_THREADS=1 .venv/bin/python tools/measure_calibration_memory.py --samples 400000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RUNNER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - start,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def write(path: Path, samples: int, seed: int) -> None:
    """``samples`` inputs in the digits' range, written a block at a time (never whole in memory)."""
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(samples, 1, 8, 8))
    for start in range(0, samples, 100_000):
        stop = min(start + 100_000, samples)
        out[start:stop] = rng.uniform(0, 16, size=(stop - start, 1, 8, 8)).astype(np.float32)
    out.flush()
    del out


def measure(model: str, data: str, output: Path, batch_size: int) -> dict[str, float]:
    """One ``actsparse calibrate`` in a process of its own: peak RSS (MiB) and wall seconds."""
    command = [sys.executable, "-m", "actsparse_deploy", "calibrate", model, "--data", data, "-o", str(output),
               "--batch-size", str(batch_size)]
    done = subprocess.run([sys.executable, "-c", RUNNER, *command], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"calibrate failed (exit {result['rc']}) on {data}")
    return {"peak_rss_mib": round(result["peak_rss_kib"] / 1024, 1), "seconds": round(result["seconds"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-cnn")
    parser.add_argument("--samples", type=int, default=400_000, help="samples of the 1x set (the 20x set has 20 times as many)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--scratch", default=None, help="folder for the data files (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(dir=args.scratch) as folder:
        root = Path(folder)
        one, twenty = root / "x1.npy", root / "x20.npy"
        write(one, args.samples, 0)
        write(twenty, 20 * args.samples, 1)
        shards = root / "shards"
        shards.mkdir()
        whole = np.load(twenty, mmap_mode="r")
        for i in range(20):
            np.save(shards / f"part-{i:03d}.npy", whole[i * args.samples:(i + 1) * args.samples])
        del whole
        rows = []
        for label, data, size in (("1x, one .npy", str(one), one.stat().st_size),
                                  ("20x, one .npy", str(twenty), twenty.stat().st_size),
                                  ("20x, 20 shards (glob)", f"{shards}/part-*.npy", sum(p.stat().st_size for p in shards.iterdir()))):
            figures = measure(args.model, data, root / f"masks-{len(rows)}.safetensors", args.batch_size)
            rows.append((label, size / 2**20, figures))
    print(f"model {args.model}, batch size {args.batch_size}, 1x = {args.samples:,} samples")
    print("| data | samples | file MiB | peak RSS MiB | wall s |")
    print("|---|---:|---:|---:|---:|")
    for (label, mib, figures), factor in zip(rows, (1, 20, 20)):
        print(f"| {label} | {factor * args.samples:,} | {mib:,.0f} | {figures['peak_rss_mib']:,.1f} | {figures['seconds']:.1f} |")


if __name__ == "__main__":
    main()
