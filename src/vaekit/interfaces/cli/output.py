"""Shared output helpers for commands: JSON or Rich tables."""

from __future__ import annotations

import json
from typing import Any

from rich.table import Table

from vaekit.interfaces.cli import core as cli


def emit_json(data: Any) -> None:
    """Print ``data`` as JSON on stdout (no Rich markup or wrapping)."""
    cli.out.print_json(json.dumps(data, default=str))


def kv_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    """A two-column key/value table."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, str(value))
    return table
