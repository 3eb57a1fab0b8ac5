"""Threads: torch and onnxruntime share the cores, each set explicitly.

Left alone, torch starts one OpenMP thread per core plus an inter-op pool, and
every onnxruntime session starts its own intra-op and inter-op pools: on a small
or busy machine the pools take turns spinning on the same cores (``convert
minilm`` took 160 s on a busy 2-core machine instead of 25 s). Every command
therefore runs inside :func:`use_threads` (``--threads N``; default
:func:`default_threads`: ``OMP_NUM_THREADS`` where the user set it, else the
cores this process may run on less those other processes keep busy): torch gets ``N`` intra-op threads and one
inter-op thread, and every onnxruntime session the tool opens gets
``intra_op_num_threads = N`` and ``inter_op_num_threads = 1``
(:func:`session_options`).

    >>> from actsparse_deploy.base.threads import current_threads, session_options, use_threads
    >>> with use_threads(2) as n:
    ...     n, current_threads(), session_options().intra_op_num_threads, session_options().inter_op_num_threads
    (2, 2, 2, 1)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from .errors import UsageError

__all__ = ["MAX_THREADS", "check_threads", "half_arithmetic", "current_threads", "default_threads", "machine_threads", "session_options", "use_threads"]

#: more threads than any machine this runs on has cores: a typo, refused
MAX_THREADS = 1024

#: the count :func:`use_threads` set (None outside it: :func:`default_threads`)
_current: int | None = None


def machine_threads() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """``OMP_NUM_THREADS`` where it is a positive integer (the user chose it),
    else :func:`machine_threads` less the cores other processes keep busy (the
    1-minute load average, rounded), at least 1. Threads beyond the free cores
    wait for each other: on a 2-core machine with one other busy process, two
    threads made ``convert minilm`` several times slower than one."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_THREADS:  # "²" is a digit to isdigit, not to int
        return int(value)
    cores = machine_threads()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        busy = 0.0
    return max(1, min(cores, cores - round(busy)))


def check_threads(threads: Any) -> int:
    """``threads`` if it is an integer from 1 to :data:`MAX_THREADS`, else a :class:`UsageError` naming it."""
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise UsageError(
            f"`threads` must be an integer from 1 to {MAX_THREADS}, got {threads!r} "
            f"(this machine has {machine_threads()} cores for this process)"
        )
    return threads


def current_threads() -> int:
    """The thread count onnxruntime sessions get now: the one :func:`use_threads` set, else the default."""
    return _current if _current is not None else default_threads()


@contextlib.contextmanager
def use_threads(threads: int | None = None) -> Iterator[int]:
    """For the block: torch's intra-op threads and every onnxruntime session's
    intra-op threads set to ``threads`` (None: :func:`default_threads`), one inter-op
    thread each; yields the count. torch's intra-op count and this module's are
    restored after; torch's inter-op count can be set only once per process,
    before any parallel work: where that has passed it stays as it is."""
    global _current
    import torch

    count = default_threads() if threads is None else check_threads(threads)
    before, before_torch = _current, torch.get_num_threads()
    torch.set_num_threads(count)
    with contextlib.suppress(RuntimeError):  # "cannot set number of interop threads after parallel work has started"
        torch.set_num_interop_threads(1)
    _current = count
    try:
        yield count
    finally:
        _current = before
        torch.set_num_threads(before_torch)


def session_options(threads: int | None = None) -> Any:
    """``onnxruntime.SessionOptions`` with ``intra_op_num_threads`` set to ``threads``
    (None: :func:`current_threads`) and one inter-op thread: every session the tool opens starts from these."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = current_threads() if threads is None else check_threads(threads)
    options.inter_op_num_threads = 1
    return options


def half_arithmetic() -> bool | None:
    """Whether this CPU computes in float16 natively (AVX512-FP16 or AMX-FP16: onnxruntime's float16
    MatMuls run at full speed); None where its flags are unknown (no ``/proc/cpuinfo``). Without them,
    float16 kernels convert on the fly (``tools/measure_half_speed.py``: a decode step 1.9x slower than float32
    on a 2-core AVX2 machine)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else bool({"avx512_fp16", "amx_fp16"} & set(flags))
