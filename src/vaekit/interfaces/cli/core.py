"""The Typer application, and ``main(argv, env)`` that runs it in-process with vaekit's exit codes."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from vaekit.errors import ExitCode, VaekitError

app = typer.Typer(
    name="vaekit",
    help="Load, inspect, encode, decode, compare and train the VAEs of latent diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Load, inspect, encode, decode, compare and train the VAEs of latent diffusion models."""


# Rich consoles: results to stdout, messages and progress to stderr. Replaced per call by main().
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


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


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run the command line with ``argv`` (and optionally a replacement environment); returns the exit code."""
    from vaekit.interfaces.cli import commands  # noqa: F401  (registers every command on ``app``)

    global out, err
    out = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    err = Console(file=sys.stderr, highlight=False, soft_wrap=True)
    args = list(sys.argv[1:] if argv is None else argv)
    with _environment(env):
        try:
            # standalone mode: click prints usage errors itself and exits 2; ours propagate as VaekitError.
            typer.main.get_command(app).main(args=args, prog_name="vaekit", standalone_mode=True)
        except VaekitError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}")
            return int(e.exit_code)
        except OSError as e:  # an I/O failure no command caught (full disk, permissions): one line, exit 1
            where = f"{e.filename}: " if e.filename else ""
            err.print(f"[bold red]error:[/] {escape(where + (e.strerror or str(e)))}")
            return int(ExitCode.FAILURE)
        except SystemExit as e:
            code = e.code
            return code if isinstance(code, int) else (0 if code is None else int(ExitCode.FAILURE))
        except KeyboardInterrupt:
            err.print("interrupted")
            return 130
    return int(ExitCode.OK)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
