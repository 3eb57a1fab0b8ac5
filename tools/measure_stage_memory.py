"""Peak resident memory of each stage of an ``actsparse`` command, sampled in its own process.

Runs the command line given after ``--`` in this process (the same typer app as the
``actsparse`` script), samples the resident memory (``/proc/self/statm``) every 20 ms
in a thread, and files each sample under the stage running at the time (the stage
runner's timer names them: load, calibrate, reference, squash, export, validate, cost,
quantize, latency). Prints one JSON object: per stage its peak (GB), the process's
peak (``ru_maxrss``), the weights' size where ``--weights-bytes`` gives it and each
peak over it, the wall time and the command's exit code.

    OMP_NUM_THREADS=1 python tools/measure_stage_memory.py --weights-bytes 2416214016 -- \\
        convert big_stack:build --weights weights.safetensors --data calib.npy --heldout heldout.npy \\
        --layers 'layers.*' --sparsity 0.5 --mode fold -o out --json

``tools/measure_big_model.py`` and ``tools/measure_big_decoder.py`` run it as a child.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import sys
import threading
import time
from typing import Any

GB = 1e9
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Sampler:
    """Resident memory every ``interval`` seconds, the peak per stage name."""

    def __init__(self, interval: float = 0.02) -> None:
        self.stage = "start"
        self.peaks: dict[str, int] = {}
        self.interval = interval
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.is_set():
            self.note()
            time.sleep(self.interval)

    def note(self) -> None:
        rss, stage = resident(), self.stage
        self.peaks[stage] = max(self.peaks.get(stage, 0), rss)

    def enter(self, stage: str) -> None:
        self.note()
        self.stage = stage


def _hook_stages(sampler: Sampler) -> None:
    """Every stage the runner times files its samples under its name (``load``, ``calibrate``, ...)."""
    from actsparse_deploy.app import pipeline

    timed = pipeline.Timer.__call__

    @contextlib.contextmanager
    def named(self: Any, stage: str) -> Any:
        before = sampler.stage
        sampler.enter(stage)
        try:
            with timed(self, stage):
                yield
        finally:
            sampler.enter(f"after {stage}" if before == "start" else before)

    pipeline.Timer.__call__ = named  # type: ignore[method-assign]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights-bytes", type=int, help="the weights' size: each peak is also given over it")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the actsparse command line")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    from actsparse_deploy.app.cli import app

    sampler = Sampler()
    sampler.note()
    _hook_stages(sampler)
    sampler.enter("start")
    sampler.thread.start()
    start = time.perf_counter()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            returned = app(command, standalone_mode=False)  # an exit code where the command exits (click's Exit, not raised here)
        code = returned if isinstance(returned, int) else 0
    except SystemExit as e:
        code = int(e.code or 0)
    sampler.done.set()
    sampler.thread.join()
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out: dict[str, Any] = {"rc": code, "wall_s": round(wall, 1), "peak_rss_gb": round(peak / GB, 3),
                           "stages_gb": {k: round(v / GB, 3) for k, v in sampler.peaks.items()}}
    if args.weights_bytes:
        out["weights_gb"] = round(args.weights_bytes / GB, 3)
        out["peak_over_weights"] = round(peak / args.weights_bytes, 2)
        out["stages_over_weights"] = {k: round(v / args.weights_bytes, 2) for k, v in sampler.peaks.items()}
    text = captured.getvalue()
    with contextlib.suppress(ValueError):
        out["report"] = json.loads(text)
    print(json.dumps(out, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
