"""The cluster-wide jobs run on one node at a time: three receivers up, a problem of the
deployment is told once, not three times; the node running the jobs is killed and another
takes them over without a person (here within seconds: ``[cluster].takeover_check_s`` is 1 s;
the issue's bound is a minute).

Three real ``vaenode serve`` processes (worker off) on a private PostgreSQL, a real HTTP
endpoint as the PACS admin's channel (``[alerts].ops_urls``), DCMTK ``storescu`` as a scanner.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from node.queue.models import Series
from tests.helpers import dcmtk
from tests.helpers.alerts import AlertReceiver
from tests.helpers.cluster import Deployment
from tests.helpers.node import VAENODE
from tests.helpers.postgres import start_postgres
from tests.helpers.synthetic import write_ct_series

pytestmark = pytest.mark.e2e

NAMES = ("a", "b", "c")


@pytest.fixture
def three(tmp_path: Path) -> Iterator[tuple[Deployment, AlertReceiver]]:
    postgres = start_postgres(tmp_path / "pg")
    admin = AlertReceiver()
    deployment = Deployment(tmp_path / "nodes", postgres.new_database("jobs"),
                            tmp_path / "shared", common={
        "queue": {"series_idle_s": 30.0, "check_interval_s": 0.3},
        # Every problem at once: the storage is "low" (its free space is under a huge bound),
        # and a queued series stalls after 1.2 s (no worker runs here).
        "alerts": {"ops_urls": [admin.url], "ops_check_s": 0.3, "poll_interval_s": 0.3,
                   "retry_base_s": 0.5, "ops_storage_free_mb": 10**12,
                   "ops_queue_wait_min": 0.02},
    })
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(deployment.receiver, NAMES))
        yield deployment, admin
    finally:
        deployment.stop()
        admin.close()
        postgres.stop()


def _nodes(deployment: Deployment, via: str) -> dict[str, dict[str, Any]]:
    listed = subprocess.run(
        [str(VAENODE), "queue", "nodes", "--json", "--config",
         str(deployment.nodes[via].config_path)], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    return {n["name"]: n for n in map(json.loads, listed.stdout.splitlines())}


def _events(admin: AlertReceiver, event: str) -> list[dict[str, Any]]:
    return [m for m in admin.messages if m.get("event") == event]


def test_problems_are_told_once_and_the_jobs_move_on_when_their_node_dies(
        three: tuple[Deployment, AlertReceiver], tmp_path: Path) -> None:
    deployment, admin = three
    deployment.wait("the storage problem", lambda: _events(admin, "storage_low"), 30)
    time.sleep(3.0)  # ten checks of each node's interval: none of the others tells it again
    assert len(_events(admin, "storage_low")) == 1
    holders = deployment.wait("one node holding the jobs in the view", lambda: [
        name for name, n in _nodes(deployment, "a").items() if n["cluster_jobs"]], 15)
    assert len(holders) == 1
    [holder] = holders

    killed_at = time.monotonic()
    deployment.nodes[holder].kill()
    survivors = [n for n in NAMES if n != holder]
    # (The killed node's row still says it holds the jobs until it is shown lost.)
    successor = deployment.wait("another node taking the jobs over", lambda: [
        name for name, n in _nodes(deployment, survivors[0]).items()
        if name in survivors and n["cluster_jobs"]], 60)
    took_s = time.monotonic() - killed_at
    assert len(successor) == 1 and took_s < 60, took_s
    deployment.wait("the killed node shown lost", lambda: _nodes(
        deployment, survivors[0])[holder]["state"] == "lost", 30)

    # The successor runs the jobs: a series sent now is completed (only the holder of the
    # jobs does that), waits for a worker that never comes, and that is told once as well.
    series = write_ct_series(tmp_path / "late", 3, rows=32, columns=32)
    sent = dcmtk.storescu(deployment.nodes[survivors[1]].port, series)
    assert sent.returncode == 0, sent.stderr
    deployment.wait("the stalled queue told", lambda: _events(admin, "queue_stalled"), 30)
    time.sleep(2.0)
    assert len(_events(admin, "queue_stalled")) == 1
    assert len(_events(admin, "storage_low")) == 1  # not told again by the successor
    with deployment.session() as session:
        assert session.scalars(select(Series.status)).all() == ["queued"]
