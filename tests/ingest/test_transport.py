"""The receive path of our pynetdicom transport (node/ingest/transport.py)."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pynetdicom import AE, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from node.ingest.transport import (
    EventDrivenDUL,
    FastRecvSocket,
    FastResponseDIMSE,
    NodeRequestHandler,
    encode_c_store_rsp,
)


def _fast_socket(sock: socket.socket) -> FastRecvSocket:
    wrapped = FastRecvSocket.__new__(FastRecvSocket)
    wrapped.socket = sock
    return wrapped


def test_recv_reads_exactly_the_requested_bytes_across_chunks() -> None:
    ours, peer = socket.socketpair()
    payload = bytes(range(256)) * 4000  # 1,024,000 bytes, more than a socket buffer
    sender = threading.Thread(target=lambda: [peer.sendall(payload[i:i + 70001])
                                              for i in range(0, len(payload), 70001)])
    sender.start()
    wrapped = _fast_socket(ours)
    first = wrapped.recv(6)
    rest = wrapped.recv(len(payload) - 6 - 10)
    tail = wrapped.recv(10)
    sender.join()
    assert isinstance(rest, bytearray)
    assert bytes(first + rest + tail) == payload
    ours.close()
    peer.close()


def test_recv_returns_what_it_has_when_the_peer_closes() -> None:
    ours, peer = socket.socketpair()

    def send_and_close() -> None:
        peer.sendall(b"abc")
        time.sleep(0.05)
        peer.sendall(b"de")
        peer.close()

    sender = threading.Thread(target=send_and_close)
    sender.start()
    got = _fast_socket(ours).recv(100)
    sender.join()
    assert got == bytearray(b"abcde")
    assert _fast_socket(ours).recv(4) == bytearray()
    ours.close()


def test_associations_of_our_server_use_our_socket_reactor_and_dimse() -> None:
    scp = AE(ae_title="SCP")
    scp.add_supported_context(Verification)
    seen: list[tuple[type, type, type]] = []
    duls: list[Any] = []

    def on_echo(event: evt.Event) -> int:
        seen.append((type(event.assoc.dul.socket), type(event.assoc.dul),
                     type(event.assoc.dimse)))
        duls.append(event.assoc.dul)
        return 0x0000

    server = cast(ThreadedAssociationServer, scp.make_server(
        ("127.0.0.1", 0), evt_handlers=[(evt.EVT_C_ECHO, on_echo)],
        server_class=ThreadedAssociationServer, request_handler=NodeRequestHandler))
    scp._servers.append(server)  # as AE.start_server does; server.shutdown() removes it
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(Verification)
        port = server.server_address[1]
        assoc = scu.associate("127.0.0.1", port, ae_title="SCP")
        assert assoc.is_established
        for _ in range(20):  # each response wakes the waiting reactor: no pause per message
            status: Any = assoc.send_c_echo()
            assert status.Status == 0x0000
        time.sleep(0.3)  # idle while established: the reactor waits in select
        started = time.monotonic()
        assoc.release()
        assert assoc.is_released
        assert time.monotonic() - started < 1.0
        duls[0].join(5)
        assert not duls[0].is_alive()
        assert duls[0]._wake_w.fileno() == -1 and duls[0]._wake_r.fileno() == -1
        duls[0]._wake()  # a late wake-up after the end is harmless

        # A peer that drops the connection while the reactor waits is noticed at once.
        assoc = scu.associate("127.0.0.1", port, ae_title="SCP")
        assert assoc.send_c_echo().Status == 0x0000
        time.sleep(0.2)
        assert assoc.dul.socket is not None
        raw = assoc.dul.socket.socket
        assert raw is not None
        raw.shutdown(socket.SHUT_RDWR)
        duls[1].join(2)
        assert not duls[1].is_alive()
        assoc.abort()
    finally:
        server.shutdown()
    assert seen[0] == (FastRecvSocket, EventDrivenDUL, FastResponseDIMSE)
    assert issubclass(FastRecvSocket, AssociationSocket)


def _pynetdicom_c_store_rsp(rsp: C_STORE, max_pdu: int = 262144) -> list[Any]:
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    return [p.presentation_data_value_list for p in message.encode_msg(1, max_pdu)]


def _rsp(class_uid: str, instance_uid: str, message_id: int, status: int) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageID = message_id
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = class_uid
    rsp.AffectedSOPInstanceUID = instance_uid
    rsp.Status = status
    return rsp


class _RecordingDul:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send_pdu(self, primitive: Any) -> None:
        self.sent.append(primitive.presentation_data_value_list)


def _fast_dimse(max_pdu: int, handlers: list[Any] | None = None) -> tuple[Any, _RecordingDul]:
    dimse = FastResponseDIMSE.__new__(FastResponseDIMSE)
    dul = _RecordingDul()
    assoc = SimpleNamespace(dul=dul, is_requestor=False,
                            requestor=SimpleNamespace(maximum_length=max_pdu),
                            get_handlers=lambda event: handlers or [])
    dimse._assoc = assoc  # type: ignore[attr-defined]
    return dimse, dul


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC211, 0xB000, 0xFFFF])
@pytest.mark.parametrize("instance_uid", [
    "1.2.3", "1.2.34", "1.2.826.0.1.3680043.8.498." + "1" * 37,  # 64 characters
    "1.2.826.0.1.3680043.8.498." + "1" * 36,  # 63
])
@pytest.mark.parametrize("message_id", [1, 2, 65535])
def test_c_store_response_bytes_are_pynetdicoms(status: int, instance_uid: str,
                                                message_id: int) -> None:
    class_uid = "1.2.840.10008.5.1.4.1.1.2"
    dimse, dul = _fast_dimse(262144)
    dimse.send_msg(_rsp(class_uid, instance_uid, message_id, status), 1)
    assert dul.sent == _pynetdicom_c_store_rsp(_rsp(class_uid, instance_uid, message_id, status))
    assert encode_c_store_rsp(class_uid, instance_uid, message_id, status) == dul.sent[0][0][1][1:]


def test_other_responses_are_left_to_pynetdicom(monkeypatch: pytest.MonkeyPatch) -> None:
    class_uid, instance_uid = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"
    left: list[Any] = []
    monkeypatch.setattr(DIMSEServiceProvider, "send_msg",
                        lambda self, primitive, cx: left.append(primitive))
    with_comment = _rsp(class_uid, instance_uid, 3, 0xC211)
    with_comment.ErrorComment = "cannot"
    dimse, dul = _fast_dimse(262144)
    dimse.send_msg(with_comment, 1)  # an error comment
    dimse.send_msg(_rsp(class_uid, "", 3, 0), 1)  # no instance UID
    dimse.send_msg(_rsp(class_uid, instance_uid, 3, 0), 1)  # the plain one: ours
    small, _ = _fast_dimse(64)  # would need two fragments
    small.send_msg(_rsp(class_uid, instance_uid, 3, 0), 1)
    logged, _ = _fast_dimse(262144, handlers=[object()])  # a handler on EVT_DIMSE_SENT
    logged.send_msg(_rsp(class_uid, instance_uid, 3, 0), 1)
    assert len(left) == 4
    assert len(dul.sent) == 1
