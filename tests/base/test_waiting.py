"""Blocking work in a worker thread while the caller waits where signals arrive (base.waiting)."""

from __future__ import annotations

import _thread
import contextlib
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from actsparse_deploy.base.errors import Terminated
from actsparse_deploy.base.waiting import run_in_worker


@contextlib.contextmanager
def _raising_on(signum: int, error: type[BaseException]) -> Iterator[None]:
    """For the block, ``signum`` raises ``error`` in the main thread (whatever the test runner set)."""

    def handler(number: int, frame: object) -> None:
        raise error()

    before = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, before)


def test_the_value_comes_back_from_a_named_worker() -> None:
    seen: list[str] = []

    def work() -> int:
        seen.append(threading.current_thread().name)
        return 42

    assert run_in_worker(work, name="test-worker") == 42
    assert seen == ["test-worker"] and threading.current_thread().name != "test-worker"


def test_the_worker_exception_is_raised_in_the_caller_as_it_is() -> None:
    error = ValueError("from the worker")

    def work() -> None:
        raise error

    with pytest.raises(ValueError, match="from the worker") as raised:
        run_in_worker(work, name="test-worker")
    assert raised.value is error


def test_the_deadline_raises_the_callers_error_and_leaves_the_worker_without_stop() -> None:
    release = threading.Event()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="too slow"):
        run_in_worker(release.wait, name="test-worker", deadline=start + 0.2, expired=lambda: RuntimeError("too slow"), poll=0.02)
    assert 0.2 <= time.monotonic() - start < 3
    assert any(t.name == "test-worker" and t.is_alive() for t in threading.enumerate())  # left to itself
    release.set()


def test_the_deadline_without_an_error_of_its_own_is_a_timeout_error() -> None:
    release = threading.Event()
    with pytest.raises(TimeoutError, match="test-worker passed its deadline"):
        run_in_worker(release.wait, name="test-worker", deadline=time.monotonic() + 0.05)
    release.set()


def test_the_deadline_stops_the_work_and_waits_for_it_before_raising() -> None:
    stopped = threading.Event()
    ended = threading.Event()

    def work() -> None:
        stopped.wait()
        time.sleep(0.1)  # the work takes a while to stop: the caller waits for it
        ended.set()

    with pytest.raises(TimeoutError, match="stopped"):
        run_in_worker(work, name="test-worker", deadline=time.monotonic() + 0.1, expired=lambda: TimeoutError("stopped"),
                      stop=stopped.set)
    assert stopped.is_set() and ended.is_set()


@pytest.mark.parametrize("signum, error", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_waiting_unwinds_at_once(signum: int, error: type[BaseException]) -> None:
    release = threading.Event()

    def work() -> None:
        time.sleep(0.2)  # the caller is waiting by now
        _thread.interrupt_main(signum)  # as if the process got the signal while the caller waits
        release.wait(30)

    start = time.monotonic()
    with _raising_on(signum, error), pytest.raises(error):
        run_in_worker(work, name="test-worker", poll=0.02)
    assert time.monotonic() - start < 10  # not after the work's 30 s
    release.set()


def test_a_signal_while_waiting_stops_the_work_first() -> None:
    stopped = threading.Event()
    ended = threading.Event()

    def work() -> None:
        time.sleep(0.2)  # the caller is waiting by now
        _thread.interrupt_main()
        stopped.wait(30)
        ended.set()

    with _raising_on(signal.SIGINT, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        run_in_worker(work, name="test-worker", stop=stopped.set, poll=0.02)
    assert stopped.is_set() and ended.is_set()  # never unwound while the work ran
