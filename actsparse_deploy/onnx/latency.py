"""onnxruntime latency: a dense and a sparse ONNX model (or any number of them) timed the same way.

The method (shared with ``tools/benchmark.py``): a fixed thread count (torch
and onnxruntime's ``intra_op_num_threads``, one inter-op thread; by default the
count the command runs with, see :mod:`actsparse_deploy.base.threads`), a few warm-up
runs, then the variants alternated in one process (round robin, the order
rotated every round) so that drift hits each alike; the median of the timed runs.

``convert`` uses :func:`dense_latency`: the dense model exported like the
converted one into a scratch folder (:func:`dense_export`), both timed on held-out batches, the ratio
reported (sparse / dense: below 1 is faster) and said in words (:func:`verdict`).
:func:`latencies` times any number of ONNX files that way (dense, int8, sparse,
sparse + int8: the frontier's variants), each one's median and ratio to the first.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from actsparse_deploy.onnx.export import export_onnx
    >>> from actsparse_deploy.onnx.latency import latency_ratio
    >>> folder = tempfile.mkdtemp()
    >>> x = torch.randn(4, 16)
    >>> _ = export_onnx(nn.Linear(16, 8), x, folder + "/a.onnx")
    >>> _ = export_onnx(nn.Linear(16, 8), x, folder + "/b.onnx")
    >>> result = latency_ratio(folder + "/a.onnx", folder + "/b.onnx", [x], runs=3, warmup=1)
    >>> sorted(result), result["runs"], result["ratio"] > 0
    (['dense_ms', 'ratio', 'runs', 'samples', 'sparse_ms', 'threads', 'warmup'], 3, True)
"""

from __future__ import annotations

import contextlib
import contextvars
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base.errors import ExportError, ValidationError

if TYPE_CHECKING:
    from ..data.batches import Batch
    from ..data.iospec import IOSpec

__all__ = [
    "CONVERT_RUNS", "CONVERT_SAMPLES", "CONVERT_WARMUP", "DEFAULT_RUNS", "DEFAULT_THREADS", "DEFAULT_WARMUP",
    "SAME_BAND", "alternate", "dense_export", "dense_export_errors", "dense_latency", "latencies", "latency_ratio",
    "one_at_a_time", "ort_session", "pair_latency", "slower_note", "time_variants", "torch_threads", "verdict",
]

#: the benchmark's fixed thread count (``ort_session``'s default); ``latency_ratio`` takes the command's
DEFAULT_THREADS = 1
DEFAULT_WARMUP = 3
DEFAULT_RUNS = 15
#: ``convert``: warm-up and timed passes per model, over at most this many held-out samples
CONVERT_WARMUP = 2
CONVERT_RUNS = 7
CONVERT_SAMPLES = 64
#: a ratio within this of 1 is "as fast as dense" in words (timing noise on a shared machine); the figure is always shown
SAME_BAND = 0.03


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


#: where memory is short, sessions are timed one after the other (:func:`one_at_a_time`) instead of side by side
_ONE_AT_A_TIME: contextvars.ContextVar[bool] = contextvars.ContextVar("one_at_a_time", default=False)


@contextlib.contextmanager
def one_at_a_time(flag: bool = True) -> Iterator[None]:
    """For the block, :func:`time_variants` (so :func:`latencies` and the decode timing) opens one
    onnxruntime session at a time, times it, and lets it go before the next: one model's weights in
    memory instead of all of them, at the price of the alternation (drift is no longer shared alike)."""
    token = _ONE_AT_A_TIME.set(flag)
    try:
        yield
    finally:
        _ONE_AT_A_TIME.reset(token)


def time_variants(variants: Mapping[str, Callable[[], Callable[[], Any]]], warmup: int, runs: int) -> dict[str, dict[str, float]]:
    """:func:`alternate` over the runs that ``variants`` make (``{name: open}``, ``open()`` opening a
    session and giving its run): all opened first and alternated, or inside :func:`one_at_a_time`, each
    opened, timed and let go in turn (``one_at_a_time``: 1 in each variant's figures)."""
    if not _ONE_AT_A_TIME.get():
        return alternate({name: open_() for name, open_ in variants.items()}, warmup, runs)
    timings: dict[str, dict[str, float]] = {}
    for name, open_ in variants.items():
        timings[name] = {**alternate({name: open_()}, warmup, runs)[name], "one_at_a_time": 1}  # the session goes here
    return timings


def ort_session(path: str | Path, threads: int | None = DEFAULT_THREADS) -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads (None: the
    command's, :func:`~actsparse_deploy.base.threads.current_threads`) and one inter-op thread."""
    import onnxruntime as ort

    from ..base.threads import session_options

    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"ONNX model {path} does not exist")
    from .validate import check_external_data

    check_external_data(path)  # its external data from beside it only, checked before onnxruntime reads any
    options = session_options(threads)
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


def latencies(
    models: Mapping[str, str | Path],
    batches: Sequence[Batch],
    *,
    io_spec: IOSpec | None = None,
    threads: int | None = None,
    warmup: int = DEFAULT_WARMUP,
    runs: int = DEFAULT_RUNS,
) -> dict[str, Any]:
    """Median milliseconds of one pass over ``batches`` under onnxruntime for
    each of ``models`` (``{name: ONNX file}``, two or more, or one), timed
    alternately on the same feeds (see the module docstring): ``ms`` and
    ``min_ms`` per name, and ``ratio``, each one's median over the first one's
    (the baseline, ``baseline``: below 1 is faster). ``io_spec`` names a tensor
    or tuple batch's inputs; ``threads``: None for the command's
    (:func:`~actsparse_deploy.base.threads.current_threads`)."""
    from ..base.threads import check_threads, current_threads
    from ..data.batches import batch_size
    from .validate import onnx_feeds

    if not batches:
        raise ValidationError("latency needs at least one batch")
    if not models:
        raise ValidationError("latency needs at least one ONNX model")
    threads = current_threads() if threads is None else check_threads(threads)
    with torch_threads(threads):
        def opened(path: str | Path) -> Callable[[], Callable[[], None]]:
            def open_() -> Callable[[], None]:
                session = ort_session(path, threads)
                fed = [onnx_feeds(session, b, io_spec) for b in batches]

                def one_pass() -> None:
                    for f in fed:
                        session.run(None, f)

                return one_pass
            return open_

        timings = time_variants({name: opened(path) for name, path in models.items()}, warmup, runs)
    baseline = next(iter(models))
    first = timings[baseline]["median_ms"]
    return {
        "ms": {name: t["median_ms"] for name, t in timings.items()},
        "min_ms": {name: t["min_ms"] for name, t in timings.items()},
        "ratio": {name: t["median_ms"] / first if first > 0 else float("nan") for name, t in timings.items()},
        "baseline": baseline, "runs": runs, "warmup": warmup, "threads": threads,
        "samples": sum(batch_size(b) for b in batches), **({"one_at_a_time": True} if _ONE_AT_A_TIME.get() else {}),
    }


def latency_ratio(
    dense_onnx: str | Path,
    sparse_onnx: str | Path,
    batches: Sequence[Batch],
    *,
    io_spec: IOSpec | None = None,
    threads: int | None = None,
    warmup: int = DEFAULT_WARMUP,
    runs: int = DEFAULT_RUNS,
) -> dict[str, Any]:
    """Median milliseconds of one pass over ``batches`` under onnxruntime, dense
    and sparse, timed alternately (see the module docstring), and their ratio
    (sparse / dense: below 1 is faster): :func:`latencies` of the two. ``io_spec`` names a tensor or tuple batch's
    inputs; ``threads``: None for the command's (:func:`~actsparse_deploy.base.threads.current_threads`)."""
    figures = latencies({"dense": dense_onnx, "sparse": sparse_onnx}, batches, io_spec=io_spec, threads=threads,
                        warmup=warmup, runs=runs)
    return pair_latency(figures, "dense", "sparse")


def pair_latency(figures: Mapping[str, Any], dense: str, sparse: str) -> dict[str, Any]:
    """:func:`latency_ratio`'s figures for two of the models :func:`latencies` timed (``figures``): ``sparse``
    against ``dense``, from the same passes (one timing, one set of figures for it)."""
    dense_ms, sparse_ms = figures["ms"][dense], figures["ms"][sparse]
    return {
        "dense_ms": dense_ms, "sparse_ms": sparse_ms, "ratio": sparse_ms / dense_ms if dense_ms > 0 else float("nan"),
        "runs": figures["runs"], "warmup": figures["warmup"], "threads": figures["threads"], "samples": figures["samples"],
        **({"one_at_a_time": True} if figures.get("one_at_a_time") else {}),
    }


@contextlib.contextmanager
def dense_export(dense: Any, folder: str | Path, *, exporter: str, opset: int | None, io_spec: IOSpec, example: Batch,
                 verbose: bool = False) -> Iterator[Path]:
    """The dense PyTorch model ``dense`` exported into ``folder`` (a scratch folder,
    removed after the block) with the sparse export's exporter, opset and I/O spec:
    what ``convert``'s latency stage measures the converted model against."""
    import shutil

    from .export import export_onnx

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with dense_export_errors():
            export_onnx(dense, example, folder / "dense.onnx", exporter=exporter, opset=opset, io_spec=io_spec, verbose=verbose)
        yield folder / "dense.onnx"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def dense_export_errors() -> Iterator[None]:
    """An export of the dense model for the latency comparison that fails says so (and how to skip it)."""
    try:
        yield
    except ExportError as e:
        raise ExportError(f"exporting the dense model for the latency comparison failed ({e}); `no_latency` skips the comparison") from e


def dense_latency(dense_onnx: Path, sparse_onnx: str | Path, batches: Iterable[Batch], *, io_spec: IOSpec,
                  max_samples: int = CONVERT_SAMPLES, warmup: int = CONVERT_WARMUP, runs: int = CONVERT_RUNS) -> dict[str, Any]:
    """:func:`latency_ratio` of ``sparse_onnx`` against the dense export ``dense_onnx``
    (:func:`dense_export`) on the first ``max_samples`` of ``batches`` (held-out
    data), at the command's thread count."""
    from ..data.batches import head_samples

    return latency_ratio(dense_onnx, sparse_onnx, list(head_samples(batches, max_samples)), io_spec=io_spec, warmup=warmup, runs=runs)


def verdict(ratio: float, band: float = SAME_BAND) -> str:
    """The ratio in words: ``"faster than dense: 0.83x"``, ``"slower than dense: 1.19x"``,
    or ``"as fast as dense: 1.01x"`` within ``band`` of 1 (timing noise)."""
    if ratio > 1 + band:
        return f"slower than dense: {ratio:.2f}x"
    if ratio < 1 - band:
        return f"faster than dense: {ratio:.2f}x"
    return f"as fast as dense: {ratio:.2f}x"


def slower_note(mode: str, layer_modes: Sequence[str], ratio: float, band: float = SAME_BAND) -> str | None:
    """A note where ``prune`` was asked for (``mode`` prune, or ``auto`` chose it for a
    layer) and the converted model is slower than dense under onnxruntime; else None."""
    asked = mode == "prune" or (mode == "auto" and "prune" in layer_modes)
    if not asked or ratio <= 1 + band:
        return None
    how = "prune was asked for" if mode == "prune" else "auto chose prune"
    return (
        f"{how}, but the converted model is slower than dense under onnxruntime: {ratio:.2f}x the dense latency "
        f"(pruning a few features can cost more in gathers than it saves; try --mode fold or a higher sparsity)"
    )
