"""Outputs written whole or not at all, by one run at a time.

Every output goes to a temporary file (or a staging folder) in the target
directory and is renamed into place only once complete, so a crash or an
interrupt never leaves a half-written file under the requested name. Temporary
names are short and carry the writer's pid, ``.actsparse-<pid>-<random>[.ext]``:
they fit beside any legal output name, and the next run in that directory
removes those whose process is gone (a SIGKILL runs no clean-up). Only regular
files (or symlinks to one) are ever replaced, and only with ``overwrite``. A
folder of several outputs is locked while a run writes it.

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
import fcntl
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError

__all__ = [
    "LOCK_NAME",
    "atomic_output",
    "check_output_dir",
    "check_output_path",
    "os_reason",
    "output_lock",
    "remove_stale_staging",
    "set_output_mode",
    "staging_dir",
    "temp_prefix",
]

log = logging.getLogger(__name__)

LOCK_NAME = ".actsparse.lock"
# what temp_prefix() + tempfile's 8 random characters + a short suffix look like
_STAGING = re.compile(r"\.actsparse-(\d+)-[a-z0-9_]{8}(\.[A-Za-z0-9]{1,16})?")
_DEFAULT_NAME_MAX = 255


def temp_prefix() -> str:
    """The prefix of every temporary file and staging folder this process makes
    (``tempfile`` appends 8 random characters)."""
    return f".actsparse-{os.getpid()}-"


def _temp_suffix(path: Path) -> str:
    """The output's extension, kept on its temporary file (some writers check it:
    torch.export.save wants .pt2); none when it is long or unusual."""
    suffix = path.suffix
    return suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,16}", suffix) else ""


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return _DEFAULT_NAME_MAX


def _check_names(path: Path) -> None:
    """Every component of ``path`` must fit the file system's limit on a name
    (measured where the path starts to exist)."""
    existing = next((p for p in (path, *path.parents) if _exists(p)), Path("."))
    limit = _name_max(existing if existing.is_dir() else existing.parent)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise OutputError(
                f"output name {part[:24]}... is {size} bytes long; the file system allows at most {limit} bytes "
                "per name: choose a shorter one"
            )


def _exists(path: Path) -> bool:
    try:
        os.lstat(path)
    except OSError:
        return False
    return True


def check_output_dir(outdir: Path) -> None:
    """Refuse an output directory that cannot be made: a name over the limit,
    or something that is not a directory already there."""
    _check_names(outdir)
    try:
        st = os.stat(outdir)
    except FileNotFoundError:
        if os.path.islink(outdir):
            raise OutputError(f"output {outdir} is a symlink to {os.readlink(outdir)}, which does not exist") from None
        return
    except OSError as e:
        raise OutputError(f"cannot use output directory {outdir}: {e.strerror or e}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"output {outdir} is a file: give a directory for the outputs")


def check_output_path(path: Path, overwrite: bool = False) -> None:
    """Refuse an output that cannot be written, before any work is done: a
    missing or read-only directory, a name over the limit, anything already
    there (without ``overwrite``), anything but a regular file (even with it)."""
    path = Path(path)
    _check_names(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist: create it first")
    try:  # os.access says yes to root even where writing fails (read-only mounts)
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(), dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"output directory {parent} is not writable ({e.strerror or e})") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise OutputError(f"cannot use output {path}: {e.strerror or e}") from e
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(path)
        except OSError:
            raise OutputError(
                f"output {path} already exists: a symlink to {os.readlink(path)}, which does not exist; "
                "remove it or choose another name"
            ) from None
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"output {path} is a directory: give a file name")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"output {path} is not a regular file (a device, pipe or socket): choose another name")
    if not overwrite:
        raise OutputError(f"output {path} already exists: pass `overwrite` to replace it")


def set_output_mode(path: Path) -> None:
    """Give a finished output the mode of any file the user writes (0666 less
    the umask): writers that make temporary files (safetensors, onnx's external
    data, mkstemp) leave 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process we could have been: never remove
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def remove_stale_staging(directory: Path) -> int:
    """Remove the temporary files and staging folders that runs killed before
    they could clean up left in ``directory`` (our naming pattern, pid gone);
    say so on the ``actsparse_deploy`` logger. Returns how many went."""
    folders = files = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        match = _STAGING.fullmatch(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
                folders += 1
            else:
                os.unlink(entry.path)
                files += 1
        except OSError:  # gone already (another run cleaned it), or not ours to remove
            continue
    if folders or files:
        parts = [f"{n} {what}{'s' if n > 1 else ''}" for n, what in ((folders, "staging folder"), (files, "temporary file")) if n]
        log.warning(f"removed {' and '.join(parts)} left by killed actsparse runs in {directory}")
    return folders + files


@contextlib.contextmanager
def staging_dir(parent: Path) -> Iterator[Path]:
    """A fresh staging folder in ``parent`` (named for this process), removed
    with whatever is left in it on exit."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=parent))
    except OSError as e:
        raise OutputError(f"cannot write to {parent}: {os_reason(e)}") from e
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def output_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory/.actsparse.lock`` (an flock, with the holder's pid in
    the file) while one run writes there; another run is refused at once. The
    kernel drops the lock of a killed run, so its file is simply taken over."""
    lock = Path(directory) / LOCK_NAME
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputError(f"cannot lock {directory} ({lock}): {os_reason(e)}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise OutputError(f"cannot lock {directory} ({lock}): {os_reason(e)}") from e
            raise OutputError(
                f"another actsparse run is writing to {directory} (pid {holder or 'unknown'}): "
                "wait for it to finish, or choose another output"
            ) from None
        try:  # the run that held it may have removed the file meanwhile: lock the one in place
            same = os.path.samestat(os.fstat(fd), os.lstat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it: nobody can lock a file about to go
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success,
    remove it on any error. Without ``overwrite``, a file that appeared at
    ``path`` meanwhile (another run) is never replaced."""
    path = Path(path)
    check_output_path(path, overwrite)
    remove_stale_staging(path.parent if str(path.parent) else Path("."))
    try:
        fd, name = tempfile.mkstemp(prefix=temp_prefix(), suffix=_temp_suffix(path), dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {os_reason(e)}") from e
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        set_output_mode(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _move_no_replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OutputError):
            raise
        raise OutputError(f"cannot write {path}: {os_reason(e)}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _move_no_replace(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path`` unless ``path`` exists by then (a hard link
    cannot replace; where the file system has none, check and rename)."""
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise OutputError(
            f"output {path} appeared while this run was writing it (another run?): pass `overwrite` to replace it"
        ) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
            raise
        check_output_path(path, overwrite=False)
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def os_reason(e: BaseException) -> str:
    """Why a write failed, in words for the one-line message: "the disk is full"
    for ENOSPC (the same words wherever the disk fills), else the OS's reason.

    >>> import errno
    >>> os_reason(OSError(errno.ENOSPC, "No space left on device"))
    'the disk is full'
    """
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "the disk is full"
    return getattr(e, "strerror", None) or str(e)
