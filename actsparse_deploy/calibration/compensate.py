"""Compensation: the consumer's new weight and bias, so that its output with some
input features removed stays close to the dense output on the calibration data.

* ``none``: the weight and bias as they are.
* ``bias``: ``b' = b + W[:, R] @ mean(x_R)``, the removed features' mean
  contribution moved into the bias (FLAP). Exact where the removed features are
  constant. For a conv the contribution is summed over the kernel's positions
  (exact away from zero padding). Needs the ``moments`` statistic (or ``gram``).
* ``lstsq``: a ridge least-squares refit of the kept columns and the bias on the
  augmented Gram matrix ``G = E[z z^T]``, ``z = [x; 1]`` (ZipLM, SlimGPT):
  ``[W'_K, b'] = [W, b] G[:, K'] (G[K', K'] + lambda I)^-1`` with ``K'`` the kept
  features plus the constant; removed columns of ``W'`` are 0. Exact where the
  removed features are affine combinations of the kept ones. Needs ``gram``.
  A conv is refit only with a 1x1 kernel (the Gram is per position: a larger
  kernel mixes positions; use ``bias`` there).

Damping: ``lambda = damping * mean(diag(G[K', K']))``, relative to the mean
diagonal of the kept block (constant included), so the same ``damping`` means
the same thing at any activation scale; ``0`` is plain least squares (a
singular block, kept features that depend on each other, is then solved in the
least-norm sense). The default 0.001 keeps the refit from amplifying directions
the calibration data barely spans (on MiniLM it beats 0.01 and 0.03 clearly and
equals 0.0001-0.0003: ``tools/fidelity_methods.py``).

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
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..base.errors import ConfigError
from ..nn.layers import layer_kind
from .functions import STAT_DTYPE
from .methods import DEFAULT_DAMPING, feature_moments, gram_matrix, weight_columns, weight_from_columns

if TYPE_CHECKING:
    from .functions import LayerStats

__all__ = ["COMPENSATIONS", "DEFAULT_DAMPING", "compensate", "effective_compensation"]

COMPENSATIONS = ("none", "bias", "lstsq")


def effective_compensation(layer: nn.Module, kind: str) -> tuple[str, str | None]:
    """The compensation that can be applied to ``layer`` and, where it differs
    from ``kind``, why: ``lstsq`` on a conv with a kernel larger than 1x1 is
    ``bias`` (the Gram matrix is per position)."""
    kernel = getattr(layer, "kernel_size", None)
    if kind == "lstsq" and kernel is not None and math.prod(kernel) > 1:
        size = "x".join(str(k) for k in kernel)
        return "bias", f"lstsq needs a 1x1 kernel (the Gram matrix is per position), this conv's is {size}: bias compensation used"
    return kind, None


def compensate(
    layer: nn.Module, stats: LayerStats, mask: torch.Tensor, kind: str, damping: float = DEFAULT_DAMPING
) -> tuple[torch.Tensor, torch.Tensor]:
    """The consumer's new ``(weight, bias)`` for ``mask`` (0 removes an input
    feature), full shapes of its weight and bias in its weight's dtype (a layer
    without bias gets one). See the module docstring for ``kind`` and ``damping``."""
    if kind not in COMPENSATIONS:
        raise ConfigError(f"compensation {kind!r} is not one of {', '.join(COMPENSATIONS)}")
    if not (isinstance(damping, (int, float)) and not isinstance(damping, bool) and math.isfinite(damping) and damping >= 0):
        raise ConfigError(f"compensation: damping must be a finite number >= 0, got {damping!r}")
    columns = weight_columns(layer)  # (out, d, positions), through the layer's kind
    out, d, _ = columns.shape
    if mask.numel() != d:
        raise ConfigError(f"compensation: {type(layer).__name__} has {d} input features, got a mask of {mask.numel()} values")
    weight = weight_from_columns(layer, columns).clone()  # the layer's own (exact: float64 holds every float type's values)
    kind_of = layer_kind(layer)
    assert kind_of is not None  # weight_columns refused the rest
    old_bias = kind_of.bias(layer)
    bias = old_bias.detach().to(STAT_DTYPE) if old_bias is not None else torch.zeros(out, dtype=STAT_DTYPE)
    keep = mask.detach().reshape(-1) != 0
    if kind == "none":
        return weight, bias.to(weight.dtype)
    what = f"compensation {kind!r}"
    if kind == "bias":
        mean, _ = feature_moments(stats, what)
        removed = ~keep
        new_bias = bias + torch.einsum("ojk,j->o", columns[:, removed], mean[removed])
        return weight, new_bias.to(weight.dtype)
    if columns.shape[2] != 1:
        kernel = tuple(getattr(layer, "kernel_size", (columns.shape[2],)))
        raise ConfigError(f"{what}: {type(layer).__name__}'s kernel {kernel} is larger than 1x1: use 'bias'")
    g = gram_matrix(stats, what)
    if g.shape[0] != d + 1:
        raise ConfigError(f"{what}: the statistics hold {g.shape[0] - 1} input features, the layer {d}")
    kept = torch.cat([keep.nonzero().flatten(), torch.tensor([d])])
    block = g[kept][:, kept]
    ridge = damping * float(block.diagonal().mean())
    augmented = torch.cat([columns[:, :, 0], bias[:, None]], dim=1)  # [W, b]
    rhs = (augmented @ g[:, kept]).T  # (|K'|, out)
    lhs = block + ridge * torch.eye(len(kept), dtype=STAT_DTYPE)
    solution, info = torch.linalg.solve_ex(lhs, rhs)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        solution = torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution  # kept features that depend on each other
    new = torch.zeros(out, d + 1, dtype=STAT_DTYPE)
    new[:, kept] = solution.T
    return weight_from_columns(layer, new[:, :d]), new[:, d].to(weight.dtype)
