"""A real HTTP endpoint on loopback that records the alert messages posted to it, and a scored
series whose alerts are enqueued as the worker does."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.alerts import outbox
from node.config import AlertSettings
from node.queue import repo
from node.queue.models import Series, utcnow
from tests.helpers.reports import make_verdict
from tests.helpers.synthetic import write_ct_series


class AlertReceiver:
    """``url`` takes POSTs of JSON; ``messages`` holds them in order. ``fail_next`` requests
    are answered 500 first (a webhook having a bad moment)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.fail_next = 0
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests += 1
                if receiver.fail_next > 0:
                    receiver.fail_next -= 1
                    self.send_response(500)
                    self.end_headers()
                    return
                receiver.messages.append({"content_type": self.headers.get("Content-Type"),
                                          "authorization": self.headers.get("Authorization"),
                                          **json.loads(body)})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def scored_series(factory: sessionmaker[Session], tmp_path: Path, flagged: set[int],
                  settings: AlertSettings, station: str | None = None) -> tuple[str, int]:
    """A stored series of 6 images and a verdict on it, alerts enqueued as the worker does."""
    sources = [pydicom.dcmread(p) for p in write_ct_series(tmp_path / "src", 6)]
    for d in sources:
        with factory.begin() as s:
            repo.record_instance(s, repo.InstanceRecord(
                study_instance_uid=d.StudyInstanceUID, series_instance_uid=d.SeriesInstanceUID,
                sop_instance_uid=d.SOPInstanceUID, sop_class_uid=d.SOPClassUID,
                transfer_syntax_uid="1.2.840.10008.1.2.1", path="x", size_bytes=1,
                instance_number=None, modality="CT", series_description="Head routine",
                body_part=None, calling_aet="CT1", peer_address=None, received_at=utcnow(),
                station_name=station))
    verdict = make_verdict(sources, flagged)
    with factory.begin() as s:
        series = s.execute(select(Series).where(
            Series.series_instance_uid == verdict.series_instance_uid)).scalar_one()
        added = outbox.enqueue(s, settings, series, verdict)
    return str(sources[0].SeriesInstanceUID), added
