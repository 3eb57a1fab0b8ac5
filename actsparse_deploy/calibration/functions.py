"""Registries of built-in aggregate, reduce and mask functions.

A built-in is named instead of passed: ``ActivationSparsifier(model,
aggregate_fn="sum_abs", reduce_fn="mean", mask_fn="topk", sparsity_level=0.5)``.
Built-in statistics do not depend on batch size: an aggregate folds each batch
into a :class:`RunningStat` over the layer's *sample axes* (every axis that the
layer treats as a separate sample: all but the last for ``Linear``, the batch for
``ConvNd``), so the statistic has the per-sample shape and a sample count.

    >>> import torch
    >>> from actsparse_deploy.calibration.functions import AGGREGATE_FNS, REDUCE_FNS, MASK_FNS
    >>> agg = AGGREGATE_FNS.get("sum_abs")
    >>> stat = agg.update(None, torch.tensor([[1.0, -2.0], [3.0, 0.0]]), sample_ndim=1)
    >>> REDUCE_FNS.get("mean")(stat)
    tensor([2., 1.], dtype=torch.float64)
    >>> MASK_FNS.get("topk")(torch.tensor([2.0, 1.0]), sparsity_level=0.5)
    tensor([1., 0.])

Register your own with the decorators ``register_aggregate_fn``,
``register_reduce_fn`` and ``register_mask_fn``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import torch

from ..base.errors import CalibrationError, ConfigError, MaskError, UnknownFunctionError
from .fields import MAX_DENSE_VALUES, feature_indices, is_int

__all__ = [
    "AGGREGATE_FNS",
    "MAX_COUNT",
    "LayerStats",
    "same_statistic",
    "stat_tensor",
    "MASK_FNS",
    "REDUCE_FNS",
    "Aggregate",
    "BuiltinFn",
    "Registry",
    "RunningStat",
    "register_aggregate_fn",
    "register_mask_fn",
    "register_reduce_fn",
]

#: Statistics accumulate in float64 so that many batches add up without drift.
STAT_DTYPE = torch.float64


@dataclass
class RunningStat:
    """A batch-size independent statistic: one value per element of a sample.

    ``combine`` says how batches fold together: ``"sum"`` (divide by ``count``
    for a per-sample mean) or ``"max"`` (already per-sample).
    """

    value: torch.Tensor
    count: int
    combine: str

    @property
    def per_sample(self) -> torch.Tensor:
        """The statistic at the scale of one sample (a mean or a max)."""
        return self.value / self.count if self.combine == "sum" else self.value

    def index_select(self, axis: int, index: torch.Tensor) -> RunningStat:
        return RunningStat(self.value.index_select(axis, index), self.count, self.combine)

    def merge(self, other: RunningStat) -> RunningStat:
        if self.value.shape != other.value.shape:
            raise ValueError(
                f"statistic of shape {tuple(other.value.shape)} cannot join one of shape "
                f"{tuple(self.value.shape)}: the per-sample shape changed between batches"
            )
        if self.combine == "sum":
            value = self.value + other.value
        else:
            value = torch.maximum(self.value, other.value)
        return RunningStat(value, self.count + other.count, self.combine)


T = TypeVar("T")


@dataclass(frozen=True)
class BuiltinFn:
    """A registered function, possibly with bound parameters (``feature_mean``'s axis).

    Calling it calls the implementation; ``spec`` is its serialisable name form.
    """

    kind: str
    name: str
    impl: Callable[..., Any] = field(compare=False, repr=False)
    params: tuple[tuple[str, Any], ...] = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.kind == "mask":
            # a merged sparse_config may hold keys for other built-in mask functions
            # (defaults for topk, one layer on threshold): pass only this one's
            accepted = _keywords(self.impl)
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        return self.impl(*args, **dict(self.params), **kwargs)

    @property
    def spec(self) -> str | dict[str, Any]:
        """``"name"`` or ``{"name": ..., **params}``: what a recipe writes."""
        if not self.params:
            return self.name
        return {"name": self.name, **dict(self.params)}

    def __deepcopy__(self, memo: dict[int, Any]) -> BuiltinFn:
        return self  # immutable


@dataclass(frozen=True)
class Aggregate(BuiltinFn):
    """A built-in aggregate: ``batch_stat(x, dims)`` reduces one batch over its
    sample axes, ``combine`` folds batches together (``"sum"`` or ``"max"``)."""

    combine: str = "sum"

    def update(self, stat: RunningStat | None, x: torch.Tensor, sample_ndim: int) -> RunningStat:
        """Fold a batch ``x`` whose first ``sample_ndim`` axes are samples into ``stat``."""
        return self.fold(stat, self.batch_stat(x, tuple(range(sample_ndim))), _count(x, sample_ndim))

    def batch_stat(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """One batch reduced over ``dims`` (kept as size-1 axes where ``keepdim``)."""
        return self.impl(x, dims).to(STAT_DTYPE)

    def fold(self, stat: RunningStat | None, batch: torch.Tensor, count: int) -> RunningStat:
        new = RunningStat(batch, count, self.combine)
        return new if stat is None else stat.merge(new)

    def __call__(self, agg: Any, x: torch.Tensor) -> Any:
        """The upstream calling convention ``aggregate_fn(aggregate, input)``,
        with the batch axis as the only sample axis."""
        return self.update(agg, x, sample_ndim=1)


def _count(x: torch.Tensor, sample_ndim: int) -> int:
    return math.prod(x.shape[:sample_ndim])


class Registry(Generic[T]):
    """Name -> built-in function, filled by a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[str, BuiltinFn] = {}

    def register(self, name: str, **extra: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._fns:
                raise ValueError(f"{self.kind} function {name!r} is already registered")
            cls = Aggregate if self.kind == "aggregate" else BuiltinFn
            self._fns[name] = cls(kind=self.kind, name=name, impl=fn, **extra)
            return fn

        return decorator

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str, **params: Any) -> BuiltinFn:
        """The built-in called ``name``, with ``params`` bound (checked against its signature)."""
        try:
            fn = self._fns[name]
        except KeyError:
            raise UnknownFunctionError(
                f"unknown {self.kind} function {name!r}; known: {', '.join(self.names())}"
            ) from None
        if params:
            _check_params(fn, params)
            fn = replace(fn, params=tuple(sorted(params.items())))
        return fn

    def resolve(self, fn: Any) -> Any:
        """A name, a spec dict ``{"name": ..., **params}``, a callable or None -> the function."""
        if fn is None or (callable(fn) and not isinstance(fn, (str, dict))):
            return fn
        if isinstance(fn, str):
            return self.get(fn)
        if isinstance(fn, dict):
            params = dict(fn)
            name = params.pop("name", None)
            if not isinstance(name, str):
                raise ConfigError(f"{self.kind}_fn spec {fn!r} needs a 'name'")
            return self.get(name, **params)
        raise ConfigError(f"{fn!r} must be callable or the name of a built-in {self.kind} function")


def _check_params(fn: BuiltinFn, params: dict[str, Any]) -> None:
    """Names against the signature; values against the type of the default
    (an integer default takes integers only, a float default any real number)."""
    signature = inspect.signature(fn.impl).parameters
    accepted = list(signature)[1:]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{fn.kind} function {fn.name!r} takes no parameter {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(accepted) or 'none'}"
        )
    for key, value in params.items():
        default = signature[key].default
        if isinstance(default, bool) or default is inspect.Parameter.empty or default is None:
            continue
        if isinstance(default, int) and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(f"{fn.kind} function {fn.name!r} parameter {key} must be an integer, got {value!r}")
        if isinstance(default, float) and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise ConfigError(f"{fn.kind} function {fn.name!r} parameter {key} must be a number, got {value!r}")


@functools.cache
def _keywords(fn: Callable[..., Any]) -> frozenset[str]:
    """A function's keyword parameters after the first (cached: mask functions run per layer)."""
    return frozenset(list(inspect.signature(fn).parameters)[1:])


def check_mask_config(fn: Callable[..., Any], sparse_config: dict[str, Any]) -> None:
    """Raise ConfigError where ``sparse_config`` does not fit a mask function's
    keywords. A built-in ignores keys of the other built-ins (a layer may
    override the default mask function); any other key is an error."""
    builtin = isinstance(fn, BuiltinFn)
    try:
        sig = inspect.signature(fn.impl if isinstance(fn, BuiltinFn) else fn)
    except (TypeError, ValueError):
        return  # a builtin or C function: nothing to check
    params = list(sig.parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    name = getattr(fn, "name", getattr(fn, "__name__", repr(fn)))
    accepted = {p.name for p in params}
    known = set().union(*(_keywords(m.impl) for m in MASK_FNS._fns.values())) if builtin else accepted
    unknown = sorted(set(sparse_config) - known)
    if unknown:
        raise ConfigError(
            f"mask function {name!r} takes no sparse_config key {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(sorted(accepted)) or 'none'}"
        )
    missing = [p.name for p in params if p.default is p.empty and p.name not in sparse_config]
    if missing:
        raise ConfigError(f"mask function {name!r} needs sparse_config {', '.join(map(repr, missing))}")


AGGREGATE_FNS: Registry[Aggregate] = Registry("aggregate")
REDUCE_FNS: Registry[BuiltinFn] = Registry("reduce")
MASK_FNS: Registry[BuiltinFn] = Registry("mask")


def register_aggregate_fn(name: str, combine: str = "sum") -> Callable[..., Any]:
    """Register ``fn(x, dims) -> Tensor``: one batch reduced over its sample ``dims``.

    ``combine`` (``"sum"`` or ``"max"``) says how batch results fold together.
    """
    if combine not in ("sum", "max"):
        raise ValueError(f"combine must be 'sum' or 'max', not {combine!r}")
    return AGGREGATE_FNS.register(name, combine=combine)


def register_reduce_fn(name: str) -> Callable[..., Any]:
    """Register ``fn(data, **params) -> Tensor``; ``data`` is a RunningStat or a tensor."""
    return REDUCE_FNS.register(name)


def register_mask_fn(name: str) -> Callable[..., Any]:
    """Register ``fn(reduced, **sparse_config) -> mask`` (1 keeps, 0 zeroes)."""
    return MASK_FNS.register(name)


# --- aggregate -------------------------------------------------------------------


# Per-batch reductions run in the input's dtype (float32 sums over a batch are
# accurate to ~1e-6 and 2-14x faster than float64 or vector_norm on this CPU:
# tools/benchmark.py); totals across batches accumulate in float64.


@register_aggregate_fn("sum")
def _sum(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x.sum(dims) if dims else x


@register_aggregate_fn("sum_abs")
def _sum_abs(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x.abs().sum(dims) if dims else x.abs()


@register_aggregate_fn("sum_sq")
def _sum_sq(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return (x * x).sum(dims) if dims else x * x


@register_aggregate_fn("max_abs", combine="max")
def _max_abs(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x.abs().amax(dims) if dims else x.abs()


def _vectors(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """The batch as rows of input features, and the positions per sample.

    The feature axis is the first axis after the sample axes ``dims`` (a Linear's
    last axis; a conv's channel axis): every other axis is a position. Half
    precision is widened to float32 (squares of activations overflow float16).
    """
    n = len(dims)
    width = x.shape[n] if x.ndim > n else 1
    positions = math.prod(x.shape[n + 1 :])
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    rows = x.reshape(-1, width, positions).transpose(1, 2) if positions > 1 else x.reshape(-1, width)
    return rows.reshape(-1, width), positions


@register_aggregate_fn("moments")
def _moments(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``[sum x_j, sum x_j^2]`` over the samples, shape ``(2, d)``: the per-sample
    statistic is each input feature's mean and mean square (a conv's channels
    averaged over positions first, so the count stays the number of samples)."""
    rows, positions = _vectors(x, dims)
    out = torch.stack([rows.sum(0), (rows * rows).sum(0)])
    return out / positions if positions > 1 else out


@register_aggregate_fn("gram")
def _gram(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The augmented second moment ``sum z z^T`` with ``z = [x; 1]``, shape
    ``(d + 1, d + 1)``: per sample ``E[x x^T]``, the mean (last row) and 1 (the
    corner). One ``z.T @ z`` in the input's dtype (float32 at least) per batch;
    wide inputs compute only the blocks on and above the diagonal (the matrix is
    symmetric) and mirror them: about 30 % less arithmetic at 1536 features."""
    rows, positions = _vectors(x, dims)
    z = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    width = z.shape[1]
    blocks = min(GRAM_BLOCKS, width // GRAM_BLOCK_WIDTH)
    if blocks <= 1:
        out = z.T @ z  # one matmul gives x x^T, the sums and the count, contiguous
    else:
        out = z.new_empty(width, width)
        edges = [round(i * width / blocks) for i in range(blocks + 1)]
        for start, stop in zip(edges, edges[1:]):
            block = z[:, start:stop].T @ z[:, start:]  # rows start:stop, columns from the diagonal on
            diagonal = block[:, : stop - start].triu()
            out[start:stop, start:stop] = diagonal + diagonal.triu(1).T  # exactly symmetric
            out[start:stop, stop:] = block[:, stop - start :]
            out[stop:, start:stop] = block[:, stop - start :].T
    return out / positions if positions > 1 else out


#: the Gram aggregate splits an input of ``GRAM_BLOCK_WIDTH * b`` features or more
#: into ``b`` (at most ``GRAM_BLOCKS``) column blocks and computes only the upper ones
GRAM_BLOCKS = 8
GRAM_BLOCK_WIDTH = 128


# --- reduce ----------------------------------------------------------------------


def _per_sample(data: RunningStat | torch.Tensor) -> torch.Tensor:
    if isinstance(data, RunningStat):
        return data.per_sample
    return data.mean(dim=0)  # a raw aggregate from a user function: batch first


@register_reduce_fn("mean")
def _mean(data: RunningStat | torch.Tensor) -> torch.Tensor:
    """The per-sample statistic: sums divided by the sample count, a max as is.
    A plain tensor (from a user aggregate) is averaged over its first axis."""
    return _per_sample(data)


@register_reduce_fn("feature_mean")
def _feature_mean(data: RunningStat | torch.Tensor, axis: int = 0) -> torch.Tensor:
    """One value per feature along ``axis`` of the per-sample statistic (the
    other axes averaged, kept with size 1), for structured masks. ``axis=0`` is
    the input feature of a Linear and the channel of a ConvNd."""
    stat = _per_sample(data)
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise ConfigError(f"feature_mean axis must be an integer, got {axis!r}")
    if not -stat.ndim <= axis < stat.ndim:
        raise ConfigError(f"feature_mean axis {axis} is out of range for a statistic of shape {tuple(stat.shape)}")
    axis %= stat.ndim
    other = tuple(d for d in range(stat.ndim) if d != axis)
    return stat.mean(other, keepdim=True) if other else stat


# --- mask ------------------------------------------------------------------------


def _check_level(sparsity_level: float) -> None:
    if not (isinstance(sparsity_level, (int, float)) and 0.0 <= sparsity_level <= 1.0):
        raise ConfigError(f"sparsity_level must be a number in [0, 1], got {sparsity_level!r}")


def zero_smallest(scores: torch.Tensor, sparsity_level: float) -> torch.Tensor:
    """A 0/1 tensor like ``scores`` with the ``sparsity_level`` fraction of the
    smallest scores zeroed (ties broken by position, deterministically)."""
    _check_level(sparsity_level)
    flat = scores.reshape(-1)
    k = int(round(sparsity_level * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.float32)
    if k:
        order = torch.sort(flat, stable=True).indices
        keep[order[:k]] = 0.0
    return keep.reshape(scores.shape)


@register_mask_fn("threshold")
def _threshold(data: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero where the reduced value is below ``threshold``."""
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ConfigError(f"threshold must be a finite number, got {threshold!r}")
    return (data >= threshold).to(torch.float32)


@register_mask_fn("topk")
def _topk(data: torch.Tensor, sparsity_level: float) -> torch.Tensor:
    """Zero the ``sparsity_level`` fraction of the smallest magnitudes."""
    return zero_smallest(data.abs(), sparsity_level)


@register_mask_fn("block")
def _block(data: torch.Tensor, sparsity_level: float, sparse_block_shape: Any = (1, 4)) -> torch.Tensor:
    """L2 norms over ``sparse_block_shape`` blocks of the trailing axes (edge
    blocks may be partial); zero the ``sparsity_level`` fraction of weakest blocks."""
    block = _block_shape(sparse_block_shape, data.ndim)
    if len(block) < data.ndim:
        block = (1,) * (data.ndim - len(block)) + block
    _check_block_fits(block, tuple(data.shape))
    padded_shape = [math.ceil(n / b) * b for n, b in zip(data.shape, block)]
    padded = data.new_zeros(padded_shape, dtype=STAT_DTYPE)
    padded[tuple(slice(0, n) for n in data.shape)] = data.to(STAT_DTYPE)
    split: list[int] = []
    for n, b in zip(padded_shape, block):
        split += [n // b, b]
    blocks = padded.reshape(split)
    norms = torch.linalg.vector_norm(blocks, 2, dim=tuple(range(1, 2 * data.ndim, 2)))
    keep = zero_smallest(norms, sparsity_level)
    for axis, b in enumerate(block):
        keep = keep.repeat_interleave(b, dim=axis)
    return keep[tuple(slice(0, n) for n in data.shape)].contiguous()


def _block_shape(shape: Any, ndim: int) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    block = tuple(shape) if isinstance(shape, (list, tuple)) else ()
    if not block or not all(isinstance(b, int) and b >= 1 for b in block):
        raise ConfigError(f"sparse_block_shape must be positive integers, got {shape!r}")
    if len(block) > max(ndim, 1):
        raise ConfigError(f"sparse_block_shape {block} has more axes than the reduced data ({ndim})")
    return block


def _check_block_fits(block: tuple[int, ...], shape: tuple[int, ...]) -> None:
    """A block larger than the axis it tiles is a mistake (and would make a
    padded copy of that size): refused before anything is made."""
    if any(b > n for b, n in zip(block, shape)):
        raise ConfigError(
            f"sparse_block_shape {list(block)} is larger than the reduced "
            f"statistic of shape {list(shape)} it tiles: give blocks no larger than the data"
        )


#: a count above this is not a count of samples: a corrupted file
MAX_COUNT = 2**62


@dataclass(frozen=True)
class LayerStats:
    """One layer's statistic, as collected (see the module docstring)."""

    stat: RunningStat | torch.Tensor | tuple[RunningStat | torch.Tensor, ...]
    input_shape: tuple[int, ...]  # one sample's input, as first seen
    input_dtype: torch.dtype = torch.float32
    aggregate: str | dict[str, Any] | None = None  # the built-in's spec; None: a user aggregate
    features: tuple[Any, ...] | None = None
    feature_dim: int | None = None
    num_samples: int = 0  # inputs along the first axis that reached the layer
    num_batches: int = 0  # forward calls of the layer
    layer_types: tuple[str, ...] = ()

    @property
    def parts(self) -> tuple[RunningStat | torch.Tensor, ...]:
        """The statistic, one per selected feature (one part without features)."""
        return self.stat if isinstance(self.stat, tuple) else (self.stat,)

    @property
    def combine(self) -> str | None:
        """``"sum"`` or ``"max"`` for a built-in aggregate; ``None``: not mergeable."""
        first = self.parts[0] if self.parts else None
        return first.combine if isinstance(first, RunningStat) else None

    @property
    def count(self) -> int:
        """Samples in the statistic: every position along the layer's sample
        axes for a built-in aggregate; inputs along the first axis otherwise."""
        first = self.parts[0] if self.parts else None
        return first.count if isinstance(first, RunningStat) else self.num_samples

    @property
    def stat_shape(self) -> list[int] | list[list[int]]:
        shapes = [list(stat_tensor(p).shape) for p in self.parts]
        return shapes if self.features is not None else shapes[0]

    @property
    def data(self) -> Any:
        """The statistic in the sparsifier's ``data_groups[name]["data"]`` form."""
        return list(self.stat) if isinstance(self.stat, tuple) else self.stat

    def check(self, name: str) -> None:
        """Raise :class:`MaskError` naming layer ``name`` where the statistic is
        malformed: parts that are not tensors (or of mixed kinds), counts that
        are not integers, NaN / Inf, an input shape that is not positive
        integers, malformed features or feature_dim."""
        parts = self.parts
        if not parts or not all(isinstance(p, (RunningStat, torch.Tensor)) for p in parts):
            raise MaskError(f"statistic of layer {name!r} must be RunningStats or tensors, got {type(self.stat).__name__}")
        if len({type(p) for p in parts}) != 1:
            raise MaskError(f"statistic of layer {name!r} mixes RunningStats and tensors")
        if (self.features is None) != (not isinstance(self.stat, tuple)):
            raise MaskError(f"statistic of layer {name!r}: a per-feature statistic needs its features (and a plain one none)")
        for p in parts:
            if isinstance(p, RunningStat):
                if p.combine not in ("sum", "max") or p.combine != self.combine:
                    raise MaskError(f"statistic of layer {name!r} combines by {p.combine!r}, not 'sum' or 'max' throughout")
                if not (is_int(p.count) and 1 <= p.count <= MAX_COUNT):
                    raise MaskError(f"statistic of layer {name!r} has sample count {p.count!r}: a positive integer is needed")
            t = stat_tensor(p)
            if not isinstance(t, torch.Tensor):
                raise MaskError(f"statistic of layer {name!r} holds a {type(t).__name__}, not a tensor")
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                raise MaskError(f"statistic of layer {name!r} holds NaN or Inf: it is corrupted; collect again")
        for key in ("num_samples", "num_batches"):
            value = getattr(self, key)
            if not (is_int(value) and 0 <= value <= MAX_COUNT):
                raise MaskError(f"{key} of layer {name!r} must be a non-negative integer, got {value!r}")
        shape = self.input_shape
        if not (isinstance(shape, tuple) and all(is_int(n) and n >= 1 for n in shape)):
            raise MaskError(f"input shape of layer {name!r} must be positive integers, got {shape!r}")
        if math.prod(shape) > MAX_DENSE_VALUES:
            raise MaskError(f"input shape {list(shape)} of layer {name!r} has more than {MAX_DENSE_VALUES} values: it is corrupted")
        if not isinstance(self.input_dtype, torch.dtype):
            raise MaskError(f"input dtype of layer {name!r} must be a torch.dtype, got {self.input_dtype!r}")
        if self.features is None:
            return
        if not is_int(self.feature_dim):
            raise MaskError(f"feature_dim of layer {name!r} must be an integer, got {self.feature_dim!r}")
        n = len(shape) + 1
        if not -n <= self.feature_dim < n or self.feature_dim % n == 0:
            raise MaskError(f"feature_dim {self.feature_dim} of layer {name!r} must name a non-batch axis of an input of shape {list(shape)}")
        if len(self.features) != len(parts):
            raise MaskError(f"layer {name!r} has {len(parts)} feature statistics for {len(self.features)} features")
        size = shape[self.feature_dim % n - 1]
        for index in feature_indices(list(self.features), name):
            if index >= size:
                raise MaskError(f"feature {index} of layer {name!r} is out of range: its input has {size} along feature_dim")

    def merge(self, other: LayerStats, name: str) -> LayerStats:
        """Both statistics in one, as if collected over both batch sets: sums and
        counts add, maxima take the max (in float64); the first's input shape."""
        if self.combine is None or other.combine is None:
            raise CalibrationError(
                f"layer {name!r}: a statistic of a user aggregate function cannot be merged (there is no rule for how "
                "its batches combine): collect with a built-in aggregate_fn"
            )
        for what, mine, theirs in (
            ("aggregate", self.aggregate, other.aggregate),
            ("combine", self.combine, other.combine),
            ("features", self.features, other.features),
            ("feature_dim", self.feature_dim, other.feature_dim),
            ("statistic shape", self.stat_shape, other.stat_shape),
        ):
            if mine != theirs:
                raise CalibrationError(
                    f"layer {name!r}: statistics with {what} {mine!r} and {theirs!r} cannot be merged; "
                    "collect both with the same recipe over inputs of the same per-sample shape"
                )
        merged = tuple(a.merge(b) for a, b in zip(self.parts, other.parts))  # type: ignore[union-attr, arg-type]
        return replace(
            self,
            stat=merged if isinstance(self.stat, tuple) else merged[0],
            num_samples=self.num_samples + other.num_samples,
            num_batches=self.num_batches + other.num_batches,
        )

    def mask(self, name: str, reduce_fn: Callable[..., Any], mask_fn: Callable[..., Any], sparse_config: dict[str, Any]) -> Any:
        """``mask_fn(reduce_fn(stat), **sparse_config)`` (per feature where
        ``features`` is set), floating point masks in the input's dtype: what the
        sparsifier's ``step()`` makes."""
        try:
            with torch.no_grad():
                masks = [_as_dtype(mask_fn(reduce_fn(part), **sparse_config), self.input_dtype) for part in self.parts]
        except ConfigError as e:  # a built-in's config that does not fit this layer's data
            raise ConfigError(f"layer {name!r}: {e}") from e
        return masks if self.features is not None else masks[0]


def stat_tensor(part: RunningStat | torch.Tensor) -> torch.Tensor:
    return part.value if isinstance(part, RunningStat) else part


def same_statistic(a: LayerStats, b: LayerStats) -> bool:
    """The same counts and the same values, part by part."""
    if (a.num_samples, a.num_batches, a.count, len(a.parts)) != (b.num_samples, b.num_batches, b.count, len(b.parts)):
        return False
    return all(torch.equal(stat_tensor(p).cpu(), stat_tensor(q).cpu()) for p, q in zip(a.parts, b.parts))


def _as_dtype(new: Any, dtype: torch.dtype) -> Any:
    if isinstance(new, torch.Tensor) and new.is_floating_point() and dtype.is_floating_point:
        return new.to(dtype)
    return new
