"""The batch union, in one place: a batch is a tensor, a tuple (or list) of
tensors, or a dict of tensors, and the model is called as ``model(t)``,
``model(*t)`` or ``model(**d)``. Everything that depends on that form lives
here: running the model on a batch, its size and description, slicing and
re-batching, positional arguments and input names (export, ``.pt2``), and
onnxruntime feeds. Model outputs (tensor, tuple / list, dict, ``ModelOutput``)
are flattened here too.

    >>> import torch
    >>> from actsparse_deploy.data.batches import batch_size, describe_batch, input_names, positional, resize_batches
    >>> batch = {"input_ids": torch.zeros(4, 7, dtype=torch.int64), "attention_mask": torch.ones(4, 7)}
    >>> batch_size(batch), describe_batch(batch)
    (4, 'input_ids int64[4, 7], attention_mask float32[4, 7]')
    >>> input_names(batch), input_names((torch.ones(2), torch.ones(2))), input_names(torch.ones(2))
    (('input_ids', 'attention_mask'), ('input_0', 'input_1'), ('input',))
    >>> [describe_batch(b) for b in resize_batches([torch.ones(5, 3)], 2)]
    ['float32[2, 3]', 'float32[2, 3]']
    >>> [tuple(t.shape) for t in positional(batch, ("attention_mask", "input_ids"))]
    [(4, 7), (4, 7)]
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias, Union, overload

import numpy as np
import torch

from ..base.errors import DataError, ExportError

__all__ = [
    "TUNING_FRACTION",
    "split_tuning",
    "cast_floats",
    "map_batches",
    "first_batch",
    "mean_tokens",
    "Generated",
    "Stream",
    "reiterable",
    "Batch",
    "as_positional",
    "batch_size",
    "call_args",
    "cut_axes",
    "describe_batch",
    "first_samples",
    "flatten_outputs",
    "head_samples",
    "input_names",
    "is_named",
    "model_device",
    "named_tensors",
    "numpy_feeds",
    "positional",
    "resize_batches",
    "run_batch",
    "slice_batch",
    "split_batch",
    "take_rows",
    "to_device",
    "total_samples",
    "unpadded",
]

Batch: TypeAlias = Union[torch.Tensor, tuple[torch.Tensor, ...], list[torch.Tensor], Mapping[str, torch.Tensor]]  # noqa: UP007 (torch is untyped to mypy: an X | Y alias would not be a type)

_FORMS = "a tensor, a tuple of tensors or a dict of tensors"


def is_named(batch: Batch) -> bool:
    """A dict batch: its tensors are passed by name (``model(**batch)``)."""
    return isinstance(batch, Mapping)


def call_args(batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)``: how the model is called on ``batch``."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise DataError(f"a batch must be {_FORMS}, not {type(batch).__name__}")


def run_batch(model: Any, batch: Batch) -> Any:
    """``model(t)``, ``model(*t)`` or ``model(**d)`` by the batch's form."""
    args, kwargs = call_args(batch)
    return model(*args, **kwargs)


def _tensors(batch: Batch) -> list[Any]:
    args, kwargs = call_args(batch)
    return list(kwargs.values()) if kwargs else list(args)


def cast_floats(batch: Batch, dtype: torch.dtype) -> Batch:
    """``batch`` with each floating tensor in ``dtype`` (token ids, masks of integers and
    booleans kept as they are): the inputs of a model whose weights are in ``dtype``.

    >>> cast_floats({"x": torch.ones(1, 2), "ids": torch.ones(1, 2, dtype=torch.long)}, torch.float16)["x"].dtype
    torch.float16
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {k: cast_floats(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cast_floats(v, dtype) for v in batch)
    return batch


def map_batches(batches: Iterable[Batch], fn: Callable[[Batch], Batch]) -> Iterable[Batch]:
    """Each batch through ``fn``, in the form ``batches`` came in: a stream stays a stream
    (read afresh on each use), a list a list, any other iterable is mapped as it is read."""
    if isinstance(batches, Stream):
        return batches.map(fn)
    if isinstance(batches, list):
        return [fn(b) for b in batches]
    return (fn(b) for b in batches)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with each tensor on ``device`` (a tensor already there is kept as it is)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def model_device(model: Any) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any; parameters on the meta device,
    whose weights wait on disk until their layer runs, are not where it runs)."""
    first = next((p for p in model.parameters() if not p.is_meta), None)
    return first.device if first is not None else torch.device("cpu")


def batch_size(batch: Batch) -> int:
    """The length of the batch's first tensor's first axis."""
    first = next(iter(_tensors(batch)), None)
    if not isinstance(first, torch.Tensor) or first.ndim == 0:
        raise DataError("a batch must hold at least one tensor with a batch axis")
    return int(first.shape[0])


def total_samples(batches: Iterable[Batch] | None) -> int | None:
    """The number of samples in a list of batches or a stream that knows it (its
    ``samples``: a ``.npy``'s header says it); None for a one-shot iterable
    (counting would use it up), a stream that would have to be read, or no batches."""
    if isinstance(batches, list):
        return sum(batch_size(b) for b in batches)
    return getattr(batches, "samples", None) if _is_stream(batches) else None


def _is_stream(batches: Any) -> bool:
    return isinstance(batches, Stream)


def describe_batch(batch: Batch) -> str:
    """Shapes and dtypes, for error messages: ``input_ids int64[8, 128], ...``."""

    def one(t: Any) -> str:
        if not isinstance(t, torch.Tensor):
            return type(t).__name__
        return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"

    if isinstance(batch, Mapping):
        return ", ".join(f"{k} {one(v)}" for k, v in batch.items())
    if isinstance(batch, (tuple, list)):
        return ", ".join(one(t) for t in batch)
    return one(batch)


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Rows ``start:stop`` of every tensor (a list batch becomes a tuple)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: v[start:stop] for k, v in batch.items()}
    return tuple(t[start:stop] for t in batch)


def take_rows(batch: Batch, rows: Sequence[int]) -> Batch:
    """Rows ``rows`` (indices along the batch axis) of every tensor (a list batch becomes a tuple)."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    if isinstance(batch, torch.Tensor):
        return batch[index]
    if isinstance(batch, Mapping):
        return {k: v[index] for k, v in batch.items()}
    return tuple(t[index] for t in batch)


@overload
def unpadded(batches: list[Batch], size: int = 32) -> list[Batch]: ...
@overload
def unpadded(batches: Iterable[Batch], size: int = 32) -> Iterable[Batch]: ...
def unpadded(batches: Iterable[Batch], size: int = 32) -> Iterable[Batch]:
    """Token batches without padding: where every batch of a list is a dict of
    ``(batch, tokens)`` tensors with a right-padded 0/1 ``attention_mask``, the
    samples regrouped by length (up to ``size`` per batch, each trimmed to its
    length); anything else, and a one-shot iterable (regrouping would use it
    up), as it is. The statistics then see only real tokens (padding is
    about 40 % of MiniLM's padded calibration batches: wasted work, and vectors
    that bias the statistics, the Gram matrix the refit fits to included), and
    the cost is measured faster. A :class:`Stream` is
    regrouped the same way a window of :data:`UNPAD_WINDOW` samples at a time
    (lazily, on each iteration: never held whole), except one known to hold
    tensors or tuples (its ``form``), which is returned as it is."""
    if _is_stream(batches):
        stream: Any = batches
        if stream.form in ("tensor", "tuple"):  # nothing to unpad: the stream stays one (a rank then reads its rows only)
            return stream
        return Generated(lambda: _unpadded_windows(stream, size), stream.samples)
    if not isinstance(batches, list):
        return batches
    return _regroup(batches, size) or batches


#: samples a stream's token batches are regrouped over at a time (:func:`unpadded`)
UNPAD_WINDOW = 1024


def _unpadded_windows(batches: Iterable[Batch], size: int) -> Iterator[Batch]:
    window: list[Batch] = []
    count = 0
    for b in batches:
        window.append(b)
        count += batch_size(b)
        if count >= UNPAD_WINDOW:
            yield from _regroup(window, size) or window
            window, count = [], 0
    if window:
        yield from _regroup(window, size) or window


def _regroup(batches: list[Batch], size: int) -> list[Batch] | None:
    """The samples of token batches regrouped by length (see :func:`unpadded`); None for other batches."""
    rows: list[tuple[int, dict[str, torch.Tensor]]] = []
    for b in batches:
        if not isinstance(b, Mapping):
            return None
        mask = b.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.is_floating_point():
            return None
        if any(not isinstance(v, torch.Tensor) or v.shape != mask.shape for v in b.values()):
            return None
        lengths = mask.sum(1)
        prefix = torch.arange(mask.shape[1])[None, :] < lengths[:, None]
        if not bool((prefix.to(mask.dtype) == mask).all()) or bool((lengths == 0).any()):
            return None
        for i, length in enumerate(lengths.tolist()):
            rows.append((length, {k: v[i, :length] for k, v in b.items()}))
    rows.sort(key=lambda row: row[0])
    out: list[Batch] = []
    start = 0
    while start < len(rows):
        stop = start + 1
        while stop < len(rows) and stop - start < size and rows[stop][0] == rows[start][0]:
            stop += 1
        out.append({k: torch.stack([row[1][k] for row in rows[start:stop]]) for k in rows[start][1]})
        start = stop
    return out


def first_samples(batches: Iterable[Batch], count: int | None) -> Iterable[Batch]:
    """The first ``count`` samples of ``batches`` (a batch across the cut is
    sliced; the rest is never read), or ``batches`` as they are for None; of a
    stream, a stream (re-iterable, reading those samples only)."""
    if count is None:
        return batches
    if _is_stream(batches):
        return batches.head(count)  # type: ignore[attr-defined]
    return list(head_samples(batches, count)) if isinstance(batches, list) else head_samples(batches, count)


def head_samples(batches: Iterable[Batch], count: int) -> Iterator[Batch]:
    """The batches up to ``count`` samples, the batch across the cut sliced; reads no further."""
    left = count
    if left <= 0:
        return
    for batch in batches:
        n = batch_size(batch)
        yield batch if n <= left else slice_batch(batch, 0, left)
        left -= n
        if left <= 0:
            return


def split_batch(batch: Batch, size: int) -> list[Batch]:
    """``batch`` in pieces of ``size`` rows; the last may be shorter."""
    n = batch_size(batch)
    return [slice_batch(batch, start, start + size) for start in range(0, n, size)]


def resize_batches(batches: Iterable[Batch], size: int, max_samples: int | None = None) -> list[Batch]:
    """Cut each batch into pieces of exactly ``size`` rows (a shorter remainder is
    dropped), keeping each batch's other axes (sequence length) as they are."""
    out: list[Batch] = []
    taken = 0
    for batch in batches:
        n = batch_size(batch)
        for start in range(0, n - size + 1, size):
            if max_samples is not None and taken + size > max_samples:
                return out
            out.append(slice_batch(batch, start, start + size))
            taken += size
    return out


def input_names(batch: Batch) -> tuple[str, ...]:
    """The names a batch's inputs get where nothing else names them: a dict's
    keys, else ``input`` (one tensor) or ``input_0, input_1, ...``."""
    if isinstance(batch, torch.Tensor):
        return ("input",)
    if isinstance(batch, Mapping):
        return tuple(batch)
    return tuple(f"input_{i}" for i in range(len(batch)))


def positional(batch: Batch, names: Sequence[str] | None = None) -> tuple[torch.Tensor, ...]:
    """The batch's tensors in order: a dict's in ``names`` order (default: its own)."""
    if isinstance(batch, Mapping):
        return tuple(batch[name] for name in (names if names is not None else batch))
    return tuple(_tensors(batch))


def as_positional(batches: Iterable[Batch], names: Sequence[str]) -> list[Batch] | Iterable[Batch]:
    """Dict batches as tuples in ``names`` order (what a ``.pt2`` program takes);
    of a stream, a stream converting each batch as it is read."""
    if _is_stream(batches):
        return batches.map(lambda b: positional(b, names) if isinstance(b, Mapping) else b)  # type: ignore[attr-defined]
    return [positional(b, names) if isinstance(b, Mapping) else b for b in batches]


def named_tensors(batch: Batch, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """A batch's tensors by input name: a dict's keys, else ``names`` (an I/O
    spec's), else :func:`input_names`. Never matched by position alone."""
    if isinstance(batch, Mapping):
        return dict(batch)
    tensors = _tensors(batch)
    names = list(names) if names is not None else list(input_names(batch))
    if len(names) != len(tensors):
        raise DataError(
            f"a batch holds {len(tensors)} input tensor(s) but the I/O spec names {len(names)} ({', '.join(names)})"
        )
    return dict(zip(names, tensors))


def cut_axes(batch: Batch, names: Sequence[str], where: Sequence[tuple[str, int]]) -> Batch | None:
    """``batch`` (its inputs named ``names``, see :func:`named_tensors`) with each
    ``(input, axis)`` of ``where`` cut to half its length, contiguous (a model may
    ``view`` its input); None where one of them is shorter than 2 or missing."""
    tensors = named_tensors(batch, names)
    if any(name not in tensors or tensors[name].ndim <= axis or tensors[name].shape[axis] < 2 for name, axis in where):
        return None
    cut = dict(tensors)
    for name, axis in where:
        cut[name] = cut[name].narrow(axis, 0, int(tensors[name].shape[axis]) // 2).contiguous()
    if is_named(batch):
        return cut
    ordered = tuple(cut[name] for name in names)
    return ordered[0] if isinstance(batch, torch.Tensor) else ordered


def numpy_feeds(tensors: Mapping[str, torch.Tensor], order: Sequence[str]) -> dict[str, np.ndarray]:
    """onnxruntime feeds: the named tensors as numpy arrays, in ``order``."""
    return {name: tensors[name].detach().cpu().numpy() for name in order}


def flatten_outputs(out: Any) -> tuple[torch.Tensor, ...]:
    """A model's output as a flat tuple of tensors (tensor, tuple / list, dict,
    ModelOutput); ``None`` entries (an optional output not computed) are skipped."""
    if out is None:
        return ()
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, Mapping):
        out = tuple(out.values())
    if isinstance(out, (tuple, list)):
        flat: list[torch.Tensor] = []
        for item in out:
            flat.extend(flatten_outputs(item))
        return tuple(flat)
    raise ExportError(f"model output of type {type(out).__name__} is not a tensor, tuple or dict of tensors")


class Stream(abc.ABC):
    """Batches read afresh on each iteration. ``samples``: how many samples (None
    where counting would mean reading the data). A source is a subclass that
    says how to read it from the start (``__iter__``)."""

    samples: int | None = None
    #: what each batch is, where known without reading: "tensor", "tuple" or "dict" (None: unknown)
    form: str | None = None

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Batch]: ...

    def __getitem__(self, index: int | slice) -> Any:
        """Batch ``index`` (or a list of them), read from the start: non-negative indices only."""
        if isinstance(index, slice):
            if any(v is not None and v < 0 for v in (index.start, index.stop, index.step)):
                raise IndexError("a stream is indexed from its start: no negative indices")
            return list(itertools.islice(self, index.start, index.stop, index.step))
        if index < 0:
            raise IndexError("a stream is indexed from its start: no negative indices")
        for batch in itertools.islice(self, index, None):
            return batch
        raise IndexError(f"batch {index} is past the end of the stream")

    def head(self, count: int) -> Stream:
        """The first ``count`` samples (a batch across the cut is sliced; the rest is never read)."""
        samples = None if self.samples is None else min(count, self.samples)
        return Generated(lambda: head_samples(self, count), samples)

    def map(self, fn: Callable[[Batch], Batch]) -> Stream:
        """Each batch through ``fn`` (the same number of samples)."""
        return Generated(lambda: (fn(b) for b in self), self.samples)

    def shape_examples(self) -> Iterable[Batch]:
        """Batches that show every shape the stream's batches take (all of them, unless known)."""
        return self


class Generated(Stream):
    """The batches ``make()`` yields, made again on each iteration."""

    def __init__(self, make: Callable[[], Iterable[Batch]], samples: int | None = None) -> None:
        self._make = make
        self.samples = samples

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._make())


def reiterable(batches: Any) -> bool:
    """Whether ``batches`` can be gone over again (a list or a :class:`Stream`), not a one-shot iterable."""
    return isinstance(batches, (list, tuple, Stream))


def first_batch(batches: list[Batch] | Iterable[Batch] | None) -> Batch | None:
    """The first batch of a list or a stream (an iterable from a data function is not read twice)."""
    if isinstance(batches, list):
        return batches[0] if batches else None
    return next(iter(batches), None) if isinstance(batches, Stream) else None


def mean_tokens(batches: Iterable[Batch]) -> float:
    """The mean number of positions a sample of token batches has (a dict with ``input_ids``:
    its ``attention_mask``'s ones, else its length); 0 where no batch is one of tokens.

        >>> import torch
        >>> mean_tokens([{"input_ids": torch.zeros(2, 4), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}])
        3.0
    """
    positions = samples = 0
    for batch in batches:
        if not isinstance(batch, Mapping):
            continue
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
            continue
        positions += int(mask.sum()) if isinstance(mask, torch.Tensor) and mask.shape == ids.shape else ids.numel()
        samples += ids.shape[0]
    return positions / samples if samples else 0.0


# --- the tuning split ---------------------------------------------------------------

#: the share of the calibration samples (every fifth, spread through the data) a budget search or smoothing tunes on
TUNING_FRACTION = 0.2


def split_tuning(batches: Iterable[Batch], fraction: float = TUNING_FRACTION) -> tuple[Iterable[Batch], Iterable[Batch]]:
    """``(calibration, tuning)``: ``fraction`` of the samples (at least one),
    spread evenly through the data (sample ``i`` tunes where ``floor((i + 1) *
    fraction)`` steps up: every fifth at 20 %), are the tuning split; the others
    calibrate. Calibration data often comes in the order of its source
    (documents, files, classes): an even spread keeps the tuning split like the
    rest, where its last part would be a corner of it. A stream that knows its
    size (:class:`~actsparse_deploy.data.streams.Stream`) gives two streams, each
    carved as it is read (nothing held); other data is read into lists."""
    if isinstance(batches, Stream) and batches.samples is not None:
        stream, total = batches, batches.samples
        _check_tuning_total(total, fraction)
        count = max(1, round(fraction * total))
        return (Generated(lambda: (p[0] for p in _carve(stream, total, count) if p[0] is not None), total - count),  # type: ignore[return-value]
                Generated(lambda: (p[1] for p in _carve(stream, total, count) if p[1] is not None), count))
    batches = list(batches)
    total = sum(batch_size(b) for b in batches)
    _check_tuning_total(total, fraction)
    count = max(1, round(fraction * total))
    calibration: list[Batch] = []
    tuning: list[Batch] = []
    for kept, tuned in _carve(batches, total, count):
        if kept is not None:
            calibration.append(kept)
        if tuned is not None:
            tuning.append(tuned)
    return calibration, tuning


def _check_tuning_total(total: int, fraction: float) -> None:
    if total < 2:
        raise DataError(f"a budget search needs at least 2 calibration samples (it tunes on {fraction:.0%} of them), got {total}")


def _carve(batches: Iterable[Batch], total: int, count: int) -> Iterator[tuple[Batch | None, Batch | None]]:
    """``(calibration part, tuning part)`` of each batch (None where empty), as :func:`split_tuning` spreads them."""
    start = 0
    for b in batches:
        n = batch_size(b)
        tunes = [j for j in range(n) if (start + j + 1) * count // total > (start + j) * count // total]
        chosen = set(tunes)
        keeps = [j for j in range(n) if j not in chosen]
        if len(keeps) == n:
            yield b, None
        elif not keeps:
            yield None, b
        else:
            yield take_rows(b, keeps), take_rows(b, tunes)
        start += n
