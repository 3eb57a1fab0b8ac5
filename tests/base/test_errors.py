"""The one-line error helper every stage uses."""

from __future__ import annotations

from actsparse_deploy.base.errors import ActsparseError, ConfigError, first_line


def test_first_line_of_messages():
    assert first_line(RuntimeError("boom\nstack details")) == "boom"
    assert first_line(RuntimeError("")) == "RuntimeError"  # never empty, never IndexError
    assert first_line(ValueError("  \n\x1b[96mcoloured\x1b[0m line\n")) == "coloured line"
    summary = "Failed to export.\n## Exception summary\n\n<class 'X'>: No ONNX function for svd\nmore"
    assert first_line(RuntimeError(summary)) == "<class 'X'>: No ONNX function for svd"
    assert first_line(RuntimeError("x" * 500), limit=10) == "x" * 10


def test_config_error_is_what_upstream_code_catches():
    error = ConfigError("bad")
    assert isinstance(error, ActsparseError) and isinstance(error, AssertionError) and isinstance(error, ValueError)
