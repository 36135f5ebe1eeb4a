"""A receiver whose PostgreSQL or shared folder is down answers C-STORE with a failure status
(the scanner keeps the image and sends it again), never Success without the row and the file;
``/healthz`` answers 503, so a load balancer takes it out; when the database or the folder is
back, it stores again without a restart."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from node.queue.models import Instance
from tests.helpers.cluster import Deployment
from tests.helpers.node import RunningNode, free_port
from tests.helpers.postgres import start_postgres
from tests.helpers.synthetic import write_ct_series

pytestmark = pytest.mark.e2e


def _store(node: RunningNode, path: Path) -> int:
    """C-STORE one file; returns the status (-1 when no association could be made)."""
    ae = AE(ae_title="CT1")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    if not assoc.is_established:
        return -1
    try:
        reply = assoc.send_c_store(pydicom.dcmread(path))
        return int(reply.Status) if "Status" in reply else -1
    finally:
        assoc.release()


def _health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_c_store_fails_while_the_database_or_the_shared_folder_is_down(tmp_path: Path) -> None:
    postgres = start_postgres(tmp_path / "pg")
    admin_port = free_port()
    deployment = Deployment(tmp_path / "nodes", postgres.new_database("outage"),
                            tmp_path / "shared")
    try:
        node = deployment.receiver("r1", {"admin": {"enabled": True, "port": admin_port}})
        files = write_ct_series(tmp_path / "ct", 3, rows=32, columns=32)
        assert _store(node, files[0]) == 0x0000
        assert _health(admin_port) == 200

        postgres.stop()
        assert _store(node, files[1]) == 0xC211  # "cannot understand": kept by the scanner
        assert _health(admin_port) == 503
        postgres.start_again()
        # The pool's pre-ping opens new connections: stored again, no restart.
        deployment.wait("C-STORE to succeed again", lambda: _store(node, files[1]) == 0, 30,
                        every_s=0.5)

        shared, away = deployment.storage, tmp_path / "unmounted"
        shared.rename(away)  # the network file system gone from under the node
        assert _store(node, files[2]) == 0xC211
        assert _health(admin_port) == 503
        away.rename(shared)
        assert _store(node, files[2]) == 0x0000
        assert _health(admin_port) == 200

        with deployment.session() as session:
            rows = session.scalars(select(Instance.path)).all()
        assert len(rows) == 3 and all((shared / p).is_file() for p in rows)
    finally:
        deployment.stop()
        postgres.stop()
