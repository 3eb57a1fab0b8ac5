"""Measure the external-data path on a real model over 2 GB: convert, validate, inspect.

Builds (deterministic seed, no download) a stack of ``--layers`` Linear layers
``hidden x hidden`` with ReLU between them (default 9 x 8192: 2.42 GB of float32
weights, over protobuf's 2 GB limit), written as a user's model would be: a
module ``big_stack.py`` with a ``build()`` factory (its parameters left
uninitialised: the weights file fills them) and ``weights.safetensors``, plus
calibration and held-out inputs (``.npy``). Then runs, each as its own
subprocess, the real commands:

1. ``actsparse convert big_stack:build`` (calibrate, squash, export, validate,
   cost, latency against the dense model exported the same way): over 2 GB the
   ONNX model is written with its weights in ``model.onnx.data`` without being
   asked (``--external-data`` asks for it at any size);
2. ``actsparse validate OUT/model.onnx big_stack:build --masks ...``;
3. ``actsparse inspect OUT/model.onnx`` (the graph only: the data file is not read).

For each stage: the wall time and the peak resident memory of that process
(``os.wait4``'s ``ru_maxrss``: the child alone), the outputs checked (model.onnx
and model.onnx.data present, validation passed, inspect lists the data file), and
a table at the end (``--json FILE`` writes the rows too).

    OMP_NUM_THREADS=1 python tools/measure_big_model.py --workdir /tmp/big   # ~2.4 GB weights, ~5 GB of files
    OMP_NUM_THREADS=1 python tools/measure_big_model.py --workdir /tmp/big --max-memory 4GB   # one copy at a time
    python tools/measure_big_model.py --workdir /tmp/big --hidden 1024 --layers 3 --external-data   # a quick dry run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

GB = 1e9
TWO_GIB = 2**31

MODULE = '''
"""A stack of large Linear layers (tools/measure_big_model.py): build() leaves the
parameters uninitialised (torch.empty); the weights file fills them."""
import torch
from torch import nn

HIDDEN = {hidden}
LAYERS = {layers}


class BigStack(nn.Module):
    def __init__(self, hidden=HIDDEN, layers=LAYERS):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden, device="meta") for _ in range(layers))
        self.act = nn.ReLU()

    def forward(self, x):
        for layer in self.layers:
            x = self.act(layer(x))
        return x


def build():
    return BigStack().to_empty(device="cpu")
'''


def build(workdir: Path, hidden: int, layers: int, calibration: int, heldout: int, seed: int) -> dict[str, Any]:
    """The module, the weights (seeded normal, std sqrt(2 / hidden): activations keep their scale
    through the ReLUs) and the data, written to ``workdir``."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "big_stack.py").write_text(textwrap.dedent(MODULE.format(hidden=hidden, layers=layers)).lstrip())
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for i in range(layers):
        state[f"layers.{i}.weight"] = torch.randn(hidden, hidden, generator=generator) * (2.0 / hidden) ** 0.5
        state[f"layers.{i}.bias"] = torch.randn(hidden, generator=generator) * 0.01
    save_file(state, str(workdir / "weights.safetensors"))
    weight_bytes = sum(t.numel() * t.element_size() for t in state.values())
    del state
    rng = np.random.default_rng(seed)
    np.save(workdir / "calib.npy", rng.standard_normal((calibration, hidden), dtype=np.float32))
    np.save(workdir / "heldout.npy", rng.standard_normal((heldout, hidden), dtype=np.float32))
    return {"weight_bytes": weight_bytes}


def run(stage: str, argv: list[str], cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``argv`` as a child; its wall time, its own peak RSS (``wait4``), exit code and output."""
    print(f"[{stage}] {' '.join(argv)}", file=sys.stderr, flush=True)
    out, err = cwd / f".{stage}.stdout", cwd / f".{stage}.stderr"
    start = time.perf_counter()
    with open(out, "wb") as o, open(err, "wb") as e:
        child = subprocess.Popen(argv, cwd=cwd, env=env, stdout=o, stderr=e)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    row = {"stage": stage, "rc": child.returncode, "wall_s": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / GB, 2),
           "stdout": out.read_text(errors="replace"), "stderr": err.read_text(errors="replace")}
    if child.returncode != 0:
        print(f"[{stage}] exit {child.returncode}: {row['stderr'].strip()[-2000:]}", file=sys.stderr, flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where the model, data and outputs go (~2x the weights)")
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--calibration", type=int, default=64, help="calibration samples")
    parser.add_argument("--heldout", type=int, default=32, help="held-out samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--mode", default="fold", help="squash mode (fold keeps the model's size: over 2 GB, external data unasked)")
    parser.add_argument("--external-data", action="store_true", help="pass --external-data to convert (else automatic over 2 GB)")
    parser.add_argument("--no-latency", action="store_true", help="pass --no-latency to convert")
    parser.add_argument("--max-memory", help="pass --max-memory to convert and validate (e.g. 4GB: one copy of the weights at a time)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--build-only", action="store_true", help="only write the module, weights and data (the build stage)")
    args = parser.parse_args()
    if args.build_only:
        print(build(args.workdir, args.hidden, args.layers, args.calibration, args.heldout, args.seed))
        return 0

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(workdir), os.environ.get("PYTHONPATH")]))}
    python = sys.executable
    rows: list[dict[str, Any]] = []
    built = run("build", [python, __file__, "--build-only", "--workdir", str(workdir), "--hidden", str(args.hidden),
                          "--layers", str(args.layers), "--calibration", str(args.calibration), "--heldout", str(args.heldout),
                          "--seed", str(args.seed)], workdir, env)
    rows.append(built)
    if built["rc"] != 0:
        return report(rows, args)
    weights = workdir / "weights.safetensors"
    out = workdir / "out"
    shutil.rmtree(out, ignore_errors=True)
    cli = [python, "-m", "actsparse_deploy"]
    convert = [*cli, "convert", "big_stack:build", "--weights", str(weights), "--data", "calib.npy", "--heldout", "heldout.npy",
               "--layers", "layers.*", "--sparsity", str(args.sparsity), "--mode", args.mode, "--batch-size", "16", "-o", str(out),
               "--json", *(["--external-data"] if args.external_data else []), *(["--no-latency"] if args.no_latency else []),
               *(["--max-memory", args.max_memory] if args.max_memory else [])]
    rows.append(run("convert", convert, workdir, env))
    if rows[-1]["rc"] == 0:
        rows.append(run("validate", [*cli, "validate", str(out / "model.onnx"), "big_stack:build", "--weights", str(weights),
                                     "--masks", str(out / "masks.safetensors"), "--mode", args.mode, "--heldout", "heldout.npy",
                                     "--json", *(["--max-memory", args.max_memory] if args.max_memory else [])], workdir, env))
        rows.append(run("inspect", [*cli, "inspect", str(out / "model.onnx"), "--json"], workdir, env))
    return report(rows, args, out=out, weights=weights)


def report(rows: list[dict[str, Any]], args: argparse.Namespace, out: Path | None = None, weights: Path | None = None) -> int:
    problems: list[str] = [f"{row['stage']} exited {row['rc']}" for row in rows if row["rc"] != 0]
    sizes: dict[str, int] = {}
    if out is not None and not problems:
        for name in ("model.onnx", "model.onnx.data", "masks.safetensors", "report.json"):
            if (out / name).is_file():
                sizes[name] = (out / name).stat().st_size
            else:
                problems.append(f"{out / name} missing")
        converted = json.loads(rows[1]["stdout"])
        if not converted["validation"]["passed"]:
            problems.append("convert: validation did not pass")
        if not converted["export"]["external_data"]:
            problems.append("convert: the export has no external data")
        validated = json.loads(rows[2]["stdout"])
        if not validated["validation"]["passed"]:
            problems.append("validate: did not pass")
        inspected = json.loads(rows[3]["stdout"])
        listed = {f["location"]: f for f in inspected["export"]["data_files"]}
        if listed.get("model.onnx.data", {}).get("bytes") != sizes.get("model.onnx.data"):
            problems.append(f"inspect: external data listed as {listed}")
        latency = converted.get("latency")
        print(f"weights {sizes.get('model.onnx.data', 0) / GB:.2f} GB in model.onnx.data (2 GiB = {TWO_GIB / GB:.2f} GB), "
              f"model.onnx {sizes.get('model.onnx', 0) / 1e3:.1f} kB; convert's stages (s): {converted['seconds']}"
              + (f"; latency {latency['ratio']:.2f}x dense" if latency else ""))
        if weights is not None:
            print(f"weights file {weights.stat().st_size / GB:.2f} GB")
    print(f"{'stage':<10} {'exit':>4} {'wall s':>8} {'peak RSS GB':>12}")
    for row in rows:
        print(f"{row['stage']:<10} {row['rc']:>4} {row['wall_s']:>8.1f} {row['peak_rss_gb']:>12.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps([{k: v for k, v in row.items() if k not in ("stdout", "stderr")} for row in rows]
                                        + [{"sizes": sizes, "problems": problems}], indent=2) + "\n")
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
