"""``vaenode queue retry SERIES_UID``: a finished series is scored again and re-reported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.queue.models import Report, Series
from node.queue.states import SeriesState
from node.worker.jobs import Worker
from node.worker.score import Outcome
from tests.helpers.node import to_toml
from tests.worker.conftest import SIEMENS_MAGNITUDE, series_files, store_and_queue

VAENODE = str(Path(sys.executable).with_name("vaenode"))


def retry(config: Path, uid: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VAENODE, "queue", "retry", uid, "--config", str(config)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_retry_rescores_and_supersedes(
    tmp_path: Path, worker_settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(to_toml({"storage": {"dir": str(worker_settings.storage.dir)},
                               "database": {"url": worker_settings.database.url}}))
    files = series_files(SIEMENS_MAGNITUDE)
    series_id = store_and_queue(session_factory, worker_settings, files)
    with session_factory() as session:
        uid = session.get(Series, series_id).series_instance_uid  # type: ignore[union-attr]

    refused = retry(config, uid)  # still queued: nothing to retry
    assert refused.returncode == 1 and "is queued" in refused.stderr
    worker = Worker(worker_settings, session_factory)
    assert worker.run_until_idle() == [Outcome.DONE]

    done = retry(config, uid)
    assert done.returncode == 0, done.stderr
    assert "queued to be scored again" in done.stdout
    with session_factory() as session:
        series = session.get(Series, series_id)
        assert series is not None and series.status is SeriesState.QUEUED
        assert series.attempts == 0
    assert worker.run_until_idle() == [Outcome.DONE]
    with session_factory() as session:
        srs = session.execute(select(Report).where(Report.series_id == series_id,
                                                   Report.kind == "SR").order_by(Report.id)
                              ).scalars().all()
    assert [r.superseded for r in srs] == [True, False]

    unknown = retry(config, "1.2.3.4.5")
    assert unknown.returncode == 1 and "no series 1.2.3.4.5" in unknown.stderr
