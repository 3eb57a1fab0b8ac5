"""Quiet: exporters' and torch.export's chatter (Python prints, native prints,
warnings, log lines) kept off stdout, so that ``--json`` output stays one document.

    >>> with quiet():
    ...     print("never seen")
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator

__all__ = ["native_stdout", "quiet"]


def _flush_all() -> None:
    """Python's and C's buffered output, written now (before a file descriptor moves)."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)  # C stdio (std::cout shares it): the TorchScript IR dump


@contextlib.contextmanager
def native_stdout(verbose: bool = False) -> Iterator[None]:
    """File descriptor 1, what native code (the TorchScript exporter's C++ IR
    dump) writes to, goes to stderr while this runs when ``verbose``, else
    nowhere (and so does fd 2): stdout carries only this tool's output
    (``--json`` stays JSON)."""
    _flush_all()
    saved = {fd: os.dup(fd) for fd in ((1,) if verbose else (1, 2))}
    target = os.dup(2) if verbose else os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in saved:
            os.dup2(target, fd)
        yield
    finally:
        _flush_all()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(target)


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """Exporter chatter never on stdout: with ``verbose``, Python's and native
    prints go to stderr; without, torch.export / exporter prints, warnings and
    log lines are silenced (torch.export prints the partial graph when it fails,
    the TorchScript exporter its IR)."""
    if verbose:
        with native_stdout(verbose=True), contextlib.redirect_stdout(sys.stderr):
            yield
        return
    names = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx", "onnxscript")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with native_stdout(), warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
