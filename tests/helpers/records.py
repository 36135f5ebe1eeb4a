"""Received-instance records for queue tests: one MR instance of a series
(:func:`mr_instance`), and a sequence covering every branch of ``repo.record_instance`` with
the rows it leaves, to check that its driver-SQL fast path writes what its SQLAlchemy path
writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from node.queue import repo
from node.queue.models import Series
from node.queue.states import SeriesState

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def mr_instance(study: str, series: str, received_at: datetime,
                **kw: Any) -> repo.InstanceRecord:
    """The first MR image (``SERIES.1``) of a series, a brain T1 sent by ``MR1``; ``kw``
    overrides any field."""
    values: dict[str, Any] = {
        "study_instance_uid": study, "series_instance_uid": series,
        "sop_instance_uid": f"{series}.1", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1", "path": f"a/{series}/1.dcm",
        "size_bytes": 10, "instance_number": 1, "modality": "MR", "series_description": "T1",
        "body_part": "BRAIN", "calling_aet": "MR1", "peer_address": "10.0.0.5:1000",
        "received_at": received_at,
    }
    values.update(kw)
    return repo.InstanceRecord(**values)


def _rec(series: str, sop: str, step: int, **kw: Any) -> repo.InstanceRecord:
    values: dict[str, Any] = {
        "study_instance_uid": "1.2.3", "series_instance_uid": series, "sop_instance_uid": sop,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "path": f"1.2.3/{series}/{sop}.dcm", "size_bytes": 1000 + step, "instance_number": step,
        "modality": "CT", "series_description": "desc", "body_part": "HEAD",
        "calling_aet": "SCU", "peer_address": "127.0.0.1:1",
        "received_at": T0 + timedelta(seconds=step, microseconds=step * 7),
    }
    values.update(kw)
    return repo.InstanceRecord(**values)


def record_scenario(factory: sessionmaker[Session]) -> tuple[list[Any], dict[str, list[Any]]]:
    """Record the sequence; return the results and every row of series, instances and
    series_events as the driver returns them (stored values, no type conversion)."""
    a, b = "1.2.3.10", "1.2.3.20"
    steps: list[Any] = [
        _rec(a, f"{a}.1", 1),  # new series
        _rec(a, f"{a}.2", 2, instance_number=None, calling_aet=None),  # new instance
        _rec(a, f"{a}.1", 3),  # duplicate, same path
        _rec(a, f"{a}.2", 4, path="elsewhere/2.dcm"),  # duplicate, new path: stale path
        _rec(b, f"{b}.1", 5),  # another new series
        _rec(b, f"{a}.1", 6),  # the instance moves to the other series
        "done",  # series a is scored
        _rec(a, f"{a}.3", 7),  # reopens series a
        _rec(a, f"{a}.4", 8),  # and goes on receiving
    ]
    results = []
    for step in steps:
        with factory.begin() as session:
            if step == "done":
                session.execute(update(Series).where(Series.series_instance_uid == a)
                                .values(status=SeriesState.DONE, status_reason="scored"))
            else:
                results.append(repo.record_instance(session, step))
    rows = {}
    with factory() as session:
        conn = session.connection()
        for table in ("series", "instances", "series_events"):
            rows[table] = [tuple(r) for r in conn.exec_driver_sql(
                f"SELECT * FROM {table} ORDER BY id")]
    return results, rows


def driver_path_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``record_instance`` use its SQLAlchemy statements only."""
    monkeypatch.setattr(repo._DriverSql, "for_dialect", staticmethod(lambda dialect: None))


def count_driver_path(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the instances recorded by the driver-SQL path (list of one counter)."""
    used = [0]
    real = repo._record_receiving

    def counting(*args: Any) -> Any:
        done = real(*args)
        used[0] += done is not None
        return done

    monkeypatch.setattr(repo, "_record_receiving", counting)
    return used
