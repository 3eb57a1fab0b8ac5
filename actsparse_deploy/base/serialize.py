"""A generic ``.safetensors`` container: tensors plus string metadata, no pickle.

Every file this package writes (masks, statistics, sparsifier state) is one of
these: the metadata names the file's ``format`` and ``format_version`` (checked
on load, a newer version is refused with "upgrade") and the tool version that
wrote it; writes are atomic. What the tensors and the rest of the metadata mean
is up to each format's module; this one imports none of them.

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from actsparse_deploy.base.serialize import read_container, write_container
    >>> path = Path(tempfile.mkdtemp()) / "x.safetensors"
    >>> write_container(path, "example", 1, {"w": torch.ones(2)}, {"note": "hi"})
    >>> tensors, metadata = read_container(path, "example", 1, "example")
    >>> tensors["w"].tolist(), metadata["note"], metadata["format"]
    ([1.0, 1.0], 'hi', 'example')
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import MaskError, first_line, is_panic
from .files import atomic_output
from .version import __version__

__all__ = ["SEP", "check_format", "load_safetensors", "read_container", "reason", "save_safetensors", "unreadable", "write_container"]

#: Separates the parts of a tensor's key (``layer::i`` for the i-th feature).
SEP = "::"
#: what reading a corrupted ``.safetensors`` file raises besides a Rust panic: safetensors' own error, and torch's
#: on a header safetensors lets through (a dimension past int64: TypeError; a sub-byte dtype whose bytes do not fill
#: its shape: RuntimeError); a file that cannot be opened or mapped
_UNREADABLE = (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError)


def unreadable(e: BaseException) -> bool:
    """Whether ``e``, raised while a ``.safetensors`` file was read, means the file cannot be read (its class's error,
    not a bug): an error of safetensors or of torch on its header or bytes, or a panic of the safetensors library
    (:func:`~actsparse_deploy.base.errors.is_panic`, a ``BaseException``). Callers catch ``BaseException`` and re-raise
    anything else (KeyboardInterrupt, SystemExit) as it is.

    >>> unreadable(TypeError("too big")), unreadable(KeyboardInterrupt())
    (True, False)
    """
    return isinstance(e, _UNREADABLE) or is_panic(e)


def reason(e: BaseException) -> str:
    """``e`` in a message: its type and first line (``PanicException: ...``)."""
    return f"{type(e).__name__}: {first_line(e)}"


def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, but written by Python: a failed write (a
    full disk) is an ``OSError`` that :func:`atomic_output` reports, not the
    ``SafetensorError`` safetensors' own writer raises."""
    data = save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data)


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors and string metadata atomically."""
    contiguous = {key: t.detach().cpu().contiguous() for key, t in tensors.items()}
    with atomic_output(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def load_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file; a missing or corrupted file is a MaskError."""
    if not path.is_file():
        raise MaskError(f"{what} file {path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except BaseException as e:
        if not unreadable(e):
            raise
        raise MaskError(f"{what} file {path} is not a readable .safetensors file ({reason(e)})") from e


def check_format(metadata: dict[str, str], fmt: str, version: int, path: Path) -> None:
    """Refuse a file of another format, or of a newer version of this one."""
    if metadata.get("format") != fmt:
        raise MaskError(f"{path} is not a {fmt} file (format: {metadata.get('format', 'none')})")
    raw = metadata.get("format_version")
    if raw is None:
        raise MaskError(f"{path} has no valid format_version: the file is corrupted")
    if not re.fullmatch(r"[0-9]{1,9}", raw) or int(raw) < 1:
        raise MaskError(f"{path}: format_version {raw[:40]!r} is not a positive integer: the file is corrupted")
    found = int(raw)
    if found > version:
        raise MaskError(
            f"{path} was written in format version {found} by a newer actsparse_deploy "
            f"({metadata.get('tool_version', '?')}); this version {__version__} reads up to {version}: upgrade"
        )


def write_container(path: Path, fmt: str, version: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` with ``metadata`` plus the format name, format version and tool version."""
    header = {"format": fmt, "format_version": str(version), "tool_version": __version__}
    save_safetensors(Path(path), tensors, {**header, **metadata})


def read_container(path: Path, fmt: str, version: int, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a file :func:`write_container` wrote in format
    ``fmt`` up to ``version``; anything else is a :class:`MaskError`."""
    path = Path(path)
    tensors, metadata = load_safetensors(path, what)
    check_format(metadata, fmt, version, path)
    return tensors, metadata
