"""Outputs written whole or not at all.

Every output goes to a temporary file in the target directory and is renamed
into place only once complete, so a crash or an interrupt never leaves a
half-written file under the requested name.

    >>> import tempfile, pathlib
    >>> from actsparse_deploy.files import atomic_output
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_output(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text()
    'done'
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputError

__all__ = ["atomic_output", "check_output_path"]


def check_output_path(path: Path, overwrite: bool = False) -> None:
    """Refuse an output that cannot be written, before any work is done."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist: create it first")
    try:  # os.access says yes to root even where writing fails (read-only mounts)
        fd, probe = tempfile.mkstemp(prefix=".actsparse-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"output directory {parent} is not writable ({e.strerror or e})") from None
    if path.is_dir():
        raise OutputError(f"output {path} is a directory: give a file name")
    if path.exists() and not overwrite:
        raise OutputError(f"output {path} already exists: pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success,
    remove it on any error."""
    path = Path(path)
    check_output_path(path, overwrite)
    # the temporary name keeps the suffix: some writers check it (torch.export.save: .pt2)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.part-", suffix=path.suffix, dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual mode
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OutputError):
            raise
        reason = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise OutputError(f"cannot write {path}: {reason}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
