"""How a command runs and ends: every error as one line on stderr and the exit
code of its class, usage errors included (:class:`OneLineErrors`); a signal as
exit 130 / 143 with its one line, whatever was running; ``--threads`` around a
command; the end of a process under torchrun.

    >>> as_flags("pass `heldout` or `batch_size`, not `spec`", {"heldout": "--heldout", "batch": "--batch-size"})
    'pass --heldout or --batch-size, not `spec`'
    >>> env = {"WORLD_SIZE": "2"}; quiet_cpp_log(env); env["TORCH_CPP_LOG_LEVEL"]
    'FATAL'
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import signal
import sys
import traceback
import typing
import warnings
from collections.abc import Callable
from typing import Any, TypeVar, cast

import typer
from rich.text import Text
from typer.core import TyperGroup, TyperOption

from ..base.errors import ActsparseError, Terminated, is_panic
from .render import one_line, stderr

__all__ = [
    "HELP_ASKED",
    "OneLineErrors",
    "as_flags",
    "catch_signals",
    "check_one_process",
    "exit_process",
    "handle_errors",
    "quiet_cpp_log",
    "run_app",
    "with_threads",
]

F = TypeVar("F", bound=Callable[..., Any])

# typer vendors click in recent versions: take its exception classes from typer itself
_CLICK_ERRORS = {c.__name__: c for c in typer.BadParameter.__mro__}
_ClickException = cast("type[Any]", _CLICK_ERRORS["ClickException"])
_UsageError = cast("type[Any]", _CLICK_ERRORS["UsageError"])


class OneLineErrors(TyperGroup):
    """Usage errors (bad option values, unknown options, an option of one value
    given twice) as one line on stderr, exit code 2, like every other error of
    this tool. Help is plain text wrapped to the terminal: every text whole,
    flags shown without a value, each command's whole summary in the list."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        standalone_mode = kwargs.pop("standalone_mode", True)
        given = kwargs.get("args", args[0] if args else None)
        try:
            rv = super().main(*args, **{**kwargs, "standalone_mode": False})
            code = rv if isinstance(rv, int) else 0
        except _UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # `actsparse` alone: the help
                typer.echo(e.format_message())
            else:
                where = e.ctx.command_path if e.ctx is not None else "actsparse"
                hint = _flag_value_hint(e, list(sys.argv[1:] if given is None else given))
                typer.echo(f"error: {one_line(e.format_message())}{hint} (see `{where} --help`)", err=True)
            code = e.exit_code
        except _ClickException as e:
            typer.echo(f"error: {one_line(e.format_message())}", err=True)
            code = e.exit_code
        except typer.Abort:
            typer.echo("aborted", err=True)
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not ctx.resilient_parsing:
            sub = ctx.__class__(command, info_name=name, parent=ctx)
            if _asks_for_help(command, sub, rest):  # the help, whatever else the line holds
                ctx.meta[HELP_ASKED] = True
            else:
                _refuse_repeated_options(command, sub, rest)
        return name, command, rest

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """Each command with the whole first paragraph of its help (never cut short)."""
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, " ".join(inspect.cleandoc(command.help or "").split("\n\n")[0].split())))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


#: the key of the context's meta that says the command's --help was given
HELP_ASKED = "actsparse.help"


def _asks_for_help(command: Any, ctx: Any, args: list[str]) -> bool:
    """``args`` give the command's help option (as an option, not as another option's value)."""
    _, _, order = command.make_parser(ctx).parse_args(args=list(args))
    return any(set(getattr(param, "opts", ())) & set(ctx.help_option_names) for param in order)


def _refuse_repeated_options(command: Any, ctx: Any, args: list[str]) -> None:
    """An option that takes one value, given more than once, is a usage error
    (the parser would keep the last one silently). Repeatable options (lists)
    and flags may repeat."""
    _, _, order = command.make_parser(ctx).parse_args(args=list(args))
    seen: set[str] = set()
    for param in order:
        if not isinstance(param, TyperOption) or param.multiple or param.is_flag or param.count:
            continue
        if param.name in seen:
            flag = max(param.opts, key=len)
            raise _UsageError(f"{flag} is given more than once: it takes one value, give it once", ctx=ctx)
        seen.add(param.name)


_BOOLEAN_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def _flag_value_hint(error: Any, given: list[str]) -> str:
    """For ``--overwrite true``: that the flag takes no value (else nothing)."""
    found = re.match(r"Got unexpected extra argument(?:s|\(s\))? \((.*)\)", error.format_message())
    if error.ctx is None or not found:
        return ""
    extra = found[1].split()[0]
    flags = {opt for p in error.ctx.command.params if getattr(p, "is_flag", False) for opt in p.opts}
    for before, word in zip(given, given[1:]):
        if word == extra and before in flags and word.lower() in _BOOLEAN_WORDS:
            return f"; {before} is a flag and takes no value: give {before} alone, or leave it out"
    return ""



#: the commands that run under torchrun: calibrate and convert share their work across the ranks, models only lists
UNDER_TORCHRUN = ("calibrate", "convert", "models")


def check_one_process(command: str | None, help_asked: bool) -> None:
    """A command that runs in one process, started under torchrun (``WORLD_SIZE`` > 1):
    a usage error (exit 2), since every rank would do the same work and write the same files."""
    world = os.environ.get("WORLD_SIZE", "1")
    if command not in (None, *UNDER_TORCHRUN) and not help_asked and world.isascii() and world.isdigit() and world.lstrip("0") not in ("", "1"):
        stderr.print(f"error: {command} runs in one process, not under torchrun (WORLD_SIZE={world}): only "
                     f"{' and '.join(UNDER_TORCHRUN[:2])} share their work across ranks; run it without torchrun", soft_wrap=True)
        raise typer.Exit(2)


def _flags(fn: Callable[..., Any]) -> dict[str, str]:
    """Parameter name -> its long flag, read from the command's typer options."""
    flags: dict[str, str] = {}
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # an annotation that does not resolve: the message stays as it is
        return flags
    for name, hint in hints.items():
        for info in getattr(hint, "__metadata__", ()):
            # in Annotated[...] form typer.Option's first name lands in ``default``
            decls = [getattr(info, "default", None), *(getattr(info, "param_decls", None) or ())]
            long = [d for d in decls if isinstance(d, str) and d.startswith("--")]
            if long:
                flags[name] = long[0]
    return flags


def as_flags(message: str, flags: dict[str, str]) -> str:
    """``message`` with the parameters it names in backticks (`` `heldout` ``)
    written as the command's flags (``--heldout``); other names stay as they are."""
    known = set(flags.values())

    def flag(m: re.Match[str]) -> str:
        dashed = "--" + m[1].replace("_", "-")  # a library parameter named like the flag (batch_size: --batch-size)
        return flags.get(m[1]) or (dashed if dashed in known else m[0])

    return re.sub(r"`([A-Za-z_][A-Za-z0-9_]*)`", flag, message)


def handle_errors(fn: F) -> F:
    """Turn library errors into a one-line message and their exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = kwargs.get("verbose", False)
        try:
            with warnings.catch_warnings():
                if not verbose:  # torch's and numpy's warnings are not this tool's one line
                    warnings.simplefilter("ignore")
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except ActsparseError as e:
            if verbose:
                traceback.print_exc(file=sys.stderr)
            stderr.print(Text.assemble(("error:", "red"), " ", one_line(as_flags(str(e), _flags(fn)))), soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("interrupted (SIGINT): no partial output was left")
            raise typer.Exit(130) from None
        except Terminated:
            stderr.print("terminated (SIGTERM): no partial output was left")
            raise typer.Exit(143) from None
        except Exception as e:  # a bug, not a user mistake: still one line unless --verbose
            _internal_error(e, verbose)
            raise typer.Exit(1) from None
        except BaseException as e:  # a Rust library's panic (pyo3's PanicException) is no Exception: the same line
            if not is_panic(e):
                raise
            _internal_error(e, verbose)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _internal_error(e: BaseException, verbose: bool) -> None:
    """The one line of an error no stage knows the cause of (a bug, a library's panic); with --verbose its traceback first."""
    if verbose:
        traceback.print_exc(file=sys.stderr)
    stderr.print(f"internal error: {type(e).__name__}: {one_line(str(e))} (run with --verbose for the traceback)", soft_wrap=True)


def with_threads(fn: F) -> F:
    """Run the command at its --threads count (actsparse_deploy.base.threads.use_threads:
    torch's and every onnxruntime session's intra-op threads, one inter-op thread)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..base.threads import use_threads

        with use_threads(kwargs.get("threads")):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def interrupt(signum: int, frame: Any) -> None:
    """The first SIGINT / SIGTERM stops the command (KeyboardInterrupt / Terminated,
    so every clean-up runs); any later one is ignored, so that clean-up runs to its
    end and the message stays one line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated()


def quiet_cpp_log(environ: typing.MutableMapping[str, str]) -> None:
    """Under torchrun (``WORLD_SIZE`` > 1), c10d's C++ log off unless the user set
    ``TORCH_CPP_LOG_LEVEL``: it writes to fd 2 (dozens of lines for one failed
    connection) and torch reads the level once, when it loads. Every failure is
    still this tool's one line."""
    if environ.get("WORLD_SIZE", "1").strip() not in ("", "1"):
        environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")


def run_app(app: Callable[[], Any]) -> int:
    """The app's exit code. What escapes the commands' handlers (a signal or a bug
    while the command line is parsed, ``sys.exit("text")``) is one line on
    stderr and its code too, as :func:`handle_errors` gives them."""
    try:
        app()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        stderr.print(one_line(str(e.code)), soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        stderr.print("interrupted (SIGINT): no partial output was left")
        return 130
    except Terminated:
        stderr.print("terminated (SIGTERM): no partial output was left")
        return 143
    except BaseException as e:  # a bug or a Rust library's panic outside a command's handler: still one line
        if not (isinstance(e, Exception) or is_panic(e)):
            raise
        stderr.print(f"internal error: {type(e).__name__}: {one_line(str(e))}", soft_wrap=True)
        return 1
    return 0


def catch_signals() -> None:
    """The first SIGINT / SIGTERM stops the command (:func:`interrupt`); under
    torchrun, c10d's C++ log quiet (:func:`quiet_cpp_log`, read once as torch loads)."""
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    if "torch" not in sys.modules:
        quiet_cpp_log(os.environ)


def exit_process(code: int) -> None:
    """End the process with ``code``. Under torchrun: once the ranks' last exchange is
    over (every output written, or every rank told of the failure), without the
    interpreter's teardown."""
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "1"):
        sys.exit(code)
    # There gloo's and the TCP store's threads are destroyed after the other rank
    # may have gone, which can abort this rank (SIGABRT, "terminate called without
    # an active exception") and make torchrun report a finished job as failed.
    # A signal now (torchrun stopping the job) changes nothing: the code stands.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
