"""The browser workbench of ``vaekit serve``: one hand-written page (HTML, CSS, vanilla JS) served as package data."""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"


def static_dir() -> Path:
    """Folder of the UI's files (index.html, app.js, style.css)."""
    return STATIC_DIR
