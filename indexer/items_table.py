"""The SQLite item table of an index: its schema, and the writes of a version being made.

One row per item (key, source, label, hash, size, the user's metadata...); ids are the
FAISS ids. Reading is :class:`indexer.store.IndexStore`'s job; these helpers write the copy
of a version that :func:`indexer.versions.new_version` publishes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,          -- path or archive member inside the source
    source TEXT NOT NULL,       -- dataset spec, or the file path for images added later
    label INTEGER NOT NULL,     -- -1 when unknown
    label_name TEXT,
    split TEXT,
    sha256 TEXT NOT NULL,
    width INTEGER,
    height INTEGER,
    image BLOB,                 -- encoded bytes when the source cannot serve single files fast
    file_size INTEGER,          -- size and mtime of the source file when indexed (sync compares them)
    mtime_ns INTEGER,
    added TEXT,                 -- when the item was added (ISO 8601, UTC)
    meta TEXT                   -- the user's JSON metadata object
);
CREATE INDEX items_sha256 ON items(sha256);
"""
# Files of the folder that could not be read as images, with the stat they had: a sync
# leaves them alone until they change, instead of trying them again every time.
_SKIPPED = """
CREATE TABLE IF NOT EXISTS skipped (
    key TEXT NOT NULL, source TEXT NOT NULL, file_size INTEGER, mtime_ns INTEGER, reason TEXT,
    PRIMARY KEY (source, key)
);
"""
COLUMNS = ("id", "key", "source", "label", "label_name", "split", "sha256", "width", "height", "image",
           "file_size", "mtime_ns", "added", "meta")  # fmt: skip
_ADDED_LATER = {"file_size": "INTEGER", "mtime_ns": "INTEGER", "added": "TEXT", "meta": "TEXT"}


def create_items_db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA + _SKIPPED)
    return db


def insert_items(db: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """rows: the first ``len(row)`` of COLUMNS (id, key, source, label, ... image, file_size, ...)."""
    for n in sorted({len(r) for r in rows}):
        cols = ", ".join(COLUMNS[:n])
        db.executemany(f"INSERT INTO items ({cols}) VALUES ({','.join('?' * n)})", [r for r in rows if len(r) == n])


def upgrade_items_table(db: sqlite3.Connection) -> None:
    """Add the columns of later versions to a table written by an earlier one (a copy being written)."""
    have = {row[1] for row in db.execute("PRAGMA table_info(items)")}
    for name, kind in _ADDED_LATER.items():
        if name not in have:
            db.execute(f"ALTER TABLE items ADD COLUMN {name} {kind}")
    db.executescript(_SKIPPED)


def set_skipped(
    db: sqlite3.Connection, source: str, rows: Sequence[tuple[str, int, int, str]], drop: Sequence[str]
) -> None:
    """Record unreadable files (key, size, mtime_ns, reason) of ``source``; forget the keys in ``drop``."""
    db.executemany("DELETE FROM skipped WHERE source = ? AND key = ?", [(source, k) for k in drop])
    db.executemany("INSERT OR REPLACE INTO skipped VALUES (?, ?, ?, ?, ?)", [(k, source, *rest) for k, *rest in rows])
