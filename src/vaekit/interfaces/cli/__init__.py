"""The ``vaekit`` command line (Typer + Rich). ``main(argv)`` runs it in-process."""

from vaekit.interfaces.cli.core import app, main, run

__all__ = ["app", "main", "run"]
