"""The Typer application, and ``main(argv, env)`` that runs it in-process with vaekit's exit codes.

Start-up is kept light: this module imports neither PyTorch nor Rich. The root command lists the commands from
:data:`vaekit.interfaces.cli.commands.COMMANDS` without importing them, so ``vaekit --help`` and ``--version`` are
fast; a command's module (and PyTorch with it) is imported only when that command runs.

Every way out of :func:`main` is an :class:`~vaekit.errors.ExitCode`: 0 ok, 1 a runtime failure, 2 bad input,
130 Ctrl-C; an error is exactly one line on stderr and never a traceback (``VAEKIT_DEBUG=1`` shows it).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from vaekit.errors import ExitCode, VaekitError, one_line, reason

if TYPE_CHECKING:
    from rich.console import Console

from vaekit.interfaces.cli.commands import ROOT_HELP as _HELP


class _LazyGroup(TyperGroup):
    """The root command: lists every command from the registry; imports a command's module only when needed."""

    def list_commands(self, ctx: Any) -> list[str]:
        from vaekit.interfaces.cli.commands import COMMANDS

        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        from vaekit.interfaces.cli import commands

        if cmd_name not in self.commands and cmd_name in commands.COMMANDS:
            commands.load(cmd_name)
            self.commands.update(typer.main.get_group(app).commands)
        return self.commands.get(cmd_name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        # The same page the console script prints before importing Typer (see vaekit.interfaces.cli.run).
        from vaekit.interfaces.cli.commands import root_help

        formatter.write(root_help())


app = typer.Typer(
    name="vaekit",
    help=_HELP,
    cls=_LazyGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from vaekit import __version__

        print(f"vaekit {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Print vaekit's version and exit.", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    """Load, inspect, encode, decode, compare and train the VAEs of latent diffusion models."""


# Rich consoles: results to stdout, messages and progress to stderr. Made on first use and replaced per call by
# main(), so importing this module does not import Rich.
def _console(stderr: bool) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        terminal = False
    # A pipe or a file gets full-width lines (no cut names or hashes); COLUMNS still wins when set.
    width = None if terminal or os.environ.get("COLUMNS") else 100_000
    return Console(file=stream, highlight=False, soft_wrap=True, width=width)


def __getattr__(name: str) -> Any:
    """``out`` and ``err``: the consoles, made on first use."""
    if name in ("out", "err"):
        console = _console(stderr=name == "err")
        globals()[name] = console
        return console
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _stderr() -> Console:
    console = globals().get("err")
    if console is None:
        console = globals()["err"] = _console(stderr=True)
    return console


# Notes and warnings for a stderr that is not a terminal (a log, a pipe, a script), held until the command
# succeeds: a failing command writes its one error line and nothing else. A terminal gets them at once.
_held: list[str] | None = None


def message(markup: str) -> None:
    """A note or warning (Rich markup) on stderr: at once on a terminal, else when the command succeeds."""
    console = _stderr()
    if _held is not None and not console.is_terminal:
        _held.append(markup)
    else:
        console.print(markup, soft_wrap=True)


def _release(succeeded: bool) -> None:
    global _held
    held, _held = _held, None
    if succeeded and held:
        console = _stderr()
        for markup in held:
            console.print(markup, soft_wrap=True)


def error_line(message: str, label: str = "error") -> None:
    """Print an error as exactly one line on stderr."""
    from rich.markup import escape

    prefix = f"[bold red]{label}:[/] " if label else ""
    _stderr().print(f"{prefix}{escape(one_line(message))}", soft_wrap=True)


@contextmanager
def _environment(env: Mapping[str, str] | None) -> Iterator[None]:
    if env is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _show_warning(text: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Library warnings (PyTorch, Pillow...) as one line on stderr instead of file:line plus source."""
    from rich.markup import escape

    line = reason(text if isinstance(text, Warning) else UserWarning(text), 300)
    message(f"[yellow]warning:[/] {escape(line)}")


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run the command line with ``argv`` (and optionally a replacement environment); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    with _environment(env), warnings.catch_warnings():
        # The consoles follow this call's streams (pytest's capture, a pipe, a terminal) and environment.
        for name in ("out", "err"):
            globals().pop(name, None)
        warnings.showwarning = _show_warning
        debug = os.environ.get("VAEKIT_DEBUG", "") not in ("", "0")
        global _held
        _held = []
        code = int(ExitCode.FAILURE)
        try:
            code = _run(args, debug)
            return code
        finally:
            _release(succeeded=code == 0)


def _run(args: list[str], debug: bool) -> int:
    """Run the command; every way out is an exit code (and at most one error line)."""
    from typer import _click  # Typer's own Click: its usage errors are the ones raised
    from typer.exceptions import Abort, Exit

    try:
        command = typer.main.get_command(app)
        # Click's own main() is bypassed: it turns Ctrl-C into a silent exit and prints usage errors on
        # several lines; here every way out is one of ours.
        with command.make_context("vaekit", args) as ctx:
            result = command.invoke(ctx)
        return int(result) if isinstance(result, int) and not isinstance(result, bool) else int(ExitCode.OK)
    except VaekitError as e:
        if debug:
            raise
        error_line(str(e), "" if e.exit_code == ExitCode.INTERRUPTED else "error")
        return int(e.exit_code)
    except Exit as e:
        return int(e.exit_code or 0)
    except _click.exceptions.NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx else "")
        return int(ExitCode.OK)
    except _click.exceptions.UsageError as e:  # a missing argument, an unknown option: one line, exit 2
        path = e.ctx.command_path if e.ctx else "vaekit"
        error_line(f"{e.format_message().rstrip('.')}; see `{path} --help`")
        return int(ExitCode.BAD_INPUT)
    except (Abort, KeyboardInterrupt):
        error_line("interrupted", "")
        return int(ExitCode.INTERRUPTED)
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else int(ExitCode.FAILURE))
    except OSError as e:  # an I/O failure no command caught (full disk, permissions): one line, exit 1
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        error_line(where + (e.strerror or reason(e)))
        return int(ExitCode.FAILURE)
    except MemoryError:
        error_line("out of memory; try --max-memory, --tiling exact or a smaller image")
        return int(ExitCode.FAILURE)
    except Exception as e:  # a bug: still one line, with how to see the traceback
        if debug:
            raise
        error_line(f"internal error: {type(e).__name__}: {reason(e)} (rerun with VAEKIT_DEBUG=1 for the traceback)")
        return int(ExitCode.FAILURE)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
