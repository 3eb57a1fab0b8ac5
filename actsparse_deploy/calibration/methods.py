"""Mask selection methods that see the consumer: the layer's weight as well as
the statistics of its input.

A method takes the layer whose input is masked (the *consumer*: a ``Linear`` or
a ``ConvNd`` without groups), its :class:`~actsparse_deploy.calibration.stats.LayerStats`
and a sparsity level, and returns a 0/1 mask over the layer's input features,
shaped like today's structured masks: ``(d,)`` for a Linear, ``(C, 1, 1)`` for
a Conv2d. Exactly ``round(sparsity_level * d)`` features are removed. Built in:

* ``wanda``: score ``||x_j|| * ||W[:, j]||`` with ``||x_j|| = sqrt(E[x_j^2])``
  (needs the ``moments`` statistic);
* ``fluctuation``: score ``var(x_j) * ||W[:, j]||^2``, the output variance a
  feature carries, which ``bias`` compensation cannot restore (FLAP; ``moments``);
* ``obs``: error-aware greedy removal on the augmented Gram matrix ``H = E[z z^T]``
  (``z = [x; 1]``, damped): repeatedly remove the feature ``j`` with the least
  ``||W[:, j]||^2 / [H^-1]_jj`` (the output error left after a least-squares
  refit of the rest, optimal-brain-surgeon style), then update ``W`` and ``H^-1``
  (needs ``gram``). Inputs wider than 256 features remove ``round(d / 256)``
  features per step, each group jointly (exact OBS update for the group).

A ``gram`` statistic holds everything ``moments`` does: every method runs on it.
In a recipe, ``method = "obs"`` replaces aggregate_fn / reduce_fn / mask_fn for
the layer (see :mod:`actsparse_deploy.calibration.recipe`); in Python:

    >>> import torch
    >>> from torch import nn
    >>> from actsparse_deploy.calibration.functions import AGGREGATE_FNS
    >>> from actsparse_deploy.calibration.methods import METHODS
    >>> from actsparse_deploy.calibration.stats import LayerStats
    >>> x = torch.tensor([[1.0, 0.1, 2.0, 0.0], [-1.0, 0.1, 2.0, 3.0]])
    >>> stat = AGGREGATE_FNS.get("moments").update(None, x, sample_ndim=1)
    >>> stats = LayerStats(stat=stat, input_shape=(4,), aggregate="moments")
    >>> layer = nn.Linear(4, 2)
    >>> with torch.no_grad():
    ...     _ = layer.weight.fill_(1.0)
    >>> METHODS.get("fluctuation")(layer, stats, 0.5)  # constant features 1 and 2 carry no variance
    tensor([1., 0., 0., 1.])

A layer of attention heads (a recipe's ``heads = true``) is given ``block``, the
features of a key/value head's query heads: ``obs`` then removes the block whose joint
removal adds the least each step, ``wanda`` and ``fluctuation`` the blocks with the least
summed score; a mask that splits a block is refused.

Register your own with ``@register_method("name", needs="moments" | "gram")``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..base.errors import ConfigError, UnknownFunctionError
from ..nn.attention import head_blocks
from ..nn.layers import LayerKind, layer_kind
from .functions import STAT_DTYPE, RunningStat, zero_smallest

if TYPE_CHECKING:
    from .functions import LayerStats

__all__ = [
    "DEFAULT_DAMPING",
    "METHODS",
    "NEEDS",
    "Method",
    "MethodRegistry",
    "feature_moments",
    "gram_matrix",
    "register_method",
    "structured_shape",
    "obs_steps",
    "removed_count",
    "weight_columns",
    "weight_from_columns",
]

#: the statistics a method may need, from least to most
NEEDS = ("moments", "gram")
#: the ridge of ``obs`` (and of ``lstsq`` compensation called with no other),
#: relative to the Gram matrix's mean diagonal (measured on MiniLM,
#: tools/fidelity_methods.py: 0.001 beats 0.01 at 25 % and 50 % with 256 or 808
#: calibration sentences; lower changes nothing there). A recipe that sets no
#: ``damping`` refits ``lstsq`` with one chosen per layer by cross-validation
#: (:func:`actsparse_deploy.calibration.compensate.lstsq_refit`)
DEFAULT_DAMPING = 0.001


# --- what methods and compensation read ---------------------------------------------


def weight_columns(layer: nn.Module) -> torch.Tensor:
    """The consumer's weight as ``(out, d, k)`` float64: column group ``j`` is what
    input feature ``j`` multiplies (``k`` kernel positions of a conv, 1 for a
    Linear or GPT-2's ``Conv1D``), as the layer's kind lays it out
    (:meth:`~actsparse_deploy.nn.layers.LayerKind.weight_columns`). Refused
    (:class:`ConfigError`) for a layer whose kind has no weight columns (only a
    ``Linear``, a ``Conv1D``, a ``ConvNd`` without groups and kinds that say their
    weight layout have)."""
    return _kind(layer).weight_columns(layer, STAT_DTYPE)


def weight_from_columns(layer: nn.Module, columns: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`weight_columns`: ``(out, d, k)`` (or ``(out, d)``)
    columns as a weight of ``layer``'s own shape, layout and dtype."""
    return _kind(layer).weight_from_columns(layer, columns)


def _kind(layer: nn.Module) -> LayerKind:
    kind = layer_kind(layer)
    if kind is None:
        raise ConfigError(
            f"{type(layer).__name__} is not a registered layer kind: methods and compensation need the consumer's "
            "weight columns (mask the input of a Linear or a Conv)"
        )
    return kind


def structured_shape(layer: nn.Module, d: int) -> tuple[int, ...]:
    """The shape of a structured mask over ``d`` input features of ``layer``:
    ``(d,)`` for a Linear, ``(d, 1, 1)`` for a Conv2d."""
    kind = layer_kind(layer)
    axis = kind.feature_axis(layer) if kind is not None else -1
    return (d,) + (1,) * (-(axis or -1) - 1)


def _value(stats: LayerStats, need: str, what: str) -> torch.Tensor:
    stat = stats.stat
    aggregate = stats.aggregate
    ok = aggregate == "gram" or aggregate == need
    if not ok or not isinstance(stat, RunningStat):
        raise ConfigError(f"{what} needs the {need!r} statistic, got {aggregate!r}: collect with the method's recipe")
    return stat.per_sample.to(STAT_DTYPE)


def feature_moments(stats: LayerStats, what: str = "this method") -> tuple[torch.Tensor, torch.Tensor]:
    """Each input feature's mean and mean square, ``(d,)`` each, from a
    ``moments`` or ``gram`` statistic (per vector: a conv's positions are vectors)."""
    value = _value(stats, "moments", what)
    if stats.aggregate == "gram":
        d = value.shape[0] - 1
        return value[d, :d], value.diagonal()[:d]
    return value[0], value[1]


def gram_matrix(stats: LayerStats, what: str = "this method") -> torch.Tensor:
    """``E[z z^T]``, ``z = [x; 1]``: ``(d + 1, d + 1)`` float64 from a ``gram`` statistic."""
    return _value(stats, "gram", what)


# --- registry -----------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A registered selection method; calling it checks its arguments, runs it
    and gives the mask in the layer's structured shape (float32, 1 keeps)."""

    name: str
    needs: str
    impl: Callable[..., torch.Tensor] = field(compare=False, repr=False)

    def __call__(self, layer: nn.Module, stats: LayerStats, sparsity_level: float, block: int = 1, **config: Any) -> torch.Tensor:
        """The mask; ``block`` > 1: whole runs of ``block`` features removed together (attention
        heads), ``round(sparsity_level * d / block)`` of them (the method is given ``block``)."""
        if not (isinstance(sparsity_level, (int, float)) and not isinstance(sparsity_level, bool) and 0.0 <= sparsity_level <= 1.0):
            raise ConfigError(f"method {self.name!r}: sparsity_level must be a number in [0, 1], got {sparsity_level!r}")
        columns = weight_columns(layer)
        d = _stat_width(stats, f"method {self.name!r}")
        if columns.shape[1] != d:
            raise ConfigError(
                f"method {self.name!r}: the statistics hold {d} input features, the layer {type(layer).__name__} takes "
                f"{columns.shape[1]}: these statistics are not of this layer"
            )
        if block < 1 or d % block:
            raise ConfigError(f"method {self.name!r}: {d} input features do not split into blocks of {block}")
        _value(stats, self.needs, f"method {self.name!r}")
        with torch.no_grad():
            mask = self.impl(layer, stats, sparsity_level, **({"block": block} if block > 1 else {}), **config)
        if not isinstance(mask, torch.Tensor) or mask.numel() != d:
            raise ConfigError(f"method {self.name!r} returned {type(mask).__name__} {getattr(mask, 'shape', '')}, not a mask of {d} features")
        if not head_blocks(mask.reshape(-1), block):
            raise ConfigError(f"method {self.name!r} returned a mask that splits blocks of {block} features (attention heads)")
        return mask.to(torch.float32).reshape(structured_shape(layer, d))


def _stat_width(stats: LayerStats, what: str) -> int:
    stat = stats.stat
    if not isinstance(stat, RunningStat) or stats.aggregate not in NEEDS:
        raise ConfigError(f"{what} needs a 'moments' or 'gram' statistic, got {stats.aggregate!r}")
    return int(stat.value.shape[1] if stats.aggregate == "moments" else stat.value.shape[0] - 1)


class MethodRegistry:
    """Name -> :class:`Method`, filled by :func:`register_method`."""

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

    def register(self, name: str, needs: str) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
        if needs not in NEEDS:
            raise ValueError(f"a method needs one of {', '.join(NEEDS)}, not {needs!r}")

        def decorator(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
            if name in self._methods:
                raise ValueError(f"method {name!r} is already registered")
            self._methods[name] = Method(name, needs, fn)
            return fn

        return decorator

    def unregister(self, name: str) -> Method:
        return self._methods.pop(name)

    def names(self) -> list[str]:
        return sorted(self._methods)

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> Method:
        try:
            return self._methods[name]
        except (KeyError, TypeError):
            raise UnknownFunctionError(f"unknown method {name!r}; known: {', '.join(self.names())}") from None


METHODS = MethodRegistry()


def register_method(name: str, needs: str = "moments") -> Callable[..., Any]:
    """Register ``fn(layer, stats, sparsity_level, **config) -> mask`` (1 keeps,
    0 removes; ``d`` values, reshaped to the layer's structured mask shape).
    ``needs``: the statistic it reads, ``"moments"`` or ``"gram"``."""
    return METHODS.register(name, needs)


# --- built-ins ----------------------------------------------------------------------


def _column_norms_sq(layer: nn.Module) -> torch.Tensor:
    return (weight_columns(layer) ** 2).sum(dim=(0, 2))


def _blockwise(score: torch.Tensor, sparsity_level: float, block: int) -> torch.Tensor:
    """The mask that zeroes the blocks of ``block`` features with the least summed score."""
    return zero_smallest(score.reshape(-1, block).sum(1), sparsity_level).repeat_interleave(block)


@register_method("wanda", needs="moments")
def _wanda(layer: nn.Module, stats: LayerStats, sparsity_level: float, block: int = 1, **config: Any) -> torch.Tensor:
    _, square = feature_moments(stats)
    return _blockwise(square.clamp_min(0).sqrt() * _column_norms_sq(layer).sqrt(), sparsity_level, block)


@register_method("fluctuation", needs="moments")
def _fluctuation(layer: nn.Module, stats: LayerStats, sparsity_level: float, block: int = 1, **config: Any) -> torch.Tensor:
    mean, square = feature_moments(stats)
    return _blockwise((square - mean * mean).clamp_min(0) * _column_norms_sq(layer), sparsity_level, block)


def damped_inverse(h: torch.Tensor, damping: float, what: str) -> torch.Tensor:
    """``(h + lambda I)^-1`` with ``lambda = damping * mean(diag(h))`` (float64).
    A singular ``h`` (dependent features, damping 0) gets the smallest extra
    ridge of 1e-12, 1e-10, 1e-8 or 1e-6 of the mean diagonal that makes it
    invertible; beyond that, a :class:`ConfigError` asks for more damping."""
    if not (isinstance(damping, (int, float)) and not isinstance(damping, bool) and math.isfinite(damping) and damping >= 0):
        raise ConfigError(f"{what}: damping must be a finite number >= 0, got {damping!r}")
    scale = float(h.diagonal().mean()) or 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    ridge = damping * scale
    for extra in (0.0, 1e-12, 1e-10, 1e-8, 1e-6):
        chol, info = torch.linalg.cholesky_ex(h + (ridge + extra * scale) * eye)
        if int(info) == 0:
            return torch.cholesky_inverse(chol)
    raise ConfigError(f"{what}: the Gram matrix of the layer's input is not positive definite even with damping: raise damping")


#: ``obs`` removes features one at a time up to this width; wider inputs remove
#: ``round(d / OBS_EXACT_WIDTH)`` per step (each group removed jointly, exactly)
OBS_EXACT_WIDTH = 256


def obs_steps(layer: nn.Module, stats: LayerStats, count: int, damping: float, block: int = 1) -> Iterator[tuple[torch.Tensor, float]]:
    """The greedy optimal-brain-surgeon removal of ``count`` input features of
    ``layer``: per step, the group of ``round(d / OBS_EXACT_WIDTH)`` features (the
    last one smaller) whose removal, with the kept columns refit, adds the least
    reconstruction error on the Gram matrix, removed jointly and exactly; yields
    each step's ``(features, added error)``. ``H^-1`` is kept as its inverse at the
    start less the low-rank terms of the steps so far: a step reads its rows and
    the diagonal (``O(removed x d)``) instead of updating the whole ``d x d``
    matrix (the same arithmetic up to rounding, a few times faster on MiniLM).
    ``block`` > 1: the groups are the runs of ``block`` features (attention heads),
    each step the one whose joint removal adds the least (``count`` a multiple of ``block``)."""
    h = gram_matrix(stats)
    d = h.shape[0] - 1
    if block > 1 and (d % block or count % block):
        raise ConfigError(f"method 'obs': {count} of {d} features are not whole blocks of {block}")
    if count <= 0:
        return
    hinv0 = damped_inverse(h, damping, "method 'obs'")
    columns = weight_columns(layer)  # (out, d, positions): each position's rows share the feature's Gram
    w = torch.zeros(columns.shape[0] * columns.shape[2], d + 1, dtype=STAT_DTYPE)
    w[:, :d] = columns.permute(0, 2, 1).reshape(-1, d)
    removed = torch.zeros(d + 1, dtype=torch.bool)
    removed[d] = True  # the constant is never removed
    inf = torch.tensor(math.inf, dtype=STAT_DTYPE)
    diag = hinv0.diagonal().clone()
    # H^-1 = hinv0 - left[:, :m] @ right[:, :m].T
    left = torch.zeros(d + 1, count, dtype=STAT_DTYPE)
    right = torch.zeros(d + 1, count, dtype=STAT_DTYPE)
    m = 0
    group = max(1, round(d / OBS_EXACT_WIDTH))
    blocks = list(torch.arange(d).reshape(-1, block)) if block > 1 else []
    while m < count:
        if blocks:  # the block whose joint removal adds the least
            joint = [_joint_removal(hinv0, left[:, :m], right[:, :m], w, b) for b in blocks]
            best = min(range(len(blocks)), key=lambda i: joint[i][0])
            chosen, (added, rows, inv_block) = blocks.pop(best), joint[best]
            n = block
        else:
            error = torch.where(removed | (diag <= 0), inf, (w * w).sum(0) / diag)
            n = min(group, count - m)
            chosen = torch.topk(error, n, largest=False, sorted=True).indices if n > 1 else torch.argmin(error).reshape(1)
            added, rows, inv_block = _joint_removal(hinv0, left[:, :m], right[:, :m], w, chosen)
        ws = w[:, chosen]
        w -= (ws @ inv_block) @ rows
        scaled = inv_block @ rows  # (n, d + 1)
        left[:, m:m + n] = rows.T
        right[:, m:m + n] = scaled.T
        diag -= (rows * scaled).sum(0)
        removed[chosen] = True
        m += n
        yield chosen, added


def _joint_removal(hinv0: torch.Tensor, left: torch.Tensor, right: torch.Tensor, w: torch.Tensor,
                   chosen: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Removing features ``chosen`` jointly: the error it adds, ``||W_S [H^-1]_SS^-1 W_S^T||``, the
    rows ``[H^-1]_S:`` (``H^-1 = hinv0 - left @ right.T``) and ``[H^-1]_SS^-1``."""
    rows = hinv0[chosen] - left[chosen] @ right.T  # (n, d + 1)
    inv_block = torch.linalg.pinv(rows[:, chosen], hermitian=True)
    ws = w[:, chosen]
    return float(((ws @ inv_block) * ws).sum()), rows, inv_block


def removed_count(d: int, sparsity_level: float, block: int = 1) -> int:
    """How many of ``d`` features a level removes: ``round(level * d)``, in whole blocks of ``block``."""
    return block * int(round(sparsity_level * d / block))


@register_method("obs", needs="gram")
def _obs(layer: nn.Module, stats: LayerStats, sparsity_level: float, damping: float = DEFAULT_DAMPING, block: int = 1,
         **config: Any) -> torch.Tensor:
    d = gram_matrix(stats).shape[0] - 1
    keep = torch.ones(d, dtype=torch.float32)
    for chosen, _ in obs_steps(layer, stats, removed_count(d, sparsity_level, block), damping, block):
        keep[chosen] = 0.0
    return keep
