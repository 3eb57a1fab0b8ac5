"""One output comparator: two models' outputs, output by output, against a tolerance.

Validation (onnxruntime vs PyTorch), the ``prune`` squash's exactness check
(pruned vs ``mul``) and the tests all compare outputs here. An element agrees
when ``|got - want| <= atol + rtol * |want|`` (``atol`` scaled by
``max(1, max |want|)`` where the tolerance says so); integer and bool outputs
must be equal. A NaN or Inf fails, counted per side, unless the tolerance lets
identical non-finite values on both sides agree (``nan_equal``). A shape or
dtype mismatch is recorded, never compared past. :class:`OutputDiff` keeps the
worst figures over every batch it sees.

    >>> import torch
    >>> from actsparse_deploy.data.compare import Tolerance, compare_outputs
    >>> want = (torch.tensor([1.0, 2.0]),)
    >>> diffs, problems = compare_outputs((torch.tensor([1.0, 2.001]),), want, Tolerance(atol=1e-2))
    >>> problems, round(diffs[0].max_abs, 4)
    ([], 0.001)
    >>> _, problems = compare_outputs((torch.tensor([1.0, 2.1]),), want, Tolerance(atol=1e-2), sides=("new", "old"))
    >>> problems
    ['output 0: max abs diff 0.1, max rel diff 0.05 over tolerance atol 0.01 + rtol 0 * |old|']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["OutputDiff", "Tolerance", "compare_outputs", "dtype_name"]


@dataclass(frozen=True)
class Tolerance:
    """``|got - want| <= atol + rtol * |want|`` per element.

    ``scale_atol``: ``atol`` times ``max(1, the largest finite |want|)`` of the
    output (an absolute error relative to the output's magnitude);
    ``nan_equal``: the same NaN / Inf on both sides agrees (else any fails)."""

    atol: float
    rtol: float = 0.0
    scale_atol: bool = False
    nan_equal: bool = False

    def __post_init__(self) -> None:
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise ValueError(f"tolerance {name} must be a non-negative number, got {value!r}")

    def describe(self, reference: str, peak: float = 1.0) -> str:
        """``atol 1e-05 * max(1, 3.2) + rtol 0.0001 * |mul|``"""
        atol = f"atol {self.atol:g} * max(1, {peak:.3g})" if self.scale_atol else f"atol {self.atol:g}"
        return f"{atol} + rtol {self.rtol:g} * |{reference}|"


def dtype_name(x: Any) -> str:
    """``float32`` for a torch tensor or a numpy array alike."""
    return str(x.dtype).removeprefix("torch.")


def _exact(x: Any) -> bool:
    """Integer or bool values: compared for equality, never within a tolerance."""
    if isinstance(x, torch.Tensor):
        return not (x.is_floating_point() or x.is_complex())
    return np.asarray(x).dtype.kind in "biu"


#: values compared at a time: float64 copies of a chunk, never of a whole output (a large vocabulary's logits
#: are gigabytes in float64), and a chunk's passes stay in the processor's cache
CHUNK = 1 << 16


def _flat_values(x: Any) -> np.ndarray:
    """The values, flat, in their own dtype (a complex output as its real and imaginary parts; bfloat16, which
    numpy lacks, as float32)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.is_complex():
            t = torch.view_as_real(t)
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.reshape(-1).numpy()
    a = np.asarray(x)
    if a.dtype.kind == "c":
        a = np.stack([a.real, a.imag], axis=-1)
    return a.reshape(-1)


def _finite_max(values: np.ndarray) -> float:
    """The largest finite value (0.0 where there is none)."""
    finite = values if np.isfinite(values).all() else values[np.isfinite(values)]
    return float(finite.max()) if finite.size else 0.0


def _chunks(size: int) -> range:
    return range(0, max(size, 1), CHUNK)


def _worse(a: float, b: float) -> float:
    """The larger, where NaN (a NaN compared) is the worst."""
    return a if math.isnan(a) else b if math.isnan(b) else max(a, b)


@dataclass
class OutputDiff:
    """The worst difference seen on one output over all the batches compared."""

    name: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    #: the verdict's own figure: worst ``|got - want| / tolerance`` (over 1 fails)
    max_tolerance_used: float = 0.0
    shape_errors: list[str] = field(default_factory=list)
    dtype_error: str | None = None
    over_tolerance: bool = False
    values: int = 0
    #: NaN / Inf counts, ``{"NaN in the ONNX output": n, ...}``
    non_finite: dict[str, int] = field(default_factory=dict)
    #: the largest difference among the elements over the tolerance (NaN where a NaN disagreed)
    max_abs_over: float = 0.0
    #: the largest finite ``|want|`` seen (what a ``scale_atol`` tolerance scaled by)
    peak: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(self.shape_errors or self.dtype_error or self.non_finite or self.over_tolerance)

    def compare(
        self, got: Any, want: Any, tolerance: Tolerance, where: str = "", sides: tuple[str, str] = ("ONNX", "PyTorch")
    ) -> None:
        """Dtype, then shape, then values (skipped on a shape mismatch; the first
        three shape mismatches are kept, each prefixed with ``where``)."""
        if dtype_name(got) != dtype_name(want) and self.dtype_error is None:
            self.dtype_error = f"{sides[0]} {dtype_name(got)} vs {sides[1]} {dtype_name(want)}"
        if tuple(got.shape) != tuple(want.shape):
            if len(self.shape_errors) < 3:
                self.shape_errors.append(f"{where}{sides[0]} {list(got.shape)} vs {sides[1]} {list(want.shape)}")
            return
        self.update(got, want, tolerance, sides)

    def update(self, got: Any, want: Any, tolerance: Tolerance, sides: tuple[str, str] = ("ONNX", "PyTorch")) -> None:
        """Fold one pair of same-shaped outputs (torch tensors or numpy arrays) in, :data:`CHUNK` values at a time."""
        exact = _exact(got) and _exact(want)
        g_all, w_all = _flat_values(got), _flat_values(want)
        self.values += g_all.size
        atol = tolerance.atol
        if tolerance.scale_atol:  # the output's largest finite |want| first: it scales every chunk's tolerance
            peak = 0.0
            for start in _chunks(w_all.size):
                scale = np.abs(w_all[start:start + CHUNK].astype(np.float64))
                peak = max(peak, _finite_max(scale))
            atol *= max(1.0, peak)
        for start in _chunks(g_all.size):
            self._fold(g_all[start:start + CHUNK], w_all[start:start + CHUNK], tolerance, atol, exact, sides)

    def _fold(self, got: np.ndarray, want: np.ndarray, tolerance: Tolerance, atol: float, exact: bool, sides: tuple[str, str]) -> None:
        """One chunk of :meth:`update` (its values flat, in their own dtype; ``atol``: the tolerance's, scaled)."""
        g, w = got.astype(np.float64), want.astype(np.float64)
        finite = np.isfinite(g) & np.isfinite(w)
        everywhere = bool(finite.all())  # the common case: no value to count or leave out, nothing to gather
        if tolerance.nan_equal:
            same = (g == w) | (np.isnan(g) & np.isnan(w))
            considered = ~same  # identical values (NaN, Inf included) agree; the rest is measured
            unmatched = ~same & ~finite
        else:
            considered = finite  # non-finite values fail on their own, counted
            unmatched = ~finite
        for side, values in zip(sides, (g, w)) if not everywhere else ():
            for word, count in (("NaN", np.isnan(values[unmatched]).sum()), ("Inf", np.isinf(values[unmatched]).sum())):
                if count:
                    key = f"{word} in the {side} output"
                    self.non_finite[key] = self.non_finite.get(key, 0) + int(count)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(g - w)
        scale = np.abs(w)
        self.peak = max(self.peak, _finite_max(scale))
        if exact:
            bad = considered & (got != want)
            bound = np.zeros_like(diff)
        else:
            with np.errstate(invalid="ignore"):  # 0 * Inf: a non-finite element, judged on its own
                bound = atol + tolerance.rtol * scale
                bad = considered & ~(diff <= bound)
        if everywhere and not tolerance.nan_equal:
            d, s, b = diff, scale, bound  # every value is measured
        else:
            measured = finite & considered if tolerance.nan_equal else finite
            d, s, b = diff[measured], scale[measured], bound[measured]
        if d.size:
            self.max_abs = max(self.max_abs, float(d.max()))
            self.max_rel = max(self.max_rel, float((d / np.maximum(s, np.finfo(np.float32).tiny)).max()))
            with np.errstate(divide="ignore", invalid="ignore"):
                used = d / b if atol > 0 and not exact else np.where(b > 0, d / np.where(b > 0, b, 1.0), np.where(d > 0, np.inf, 0.0))
            self.max_tolerance_used = max(self.max_tolerance_used, float(used.max()))
        if bad.any():
            self.over_tolerance = True
            self.max_abs_over = _worse(self.max_abs_over, float(np.max(diff[bad])))

    def problems(self, tolerance: Tolerance, sides: tuple[str, str] = ("ONNX", "PyTorch")) -> list[str]:
        found = []
        if self.shape_errors:
            found.append(f"{self.name}: shape mismatch ({'; '.join(self.shape_errors)})")
        if self.dtype_error:
            found.append(f"{self.name}: dtype mismatch ({self.dtype_error})")
        if self.non_finite:
            counts = ", ".join(f"{key} ({n} of {self.values} values)" for key, n in self.non_finite.items())
            rule = "only where both sides have it" if tolerance.nan_equal else "never validates"
            found.append(f"{self.name}: {counts}; a NaN or Inf {rule}")
        if self.over_tolerance:
            found.append(
                f"{self.name}: max abs diff {self.max_abs_over if tolerance.nan_equal else self.max_abs:.3g}, "
                f"max rel diff {self.max_rel:.3g} over tolerance {tolerance.describe(sides[1], self.peak)}"
            )
        return found

    def to_json(self) -> dict[str, Any]:
        return {
            "output": self.name,
            "max_abs_diff": self.max_abs,
            "max_rel_diff": self.max_rel,
            "max_tolerance_used": self.max_tolerance_used,
            "shape_errors": self.shape_errors,
        }


def compare_outputs(
    got: Sequence[Any], want: Sequence[Any], tolerance: Tolerance, *, names: Sequence[str] | None = None,
    sides: tuple[str, str] = ("got", "want"),
) -> tuple[list[OutputDiff], list[str]]:
    """Compare two flat output lists (see :func:`actsparse_deploy.data.batches.flatten_outputs`):
    one :class:`OutputDiff` per output (named ``output <i>`` unless ``names``) and
    every problem found, in words (an empty list: they agree)."""
    if len(got) != len(want):
        return [], [f"{sides[0]} has {len(got)} outputs, {sides[1]} {len(want)}"]
    names = list(names) if names is not None else [f"output {i}" for i in range(len(want))]
    diffs = [OutputDiff(name) for name in names]
    problems: list[str] = []
    for diff, g, w in zip(diffs, got, want):
        diff.compare(g, w, tolerance, sides=sides)
        problems.extend(diff.problems(tolerance, sides))
    return diffs, problems
