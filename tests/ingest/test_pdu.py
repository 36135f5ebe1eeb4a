"""Reading PDUs without trusting their declared length (node/ingest/pdu.py)."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from node.ingest.pdu import (
    ASSOCIATION_PDU_MAX_BYTES,
    P_DATA_TOLERANCE_BYTES,
    PduTimeout,
    PduTooLong,
    PeerClosed,
    UnknownPduType,
    limit_after_association,
    read_pdu,
)


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def _unlimited(_: int) -> None:
    return None


def test_a_pdu_is_read_whole_across_chunks_with_a_small_first_buffer() -> None:
    ours, peer = socket.socketpair()
    body = bytes(range(256)) * 4000  # 1,024,000 bytes, more than a socket buffer
    wire = _pdu(0x04, body) + _pdu(0x05, b"\0" * 4)
    sender = threading.Thread(target=lambda: [peer.sendall(wire[i:i + 70001])
                                              for i in range(0, len(wire), 70001)])
    sender.start()
    first = read_pdu(ours, _unlimited, first_chunk=4096)
    second = read_pdu(ours, _unlimited)
    sender.join()
    assert bytes(first) == _pdu(0x04, body) and bytes(second) == _pdu(0x05, b"\0" * 4)
    ours.close()
    peer.close()


def test_a_length_above_the_limit_is_refused_before_any_body_byte_is_read() -> None:
    ours, peer = socket.socketpair()
    peer.sendall(bytes.fromhex("0100fffffff0") + b"next")
    with pytest.raises(PduTooLong, match="4294967280") as refused:
        read_pdu(ours, lambda _: ASSOCIATION_PDU_MAX_BYTES)
    assert refused.value.abort_reason == 6
    assert ours.recv(4) == b"next"  # not consumed
    ours.close()
    peer.close()


def test_limits_after_the_association() -> None:
    limit = limit_after_association(16384)
    assert limit(0x04) == 16384 + P_DATA_TOLERANCE_BYTES
    assert limit(0x05) == limit(0x01) == ASSOCIATION_PDU_MAX_BYTES
    assert limit_after_association(0)(0x04) is None


@pytest.mark.parametrize(("wire", "error"), [
    (bytes.fromhex("0900"), UnknownPduType),  # checked on the header; no more is read
    (_pdu(0x04, b"abc")[:7], PeerClosed),
    (b"\x04\x00", PeerClosed),
    (b"", PeerClosed),
])
def test_broken_pdus(wire: bytes, error: type[Exception]) -> None:
    ours, peer = socket.socketpair()
    peer.sendall(wire + (b"\0" * 4 if error is UnknownPduType else b""))
    if error is not UnknownPduType:
        peer.shutdown(socket.SHUT_WR)
    with pytest.raises(error):
        read_pdu(ours, _unlimited, timeout=5)
    ours.close()
    peer.close()


def test_a_deadline_ends_a_pdu_that_stops_half_way() -> None:
    ours, peer = socket.socketpair()
    peer.sendall(_pdu(0x01, b"x" * 100)[:50])
    started = time.monotonic()
    with pytest.raises(PduTimeout):
        read_pdu(ours, _unlimited, deadline=time.monotonic() + 0.3)
    assert 0.25 < time.monotonic() - started < 2.0
    ours.close()
    peer.close()
