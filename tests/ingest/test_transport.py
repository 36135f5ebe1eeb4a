"""The receive path of our pynetdicom transport (node/ingest/transport.py)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from node.ingest.transport import EventDrivenDUL, FastRecvSocket, NodeRequestHandler


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


def test_associations_of_our_server_use_the_fast_socket_and_the_event_driven_dul() -> None:
    scp = AE(ae_title="SCP")
    scp.add_supported_context(Verification)
    seen: list[tuple[type, type]] = []
    duls: list[Any] = []

    def on_echo(event: evt.Event) -> int:
        seen.append((type(event.assoc.dul.socket), type(event.assoc.dul)))
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
    assert seen[0] == (FastRecvSocket, EventDrivenDUL)
    assert issubclass(FastRecvSocket, AssociationSocket)
