"""Time and memory of comparing one batch's outputs (``data.compare.compare_outputs``), as validation and
smoothing's checks do: tiny-lm's shapes by default (logits 8 x 64 x 8192 and a 4-layer cache), a larger
vocabulary with ``--vocab``. Median of ``--runs`` comparisons, one thread; the peak of numpy's allocations
during one (tracemalloc: the float64 copies and temporaries; the outputs themselves are made before).

    python tools/measure_compare.py
    python tools/measure_compare.py --vocab 32000 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

import torch

from actsparse_deploy.bake.apply import squash_tolerance
from actsparse_deploy.data.compare import compare_outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    want = [torch.randn(8, 64, args.vocab)] + [torch.randn(8, 4, 64, 16) for _ in range(8)]
    got = [t + 1e-6 * torch.randn_like(t) for t in want]
    tolerance = squash_tolerance(want)
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        compare_outputs(got, want, tolerance)
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    compare_outputs(got, want, tolerance)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    values = sum(t.numel() for t in want)
    print(f"{values:,} values: median {statistics.median(times) * 1000:.1f} ms over {args.runs} runs, "
          f"numpy peak {peak / 2**20:.1f} MiB (the logits alone: {want[0].numel() * 4 / 2**20:.0f} MiB in float32)")


if __name__ == "__main__":
    main()
