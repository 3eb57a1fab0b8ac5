"""Dataflow of a model, for ``prune``: which layer computes a layer's input features.

The model is captured with ``torch.export`` on an example batch (``torch.fx``
cannot trace Hugging Face BERT; ``torch.export`` captures every built-in model).
Each aten node carries ``meta["nn_module_stack"]``, the module calls it belongs
to, so a layer's one ``linear`` / ``convNd`` node is found by the layer's name.
From that node's input the walk goes back through per-feature ops (ReLU, GELU,
SiLU, Tanh, dropout in eval, arithmetic with Python scalars, ..., BatchNorm and
spatial padding on a channel axis) to the ``Linear`` / ``ConvNd`` that made the
features. Removing features from that producer is exact only if nothing else
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

from .calibrate import Batch, describe_batch, eval_mode
from .errors import MaskError, first_line
from .export import quiet

__all__ = ["Chain", "Dataflow", "capture", "example_args", "feature_axis", "prunable_kind"]

_aten = torch.ops.aten

LINEAR_OPS = frozenset({_aten.linear.default})
CONV_OPS = {
    1: frozenset({_aten.conv1d.default, _aten.conv1d.padding}),
    2: frozenset({_aten.conv2d.default, _aten.conv2d.padding}),
    3: frozenset({_aten.conv3d.default, _aten.conv3d.padding}),
}
#: ``convolution(input, weight, bias, stride, padding, dilation, transposed, ...)``
CONVOLUTION = _aten.convolution.default

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
#: ``batch_norm(input, weight, bias, running_mean, running_var, training, ...)``: per channel (axis 1).
BATCH_NORM = _aten.batch_norm.default
_COMPUTE = frozenset({*LINEAR_OPS, *CONV_OPS[1], *CONV_OPS[2], *CONV_OPS[3], CONVOLUTION, BATCH_NORM})
#: Padding (its pad list covers the last ``len // 2`` axes): per channel if those are spatial.
PADS = frozenset({_aten.pad.default, _aten.constant_pad_nd.default})


@dataclass(frozen=True)
class Chain:
    """How a consumer's input features are made: ``producer`` (a Linear / ConvNd),
    then ``norms`` (BatchNorms) and ``ops`` (per-feature ops), read by nothing else."""

    producer: str
    norms: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()


def prunable_kind(layer: nn.Module) -> tuple[str, int] | None:
    """``("linear", 0)`` or ``("conv", N)`` for a layer whose features can be
    removed from both sides; None for anything else (transposed or grouped convs)."""
    if isinstance(layer, nn.modules.lazy.LazyModuleMixin):
        return None
    if isinstance(layer, nn.Linear):
        return ("linear", 0)
    if (
        isinstance(layer, nn.modules.conv._ConvNd)
        and not isinstance(layer, nn.modules.conv._ConvTransposeNd)
        and layer.groups == 1
        and len(layer.kernel_size) in CONV_OPS
    ):
        return ("conv", len(layer.kernel_size))
    return None


def feature_axis(kind: tuple[str, int]) -> int:
    """The feature axis, from the right: Linear -1, ConvNd -(N + 1) (works unbatched too)."""
    return -1 if kind[0] == "linear" else -(kind[1] + 1)


def example_args(example: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of a batch, as :func:`actsparse_deploy.calibrate.run_batch` calls the model."""
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, Mapping):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    raise MaskError(f"the example batch must be a tensor, a tuple of tensors or a dict of tensors, not {type(example).__name__}")


def capture(model: nn.Module, example: Batch) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` (in eval mode) on ``example``; a model
    it cannot capture is a :class:`MaskError` that keeps the cause."""
    args, kwargs = example_args(example)
    try:
        with eval_mode(model), quiet():
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:  # torch.export raises many types
        first = first_line(e, 300)
        raise MaskError(
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
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def _is_zero_pad(node: fx.Node) -> bool:
    """A pad that maps 0 to 0 and is linear (reflect / replicate / circular, or constant 0)."""
    if node.target == _aten.constant_pad_nd.default:
        return (node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)) == 0
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
    return mode != "constant" or value in (None, 0, 0.0)


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
        kind = prunable_kind(layer)
        if kind is None:
            return None, f"{consumer} is not a Linear or a ConvNd without groups"
        node, why = self._compute_node(consumer, kind)
        if node is None:
            return None, why
        if (why := self._owns(consumer, layer, node, {"weight": 1})) is not None:
            return None, why
        axis = feature_axis(kind)
        width = layer.in_features if kind[0] == "linear" else layer.in_channels
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
            if shape is None or len(shape) < -axis or shape[axis] != width:
                return None, f"{self._where(value)} does not give {width} features on axis {axis}"
            target = value.target if value.op == "call_function" else None
            if consumer in scope:  # computed inside the consumer, after its mask
                if target not in PADS or kind[0] != "conv" or not _is_zero_pad(value) or len(value.args[1]) > 2 * kind[1]:
                    return None, f"{consumer} computes {self._where(value)} on its input before its {kind[0]}"
            elif target in LINEAR_OPS or target in CONV_OPS.get(kind[1], ()) or target == CONVOLUTION:
                fqn, why = self._producer_at(value, kind, consumer)
                if fqn is None:
                    return None, why
                return Chain(fqn, tuple(reversed(norms)), tuple(reversed(ops))), ""
            elif target == BATCH_NORM:
                if axis % len(shape) != 1:
                    return None, f"{self._where(value)} normalises axis 1, not the feature axis of {consumer}"
                name = scope[-1] if scope else ""
                bn = self._module(name)
                if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.num_features != width:
                    return None, f"{self._where(value)} is not a BatchNorm module over {width} features"
                slots = {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4}
                if (why := self._owns(name, bn, value, slots)) is not None:
                    return None, why
                norms.append(name)
            elif target in DROPOUTS and value.args[2] is False:
                ops.append(_op_name(value))
            elif target in ELEMENTWISE or (target in PADS and kind[0] == "conv" and len(value.args[1]) <= 2 * kind[1]):
                if _tensor_args(value) != [value.args[0]]:
                    return None, f"{self._where(value)}, with a tensor operand, sits between {consumer} and its producer"
                if target not in PADS and _shape(value.args[0]) != shape:
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

    def _compute_node(self, fqn: str, kind: tuple[str, int]) -> tuple[fx.Node | None, str]:
        """The one linear / convNd node of the module call at ``fqn``."""
        ops = LINEAR_OPS if kind[0] == "linear" else CONV_OPS[kind[1]]
        nodes = [
            n for n in self._calls.get(fqn, [])
            if n.target in ops or (kind[0] == "conv" and n.target == CONVOLUTION and n.args[6] is False)
        ]
        if len(nodes) != 1:
            return None, f"the graph has {len(nodes)} {kind[0]} ops in {fqn}, not one"
        return nodes[0], ""

    def _owns(self, fqn: str, module: nn.Module, node: fx.Node, slots: Mapping[str, int]) -> str | None:
        """Why ``module`` cannot be rebuilt smaller at ``fqn``, or None: it must have
        one name, one op in the graph (``node``), and parameters / buffers that no
        other module holds and no other op reads."""
        if self._names.get(id(module), 0) != 1:
            return f"{fqn} is registered under several names"
        computes = [n for n in self._calls.get(fqn, []) if n.target in _COMPUTE]
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

    def _producer_at(self, node: fx.Node, kind: tuple[str, int], consumer: str) -> tuple[str | None, str]:
        scope = _scope(node)
        fqn = scope[-1] if scope else ""
        module = self._module(fqn)
        if not fqn or module is None or prunable_kind(module) != kind:
            return None, f"the input of {consumer} is made by {self._where(node)}, not by a module prune can shrink"
        if (why := self._owns(fqn, module, node, {"weight": 1, "bias": 2})) is not None:
            return None, why
        return fqn, ""


def _scope(node: fx.Node) -> list[str]:
    """The paths of the module calls ``node`` belongs to, outermost first."""
    paths = []
    for path, _type in (node.meta.get("nn_module_stack") or {}).values():
        path = str(path)
        for prefix in ("L['self'].", "L['self']"):
            path = path.removeprefix(prefix)
        paths.append(path)
    return paths
