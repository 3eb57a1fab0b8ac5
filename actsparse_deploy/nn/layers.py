"""Layer kinds: what calibration, fold and prune need to know about each module type.

One adapter object (a :class:`LayerKind`) per module type that can take a mask
says: its input-feature axis, its number of input / output features, which axes
of its input are samples, how to fold a per-input-feature scale into its weight,
how to remove input features (as a consumer) and output features (as a producer),
its weight in the ``(out, in, *kernel)`` layout every kind shares (what selection
methods and compensation read, and a masks file stores), how its one compute op looks in a ``torch.export`` graph, and why it cannot be
folded or pruned when it cannot. Adapters are registered for module types with
:func:`register_layer_kind`; :func:`layer_kind` finds a module's by its exact type,
then along its MRO (so subclasses of ``nn.Linear`` are Linears). Built in:
``nn.Linear``, ``ConvNd`` (1d / 2d / 3d; a depthwise conv, ``groups == in ==
out channels``, is a per-feature op; other grouped convs fold only where
``groups == in_channels`` and never prune), ``ConvTransposeNd`` (fold and consumer
side only), ``BatchNorm`` (a per-feature op: output feature ``j`` depends on
input feature ``j`` only) and GPT-2's ``transformers.pytorch_utils.Conv1D``
(weight ``(in, out)``, an ``addmm``; registered by name, so ``transformers`` is
not imported for it). A new module type is registered, not added as a branch:

    >>> import torch
    >>> from torch import nn
    >>> from actsparse_deploy.nn.layers import Cut, WeightedKind, layer_kind, register_layer_kind
    >>> conv = nn.Conv2d(3, 8, 3)
    >>> kind = layer_kind(conv)
    >>> kind.name, kind.feature_axis(conv), kind.in_features(conv), kind.sample_ndim(conv, 4)
    ('conv', -3, 3, 1)
    >>> class Dense(nn.Module):  # weight (out, in) and bias, like nn.Linear, but not one
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.weight, self.bias = nn.Parameter(torch.ones(2, 4)), nn.Parameter(torch.zeros(2))
    ...     def forward(self, x):
    ...         return nn.functional.linear(x, self.weight, self.bias)
    >>> layer_kind(Dense()) is None
    True
    >>> @register_layer_kind(Dense)
    ... class DenseKind(WeightedKind):
    ...     ops = frozenset({torch.ops.aten.linear.default})
    >>> dense = Dense()
    >>> layer_kind(dense).fold(dense, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    >>> dense.weight.tolist()
    [[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]]
    >>> small = layer_kind(dense).shrink(dense, Cut(in_keep=torch.tensor([0, 2])))
    >>> small.weight.shape
    torch.Size([2, 2])
    >>> layer_kind(dense).weight_columns(dense).shape  # (out, in, kernel positions): what methods score
    torch.Size([2, 4, 1])
    >>> from actsparse_deploy.nn.layers import unregister_layer_kind
    >>> _ = unregister_layer_kind(Dense)
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import fx, nn

from ..base.errors import ConfigError, SquashError

__all__ = [
    "BATCH_NORM",
    "CONVOLUTION",
    "CONV_OPS",
    "LINEAR_OPS",
    "BatchNormKind",
    "Conv1DKind",
    "ConvKind",
    "ConvTransposeKind",
    "Cut",
    "LayerKind",
    "LinearKind",
    "WeightedKind",
    "compute_ops",
    "default_sample_ndim",
    "layer_kind",
    "register_layer_kind",
    "unregister_layer_kind",
    "why_unregistered",
]

_aten = torch.ops.aten

LINEAR_OPS = frozenset({_aten.linear.default})
CONV_OPS = {
    1: frozenset({_aten.conv1d.default, _aten.conv1d.padding}),
    2: frozenset({_aten.conv2d.default, _aten.conv2d.padding}),
    3: frozenset({_aten.conv3d.default, _aten.conv3d.padding}),
}
#: ``convolution(input, weight, bias, stride, padding, dilation, transposed, ...)``
CONVOLUTION = _aten.convolution.default
#: ``batch_norm(input, weight, bias, running_mean, running_var, training, ...)``: per channel (axis 1).
BATCH_NORM = _aten.batch_norm.default


def _tensor(layer: nn.Module, name: str) -> torch.Tensor:
    """``layer.<name>``, a tensor (a parameter or a buffer)."""
    value = getattr(layer, name)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{type(layer).__name__}.{name} is a {type(value).__name__}, not a tensor")
    return value


def _no_weight_columns(layer: nn.Module) -> str:
    return (
        f"{type(layer).__name__} is not a Linear, a Conv1D or a ConvNd: methods and compensation need the "
        "consumer's weight columns (mask the input of a Linear or a Conv)"
    )


def default_sample_ndim(input_ndim: int) -> int:
    """Sample axes of a layer with no kind: (batch, features) and (batch, sequence,
    features) inputs are vectors of the last axis, like a Linear's; 4-d and up are
    images: batch only."""
    return input_ndim - 1 if input_ndim <= 3 else 1


@dataclass
class Cut:
    """How one layer is rebuilt smaller: input features scaled by ``in_scale`` (one
    value per input feature), then only ``in_keep`` of them kept; only ``out_keep``
    output features kept (a per-feature op: only those features)."""

    in_scale: torch.Tensor | None = None
    in_keep: torch.Tensor | None = None
    out_keep: torch.Tensor | None = None


class LayerKind(ABC):
    """What the library knows about one module type. The defaults say "cannot":
    a subclass overrides what its type can do. Stateless: one object serves every
    module of its type(s).

    Axes: :meth:`feature_axis` counts from the right (so it holds for batched and
    unbatched inputs, and for masks that have no batch axis); :meth:`axis` and
    :meth:`output_axis` are non-negative, for a tensor of a given rank.
    """

    #: what the compute op is called in messages ("linear", "conv")
    name: ClassVar[str] = "layer"
    #: the aten ops that can be this kind's one compute op in a ``torch.export`` graph
    ops: ClassVar[frozenset[Any]] = frozenset()
    #: positions of the parameters / buffers among the compute op's arguments
    param_slots: ClassVar[Mapping[str, int]] = {}
    #: the position of the layer's input among the compute op's arguments
    input_slot: ClassVar[int] = 0
    #: output feature ``j`` depends on input feature ``j`` only (BatchNorm): such a
    #: layer between a producer and a consumer loses the same features (see :meth:`is_per_feature`)
    per_feature: ClassVar[bool] = False
    #: pruned layers of this kind keep a multiple of ``channel_multiple`` features (convs)
    aligned: ClassVar[bool] = False

    # --- sizes and axes -----------------------------------------------------------------

    @abstractmethod
    def in_features(self, layer: nn.Module) -> int:
        """How many input features ``layer`` has (every kind must say)."""

    @abstractmethod
    def out_features(self, layer: nn.Module) -> int:
        """How many output features ``layer`` has (every kind must say)."""

    def feature_axis(self, layer: nn.Module) -> int | None:
        """The input-feature axis, negative (from the right); None where it is
        not fixed from the right (BatchNorm: axis 1 of any rank)."""
        return None

    def axis(self, layer: nn.Module, ndim: int) -> int:
        """The input-feature axis of an input of ``ndim`` axes (non-negative)."""
        axis = self.feature_axis(layer)
        if axis is None:
            raise SquashError(f"{type(layer).__name__}'s input features are not on a fixed axis from the right ({self.name})")
        return ndim + axis

    def output_axis(self, layer: nn.Module, ndim: int) -> int:
        """The output-feature axis of an output of ``ndim`` axes (non-negative)."""
        return self.axis(layer, ndim)

    def sample_ndim(self, layer: nn.Module, input_ndim: int) -> int:
        """How many leading axes of the layer's input are separate samples."""
        return default_sample_ndim(input_ndim)

    def is_per_feature(self, layer: nn.Module) -> bool:
        """Output feature ``j`` of ``layer`` depends on its input feature ``j`` only
        (:attr:`per_feature`, or a depthwise conv): the graph walk passes through it."""
        return self.per_feature

    # --- fold ---------------------------------------------------------------------------

    def why_not_foldable(self, layer: nn.Module) -> str | None:
        """None if :meth:`fold` can scale the layer's input features, else why not."""
        return f"{type(layer).__name__} has no weight to fold into"

    def fold(self, layer: nn.Module, vector: torch.Tensor) -> None:
        """Multiply input feature ``i`` by ``vector[i]`` inside the layer, in place.
        The scaled weight is a new parameter: a weight tied to another layer keeps
        its values there."""
        raise SquashError(self.why_not_foldable(layer) or f"{type(layer).__name__} cannot be folded")

    # --- weight layout (selection methods and compensation) ---------------------------
    #
    # A kind says its weight layout with :meth:`standard_weight` and :meth:`native_weight`;
    # the columns methods score and compensation refits, and the bias it refits, follow.

    def why_no_weight_columns(self, layer: nn.Module) -> str | None:
        """None if :meth:`standard_weight` gives the columns each input feature
        multiplies (what methods score and compensation refits), else why not.
        By default a kind that says its weight layout (overrides :meth:`standard_weight`) has them."""
        return None if type(self).standard_weight is not LayerKind.standard_weight else _no_weight_columns(layer)

    def standard_weight(self, layer: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` (default: the layer's) in the layout every kind shares,
        ``(out, in, *kernel)``: what a masks file stores as the layer's new weight."""
        raise ConfigError(self.why_no_weight_columns(layer) or f"{type(layer).__name__} has no weight columns")

    def native_weight(self, layer: nn.Module, standard: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`standard_weight`: ``(out, in, *kernel)`` in the layer's own layout."""
        raise ConfigError(self.why_no_weight_columns(layer) or f"{type(layer).__name__} has no weight columns")

    def weight_columns(self, layer: nn.Module, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The layer's weight as ``(out, d, k)`` in ``dtype``: column group ``j`` is
        what input feature ``j`` multiplies (``k`` kernel positions of a conv, 1 for a
        Linear). Refused (:class:`ConfigError`, :meth:`why_no_weight_columns`) where the kind has none."""
        why = self.why_no_weight_columns(layer)
        if why is not None:
            raise ConfigError(why)
        w = self.standard_weight(layer).detach().to(dtype)
        return w.reshape(w.shape[0], w.shape[1], -1)

    def weight_from_columns(self, layer: nn.Module, columns: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`weight_columns`: ``(out, d, k)`` (or ``(out, d)``)
        columns as a weight of the layer's own shape, layout and dtype."""
        current = self.standard_weight(layer)
        return self.native_weight(layer, columns.reshape(current.shape)).contiguous().to(current.dtype)

    def bias(self, layer: nn.Module) -> torch.Tensor | None:
        """The layer's per-output-feature bias (what compensation refits), None
        where it has none (compensation gives it one). Default: ``layer.bias``."""
        value = getattr(layer, "bias", None)
        return value if isinstance(value, torch.Tensor) else None

    # --- prune --------------------------------------------------------------------------

    def why_not_prunable(self, layer: nn.Module) -> str | None:
        """None if the layer can be found in the graph and lose features on both
        sides (a Linear's inputs and outputs; a per-feature op's features), else why not."""
        return f"{type(layer).__name__} cannot be pruned"

    def is_compute(self, layer: nn.Module, node: fx.Node) -> bool:
        """``node`` (of a ``torch.export`` graph, in ``layer``'s call) is the layer's compute op."""
        return node.op == "call_function" and node.target in self.ops

    def shrink(self, layer: nn.Module, cut: Cut) -> nn.Module:
        """A copy of ``layer`` (same class) with ``cut`` applied to its parameters."""
        raise SquashError(self.why_not_prunable(layer) or f"{type(layer).__name__} cannot be pruned")


class WeightedKind(LayerKind):
    """A layer with a ``weight`` whose input features lie along ``weight_dims[0]``
    and output features along ``weight_dims[1]``, an optional per-output-feature
    ``bias``, features on the last axis of its input (override :meth:`feature_axis`
    otherwise), computed by one op of :attr:`ops` that reads ``(input, weight, bias)``.
    """

    name: ClassVar[str] = "linear"
    param_slots: ClassVar[Mapping[str, int]] = {"weight": 1, "bias": 2}
    #: (input-feature dim, output-feature dim) of the weight
    weight_dims: ClassVar[tuple[int, int]] = (1, 0)
    #: the attributes that hold (input features, output features), set on a shrunk copy
    size_attrs: ClassVar[tuple[str, str] | None] = None

    def in_features(self, layer: nn.Module) -> int:
        return int(_tensor(layer, "weight").shape[self.weight_dims[0]])

    def out_features(self, layer: nn.Module) -> int:
        return int(_tensor(layer, "weight").shape[self.weight_dims[1]])

    def feature_axis(self, layer: nn.Module) -> int | None:
        return -1

    def sample_ndim(self, layer: nn.Module, input_ndim: int) -> int:
        axis = self.feature_axis(layer)
        return default_sample_ndim(input_ndim) if axis is None else max(input_ndim + axis, 0)

    def why_not_foldable(self, layer: nn.Module) -> str | None:
        base = overridden_base(layer)
        if base is not None:
            return (
                f"{type(layer).__name__} overrides {base}.forward: its forward may read the input other than through "
                "its weight (a LoRA adapter, a transposed weight), so the mask stays a multiply"
            )
        return None

    def why_not_prunable(self, layer: nn.Module) -> str | None:
        if isinstance(layer, nn.modules.lazy.LazyModuleMixin):
            return f"{type(layer).__name__} is lazy (its weight has no shape yet)"
        return None

    def why_no_weight_columns(self, layer: nn.Module) -> str | None:
        if isinstance(getattr(layer, "weight", None), nn.parameter.UninitializedParameter):
            return f"{type(layer).__name__} is lazy (its weight has no shape yet): run it once first"
        return None

    def standard_weight(self, layer: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
        in_dim, out_dim = self.weight_dims
        return (_tensor(layer, "weight") if weight is None else weight).movedim((out_dim, in_dim), (0, 1))

    def native_weight(self, layer: nn.Module, standard: torch.Tensor) -> torch.Tensor:
        in_dim, out_dim = self.weight_dims
        return standard.movedim((0, 1), (out_dim, in_dim))

    def _scale_shape(self, weight: torch.Tensor) -> list[int]:
        shape = [1] * weight.ndim
        shape[self.weight_dims[0]] = -1
        return shape

    def scaled(self, layer: nn.Module, weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """``weight`` (the layer's, or a copy) with input feature ``i`` scaled by ``vector[i]``."""
        return weight * vector.to(weight.dtype).to(weight.device).reshape(self._scale_shape(weight))

    def fold(self, layer: nn.Module, vector: torch.Tensor) -> None:
        with torch.no_grad():
            weight = _tensor(layer, "weight")
            layer.weight = nn.Parameter(self.scaled(layer, weight, vector), requires_grad=weight.requires_grad)

    def shrink(self, layer: nn.Module, cut: Cut) -> nn.Module:
        new = copy.deepcopy(layer)
        in_dim, out_dim = self.weight_dims
        with torch.no_grad():
            original = _tensor(layer, "weight")
            weight = original.detach()
            if cut.in_scale is not None:
                weight = self.scaled(layer, weight, cut.in_scale)
            if cut.in_keep is not None:
                weight = weight.index_select(in_dim, cut.in_keep.to(weight.device))
            if cut.out_keep is not None:
                weight = weight.index_select(out_dim, cut.out_keep.to(weight.device))
                bias = getattr(layer, "bias", None)
                if bias is not None:
                    kept = bias.detach().index_select(0, cut.out_keep.to(bias.device))
                    new.bias = nn.Parameter(kept.clone(), bias.requires_grad)
            new.weight = nn.Parameter(weight.contiguous().clone(), original.requires_grad)
            if self.size_attrs is not None:
                setattr(new, self.size_attrs[0], int(weight.shape[in_dim]))
                setattr(new, self.size_attrs[1], int(weight.shape[out_dim]))
        return new


KindT = TypeVar("KindT", bound=LayerKind)

_KINDS: dict[type, LayerKind] = {}
#: kinds of module types named ``module.QualName``, for libraries not imported here (transformers)
_KINDS_BY_NAME: dict[str, LayerKind] = {}


def register_layer_kind(*module_types: type) -> Callable[[Any], Any]:
    """Class decorator: one instance of the decorated :class:`LayerKind` serves
    ``module_types`` (and, through the MRO, their subclasses that have none of
    their own). A type that already has a kind is refused: unregister it first."""
    for t in module_types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise ConfigError(f"cannot register a layer kind for {t!r}: not an nn.Module type")
        if t in _KINDS:
            raise ConfigError(
                f"{t.__name__} already has a layer kind ({type(_KINDS[t]).__name__}): "
                "unregister_layer_kind it first"
            )

    def decorate(kind: Any) -> Any:
        if isinstance(kind, type) and issubclass(kind, LayerKind) and getattr(kind, "__abstractmethods__", None):
            missing = ", ".join(sorted(kind.__abstractmethods__))
            raise ConfigError(f"layer kind {kind.__name__} must say {missing} (every kind gives its layer's sizes)")
        instance = kind() if isinstance(kind, type) else kind
        if not isinstance(instance, LayerKind):
            raise ConfigError(f"{kind!r} is not a LayerKind")
        for t in module_types:
            _KINDS[t] = instance
        return kind

    return decorate


def unregister_layer_kind(module_type: type) -> LayerKind:
    """Remove the kind registered for exactly ``module_type``; returns it."""
    try:
        return _KINDS.pop(module_type)
    except KeyError:
        name = getattr(module_type, "__name__", repr(module_type))
        raise ConfigError(f"no layer kind registered for {name}") from None


def layer_kind(module: nn.Module | type) -> LayerKind | None:
    """The kind of a module (or module type): its exact type's, else the first
    along its MRO; None for a type with none (see :func:`why_unregistered`)."""
    cls = module if isinstance(module, type) else type(module)
    for klass in cls.__mro__:
        kind = _KINDS.get(klass) or _KINDS_BY_NAME.get(f"{klass.__module__}.{klass.__qualname__}")
        if kind is not None:
            return kind
    return None


def overridden_base(module: nn.Module) -> str | None:
    """The name of the registered class ``module``'s kind comes from, where the
    module's class (a subclass of it) defines its own ``forward``; else None. Such
    a forward may compute more than the kind's op (a LoRA Linear adds an adapter
    that reads the unmasked input), so what folds into the weight would differ."""
    cls = type(module)
    below: list[type] = []  # the classes from the module's own down to the registered one
    for klass in cls.__mro__:
        if klass in _KINDS or f"{klass.__module__}.{klass.__qualname__}" in _KINDS_BY_NAME:
            own = [k for k in below if "forward" in vars(k) and not k.__module__.startswith("torch.nn.")]  # torch's Conv2d is its own
            return klass.__name__ if own else None
        below.append(klass)
    return None


def why_unregistered(module: nn.Module) -> str:
    """Why a module with no kind can be neither folded nor pruned."""
    name = type(module).__name__
    if isinstance(getattr(module, "weight", None), torch.Tensor):
        return (
            f"{name} is not a registered layer kind "
            "(register one with actsparse_deploy.nn.layers.register_layer_kind)"
        )
    return f"{name} has no weight to fold into"


def compute_ops() -> frozenset[Any]:
    """Every registered kind's compute ops: what counts as a layer's computation in a graph."""
    kinds = {*_KINDS.values(), *_KINDS_BY_NAME.values()}
    return frozenset(op for kind in kinds for op in kind.ops)


# --- built-in kinds ---------------------------------------------------------------------


@register_layer_kind(nn.Linear)
class LinearKind(WeightedKind):
    """``nn.Linear`` (and its subclasses, lazy ones included): features on the last axis."""

    name = "linear"
    ops = LINEAR_OPS
    size_attrs = ("in_features", "out_features")


def _spatial(layer: nn.Module) -> int:
    return len(layer.kernel_size)  # type: ignore[arg-type]


@register_layer_kind(nn.modules.conv._ConvNd)
class ConvKind(WeightedKind):
    """``nn.Conv1d`` / ``Conv2d`` / ``Conv3d``: features on the channel axis,
    ``(channels, *spatial)`` per sample, weight ``(out, in / groups, *kernel)``."""

    name = "conv"
    ops = frozenset({*CONV_OPS[1], *CONV_OPS[2], *CONV_OPS[3], CONVOLUTION})
    weight_dims = (1, 0)
    size_attrs = ("in_channels", "out_channels")
    aligned = True

    def in_features(self, layer: nn.Module) -> int:
        return int(layer.in_channels)  # type: ignore[arg-type]

    def out_features(self, layer: nn.Module) -> int:
        return int(layer.out_channels)  # type: ignore[arg-type]

    def feature_axis(self, layer: nn.Module) -> int | None:
        return -(_spatial(layer) + 1)

    def is_per_feature(self, layer: nn.Module) -> bool:
        return _depthwise(layer)

    def why_not_foldable(self, layer: nn.Module) -> str | None:
        if (why := super().why_not_foldable(layer)) is not None:
            return why
        if layer.groups == 1 or layer.groups == layer.in_channels:  # output channel o reads input channel o // multiplier
            return None
        return f"{type(layer).__name__} with groups has no weight to fold into"  # groups != in_channels: not depthwise

    def scaled(self, layer: nn.Module, weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        if layer.groups == 1:
            return super().scaled(layer, weight, vector)
        if (why := self.why_not_foldable(layer)) is not None:
            raise SquashError(why)
        per_out = vector.to(weight.dtype).to(weight.device).repeat_interleave(weight.shape[0] // vector.numel())
        return weight * per_out.reshape(-1, *[1] * (weight.ndim - 1))

    def why_no_weight_columns(self, layer: nn.Module) -> str | None:
        if layer.groups != 1:
            return f"{type(layer).__name__} has groups={layer.groups}: methods and compensation need a conv without groups"
        return super().why_no_weight_columns(layer)

    def why_not_prunable(self, layer: nn.Module) -> str | None:
        if (why := super().why_not_prunable(layer)) is not None:
            return why
        if layer.groups != 1 and not _depthwise(layer):
            return (
                f"{type(layer).__name__} has groups={layer.groups} (not depthwise): a grouped conv would have to "
                "lose whole groups, which prune does not do"
            )
        if _spatial(layer) not in CONV_OPS:
            return f"{type(layer).__name__} has {_spatial(layer)} spatial axes"
        return None

    def shrink(self, layer: nn.Module, cut: Cut) -> nn.Module:
        if layer.groups == 1:
            return super().shrink(layer, cut)
        if cut.in_keep is not None or (cut.out_keep is not None and not _depthwise(layer)):
            raise SquashError(
                f"{type(layer).__name__} with groups={layer.groups} only loses channels as a depthwise conv, "
                "input and output together (the cut needs out_keep and no in_keep)"
            )
        new: Any = super().shrink(layer, cut)
        new.out_channels = int(new.weight.shape[0])
        new.in_channels = new.groups = layer.groups if cut.out_keep is None else new.out_channels
        return new

    def is_compute(self, layer: nn.Module, node: fx.Node) -> bool:
        if node.op != "call_function":
            return False
        if node.target == CONVOLUTION:
            return node.args[6] is False
        return node.target in CONV_OPS.get(_spatial(layer), ())


def _depthwise(layer: nn.Module) -> bool:
    """A depthwise conv: one group per channel, as many out as in (channel ``j`` reads channel ``j`` only)."""
    groups = getattr(layer, "groups", 1)
    return groups > 1 and groups == layer.in_channels == layer.out_channels  # type: ignore[union-attr]


@register_layer_kind(nn.modules.conv._ConvTransposeNd)
class ConvTransposeKind(ConvKind):
    """``nn.ConvTranspose1d`` / ``2d`` / ``3d``: weight ``(in, out / groups, *kernel)``.
    Folds, and loses input features as a consumer; no producer side (not traced)."""

    weight_dims = (0, 1)

    def is_per_feature(self, layer: nn.Module) -> bool:
        return False

    def why_not_foldable(self, layer: nn.Module) -> str | None:
        if (why := WeightedKind.why_not_foldable(self, layer)) is not None:
            return why
        return None if layer.groups == 1 else f"{type(layer).__name__} with groups has no weight to fold into"

    def scaled(self, layer: nn.Module, weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return WeightedKind.scaled(self, layer, weight, vector)

    def why_not_prunable(self, layer: nn.Module) -> str | None:
        return f"{type(layer).__name__} is a transposed conv: its producer side is not traced"

    def why_no_weight_columns(self, layer: nn.Module) -> str | None:
        return _no_weight_columns(layer)

    def shrink(self, layer: nn.Module, cut: Cut) -> nn.Module:
        return WeightedKind.shrink(self, layer, cut)

    def is_compute(self, layer: nn.Module, node: fx.Node) -> bool:
        return node.op == "call_function" and node.target == CONVOLUTION and node.args[6] is True


@register_layer_kind(nn.modules.batchnorm._BatchNorm)
class BatchNormKind(LayerKind):
    """``nn.BatchNorm1d`` / ``2d`` / ``3d``: a per-feature op on axis 1. Between a
    producer and a consumer it loses the features they lose. Not folded (a mask on
    its input is a multiply)."""

    name = "batch_norm"
    ops = frozenset({BATCH_NORM})
    param_slots = {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4}
    per_feature = True

    def in_features(self, layer: nn.Module) -> int:
        return int(layer.num_features)  # type: ignore[arg-type]

    out_features = in_features

    def axis(self, layer: nn.Module, ndim: int) -> int:
        return 1

    def why_not_prunable(self, layer: nn.Module) -> str | None:
        if isinstance(layer, nn.modules.lazy.LazyModuleMixin):
            return f"{type(layer).__name__} is lazy (its parameters have no shape yet)"
        return None

    def shrink(self, layer: nn.Module, cut: Cut) -> nn.Module:
        keep = cut.out_keep if cut.out_keep is not None else cut.in_keep
        if cut.in_scale is not None or keep is None:
            raise SquashError(f"{type(layer).__name__} only loses features as a whole: the cut needs out_keep and no in_scale")
        new: Any = copy.deepcopy(layer)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                value = getattr(layer, name)
                if value is None:
                    continue
                kept = value.detach().index_select(0, keep.to(value.device)).clone()
                setattr(new, name, nn.Parameter(kept, value.requires_grad) if isinstance(value, nn.Parameter) else kept)
        new.num_features = int(keep.numel())
        return new


class Conv1DKind(WeightedKind):
    """GPT-2's ``transformers.pytorch_utils.Conv1D``: a Linear with its weight
    transposed, ``(in, out)`` (``nx`` in, ``nf`` out), computed as
    ``addmm(bias, x.view(-1, nx), weight)`` then a view back. Registered by its
    name (see :data:`_KINDS_BY_NAME`), so ``transformers`` is imported only by
    models that use it."""

    name = "conv1d"
    ops = frozenset({_aten.addmm.default})
    param_slots = {"bias": 0, "weight": 2}
    input_slot = 1
    weight_dims = (0, 1)
    size_attrs = ("nx", "nf")


_KINDS_BY_NAME["transformers.pytorch_utils.Conv1D"] = Conv1DKind()
