"""The error taxonomy.

Library code raises these with a message that names the file, layer or value at
fault and what to do about it; only the CLI turns them into exit codes.

    >>> from actsparse_deploy.base.errors import RecipeError, ActsparseError
    >>> issubclass(RecipeError, ActsparseError)
    True
"""

from __future__ import annotations

import re


def first_line(e: BaseException, limit: int = 400) -> str:
    """The informative line of an exception's message for a one-line error:
    colour codes removed, torch.onnx's "## Exception summary" followed, never
    empty (the exception's type name when it has no message)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if line.strip()]
    if "## Exception summary" in lines:
        lines = lines[lines.index("## Exception summary") + 1 :] or lines
    return lines[0][:limit] if lines else type(e).__name__


def is_panic(e: BaseException) -> bool:
    """A Rust panic in a library built with pyo3 (tokenizers, safetensors): ``pyo3_runtime.PanicException``,
    a ``BaseException`` that no ``except Exception`` catches (never KeyboardInterrupt or SystemExit). Each
    such library has its own class of that name, so it is known by its name and module."""
    return type(e).__name__ == "PanicException" and type(e).__module__ == "pyo3_runtime"


class ActsparseError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1


class UsageError(ActsparseError, ValueError):
    """A value given that no stage owns and none accepts (``threads`` out of range):
    the command line's usage error, exit code 2."""

    exit_code = 2


class ConfigError(ActsparseError, ValueError, AssertionError):
    """A sparsifier configuration that cannot work (features without feature_dim,
    a function that is not callable).

    It is also an ``AssertionError`` because torch's upstream class raises that
    for the same mistakes; code written against upstream keeps working.
    """

    exit_code = 3


class RecipeError(ActsparseError, ValueError):
    """A recipe file or object that is malformed or does not fit the model."""

    exit_code = 3


class UnknownFunctionError(RecipeError, KeyError):
    """A function name that is not in its registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ModelLoadError(ActsparseError):
    """A model that cannot be built: unknown name, bad ``module:factory``."""

    exit_code = 4


class WeightsError(ActsparseError):
    """A weights file that is missing, corrupted, unsafe or does not fit the model."""

    exit_code = 5


class DataError(ActsparseError, ValueError):
    """Calibration or validation data that is missing, malformed or not finite."""

    exit_code = 6


class CalibrationError(ActsparseError, RuntimeError):
    """Calibration that cannot produce masks (a layer never reached, for one)."""

    exit_code = 7


class NoAggregateError(CalibrationError, KeyError):
    """``step()`` on a layer with no aggregated data: never reached by a forward
    pass, or already stepped. Also a ``KeyError``, which is what torch's upstream
    class raises for the same thing."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else type(self).__name__


class LayerNotFoundError(ActsparseError, KeyError, ValueError, AssertionError):
    """A layer name that the sparsifier or the model does not know.

    Also the exception types torch's upstream class raises for the same mistakes
    (``KeyError`` from ``unregister_layer``, ``ValueError`` from ``get_mask``,
    ``AssertionError`` for a layer outside the model): code written against
    upstream keeps working.
    """

    exit_code = 7

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else type(self).__name__


class MaskError(ActsparseError, ValueError):
    """A masks file that is corrupted, from another model or from a newer format."""

    exit_code = 8


class SquashError(ActsparseError, ValueError):
    """Masks that cannot be squashed as asked: an unknown mode, a layer that cannot
    be folded or pruned, a model ``prune`` cannot trace, a pruned model that does not
    compute what ``mul`` computes. The masks themselves are fine (else :class:`MaskError`)."""

    exit_code = 12


class ExportError(ActsparseError):
    """An ONNX export that failed."""

    exit_code = 9


class ValidationError(ActsparseError):
    """An ONNX model whose outputs do not match the PyTorch model's."""

    exit_code = 10


class OutputError(ActsparseError, OSError):
    """An output path that cannot be written (missing directory, exists, no space)."""

    exit_code = 11


class MemoryBudgetError(ActsparseError, MemoryError):
    """A model that cannot be converted within the memory allowed (``--max-memory``, default what the
    machine has free): said before any work, with what it needs."""

    exit_code = 13


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that every ``finally`` and
    temporary-file cleanup runs before the process exits with 143."""
