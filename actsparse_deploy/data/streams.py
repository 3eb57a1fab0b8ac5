"""Data that streams: batches read from disk as they are needed, never whole.

A :class:`Stream` is an iterable of batches that opens its source again on
every iteration (calibration, the budget search, export, validation and the
cost each go over the data), with ``samples`` where it is known cheaply.
:func:`array_stream` reads data files: one file, a directory (its data files,
sorted by name) or a glob (``shards/*.npy``, sorted by name), shard by shard.
Batches span shards (``batch_size`` rows each, the last one shorter), so the
batches, and the masks, are those of one file holding the shards in order.

- ``.npy``: memory-mapped a batch at a time (``np.memmap`` of the batch's rows).
- ``.npz``: each member read a batch at a time from the zip (stored members seek,
  compressed ones are decompressed as they are read; a member saved in Fortran
  order is read whole, one shard at a time).
- ``.safetensors``: the batch's rows of each tensor (``safe_open(...).get_slice``).
- ``.pt`` / ``.pth``: read whole (``torch.load`` with ``weights_only``), one shard
  at a time: shard big data, or use ``.npy``.

Shards must agree on their arrays (names where there are several) and each
array's per-sample shape and dtype; every file's header is checked before any
batch is read, with the same checks as one file (a lying header, object arrays,
pickled objects are refused). NaN / Inf is found as the rows are read. A file
replaced, rewritten, truncated or removed after it was opened is refused (naming
it) when a later pass reaches it: every pass must read the same samples.

Text files (:class:`TextStream`) are read line by line and tokenized a batch at
a time by a Hugging Face model's tokenizer, each text first cut to what the
maximum length can use (:data:`CHARS_PER_TOKEN`), in a worker thread that a
signal or validation's timeout stops waiting for (:func:`run_tokenizer`).

    >>> import numpy as np, tempfile
    >>> from actsparse_deploy.data.streams import array_stream
    >>> folder = tempfile.mkdtemp()
    >>> for i, n in enumerate((5, 4)):
    ...     np.save(f"{folder}/part-{i}.npy", np.zeros((n, 3), dtype=np.float32))
    >>> stream = array_stream(f"{folder}/part-*.npy", batch_size=4)
    >>> stream.samples, len(stream), [tuple(b.shape) for b in stream]
    (9, 3, [(4, 3), (4, 3), (1, 3)])
    >>> [tuple(b.shape) for b in stream.head(6)]
    [(4, 3), (2, 3)]
"""

from __future__ import annotations

import contextlib
import contextvars
import glob
import json
import math
import os
import re
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ..base.errors import ActsparseError, DataError, first_line, is_panic
from ..base.waiting import run_in_worker
from .batches import Batch, Stream

__all__ = ["CHARS_PER_TOKEN", "DATA_SUFFIXES", "MAX_LINE_BYTES", "ArrayStream", "TextStream", "array_stream",
           "data_paths", "is_panic", "reading_deadline", "run_tokenizer", "shape_examples", "text_lines"]

T = TypeVar("T")

#: the suffixes of data files (what a directory of shards is made of)
DATA_SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".pth")


# --- where the data is ---------------------------------------------------------------------


def _is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[")


def data_paths(source: str | Path) -> list[Path]:
    """The data files of ``source``: a file; a directory's data files (those with a
    data suffix, not hidden), sorted by name; or a glob's matches, sorted by name."""
    text = str(source)
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in DATA_SUFFIXES and not p.name.startswith(".") and p.is_file())
        if not files:
            raise DataError(f"data directory {path} holds no data files ({', '.join(DATA_SUFFIXES)})")
        return files
    if _is_pattern(text) and not path.exists():
        files = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
        if not files:
            raise DataError(
                f"data file {text} does not exist, and as a pattern it matches no files: check the path "
                "(quote a pattern, so the shell does not expand it)"
            )
        return files
    return [path]


# --- one data file -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Array:
    """One array of a data file: its name, its shape and the tensor dtype it becomes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def sample(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}[*, {', '.join(str(d) for d in self.shape[1:])}]".replace(", ]", "]")


_TAKEN = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.uint8)


def _numpy_dtype(name: str, dtype: np.dtype, source: str) -> torch.dtype:
    """The tensor dtype a numpy array of ``dtype`` becomes (as ``loading.to_tensor`` converts it)."""
    if dtype.hasobject:
        raise DataError(f"data file {source} is corrupted or unreadable (array {name!r} holds Python objects, which are never "
                        "unpickled: save numeric arrays)")
    if dtype.kind not in "biuf":
        raise DataError(f"array {name!r} in {source} has dtype {dtype}, which a model cannot take")
    return _tensor_dtype(name, torch.from_numpy(np.zeros(1, dtype=dtype.newbyteorder("="))).dtype, source)


def _tensor_dtype(name: str, dtype: torch.dtype, source: str) -> torch.dtype:
    dtype = torch.float32 if dtype == torch.float64 else dtype
    if dtype not in _TAKEN:
        raise DataError(f"array {name!r} in {source} has dtype {dtype}, which a model cannot take")
    return dtype


def _npy_header(stream: Any, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)  # type: ignore[no-any-return]
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)  # type: ignore[no-any-return]
    raise DataError(f"{where} is a .npy of format version {version}, which is not supported")


class _File:
    """A data file's arrays (checked from its header) and how to read rows of them."""

    def __init__(self, path: Path) -> None:
        from .arrays import check_npy, check_npz

        self.path = path
        self.where = str(path)
        self.suffix = path.suffix.lower()
        self._offsets: dict[str, tuple[int, bool, np.dtype]] = {}
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        self._seen = self._fingerprint()
        if self.suffix == ".npy":
            check_npy(path)
            with open(path, "rb") as f:
                shape, fortran, dtype = _npy_header(f, f"data file {path}")
                self._offsets["array"] = (f.tell(), fortran, dtype)
            self.arrays = [_Array("array", tuple(shape), _numpy_dtype("array", dtype, self.where))]
        elif self.suffix == ".npz":
            check_npz(path)
            self.arrays = []
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    with archive.open(info) as member:
                        shape, fortran, dtype = _npy_header(member, f"data file {path} (member {info.filename})")
                        name = info.filename.removesuffix(".npy")
                        self._offsets[info.filename] = (member.tell(), fortran, dtype)
                    self.arrays.append(_Array(name, tuple(shape), _numpy_dtype(name, dtype, self.where)))
        elif self.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                self.arrays = []
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    piece = f.get_slice(key)
                    dtype = getattr(torch, {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                                            "I32": "int32", "BOOL": "bool", "U8": "uint8"}.get(piece.get_dtype(), "complex64"))
                    if dtype == torch.complex64:
                        raise DataError(f"array {key!r} in {path} has dtype {piece.get_dtype()}, which a model cannot take")
                    self.arrays.append(_Array(key, tuple(piece.get_shape()), _tensor_dtype(key, dtype, self.where)))
        elif self.suffix in (".pt", ".pth"):
            tensors = self._torch_arrays()
            self.arrays = [_Array(k, tuple(t.shape), _tensor_dtype(k, t.dtype, self.where)) for k, t in tensors.items()]
        else:
            raise DataError(f"data file {path}: unsupported type {self.suffix or '(none)'}; use .npy, .npz, .safetensors or .pt")
        if not self.arrays:
            raise DataError(f"data file {path} holds no arrays")
        for a in self.arrays:
            if not a.shape:
                raise DataError(f"array {a.name!r} in {path} is a scalar: it needs a batch axis first")
            if a.shape[0] == 0:
                raise DataError(f"array {a.name!r} in {path} is empty (0 samples)")
        lengths = {a.name: a.shape[0] for a in self.arrays}
        if len(set(lengths.values())) > 1:
            raise DataError(f"arrays in {path} differ in their number of samples: {lengths}")
        self.samples = self.arrays[0].shape[0]

    def _fingerprint(self) -> tuple[int, ...]:
        """What says the file is still the one whose header was checked: device, inode, size, modification time."""
        try:
            info = os.stat(self.path)
        except OSError as e:
            raise DataError(
                f"data file {self.path} was removed or cannot be read since it was opened ({e.strerror or e}): every pass "
                "over the data (calibration, export, validation, the cost) reads it again; keep it in place while a command runs"
            ) from e
        return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns

    def check_unchanged(self) -> None:
        """Refuse a file replaced, rewritten, truncated or removed since its header was checked: a pass over
        it would read other samples (or fail inside numpy / mmap), not the data the first pass saw."""
        if self._fingerprint() != self._seen:
            raise DataError(
                f"data file {self.path} changed on disk since it was opened (replaced, rewritten or truncated): every pass "
                "over the data (calibration, export, validation, the cost) must read the same samples; do not change data "
                "files while a command runs"
            )

    def _torch_arrays(self) -> dict[str, torch.Tensor]:
        from .arrays import POSITIONAL, torch_load

        obj = torch_load(self.path, "data file", DataError)
        if isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided:
                raise DataError(f"array 'tensor' in {self.path} is a {obj.layout} tensor: save it dense (tensor.to_dense())")
            return {"tensor": obj}
        if isinstance(obj, (list, tuple)):  # positional inputs: tuple batches
            obj = {f"{POSITIONAL}{i}": t for i, t in enumerate(obj)}
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise DataError(f"data file {self.path} must hold a tensor, a list of tensors or a dict of tensors")
        for k, t in obj.items():
            if t.layout != torch.strided:
                raise DataError(f"array {k!r} in {self.path} is a {t.layout} tensor: save it dense (tensor.to_dense())")
        return dict(obj)

    @contextlib.contextmanager
    def reader(self) -> Iterator[Callable[[int, int], dict[str, torch.Tensor]]]:
        """``read(start, stop)``: rows ``start:stop`` of every array, as checked tensors."""
        from ..base.serialize import reason, unreadable
        from .arrays import to_tensor

        self.check_unchanged()
        with contextlib.ExitStack() as stack:
            raw: Callable[[str, int, int], Any]
            if self.suffix == ".npy":
                raw = self._npy_rows
            elif self.suffix == ".npz":
                archive = stack.enter_context(zipfile.ZipFile(self.path))
                raw = _NpzRows(self, archive, stack).rows
            elif self.suffix == ".safetensors":
                raw = self._safetensors_rows
            else:
                whole = self._torch_arrays()
                raw = lambda name, start, stop: whole[name][start:stop]  # noqa: E731

            def read(start: int, stop: int) -> dict[str, torch.Tensor]:
                return {a.name: to_tensor(a.name, raw(a.name, start, stop), self.where) for a in self.arrays}

            try:
                yield read
            except DataError:
                raise
            except BaseException as e:
                if not (isinstance(e, (EOFError, zipfile.BadZipFile)) or unreadable(e)):
                    raise
                self.check_unchanged()  # changed while it was read: say so, not what numpy / mmap made of it
                raise DataError(f"data file {self.path} is corrupted or unreadable ({reason(e)})") from e

    def _npy_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        offset, fortran, dtype = self._offsets["array"]
        shape = self.arrays[0].shape
        if fortran:  # rows are not contiguous: map it all, copy the rows
            mapped = np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F")
        else:  # only the rows of this batch are mapped
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            mapped = np.memmap(self.path, dtype=dtype, mode="r", offset=offset + start * row, shape=(stop - start, *shape[1:]))
            start, stop = 0, stop - start
        try:
            return np.array(mapped[start:stop])
        finally:
            mapped._mmap.close()  # type: ignore[attr-defined]  # unmapped now: its pages leave the process

    def _safetensors_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:  # opened per batch: the mapping goes with it
            return f.get_slice(name)[start:stop].clone()


class _NpzRows:
    """Rows of an ``.npz``'s members, each read from the zip as it goes (one open
    member per array, kept for the iteration: a compressed one only ever moves forward)."""

    def __init__(self, file: _File, archive: zipfile.ZipFile, stack: contextlib.ExitStack) -> None:
        self.file, self.archive, self.stack = file, archive, stack
        self.members: dict[str, Any] = {}
        self.whole: dict[str, np.ndarray] = {}
        self.names = {info.filename.removesuffix(".npy"): info.filename for info in archive.infolist()}

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        member_name = self.names[name]
        offset, fortran, dtype = self.file._offsets[member_name]
        shape = next(a.shape for a in self.file.arrays if a.name == name)
        if fortran:
            if name not in self.whole:
                with self.archive.open(member_name) as member:
                    self.whole[name] = np.lib.format.read_array(member, allow_pickle=False)
            return self.whole[name][start:stop]
        if name not in self.members:
            self.members[name] = self.stack.enter_context(self.archive.open(member_name))
        member = self.members[name]
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        member.seek(offset + start * row)
        data = member.read((stop - start) * row)
        if len(data) != (stop - start) * row:
            raise DataError(f"data file {self.file.path} (member {member_name}) ends before its header says: it is truncated")
        return np.frombuffer(bytearray(data), dtype=dtype).reshape(stop - start, *shape[1:])  # writable: torch takes it as it is


def _open_file(path: Path) -> _File:
    from ..base.serialize import reason, unreadable

    try:
        return _File(path)
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"data file {path} is corrupted or unreadable ({reason(e)})") from e
    except BaseException as e:  # safetensors' and torch's errors on its header, a panic of safetensors
        if not unreadable(e):
            raise
        raise DataError(f"data file {path} is corrupted or unreadable ({reason(e)})") from e


# --- a stream of data files ----------------------------------------------------------------


class ArrayStream(Stream):
    """Batches of ``batch_size`` rows from data files in order (batches span
    files); ``limit``: the first this many samples only. Random access by batch
    index (``stream[i]``, ``len(stream)``) reads that batch's rows only."""

    def __init__(self, files: Sequence[_File], size: int, limit: int | None = None) -> None:
        self.files, self.size = list(files), size
        total = sum(f.samples for f in self.files)
        self.count: int = total if limit is None else min(limit, total)
        self.samples = self.count
        first = self.files[0]
        names = [a.name for a in first.arrays]
        from .arrays import POSITIONAL

        self.form = "tensor" if len(names) == 1 else ("tuple" if all(n.startswith(POSITIONAL) for n in names) else "dict")
        self.names = names  # a batch's arrays in the first file's order, whichever shards it spans
        self.starts = [0]
        for f in self.files:
            self.starts.append(self.starts[-1] + f.samples)

    def __len__(self) -> int:
        return math.ceil(self.count / self.size)

    def __repr__(self) -> str:
        return f"ArrayStream({len(self.files)} file(s), {self.count} samples, batches of {self.size})"

    def _batch(self, pieces: list[dict[str, torch.Tensor]]) -> Batch:
        names = self.names if len(self.names) > 1 else list(pieces[0])
        joined = {k: pieces[0][k] if len(pieces) == 1 else torch.cat([p[k] for p in pieces]) for k in names}
        if self.form == "tensor":
            return joined[names[0]]
        if self.form == "tuple":
            return tuple(joined.values())
        return joined

    def _rows(self, start: int, stop: int) -> Iterator[Batch]:
        """Batches of ``size`` rows covering samples ``start:stop``."""
        pieces: list[dict[str, torch.Tensor]] = []
        have = 0
        for f, first in zip(self.files, self.starts):
            if first + f.samples <= start or first >= stop:
                continue
            with f.reader() as read:
                pos = max(start - first, 0)
                end = min(stop - first, f.samples)
                while pos < end:
                    take = min(self.size - have, end - pos)
                    pieces.append(read(pos, pos + take))
                    have, pos = have + take, pos + take
                    if have == self.size:
                        yield self._batch(pieces)
                        pieces, have = [], 0
        if pieces:
            yield self._batch(pieces)

    def __iter__(self) -> Iterator[Batch]:
        return self._rows(0, self.count)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        count = len(self)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError(f"batch {index} of {count}")
        start = index * self.size
        return next(self._rows(start, min(start + self.size, self.count)))

    def head(self, count: int) -> ArrayStream:
        return ArrayStream(self.files, self.size, min(count, self.count))

    def shape_examples(self) -> list[Batch]:
        """The first and the last batch: every batch has the shape of one of them."""
        return [self[0], self[-1]] if len(self) > 1 else [self[0]]


def array_stream(source: str | Path, batch_size: int) -> ArrayStream:
    """The batches of ``source`` (a data file, a directory of them or a glob; see
    the module docstring), every file's header checked and the shards compared now."""
    files = [_open_file(path) for path in data_paths(source)]
    first = files[0]
    for f in files[1:]:
        # named arrays (dict batches) are matched by name, in whatever order a shard holds them
        names, other = [a.name for a in first.arrays], [a.name for a in f.arrays]
        if len(other) != len(names) or (len(names) > 1 and sorted(other) != sorted(names)):
            raise DataError(
                f"data shard {f.path} holds arrays {', '.join(other)} but the first shard {first.path} holds "
                f"{', '.join(names)}: every shard must hold the same arrays"
            )
        by_name = {b.name: b for b in f.arrays}
        for a, b in zip(first.arrays, [by_name[n] for n in names] if len(names) > 1 else f.arrays):
            if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                raise DataError(
                    f"data shard {f.path} holds {b.name!r} samples of {b.sample()} but the first shard {first.path} holds "
                    f"{a.sample()}: every shard must hold samples of one shape and dtype"
                )
    return ArrayStream(files, batch_size)


# --- text ------------------------------------------------------------------------------------


#: the longest line a text file may hold (bytes): a text is cut to the model's token limit anyway, and a
#: file without line breaks would otherwise be read whole into memory
MAX_LINE_BYTES = 16 * 2**20


def text_lines(path: str | Path) -> Iterator[str]:
    """The texts of a file, read line by line: one per line, or a ``.jsonl`` file's
    ``text`` fields; blank ones skipped (what ``hf.read_texts`` reads, without holding it).
    A leading byte order mark is dropped and ``\r\n`` / ``\r`` end a line; a line that is
    not UTF-8 is refused naming its number, and so is one over :data:`MAX_LINE_BYTES`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} does not exist or is not a file")
    jsonl = path.suffix.lower() == ".jsonl"
    number = 0
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    return
                number += 1
                if len(raw) > MAX_LINE_BYTES:
                    raise DataError(f"text file {path}, line {number} is longer than {MAX_LINE_BYTES:,} bytes: split it "
                                    "(one text per line; a text is cut to the model's token limit anyway)")
                try:
                    decoded = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"text file {path}, line {number} is not readable UTF-8 text ({first_line(e)}): save it as UTF-8") from e
                # universal newlines, as a file opened as text reads them: \r\n and a lone \r end lines too
                for line in decoded.removesuffix("\n").removesuffix("\r").split("\r"):
                    text = _text_of(line, path, number, jsonl)
                    if text is not None:
                        yield text
    except OSError as e:
        raise DataError(f"text file {path} cannot be read (line {number + 1}: {type(e).__name__}: {first_line(e)})") from e


def _text_of(line: str, path: Path, number: int, jsonl: bool) -> str | None:
    """The text of a line (None for a blank one): the line, or a ``.jsonl`` line's ``text`` field."""
    if not line.strip():
        return None
    if not jsonl:
        return line
    try:
        record = json.loads(line)
    except RecursionError as e:
        raise DataError(f"{path}, line {number}: nested too deep to read (arrays or objects inside each other thousands of "
                        'levels deep); a .jsonl file holds one object per line, like {"text": "..."}') from e
    except ValueError as e:
        raise DataError(f"{path}, line {number}: not JSON ({first_line(e)}); a .jsonl file holds one object per line") from e
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise DataError(f'{path}, line {number}: needs a "text" field holding a string, like {{"text": "..."}}')
    return text if text.strip() else None


# --- a tokenizer at work ---------------------------------------------------------------------

#: characters of a text tokenized per token of the maximum length (``--max-length``, else the model's): the rest of a
#: longer text is cut before the tokenizer sees it. Text averages about 4 characters a token; a text whose cut part
#: makes fewer tokens than the maximum (long runs of what the tokenizer drops) is tokenized again with 4 times as much
#: of it, until it makes them, is whole, or reaches :data:`MAX_CHARS_PER_TOKEN`
CHARS_PER_TOKEN = 16
#: characters of a text tokenized per token of the maximum length at most: the tokens of a longer text whose first
#: characters make fewer tokens than the maximum are those of its first this many characters per token
MAX_CHARS_PER_TOKEN = 256
#: characters tokenized in one call at most (a batch's texts go in several calls beyond it): a tokenizer's memory
#: grows with the text it is given (about 250 bytes a character for a byte-level BPE)
GROUP_CHARS = 1 << 21
#: how often the thread waiting for a tokenizer looks at signals and the deadline (seconds)
POLL_SECONDS = 0.1

_deadline: contextvars.ContextVar[tuple[float, Callable[[], BaseException]] | None] = contextvars.ContextVar(
    "actsparse_tokenizer_deadline", default=None
)


@contextlib.contextmanager
def reading_deadline(deadline: float | None, error: Callable[[], BaseException]) -> Iterator[None]:
    """For the block: a tokenizer still at work at ``deadline`` (``time.monotonic()``) is
    left to itself and ``error()`` raised (validation's ``timeout``); None: no limit."""
    token = _deadline.set(None if deadline is None else (deadline, error))
    try:
        yield
    finally:
        _deadline.reset(token)


#: the first line of a Rust panic's report on stderr
_PANIC_LINE = re.compile(rb"thread '[^\n]*' (\(\d+\) )?panicked at ")


def _without_panic_reports(held: bytes, message: str) -> bytes:
    """``held`` less each Rust panic report of ``message``: the blank line before it, its "thread '...' panicked
    at" line, the message's lines and the note or backtrace after them; every other line is kept."""
    lines, kept, i = held.splitlines(keepends=True), [], 0
    told = [line.encode(errors="replace") for line in message.splitlines()]
    while i < len(lines):
        if not _PANIC_LINE.match(lines[i]):
            kept.append(lines[i])
            i += 1
            continue
        if kept and not kept[-1].strip():
            kept.pop()
        i += 1
        for line in told:
            i += i < len(lines) and lines[i].rstrip(b"\r\n") == line
        if i < len(lines) and lines[i].rstrip(b"\r\n") == b"stack backtrace:":
            i += 1
            while i < len(lines) and lines[i].startswith(b" "):
                i += 1
        i += i < len(lines) and lines[i].startswith(b"note: ") and b"RUST_BACKTRACE" in lines[i]
    return b"".join(kept)


@contextlib.contextmanager
def _stderr_held() -> Iterator[Callable[[BaseException], None]]:
    """For the block, what is written on the process's stderr (file descriptor 2: a Rust panic's report) goes to a
    temporary file; after it, that is written to stderr, less the reports of the panic given to the function yielded
    (nothing is held where no temporary file can be made, or there is no stderr).
    A crash of the whole process while stderr is held loses what was held."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    held, saved = None, -1
    with contextlib.suppress(OSError):
        held = tempfile.TemporaryFile()
        saved = os.dup(2)
    if held is None or saved < 0:
        if held is not None:
            held.close()
        yield lambda panic: None
        return
    with held:
        panics: list[BaseException] = []
        os.dup2(held.fileno(), 2)
        try:
            yield panics.append
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            with contextlib.suppress(OSError):
                data = held.read()
                for panic in panics:
                    data = _without_panic_reports(data, str(panic))
                view = memoryview(data)
                while view:
                    view = view[os.write(2, view):]


def run_tokenizer(fn: Callable[[], T], fails: Callable[[BaseException], ActsparseError]) -> T:
    """``fn()``, a tokenizer loading or tokenizing, in a worker thread while this thread waits: a signal
    (KeyboardInterrupt, Terminated) or the :func:`reading_deadline` ends the wait (inside the tokenizers library
    the worker cannot be stopped: it is left to end with the process). Its errors and its Rust panics become
    ``fails(e)``; the panic's own report on stderr is dropped (what else it writes there is kept)
    (:func:`~actsparse_deploy.base.waiting.run_in_worker`)."""

    def attempt() -> tuple[bool, Any]:  # the tokenizer's own failure (a panic too) comes back as a value: it is translated here
        try:
            return True, fn()
        except BaseException as e:  # handed to the waiting thread
            return False, e

    limit = _deadline.get()
    with _stderr_held() as drop:
        ok, value = run_in_worker(attempt, name="actsparse-tokenizer", deadline=limit[0] if limit is not None else None,
                                  expired=limit[1] if limit is not None else None, poll=POLL_SECONDS)
        error: BaseException | None = None if ok else value
        if error is not None and is_panic(error):
            drop(error)
    if error is None:
        return value  # type: ignore[no-any-return]
    if isinstance(error, ActsparseError):
        raise error
    if isinstance(error, Exception) or is_panic(error):
        raise fails(error) from error
    raise error


def _which(numbers: list[int]) -> str:
    """``numbers`` of texts as a message names them: "text 6", "texts 1-8", "texts 2, 6"."""
    if len(numbers) == 1:
        return f"text {numbers[0]}"
    if numbers[-1] - numbers[0] == len(numbers) - 1:
        return f"texts {numbers[0]}-{numbers[-1]}"
    return "texts " + ", ".join(map(str, numbers[:8])) + (", ..." if len(numbers) > 8 else "")


def _groups(texts: Sequence[str]) -> Iterator[list[int]]:
    """Indices of ``texts`` in runs of at most :data:`GROUP_CHARS` characters (a longer text alone)."""
    group: list[int] = []
    size = 0
    for i, text in enumerate(texts):
        if group and size + len(text) > GROUP_CHARS:
            yield group
            group, size = [], 0
        group.append(i)
        size += len(text)
    if group:
        yield group


class TextStream(Stream):
    """Token batches of a text file made by a Hugging Face model's tokenizer
    (``hf``: an ``HFSource``), ``size`` texts at a time, read line by line: each
    batch padded (right) to its longest text (``HFSource.text_batches`` reads one whole).
    Each text is cut to :data:`CHARS_PER_TOKEN` characters per token of the maximum
    length before it is tokenized, and the tokenizer runs in a worker (:func:`run_tokenizer`)."""

    form = "dict"

    def __init__(self, hf: Any, path: str | Path, size: int) -> None:
        self.hf, self.path, self.size = hf, Path(path), size
        self.samples = None  # counting would read the file
        if next(iter(self), None) is None:  # the first batch now: a file that fails on its first texts fails here
            raise DataError(f"text file {self.path} holds no text (every line is blank)")

    def __repr__(self) -> str:
        return f"TextStream({self.path}, batches of {self.size})"

    def __iter__(self) -> Iterator[Batch]:
        texts: list[str] = []
        number = 0
        for text in text_lines(self.path):
            texts.append(text)
            if len(texts) == self.size:
                yield self._tokenize(texts, number)
                number, texts = number + len(texts), []
        if texts:
            yield self._tokenize(texts, number)

    def _encode(self, texts: list[str], numbers: list[int], limit: int) -> list[list[int]]:
        """The token ids of ``texts`` (cut to ``limit`` tokens; ``numbers``: their numbers in the file), a group of
        texts per call, each in the worker."""
        hf, path = self.hf, self.path
        tokenizer = hf.tokenizer()

        def encode(part: list[str], which: str) -> tuple[Callable[[], list[list[int]]], Callable[[BaseException], DataError]]:
            def fails(e: BaseException) -> DataError:
                what = "panicked" if is_panic(e) else "fails"
                return DataError(f"the tokenizer of {hf.directory} {what} on {path} ({which}): {type(e).__name__}: {first_line(e)}")

            return lambda: list(tokenizer(part, truncation=True, max_length=limit, padding=False)["input_ids"]), fails

        ids: list[list[int]] = [[] for _ in texts]
        for group in _groups(texts):
            for i, row in zip(group, run_tokenizer(*encode([texts[i] for i in group], _which([numbers[i] for i in group])))):
                ids[i] = list(row)
        return ids

    def _token_ids(self, texts: list[str], before: int) -> list[list[int]]:
        """The tokens the texts make, up to the maximum length, tokenizing only as much of each text as that takes
        (and never more than :data:`MAX_CHARS_PER_TOKEN` characters per token of it)."""
        limit = self.hf._limit()
        cut, most = limit * CHARS_PER_TOKEN, limit * MAX_CHARS_PER_TOKEN
        ids = self._encode([t[:cut] for t in texts], list(range(before + 1, before + len(texts) + 1)), limit)
        while cut < most and (short := [i for i, t in enumerate(texts) if len(t) > cut and len(ids[i]) < limit]):
            cut = min(cut * 4, most)  # its first characters made too few tokens: more of it
            for i, row in zip(short, self._encode([texts[i][:cut] for i in short], [before + 1 + i for i in short], limit)):
                ids[i] = row
        return ids

    def _tokenize(self, texts: list[str], before: int) -> Batch:
        hf, path = self.hf, self.path
        ids = self._token_ids(texts, before)
        tokenizer = hf.tokenizer()
        vocab = getattr(hf.config, "vocab_size", None)
        for number, row in enumerate(ids, before + 1):
            if not row:
                raise DataError(f"text {number} of {path} makes no tokens: remove it or fix the tokenizer")
            if isinstance(vocab, int) and max(row) >= vocab:
                raise DataError(
                    f"the tokenizer of {hf.directory} gives token id {max(row)} (text {number} of {path}) but the model's "
                    f"vocabulary has {vocab} entries: the tokenizer does not belong to this model"
                )
        pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        longest = max(len(r) for r in ids)
        input_ids = torch.full((len(ids), longest), pad, dtype=torch.int64)
        mask = torch.zeros((len(ids), longest), dtype=torch.int64)
        for i, row in enumerate(ids):
            input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
            mask[i, :len(row)] = 1
        batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in hf.model.input_names():
            batch["token_type_ids"] = torch.zeros_like(input_ids)
        return batch


def shape_examples(*sources: Iterable[Batch] | None) -> Iterator[Batch]:
    """Batches showing every shape of ``sources``' batches (export infers dynamic
    axes from them): a stream's :meth:`Stream.shape_examples` (of a file stream,
    its first and last batch only), a list's batches; a one-shot iterable is skipped
    (reading it here would use it up)."""
    for source in sources:
        if isinstance(source, Stream):
            yield from source.shape_examples()
        elif isinstance(source, (list, tuple)):
            yield from source
