"""``vaenode db backup``: a consistent copy of the SQLite queue database while it is written."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from node.config import DatabaseSettings
from node.errors import BackupError
from node.queue import repo
from node.queue.backup import backup_sqlite
from node.queue.db import make_engine, make_session_factory
from node.queue.migrate import head_revision, upgrade
from node.queue.models import utcnow
from tests.helpers.records import mr_instance

VAENODE = Path(sys.executable).with_name("vaenode")


def _record(factory, n: int, start: int = 0) -> None:  # type: ignore[no-untyped-def]
    for i in range(start, start + n):
        with factory.begin() as s:
            repo.record_instance(s, mr_instance("1.2.826.9", f"1.2.826.9.{i}",
                                                utcnow() - timedelta(seconds=i)))


def test_backup_while_the_node_writes_is_consistent_and_complete(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    upgrade(url)
    engine = make_engine(DatabaseSettings(url=url))
    factory = make_session_factory(engine)
    _record(factory, 50)
    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "{url}"\n', encoding="utf-8")
    # A writer keeps committing series (as ingest does) during the backup.
    stop = threading.Event()
    written = [50]

    def write() -> None:
        while not stop.is_set():
            _record(factory, 1, start=written[0])
            written[0] += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        dest = tmp_path / "copy.db"
        proc = subprocess.run([str(VAENODE), "db", "backup", str(dest), "--config", str(config)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
    finally:
        stop.set()
        writer.join()
        engine.dispose()
    assert proc.returncode == 0, proc.stderr
    assert f"revision {head_revision()}" in proc.stdout
    assert written[0] > 50  # the writer really ran beside it
    with sqlite3.connect(dest) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        series = copy.execute("SELECT count(*) FROM series").fetchone()[0]
        instances = copy.execute("SELECT count(*) FROM instances").fetchone()[0]
    # A snapshot: every series it holds has its instance, and nothing written before it began
    # is missing.
    assert 50 <= series <= written[0] and instances == series
    assert f"{series} series" in proc.stdout
    assert not list(tmp_path.glob("*.partial"))
    # The copy is a queue database the node can open: its revision is the head.
    restored = tmp_path / "restored.toml"
    restored.write_text(f'[database]\nurl = "sqlite:///{dest}"\n', encoding="utf-8")
    check = subprocess.run([str(VAENODE), "db", "current", "--config", str(restored)],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert f"current: {head_revision()}" in check.stdout

    # Never over an existing file; nothing but SQLite.
    again = subprocess.run([str(VAENODE), "db", "backup", str(dest), "--config", str(config)],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert again.returncode == 1 and "never overwrites" in again.stderr
    with pytest.raises(BackupError, match="pg_dump"):
        backup_sqlite("postgresql://vaenode@127.0.0.1:1/queue", tmp_path / "pg.db")
    with pytest.raises(BackupError, match="no database"):
        backup_sqlite(f"sqlite:///{tmp_path / 'missing.db'}", tmp_path / "m.db")
    assert not (tmp_path / "pg.db").exists() and not (tmp_path / "m.db").exists()
