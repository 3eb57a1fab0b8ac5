"""Arrays from users' files, read safely: ``.npy`` / ``.npz`` headers checked before
anything is mapped or inflated, torch files with ``weights_only=True``, every array a
tensor of a supported dtype or one line naming it."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ..base.errors import ActsparseError, DataError, first_line
from ..base.serialize import reason, unreadable

__all__ = ["POSITIONAL", "check_npy", "check_npz", "read_arrays", "to_tensor", "torch_load"]

#: key prefix of the inputs of a .pt data file holding a list (positional inputs)
POSITIONAL = "input #"


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


def torch_load(path: Path, what: str, error: type[ActsparseError], mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``: objects that could run code are refused,
    anything else that is not a torch file is named as such. ``mmap``: the tensors
    memory-mapped from the file, read as they are used (a file in torch's legacy
    format, which cannot be mapped, is read whole)."""
    try:
        if mmap and zipfile.is_zipfile(path):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
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


#: the largest compression ratio deflate can reach (a zip member that claims more
#: uncompressed bytes than this times its compressed size is lying)
_MAX_DEFLATE_RATIO = 1032


def to_tensor(name: str, array: Any, source: str) -> torch.Tensor:
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


def check_npy(path: Path) -> None:
    with open(path, "rb") as f:
        declared = _npy_bytes(f, f"data file {path}")
        available = os.fstat(f.fileno()).st_size - f.tell()
    if declared > available:
        raise DataError(
            f"data file {path} declares {declared:,} bytes of array data but holds {available:,}: it is truncated or its header lies"
        )


def check_npz(path: Path) -> None:
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


def read_arrays(path: Path) -> dict[str, torch.Tensor] | torch.Tensor:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            check_npy(path)
            return to_tensor("array", np.load(path, allow_pickle=False), str(path))
        if suffix == ".npz":
            check_npz(path)
            with np.load(path, allow_pickle=False) as npz:
                raw = {k: npz[k] for k in npz.files}
        elif suffix == ".safetensors":
            raw = load_file(str(path))
        elif suffix in (".pt", ".pth"):
            obj = torch_load(path, "data file", DataError)
            if isinstance(obj, torch.Tensor):
                return to_tensor("tensor", obj, str(path))
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
    tensors = {k: to_tensor(k, v, str(path)) for k, v in raw.items()}
    lengths = {k: t.shape[0] for k, t in tensors.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"arrays in {path} differ in their number of samples: {lengths}")
    return next(iter(tensors.values())) if len(tensors) == 1 else tensors
