"""Dataflow of a model, for ``prune``: which layer computes a layer's input features.

The model is captured with ``torch.export`` on an example batch (``torch.fx``
cannot trace Hugging Face BERT; ``torch.export`` captures every built-in model).
Each aten node carries ``meta["nn_module_stack"]``, the module calls it belongs
to, so a layer's one compute node (``linear``, ``convNd``: its layer kind, see
:mod:`actsparse_deploy.layers`, says which) is found by the layer's name. From
that node's input the walk goes back through per-feature ops (ReLU, GELU, SiLU,
Tanh, dropout in eval, arithmetic with Python scalars, ..., per-feature layers
such as BatchNorm, and spatial padding right of the feature axis) to the layer
(``Linear``, ``ConvNd``, any registered kind) that made the features on the
consumer's feature axis. Removing features from that producer is exact only if nothing else
reads them, so every value on the way must have exactly one user, the modules on
the way must be called once and own their parameters, and no other masked module
may read a value on the way. Anything else (a residual add, a flatten, a pool, a
matmul, a model input) ends the walk with the reason: then only the consumer can
lose those features.

    >>> import torch
    >>> from torch import nn
    >>> from actsparse_deploy.graph import Dataflow
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> chain, why = Dataflow(model, torch.randn(3, 4)).producer("2")
    >>> chain.producer, chain.ops
    ('0', ('aten.relu',))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .batches import Batch, call_args, describe_batch
from .calibrate import eval_mode
from .errors import DataError, MaskError, SquashError, first_line
from .export import quiet
from .layers import LayerKind, compute_ops, layer_kind, why_unregistered

__all__ = ["Chain", "Dataflow", "capture", "example_args"]

_aten = torch.ops.aten

_ELEMENTWISE_NAMES = (
    "relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "tanh", "tanh_", "sigmoid", "sigmoid_",
    "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "selu_", "celu", "celu_", "hardtanh", "hardtanh_",
    "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "mish", "mish_", "softplus", "hardshrink",
    "softshrink", "threshold", "threshold_", "erf", "exp", "expm1", "log1p", "abs", "neg", "sqrt", "rsqrt",
    "square", "sin", "cos", "clamp", "clamp_", "clamp_min", "clamp_max", "mul", "mul_", "div", "div_", "add",
    "add_", "sub", "sub_", "rsub", "pow", "clone", "alias", "detach", "contiguous", "to", "_to_copy",
)
#: Ops whose output feature ``j`` depends on input feature ``j`` only, provided
#: every other argument is a Python scalar, string or None (never a tensor).
ELEMENTWISE = frozenset(
    op
    for name in _ELEMENTWISE_NAMES
    for overload in ("default", "Tensor", "Scalar", "Tensor_Scalar", "dtype")
    if (op := getattr(getattr(_aten, name, None), overload, None)) is not None
)
#: Identity when their third argument (``train``) is False.
DROPOUTS = frozenset(
    {_aten.dropout.default, _aten.feature_dropout.default, _aten.alpha_dropout.default, _aten.feature_alpha_dropout.default}
)
#: Padding (its pad list covers the last ``len // 2`` axes): per channel if those are spatial.
PADS = frozenset({_aten.pad.default, _aten.constant_pad_nd.default})


@dataclass(frozen=True)
class Chain:
    """How a consumer's input features are made: ``producer`` (a Linear / ConvNd),
    then ``norms`` (BatchNorms) and ``ops`` (per-feature ops), read by nothing else."""

    producer: str
    norms: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()


def prunable(layer: nn.Module) -> tuple[LayerKind | None, str]:
    """The layer's kind (see :mod:`actsparse_deploy.layers`) if the graph walk can
    use it (as a consumer, a producer or a per-feature op between), else None and why not."""
    kind = layer_kind(layer)
    if kind is None:
        return None, why_unregistered(layer)
    why = kind.why_not_prunable(layer)
    return (kind, "") if why is None else (None, why)


def example_args(example: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of a batch, as :func:`actsparse_deploy.batches.run_batch` calls the model."""
    try:
        return call_args(example)
    except DataError as e:
        raise MaskError(f"the example for the dataflow analysis: {first_line(e)}") from e


def capture(model: nn.Module, example: Batch) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` (in eval mode) on ``example``; a model
    it cannot capture is a :class:`SquashError` that keeps the cause."""
    args, kwargs = example_args(example)
    try:
        with eval_mode(model), quiet():
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:  # torch.export raises many types
        first = first_line(e, 300)
        raise SquashError(
            f"torch.export cannot capture the model on the example batch ({describe_batch(example)}), "
            f"which prune needs to find each layer's producer: {type(e).__name__}: {first}"
        ) from e


def _op_name(node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"input {node.name!r}"
    if node.op != "call_function":
        return f"{node.op} {node.name!r}"
    if isinstance(node.target, torch._ops.OpOverload):
        return "aten." + node.target._schema.name.split("::")[-1]
    return getattr(node.target, "__name__", str(node.target))


def _is_assert(node: fx.Node) -> bool:
    """Metadata assertions torch.export adds: they read a value but compute nothing."""
    return node.op == "call_function" and not node.users and _op_name(node).startswith("aten._assert")


def _users(node: fx.Node) -> list[fx.Node]:
    return [user for user in node.users if not _is_assert(user)]


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    value = node.meta.get("val")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []

    def collect(n: fx.Node) -> fx.Node:
        found.append(n)
        return n

    fx.node.map_arg((node.args, node.kwargs), collect)
    return found


def _pad_len(node: fx.Node) -> int:
    """The length of a pad node's pad list (2 per padded axis, from the last)."""
    pad = node.args[1]
    return len(pad) if isinstance(pad, (list, tuple)) else 2**30


def _is_zero_pad(node: fx.Node) -> bool:
    """A pad that maps 0 to 0 and is linear (reflect / replicate / circular, or constant 0)."""
    if node.target == _aten.constant_pad_nd.default:
        return bool((node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)) == 0)
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
    return bool(mode != "constant" or value in (None, 0, 0.0))


class Dataflow:
    """The graph of ``model`` on ``example``, and the producer of each layer's input."""

    def __init__(self, model: nn.Module, example: Batch) -> None:
        self.model = model
        self.program = capture(model, example)
        signature = self.program.graph_signature
        state_names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
        self._state: dict[str, fx.Node] = {}
        self._calls: dict[str, list[fx.Node]] = {}
        for node in self.program.graph.nodes:
            if node.op == "placeholder" and node.name in state_names:
                self._state[state_names[node.name]] = node
            elif node.op == "call_function" and (scope := _scope(node)):
                self._calls.setdefault(scope[-1], []).append(node)
        self._names: dict[int, int] = {}
        self._holders: dict[int, int] = {}
        for _, module in model.named_modules(remove_duplicate=False):
            self._names[id(module)] = self._names.get(id(module), 0) + 1
            for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                self._holders[id(t)] = self._holders.get(id(t), 0) + 1

    def producer(self, consumer: str, masked: Iterable[str] = ()) -> tuple[Chain | None, str]:
        """The chain that makes ``consumer``'s input features, or None and why not.

        ``masked``: the layers with a mask of their own; none of them but the
        consumer may read a value between the producer and the consumer.
        """
        masked = set(masked)
        layer = self.model.get_submodule(consumer)
        kind, why = prunable(layer)
        if kind is None or kind.per_feature:
            return None, f"{consumer}: {why or 'a per-feature op is not a consumer'}"
        node, why = self._compute_node(consumer, layer, kind)
        if node is None:
            return None, why
        if (problem := self._owns(consumer, layer, node, {"weight": kind.param_slots["weight"]})) is not None:
            return None, problem
        rank = len(_shape(node.args[0]) or ()) if isinstance(node.args[0], fx.Node) else 0
        axis = kind.axis(layer, rank)
        width = kind.in_features(layer)
        ops: list[str] = []
        norms: list[str] = []
        user, value = node, node.args[0]
        while True:
            if not isinstance(value, fx.Node):
                return None, f"the input of {consumer} is not a tensor of the graph"
            scope = _scope(value)
            clash = sorted(m for m in set(_scope(user)) - set(scope) if m in masked and m != consumer)
            if clash:
                return None, f"{clash[0]}, itself masked, reads a value between {consumer} and its producer"
            others = [u for u in _users(value) if u is not user]
            if others:
                return None, f"the output of {self._where(value)} is also read by {', '.join(self._where(u) for u in others)}"
            shape = _shape(value)
            if shape is None or len(shape) != rank or shape[axis] != width:
                return None, f"{self._where(value)} does not give {width} features on axis {axis - rank}"
            target = value.target if value.op == "call_function" else None
            # a pad is per feature if it pads only axes right of the feature axis
            spatial_pad = target in PADS and _pad_len(value) <= 2 * (rank - 1 - axis)
            if consumer in scope:  # computed inside the consumer, after its mask
                if not spatial_pad or not _is_zero_pad(value):
                    return None, f"{consumer} computes {self._where(value)} on its input before its {kind.name}"
            elif target in compute_ops():
                fqn, module, found = self._layer_at(value, consumer)
                if found is None:
                    return None, f"the input of {consumer} is made by {self._where(value)}, not by a module prune can shrink"
                if found.per_feature:
                    if found.axis(module, rank) != axis:
                        return None, (
                            f"{self._where(value)} works on axis {found.axis(module, rank)}, "
                            f"not on the feature axis {axis} of {consumer}"
                        )
                    if found.in_features(module) != width:
                        return None, f"{self._where(value)} is not a {found.name} module over {width} features"
                    if (problem := self._owns(fqn, module, value, found.param_slots)) is not None:
                        return None, problem
                    norms.append(fqn)
                else:
                    if found.output_axis(module, rank) != axis:
                        return None, (
                            f"{fqn} makes its features on axis {found.output_axis(module, rank)}, "
                            f"{consumer} reads them on axis {axis}"
                        )
                    if (problem := self._owns(fqn, module, value, found.param_slots)) is not None:
                        return None, problem
                    return Chain(fqn, tuple(reversed(norms)), tuple(reversed(ops))), ""
            elif target in DROPOUTS and value.args[2] is False:
                ops.append(_op_name(value))
            elif target in ELEMENTWISE or spatial_pad:
                if _tensor_args(value) != [value.args[0]]:
                    return None, f"{self._where(value)}, with a tensor operand, sits between {consumer} and its producer"
                first = value.args[0]
                if target not in PADS and (not isinstance(first, fx.Node) or _shape(first) != shape):
                    return None, f"{self._where(value)} changes the shape between {consumer} and its producer"
                ops.append(_op_name(value))
            elif value.op == "placeholder":
                return None, f"the input of {consumer} is an input of the model, not the output of a layer"
            else:
                return None, f"{self._where(value)} sits between {consumer} and the layer that makes its input"
            user, value = value, value.args[0]

    # --- helpers --------------------------------------------------------------------------

    def _where(self, node: fx.Node) -> str:
        scope = _scope(node)
        return f"{_op_name(node)} in {scope[-1]}" if scope and scope[-1] else _op_name(node)

    def _module(self, fqn: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(fqn)
        except AttributeError:
            return None

    def _compute_node(self, fqn: str, layer: nn.Module, kind: LayerKind) -> tuple[fx.Node | None, str]:
        """The one compute node (``linear``, ``convNd``, ...) of the module call at ``fqn``."""
        nodes = [n for n in self._calls.get(fqn, []) if kind.is_compute(layer, n)]
        if len(nodes) != 1:
            return None, f"the graph has {len(nodes)} {kind.name} ops in {fqn}, not one"
        return nodes[0], ""

    def _owns(self, fqn: str, module: nn.Module, node: fx.Node, slots: Mapping[str, int]) -> str | None:
        """Why ``module`` cannot be rebuilt smaller at ``fqn``, or None: it must have
        one name, one op in the graph (``node``), and parameters / buffers that no
        other module holds and no other op reads."""
        if self._names.get(id(module), 0) != 1:
            return f"{fqn} is registered under several names"
        every = compute_ops()
        computes = [n for n in self._calls.get(fqn, []) if n.target in every]
        if computes != [node]:
            return f"{fqn} runs {len(computes)} linear / conv / batch_norm ops in the graph (called more than once?)"
        for attr, position in slots.items():
            value = getattr(module, attr, None)
            if value is None:
                continue
            if self._holders.get(id(value), 0) != 1:
                return f"{fqn}.{attr} is shared with another module"
            state = self._state.get(f"{fqn}.{attr}")
            if state is None or position >= len(node.args) or node.args[position] is not state:
                return f"{fqn}.{attr} is not what its {_op_name(node)} reads in the graph"
            if _users(state) != [node]:
                return f"{fqn}.{attr} is also read by {', '.join(self._where(u) for u in _users(state) if u is not node)}"
        return None

    def _layer_at(self, node: fx.Node, consumer: str) -> tuple[str, nn.Module, LayerKind | None]:
        """The module whose compute op ``node`` is, and its kind; None if none is
        (a functional op, or a module prune cannot shrink)."""
        scope = _scope(node)
        fqn = scope[-1] if scope else ""
        module = self._module(fqn)
        if not fqn or module is None or fqn == consumer:
            return fqn, self.model, None
        kind, _ = prunable(module)
        if kind is None or not kind.is_compute(module, node):
            return fqn, module, None
        return fqn, module, kind


def _scope(node: fx.Node) -> list[str]:
    """The paths of the module calls ``node`` belongs to, outermost first."""
    paths = []
    for path, _type in (node.meta.get("nn_module_stack") or {}).values():
        path = str(path)
        for prefix in ("L['self'].", "L['self']"):
            path = path.removeprefix(prefix)
        paths.append(path)
    return paths
