"""Read one DICOM upper-layer PDU from a peer without trusting the length it declares.

A PDU starts with six bytes: its type, a reserved byte and its length (PS3.8 9.3.1). pynetdicom's
receive path (``DULServiceProvider._read_pdu_data``) reads that header, then asks the socket for
the declared length in one blocking call, with no limit and no deadline; the node's faster
socket even allocated the whole length first. Six bytes, ``01 00 FF FF FF F0``, made a listener
process allocate and hold 4 GiB, and a peer that sent half a PDU and then nothing held its
connection (and pynetdicom's threads for it) forever.

:func:`read_pdu` checks the declared length against what the caller allows for that PDU type
before reading anything more, then reads the body in chunks as it arrives (memory follows the
bytes the peer really sent, not what it announced), within a deadline or a per-read timeout.
The limits themselves belong to the caller: before an association the A-ASSOCIATE-RQ
(:data:`ASSOCIATION_PDU_MAX_BYTES`, :mod:`node.ingest.handshake`), after it the maximum length
the node announced for P-DATA (:func:`limit_after_association`, :mod:`node.ingest.transport`).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

#: PDU types of PS3.8 9.3.1.
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07
PDU_TYPES = frozenset(range(0x01, 0x08))
HEADER_BYTES = 6
_HEADER = struct.Struct(">BBL")

#: Largest PDU other than P-DATA-TF the node reads (A-ASSOCIATE-RQ above all). An association
#: request is not bound by the maximum PDU length, which it is the one to negotiate: 128
#: presentation contexts with a dozen transfer syntaxes each, user identity with a 64 KiB
#: Kerberos ticket or SAML assertion and a 64 KiB secondary field, and extended negotiation for
#: every class stay well below this.
ASSOCIATION_PDU_MAX_BYTES = 512 * 1024
#: Tolerated above the announced maximum P-DATA-TF length: some implementations count the
#: maximum as the PDV value only, without the item headers of its fragments.
P_DATA_TOLERANCE_BYTES = 1024
#: The buffer of a PDU whose limit is larger than this starts at this size and grows (doubling)
#: only as the bytes arrive.
FIRST_CHUNK_BYTES = 1024 * 1024

#: A-ABORT reasons (source 2, DICOM UL service-provider; PS3.8 9.3.8).
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06


class PduError(Exception):
    """The peer's PDU could not be read; ``abort_reason`` says which A-ABORT reason to send
    before closing (None: just close, the peer is gone or silent)."""

    abort_reason: int | None = None


class PeerClosed(PduError):
    """The connection ended (or failed) before the whole PDU arrived."""


class PduTimeout(PduError):
    """The rest of the PDU did not arrive in time."""


class UnexpectedPdu(PduError):
    """A PDU of a type the state does not allow (say, P-DATA before the association)."""

    abort_reason = ABORT_UNEXPECTED_PDU


class PduTooLong(PduError):
    """The PDU declares more bytes than its type may have here."""

    abort_reason = ABORT_INVALID_PARAMETER


class UnknownPduType(PduError):
    """The first byte is not a PDU type of PS3.8."""

    abort_reason = ABORT_UNRECOGNIZED_PDU


def limit_after_association(max_pdu_bytes: int) -> Callable[[int], int | None]:
    """The length limit of each PDU type on an association whose P-DATA-TF PDUs may be
    ``max_pdu_bytes`` long (what the node announced; 0: no limit, memory then follows what
    the peer sends)."""
    data_limit = max_pdu_bytes + P_DATA_TOLERANCE_BYTES if max_pdu_bytes else None

    def limit(pdu_type: int) -> int | None:
        return data_limit if pdu_type == P_DATA_TF else ASSOCIATION_PDU_MAX_BYTES

    return limit


class _Clock:
    """When reads must have finished: by an absolute ``deadline`` (time.monotonic), or each
    read within ``timeout`` seconds (None: wait as long as it takes)."""

    def __init__(self, sock: socket.socket, deadline: float | None, timeout: float | None
                 ) -> None:
        self.sock = sock
        self.deadline = deadline
        if deadline is None and sock.gettimeout() != timeout:
            sock.settimeout(timeout)  # once: a steady timeout costs no call per read

    def arm(self) -> None:
        if self.deadline is None:
            return
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise PduTimeout("no complete PDU in time")
        self.sock.settimeout(left)


def _recv_into(sock: socket.socket, clock: _Clock, view: memoryview) -> int:
    clock.arm()
    try:
        return sock.recv_into(view)
    except TimeoutError as exc:
        raise PduTimeout("no complete PDU in time") from exc
    except OSError as exc:  # reset, or an SSL error on a TLS connection
        raise PeerClosed(f"connection failed: {exc}") from exc


def _fill(sock: socket.socket, clock: _Clock, buffer: bytearray, start: int, end: int) -> None:
    """Read bytes ``start:end`` of ``buffer`` from ``sock``, growing it (doubling, up to
    ``end``) only once what it holds has arrived."""
    got = start
    while got < end:
        if got == len(buffer):
            buffer.extend(bytes(min(len(buffer), end - got)))
        with memoryview(buffer) as view:
            n = _recv_into(sock, clock, view[got:])
        if not n:
            raise PeerClosed(f"connection closed after {got} of {end} bytes of a PDU")
        got += n


def read_pdu(sock: socket.socket, limit: Callable[[int], int | None], *,
             deadline: float | None = None, timeout: float | None = None,
             first_chunk: int = FIRST_CHUNK_BYTES) -> bytearray:
    """Read one whole PDU (header and body) from ``sock``.

    Args:
        sock: a connected blocking socket (plain or TLS); its timeout is changed.
        limit: the longest body (PDU length field) allowed for a PDU type, None for no limit;
            it may also raise a :class:`PduError` to refuse the type outright.
        deadline: ``time.monotonic()`` by which the whole PDU must be in (the ACSE timeout
            before an association), or None.
        timeout: without ``deadline``, the longest wait for each read (the network timeout).
        first_chunk: the most bytes allocated before any of the body has arrived.

    Raises:
        PeerClosed: the connection ended before the PDU was complete (also before any byte).
        PduTimeout: the deadline passed, or a read waited ``timeout``.
        UnknownPduType: the type byte is not one of PS3.8's.
        PduTooLong: the declared length is above ``limit`` for the type; nothing more was read.
    """
    clock = _Clock(sock, deadline, timeout)
    header = bytearray(HEADER_BYTES)
    _fill(sock, clock, header, 0, HEADER_BYTES)
    pdu_type, _, length = _HEADER.unpack(header)
    if pdu_type not in PDU_TYPES:
        raise UnknownPduType(f"unknown PDU type 0x{pdu_type:02X}")
    allowed = limit(pdu_type)
    if allowed is not None and length > allowed:
        raise PduTooLong(f"a PDU of type 0x{pdu_type:02X} declaring {length} bytes, more than "
                         f"the {allowed} allowed")
    buffer = bytearray(HEADER_BYTES + min(length, first_chunk))
    buffer[:HEADER_BYTES] = header
    _fill(sock, clock, buffer, HEADER_BYTES, HEADER_BYTES + length)
    return buffer


def a_abort(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider (source 2) with ``reason`` (PS3.8 9.3.8)."""
    return bytes((A_ABORT, 0, 0, 0, 0, 4, 0, 0, 0x02, reason))
