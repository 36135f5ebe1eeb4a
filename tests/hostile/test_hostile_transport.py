"""Raw-socket abuse of a real node before and after the association (issue 19, items 1-2).

Each case checks what CONFORMANCE.md 3.3 says the node answers.
"""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest

from node.ingest.handshake import MAX_WAITING, WaitingConnections
from tests.helpers.dcmtk import echoscu
from tests.helpers.node import RunningNode
from tests.hostile.conftest import ACSE_TIMEOUT_S
from tests.hostile.peers import (
    abort_reason,
    association_request,
    conformance_answer,
    connect,
    listeners_rss_kib,
    read_pdu,
    read_to_end,
)

pytestmark = pytest.mark.e2e

SIX_BYTES = bytes.fromhex("0100fffffff0")
#: [dicom].max_pdu_bytes of the node (the default), KiB.
MAX_PDU_KIB = 262144 // 1024


def _promised_abort(case: str) -> tuple[int, int]:
    """(source, reason) of the A-ABORT CONFORMANCE.md names for ``case``."""
    found = re.search(r"A-ABORT \(source (\d), reason (\d)", conformance_answer(case))
    assert found, f"CONFORMANCE.md row {case!r} names no A-ABORT"
    return int(found.group(1)), int(found.group(2))


def _warm_up(node: RunningNode) -> None:
    """An association on each listener, so that what a first one costs is not counted."""
    for _ in range(4):
        assert echoscu(node.port).returncode == 0


def test_six_bytes_declaring_4_gib_are_aborted_without_the_memory(open_node: RunningNode
                                                                   ) -> None:
    _warm_up(open_node)
    before = listeners_rss_kib(open_node)
    peers = [connect(open_node.port) for _ in range(4)]
    for sock in peers:
        sock.sendall(SIX_BYTES)
    answers = [read_to_end(sock) for sock in peers]  # the node closes each
    time.sleep(0.5)
    after = listeners_rss_kib(open_node)
    expected = _promised_abort("PDU longer than allowed")
    for answer in answers:
        assert abort_reason(answer) == expected
    growth = {pid: after[pid] - before[pid] for pid in before}
    assert all(kib < MAX_PDU_KIB for kib in growth.values()), growth
    for sock in peers:
        sock.close()
    assert echoscu(open_node.port).returncode == 0


def test_a_p_data_pdu_beyond_the_maximum_is_aborted(open_node: RunningNode) -> None:
    with connect(open_node.port) as sock:
        sock.sendall(association_request())
        accept = read_pdu(sock)
        assert accept[0] == 0x02, accept[:10].hex()  # A-ASSOCIATE-AC
        sock.sendall(bytes.fromhex("0400") + (262144 + 1024 + 1).to_bytes(4, "big"))
        assert abort_reason(read_pdu(sock)) == _promised_abort("PDU longer than allowed")


@pytest.mark.parametrize(("first", "case"), [
    (bytes.fromhex("0900000000040000"), "unknown PDU type"),
    (bytes.fromhex("04000000000a00000006010300000000"), "PDU other than A-ASSOCIATE-RQ first"),
])
def test_anything_but_an_association_request_first_is_aborted(
        open_node: RunningNode, first: bytes, case: str) -> None:
    with connect(open_node.port) as sock:
        sock.sendall(first)
        assert abort_reason(read_to_end(sock)) == _promised_abort(case)


def _still_open(sock: socket.socket) -> bool:
    """True when the node has neither closed ``sock`` nor sent anything on it."""
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(30)
    return False


def test_half_open_requests_take_no_slot_and_go_within_the_acse_timeout(
        open_node: RunningNode) -> None:
    request = association_request()
    assert len(request) == 193
    assert "`[dicom].acse_timeout_s`" in conformance_answer("association request incomplete")
    started = time.monotonic()
    half_open = [connect(open_node.port, timeout_s=30) for _ in range(50)]
    for sock in half_open:
        sock.sendall(request[:96])
    try:
        result = echoscu(open_node.port)  # a real modality meanwhile
        assert result.returncode == 0, result.stdout + result.stderr
        assert all(_still_open(sock) for sock in half_open), "echo only after they went"
        for sock in half_open:
            assert read_to_end(sock) == b""  # closed by the node, no PDU
        took = time.monotonic() - started
        # The node's deadline runs from when a listener took the connection, a little after
        # the connect; 2 s for that on a loaded machine.
        assert took < ACSE_TIMEOUT_S + 2.0, f"closed after {took:.1f} s"
    finally:
        for sock in half_open:
            sock.close()
    log = open_node.log_text()
    assert log.count(f"no complete association request within {ACSE_TIMEOUT_S:g} s") >= 50


def test_more_silent_connections_than_may_wait_do_not_keep_a_modality_out(
        open_node: RunningNode) -> None:
    """200 connections that send nothing, over two listener processes that let 64 wait each:
    the longest waiting are closed to make room, and a real modality is served."""
    assert "at most 64 per listener process" in conformance_answer(
        "connections waiting for their request")
    evicted_line = "this one the longest"
    before = open_node.log_text().count(evicted_line)
    silent = [connect(open_node.port, timeout_s=30) for _ in range(200)]
    try:
        at_least = 200 - 2 * MAX_WAITING
        open_node.wait_for(f"{at_least} connections closed to make room",
                           lambda: open_node.log_text().count(evicted_line) - before
                           >= at_least, 30)
        result = echoscu(open_node.port)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        for sock in silent:
            sock.close()


def test_the_longest_waiting_connection_makes_room() -> None:
    """More connections waiting for their request than the limit: the oldest is closed."""
    waiting = WaitingConnections(limit=3)
    pairs = [socket.socketpair() for _ in range(5)]
    keys = [waiting.enter(ours, f"peer{i}") for i, (ours, _) in enumerate(pairs)]
    assert len(waiting) == 3
    for _, theirs in pairs[:2]:  # the two oldest were shut down
        theirs.settimeout(1)
        assert theirs.recv(1) == b""
    blocked = pairs[2][0]
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(blocked.recv(1)))
    reader.start()
    waiting.close()  # the listener stops: a thread blocked reading is let go at once
    reader.join(2)
    assert got == [b""]
    assert waiting.enter(pairs[4][0], "late") is None
    waiting.leave(keys[2])
    for ours, theirs in pairs:
        ours.close()
        theirs.close()
