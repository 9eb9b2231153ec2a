"""Import every command module so each registers its commands on the shared Typer ``app``."""

from vaekit.interfaces.cli import inspect_cmd  # noqa: F401
