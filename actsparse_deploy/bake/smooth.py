"""Activation smoothing before int8 (SmoothQuant), from the calibration data's own statistics.

onnxruntime's int8 quantizes each matrix product's input with one range for the
whole tensor, so a few input features far larger than the rest (an outlier
feature) take the range and leave the others a handful of steps. Smoothing moves
part of that spread into the weight, whose rows each get their own range: per
input feature ``j`` of a layer, ``s_j = max|x_j|^a / max|W[:, j]|^(1-a)``; the
weight's column ``j`` is multiplied by ``s_j`` and the input divided by it (a
constant ``Mul`` before the product: :class:`~actsparse_deploy.bake.apply.MaskedInput`),
so the float model computes the same function and is validated like any squash.

:func:`plan_smoothing` decides per layer, on data: the per-feature ranges of each
layer's input over the calibration batches, then, on the tuning batches, the
product's error when both sides are quantized as onnxruntime quantizes them
(:func:`fake_int8`: ``int8``: one uint8 range per input tensor, found at run time;
``int8-static``: one fixed range, the calibration data's; weights int8 per output
row) for each ``a`` of :data:`ALPHAS` and without smoothing. A layer is smoothed
at its best ``a`` where that lowers its error by :data:`MIN_GAIN` or more; every
layer's row says why it is or is not. :func:`apply_smoothing` bakes the plan in
(checked against the model's outputs before), :func:`smoothed` for the length of a block.

    >>> import torch
    >>> from torch import nn
    >>> from actsparse_deploy.bake.smooth import apply_smoothing, plan_smoothing
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    >>> batches = [torch.randn(64, 16) * torch.tensor([40.0] + [1.0] * 15) for _ in range(4)]  # feature 0: an outlier
    >>> plan = plan_smoothing(model, batches[:3], batches[3:])
    >>> row = plan.layers["0"]
    >>> row.smoothed, row.smoothed_error < row.error / 2
    (True, True)
    >>> before = model(batches[0])
    >>> apply_smoothing(model, plan, check=batches[:1]).smoothed
    ['0', '2']
    >>> bool(torch.allclose(model(batches[0]), before, atol=1e-5)), type(model[0]).__name__
    (True, 'MaskedInput')
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from ..base.errors import SquashError
from ..data.batches import Batch, flatten_outputs, run_batch
from ..nn.layers import layer_kind
from ..nn.modules import eval_mode

__all__ = ["ALPHAS", "KINDS", "MAKERS_TRIED", "MIN_GAIN", "MAX_ROWS", "LayerSmoothing", "Smoothing", "apply_smoothing", "fake_int8",
           "plan_smoothing", "smoothed"]

#: the migration strengths tried per layer (SmoothQuant's ``alpha``: 0 leaves the input as it is, 1 moves it all into the weight)
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: a layer is smoothed where its best ``a`` lowers its product's int8 error by this fraction or more (the ``Mul``
#: it adds costs time: MiniLM's 36 products smoothed ran 8 % slower before layers of one input shared theirs)
MIN_GAIN = 0.2
#: the layer kinds smoothed: those exported as a matrix product (onnxruntime's int8 leaves convolutions float)
KINDS = ("linear", "conv1d")
#: the rows of one input tensor whose products' errors are measured (evenly spread; the range is every row's): the
#: tuning split's 3840 MiniLM tokens in 38 tensors, 12 s with every row, 3 s so
MAX_ROWS = 32
#: the smallest range a feature's scale is made from (a feature that is always 0 keeps scale 1)
_TINY = 1e-5


@dataclass(frozen=True)
class LayerSmoothing:
    """One layer's decision: ``alpha`` (None: not smoothed), its product's relative int8 error
    on the tuning batches without smoothing (``error``) and at ``alpha`` (``smoothed_error``), why."""

    name: str
    alpha: float | None
    why: str
    error: float | None = None
    smoothed_error: float | None = None
    #: per input feature, what the weight column is multiplied by (None: not smoothed)
    scale: torch.Tensor | None = field(default=None, compare=False, repr=False)
    #: the module that makes the input and takes the division, a per-feature norm or a layer (None: a ``Mul`` before the layer)
    producer: str | None = None

    @property
    def smoothed(self) -> bool:
        return self.alpha is not None

    def to_json(self) -> dict[str, Any]:
        figures = {k: round(v, 6) for k, v in (("int8_error", self.error), ("smoothed_int8_error", self.smoothed_error)) if v is not None}
        where = {"divided_in": self.producer or "mul"} if self.smoothed else {}
        return {"layer": self.name, "smoothed": self.smoothed, "alpha": self.alpha, **figures, **where, "why": self.why}


@dataclass(frozen=True)
class Smoothing:
    """:func:`plan_smoothing`'s plan: per candidate layer, its :class:`LayerSmoothing`; ``mode``: the int8 it is for."""

    mode: str
    layers: dict[str, LayerSmoothing]

    @property
    def smoothed(self) -> list[str]:
        return [name for name, row in self.layers.items() if row.smoothed]

    def summary(self) -> str:
        """One line: how many layers were smoothed, at which strengths."""
        alphas = sorted({row.alpha for row in self.layers.values() if row.alpha is not None})
        shown = f" (a {alphas[0]:g}-{alphas[-1]:g})" if len(alphas) > 1 else f" (a {alphas[0]:g})" if alphas else ""
        return f"{len(self.smoothed)} of {len(self.layers)} matrix products smoothed before {self.mode}{shown}"

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "smoothed": len(self.smoothed), "summary": self.summary(),
                "layers": [row.to_json() for row in self.layers.values()]}


def fake_int8(x: torch.Tensor, weight: torch.Tensor, static: tuple[float, float] | None = None) -> torch.Tensor:
    """``x @ weight.T`` as onnxruntime's int8 computes it (float arithmetic on the rounded values):
    ``x`` (rows, in) on one uint8 grid that holds 0 and its range (``static``: the range ``(lo, hi)`` fixed
    beforehand, values outside it clipped), ``weight`` (out, in) symmetric int8 per output row.

        >>> x, w = torch.tensor([[0.5, -1.0]]), torch.tensor([[1.0, 2.0]])
        >>> round(float(fake_int8(x, w)), 2), float(x @ w.T)
        (-1.5, -1.5)
    """
    lo, hi = static if static is not None else (float(x.min()), float(x.max()))
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    step = (hi - lo) / 255 if hi > lo else 1.0
    zero = min(max(round(-lo / step), 0), 255)
    xq = (torch.clamp(torch.round(x / step) + zero, 0, 255) - zero) * step
    row = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return xq @ (torch.round(weight / row).clamp(-127, 127) * row).T


def _candidates(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers that could be smoothed (by name), and why each other matrix-product layer is not."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and name:
            owners.setdefault(id(weight), []).append(name)
    layers, skipped = {}, {}
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None or kind.name not in KINDS or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        others = [o for o in owners.get(id(module.weight), []) if o != name]
        if others:
            skipped[name] = f"not smoothed: its weight is also {others[0]}'s (a tied weight keeps its values)"
        elif kind.why_not_foldable(module) is not None:
            skipped[name] = f"not smoothed: {kind.why_not_foldable(module)}"
        else:
            layers[name] = module
    return layers, skipped


@contextlib.contextmanager
def _hooked(layers: dict[str, nn.Module], record: Any) -> Iterator[None]:
    """``record(name, input, rows)`` with each layer's input as it is and as (rows, in features), float32, while the block runs."""
    def hook(name: str) -> Any:
        def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            record(name, x, x.detach().reshape(-1, x.shape[-1]).float())
        return pre

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _norms(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The modules that could take a smoothing's division: no children, a 1-d ``weight`` (and at most a
    1-d ``bias``) of a size some candidate reads (a LayerNorm, an RMSNorm; each is tried, and kept only where exact)."""
    sizes = {_width(layer) for layer in layers.values()}
    found = {}
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        weight = params.get("weight")
        if (next(module.children(), None) is None and name not in layers and isinstance(weight, torch.Tensor) and weight.ndim == 1
                and int(weight.shape[0]) in sizes and set(params) <= {"weight", "bias"}
                and all(p.ndim == 1 and p.shape == weight.shape for p in params.values())):
            found[name] = module
    return found


@dataclass
class _Seen:
    """What the calibration pass saw: per layer its input's per-feature (min, max), the layers that read one
    input tensor together (groups), the norm whose output that tensor is (by group's first layer), the first batch."""

    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    groups: list[list[str]] = field(default_factory=list)
    producers: dict[str, str] = field(default_factory=dict)
    batch: Batch | None = None
    #: the layers in the order the first batch called them
    order: list[str] = field(default_factory=list)


def _ranges(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Batch]) -> _Seen:
    """Per layer, its input's per-feature minimum and maximum over ``batches``; the layers called one after
    another on one input tensor (a query, key and value projection: one scale, one ``Mul``, shared); the norm
    that made it, where the last norm to run did (:func:`_norms`). One input and one norm output held at a time."""
    seen = _Seen()
    last: dict[str, Any] = {}  # on the first batch: the layer called last and its input, the norm run last and its output

    def record(name: str, x: torch.Tensor, rows: torch.Tensor) -> None:
        lo, hi = rows.amin(0), rows.amax(0)
        old = seen.ranges.get(name)
        seen.ranges[name] = (lo, hi) if old is None else (torch.minimum(old[0], lo), torch.maximum(old[1], hi))
        if seen.batch is None and name not in seen.order:
            seen.order.append(name)
            if last.get("input") is x:
                next(g for g in seen.groups if last["layer"] in g).append(name)
            else:
                seen.groups.append([name])
                if last.get("made") is x:
                    seen.producers[name] = last["norm"]
            last.update(layer=name, input=x)

    def output(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if seen.batch is None and isinstance(out, torch.Tensor):
                last.update(norm=name, made=out)
        return hook

    handles = [norm.register_forward_hook(output(name)) for name, norm in _norms(model, layers).items()]
    try:
        with eval_mode(model), _hooked(layers, record):
            for batch in batches:
                run_batch(model, batch)
                if seen.batch is None:
                    seen.batch = batch
                    last.clear()  # the first batch's tensors let go
    finally:
        for handle in handles:
            handle.remove()
    seen.groups += [[name] for name in seen.ranges if name not in seen.order]  # first run after the first batch: alone
    return seen


def _width(layer: nn.Module, out: bool = False) -> int:
    """The layer's input features (``out``: output features)."""
    kind = layer_kind(layer)
    assert kind is not None
    return kind.out_features(layer) if out else kind.in_features(layer)


def _weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in), float32."""
    kind = layer_kind(layer)
    assert kind is not None
    return kind.standard_weight(layer).detach().reshape(kind.out_features(layer), -1).float()


def _scale(span: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-feature scale from the input's and the weight columns' largest magnitudes;
    1 where the input or the weight column is always 0."""
    dead = (span <= _TINY) | (wmax <= _TINY)
    s = span.clamp(min=_TINY) ** alpha / wmax.clamp(min=_TINY) ** (1 - alpha)
    return torch.where(dead, torch.ones_like(s), s)


@dataclass
class _Errors:
    """One layer's candidate scales (None: unsmoothed) and their products' squared errors so far."""

    scales: dict[float | None, torch.Tensor | None]
    static: dict[float | None, tuple[float, float] | None]
    weights: dict[float | None, torch.Tensor] = field(default_factory=dict)
    error: dict[float | None, float] = field(default_factory=dict)
    norm: float = 0.0


def _group_errors(layers: dict[str, nn.Module], ranges: tuple[torch.Tensor, torch.Tensor], alphas: Sequence[float],
                  static: bool) -> dict[str, _Errors]:
    """The candidate scales of layers that read one input (its ``ranges``), one per strength for all of them
    (SmoothQuant's, from the largest weight column of any of them), and each one's fixed input range (``static``)."""
    lo, hi = ranges
    weights = {name: _weight(layer) for name, layer in layers.items()}
    span, wmax = torch.maximum(lo.abs(), hi.abs()), torch.stack([w.abs().amax(0) for w in weights.values()]).amax(0)
    scales: dict[float | None, torch.Tensor | None] = {None: None, **{a: _scale(span, wmax, a) for a in alphas}}
    fixed = {a: ((float((lo / s).min()), float((hi / s).max())) if s is not None else (float(lo.min()), float(hi.max())))
             if static else None for a, s in scales.items()}
    return {name: _Errors(scales, fixed, {a: w * s if s is not None else w for a, s in scales.items()}) for name, w in weights.items()}


def plan_smoothing(model: nn.Module, calibration: Iterable[Batch], tuning: Iterable[Batch], mode: str = "int8",
                   alphas: Sequence[float] = ALPHAS, min_gain: float = MIN_GAIN) -> Smoothing:
    """Per matrix-product layer of ``model``: smoothed or not, at which ``a``, and why (see the module
    docstring): input ranges from ``calibration``, each candidate's int8 error (``mode``: ``int8`` or
    ``int8-static``) on ``tuning``. Nothing in the model is changed."""
    layers, skipped = _candidates(model)
    seen = _ranges(model, layers, calibration)
    errors = {name: e for group in seen.groups
              for name, e in _group_errors({n: layers[n] for n in group}, seen.ranges[group[0]], alphas, mode == "int8-static").items()}

    def record(name: str, x: torch.Tensor, rows: torch.Tensor) -> None:
        # the range from every row (a tensor's extremes divided by s are its per-feature extremes divided by s), the error from some
        e, step, lo, hi = errors[name], -(-rows.shape[0] // MAX_ROWS), rows.amin(0), rows.amax(0)
        sample = rows[::step]
        want = sample @ e.weights[None].T
        e.norm += float(want.square().sum())
        for a, s in e.scales.items():
            fixed = e.static[a] or ((float((lo / s).min()), float((hi / s).max())) if s is not None else (float(lo.min()), float(hi.max())))
            got = fake_int8(sample / s if s is not None else sample, e.weights[a], fixed)
            e.error[a] = e.error.get(a, 0.0) + float((got - want).square().sum())

    trials = [seen.batch] if seen.batch is not None else []  # the makers are tried on a calibration and a tuning batch
    with eval_mode(model), _hooked({n: layers[n] for n in errors}, record):
        for batch in tuning:
            run_batch(model, batch)
            trials += [batch] if len(trials) == 1 else []
    rows = {name: LayerSmoothing(name, None, why) for name, why in skipped.items()}
    rows |= {name: LayerSmoothing(name, None, _NOT_RUN) for name in layers if name not in errors}
    taken: set[str] = set()
    for group in seen.groups:
        rows |= _decide(group, [errors[n] for n in group], min_gain)
        if rows[group[0]].smoothed and trials:
            rows |= _producer(model, mode, {n: rows[n] for n in group}, _makers(seen, layers, group, taken), trials)
            taken.update(row.producer for n in group if (row := rows[n]).producer is not None)
    order = list(dict(model.named_modules()))
    return Smoothing(mode, {name: rows[name] for name in sorted(rows, key=order.index)})


#: the layers tried, nearest first, as the maker of a group's input where no norm makes it (the value projection
#: before an attention output, the up projection before a gated MLP's down projection)
MAKERS_TRIED = 2


def _makers(seen: _Seen, layers: dict[str, nn.Module], group: list[str], taken: set[str]) -> list[str]:
    """The modules that may make ``group``'s input, to try in order: the norm whose output it is; else the
    :data:`MAKERS_TRIED` layers called last before it with as many outputs as it has inputs (none twice)."""
    if group[0] in seen.producers:
        return [seen.producers[group[0]]]
    width, before = _width(layers[group[0]]), seen.order[:seen.order.index(group[0])] if group[0] in seen.order else []
    made = [n for n in reversed(before) if n not in group and n not in taken and _width(layers[n], out=True) == width]
    return made[:MAKERS_TRIED]


def _producer(model: nn.Module, mode: str, rows: dict[str, LayerSmoothing], makers: list[str], batches: list[Batch]
              ) -> dict[str, LayerSmoothing]:
    """``rows`` (one group, smoothed) with the division taken by the first of ``makers`` (a norm's weight, a layer's
    output rows) that gives the model's outputs on ``batches`` (a calibration and a tuning batch) as before (nothing
    else reads what it makes, and nothing between it and the group but per-feature linear steps); else as they were
    (a ``Mul``), saying why."""
    with eval_mode(model):
        want = [flatten_outputs(run_batch(model, batch)) for batch in batches]
        for maker in makers:
            trial = {name: replace(row, producer=maker) for name, row in rows.items()}
            with smoothed(model, Smoothing(mode, trial)):
                if all(_differs(w, flatten_outputs(run_batch(model, b))) is None for w, b in zip(want, batches)):
                    what = "output rows" if layer_kind(model.get_submodule(maker)) is not None else "weight"
                    return {name: replace(row, why=f"{row.why}; divided out of {maker}'s {what} (no Mul)") for name, row in trial.items()}
    tried = f"{', '.join(makers)} {'does' if len(makers) == 1 else 'do'} not take it exactly" if makers else "nothing before it could take it"
    return {name: replace(row, why=f"{row.why}; a Mul before it ({tried})") for name, row in rows.items()}


def _differs(want: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> str | None:
    """None where ``got`` is ``want`` within squash's tolerance (:func:`~actsparse_deploy.bake.apply.squash_tolerance`),
    else the first difference, in words."""
    from ..data.compare import compare_outputs
    from .apply import squash_tolerance

    tolerance = squash_tolerance(want)
    _, problems = compare_outputs(got, want, tolerance, sides=("smoothed", "before"))
    return problems[0] if problems else None


_NOT_RUN = "not smoothed: it did not run on the calibration data"


def _decide(group: list[str], errors: list[_Errors], min_gain: float) -> dict[str, LayerSmoothing]:
    """The rows of layers that read one input, from their candidates' errors: one decision for all of them."""
    norm = sum(e.norm for e in errors)
    if norm == 0 or not errors[0].error:
        return {name: LayerSmoothing(name, None, "not smoothed: its output was 0 on the tuning data") for name in group}
    relative = {a: (sum(e.error.get(a, 0.0) for e in errors) / norm) ** 0.5 for a in errors[0].error}
    base = relative.pop(None)
    best = min(relative, key=lambda a: relative[a])
    shared = f" (one scale with {', '.join(group[1:])}: they read the same input)" if len(group) > 1 else ""
    if relative[best] > base * (1 - min_gain):
        why = f"not smoothed: its int8 error {base:.4g} falls by under {min_gain:.0%} (best a {best:g}: {relative[best]:.4g})"
        return {name: LayerSmoothing(name, None, why, base, relative[best]) for name in group}
    why = f"smoothed at a {best:g}: its int8 error {base:.4g} -> {relative[best]:.4g}"
    scale = errors[0].scales[best]
    return {name: LayerSmoothing(name, best, why + (shared if name == group[0] else f" (one scale with {group[0]})"),
                                 base, relative[best], scale) for name in group}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


_Undo = list[Callable[[], None]]


def _apply(model: nn.Module, plan: Smoothing) -> _Undo:
    """The plan's smoothed layers changed: weight columns scaled (a new parameter); the input divided by the
    norm that makes it (its weight and bias, new parameters) or by a ``Mul`` the layer is wrapped in; what
    undoes it, step by step (the same parameters back); a step that fails undoes the ones before it."""
    undo: _Undo = []
    try:
        _apply_steps(model, plan, undo)
    except BaseException:  # a layer that refuses a new weight (a parametrization): the steps done so far undone
        _undo(undo)
        raise
    return undo


def _apply_steps(model: nn.Module, plan: Smoothing, undo: _Undo) -> None:
    """:func:`_apply`'s steps, each one's undo added to ``undo`` as it is done."""
    from .apply import MaskedInput

    inverse: dict[int, torch.Tensor] = {}
    modules = dict(model.named_modules())  # as they are before any is wrapped: a producer may be smoothed too
    for name in plan.smoothed:
        layer, row = modules[name], plan.layers[name]
        kind = layer_kind(layer)
        assert kind is not None and row.scale is not None
        undo.append(partial(setattr, layer, "weight", layer.weight))
        scale = row.scale.to(device=layer.weight.device)
        kind.fold(layer, scale)
        # layers of one input share one inverse: one norm change, or one constant that one Mul reads
        first = id(row.scale) not in inverse
        shared = inverse.setdefault(id(row.scale), (1 / scale).to(layer.weight.dtype))
        if row.producer is not None:
            if first:
                undo += _divide_output(modules[row.producer], shared)
        else:
            _replace(model, name, MaskedInput(layer, shared))
            undo.append(partial(_replace, model, name, layer))


def _divide_output(module: nn.Module, inverse: torch.Tensor) -> _Undo:
    """``module``'s output features multiplied by ``inverse``: a layer's weight rows and bias, a norm's weight and
    bias (new parameters); what puts the old ones back."""
    kind = layer_kind(module)
    undo: _Undo = []
    with torch.no_grad():
        for pname, param in list(module.named_parameters(recurse=False)):
            undo.append(partial(setattr, module, pname, param))
            if kind is not None and pname == "weight":
                rows = kind.standard_weight(module, param)
                new = kind.native_weight(module, rows * inverse.to(param.dtype).reshape(-1, *[1] * (rows.ndim - 1)))
            else:
                new = param * inverse.to(param.dtype)
            setattr(module, pname, nn.Parameter(new.contiguous(), requires_grad=param.requires_grad))
    return undo


def _undo(undo: _Undo) -> None:
    for step in reversed(undo):
        step()


def apply_smoothing(model: nn.Module, plan: Smoothing, check: Iterable[Batch] = ()) -> Smoothing:
    """``plan`` (made on ``model``) baked into ``model`` in place, checked on the ``check`` batches: every output as
    before within squash's tolerance (:func:`~actsparse_deploy.bake.apply.squash_tolerance`), else a SquashError and
    the model as it was."""
    _checked(model, plan, list(check))
    return plan


def _checked(model: nn.Module, plan: Smoothing, check: list[Batch]) -> _Undo:
    """:func:`_apply`, then the model's outputs on ``check`` compared with those before (see :func:`apply_smoothing`)."""
    with eval_mode(model):
        before = [flatten_outputs(run_batch(model, b)) for b in check]
        undo = _apply(model, plan)
        for batch, want in zip(check, before):
            problem = _differs(want, flatten_outputs(run_batch(model, batch)))
            if problem is not None:
                _undo(undo)
                raise SquashError(f"smoothing changed the model's outputs ({problem}): a smoothed layer's weight is read "
                                  "elsewhere in the model, or its half-precision weights round; leave out the smoothing (--no-smooth)")
    return undo


@contextlib.contextmanager
def smoothed(model: nn.Module, plan: Smoothing, check: Iterable[Batch] = ()) -> Iterator[nn.Module]:
    """``model`` with ``plan`` baked in for the block (checked on ``check`` as :func:`apply_smoothing` checks it),
    then as it was (the same parameters)."""
    undo = _checked(model, plan, list(check))
    try:
        yield model
    finally:
        _undo(undo)
