"""The VAEs the server offers: the library's files (``vaekit.library``) plus the bundled default, by name only.

A request names a VAE; the name is looked up among the scanned entries (file stem, file name, path relative to the
library, or hash prefix) and never opened as a path, so no name reaches a file outside the library: ``../x`` and
absolute paths match nothing.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaekit.errors import BadInputError, VaekitError
from vaekit.library import LibraryEntry, describe_file, find_in_library, resolve_vae, scan


class UnknownVAEError(BadInputError):
    """A VAE name that is not in the library."""


@dataclass(frozen=True)
class CatalogEntry:
    """One VAE the server can load."""

    id: str  # what requests pass as ``vae``: the name, or the short hash when two files share a name
    entry: LibraryEntry
    bundled: bool = False

    @property
    def path(self) -> Path:
        """Where the weights are (never shown to clients)."""
        return Path(self.entry.path)

    @property
    def sha256(self) -> str:
        """SHA-256 of the weights file."""
        return self.entry.sha256

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description, without server paths."""
        e = self.entry
        return {
            "id": self.id,
            "name": e.name,
            "family": e.family,
            "family_certain": e.family_certain,
            "kind": e.kind,
            "latent_channels": e.latent_channels,
            "layout": e.layout,
            "dtype": e.dtype,
            "sha256": e.sha256,
            "short_hash": e.short_hash,
            "file_bytes": e.size,
            "bundled": self.bundled,
        }


class Catalog:
    """The library folder (``home``; None: the library's configured folder) and the bundled VAE."""

    def __init__(self, home: Path | None = None, include_bundled: bool = True) -> None:
        if home is not None and not Path(home).is_dir():
            raise BadInputError(f"{home}: the VAE library folder does not exist")
        self.home = Path(home) if home is not None else None
        self.include_bundled = include_bundled
        self.warnings: list[str] = []
        self._lock = threading.Lock()
        self._entries: list[CatalogEntry] | None = None
        self._bundled: tuple[Path, int, int, LibraryEntry] | None = None

    def _bundled_entry(self) -> LibraryEntry | None:
        from vaekit import weights  # looked up at call time: the bundled file may appear after start

        path = weights.DEFAULT_VAE_PATH
        if not self.include_bundled or not path.is_file():
            return None
        st = path.stat()
        if self._bundled is None or self._bundled[:3] != (path, st.st_size, st.st_mtime_ns):
            self._bundled = (path, st.st_size, st.st_mtime_ns, describe_file(path))
        return self._bundled[3]

    def refresh(self) -> list[CatalogEntry]:
        """Scan again (the library's own cache makes an unchanged folder cheap) and return the entries."""
        with self._lock:
            result = scan(home=self.home)
            bundled = self._bundled_entry()
            found = ([(bundled, True)] if bundled else []) + [(e, False) for e in result.entries]
            names = [e.name for e, _ in found]
            self._entries = [CatalogEntry(e.name if names.count(e.name) == 1 else e.short_hash, e, b) for e, b in found]
            warnings = [w for w in result.warnings if "no such VAE library folder" not in w or self.home]
            for root in result.folders.vae_dirs:  # clients see names inside the library, not server paths
                warnings = [w.replace(f"{root}{os.sep}", "").replace(str(root), "library") for w in warnings]
            self.warnings = warnings
            return list(self._entries)

    def entries(self) -> list[CatalogEntry]:
        """The entries of the last scan (scanning the first time)."""
        return list(self._entries) if self._entries is not None else self.refresh()

    def resolve(self, name: str) -> CatalogEntry:
        """The entry ``name`` designates (id, file stem or name, path inside the library, or hash prefix)."""
        if not name or not name.strip():
            raise UnknownVAEError("empty VAE name")
        for attempt in range(2):  # a file added since the last scan is found by scanning again
            entries = self.entries() if attempt == 0 else self.refresh()
            by_id = [c for c in entries if c.id == name]
            if by_id:
                return by_id[0]
            try:
                hit = find_in_library(name, [c.entry for c in entries])
            except BadInputError as e:
                if "matches" in str(e):  # ambiguous; say so without the server's paths
                    same = [c.id for c in entries if c.entry.name == name or c.entry.sha256.startswith(name.lower())]
                    raise BadInputError(f"VAE name {name!r} is ambiguous; use one of: {', '.join(same)}") from None
                continue
            return next(c for c in entries if c.entry is hit)
        known = ", ".join(c.id for c in self.entries()) or "none"
        raise UnknownVAEError(f"unknown VAE {name!r}; the library has: {known}")

    def default_id(self) -> str | None:
        """The VAE used when a request names none: the library's selection, else the bundled one, else the first."""
        entries = self.entries()
        try:
            chosen = resolve_vae(None)
        except VaekitError:  # a broken selection or no bundled file: fall back to the first entry
            chosen = None
        if chosen is not None and chosen.path is not None:
            real = chosen.path.resolve()
            for c in entries:
                if c.path.resolve() == real:
                    return c.id
        return entries[0].id if entries else None
