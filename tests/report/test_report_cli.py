"""``vaenode queue show`` gives the delivery state; ``vaenode queue resend`` re-delivers."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.queue.models import OutboxEntry
from node.queue.states import DeliveryState
from node.report.service import report_series
from tests.helpers.node import to_toml
from tests.helpers.reports import add_series, make_verdict

VAENODE = str(Path(sys.executable).with_name("vaenode"))


def _vaenode(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VAENODE, "queue", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_show_and_resend(
    tmp_path: Path,
    session_factory: sessionmaker[Session],
    settings_for: Callable[..., Settings],
    source_files: list[Path],
    sources: list[Dataset],
) -> None:
    settings = settings_for(
        [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}]
    )
    config = tmp_path / "node.toml"
    config.write_text(
        to_toml({"storage": {"dir": str(settings.storage.dir)},
                 "database": {"url": settings.database.url}}),
        encoding="utf-8",
    )
    uid = add_series(session_factory, settings.storage.dir, source_files)
    with session_factory.begin() as session:
        report_series(session, settings, make_verdict(sources, {1, 2, 3}))
    with session_factory.begin() as session:  # as if the job had given up on both
        session.execute(update(OutboxEntry).values(
            state=DeliveryState.FAILED, attempts=10, last_error="cannot connect to PACS"))

    shown = _vaenode(config, "show", uid, "--json")
    assert shown.returncode == 0, shown.stderr
    deliveries = json.loads(shown.stdout)["deliveries"]
    assert [(d["kind"], d["state"], d["attempts"], d["destination"]) for d in deliveries] == [
        ("SR", "failed", 10, "pacs"), ("KOS", "failed", 10, "pacs")]
    assert deliveries[0]["last_error"] == "cannot connect to PACS"
    text = _vaenode(config, "show", uid)
    assert "failed" in text.stdout and "last error: cannot connect to PACS" in text.stdout

    resent = _vaenode(config, "resend", uid)
    assert resent.returncode == 0, resent.stderr
    assert "2 deliveries" in resent.stdout
    with session_factory() as session:
        rows = session.execute(select(OutboxEntry.state, OutboxEntry.attempts)).all()
    assert rows == [(DeliveryState.PENDING, 0)] * 2

    unknown = _vaenode(config, "resend", "1.2.3.4")
    assert unknown.returncode == 1
    assert "no report to resend" in unknown.stderr
