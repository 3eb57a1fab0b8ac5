"""Compensation: the consumer's new weight and bias, so that its output with some
input features removed stays close to the dense output on the calibration data.

* ``none``: the weight and bias as they are.
* ``bias``: ``b' = b + W[:, R] @ mean(x_R)``, the removed features' mean
  contribution moved into the bias (FLAP). Exact where the removed features are
  constant. For a conv the contribution is summed over the kernel's positions
  (exact away from zero padding). Needs the ``moments`` statistic (or ``gram``).
* ``lstsq``: a ridge least-squares refit of the kept columns and the bias on the
  augmented Gram matrix ``G = E[z z^T]``, ``z = [x; 1]`` (ZipLM, SlimGPT), the
  ridge pulling towards the original weights: minimise
  ``||W z - W'_K' z_K'||^2 + lambda ||W'_K' - W_K'||^2`` (the bias as the
  constant feature's column), ``[W'_K, b'] = ([W, b] G[:, K'] + lambda [W, b]_K')
  (G[K', K'] + lambda I)^-1`` with ``K'`` the kept features plus the constant;
  removed columns of ``W'`` are 0. Exact where the removed features are affine
  combinations of the kept ones (damping 0). Needs ``gram``. A conv is refit
  only with a 1x1 kernel (the Gram is per position: a larger kernel mixes
  positions; use ``bias`` there).

A layer that loses no feature keeps its weight and bias bit for bit, whatever
the compensation (:func:`compensate` returns them as they are).

Damping: ``lambda = damping * mean(diag(G[K', K']))``, relative to the mean
diagonal of the kept block (constant included), so the same ``damping`` means
the same thing at any activation scale; ``0`` is plain least squares (a
singular block, kept features that depend on each other, is then solved in the
least-norm sense), a large one leaves the kept columns and the bias as they
were. :func:`lstsq_refit` chooses it per layer from :data:`DAMPING_GRID` by
generalised cross-validation on the calibration statistics alone (the
eigenvalues of the kept block and the sample count): what a recipe without
``damping`` gets. Measured with ``obs`` masks (``tools/measure_refit.py``),
ridge towards zero (before) / towards the original at 0.001 / chosen by GCV:
MiniLM sentence cosine held-out | other text, 25 %: 0.9877 | 0.9438, 0.9877 |
0.9441, 0.9877 | 0.9442; 50 %: 0.9608 | 0.8741, 0.9609 | 0.8745, 0.9609 |
0.8748; tiny-lm held-out perplexity (dense 94.79), 25 %: 96.67, 96.64, 96.64;
50 %: 101.41, 101.39, 101.35. Small gains: the refit itself carries over to
other text (without it MiniLM's other-text cosine is 0.885 at 25 %, 0.773 at
50 %); what other text loses is the masks'.

    >>> import torch
    >>> from torch import nn
    >>> from actsparse_deploy.calibration.compensate import compensate
    >>> from actsparse_deploy.calibration.functions import AGGREGATE_FNS
    >>> from actsparse_deploy.calibration.stats import LayerStats
    >>> x = torch.tensor([[1.0, 2.0], [3.0, 2.0]])  # feature 1 is constant
    >>> stats = LayerStats(AGGREGATE_FNS.get("moments").update(None, x, 1), (2,), aggregate="moments")
    >>> layer = nn.Linear(2, 1)
    >>> with torch.no_grad():
    ...     _ = layer.weight.fill_(1.0); _ = layer.bias.fill_(0.0)
    >>> weight, bias = compensate(layer, stats, torch.tensor([1.0, 0.0]), "bias")
    >>> bias
    tensor([2.])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..base.errors import ConfigError
from ..nn.layers import layer_kind
from .functions import STAT_DTYPE
from .methods import DEFAULT_DAMPING, feature_moments, gram_matrix, weight_columns, weight_from_columns

if TYPE_CHECKING:
    from .functions import LayerStats

__all__ = ["COMPENSATIONS", "DAMPING_GRID", "DEFAULT_DAMPING", "compensate", "effective_compensation", "gcv_scores", "lstsq_refit"]

COMPENSATIONS = ("none", "bias", "lstsq")
#: the dampings :func:`lstsq_refit` chooses from, relative to the kept block's mean diagonal
DAMPING_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def effective_compensation(layer: nn.Module, kind: str) -> tuple[str, str | None]:
    """The compensation that can be applied to ``layer`` and, where it differs
    from ``kind``, why: ``lstsq`` on a conv with a kernel larger than 1x1 is
    ``bias`` (the Gram matrix is per position)."""
    kernel = getattr(layer, "kernel_size", None)
    if kind == "lstsq" and kernel is not None and math.prod(kernel) > 1:
        size = "x".join(str(k) for k in kernel)
        return "bias", f"lstsq needs a 1x1 kernel (the Gram matrix is per position), this conv's is {size}: bias compensation used"
    return kind, None


def _checked(kind: str, damping: float) -> None:
    if kind not in COMPENSATIONS:
        raise ConfigError(f"compensation {kind!r} is not one of {', '.join(COMPENSATIONS)}")
    if not (isinstance(damping, (int, float)) and not isinstance(damping, bool) and math.isfinite(damping) and damping >= 0):
        raise ConfigError(f"compensation: damping must be a finite number >= 0, got {damping!r}")


def _layer_parts(layer: nn.Module, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's weight columns ``(out, d, positions)`` float64, its own weight
    (exact), its bias in float64 (zeros without one) and which features ``mask`` keeps."""
    columns = weight_columns(layer)  # (out, d, positions), through the layer's kind
    out, d, _ = columns.shape
    if mask.numel() != d:
        raise ConfigError(f"compensation: {type(layer).__name__} has {d} input features, got a mask of {mask.numel()} values")
    weight = weight_from_columns(layer, columns).clone()  # the layer's own (exact: float64 holds every float type's values)
    kind_of = layer_kind(layer)
    assert kind_of is not None  # weight_columns refused the rest
    old_bias = kind_of.bias(layer)
    bias = old_bias.detach().to(STAT_DTYPE) if old_bias is not None else torch.zeros(out, dtype=STAT_DTYPE)
    return columns, weight, bias, mask.detach().reshape(-1) != 0


def compensate(
    layer: nn.Module, stats: LayerStats, mask: torch.Tensor, kind: str, damping: float = DEFAULT_DAMPING
) -> tuple[torch.Tensor, torch.Tensor]:
    """The consumer's new ``(weight, bias)`` for ``mask`` (0 removes an input
    feature), full shapes of its weight and bias in its weight's dtype (a layer
    without bias gets one, zeros where nothing changes). A mask that removes no
    feature gives the layer's own weight and bias, bit for bit, whatever ``kind``.
    See the module docstring for ``kind`` and ``damping``."""
    _checked(kind, damping)
    columns, weight, bias, keep = _layer_parts(layer, mask)
    if kind == "bias":
        mean, _ = feature_moments(stats, f"compensation {kind!r}")
    elif kind == "lstsq":
        g, kept, augmented = _lstsq_problem(layer, stats, columns, bias, keep)
    if kind == "none" or bool(keep.all()):  # nothing removed: the layer as it is (its statistics checked all the same)
        return weight, bias.to(weight.dtype)
    if kind == "bias":
        removed = ~keep
        return weight, (bias + torch.einsum("ojk,j->o", columns[:, removed], mean[removed])).to(weight.dtype)
    new = torch.zeros_like(augmented)
    new[:, kept] = _ridge_to_original(g, kept, augmented, damping)
    d = augmented.shape[1] - 1
    return weight_from_columns(layer, new[:, :d]), new[:, d].to(weight.dtype)


def _lstsq_problem(
    layer: nn.Module, stats: LayerStats, columns: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The augmented Gram ``G``, the kept features plus the constant ``K'`` and ``[W, b]``."""
    what = "compensation 'lstsq'"
    if columns.shape[2] != 1:
        kernel = tuple(getattr(layer, "kernel_size", (columns.shape[2],)))
        raise ConfigError(f"{what}: {type(layer).__name__}'s kernel {kernel} is larger than 1x1: use 'bias'")
    g = gram_matrix(stats, what)
    d = columns.shape[1]
    if g.shape[0] != d + 1:
        raise ConfigError(f"{what}: the statistics hold {g.shape[0] - 1} input features, the layer {d}")
    kept = torch.cat([keep.nonzero().flatten(), torch.tensor([d])])
    return g, kept, torch.cat([columns[:, :, 0], bias[:, None]], dim=1)  # [W, b]


def _ridge_to_original(g: torch.Tensor, kept: torch.Tensor, augmented: torch.Tensor, damping: float) -> torch.Tensor:
    """``(W G[:, K'] + l W_K') (G[K', K'] + l I)^-1``, ``(out, |K'|)``."""
    block = g[kept][:, kept]
    ridge = damping * float(block.diagonal().mean())
    rhs = (augmented @ g[:, kept] + ridge * augmented[:, kept]).T  # (|K'|, out)
    lhs = block + ridge * torch.eye(len(kept), dtype=STAT_DTYPE)
    solution, info = torch.linalg.solve_ex(lhs, rhs)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        solution = torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution  # kept features that depend on each other
    return solution.T


def lstsq_refit(
    layer: nn.Module, stats: LayerStats, mask: torch.Tensor, grid: tuple[float, ...] = DAMPING_GRID
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``compensate(layer, stats, mask, "lstsq", damping)`` with the damping of
    ``grid`` that has the least generalised cross-validation error on the
    layer's calibration statistics (:func:`gcv_scores`), and that damping: one
    eigendecomposition of the kept block gives both. A mask that removes
    nothing gives the layer's own weight and bias (and ``grid[0]``)."""
    if not grid or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in grid):
        raise ConfigError(f"compensation: a damping grid needs numbers > 0, got {grid!r}")
    columns, weight, bias, keep = _layer_parts(layer, mask)
    g, kept, augmented = _lstsq_problem(layer, stats, columns, bias, keep)
    if bool(keep.all()):
        return weight, bias.to(weight.dtype), grid[0]
    spectrum = _Spectrum.of(g, kept, augmented)
    scores = spectrum.gcv(stats.count, grid)
    damping = grid[min(range(len(grid)), key=scores.__getitem__)]
    new = torch.zeros_like(augmented)
    new[:, kept] = spectrum.refit(damping)
    d = augmented.shape[1] - 1
    return weight_from_columns(layer, new[:, :d]), new[:, d].to(weight.dtype), damping


def gcv_scores(g: torch.Tensor, kept: torch.Tensor, augmented: torch.Tensor, count: int, grid: tuple[float, ...]) -> list[float]:
    """Generalised cross-validation (Golub, Heath and Wahba) of the ridge refit
    of ``augmented`` (``[W, b]``) on the kept features ``K'`` (the constant
    last) for each damping of ``grid``: ``RSS / (1 - tr(H) / n)^2`` with the
    residual ``||W z - W'_K z_K||^2`` per sample and the hat matrix's trace
    ``sum(e / (e + l))`` both from the Gram matrix ``g`` (``e``: the eigenvalues of
    ``G[K', K']``), ``n = count`` (the statistic's sample count: tokens of a sequence, a
    conv's samples)."""
    return _Spectrum.of(g, kept, augmented).gcv(count, grid)


@dataclass(frozen=True)
class _Spectrum:
    """The refit in the eigenbasis of the kept block ``G[K', K'] = V diag(e) V^T``:
    ``W'_K V = (W G[:, K'] V + l W_K' V) / (e + l)``, each damping then ``O(out x |K'|)``."""

    eigenvalues: torch.Tensor
    vectors: torch.Tensor
    target: torch.Tensor  # W G[:, K'] V
    original: torch.Tensor  # W_K' V
    total: float  # ||W z||^2 per sample
    scale: float  # mean(diag(G[K', K']))

    @classmethod
    def of(cls, g: torch.Tensor, kept: torch.Tensor, augmented: torch.Tensor) -> _Spectrum:
        block = g[kept][:, kept]
        eigenvalues, vectors = torch.linalg.eigh(block)
        return cls(eigenvalues.clamp_min(0), vectors, augmented @ g[:, kept] @ vectors, augmented[:, kept] @ vectors,
                   float((augmented @ g * augmented).sum()), float(block.diagonal().mean()))

    def _rotated(self, damping: float) -> torch.Tensor:
        ridge = damping * self.scale
        return (self.target + ridge * self.original) / (self.eigenvalues + ridge)

    def refit(self, damping: float) -> torch.Tensor:
        """``W'_K``, ``(out, |K'|)``."""
        return self._rotated(damping) @ self.vectors.T

    def gcv(self, count: int, grid: tuple[float, ...]) -> list[float]:
        scores = []
        for damping in grid:
            refit = self._rotated(damping)
            rss = self.total - 2 * float((refit * self.target).sum()) + float((refit * refit * self.eigenvalues).sum())
            dof = float((self.eigenvalues / (self.eigenvalues + damping * self.scale)).sum())
            scores.append(max(rss, 0.0) / max(1.0 - dof / count, 1e-12) ** 2)
        return scores
