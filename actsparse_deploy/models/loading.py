"""Models and weights from users, loaded safely (their data files:
:mod:`actsparse_deploy.data.readers`).

A model is a built-in name or ``package.module:factory`` (a callable returning an
``nn.Module``) plus optional weights: ``.safetensors``, or a ``.pt`` / ``.pth``
state dict read with ``torch.load(weights_only=True)``: no pickle from a user's
file is ever executed; every loaded model's weights are checked for NaN / Inf
once. A local Hugging Face model directory (or ``hf:PATH``)
loads with :mod:`actsparse_deploy.models.hf`, and its tokenizer makes batches of text
files (:class:`ModelOptions`: ``task``, ``text``, ``heldout_text``, ``max_length``;
``factory_args``: keyword arguments of a ``module:factory``).

    >>> import numpy as np, tempfile
    >>> from actsparse_deploy.data.readers import load_data
    >>> path = tempfile.mkdtemp() + "/x.npy"
    >>> np.save(path, np.zeros((10, 4), dtype=np.float32))
    >>> [tuple(b.shape) for b in load_data(path, batch_size=4)]
    [(4, 4), (4, 4), (2, 4)]
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import nn

from ..base.constants import MAX_LENGTH
from ..base.errors import DataError, MemoryBudgetError, ModelLoadError, UsageError, WeightsError, first_line
from ..base.imports import import_attr
from ..base.serialize import reason, unreadable
from ..calibration.recipe import Recipe, resolve_recipe
from ..data.arrays import torch_load
from ..data.batches import Batch, Stream, first_batch
from ..data.iospec import IOSpec
from ..nn.attention import attention_outputs
from ..nn.modules import check_finite_weights
from . import zoo
from .hf import HF_PREFIX, HFSource, default_recipe, hf_directory, is_pretrained, load_hf, wrap_pretrained
from .zoo import BuiltinModel

if TYPE_CHECKING:
    from ..data.workload import Workload

__all__ = [
    "LoadedModel",
    "ModelOptions",
    "load_layout",
    "load_model",
    "load_recipe",
    "load_state_dict_file",
    "load_other_text",
    "load_text_data",
    "parse_factory_args",
    "resolve_io_spec",
]


@dataclass
class LoadedModel:
    """A model ready for calibration, and where it came from (``entry``: a built-in
    model's, its data with it; ``hf``: a Hugging Face model, with its directory for the tokenizer)."""

    module: nn.Module
    name: str
    entry: BuiltinModel | None = None
    hf: Any = None

    @property
    def builtin(self) -> bool:
        return self.entry is not None

    @property
    def notes(self) -> list[str]:
        """What the user is told about how the model was loaded (a Hugging Face model's task, inferred)."""
        return list(self.hf.notes) if self.hf is not None else []

    def io_spec(self, example: Batch | None) -> Any:
        """A Hugging Face model's I/O spec for batches like ``example`` (None for other models)."""
        if self.hf is None:
            return None
        inputs, axes = self.hf.io_names(example)
        return IOSpec(inputs, self.hf.model.output_names, axes)


@dataclass(frozen=True)
class ModelOptions:
    """How to build a model and read its text: ``task`` of a Hugging Face model
    (see :data:`actsparse_deploy.models.hf.TASKS`; None: from its config), ``factory_args``
    (keyword arguments of a ``module:factory``), ``text`` / ``heldout_text`` (text
    files its tokenizer makes calibration / held-out batches of), ``other_text`` (a text
    file from another source than both: the cost out of domain; any text model, the
    built-in ones too) and ``max_length`` (tokens per text, longer ones are cut)."""

    task: str | None = None
    factory_args: Mapping[str, Any] | None = None
    text: str | None = None
    heldout_text: str | None = None
    max_length: int | None = None
    other_text: str | None = None

    def __post_init__(self) -> None:
        from .hf import check_task

        check_task(self.task)
        if self.factory_args is not None and not isinstance(self.factory_args, Mapping):
            raise ModelLoadError(f"`factory_args` must be a JSON object of keyword arguments, got a {type(self.factory_args).__name__}")
        if self.max_length is not None and not (isinstance(self.max_length, int) and not isinstance(self.max_length, bool)
                                                and 1 <= self.max_length <= MAX_LENGTH):
            raise DataError(f"`max_length` must be a number of tokens from 1 to {MAX_LENGTH}, got {self.max_length!r}")


def parse_factory_args(text: str | None) -> dict[str, Any] | None:
    """``--factory-args``: a JSON object of keyword arguments for a ``module:factory``."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except RecursionError as e:
        raise ModelLoadError("`factory_args` is nested too deep to read (arrays or objects inside each other thousands of levels "
                             "deep): give a JSON object of keyword arguments such as '{\"hidden\": 64}'") from e
    except ValueError as e:
        raise ModelLoadError(f"`factory_args` is not valid JSON ({first_line(e)}): give an object such as '{{\"path\": \"model.safetensors\"}}'") from e
    if not isinstance(value, dict):
        raise ModelLoadError(f"`factory_args` must be a JSON object of keyword arguments (like {{\"hidden\": 64}}), got {text!r}")
    return value


def load_model(
    spec: str, weights: str | Path | None = None, options: ModelOptions | None = None, device: torch.device | str | None = None,
    by_block: bool = False,
) -> LoadedModel:
    """A built-in name, a Hugging Face model directory (``hf:PATH`` or a
    directory with ``config.json``), or ``package.module:factory`` with optional
    weights; ``options``: the task of a Hugging Face model, a factory's arguments;
    ``device``: move the model there (None: where it was built); ``by_block``: a Hugging Face
    directory's blocks left in their files, each layer read while it runs (:func:`~actsparse_deploy.models.hf.load_hf`)."""
    if by_block and device is not None and torch.device(device).type != "cpu":
        raise UsageError(f"a model calibrated block by block runs on the CPU, not on {device}")
    loaded = _load_model(spec, weights, options, by_block)
    check_finite_weights(loaded.module)  # NaN weights are the weights' fault, not the data's (exit 5)
    if device is not None:
        loaded.module.to(device)
    return loaded


def load_layout(spec: str, options: ModelOptions | None = None) -> tuple[LoadedModel, int] | None:
    """A Hugging Face directory's model on the meta device (its modules' names and shapes, no weights read)
    and the size of its weights files, before it loads; None for another model (its size is known once it is built)."""
    if not (spec.startswith(HF_PREFIX) or (":" not in spec and spec not in zoo.builtin_names())):
        return None
    directory = hf_directory(spec)
    if directory is None:
        return None
    from .hf import read_json_object, weight_files

    options = options or ModelOptions()
    config = read_json_object(directory / "config.json", ModelLoadError)
    stored = sum(path.stat().st_size for path in weight_files(directory, config))
    source = load_hf(directory, options.task, options.max_length, layout_only=True)
    return LoadedModel(source.model, spec, hf=source), stored


def _load_model(spec: str, weights: str | Path | None, options: ModelOptions | None, by_block: bool = False) -> LoadedModel:
    options = options or ModelOptions()
    if spec.startswith(HF_PREFIX) or (":" not in spec and spec not in zoo.builtin_names()):
        directory = hf_directory(spec)
        if directory is not None:
            return _load_hf(spec, directory, weights, options, by_block)
    if by_block:
        raise MemoryBudgetError(f"only a Hugging Face model directory calibrates block by block; {spec!r} is not one: free memory, "
                                "or calibrate on a machine with more")
    if options.task is not None and ":" not in spec:
        raise ModelLoadError(f"`task` is for Hugging Face models; {spec!r} is a built-in model with its own task")
    if options.factory_args is not None and ":" not in spec:
        raise ModelLoadError(f"`factory_args` are keyword arguments of a package.module:factory, and {spec!r} is not one")
    if ":" not in spec:
        entry = zoo.get_builtin(spec)
        if weights is not None:
            module = entry.factory()
            load_state_dict_file(module, Path(weights))
            return LoadedModel(module.eval(), spec, entry)
        return LoadedModel(zoo.load_builtin(spec), spec, entry)
    factory = import_attr(spec, "model factory", ModelLoadError)
    kwargs = dict(options.factory_args or {})
    try:
        module = factory(**kwargs)
    except TypeError as e:
        if kwargs:
            raise ModelLoadError(f"model factory {spec!r} does not take `factory_args` {json.dumps(kwargs)}: TypeError: {e}") from e
        raise ModelLoadError(f"model factory {spec!r} failed: TypeError: {e}") from e
    except Exception as e:
        raise ModelLoadError(f"model factory {spec!r} failed: {type(e).__name__}: {e}") from e
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"model factory {spec!r} returned a {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_state_dict_file(module, Path(weights))
    hf = None
    if is_pretrained(module):  # a transformers model: named tensors in, named tensors out, no cache
        hf = HFSource(wrap_pretrained(module, options.task, spec), None, options.max_length)
        module = hf.model
    elif options.task is not None:
        raise ModelLoadError(f"`task` is for Hugging Face models; model factory {spec!r} returned a {type(module).__name__}")
    return LoadedModel(module.eval(), spec, hf=hf)


def _load_hf(spec: str, directory: Path, weights: str | Path | None, options: ModelOptions, by_block: bool = False) -> LoadedModel:
    if weights is not None:
        raise WeightsError(f"{directory} is a Hugging Face model directory with its own weights: pass no `weights`")
    if options.factory_args is not None:
        raise ModelLoadError(f"`factory_args` are keyword arguments of a package.module:factory, and {spec!r} is a model directory")
    source = load_hf(directory, options.task, options.max_length, by_block=by_block)
    return LoadedModel(source.model, spec, hf=source)


def load_text_data(
    loaded: LoadedModel, options: ModelOptions | None, data: str | None, heldout: str | None, batch_size: int
) -> tuple[Stream | None, Stream | None, Iterable[Batch] | None]:
    """Calibration and held-out batches from ``options.text`` / ``options.heldout_text``
    (None for each not given), made by the model's tokenizer: streams that read
    the file line by line and tokenize a batch at a time (:class:`~actsparse_deploy.data.streams.TextStream`);
    and the other text's (:func:`load_other_text`). Text with ``data`` / ``heldout`` as well,
    or for a model without a tokenizer, is a :class:`UsageError`."""
    other = load_other_text(loaded, options, batch_size)
    if options is None or (options.text is None and options.heldout_text is None):
        return None, None, other
    if options.text is not None and data is not None:
        raise UsageError("give calibration data as `data` or as `text`, not both")
    if options.heldout_text is not None and heldout is not None:
        raise UsageError("give held-out data as `heldout` or as `heldout_text`, not both")
    if loaded.hf is None:
        raise UsageError(
            f"`text` and `heldout_text` need a Hugging Face model (a directory with its tokenizer); {loaded.name!r} is not one: "
            "pass `data` / `heldout` files of input tensors"
        )
    from ..data.streams import TextStream  # read line by line, tokenized a batch at a time

    calibration = TextStream(loaded.hf, options.text, batch_size) if options.text is not None else None
    held = TextStream(loaded.hf, options.heldout_text, batch_size) if options.heldout_text is not None else None
    return calibration, held, other


def load_other_text(loaded: LoadedModel, options: ModelOptions | None, batch_size: int) -> Iterable[Batch] | None:
    """The model's batches of text from another source: ``options.other_text`` made by its tokenizer (a
    Hugging Face model's, a stream read line by line; a built-in text model's), else the built-in's own
    second source, else None. ``other_text`` for a model without text is a :class:`UsageError`."""
    path = options.other_text if options is not None else None
    entry = loaded.entry
    if path is None:
        return entry.other_batches() if entry is not None else None
    if loaded.hf is not None:
        from ..data.streams import TextStream

        return TextStream(loaded.hf, path, batch_size)
    if entry is None or entry.text_data is None:
        raise UsageError(f"`other_text` needs a text model (a Hugging Face model directory, minilm or tiny-lm); {loaded.name!r} is not one")
    from ..data.streams import text_lines

    return entry.text_data(list(text_lines(path)), batch_size)


#: the most bytes of a weights file read into memory at once (a slice of a tensor)
READ_BYTES = 32 * 2**20


@contextlib.contextmanager
def _safetensors_read(path: Path) -> Iterator[Any]:
    """``safe_open(path)`` for the block; a file it cannot read (at opening or while reading) is a WeightsError."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except BaseException as e:
        if not unreadable(e):
            raise
        raise WeightsError(f"weights file {path} is not a readable .safetensors file ({reason(e)})") from e


class _SafetensorsFile(Mapping[str, torch.Tensor]):
    """A ``.safetensors`` file as a mapping that reads a tensor when it is asked for (shapes from the header)."""

    def __init__(self, path: Path, handle: Any) -> None:
        self.path = path
        self.shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # in the file's order

    def __getitem__(self, name: str) -> torch.Tensor:
        with _safetensors_read(self.path) as one:  # opened for each tensor: what a read maps goes with it, never the whole file
            return one.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __contains__(self, name: object) -> bool:
        return name in self.shapes

    def __len__(self) -> int:
        return len(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def copy_into(self, name: str, target: torch.Tensor) -> None:
        """Tensor ``name`` copied into ``target`` (its shape) :data:`READ_BYTES` at a time, the file opened for
        each slice: what a read maps is let go with it (a whole tensor mapped at once would count twice)."""
        rows = target.shape[0] if target.ndim else 0
        row_bytes = target[0].numel() * target.element_size() if rows else 0
        step = max(1, READ_BYTES // row_bytes) if row_bytes else rows
        if rows <= step:
            target.copy_(self[name])
            return
        for start in range(0, rows, step):
            with _safetensors_read(self.path) as one:
                target[start:start + step].copy_(one.get_slice(name)[start:start + step])


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """The weights file's tensors by name, read as they are used: a ``.safetensors`` file a tensor at a
    time, a torch file memory-mapped (never the whole file in memory beside the model)."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        with _safetensors_read(path) as handle:  # the header: names and shapes
            return _SafetensorsFile(path, handle)
    obj = torch_load(path, "weights file", WeightsError, mmap=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    return obj


def _shape(state: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    return state.shape(name) if isinstance(state, _SafetensorsFile) else tuple(state[name].shape)


def load_state_dict_file(module: nn.Module, path: Path) -> None:
    """Load weights strictly (missing / unexpected keys and shape mismatches are named), a
    tensor at a time: each is copied into the model's own, or, where the model was built on
    the meta device, becomes it (in the dtype the model declares); tied weights stay tied.
    Never the whole file in memory beside the model."""
    state = _read_state_dict(path)
    expected = module.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {_shape(state, k)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and _shape(state, k) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch {_few(wrong)}")
    if problems:
        raise WeightsError(f"weights file {path} does not fit the model: {'; '.join(problems)}")
    if not all(_owner(module, name) is not None for name in expected):  # a state dict renamed by hooks: torch's own load
        module.load_state_dict(dict(state), strict=True, assign=any(t.is_meta for t in expected.values()))
    else:
        filled: dict[int, torch.Tensor] = {}  # a tensor the model holds under two names (tied weights) is read once
        for name, current in expected.items():
            if id(current) not in filled:
                filled[id(current)] = _fill(current, state, name)
            _set(module, name, filled[id(current)])
    left = [name for name, t in itertools.chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
    if left:
        raise WeightsError(f"weights file {path} leaves {_few(left)} of the model on the meta device (not saved in the file: "
                           "a buffer the model computes); build the model on the CPU, or make those tensors in the factory")


def _fill(current: torch.Tensor, state: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """``state[name]`` in ``current``'s place: copied into it, or, on the meta device, into a new tensor of
    its dtype (never a view of a memory-mapped file); a ``.safetensors`` tensor a slice at a time."""
    with torch.no_grad():
        target = current if not current.is_meta else torch.empty(current.shape, dtype=current.dtype)
        if isinstance(state, _SafetensorsFile):
            state.copy_into(name, target)
        else:
            target.copy_(state[name])
        if target is current:
            return current
        return nn.Parameter(target, requires_grad=current.requires_grad) if isinstance(current, nn.Parameter) else target


def _owner(module: nn.Module, name: str) -> nn.Module | None:
    """The module that holds state dict entry ``name`` as a parameter or buffer, None where none does."""
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = module.get_submodule(owner_name)
    except AttributeError:
        return None
    return owner if attr in owner._parameters or attr in owner._buffers else None


def _set(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, attr = _owner(module, name), name.rpartition(".")[2]
    assert owner is not None
    if isinstance(tensor, nn.Parameter) and attr in owner._parameters:
        if owner._parameters[attr] is not tensor:
            owner._parameters[attr] = tensor
    elif attr in owner._buffers and owner._buffers[attr] is not tensor:
        owner._buffers[attr] = tensor


def _few(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


# --- data ------------------------------------------------------------------------


def resolve_io_spec(model: LoadedModel | nn.Module, batches: list[Batch] | Iterable[Batch] | None, builtin: BuiltinModel | None = None,
                    *, infer: bool = False) -> IOSpec | None:
    """A model's one I/O spec (input / output names and dynamic axes): a built-in's
    own (``builtin``), a Hugging Face model's for batches like the first of
    ``batches``; else, with ``infer``, what export names it by default
    (:meth:`~actsparse_deploy.data.iospec.IOSpec.from_model` on the first batch,
    the shapes of all), else None (export infers it then).

    >>> import torch
    >>> resolve_io_spec(torch.nn.Linear(3, 2), [torch.zeros(4, 3)], infer=True).output_names
    ('output',)
    """
    if builtin is not None:
        return builtin.io_spec()
    if isinstance(model, LoadedModel):
        return model.io_spec(first_batch(batches))
    if not infer or not batches:
        return None
    from ..data.streams import shape_examples

    return IOSpec.from_model(model, next(iter(batches)), data=shape_examples(batches))


def load_recipe(
    work: Workload,
    recipe: Recipe | str | Path | None = None,
    sparsity: float | None = None,
    *,
    method: str | None = None,
    compensate: str | None = None,
    heads: bool = False,
) -> Recipe:
    """The recipe for ``work``: ``recipe``, else its built-in one (``sparsity``
    overrides the level, ``method`` and ``compensate`` those of every layer);
    see :func:`actsparse_deploy.calibration.recipe.resolve_recipe`. ``heads``: the
    model's attention heads too (:meth:`~actsparse_deploy.calibration.recipe.Recipe.with_heads`)."""
    if recipe is None and work.builtin is None and work.task is not None:  # a Hugging Face model: its MLPs' default
        recipe = default_recipe(work.model)
    own = zoo.builtin_recipe_path(work.name) if work.builtin is not None else None
    resolved = resolve_recipe(work.name, own, recipe, sparsity=sparsity, method=method, compensate=compensate)
    return resolved.with_heads(attention_outputs(work.model)) if heads else resolved
