"""Users' data files as batches: a file, a folder or a glob of shards read as a stream,
a ``module:function`` that returns batches, class labels; calibration and held-out data
never the same file."""

from __future__ import annotations

import filecmp
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..base.errors import DataError
from ..base.imports import import_attr
from .arrays import read_arrays
from .batches import Batch, Stream

__all__ = ["check_distinct_data", "load_data", "load_labels"]


def _is_function_spec(text: str) -> bool:
    return ":" in text and not Path(text).exists() and not (len(text) > 1 and text[1] == ":")


def load_data(source: str | Path, batch_size: int = 32) -> Stream | Iterable[Batch]:
    """Batches from a data file, a directory of them or a glob of shards (a
    :class:`~actsparse_deploy.data.streams.ArrayStream`: read batch by batch on each
    iteration, never whole; every file's header is checked and the first batch
    read now), or the iterable a ``module:function`` returns."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    text = str(source)
    if _is_function_spec(text):
        fn: Callable[[], Iterable[Batch]] = import_attr(text, "data function", DataError)
        try:
            return fn()
        except Exception as e:
            raise DataError(f"data function {text!r} failed: {type(e).__name__}: {e}") from e
    from ..data.streams import array_stream

    stream = array_stream(source, batch_size)
    next(iter(stream))  # a file that fails on its first rows fails here, before any work
    return stream


def load_labels(source: str | Path) -> torch.Tensor:
    """Class labels for held-out data: a file of one integer array (one label per sample)."""
    path = Path(source)
    arrays = read_arrays(path)
    if not isinstance(arrays, torch.Tensor):
        raise DataError(f"labels file {path} holds {len(arrays)} arrays ({', '.join(arrays)}): give one integer array")
    if arrays.is_floating_point() or arrays.dtype == torch.bool:
        raise DataError(f"labels file {path} holds {arrays.dtype} values: labels are integer class indices")
    if arrays.ndim != 1:
        raise DataError(f"labels file {path} has shape {tuple(arrays.shape)}: give one class index per sample (a 1-D array)")
    return arrays.to(torch.int64)


def check_distinct_data(data: str | Path, heldout: str | Path, *, what: str = "held-out data", of: str = "the calibration data",
                        why: str = "figures measured on it would be calibration figures; pass samples that calibration did not see") -> None:
    """Held-out data must not be the calibration data: the same path, a link to
    it, or a byte-identical copy is refused (its figures would be calibration figures).
    A directory or a glob of shards is its data files: a held-out file that is one of
    the calibration files (or a byte-identical copy of one) is refused. ``what`` / ``of``:
    how the message names the two, and ``why`` it matters (other text is neither the calibration nor the held-out text)."""
    a, b = str(data), str(heldout)
    if _is_function_spec(a) or _is_function_spec(b):
        same = a == b
    else:
        from ..data.streams import data_paths

        try:
            ours, theirs = data_paths(a), data_paths(b)
        except DataError:
            return  # the loader names the missing file, the empty directory or glob
        ours, theirs = [p for p in ours if p.is_file()], [p for p in theirs if p.is_file()]
        pair = _shared_file(ours, theirs)
        same = pair is not None
        if pair is not None and (len(ours) > 1 or len(theirs) > 1):
            b = f"{heldout} (its file {pair[1]} is the calibration file {pair[0]}, or a copy of it)"
    if same:
        raise DataError(
            f"{what} {b} is {of} {data}: {why}"
        )


def _shared_file(ours: list[Path], theirs: list[Path]) -> tuple[Path, Path] | None:
    """A held-out file that is a calibration file (the same file, a link) or a byte-identical copy of one.
    Only files of equal size and equal first 64 KiB are compared whole: each file is read once, not once per pair."""
    def key(p: Path) -> tuple[int, bytes]:
        with open(p, "rb") as f:
            return os.fstat(f.fileno()).st_size, f.read(65536)

    try:
        ids = {(s.st_dev, s.st_ino): (p, s.st_size) for p in ours for s in [p.stat()]}
        held = [(p, p.stat()) for p in theirs]
        for p, s in held:
            if (s.st_dev, s.st_ino) in ids:
                return ids[(s.st_dev, s.st_ino)][0], p
        common = {size for _, size in ids.values()} & {s.st_size for _, s in held}
        keyed: dict[tuple[int, bytes], list[Path]] = {}
        for p, size in ids.values():
            if size in common:
                keyed.setdefault(key(p), []).append(p)
        for p, s in held:
            if s.st_size in common:
                for q in keyed.get(key(p), []):
                    if filecmp.cmp(q, p, shallow=False):
                        return q, p
    except OSError:
        return None  # an unreadable file: the loader names it
    return None
