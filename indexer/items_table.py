"""The SQLite item table of an index: its schema, the writes of a version being made, and
the reads the writers and filters need.

One row per item (key, source, label, hash, size, the user's metadata...); ids are the
FAISS ids. The writes change the copy of a version that :func:`indexer.versions.new_version`
publishes; :class:`indexer.store.IndexStore` serves the reads of a published version.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

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


def set_file_stats(db: sqlite3.Connection, stats: Mapping[int, tuple[int, int]]) -> None:
    """Record (size, mtime_ns) of items whose file was found unchanged by its content (sync)."""
    db.executemany("UPDATE items SET file_size = ?, mtime_ns = ? WHERE id = ?", [(*st, i) for i, st in stats.items()])


def delete_items(db: sqlite3.Connection, ids: Sequence[int]) -> None:
    db.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in ids])


def ids_with_label(db: sqlite3.Connection, label: str) -> np.ndarray:
    """Ids of the items with this label name (an unknown label: none)."""
    rows = db.execute("SELECT id FROM items WHERE label_name = ?", (label,))
    return np.fromiter((r[0] for r in rows), dtype=np.int64)


def stored_files(path: Path, source: str) -> tuple[dict[str, tuple], dict[str, tuple[int, int]]]:
    """Of the folder ``source`` in the table at ``path`` (read-only): key -> (id, size,
    mtime_ns, sha256) of its items, and key -> (size, mtime_ns) of its unreadable files."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        have = {row[1] for row in db.execute("PRAGMA table_info(items)")}
        stat_cols = "file_size, mtime_ns" if "mtime_ns" in have else "NULL, NULL"  # before sync existed
        sql = f"SELECT key, id, {stat_cols}, sha256 FROM items WHERE source = ?"
        items = {r[0]: tuple(r[1:]) for r in db.execute(sql, (source,))}
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        sql = "SELECT key, file_size, mtime_ns FROM skipped WHERE source = ?"
        skipped = {r[0]: (r[1], r[2]) for r in db.execute(sql, (source,))} if "skipped" in tables else {}
        return items, skipped
    finally:
        db.close()
