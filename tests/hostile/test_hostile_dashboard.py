"""The dashboard under DNS rebinding and forged X-Forwarded-For, and /healthz when C-STORE is
refused for space (issue 19, items 6, 8, 9)."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from node.admin.app import start_in_thread
from node.queue.models import AdminAction
from tests.admin.web import admin_settings, http
from tests.helpers.db import migrated_database
from tests.helpers.node import RunningNode, free_port, start_node
from tests.hostile.conftest import TRIO, admin_url, series_files
from tests.hostile.corpus import Source
from tests.hostile.peers import MR_IMAGE, RawStoreSCU, conformance_answer, conformance_status

pytestmark = pytest.mark.e2e

TOKEN = "hostile-test-token"


@pytest.fixture(scope="module")
def guarded_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """A node with a token on its dashboard, and a storage minimum no disk meets."""
    node = start_node(tmp_path_factory.mktemp("guarded-node"), sections={
        "storage": {"min_free_mb": 1 << 40},
        "admin": {"enabled": True, "bind_address": "127.0.0.1", "port": free_port(),
                  "token": TOKEN},
    })
    try:
        yield node
    finally:
        node.stop()


def test_a_rebinding_page_gets_nothing_from_the_open_dashboard(open_node: RunningNode) -> None:
    base = admin_url(open_node)
    port = urllib.parse.urlsplit(base).port
    evil = {"Host": f"evil.example:{port}"}
    assert http(f"{base}/queue").status == 200
    assert http(f"{base}/queue", headers={"Host": f"localhost:{port}"}).status == 200
    refused = http(f"{base}/queue", headers=evil)
    assert refused.status == 400 and "allowed_hosts" in refused.text
    assert b"<table" not in refused.body
    # The health probe answers any Host: a load balancer names the address it probes.
    health = http(f"{base}/healthz", headers=evil)
    assert health.status == 200 and health.text == "ok\n"
    # A review action posted by the page (same origin as far as the browser knows).
    form = urllib.parse.urlencode({"action": "confirm", "reviewer": "evil"}).encode()
    origin = {**evil, "Origin": f"http://evil.example:{port}"}
    assert http(f"{base}/series/1.2.3/actions", headers=origin, data=form).status == 400
    with open_node.session() as session:
        assert session.scalar(select(func.count()).select_from(AdminAction)) == 0
    # The same post addressed to the dashboard's own name reaches it (404: no such series).
    own = {"Host": f"127.0.0.1:{port}", "Origin": f"http://127.0.0.1:{port}"}
    assert http(f"{base}/series/1.2.3/actions", headers=own, data=form).status == 404


def test_forwarded_for_does_not_dodge_the_login_limiter(guarded_node: RunningNode) -> None:
    base = admin_url(guarded_node)
    statuses = [
        http(f"{base}/queue", headers={"Authorization": f"Bearer wrong-{i}",
                                       "X-Forwarded-For": f"203.0.113.{i}"}).status
        for i in range(30)
    ]
    assert statuses[:10] == [401] * 10
    assert statuses[10:] == [429] * 20


def test_forwarded_for_counts_from_a_trusted_proxy(tmp_path: Path) -> None:
    """With admin.trusted_proxies naming the proxy, each forwarded client is its own."""
    settings = admin_settings(tmp_path, token=TOKEN, trusted_proxies=["127.0.0.1"])
    with migrated_database(settings.database) as session_factory:
        dashboard = start_in_thread(settings, session_factory)
        try:
            base = f"http://127.0.0.1:{dashboard.port}"
            statuses = [
                http(f"{base}/queue", headers={"Authorization": f"Bearer wrong-{i}",
                                               "X-Forwarded-For": f"203.0.113.{i % 2}"}).status
                for i in range(30)
            ]
        finally:
            dashboard.stop()
    # Two clients, 15 tries each: 10 wrong tokens each before 429 (one client: 20 x 429).
    assert statuses.count(401) == 20 and statuses.count(429) == 10


def test_healthz_says_degraded_while_c_store_is_refused_for_space(
        guarded_node: RunningNode) -> None:
    reply = http(f"{admin_url(guarded_node)}/healthz")
    assert reply.status == 503
    assert reply.text.startswith("degraded: storage:") and "0xA700" in reply.text
    assert "/healthz" in conformance_answer("storage below `[storage].min_free_mb`")
    source = Source.read(series_files(TRIO, 1)[0])
    scu = RawStoreSCU(guarded_node, (MR_IMAGE,))
    try:
        status = scu.store(source.data, sop_class=source.sop_class,
                           sop_instance=source.sop_instance, syntax=source.syntax)
    finally:
        scu.release()
    assert status == conformance_status("storage below `[storage].min_free_mb`") == 0xA700
