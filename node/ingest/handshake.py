"""Before an association exists: its request within the ACSE timeout, and few left waiting.

pynetdicom gives every connection an association thread and a DUL reactor thread at once and
leaves the A-ASSOCIATE-RQ to the reactor, whose read blocks without a deadline, so PS3.8's
ARTIM timer (the ACSE timeout) is never looked at while a request is half in; its limit on
associations counts those threads. Fifty connections that each sent 96 of the 193 bytes of a
request and then waited held every slot, and every scanner got "local limit exceeded", for as
long as they cared to wait.

So the node takes the request itself, in the thread that already runs each new connection
(socketserver's), before pynetdicom sees the connection (:class:`~node.ingest.transport.
NodeRequestHandler`):

- The whole A-ASSOCIATE-RQ must be in within ``[dicom].acse_timeout_s`` of the connection
  (the ACSE timeout, as ARTIM), the TLS handshake included when the listener has TLS; at most
  :data:`~node.ingest.pdu.ASSOCIATION_PDU_MAX_BYTES`, read as it arrives. Otherwise the
  connection is closed, after an A-ABORT when the peer sent something that is not a request
  (another PDU type, garbage, a length above the limit).
- At most :data:`MAX_WAITING` connections of a listener wait for their request (or their
  handshake) at once. One more closes the one that has waited longest: a modality sends its
  request within milliseconds of connecting, so only a connection that holds back is closed,
  and no number of silent connections can keep a scanner out.
- Only a complete request makes an association (its reactor decodes the PDU read here), and
  only associations count against ``[dicom].max_associations``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import ssl
import threading
import time

from node.ingest.pdu import (
    A_ABORT,
    A_ASSOCIATE_RQ,
    ASSOCIATION_PDU_MAX_BYTES,
    PduError,
    PduTimeout,
    PeerClosed,
    UnexpectedPdu,
    a_abort,
    read_pdu,
)

log = logging.getLogger(__name__)

#: Connections of one listener process that may wait for their association request (and TLS
#: handshake) at once.
MAX_WAITING = 64
#: The buffer of a request starts at this size and grows only as its bytes arrive.
_FIRST_CHUNK_BYTES = 64 * 1024


class HandshakeFailed(PduError):
    """The peer's TLS handshake failed (no common protocol, a certificate refused, plain
    DICOM on the TLS port...)."""


def _tls_handshake(sock: ssl.SSLSocket, deadline: float) -> None:
    """Complete the server side of the TLS handshake by ``deadline`` (time.monotonic)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise PduTimeout("no TLS handshake in time")
    sock.settimeout(left)
    try:
        sock.do_handshake()
    except TimeoutError as exc:
        raise PduTimeout("no TLS handshake in time") from exc
    except (ssl.SSLEOFError, ConnectionError) as exc:  # closed: a port probe, or made room
        raise PeerClosed(f"closed during the TLS handshake: {exc}") from exc
    except OSError as exc:  # ssl.SSLError is one
        raise HandshakeFailed(f"TLS handshake failed: {exc}") from exc


def _request_limit(pdu_type: int) -> int:
    if pdu_type == A_ABORT:
        raise PeerClosed("the peer aborted before its association request")
    if pdu_type != A_ASSOCIATE_RQ:
        raise UnexpectedPdu(f"a PDU of type 0x{pdu_type:02X} before the association request")
    return ASSOCIATION_PDU_MAX_BYTES


def _close(sock: socket.socket) -> None:
    """End the connection now, also for a thread blocked reading it."""
    with contextlib.suppress(OSError):
        # socket.socket's own shutdown, also on a TLS socket: SSLSocket's would first drop
        # its SSL object under a thread reading it.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class WaitingConnections:
    """The connections of a listener that have not sent their association request yet.

    Args:
        limit: how many may wait at once; one more closes the one waiting longest.
    """

    def __init__(self, limit: int = MAX_WAITING) -> None:
        self.limit = limit
        self._waiting: dict[int, tuple[socket.socket, str]] = {}
        self._keys = itertools.count()
        self._lock = threading.Lock()
        self._closed = False

    def enter(self, sock: socket.socket, peer: str) -> int | None:
        """Count ``sock`` as waiting; None when the listener is stopping (close it)."""
        evicted: list[tuple[socket.socket, str]] = []
        with self._lock:
            if self._closed:
                return None
            while len(self._waiting) >= self.limit:
                evicted.append(self._waiting.pop(next(iter(self._waiting))))
            key = next(self._keys)
            self._waiting[key] = (sock, peer)
        for old, old_peer in evicted:
            log.warning("connection closed: %d connections are waiting for their association "
                        "request, this one the longest", self.limit, extra={"peer": old_peer})
            _close(old)
        return key

    def leave(self, key: int) -> None:
        """``key``'s connection is no longer waiting (request in, or it failed)."""
        with self._lock:
            self._waiting.pop(key, None)

    def close(self) -> None:
        """Close every waiting connection, and any that comes from now on (listener stops)."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = list(self._waiting.values()), {}
        for sock, _ in waiting:
            _close(sock)

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting)


def receive_association_request(sock: socket.socket, peer: str, acse_timeout_s: float,
                                waiting: WaitingConnections | None) -> bytearray | None:
    """The connection's A-ASSOCIATE-RQ PDU (header included), or None when it has none.

    ``sock`` is a TLS socket whose handshake has not begun (``do_handshake_on_connect``
    off) when the listener has TLS: it is done here, within the same deadline.

    None: the connection sent something else, nothing in time, or closed, or was closed to
    make room, or failed its TLS handshake (logged; an A-ABORT went to a peer that sent
    something else); the caller closes it. On success the socket is blocking again, as
    pynetdicom expects it.
    """
    deadline = time.monotonic() + acse_timeout_s
    key = waiting.enter(sock, peer) if waiting is not None else None
    if waiting is not None and key is None:
        return None  # the listener is stopping
    try:
        if isinstance(sock, ssl.SSLSocket):
            _tls_handshake(sock, deadline)
        request = read_pdu(sock, _request_limit, deadline=deadline,
                           first_chunk=_FIRST_CHUNK_BYTES)
        sock.settimeout(None)
        return request
    except PduError as exc:
        if exc.abort_reason is not None:
            log.warning("connection refused before its association: %s", exc,
                        extra={"peer": peer})
            with contextlib.suppress(OSError):
                sock.settimeout(1.0)  # a peer that reads nothing must not hold us here
                sock.sendall(a_abort(exc.abort_reason))
        elif isinstance(exc, HandshakeFailed):
            log.warning("connection closed: %s", exc, extra={"peer": peer})
        elif isinstance(exc, PduTimeout):
            log.warning("connection closed: no complete association request within %g s",
                        acse_timeout_s, extra={"peer": peer})
        else:  # a port probe, a health check, or a connection closed to make room
            log.debug("connection closed before its association request: %s", exc,
                      extra={"peer": peer})
        return None
    finally:
        if waiting is not None and key is not None:
            waiting.leave(key)
