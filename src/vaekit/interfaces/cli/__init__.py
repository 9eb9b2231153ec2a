"""The ``vaekit`` command line (Typer + Rich). ``main(argv)`` runs it in-process.

Importing this package is light: ``run()`` answers ``vaekit --help`` and ``vaekit --version`` before Typer, Rich
or PyTorch is imported (start-up under 0.5 s, see ``benchmarks/bench_startup.py``); everything else goes
through :func:`vaekit.interfaces.cli.core.main`.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing's (see vaekit/__init__.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["app", "main", "run"]


def run() -> None:
    """Console-script entry point."""
    args = sys.argv[1:]
    if args == ["--version"]:
        from vaekit import __version__

        print(f"vaekit {__version__}")
        sys.exit(0)
    if args in ([], ["--help"]):
        from vaekit.interfaces.cli.commands import root_help

        sys.stdout.write(root_help())
        sys.exit(0)
    from vaekit.interfaces.cli.core import main

    sys.exit(main())


def __getattr__(name: str) -> Any:
    """``app`` and ``main`` come from :mod:`vaekit.interfaces.cli.core` (imported on first use)."""
    if name in ("app", "main"):
        from vaekit.interfaces.cli import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
