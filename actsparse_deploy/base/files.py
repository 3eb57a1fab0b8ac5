"""Outputs written whole or not at all, by one run at a time.

Every output goes to a temporary file (or a staging folder) in the target
directory and is renamed into place only once complete, so a crash or an
interrupt never leaves a half-written file under the requested name. Temporary
names are short, ``.actsparse-<pid>-<random>[.ext]``, so they fit beside any
legal output name. Each has a lock file beside it,
``.actsparse-<pid>-<random>-lock``, made before it and removed after it: its run holds an flock on it for as long as the name
is in use, and wrote its pid, host and boot id in it (JSON). The next run in
that directory removes what a run killed with SIGKILL left (it runs no
clean-up) only where that run is shown to be over: its lock is free, and it ran
on this host (this kernel, or this host name before a reboot). A pid proves
nothing: a run in another pid namespace (a container, another host on a shared
folder) has a pid that looks dead here. What cannot be judged is kept, and said.
Only regular files (or symlinks to one, the link replaced, never its target)
are ever replaced, and only with ``overwrite``. A folder of several outputs is
locked while a run writes it.

    >>> import tempfile, pathlib
    >>> from actsparse_deploy.base.files import atomic_output
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_output(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text()
    'done'
    >>> sorted(p.name for p in target.parent.iterdir())
    ['out.txt']
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import OutputError

__all__ = [
    "LOCK_NAME",
    "atomic_output",
    "check_output_dir",
    "check_output_path",
    "os_reason",
    "output_folder",
    "output_lock",
    "publish",
    "remove_stale_staging",
    "set_output_mode",
    "staging_dir",
    "temp_prefix",
]

log = logging.getLogger(__name__)

LOCK_NAME = ".actsparse.lock"
#: the lock file beside each temporary name: a suffix no temporary file has (see _temp_suffix)
_LOCK = "-lock"
# temp_prefix() + tempfile's 8 random characters (the stem), then a short extension or _LOCK
_TEMP = re.compile(r"(\.actsparse-\d+-[a-z0-9_]{8})(\.[A-Za-z0-9]{1,16}|-lock)?")
_CLAIM_TRIES = 100
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
        probe = parent / f"{temp_prefix()}{secrets.token_hex(4)}-probe"  # no temporary name: never judged by others
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
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


@functools.cache
def _boot_id() -> str:
    """This kernel's boot id (Linux; empty elsewhere): the same in every container it runs."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _this_run() -> dict[str, Any]:
    """What a lock file records of the run that holds it."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id()}


def _lock_in_place(fd: int, path: str | Path, kind: int) -> bool:
    """Lock ``fd`` without waiting; False where another holds it, or where the
    file is no longer the one at ``path`` (removed meanwhile)."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except FileNotFoundError:
        return False


def _claim(directory: Path) -> tuple[int, Path]:
    """Make, lock and sign a fresh lock file ``<stem>-lock`` in ``directory``;
    returns its descriptor and path. The stem is this run's while it holds the
    lock (held on the descriptor until it is closed)."""
    record = json.dumps(_this_run()).encode()
    for _ in range(_CLAIM_TRIES):
        try:
            fd, name = tempfile.mkstemp(prefix=temp_prefix(), suffix=_LOCK, dir=directory)
        except OSError as e:
            raise OutputError(f"cannot write to {directory}: {os_reason(e)}") from e
        try:
            if _lock_in_place(fd, name, fcntl.LOCK_EX):
                os.fchmod(fd, 0o644)  # other users' runs read the record
                os.write(fd, record)
                return fd, Path(name)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(name)
            os.close(fd)
            raise OutputError(f"cannot write to {directory} (its lock file {name}): {os_reason(e)}") from e
        os.close(fd)  # another run was judging it at that instant, and removes it: take another name
    raise OutputError(f"cannot write to {directory}: no lock file could be made in {_CLAIM_TRIES} tries")


@contextlib.contextmanager
def _claimed(directory: Path) -> Iterator[Path]:
    """A fresh temporary name stem in ``directory``, this run's (its lock held)
    for the block: the block makes and removes one file or folder named for it.
    The lock file comes first and goes last, so no file of a live run is
    ever without a held lock beside it."""
    fd, lock = _claim(directory)
    try:
        yield lock.with_name(lock.name[: -len(_LOCK)])
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it: another run's look at it finds it gone
        os.close(fd)


def _record(fd: int) -> dict[str, Any] | None:
    """A lock file's record: None where it has none yet (its run is making it,
    or was killed making it), an empty dict where it cannot be read as one."""
    try:
        raw = os.pread(fd, 4096, 0)
        found = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return {}
    return found if found is None or isinstance(found, dict) else {}


def _here(record: dict[str, Any]) -> bool:
    """Whether a run recorded ran on this kernel: its lock is this kernel's to
    show. A run of this host name on another kernel (before a reboot, or a cloned
    machine of the same name sharing the folder) is not; without a boot id (not
    Linux) the host name decides."""
    mine = _this_run()
    if mine["boot_id"]:
        return record.get("boot_id") == mine["boot_id"]
    return record.get("host") == mine["host"]


def _open_lock(lock: Path) -> int:
    """Another run's lock file, opened to be locked (for writing where we may:
    an NFS client locks only such files)."""
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(lock, os.O_RDWR | flags)
    except PermissionError:
        return os.open(lock, os.O_RDONLY | flags)


def _judge(directory: Path, stem: str, entries: list[str]) -> tuple[str, str]:
    """Remove ``stem``'s files and lock where its run is shown to be over.
    Returns what was found: "removed", "live", "gone" (finished meanwhile),
    "elsewhere" (a run on another host, named in the second item) or "unknown"."""
    lock = directory / f"{stem}{_LOCK}"
    try:
        fd = _open_lock(lock)
    except FileNotFoundError:
        return ("unknown" if any(_exists(directory / name) for name in entries) else "gone"), ""
    except OSError:
        return "unknown", ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "unknown", ""
        if not _lock_in_place(fd, lock, fcntl.LOCK_EX):  # exclusive: one run judges it at a time
            return "live", ""
        record = _record(fd)
        if record is None and not entries:  # a lock being made this instant, or by a run killed making it
            lock.unlink()  # its maker (if any) sees it gone and takes another name
            return "gone", ""
        if not record:  # nothing a run of ours leaves: not ours to judge
            return "unknown", ""
        if not _here(record):
            return "elsewhere", f"{record.get('host')} pid {record.get('pid')}"
        for name in entries:
            path = directory / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        lock.unlink()
        return "removed", ""
    except OSError:  # not ours to remove (another user's), or another run removed it first
        return "unknown", ""
    finally:
        os.close(fd)


def _temp_names(directory: Path) -> dict[str, list[str]]:
    """The temporary files and folders in ``directory`` by stem (a lock file alone: no names)."""
    stems: dict[str, list[str]] = {}
    for name in os.listdir(directory):
        match = _TEMP.fullmatch(name)
        if match is not None:
            names = stems.setdefault(match.group(1), [])
            if match.group(2) != _LOCK:
                names.append(name)
    return stems


def _count(directory: Path, names: list[str]) -> Counter[str]:
    kinds = Counter("staging folder" if (directory / n).is_dir() and not (directory / n).is_symlink() else "temporary file"
                    for n in names)
    return kinds or Counter(["temporary file"])  # a lock file alone


def _told(counts: Counter[str]) -> str:
    return " and ".join(f"{counts[k]} {k}{'s' if counts[k] > 1 else ''}" for k in ("staging folder", "temporary file") if counts[k])


def remove_stale_staging(directory: Path) -> int:
    """Remove the temporary files and staging folders (with their lock files)
    that runs killed before they could clean up left in ``directory``, where
    each run is shown to be over (see the module docstring); say so on the
    ``actsparse_deploy`` logger, and say what is kept because it cannot be
    judged. Returns how many went."""
    directory = Path(directory)
    try:
        stems = _temp_names(directory)
    except OSError:
        return 0
    removed: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    elsewhere: Counter[str] = Counter()
    hosts: list[str] = []
    for stem, names in sorted(stems.items()):
        counts = _count(directory, names)
        verdict, host = _judge(directory, stem, names)
        if verdict == "removed":
            removed += counts
        elif verdict == "unknown" and names:
            unknown += counts
        elif verdict == "elsewhere":
            elsewhere += counts
            hosts.append(host)
    if removed:
        log.warning(f"removed {_told(removed)} left by killed actsparse runs in {directory}")
    if elsewhere:
        log.warning(f"kept {_told(elsewhere)} in {directory}: made by actsparse runs on other hosts or before a reboot "
                    f"({', '.join(hosts)}), which this host cannot tell are over; remove them once they are")
    if unknown:
        log.warning(f"kept {_told(unknown)} in {directory}: no lock shows whether the runs that made them are over "
                    "(made by another tool or an older actsparse?); remove them once no run writes there")
    return sum(removed.values())


@contextlib.contextmanager
def staging_dir(parent: Path) -> Iterator[Path]:
    """A fresh staging folder in ``parent`` (locked for this run), removed
    with whatever is left in it on exit."""
    with _claimed(Path(parent)) as staging:
        try:
            os.mkdir(staging, 0o700)
        except OSError as e:
            raise OutputError(f"cannot write to {parent}: {os_reason(e)}") from e
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def output_lock(directory: Path, name: str | None = None) -> Iterator[None]:
    """Hold ``directory/.actsparse.lock`` (an flock, with the holder's pid in
    the file) while one run writes there; another run is refused at once. The
    kernel drops the lock of a killed run, so its file is simply taken over.
    With ``name``, lock only that output in ``directory`` (``.NAME.actsparse.lock``):
    runs writing other names there go on side by side."""
    lock = Path(directory) / (LOCK_NAME if name is None else _name_lock(Path(directory), name))
    what = str(directory) if name is None else str(Path(directory) / name)
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
                f"another actsparse run is writing {'to ' if name is None else ''}{what} (pid {holder or 'unknown'}): "
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


def _name_lock(directory: Path, name: str) -> str:
    """The lock file's name for output ``name``: ``.NAME.actsparse.lock``, or a
    digest of ``name`` where that would be too long for the file system."""
    lock = f".{name}{LOCK_NAME}"
    if len(os.fsencode(lock)) > _name_max(directory):
        lock = f".{hashlib.sha256(os.fsencode(name)).hexdigest()[:32]}{LOCK_NAME}"
    return lock


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success,
    remove it on any error. Without ``overwrite``, a file that appeared at
    ``path`` meanwhile (another run) is never replaced."""
    path = Path(path)
    check_output_path(path, overwrite)
    remove_stale_staging(path.parent)
    with _claimed(path.parent) as stem:
        tmp = stem.with_name(stem.name + _temp_suffix(path))
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except OSError as e:
            raise OutputError(f"cannot write {path}: {os_reason(e)}") from e
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


@contextlib.contextmanager
def output_folder(outdir: Path) -> Iterator[Path]:
    """``outdir`` made (with its parents) and locked for this run
    (:func:`output_lock`), what killed runs left there removed; the folders it
    made are removed again, if still empty, where the block fails."""
    outdir = Path(outdir)
    check_output_dir(outdir)
    created = [p for p in (outdir, *outdir.parents) if not _exists(p)]
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output directory {outdir}: {os_reason(e)}") from e
    try:
        with output_lock(outdir):
            remove_stale_staging(outdir)
            yield outdir
    except BaseException:
        for directory in created:  # innermost first
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def publish(staging: Path, outdir: Path, names: Sequence[str], overwrite: bool = False) -> None:
    """Move ``staging/NAME`` to ``outdir/NAME`` for each name: all checked first
    (:func:`check_output_path`: a link is replaced, never written through), then
    renamed; where one fails, those this call added are taken back. A name in a
    subfolder (``1_Pooling/config.json``) has its folder made where missing (and
    removed again, if still empty, where this call fails); a folder's name held by
    anything but a folder (a file, a link) is refused."""
    added: list[Path] = []
    made: list[Path] = []
    try:
        for name in names:
            _make_subfolders(outdir, name, made)
            check_output_path(outdir / name, overwrite)
            set_output_mode(staging / name)
        for name in names:
            target = outdir / name
            new = not _exists(target)
            if overwrite:
                os.replace(staging / name, target)
            else:
                _move_no_replace(staging / name, target)
            if new:
                added.append(target)
    except OSError as e:
        for target in added:
            target.unlink(missing_ok=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(e, OutputError):
            raise
        raise OutputError(f"cannot write the outputs to {outdir}: {os_reason(e)}") from e


def _make_subfolders(outdir: Path, name: str, made: list[Path]) -> None:
    """The folders of ``name`` below ``outdir`` made where missing, each added to ``made``."""
    folder = outdir
    for part in Path(name).parts[:-1]:
        folder = folder / part
        if not _exists(folder):
            os.mkdir(folder)
            made.append(folder)
        elif folder.is_symlink() or not folder.is_dir():
            raise OutputError(f"output {folder} is not a folder (a file or a link where the outputs' folder goes): "
                              "remove it or choose another output directory")


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
