"""Dataflow of a model, for ``prune``: which layer computes a layer's input features.

The model is captured with ``torch.export`` on an example batch (``torch.fx``
cannot trace Hugging Face BERT; ``torch.export`` captures every built-in model).
Each aten node carries ``meta["nn_module_stack"]``, the module calls it belongs
to, so a layer's one compute node (``linear``, ``convNd``: its layer kind, see
:mod:`actsparse_deploy.layers`, says which) is found by the layer's name. From
that node's input the walk goes back, one rule per op class (:data:`RULES`),
through per-feature ops (ReLU, GELU, SiLU, Tanh, dropout in eval, arithmetic
with Python scalars, reshapes that keep the last feature axis, spatial padding
right of the feature axis, per-feature layers such as BatchNorm and depthwise
convs) and elementwise joins (``act(gate(x)) * up(x)``: each operand of the
output's shape is walked back) to the layers (``Linear``, ``ConvNd``, GPT-2's
``Conv1D``, any registered kind) that made the features on the consumer's
feature axis: its producers. Removing features from them is exact only if nothing else
reads them, so every value on the way must be read only on the way, the modules
on the way must be called once and own their parameters, and no other masked
module may read a value on the way. Anything else (a residual add, a flatten, a
pool, a matmul, a split of a fused projection, a model input) ends the walk with
the reason: then only the consumer can lose those features.

    >>> import torch
    >>> from torch import nn
    >>> from actsparse_deploy.bake.graph import Dataflow
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> chain, why = Dataflow(model, torch.randn(3, 4)).producer("2")
    >>> chain.producers, chain.ops
    (('0',), ('aten.relu',))
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..base.errors import DataError, MaskError, SquashError, first_line
from ..base.quiet import quiet
from ..data.batches import Batch, call_args, describe_batch
from ..nn.layers import LayerKind, compute_ops, layer_kind, why_unregistered
from ..nn.modules import eval_mode

__all__ = ["RULES", "Chain", "Dataflow", "Rule", "capture", "example_args"]

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
#: Reshapes: per feature when the feature axis is the last one and keeps its size
#: (GPT-2's ``Conv1D`` flattens the leading axes around its ``addmm``).
VIEWS = frozenset({_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default})
#: Splits of one tensor into parts (``getitem`` picks one): a fused projection.
SPLITS = frozenset(
    op
    for name in ("split", "split_with_sizes", "chunk", "unbind", "tensor_split", "unsafe_split", "unsafe_chunk")
    for overload in ("default", "Tensor", "int", "sections", "indices", "tensor_indices_or_sections")
    if (op := getattr(getattr(_aten, name, None), overload, None)) is not None
)


@dataclass(frozen=True)
class Chain:
    """How a consumer's input features are made: ``producers`` (Linears, ConvNds,
    any registered kind: several where an elementwise join such as SwiGLU's
    ``act(gate(x)) * up(x)`` combines their outputs), then ``norms`` (per-feature
    layers: BatchNorms, depthwise convs) and ``ops`` (per-feature ops), all in
    graph order, read by nothing else. ``Chain("fc1")`` is ``Chain(("fc1",))``."""

    producers: tuple[str, ...]
    norms: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.producers, str):
            object.__setattr__(self, "producers", (self.producers,))
        if not self.producers:
            raise SquashError("a chain needs at least one producer")

    @property
    def producer(self) -> str:
        """The producers' names, joined with ", " (a single producer: its name)."""
        return ", ".join(self.producers)


def prunable(layer: nn.Module) -> tuple[LayerKind | None, str]:
    """The layer's kind (see :mod:`actsparse_deploy.layers`) if the graph walk can
    use it (as a consumer, a producer or a per-feature op between), else None and why not."""
    kind = layer_kind(layer)
    if kind is None:
        return None, why_unregistered(layer)
    why = kind.why_not_prunable(layer)
    return (kind, "") if why is None else (None, why)


def example_args(example: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of a batch, as :func:`actsparse_deploy.data.batches.run_batch` calls the model."""
    try:
        return call_args(example)
    except DataError as e:
        raise MaskError(f"the example for the dataflow analysis: {first_line(e)}") from e


@contextmanager
def _attributes_kept(model: nn.Module) -> Iterator[None]:
    """Every module's attributes as they were before: a forward that creates one
    (a lazily built cache) would otherwise keep the fake tensor the capture ran
    it on, and the model could not be copied or run again."""
    before = {module: set(vars(module)) for module in model.modules()}
    try:
        yield
    finally:
        for module, names in before.items():
            for name in set(vars(module)) - names:
                delattr(module, name)


def capture(model: nn.Module, example: Batch) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` (in eval mode) on ``example``; a model
    it cannot capture is a :class:`SquashError` that keeps the cause."""
    args, kwargs = example_args(example)
    try:
        with eval_mode(model), quiet(), _attributes_kept(model):
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
        #: id of a parameter / buffer -> the modules (by name) that hold it
        self._held_by: dict[int, set[str]] = {}
        for fqn, module in model.named_modules(remove_duplicate=False):
            self._names[id(module)] = self._names.get(id(module), 0) + 1
            for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                self._holders[id(t)] = self._holders.get(id(t), 0) + 1
                self._held_by.setdefault(id(t), set()).add(fqn)
        #: id of a parameter / buffer -> the graph's placeholders for it (one per name torch.export gave it)
        self._placeholders: dict[int, list[fx.Node]] = {}
        tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
        for name, node in self._state.items():
            if (tensor := tensors.get(name)) is not None:
                self._placeholders.setdefault(id(tensor), []).append(node)

    def producer(self, consumer: str, masked: Iterable[str] = ()) -> tuple[Chain | None, str]:
        """The chain that makes ``consumer``'s input features, or None and why not.

        ``masked``: the layers with a mask of their own; none of them but the
        consumer may read a value between the producers and the consumer.
        """
        layer = self.model.get_submodule(consumer)
        kind, why = prunable(layer)
        if kind is None or kind.is_per_feature(layer):
            return None, f"{consumer}: {why or 'a per-feature op is not a consumer'}"
        node, why = self._compute_node(consumer, layer, kind)
        if node is None:
            return None, why
        if (problem := self._owns(consumer, layer, node, {"weight": kind.param_slots["weight"]})) is not None:
            return None, problem
        first = node.args[kind.input_slot] if kind.input_slot < len(node.args) else None
        rank = len(_shape(first) or ()) if isinstance(first, fx.Node) else 0
        walk = _Walk(self, consumer, kind, node, kind.in_features(layer), set(masked))
        stop = walk.push(first, node, rank, kind.axis(layer, rank)) or walk.run()
        return (None, stop) if stop else (walk.chain(), "")

    def read_elsewhere(self, fqn: str) -> str | None:
        """Why the mask of layer ``fqn`` cannot go into its weight (fold, prune):
        the weight is also read by an op that is not the layer's own call (model
        code such as ``F.linear(h, self.fc.weight)``), which the mask must not
        change; None where only the layer's calls read it. A module that holds
        the same tensor (a tied embedding, the layer under another name) reads
        its own attribute, which a fold or a prune (a new weight for the layer)
        leaves as it is; the tensor is found by identity, whichever name
        torch.export gave its placeholder."""
        layer = self._module(fqn)
        weight = getattr(layer, "weight", None) if layer is not None else None
        if not isinstance(weight, torch.Tensor):
            return None
        holders = self._held_by.get(id(weight), set())
        readers = {u: None for state in self._placeholders.get(id(weight), []) for u in _users(state)}
        others = [u for u in readers if not (_scope(u) and _scope(u)[-1] in holders)]
        if not others:
            return None
        return f"{fqn}.weight is also read by {', '.join(self._where(u) for u in others)}"

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

    def _layer_at(self, node: fx.Node, consumer: str) -> tuple[str, nn.Module, LayerKind | None, str]:
        """The module whose compute op ``node`` is, and its kind; None if none is
        (a functional op, or a module prune cannot shrink: then why, where its kind says)."""
        scope = _scope(node)
        fqn = scope[-1] if scope else ""
        module = self._module(fqn)
        if not fqn or module is None or fqn == consumer:
            return fqn, self.model, None, ""
        kind, why = prunable(module)
        if layer_kind(module) is not None and kind is None:
            return fqn, module, None, why
        if kind is None or not kind.is_compute(module, node):
            return fqn, module, None, ""
        return fqn, module, kind, ""


def _scope(node: fx.Node) -> list[str]:
    """The paths of the module calls ``node`` belongs to, outermost first."""
    paths = []
    for path, _type in (node.meta.get("nn_module_stack") or {}).values():
        path = str(path)
        for prefix in ("L['self'].", "L['self']"):
            path = path.removeprefix(prefix)
        paths.append(path)
    return paths


# --- the walk: one rule per op class ------------------------------------------------------


@dataclass
class _Walk:
    """One walk back from a consumer's compute op over the graph, in reverse graph
    order (so every reader of a value on the way is seen before the value): the
    values on the way, the producers and per-feature layers found."""

    flow: Dataflow
    consumer: str
    kind: LayerKind
    compute: fx.Node
    width: int
    masked: set[str]
    #: values queued, with (rank, feature axis) they are read on
    axes: dict[fx.Node, tuple[int, int]] = field(default_factory=dict)
    #: values walked through (their readers must all be on the way)
    region: set[fx.Node] = field(default_factory=set)
    producers: dict[str, fx.Node] = field(default_factory=dict)
    norms: dict[str, fx.Node] = field(default_factory=dict)
    ops: list[fx.Node] = field(default_factory=list)
    _queue: list[tuple[int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.region.add(self.compute)
        self._order = {node: i for i, node in enumerate(self.flow.program.graph.nodes)}

    def where(self, node: fx.Node) -> str:
        return self.flow._where(node)

    def push(self, value: Any, user: fx.Node, rank: int, axis: int) -> str | None:
        """Queue ``value`` (read by ``user`` on ``axis`` of ``rank`` axes); why not, or None."""
        if not isinstance(value, fx.Node):
            return f"the input of {self.consumer} is not a tensor of the graph"
        clash = sorted(m for m in set(_scope(user)) - set(_scope(value)) if m in self.masked and m != self.consumer)
        if clash:
            return f"{clash[0]}, itself masked, reads a value between {self.consumer} and its producer"
        if value in self.axes:
            if self.axes[value] != (rank, axis):
                return f"{self.where(value)} is read on two different feature axes between {self.consumer} and its producer"
            return None
        self.axes[value] = (rank, axis)
        heapq.heappush(self._queue, (-self._order[value], value.name))
        return None

    def run(self) -> str | None:
        """Walk every queued value back to its producers; why not, or None."""
        nodes = {node.name: node for node in self._order}
        while self._queue:
            value = nodes[heapq.heappop(self._queue)[1]]
            rank, axis = self.axes[value]
            others = [u for u in _users(value) if u not in self.region]
            if others:
                return f"the output of {self.where(value)} is also read by {', '.join(self.where(u) for u in others)}"
            shape = _shape(value)
            if value.op != "placeholder" and (shape is None or len(shape) != rank or shape[axis] != self.width):
                return f"{self.where(value)} does not give {self.width} features on axis {axis - rank}"
            rule = next(r for r in RULES if r.matches(self, value, rank, axis))
            if (why := rule.follow(self, value, rank, axis)) is not None:
                return why
            if value not in self.producers.values():
                self.region.add(value)
        return None if self.producers else f"no layer makes the input of {self.consumer}"

    def chain(self) -> Chain:
        def ordered(found: Mapping[str, fx.Node]) -> tuple[str, ...]:
            return tuple(sorted(found, key=lambda fqn: self._order[found[fqn]]))

        ops = sorted(self.ops, key=self._order.__getitem__)
        return Chain(ordered(self.producers), ordered(self.norms), tuple(_op_name(n) for n in ops))


@dataclass(frozen=True)
class Rule:
    """How the walk passes one op class: ``matches(walk, node, rank, axis)`` says
    whether ``node`` belongs to the class; ``follow`` queues its inputs
    (:meth:`_Walk.push`) or ends the path at a producer, and returns why the walk
    stops there (None: it goes on)."""

    name: str
    matches: Callable[[_Walk, fx.Node, int, int], bool]
    follow: Callable[[_Walk, fx.Node, int, int], str | None]


def _target(node: fx.Node) -> Any:
    return node.target if node.op == "call_function" else None


def _keeps_last_axis(walk: _Walk, node: fx.Node, rank: int, axis: int) -> bool:
    """A reshape of the leading axes only, the features last on both sides."""
    source = node.args[0] if node.args else None
    shape = _shape(source) if isinstance(source, fx.Node) else None
    return _target(node) in VIEWS and axis == rank - 1 and bool(shape) and shape[-1] == walk.width  # type: ignore[index]


def _spatial_pad(node: fx.Node, rank: int, axis: int) -> bool:
    """A pad of axes right of the feature axis only: per feature."""
    return _target(node) in PADS and _pad_len(node) <= 2 * (rank - 1 - axis)


def _follow_view(walk: _Walk, node: fx.Node, rank: int, axis: int) -> str | None:
    source = node.args[0]
    n = len(_shape(source) or ())
    walk.ops.append(node)
    return walk.push(source, node, n, n - 1)


def _follow_first(walk: _Walk, node: fx.Node, rank: int, axis: int) -> str | None:
    walk.ops.append(node)
    return walk.push(node.args[0], node, rank, axis)


def _model_input(walk: _Walk, node: fx.Node, rank: int, axis: int) -> str | None:
    state = next((name for name, n in walk.flow._state.items() if n is node), None)
    if state is not None:
        return f"{state}, a parameter or buffer, is read between {walk.consumer} and its producer: prune does not shrink it"
    return f"the input of {walk.consumer} is an input of the model, not the output of a layer"


def _inside_consumer(walk: _Walk, node: fx.Node, rank: int, axis: int) -> str | None:
    """Before its compute op a consumer may only pad with zeros right of its features, or reshape its leading axes."""
    if _spatial_pad(node, rank, axis) and _is_zero_pad(node):
        return _follow_first(walk, node, rank, axis)
    if _keeps_last_axis(walk, node, rank, axis):
        return _follow_view(walk, node, rank, axis)
    return f"{walk.consumer} computes {walk.where(node)} on its input before its {walk.kind.name}"


def _layer(walk: _Walk, node: fx.Node, rank: int, axis: int) -> str | None:
    """A layer's compute op: a per-feature layer (BatchNorm, depthwise conv) is walked through; any other is a producer."""
    flow, where = walk.flow, walk.where(node)
    fqn, module, found, why = flow._layer_at(node, walk.consumer)
    if found is None:
        if why:
            return f"the input of {walk.consumer} is made by {where}, which prune cannot shrink: {why}"
        return f"the input of {walk.consumer} is made by {where}, not by a module prune can shrink"
    if found.is_per_feature(module):
        if found.axis(module, rank) != axis:
            return f"{where} works on axis {found.axis(module, rank)}, not on the feature axis {axis} of {walk.consumer}"
        if found.in_features(module) != walk.width:
            return f"{where} is not a {found.name} module over {walk.width} features"
        if (problem := flow._owns(fqn, module, node, found.param_slots)) is not None:
            return problem
        walk.norms[fqn] = node
        return walk.push(node.args[found.input_slot], node, rank, axis)
    if found.output_axis(module, rank) != axis:
        return f"{fqn} makes its features on axis {found.output_axis(module, rank)}, {walk.consumer} reads them on axis {axis}"
    if (problem := flow._owns(fqn, module, node, found.param_slots)) is not None:
        return problem
    walk.producers[fqn] = node
    return None


def _is_split_part(node: fx.Node) -> bool:
    source = node.args[0] if node.args else None
    return _target(node) is operator.getitem and isinstance(source, fx.Node) and _target(source) in SPLITS


def _split_part(walk: _Walk, node: fx.Node, rank: int, axis: int) -> str | None:
    split = node.args[0]
    assert isinstance(split, fx.Node)
    source = split.args[0]
    made_by = walk.where(source) if isinstance(source, fx.Node) else "a value"
    if isinstance(source, fx.Node) and _target(source) in compute_ops() and (scope := _scope(source)):
        made_by = scope[-1]
    return (
        f"{_op_name(split)} splits the output of {made_by} into parts (a fused projection): "
        "prune cannot shrink it; split it into separate layers to prune it"
    )


def _elementwise(walk: _Walk, node: fx.Node, rank: int, axis: int) -> str | None:
    """A per-feature op; with several tensor operands of the output's shape, a join:
    each operand is walked back (all their producers lose the same features)."""
    shape = _shape(node)
    operands = _tensor_args(node)
    if operands == [node.args[0]] and _target(node) in PADS:
        return _follow_first(walk, node, rank, axis)
    for operand in operands:
        if _shape(operand) != shape:
            if len(operands) == 1:
                return f"{walk.where(node)} changes the shape between {walk.consumer} and its producer"
            return (
                f"{walk.where(node)} joins an operand of shape {list(_shape(operand) or ())} into {list(shape or ())} "
                f"(a broadcast) between {walk.consumer} and its producer"
            )
    walk.ops.append(node)
    for operand in operands:
        if (why := walk.push(operand, node, rank, axis)) is not None:
            return why
    return None


def _anything_else(walk: _Walk, node: fx.Node, rank: int, axis: int) -> str | None:
    return f"{walk.where(node)} sits between {walk.consumer} and the layer that makes its input"


#: The op classes the walk knows, in the order they are tried (the first that matches applies).
RULES: tuple[Rule, ...] = (
    Rule("model input", lambda w, n, r, a: n.op == "placeholder", _model_input),
    Rule("inside the consumer", lambda w, n, r, a: w.consumer in _scope(n), _inside_consumer),
    Rule("layer", lambda w, n, r, a: _target(n) in compute_ops(), _layer),
    Rule("dropout (eval)", lambda w, n, r, a: _target(n) in DROPOUTS and n.args[2] is False, _follow_first),
    Rule("part of a split", lambda w, n, r, a: _is_split_part(n), _split_part),
    Rule("reshape of the leading axes", _keeps_last_axis, _follow_view),
    Rule("spatial pad", lambda w, n, r, a: _spatial_pad(n, r, a), _elementwise),
    Rule("elementwise (unary or join)", lambda w, n, r, a: _target(n) in ELEMENTWISE, _elementwise),
    Rule("anything else", lambda w, n, r, a: True, _anything_else),
)
