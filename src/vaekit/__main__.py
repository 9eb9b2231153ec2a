"""``python -m vaekit``."""

from vaekit.interfaces.cli import run

run()
