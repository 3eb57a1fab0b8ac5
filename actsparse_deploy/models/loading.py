"""Models, weights and data from users, loaded safely.

A model is a built-in name or ``package.module:factory`` (a callable returning an
``nn.Module``) plus optional weights: ``.safetensors``, or a ``.pt`` / ``.pth``
state dict read with ``torch.load(weights_only=True)``: no pickle from a user's
file is ever executed. Data is a ``.npy`` / ``.npz`` / ``.safetensors`` / ``.pt``
file of input tensors (several named arrays become dict batches, passed to the
model as keyword arguments), cut into batches; or ``module:function`` returning
an iterable of batches. A local Hugging Face model directory (or ``hf:PATH``)
loads with :mod:`actsparse_deploy.models.hf`, and its tokenizer makes batches of text
files (:class:`ModelOptions`: ``task``, ``text``, ``heldout_text``, ``max_length``;
``factory_args``: keyword arguments of a ``module:factory``).

    >>> import numpy as np, tempfile
    >>> from actsparse_deploy.models.loading import load_data
    >>> path = tempfile.mkdtemp() + "/x.npy"
    >>> np.save(path, np.zeros((10, 4), dtype=np.float32))
    >>> [tuple(b.shape) for b in load_data(path, batch_size=4)]
    [(4, 4), (4, 4), (2, 4)]
"""

from __future__ import annotations

import filecmp
import importlib
import json
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ..base.constants import MAX_LENGTH
from ..base.errors import ActsparseError, DataError, ModelLoadError, UsageError, WeightsError, first_line
from ..base.serialize import reason, unreadable
from ..calibration.calibrate import check_finite_weights
from ..data.batches import Batch
from ..data.streams import Stream
from . import zoo
from .hf import HF_PREFIX, HFSource, hf_directory, is_pretrained, load_hf, wrap_pretrained

__all__ = [
    "LoadedModel",
    "ModelOptions",
    "check_distinct_data",
    "load_data",
    "load_labels",
    "load_model",
    "load_state_dict_file",
    "load_text_data",
    "parse_factory_args",
]

#: key prefix of the inputs of a .pt data file holding a list (positional inputs)
POSITIONAL = "input #"


@dataclass
class LoadedModel:
    """A model ready for calibration, and where it came from (``hf``: a Hugging
    Face model, with its directory for the tokenizer)."""

    module: nn.Module
    name: str
    builtin: bool
    hf: Any = None

    @property
    def notes(self) -> list[str]:
        """What the user is told about how the model was loaded (a Hugging Face model's task, inferred)."""
        return list(self.hf.notes) if self.hf is not None else []

    def io_spec(self, example: Batch | None) -> Any:
        """A Hugging Face model's I/O spec for batches like ``example`` (None for other models)."""
        if self.hf is None:
            return None
        from ..onnx.export import IOSpec

        inputs, axes = self.hf.io_names(example)
        return IOSpec(inputs, (self.hf.model.output_name,), axes)


@dataclass(frozen=True)
class ModelOptions:
    """How to build a model and read its text: ``task`` of a Hugging Face model
    (see :data:`actsparse_deploy.models.hf.TASKS`; None: from its config), ``factory_args``
    (keyword arguments of a ``module:factory``), ``text`` / ``heldout_text`` (text
    files its tokenizer makes calibration / held-out batches of) and
    ``max_length`` (tokens per text, longer ones are cut)."""

    task: str | None = None
    factory_args: Mapping[str, Any] | None = None
    text: str | None = None
    heldout_text: str | None = None
    max_length: int | None = None

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


def _import_attr(spec: str, what: str, error: type[Exception]) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise error(f"{what} {spec!r} must look like package.module:name")
    # as `python -m` would, the user's project is importable, but only while their
    # module is imported: no later import may pick up a file from the current directory
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module may fail in any way
        raise error(f"cannot import {module_name!r} for {what} {spec!r}: {type(e).__name__}: {e}") from e
    finally:
        if added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise error(f"{module_name!r} has no attribute {attr!r} ({what} {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise error(f"{what} {spec!r} is a {type(target).__name__}, not a callable")
    return target


def load_model(
    spec: str, weights: str | Path | None = None, options: ModelOptions | None = None, device: torch.device | str | None = None
) -> LoadedModel:
    """A built-in name, a Hugging Face model directory (``hf:PATH`` or a
    directory with ``config.json``), or ``package.module:factory`` with optional
    weights; ``options``: the task of a Hugging Face model, a factory's arguments;
    ``device``: move the model there (None: where it was built)."""
    loaded = _load_model(spec, weights, options)
    if device is not None:
        loaded.module.to(device)
    return loaded


def _load_model(spec: str, weights: str | Path | None, options: ModelOptions | None) -> LoadedModel:
    options = options or ModelOptions()
    if spec.startswith(HF_PREFIX) or (":" not in spec and spec not in zoo.builtin_names()):
        directory = hf_directory(spec)
        if directory is not None:
            return _load_hf(spec, directory, weights, options)
    if options.task is not None and ":" not in spec:
        raise ModelLoadError(f"`task` is for Hugging Face models; {spec!r} is a built-in model with its own task")
    if options.factory_args is not None and ":" not in spec:
        raise ModelLoadError(f"`factory_args` are keyword arguments of a package.module:factory, and {spec!r} is not one")
    if ":" not in spec:
        if weights is not None:
            module = zoo.get_builtin(spec).factory()
            load_state_dict_file(module, Path(weights))
            check_finite_weights(module)
            return LoadedModel(module.eval(), spec, builtin=True)
        return LoadedModel(zoo.load_builtin(spec), spec, builtin=True)
    factory = _import_attr(spec, "model factory", ModelLoadError)
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
    check_finite_weights(module)  # NaN weights are the weights' fault, not the data's (exit 5)
    hf = None
    if is_pretrained(module):  # a transformers model: named tensors in, named tensors out, no cache
        hf = HFSource(wrap_pretrained(module, options.task, spec), None, options.max_length)
        module = hf.model
    elif options.task is not None:
        raise ModelLoadError(f"`task` is for Hugging Face models; model factory {spec!r} returned a {type(module).__name__}")
    return LoadedModel(module.eval(), spec, builtin=False, hf=hf)


def _load_hf(spec: str, directory: Path, weights: str | Path | None, options: ModelOptions) -> LoadedModel:
    if weights is not None:
        raise WeightsError(f"{directory} is a Hugging Face model directory with its own weights: pass no `weights`")
    if options.factory_args is not None:
        raise ModelLoadError(f"`factory_args` are keyword arguments of a package.module:factory, and {spec!r} is a model directory")
    source = load_hf(directory, options.task, options.max_length)
    check_finite_weights(source.model)
    return LoadedModel(source.model, spec, builtin=False, hf=source)


def load_text_data(
    loaded: LoadedModel, options: ModelOptions | None, data: str | None, heldout: str | None, batch_size: int
) -> tuple[Stream | None, Stream | None]:
    """Calibration and held-out batches from ``options.text`` / ``options.heldout_text``
    (None for each not given), made by the model's tokenizer: streams that read
    the file line by line and tokenize a batch at a time (:class:`~actsparse_deploy.data.streams.TextStream`).
    Text with ``data`` / ``heldout`` as well, or for a model without a tokenizer, is a :class:`UsageError`."""
    if options is None or (options.text is None and options.heldout_text is None):
        return None, None
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
    return calibration, held


#: what torch's weights_only unpickler says when a pickle names a Python object:
#: "Unsupported global: GLOBAL argparse.Namespace was not an allowed global" for
#: one not on its allowlist, "Trying to load unsupported GLOBAL posix.system whose
#: module posix is blocked" for one it blocks outright (torch 2.6 to 2.13)
_PICKLED_OBJECT = re.compile(r"unsupported global", re.IGNORECASE)


def _unpickler_reason(e: BaseException) -> str:
    """The line of torch's weights_only failure that says what went wrong."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:") and line != "WeightsUnpickler error:":
            return line.removeprefix("WeightsUnpickler error:").strip()
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)"))]
    return useful[0] if useful else first_line(e)


def _torch_load(path: Path, what: str, error: type[ActsparseError]) -> Any:
    """``torch.load(weights_only=True)``: objects that could run code are refused,
    anything else that is not a torch file is named as such."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if _PICKLED_OBJECT.search(str(e)):
            raise error(
                f"{what} {path} refused: holds objects that could run code (Python objects other than tensors); "
                "save tensors only (model.state_dict(), a tensor or a dict of tensors), ideally as .safetensors"
            ) from e
        raise error(
            f"{what} {path} is corrupted or not a torch file (not written by torch.save: {_unpickler_reason(e)})"
        ) from e
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise error(f"{what} {path} is corrupted or not a torch file ({type(e).__name__}: {first_line(e)})") from e


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except BaseException as e:
            if not unreadable(e):
                raise
            raise WeightsError(f"weights file {path} is not a readable .safetensors file ({reason(e)})") from e
    obj = _torch_load(path, "weights file", WeightsError)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    return obj


def load_state_dict_file(module: nn.Module, path: Path) -> None:
    """Load weights strictly; missing / unexpected keys and shape mismatches are named."""
    state = _read_state_dict(path)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
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
    module.load_state_dict(state, strict=True)


def _few(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


# --- data ------------------------------------------------------------------------

#: the largest compression ratio deflate can reach (a zip member that claims more
#: uncompressed bytes than this times its compressed size is lying)
_MAX_DEFLATE_RATIO = 1032


def _to_tensor(name: str, array: Any, source: str) -> torch.Tensor:
    if isinstance(array, torch.Tensor) and array.layout != torch.strided:
        raise DataError(f"array {name!r} in {source} is a {array.layout} tensor: save it dense (tensor.to_dense())")
    if array.ndim == 0:
        raise DataError(f"array {name!r} in {source} is a scalar: it needs a batch axis first")
    if not isinstance(array, torch.Tensor):
        if array.dtype.kind not in "biuf":
            raise DataError(f"array {name!r} in {source} has dtype {array.dtype}, which a model cannot take")
        if not array.dtype.isnative:  # saved big-endian (or little-endian on a big-endian machine): the same numbers, native
            array = array.astype(array.dtype.newbyteorder("="))
        array = torch.from_numpy(np.ascontiguousarray(array))
    t = array
    if t.dtype == torch.float64:
        t = t.to(torch.float32)  # numpy's default; models here run in float32
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.uint8):
        raise DataError(f"array {name!r} in {source} has dtype {t.dtype}, which a model cannot take")
    if t.shape[0] == 0:
        raise DataError(f"array {name!r} in {source} is empty (0 samples)")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise DataError(f"array {name!r} in {source} holds NaN or Inf")
    return t


def _npy_bytes(stream: Any, where: str) -> int:
    """The data bytes a .npy header declares (read before anything is allocated)."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise DataError(f"{where} is a .npy of format version {version}, which is not supported")
    return int(np.prod(shape, dtype=object)) * dtype.itemsize


def _check_npy(path: Path) -> None:
    with open(path, "rb") as f:
        declared = _npy_bytes(f, f"data file {path}")
        available = os.fstat(f.fileno()).st_size - f.tell()
    if declared > available:
        raise DataError(
            f"data file {path} declares {declared:,} bytes of array data but holds {available:,}: it is truncated or its header lies"
        )


def _check_npz(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            where = f"data file {path} (member {info.filename})"
            ratio = 1 if info.compress_type == zipfile.ZIP_STORED else _MAX_DEFLATE_RATIO
            if info.file_size > ratio * info.compress_size + 1024:
                raise DataError(f"{where} declares {info.file_size:,} bytes from {info.compress_size:,} compressed: its zip entry lies")
            with archive.open(info) as member:
                if member.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
                    raise DataError(f"{where} is not a .npy array: an .npz file holds arrays only (numpy.savez)")
            with archive.open(info) as member:
                declared = _npy_bytes(member, where)
                header = member.tell()
            if declared > info.file_size - header:
                raise DataError(
                    f"{where} declares {declared:,} bytes of array data but holds {info.file_size - header:,}: "
                    "it is truncated or its header lies"
                )


def _read_arrays(path: Path) -> dict[str, torch.Tensor] | torch.Tensor:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            _check_npy(path)
            return _to_tensor("array", np.load(path, allow_pickle=False), str(path))
        if suffix == ".npz":
            _check_npz(path)
            with np.load(path, allow_pickle=False) as npz:
                raw = {k: npz[k] for k in npz.files}
        elif suffix == ".safetensors":
            raw = load_file(str(path))
        elif suffix in (".pt", ".pth"):
            obj = _torch_load(path, "data file", DataError)
            if isinstance(obj, torch.Tensor):
                return _to_tensor("tensor", obj, str(path))
            if isinstance(obj, (list, tuple)):  # positional inputs: tuple batches
                obj = {f"{POSITIONAL}{i}": t for i, t in enumerate(obj)}
            if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                raise DataError(f"data file {path} must hold a tensor, a list of tensors or a dict of tensors")
            raw = dict(obj)
        else:
            raise DataError(f"data file {path}: unsupported type {suffix or '(none)'}; use .npy, .npz, .safetensors or .pt")
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise DataError(f"data file {path} is corrupted or unreadable ({reason(e)})") from e
    except BaseException as e:
        if not unreadable(e):
            raise
        raise DataError(f"data file {path} is corrupted or unreadable ({reason(e)})") from e
    if not raw:
        raise DataError(f"data file {path} holds no arrays")
    tensors = {k: _to_tensor(k, v, str(path)) for k, v in raw.items()}
    lengths = {k: t.shape[0] for k, t in tensors.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"arrays in {path} differ in their number of samples: {lengths}")
    return next(iter(tensors.values())) if len(tensors) == 1 else tensors


def _is_function_spec(text: str) -> bool:
    return ":" in text and not Path(text).exists() and not (len(text) > 1 and text[1] == ":")


def load_data(source: str | Path, batch_size: int = 32) -> Stream | Iterable[Batch]:
    """Batches from a data file, a directory of them or a glob of shards (a
    :class:`~actsparse_deploy.data.streams.ArrayStream`: read batch by batch on each
    iteration, never whole; every file's header is checked and the first batch
    read now), or the iterable a ``module:function`` returns."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    text = str(source)
    if _is_function_spec(text):
        fn: Callable[[], Iterable[Batch]] = _import_attr(text, "data function", DataError)
        try:
            return fn()
        except Exception as e:
            raise DataError(f"data function {text!r} failed: {type(e).__name__}: {e}") from e
    from ..data.streams import array_stream

    stream = array_stream(source, batch_size)
    next(iter(stream))  # a file that fails on its first rows fails here, before any work
    return stream


def load_labels(source: str | Path) -> torch.Tensor:
    """Class labels for held-out data: a file of one integer array (one label per sample)."""
    path = Path(source)
    arrays = _read_arrays(path)
    if not isinstance(arrays, torch.Tensor):
        raise DataError(f"labels file {path} holds {len(arrays)} arrays ({', '.join(arrays)}): give one integer array")
    if arrays.is_floating_point() or arrays.dtype == torch.bool:
        raise DataError(f"labels file {path} holds {arrays.dtype} values: labels are integer class indices")
    if arrays.ndim != 1:
        raise DataError(f"labels file {path} has shape {tuple(arrays.shape)}: give one class index per sample (a 1-D array)")
    return arrays.to(torch.int64)


def check_distinct_data(data: str | Path, heldout: str | Path) -> None:
    """Held-out data must not be the calibration data: the same path, a link to
    it, or a byte-identical copy is refused (its figures would be calibration figures).
    A directory or a glob of shards is its data files: a held-out file that is one of
    the calibration files (or a byte-identical copy of one) is refused."""
    a, b = str(data), str(heldout)
    if _is_function_spec(a) or _is_function_spec(b):
        same = a == b
    else:
        from ..data.streams import data_paths

        try:
            ours, theirs = data_paths(a), data_paths(b)
        except DataError:
            return  # the loader names the missing file, the empty directory or glob
        ours, theirs = [p for p in ours if p.is_file()], [p for p in theirs if p.is_file()]
        pair = _shared_file(ours, theirs)
        same = pair is not None
        if pair is not None and (len(ours) > 1 or len(theirs) > 1):
            b = f"{heldout} (its file {pair[1]} is the calibration file {pair[0]}, or a copy of it)"
    if same:
        raise DataError(
            f"held-out data {b} is the calibration data {data}: figures measured on it would be calibration "
            "figures; pass samples that calibration did not see"
        )


def _shared_file(ours: list[Path], theirs: list[Path]) -> tuple[Path, Path] | None:
    """A held-out file that is a calibration file (the same file, a link) or a byte-identical copy of one.
    Only files of equal size and equal first 64 KiB are compared whole: each file is read once, not once per pair."""
    def key(p: Path) -> tuple[int, bytes]:
        with open(p, "rb") as f:
            return os.fstat(f.fileno()).st_size, f.read(65536)

    try:
        ids = {(s.st_dev, s.st_ino): (p, s.st_size) for p in ours for s in [p.stat()]}
        held = [(p, p.stat()) for p in theirs]
        for p, s in held:
            if (s.st_dev, s.st_ino) in ids:
                return ids[(s.st_dev, s.st_ino)][0], p
        common = {size for _, size in ids.values()} & {s.st_size for _, s in held}
        keyed: dict[tuple[int, bytes], list[Path]] = {}
        for p, size in ids.values():
            if size in common:
                keyed.setdefault(key(p), []).append(p)
        for p, s in held:
            if s.st_size in common:
                for q in keyed.get(key(p), []):
                    if filecmp.cmp(q, p, shallow=False):
                        return q, p
    except OSError:
        return None  # an unreadable file: the loader names it
    return None
