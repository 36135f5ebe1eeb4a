"""A consistent copy of the SQLite queue database, taken while the node runs.

Copying ``queue.db`` with ``cp`` while the node writes can give a torn copy: in WAL mode the
latest transactions live in ``queue.db-wal`` until a checkpoint, and a file read mid-write
mixes old and new pages. ``VACUUM INTO`` reads the database inside one read transaction (in
WAL mode a reader neither blocks the node's writers nor waits for them) and writes a compact,
self-contained copy, which is checked (``PRAGMA integrity_check``) before it is renamed into
place. PostgreSQL has its own online tool, ``pg_dump``.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from node.errors import BackupError


@dataclass(frozen=True)
class BackupResult:
    """What was written: the copy, its size, its schema revision and how many series it holds."""

    path: Path
    size_bytes: int
    revision: str | None
    series: int


def backup_sqlite(url: str, dest: Path, busy_timeout_ms: int = 30_000) -> BackupResult:
    """Write a consistent, checked copy of the SQLite database at ``url`` to ``dest``.

    Raises:
        BackupError: not an SQLite file database, no database there, ``dest`` exists, or the
            copy failed its check (then nothing is left at ``dest``).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        raise BackupError(f"vaenode db backup copies SQLite databases; this one is "
                          f"{parsed.get_backend_name()}: use pg_dump")
    if parsed.database in (None, "", ":memory:"):
        raise BackupError("an in-memory database has nothing to back up")
    source = Path(parsed.database)
    if not source.is_file():
        raise BackupError(f"no database at {source}")
    if dest.exists():
        raise BackupError(f"{dest} exists; a backup never overwrites a file")
    if not dest.parent.is_dir():
        raise BackupError(f"folder {dest.parent} does not exist")
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)  # left by an interrupted backup
    try:
        with _connect(source, busy_timeout_ms) as con:
            con.execute("VACUUM INTO ?", (str(partial),))
        with _connect(partial, busy_timeout_ms) as copy:
            check = copy.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                raise BackupError(f"the copy failed its integrity check: {check}")
            revision = _scalar(copy, "SELECT version_num FROM alembic_version")
            series = _scalar(copy, "SELECT count(*) FROM series")
        with partial.open("rb+") as fh:
            os.fsync(fh.fileno())
        partial.rename(dest)
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot copy {source}: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return BackupResult(dest, dest.stat().st_size, None if revision is None else str(revision),
                        int(series or 0))


def _connect(path: Path, busy_timeout_ms: int) -> closing[sqlite3.Connection]:
    """A connection closed on leaving the ``with`` (sqlite3's own context only commits)."""
    return closing(sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None))


def _scalar(con: sqlite3.Connection, sql: str) -> Any:
    try:
        row = con.execute(sql).fetchone()
    except sqlite3.OperationalError:  # no such table: a database never migrated
        return None
    return row[0] if row else None
