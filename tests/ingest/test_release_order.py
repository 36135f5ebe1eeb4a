"""A sender's release stays a release whichever of pynetdicom's threads reports first.

pynetdicom's association thread answers the peer's A-RELEASE-RQ, then fires EVT_RELEASED; its
DUL thread fires EVT_CONN_CLOSE when the peer closes the socket on that answer, as storescu
does. Under load the close came first now and then: the association was recorded as "connection
closed", its series missed the completion on release and waited the idle time (CI run of
2026-12-05, tests/queue/test_postgres.py). Here the association thread is held after its answer
(a logging handler on pynetdicom's own "Association Released" line), so the close always comes
first, with a real storescu and the node's real SCP.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import _config
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import DicomSettings
from node.ingest.scp import Scp
from node.ingest.store import Store
from node.queue.models import Association, Series
from tests.helpers import dcmtk
from tests.helpers.node import free_port
from tests.helpers.synthetic import write_ct_series

HOLD_S = 1.0


class _HoldAfterRelease(logging.Handler):
    """Holds pynetdicom's association thread between its A-RELEASE-RP and EVT_RELEASED."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.held = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "Association Released":
            self.held.set()
            threading.Event().wait(HOLD_S)


@pytest.fixture
def held() -> Iterator[_HoldAfterRelease]:
    logger = logging.getLogger("pynetdicom.association")
    handler, level = _HoldAfterRelease(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_a_release_answered_then_closed_is_recorded_as_released(
        tmp_path: Path, store: Store, session_factory: sessionmaker[Session],
        held: _HoldAfterRelease, monkeypatch: pytest.MonkeyPatch) -> None:
    # The SCP sets pynetdicom's process-wide settings (any storage SOP class accepted, its own
    # UID check), as the node's own process wants; here they are put back afterwards, or
    # the test SCPs that later tests start in this process would accept what they refuse.
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE",
                        _config.UNRESTRICTED_STORAGE_SERVICE)
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", _config.LOG_HANDLER_LEVEL)
    monkeypatch.setitem(_config.VALIDATORS, "UI", _config.VALIDATORS["UI"])
    scp = Scp(DicomSettings(bind_address="127.0.0.1", port=free_port()), store, session_factory)
    _, port = scp.start()
    try:
        sent = dcmtk.storescu(port, write_ct_series(tmp_path / "s", 3))
        assert sent.returncode == 0, sent.stderr
        assert held.held.wait(10), "pynetdicom did not log its release"
        threading.Event().wait(HOLD_S + 1.0)  # EVT_RELEASED, when it comes, finds it ended
    finally:
        scp.stop(grace_s=5)
    with session_factory() as s:
        results = s.execute(select(Association.result)).scalars().all()
        series = s.execute(select(Series)).scalar_one()
    assert results == ["released"]
    assert (series.released_instances, series.released_at is not None) == (3, True)
