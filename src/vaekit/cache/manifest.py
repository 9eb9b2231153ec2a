"""The cache manifest: one SQLite database with a row per image, a row per shard, and the cache's settings.

Every image row carries its provenance: content hash, the VAE's hash, the precision and stored dtype, the
preprocessing fingerprint, the geometry (original size, crop box) and where its latents live (shard, index).
A shard and the rows that point into it are inserted in one transaction, after the shard file is complete on
disk, so the manifest never names a half-written shard and a crash at any point loses at most uncommitted work.
"""

from __future__ import annotations

import contextlib
import json
import operator
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from vaekit.errors import BadInputError

MANIFEST_NAME = "manifest.sqlite"
SCHEMA_VERSION = 1
# Settings that must match for latents to be interchangeable; anything else is informational.
BINDING_SETTINGS = ("vae_sha256", "precision", "store_dtype", "preprocess_fingerprint")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (
    name TEXT PRIMARY KEY, count INTEGER NOT NULL, bytes INTEGER NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    path TEXT PRIMARY KEY,
    content_sha256 TEXT NOT NULL,
    file_size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error TEXT,
    shard TEXT REFERENCES shards(name),
    idx INTEGER,
    original_w INTEGER, original_h INTEGER, resized_w INTEGER, resized_h INTEGER,
    crop_left INTEGER, crop_top INTEGER, crop_right INTEGER, crop_bottom INTEGER,
    flipped INTEGER NOT NULL DEFAULT 0,
    vae_sha256 TEXT NOT NULL,
    precision TEXT NOT NULL,
    store_dtype TEXT NOT NULL,
    preprocess TEXT NOT NULL,
    updated REAL NOT NULL,
    CHECK ((status = 'ok') = (shard IS NOT NULL AND idx IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS images_shard ON images(shard);
CREATE INDEX IF NOT EXISTS images_hash ON images(content_sha256);
"""


@dataclass
class ImageRow:
    """One image of the cache: its file, its provenance, its geometry, and where its latents are."""

    path: str
    content_sha256: str
    file_size: int
    mtime_ns: int
    status: str  # "ok" | "failed"
    vae_sha256: str
    precision: str
    store_dtype: str
    preprocess: str  # fingerprint of the preprocessing parameters
    error: str | None = None
    shard: str | None = None
    idx: int | None = None
    original_w: int | None = None
    original_h: int | None = None
    resized_w: int | None = None
    resized_h: int | None = None
    crop_left: int | None = None
    crop_top: int | None = None
    crop_right: int | None = None
    crop_bottom: int | None = None
    flipped: bool = False
    updated: float = 0.0

    @property
    def crop_box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in the resized image."""
        return (self.crop_left or 0, self.crop_top or 0, self.crop_right or 0, self.crop_bottom or 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every column."""
        return asdict(self)


_COLUMNS = tuple(f.name for f in fields(ImageRow))
_values = operator.attrgetter(*_COLUMNS)  # an ImageRow as the tuple of its columns (commits do this per row)


def _row(values: sqlite3.Row) -> ImageRow:
    data = dict(values)
    data["flipped"] = bool(data["flipped"])
    return ImageRow(**data)


class Manifest:
    """Read and change a cache's manifest. Writers hold the cache lock (see :mod:`vaekit.cache.build`)."""

    def __init__(self, cache_dir: Path, readonly: bool = False) -> None:
        self.readonly = readonly
        self.path = Path(cache_dir) / MANIFEST_NAME
        if readonly:
            if not self.path.is_file():
                raise BadInputError(f"{cache_dir}: not a latent cache (no {MANIFEST_NAME})")
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, isolation_level=None)
            # WAL: readers (training jobs, the test that watches a run) see the last commit while a run writes.
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA busy_timeout=30000")
        try:
            if not readonly:
                self.conn.executescript(_SCHEMA)
            version = self.get_meta("schema_version")
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise BadInputError(f"{self.path}: not a readable manifest ({e})") from None
        if version is None and not readonly:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif version is not None and int(version) > SCHEMA_VERSION:
            raise BadInputError(f"{self.path}: made by a newer vaekit (schema {version}); upgrade vaekit")

    def close(self) -> None:
        """Close the database (a writer leaves it as one self-contained file, readable from read-only media)."""
        if not self.readonly:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("PRAGMA journal_mode=DELETE")
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write transaction (all or nothing, even if the process is killed)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # --- settings --------------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        """A value of the meta table."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Set a value of the meta table."""
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def settings(self) -> dict[str, Any] | None:
        """The settings the cache was built with (VAE, precision, preprocessing), or None for a new cache."""
        text = self.get_meta("settings")
        return None if text is None else json.loads(text)

    def set_settings(self, settings: dict[str, Any]) -> None:
        """Record the cache's settings."""
        self.set_meta("settings", json.dumps(settings, sort_keys=True))

    def reset(self, settings: dict[str, Any]) -> list[str]:
        """Forget every image and shard and take new settings, in one transaction; returns the shard names."""
        with self.transaction() as c:
            names = [r[0] for r in c.execute("SELECT name FROM shards")]
            c.execute("DELETE FROM images")
            c.execute("DELETE FROM shards")
            c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('settings', ?)", (json.dumps(settings),))
        return names

    # --- reading ---------------------------------------------------------------------------------------------
    def rows(self, status: str | None = None) -> list[ImageRow]:
        """Image rows (all, or those with ``status``), ordered by path."""
        if status is None:
            cur = self.conn.execute("SELECT * FROM images ORDER BY path")
        else:
            cur = self.conn.execute("SELECT * FROM images WHERE status = ? ORDER BY path", (status,))
        return [_row(r) for r in cur]

    def shard_names(self) -> set[str]:
        """Names of the committed shards."""
        return {r[0] for r in self.conn.execute("SELECT name FROM shards")}

    def counts(self) -> dict[str, int]:
        """Rows per status and the number of shards."""
        out = {s: n for s, n in self.conn.execute("SELECT status, COUNT(*) FROM images GROUP BY status")}
        out["shards"] = self.conn.execute("SELECT COUNT(*) FROM shards").fetchone()[0]
        return out

    # --- writing ---------------------------------------------------------------------------------------------
    def _upsert(self, c: sqlite3.Connection, rows: Iterable[ImageRow]) -> None:
        placeholders = ", ".join("?" for _ in _COLUMNS)
        c.executemany(
            f"INSERT OR REPLACE INTO images ({', '.join(_COLUMNS)}) VALUES ({placeholders})",
            [_values(r) for r in rows],
        )

    def _shards_of(self, c: sqlite3.Connection, paths: list[str]) -> set[str]:
        """Shards the rows of ``paths`` point into now: the only ones a change of those rows can leave unused."""
        found: set[str] = set()
        for i in range(0, len(paths), 500):
            part = paths[i : i + 500]
            marks = ", ".join("?" for _ in part)
            sql = f"SELECT DISTINCT shard FROM images WHERE shard IS NOT NULL AND path IN ({marks})"
            found.update(r[0] for r in c.execute(sql, part))
        return found

    def _collect_garbage(self, c: sqlite3.Connection, candidates: set[str] | None = None) -> list[str]:
        """Delete shard rows no image points into any more, among ``candidates`` (an index lookup each) or, with
        None, all of them (a scan of every row); returns their names (files to delete)."""
        if candidates is None:
            used = "SELECT shard FROM images WHERE shard IS NOT NULL"
            names = [r[0] for r in c.execute(f"SELECT name FROM shards WHERE name NOT IN ({used})")]
        else:
            unused = "SELECT 1 FROM images WHERE shard = ? LIMIT 1"
            names = [n for n in sorted(candidates) if c.execute(unused, (n,)).fetchone() is None]
        c.executemany("DELETE FROM shards WHERE name = ?", [(n,) for n in names])
        return names

    def collect_garbage(self) -> list[str]:
        """Forget every shard no image points into (a full scan; commits check only the shards they touch)."""
        with self.transaction() as c:
            return self._collect_garbage(c)

    def commit_shard(self, name: str, count: int, nbytes: int, rows: list[ImageRow]) -> list[str]:
        """Register a fully written shard and its image rows at once; returns shards left unreferenced."""
        return self.commit_shards([(name, count, nbytes, rows)])

    def commit_shards(self, shards: list[tuple[str, int, int, list[ImageRow]]]) -> list[str]:
        """Register several fully written shards ``(name, count, bytes, rows)`` and their rows in one transaction
        (one fsync for all); returns shards left unreferenced."""
        now = time.time()
        with self.transaction() as c:
            touched: set[str] = set()
            for name, count, nbytes, rows in shards:
                for r in rows:
                    r.updated = now
                c.execute("INSERT INTO shards VALUES (?, ?, ?, ?)", (name, count, nbytes, now))
                touched |= self._shards_of(c, [r.path for r in rows])
                self._upsert(c, rows)
            return self._collect_garbage(c, touched)

    def put_rows(self, rows: list[ImageRow]) -> list[str]:
        """Insert or replace rows that need no new shard (failures, reused latents, refreshed file stats)."""
        if not rows:
            return []
        now = time.time()
        for r in rows:
            r.updated = now
        with self.transaction() as c:
            touched = self._shards_of(c, [r.path for r in rows])
            self._upsert(c, rows)
            return self._collect_garbage(c, touched)

    def remove(self, paths: list[str]) -> list[str]:
        """Delete the rows of ``paths``; returns shards left unreferenced."""
        with self.transaction() as c:
            touched = self._shards_of(c, paths)
            c.executemany("DELETE FROM images WHERE path = ?", [(p,) for p in paths])
            return self._collect_garbage(c, touched)

    def drop_shards(self, names: set[str]) -> int:
        """Forget shards (e.g. whose files vanished) and the rows in them; returns the number of rows dropped."""
        if not names:
            return 0
        with self.transaction() as c:
            dropped = 0
            for name in names:
                dropped += c.execute("DELETE FROM images WHERE shard = ?", (name,)).rowcount
                c.execute("DELETE FROM shards WHERE name = ?", (name,))
        return dropped
