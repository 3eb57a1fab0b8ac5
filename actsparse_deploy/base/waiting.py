"""Waiting for blocking work while signals still arrive.

A call that blocks in C or C++ (``InferenceSession.run``, a Rust tokenizer,
``init_process_group``'s rendezvous) holds off Python's signal handlers until
it returns: Ctrl-C or SIGTERM would wait for it. :func:`run_in_worker` runs
such a call in a worker thread while the calling (main) thread waits in short
timed waits, between which the handlers run: a signal raises its exception
(``KeyboardInterrupt``, :class:`~actsparse_deploy.base.errors.Terminated`) in
the caller at once, and an optional deadline (``time.monotonic()``) raises the
caller's own error. With ``stop`` (onnxruntime's ``RunOptions.terminate``) the
work is asked to end and waited for before either unwinds; without it the
worker is left to end with the process (it is a daemon thread).

    >>> import time
    >>> from actsparse_deploy.base.waiting import run_in_worker
    >>> run_in_worker(lambda: 6 * 7, name="example")
    42
    >>> run_in_worker(lambda: time.sleep(5), name="example", deadline=time.monotonic() + 0.1,
    ...               expired=lambda: TimeoutError("too slow"))
    Traceback (most recent call last):
    ...
    TimeoutError: too slow
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["POLL_SECONDS", "run_in_worker"]

T = TypeVar("T")

#: how often the waiting thread looks at the clock (and takes signals) by default
POLL_SECONDS = 0.05


def run_in_worker(
    fn: Callable[[], T],
    *,
    name: str,
    deadline: float | None = None,
    expired: Callable[[], BaseException] | None = None,
    stop: Callable[[], None] | None = None,
    poll: float = POLL_SECONDS,
) -> T:
    """``fn()`` in a daemon thread named ``name`` while this thread waits, in waits
    of ``poll`` seconds at most: its value, or its exception raised here as it is.

    A signal's exception raised while waiting unwinds from here. At ``deadline``
    (``time.monotonic()``; None: no limit) ``expired()`` is raised (a
    :class:`TimeoutError` where ``expired`` is None). ``stop``, where given, is
    called on either, and the worker is waited for before the exception leaves
    (the work never outlives the call); without it the worker is left running."""
    outcome: dict[str, Any] = {}
    # an Event, not Thread.join: a join interrupted by a signal can mark a running thread as stopped
    done = threading.Event()

    def work() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # handed to the waiting thread
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=work, name=name, daemon=True).start()
    if not _wait(done, deadline, stop, poll):
        raise expired() if expired is not None else TimeoutError(f"{name} passed its deadline")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


def _wait(done: threading.Event, deadline: float | None, stop: Callable[[], None] | None, poll: float) -> bool:
    """Wait for ``done`` in timed waits (the signal handlers run between them): True once it is set,
    False at ``deadline`` (after ``stop()`` and the worker's end, where ``stop`` is given)."""
    try:
        while not done.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                if stop is not None:
                    stop()
                    done.wait()
                return False
            done.wait(poll if left is None else min(poll, left))
    except BaseException:
        if stop is not None:
            stop()
            done.wait()  # the work stops at its next chance; never unwind while it runs
        raise
    return True
