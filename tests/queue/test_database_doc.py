"""migrations/README.md, the admins' guide to the queue database, matches the newest schema:
every table and column is listed (and nothing that is not there), and every query runs."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from sqlalchemy import create_engine, inspect

from node.queue.migrate import upgrade

DOC = Path(__file__).resolve().parents[2] / "migrations" / "README.md"


def _documented() -> dict[str, list[str]]:
    tables: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if m := re.match(r"^### `(\w+)`$", line):
            current = tables.setdefault(m.group(1), [])
        elif line.startswith("## "):
            current = None
        elif current is not None and (m := re.match(r"^\| `(\w+)` \|", line)):
            current.append(m.group(1))
    return tables


def test_every_table_and_column_of_the_newest_revision_is_documented(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    upgrade(url)
    engine = create_engine(url)
    try:
        schema = {t: [c["name"] for c in inspect(engine).get_columns(t)]
                  for t in inspect(engine).get_table_names()}
    finally:
        engine.dispose()
    documented = _documented()
    assert sorted(documented) == sorted(schema)
    for table, columns in schema.items():
        assert sorted(documented[table]) == sorted(columns), table


def test_every_query_runs_on_the_newest_revision(tmp_path: Path) -> None:
    upgrade(f"sqlite:///{tmp_path / 'q.db'}")
    queries = re.findall(r"```sql\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(queries) >= 8
    with sqlite3.connect(tmp_path / "q.db") as db:
        for sql in queries:
            db.execute(sql).fetchall()
