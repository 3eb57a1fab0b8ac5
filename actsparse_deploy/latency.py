"""onnxruntime latency: a dense and a sparse ONNX model timed the same way.

The method (shared with ``tools/benchmark.py``): a fixed thread count (torch
and onnxruntime's ``intra_op_num_threads``, one inter-op thread), a few warm-up
runs, then the variants alternated in one process (round robin, the order
rotated every round) so that drift hits each alike; the median of the timed runs.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from actsparse_deploy.export import export_onnx
    >>> from actsparse_deploy.latency import latency_ratio
    >>> folder = tempfile.mkdtemp()
    >>> x = torch.randn(4, 16)
    >>> _ = export_onnx(nn.Linear(16, 8), x, folder + "/a.onnx")
    >>> _ = export_onnx(nn.Linear(16, 8), x, folder + "/b.onnx")
    >>> result = latency_ratio(folder + "/a.onnx", folder + "/b.onnx", [x], runs=3, warmup=1)
    >>> sorted(result), result["runs"], result["ratio"] > 0
    (['dense_ms', 'ratio', 'runs', 'sparse_ms', 'threads', 'warmup'], 3, True)
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ValidationError

if TYPE_CHECKING:
    from .batches import Batch
    from .export import IOSpec

__all__ = ["DEFAULT_RUNS", "DEFAULT_THREADS", "DEFAULT_WARMUP", "alternate", "latency_ratio", "ort_session", "torch_threads"]

DEFAULT_THREADS = 1
DEFAULT_WARMUP = 3
DEFAULT_RUNS = 15


def alternate(variants: dict[str, Callable[[], Any]], warmup: int, runs: int) -> dict[str, dict[str, float]]:
    """Round-robin timing: ``warmup`` untimed rounds, then ``runs`` rounds that
    run each variant once, the order rotated every round. Per variant: median,
    min and max milliseconds and the number of timed runs."""
    if warmup < 0 or runs < 1:
        raise ValidationError(f"timing needs warmup >= 0 and runs >= 1, got warmup {warmup}, runs {runs}")
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(runs):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return {
        name: {"median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3, "max_ms": max(t) * 1e3, "runs": len(t)}
        for name, t in times.items()
    }


def ort_session(path: str | Path, threads: int = DEFAULT_THREADS) -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads and one inter-op thread."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"ONNX model {path} does not exist")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ValidationError(f"onnxruntime cannot load {path}: {e}") from e


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for the block, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def latency_ratio(
    dense_onnx: str | Path,
    sparse_onnx: str | Path,
    batches: Sequence[Batch],
    *,
    io_spec: IOSpec | None = None,
    threads: int = DEFAULT_THREADS,
    warmup: int = DEFAULT_WARMUP,
    runs: int = DEFAULT_RUNS,
) -> dict[str, Any]:
    """Median milliseconds of one pass over ``batches`` under onnxruntime, dense
    and sparse, timed alternately (see the module docstring), and their ratio
    (sparse / dense: below 1 is faster). ``io_spec`` names a tensor or tuple batch's inputs."""
    from .validate import onnx_feeds

    if not batches:
        raise ValidationError("latency needs at least one batch")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValidationError(f"threads must be a positive integer, got {threads!r}")
    with torch_threads(threads):
        sessions = {"dense": ort_session(dense_onnx, threads), "sparse": ort_session(sparse_onnx, threads)}
        feeds = {name: [onnx_feeds(s, b, io_spec) for b in batches] for name, s in sessions.items()}

        def run(name: str) -> Callable[[], None]:
            session, fed = sessions[name], feeds[name]

            def one_pass() -> None:
                for f in fed:
                    session.run(None, f)

            return one_pass

        timings = alternate({name: run(name) for name in sessions}, warmup, runs)
    dense, sparse = timings["dense"]["median_ms"], timings["sparse"]["median_ms"]
    return {
        "dense_ms": dense, "sparse_ms": sparse, "ratio": sparse / dense if dense > 0 else float("nan"),
        "runs": runs, "warmup": warmup, "threads": threads,
    }
