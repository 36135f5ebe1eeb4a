"""The receive path of our pynetdicom transport (node/ingest/transport.py)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from io import BytesIO
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pynetdicom import AE, _config, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from node.ingest.transport import (
    EventDrivenDUL,
    FastDIMSE,
    NodeRequestHandler,
    encode_c_store_rsp,
)


def test_associations_of_our_server_use_our_reactor_and_dimse() -> None:
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
    assert seen[0] == (AssociationSocket, EventDrivenDUL, FastDIMSE)


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
    dimse = FastDIMSE.__new__(FastDIMSE)
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


# --- C-STORE-RQ received by FastDIMSE: what pynetdicom's own decoding gives -----------------

_CT = "1.2.840.10008.5.1.4.1.1.2"


def _store_rq_pdata(instance_uid: str = "1.2.3.4.5", *, message_id: int = 7, priority: int = 2,
                    data: bytes = b"\x08\x00\x16\x00" + b"x" * 5000, max_pdu: int = 2048,
                    class_uid: str = _CT, move: bool = False) -> list[Any]:
    rq = C_STORE()
    rq.MessageID = message_id
    rq.AffectedSOPClassUID = class_uid
    rq.AffectedSOPInstanceUID = instance_uid
    rq.Priority = priority
    if move:
        rq.MoveOriginatorApplicationEntityTitle = "MOVER"
        rq.MoveOriginatorMessageID = 3
    rq.DataSet = BytesIO(data)
    message = C_STORE_RQ()
    message.primitive_to_message(rq)
    return list(message.encode_msg(5, max_pdu))


def _raw_store_rq(instance_uid: bytes, *, priority: int = 2) -> list[Any]:
    """A C-STORE-RQ whose command set is packed by hand (values pynetdicom refuses to send)."""
    def element(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0, tag, len(value)) + value
    body = b"".join((
        element(0x0002, _CT.encode() + b"\0"), element(0x0100, struct.pack("<H", 1)),
        element(0x0110, struct.pack("<H", 9)), element(0x0700, struct.pack("<H", priority)),
        element(0x0800, struct.pack("<H", 0x0001)), element(0x1000, instance_uid),
    ))
    command, data = P_DATA(), P_DATA()
    command.presentation_data_value_list.append(
        (5, b"\x03" + element(0x0000, struct.pack("<I", len(body))) + body))
    data.presentation_data_value_list.append((5, b"\x02" + b"\x08\x00" * 50))
    return [command, data]


def _receivers(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")
    ae = AE()
    stock = Association(ae, MODE_ACCEPTOR)
    fast = Association(ae, MODE_ACCEPTOR)
    fast.dimse.__class__ = FastDIMSE
    fast.dimse.prepare(fast.dul)
    return stock, fast


def _outcome(assoc: Any, pdatas: list[Any]) -> list[Any]:
    """What the DIMSE provider did with the P-DATA: queued messages (their context ID and
    primitive's attributes), state-machine events, or the exception it raised."""
    try:
        for pdata in pdatas:
            assoc.dimse.receive_primitive(pdata)
    except Exception as exc:  # pynetdicom's own failures must be the same
        return [type(exc), str(exc)]
    out: list[Any] = []
    while not assoc.dimse.msg_queue.empty():
        context_id, request = assoc.dimse.msg_queue.get_nowait()
        out.append((context_id, type(request), request.MessageID,
                    request.AffectedSOPClassUID, type(request.AffectedSOPClassUID),
                    request.AffectedSOPInstanceUID, request.Priority,
                    request.MoveOriginatorApplicationEntityTitle,
                    request.MoveOriginatorMessageID, request.DataSet.getvalue(),
                    request.DataSet.tell(), request._context_id))
    out.append(list(assoc.dul.event_queue.queue))
    # A message begun and not finished (by pynetdicom, or by the fast path).
    out.append(assoc.dimse.message is not None
               or getattr(assoc.dimse, "_fast_pdvs", None) is not None)
    return out


def _merged(pdatas: list[Any]) -> list[Any]:
    """The same PDVs, two per P-DATA."""
    merged = []
    for i in range(0, len(pdatas), 2):
        pdata = P_DATA()
        for part in pdatas[i:i + 2]:
            pdata.presentation_data_value_list.extend(part.presentation_data_value_list)
        merged.append(pdata)
    return merged


def _with_pdv(pdatas: list[Any], index: int, pdv: tuple[int, bytes]) -> list[Any]:
    extra = P_DATA()
    extra.presentation_data_value_list.append(pdv)
    return [*pdatas[:index], extra, *pdatas[index:]]


_CASES = {
    "plain": _store_rq_pdata(),
    "odd uid": _store_rq_pdata("1.2.3.4.56"),
    "64-character uid": _store_rq_pdata("1.2.826.0.1.3680043.8.498." + "1" * 38),
    "one fragment": _store_rq_pdata(max_pdu=0),
    "high priority, message 65535": _store_rq_pdata(priority=1, message_id=65535),
    "two per P-DATA": _merged(_store_rq_pdata()),
    "move originator": _store_rq_pdata(move=True),
    "uid too long": _raw_store_rq(b"1." + b"2" * 70),
    "bad priority": _raw_store_rq(b"1.2.3.4", priority=5),
    "uid with trailing space": _raw_store_rq(b"1.2.3.4 "),
    "uid with two values": _raw_store_rq(b"1.2.3\\1.2.4"),
    "uid not ascii": _raw_store_rq("1.2.3.\u00e9".encode("latin-1") + b"\0"),
    "uid empty": _raw_store_rq(b""),
    "uid of nulls": _raw_store_rq(b"\0\0"),
    "command fragment in the data": _with_pdv(_store_rq_pdata(), 2, (5, b"\x03abc")),
    "empty fragment in the data": _with_pdv(_store_rq_pdata(), 2, (5, b"")),
    "two messages": _store_rq_pdata() + _store_rq_pdata("1.2.3.4.6", message_id=8),
    "two messages, two PDVs per P-DATA": _merged(
        _store_rq_pdata(max_pdu=0) + _store_rq_pdata("1.2.3.4.6", message_id=8, max_pdu=0)),
    "plain then move originator then plain": _store_rq_pdata() + _store_rq_pdata(move=True)
    + _store_rq_pdata("1.2.3.4.7", message_id=9),
    "empty data set": _store_rq_pdata(data=b""),
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_c_store_requests_are_received_as_pynetdicom_receives_them(
        case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    stock, fast = _receivers(monkeypatch)
    expected = _outcome(stock, _CASES[case])
    assert _outcome(fast, _CASES[case]) == expected
    if case == "plain":
        assert expected[0][9] == b"\x08\x00\x16\x00" + b"x" * 5000


def test_a_handler_on_dimse_recv_gets_pynetdicoms_message(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    _, fast = _receivers(monkeypatch)
    seen: list[Any] = []
    fast.bind(evt.EVT_DIMSE_RECV, lambda event: seen.append(type(event.message)))
    _outcome(fast, _store_rq_pdata())
    assert seen == [C_STORE_RQ]
