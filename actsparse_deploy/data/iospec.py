"""The I/O spec: a model's input and output names and dynamic axes, read from the
model and its data (``forward``'s parameter names, a dict batch's keys, a returned
dict's keys; axes whose length varies), in one place for export, validation and
``.pt2`` programs; and the export plan (:func:`export_plan`): all an exporter is
handed, read from the model in one call.

    >>> import torch
    >>> IOSpec.infer(torch.zeros(2, 3), 1).dynamic_axes
    {'input': {0: 'batch'}, 'output': {0: 'batch'}}
    >>> plan = export_plan(torch.nn.Linear(3, 2), torch.zeros(2, 3))
    >>> plan.spec.input_names, plan.spec.output_names, [tuple(a.shape) for a in plan.args]
    (('input',), ('output',), [(2, 3)])
    >>> plan.dynamic_shapes
    ({0: Dim('batch', min=0)},)
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..base.errors import DataError, ExportError, UsageError, first_line
from .batches import Batch, cut_axes, describe_batch, flatten_outputs, input_names, is_named, named_tensors, positional, run_batch

__all__ = [
    "BATCH", "SEQUENCE", "ExportPlan", "IOSpec", "PositionalAdapter", "check_dynamic_axes", "export_plan", "forward_input_names",
    "output_names_of", "parse_dynamic_axis", "positional_inputs",
]

#: the label of every input's and output's axis 0
BATCH = "batch"
#: the label of an inferred sequence axis (axis 1 of an integer (batch, seq) input)
SEQUENCE = "sequence"


@dataclass(frozen=True)
class IOSpec:
    """Input / output names and dynamic axes (``{name: {axis: dim_name}}``)."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]] = field(default_factory=dict)

    def export_dynamic_shapes(self, named: bool = True) -> tuple[dict[int, Any], ...]:
        """``torch.export`` dynamic shapes, one dict per input: one named ``Dim``
        per axis name, or ``Dim.DYNAMIC`` (ranges such as a maximum sequence
        length are then inferred from the model instead of refused)."""
        dims: dict[str, Any] = {}

        def dim(name: str) -> Any:
            return dims.setdefault(name, torch.export.Dim(name)) if named else torch.export.Dim.DYNAMIC

        return tuple(
            {axis: dim(name) for axis, name in self.dynamic_axes.get(input_name, {}).items()}
            for input_name in self.input_names
        )

    def with_axes(self, user: Sequence[tuple[str, int, str]], example: Batch) -> IOSpec:
        """This spec with the user's dynamic axes (``(input, axis, label)``) added,
        each checked against its input on ``example``."""
        if not user:
            return self
        check_user_axes(named_tensors(example, self.input_names), user)
        axes = {name: dict(per) for name, per in self.dynamic_axes.items()}
        for name, axis, label in user:
            axes.setdefault(name, {})[axis] = label
        return IOSpec(self.input_names, self.output_names, axes)

    @classmethod
    def infer(cls, example: Batch, n_outputs: int, sequence_axis: bool = False) -> IOSpec:
        """Default names (``input`` / dict keys, ``output`` / ``output_i``), batch axis
        dynamic everywhere, plus axis 1 of the inputs and outputs if ``sequence_axis``."""
        inputs = input_names(example)
        outputs = ("output",) if n_outputs == 1 else tuple(f"output_{i}" for i in range(n_outputs))
        axes = {0: "batch", 1: "sequence"} if sequence_axis else {0: "batch"}
        return cls(inputs, outputs, {name: dict(axes) for name in inputs + outputs})

    @classmethod
    def from_model(
        cls, model: Any, example: Batch, *, data: Iterable[Batch] = (), dynamic_axes: Sequence[tuple[str, int, str]] = (),
        outputs: Any = None,
    ) -> IOSpec:
        """The spec the model and its data say. Inputs are named by a dict batch's
        keys, else ``forward``'s parameter names (:func:`forward_input_names`);
        outputs by :func:`output_names_of` (``outputs``: the model's output on
        ``example``, computed when not given). Axis 0 is ``batch`` everywhere; an
        input's axis is dynamic when it is axis 1 of an integer ``(batch, seq)``
        input (``sequence``, and so is axis 1 of every other input of that length),
        when its length differs across ``data``'s batches, or when
        ``dynamic_axes`` names it (``(input, axis, label)``). An output's axis is
        dynamic with the label whose inputs' cut changes its length (the model is
        run once more per label, on ``example`` cut shorter on those axes)."""
        if outputs is None:
            with torch.no_grad():
                outputs = run_batch(model, example)
        inputs = forward_input_names(model, example)
        tensors = named_tensors(example, inputs)
        axes, guessed = _input_axes(tensors, data, inputs, dynamic_axes)
        out_names = output_names_of(outputs, inputs)
        out_tensors = flatten_outputs(outputs)
        if not out_tensors:
            raise ExportError(f"the model returns no tensor on the example batch ({describe_batch(example)}): there is nothing to export")
        out_axes: dict[str, dict[int, str]] = {name: ({0: BATCH} if t.ndim else {}) for name, t in zip(out_names, out_tensors)}
        labels = sorted({label for per in axes.values() for axis, label in per.items() if axis > 0})
        for label in labels:
            cut, lengths = _cut(example, inputs, axes, label)
            if cut is None:
                continue
            try:
                with torch.no_grad():
                    shorter = flatten_outputs(run_batch(model, cut))
            except (RuntimeError, TypeError, ValueError, IndexError) as e:
                if all(where in guessed for where in lengths):  # only the integer-input guess: a fixed-width input
                    for name, axis in lengths:
                        del axes[name][axis]
                    continue
                where = ", ".join(f"axis {a} of {n}" for n, a in lengths)
                raise ExportError(
                    f"the model fails on the example cut shorter on its dynamic axes {label!r} ({where}): "
                    f"{type(e).__name__}: {first_line(e)}; name only axes that may vary (`dynamic_axes`)"
                ) from e
            full_length = {int(tensors[n].shape[a]) for n, a in lengths}
            cut_length = {length // 2 for length in full_length}
            for name, full, short in zip(out_names, out_tensors, shorter):
                for axis, (a, b) in enumerate(zip(full.shape, short.shape)):
                    if a != b and axis > 0:  # the input's label where it is that length, else an axis of its own
                        same = {a} == full_length and {b} == cut_length
                        out_axes[name].setdefault(axis, label if same else f"{name}_axis{axis}")
        return cls(inputs, out_names, {**axes, **out_axes})


def parse_dynamic_axis(text: str) -> tuple[str, int, str]:
    """``NAME:AXIS:LABEL`` (``input_ids:1:sequence``) as ``(name, axis, label)``:
    an input's axis to export as dynamic, named ``label`` in the ONNX model."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[2] or not re.fullmatch(r"[0-9]{1,9}", parts[1].strip()):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise ExportError(f"a dynamic axis is NAME:AXIS:LABEL (e.g. input_ids:1:sequence), got {shown!r}")
    return parts[0], int(parts[1]), parts[2]


def forward_input_names(model: Any, example: Batch) -> tuple[str, ...]:
    """A dict batch's keys; else the names of ``model.forward``'s first
    positional parameters (one per tensor), where it has them; else
    :func:`~actsparse_deploy.data.batches.input_names` (``input``, ``input_0, ...``)."""
    defaults = input_names(example)
    if is_named(example) or isinstance(model, (torch.export.ExportedProgram, torch.fx.GraphModule)):
        return defaults
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (AttributeError, TypeError, ValueError):
        return defaults
    names: list[str] = []
    for parameter in parameters:
        if parameter.kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            break
        names.append(parameter.name)
    return tuple(names[: len(defaults)]) if len(names) >= len(defaults) else defaults


def output_names_of(outputs: Any, taken: Sequence[str] = ()) -> tuple[str, ...]:
    """One name per tensor of :func:`flatten_outputs` (same order): a dict's or
    ``ModelOutput``'s keys (``logits``), ``KEY_i`` inside a tuple under a key,
    ``output`` for one tensor, ``output_i`` for a tuple's. A name that is also an
    input's (``taken``) gets ``_output`` added: ONNX names are unique."""
    names: list[str] = []

    def walk(value: Any, prefix: str | None) -> None:
        if value is None:
            return
        if isinstance(value, torch.Tensor):
            names.append(prefix or "output")
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{prefix}_{key}" if prefix else str(key))
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                walk(item, f"{prefix or 'output'}_{i}")

    if isinstance(outputs, (tuple, list)) and len(flatten_outputs(outputs)) == 1:
        outputs = flatten_outputs(outputs)[0]  # (tensor,): named like a tensor
    walk(outputs, None)
    unique: list[str] = []
    for name in names:
        while name in taken or name in unique:
            name = f"{name}_output"
        unique.append(name)
    return tuple(unique)


def _input_axes(
    tensors: Mapping[str, torch.Tensor], data: Iterable[Batch], names: Sequence[str], user: Sequence[tuple[str, int, str]]
) -> tuple[dict[str, dict[int, str]], set[tuple[str, int]]]:
    """Each input's dynamic axes, and those only guessed (axis 1 of an integer
    ``(batch, N)`` input whose length neither varies in the data nor is named):
    a fixed-width integer input (categorical columns) may not take another length."""
    axes: dict[str, dict[int, str]] = {name: ({0: BATCH} if t.ndim else {}) for name, t in tensors.items()}
    evidenced: set[tuple[str, int]] = set()
    lengths: dict[tuple[str, int], set[int]] = {}
    for batch in data:
        try:
            found = named_tensors(batch, names)
        except DataError:
            continue
        for name, t in found.items():
            if name in tensors and isinstance(t, torch.Tensor) and t.ndim == tensors[name].ndim:
                for axis in range(1, t.ndim):
                    lengths.setdefault((name, axis), set()).add(int(t.shape[axis]))
    for (name, axis), seen in lengths.items():  # an axis whose length differs across the data
        if len(seen | {int(tensors[name].shape[axis])}) > 1:
            axes[name][axis] = SEQUENCE if axis == 1 else f"{name}_axis{axis}"
            evidenced.add((name, axis))
    sequences = {int(t.shape[1]) for t in tensors.values() if t.ndim == 2 and not t.is_floating_point() and t.dtype != torch.bool}
    for name, t in tensors.items():  # integer (batch, seq) inputs, and the inputs of their length on axis 1
        if t.ndim >= 2 and int(t.shape[1]) in sequences:
            axes[name].setdefault(1, SEQUENCE)
    check_user_axes(tensors, user)
    for name, axis, label in user:
        axes[name][axis] = label
        evidenced.add((name, axis))
    guessed = {(name, axis) for name, per in axes.items() for axis in per if axis > 0 and (name, axis) not in evidenced}
    return axes, guessed


def check_user_axes(tensors: Mapping[str, torch.Tensor], user: Sequence[tuple[str, int, str]]) -> None:
    """Each ``(input, axis, label)`` an axis of an input the model has, or a UsageError naming it."""
    for name, axis, label in user:
        if name not in tensors:
            raise UsageError(
                f"`dynamic_axis` {name}:{axis}:{label}: the model has no input {name!r}; its inputs: {', '.join(tensors)}"
            )
        if not 0 <= axis < tensors[name].ndim:
            raise UsageError(
                f"`dynamic_axis` {name}:{axis}:{label}: input {name!r} has {tensors[name].ndim} axes "
                f"({describe_batch(tensors[name])}); give an axis from 0 to {tensors[name].ndim - 1}"
            )


def check_dynamic_axes(
    model: Any, example: Batch, dynamic_axes: Sequence[tuple[str, int, str] | str], io_spec: IOSpec | None = None
) -> None:
    """``dynamic_axes`` (``NAME:AXIS:LABEL``) name axes of the inputs of ``model``
    on ``example`` (named by ``io_spec``, else as :meth:`IOSpec.from_model` names
    them): a :class:`UsageError` otherwise, before any work."""
    user = [parse_dynamic_axis(a) if isinstance(a, str) else a for a in dynamic_axes]
    if user:
        names = io_spec.input_names if io_spec is not None else forward_input_names(model, example)
        check_user_axes(named_tensors(example, names), user)


def _cut(
    batch: Batch, names: Sequence[str], axes: Mapping[str, Mapping[int, str]], label: str
) -> tuple[Batch | None, list[tuple[str, int]]]:
    """``batch`` with every input axis labelled ``label`` cut to half its length
    (None where one is shorter than 2), and those ``(input, axis)``."""
    where = [(name, axis) for name, per in axes.items() for axis, lab in per.items() if lab == label and axis > 0]
    return (cut_axes(batch, names, where) if where else None), where


def positional_inputs(example: Batch, names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """The example's tensors in input order (a dict's in ``names`` order)."""
    return positional(example, names)


class PositionalAdapter(nn.Module):
    """Positional inputs in (passed by ``names`` as keywords where given), a flat
    tuple of tensors out: what both exporters and torch.export handle."""

    def __init__(self, model: nn.Module, names: Sequence[str] | None) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names) if names is not None else None

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.names, args))) if self.names is not None else self.model(*args)
        return flatten_outputs(out)


@dataclass(frozen=True)
class ExportPlan:
    """All an exporter is handed, read from the model once (:func:`export_plan`)."""

    #: what the exporter runs: the model behind a :class:`PositionalAdapter`, or a torch.export program as it is
    module: Any
    #: the example's tensors in input order
    args: tuple[torch.Tensor, ...]
    #: input and output names, dynamic axes
    spec: IOSpec
    #: ``spec``'s :meth:`IOSpec.export_dynamic_shapes` (the dynamo exporter's); None where torch.export
    #: refuses one of its labels (not an identifier): ``shapes_error`` then says why, the dynamo exporter's failure
    dynamic_shapes: tuple[dict[int, Any], ...] | None = None
    shapes_error: Exception | None = None


def export_plan(
    model: Any, example: Batch, *, io_spec: IOSpec | None = None, sequence_axis: bool = False, data: Iterable[Batch] = (),
    dynamic_axes: Sequence[tuple[str, int, str]] = (),
) -> ExportPlan:
    """``model`` (a module, or a torch.export program) run once on ``example`` (a
    :class:`DataError` where it fails) and what exporting it takes: ``io_spec``, else
    :meth:`IOSpec.infer` (a program, or ``sequence_axis``), else :meth:`IOSpec.from_model`
    (``data``: batches whose shapes show which axes vary), with the user's
    ``dynamic_axes`` (``(input, axis, label)``) added either way."""
    program = model if isinstance(model, torch.export.ExportedProgram) else None
    callable_model: Any = program.module() if program is not None else model
    try:
        with torch.no_grad():
            # a program takes positional inputs only, a dict's in its own order
            outputs = run_batch(callable_model, example if program is None else positional(example))
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise DataError(
            f"the model fails on the example input ({describe_batch(example)}): {type(e).__name__}: {first_line(e)}"
        ) from e
    n_outputs = len(flatten_outputs(outputs))
    if io_spec is not None:
        spec = io_spec
    elif program is not None or sequence_axis:
        spec = IOSpec.infer(example, n_outputs, sequence_axis)
    else:
        spec = IOSpec.from_model(model, example, data=data, dynamic_axes=dynamic_axes, outputs=outputs)
    spec = spec.with_axes(dynamic_axes, example)
    if len(spec.output_names) != n_outputs:
        raise ExportError(f"the model returns {n_outputs} outputs but {len(spec.output_names)} output names were given")
    module = program if program is not None else PositionalAdapter(model, spec.input_names if is_named(example) else None)
    try:
        shapes = spec.export_dynamic_shapes()
    except Exception as e:  # kept for the dynamo exporter, which fails with it; the TorchScript exporter does not need them
        return ExportPlan(module, positional(example, spec.input_names), spec, None, e)
    return ExportPlan(module, positional(example, spec.input_names), spec, shapes)
