"""Wall time of `actsparse convert minilm` with the default thread settings,
before and after `--threads`, idle and with a second CPU-bound process running.

"before" is the code of a git revision (default HEAD: run this before the
change is committed to compare with the working tree; give the commit before
`--threads` once it is), unpacked with `git archive` into a temporary folder
and run from there; "after" is this working tree. Both run as a user would:
a subprocess with OMP_NUM_THREADS / MKL_NUM_THREADS unset. "busy" starts
`python -c 'while True: pass'` before the command and stops it after. The runs
are interleaved (round robin over variant x condition, `--repeats` rounds), and
each row shows the load average when its run started: on a shared machine the
figures vary with what others run.

    python tools/measure_threads.py                        # before (HEAD) and after, idle and busy, twice
    python tools/measure_threads.py --before-ref 55566fd --repeats 3 --json out.json
    python tools/measure_threads.py --variants before,after,after-threads1 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONDITIONS = ("idle", "busy")
VARIANTS = ("before", "after")
#: "after" with --threads 1, for comparison (not a default; --variants before,after,after-threads1)
THREADS1 = "after-threads1"


def unpack(ref: str, into: Path) -> Path:
    """The package as it was at ``ref``, unpacked under ``into``."""
    archive = into / "src.tar"
    with archive.open("wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref, "actsparse_deploy", "models"], stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "src", filter="data")
    return into / "src"


@contextlib.contextmanager
def condition(name: str) -> Iterator[None]:
    """``busy``: one CPU-bound process runs for the block."""
    if name == "idle":
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        spinner.terminate()
        spinner.wait()


def run_convert(src: Path, model: str, extra: list[str], out: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(src)  # ahead of the editable install
    command = [sys.executable, "-m", "actsparse_deploy", "convert", model, "-o", str(out), "--overwrite", "--json", *extra]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=src, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {"seconds": round(seconds, 1), "exit_code": proc.returncode, "load_at_start": round(load, 2)}
    if proc.returncode != 0:
        row["stderr"] = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
        return row
    report = json.loads(proc.stdout)
    row["threads"] = report.get("threads")
    row["latency_ratio"] = (report.get("latency") or {}).get("ratio")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--before-ref", default="HEAD", help="git revision for 'before' (default HEAD)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--args", default="", help="extra convert flags for 'after', e.g. '--threads 1'")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    a = parser.parse_args()
    variants, conditions = a.variants.split(","), a.conditions.split(",")
    rows: list[dict[str, Any]] = []
    print(f"{os.cpu_count()} CPUs, affinity {len(os.sched_getaffinity(0))}; load average at start {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"after": ROOT, THREADS1: ROOT}
        if "before" in variants:
            sources["before"] = unpack(a.before_ref, Path(tmp))
        for repeat in range(a.repeats):
            for cond in conditions:
                for variant in variants:
                    extra = shlex.split(a.args) if variant == "after" else ["--threads", "1"] if variant == THREADS1 else []
                    with condition(cond):
                        row = run_convert(sources[variant], a.model, extra, Path(tmp) / "out")
                    row.update(variant=variant, condition=cond, repeat=repeat + 1)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print()
    print(f"`actsparse convert {a.model} -o OUT --overwrite` wall seconds (imports included), "
          f"before = {a.before_ref}, after = working tree {a.args}".rstrip())
    print("| variant | condition | threads | runs (s) | median (s) | load average at start |")
    print("|---|---|---|---|---|---|")
    for variant in variants:
        for cond in conditions:
            mine = [r for r in rows if r["variant"] == variant and r["condition"] == cond]
            ok = [r["seconds"] for r in mine if r["exit_code"] == 0]
            runs = ", ".join(f"{r['seconds']:.1f}" if r["exit_code"] == 0 else f"exit {r['exit_code']}" for r in mine)
            threads = ", ".join(sorted({str(r.get("threads") or "default (not reported)") for r in mine}))
            median = f"{statistics.median(ok):.1f}" if ok else "-"
            loads = ", ".join(f"{r['load_at_start']:.2f}" for r in mine)
            print(f"| {variant} | {cond} | {threads} | {runs} | {median} | {loads} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
