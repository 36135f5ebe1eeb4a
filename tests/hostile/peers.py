"""Hostile and broken DICOM peers for the tests: raw sockets, and a pynetdicom SCU that sends
whatever bytes and command values it is given; plus what the tests read back (listener memory,
stored files, CONFORMANCE.md).
"""

from __future__ import annotations

import re
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from sqlalchemy import select

from node.queue.models import Instance
from tests.helpers.node import REPO, RunningNode

VERIFICATION = "1.2.840.10008.1.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: 28 characters: with it the request below is the 193 bytes of the issue's repro.
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.3811.9"


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def association_request(called: str = "VAENODE", calling: str = "HOSTILE",
                        abstract: str = VERIFICATION) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing ``abstract`` with Implicit VR LE."""
    context = bytes((1, 0, 0, 0)) + _item(0x30, abstract.encode()) + _item(
        0x40, ImplicitVRLittleEndian.encode())
    user = (_item(0x51, struct.pack(">I", 16384))
            + _item(0x52, IMPLEMENTATION_UID.encode()))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
            + bytes(32) + _item(0x10, APPLICATION_CONTEXT.encode()) + _item(0x20, context)
            + _item(0x50, user))
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def connect(port: int, timeout_s: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the node sends until it closes the connection (or the socket times out)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_pdu(sock: socket.socket) -> bytes:
    """One whole PDU from the node."""
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            raise ConnectionError(f"closed after {len(header)} header bytes")
        header += chunk
    length = struct.unpack(">L", header[2:6])[0]
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise ConnectionError("closed within a PDU")
        body += chunk
    return header + body


def abort_reason(pdu: bytes) -> tuple[int, int]:
    """(source, reason) of an A-ABORT PDU."""
    assert pdu[0] == 0x07 and len(pdu) == 10, pdu.hex()
    return pdu[8], pdu[9]


# --- memory of the listener processes --------------------------------------------------------

def listener_pids(node: RunningNode) -> list[int]:
    """The node's listener processes, as its log names them."""
    found = re.findall(r"listener processes ready .*?pids=([\d,]+)", node.log_text())
    assert found, "the node did not log its listener processes"
    return [int(p) for p in found[-1].split(",")]


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS of /proc/PID/status), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def listeners_rss_kib(node: RunningNode) -> dict[int, int]:
    return {pid: rss_kib(pid) for pid in listener_pids(node)}


# --- a C-STORE SCU that sends what it is given ----------------------------------------------

@contextmanager
def lenient_uids() -> Iterator[None]:
    """Let pynetdicom put any UID in a command (hostile UIDs are what the tests send)."""
    saved = _config.VALIDATORS["UI"]
    _config.VALIDATORS["UI"] = lambda value: (True, "")
    try:
        yield
    finally:
        _config.VALIDATORS["UI"] = saved


class RawStoreSCU:
    """One association of pynetdicom as SCU, sending C-STORE requests whose command values and
    data set bytes are the caller's, not derived from each other."""

    def __init__(self, node: RunningNode, abstract_syntaxes: tuple[str, ...] = (MR_IMAGE,),
                 calling_aet: str = "FUZZER") -> None:
        ae = AE(ae_title=calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for abstract in abstract_syntaxes:
            ae.add_requested_context(abstract, [ExplicitVRLittleEndian])
            ae.add_requested_context(abstract, [ImplicitVRLittleEndian])
        self.assoc: Association = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert self.assoc.is_established, "the node refused the fuzzer's association"
        self._message_id = 0
        self._pause_reactor()

    def _pause_reactor(self) -> None:
        """Hold the association's reactor until :meth:`release`: it would otherwise take a
        C-STORE response off the DIMSE queue before :meth:`store` does.

        pynetdicom's own pause (clear the checkpoint, wait for ``_is_paused``) races: the
        reactor sets ``_is_paused`` just before waiting on the checkpoint, so a wait that
        began before the clear returns at once while the flag still says paused, and the
        reactor's next turn took a response (one C-STORE of the corpus in a few runs). Here the
        reactor counts as paused only once it is blocked on the cleared checkpoint.
        """
        checkpoint = self.assoc._reactor_checkpoint
        checkpoint.clear()
        deadline = time.monotonic() + 30
        while not (self.assoc._is_paused and checkpoint._cond._waiters):  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "the association's reactor did not pause"
            time.sleep(0.001)

    def _context_id(self, abstract: str, syntax: str) -> int:
        for context in self.assoc.accepted_contexts:
            if context.abstract_syntax == abstract and context.transfer_syntax[0] == syntax:
                assert context.context_id is not None
                return context.context_id
        raise AssertionError(f"no accepted context for {abstract} / {syntax}")

    def store(self, data: bytes, *, sop_class: str, sop_instance: str, syntax: str,
              context_class: str = MR_IMAGE) -> int:
        """Send ``data`` (a data set in ``syntax``) as a C-STORE with these command values on
        the context of ``context_class``; return the response status."""
        self._message_id += 1
        request = C_STORE()
        request.MessageID = self._message_id
        request.Priority = 2
        assoc = self.assoc
        with lenient_uids():  # the request's UIDs, and the response's that echo them
            request.AffectedSOPClassUID = sop_class
            request.AffectedSOPInstanceUID = sop_instance
            request.DataSet = BytesIO(data)
            assoc.dimse.send_msg(request, self._context_id(context_class, syntax))
            _, response = assoc.dimse.get_msg(block=True)  # the reactor is paused
        assert response is not None, "no C-STORE response (association ended?)"
        return int(response.Status)

    def release(self) -> None:
        self.assoc._reactor_checkpoint.set()
        if self.assoc.is_established:
            self.assoc.release()


def stored_bytes(node: RunningNode, sop_instance_uid: str) -> bytes | None:
    """The data set bytes (after the file meta) of the stored instance, or None."""
    with node.session() as session:
        path = session.scalar(select(Instance.path)
                              .where(Instance.sop_instance_uid == sop_instance_uid))
    if path is None:
        return None
    raw = (node.storage / path).read_bytes()
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00", "no meta group length"
    (meta_length,) = struct.unpack_from("<I", raw, 140)
    return raw[144 + meta_length:]


def split_file(raw: bytes) -> tuple[bytes, str]:
    """(data set bytes, transfer syntax UID) of a Part 10 file."""
    from pydicom.filereader import _read_file_meta_info

    fp = BytesIO(raw)
    fp.seek(132)
    meta = _read_file_meta_info(fp)
    return raw[fp.tell():], str(meta.TransferSyntaxUID)


# --- CONFORMANCE.md -------------------------------------------------------------------------

CONFORMANCE = REPO / "CONFORMANCE.md"


def conformance_answer(case: str) -> str:
    """The "node answers" cell of the row of CONFORMANCE.md's hostile-input table (3.3) whose
    first cell is ``case``."""
    for line in CONFORMANCE.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] == case:
            return cells[1]
    raise AssertionError(f"CONFORMANCE.md has no row {case!r}")


def conformance_status(case: str) -> int:
    """The C-STORE status CONFORMANCE.md promises for ``case``."""
    found = re.findall(r"0x([0-9A-F]{4})", conformance_answer(case))
    assert len(found) == 1, f"row {case!r} names {found}, not one status"
    return int(found[0], 16)
