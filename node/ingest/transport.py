"""pynetdicom's transport, with a bounded receive and the hot spots of its DUL reactor tuned.

Receiving: pynetdicom's reactor reads a PDU's 6-byte header and then the length the peer
declares, in one blocking read without limit or deadline (``DULServiceProvider._read_pdu_data``):
six bytes made a listener allocate 4 GiB, half a PDU held a connection forever.
:class:`EventDrivenDUL` reads each PDU with :func:`node.ingest.pdu.read_pdu` instead: a P-DATA-TF
may be as long as the maximum length the node announced (``[dicom].max_pdu_bytes``), any other
PDU :data:`~node.ingest.pdu.ASSOCIATION_PDU_MAX_BYTES`; the body is read with ``recv_into`` into
one buffer, as much as the kernel has per call (a 256 KiB PDU once cost pynetdicom 64
``recv(4096)`` calls, a third of the reactor's CPU), within the network timeout per read. A PDU
declaring more is answered as PS3.8 answers an invalid PDU (Evt19: A-ABORT). The association
request itself is read before pynetdicom sees the connection, within the ACSE timeout
(:mod:`node.ingest.handshake`, called by :class:`NodeRequestHandler`), and handed to the
reactor, which decodes it as if it had read it.

The handler makes each association's DUL reactor an :class:`EventDrivenDUL`. When
pynetdicom's reactor finds nothing to do it sleeps ``_run_loop_delay`` and looks again: with
the 0.2 ms pause the node uses (see ``DUL_LOOP_DELAY_S`` in :mod:`node.ingest.scp`) four open
associations cost about a fifth of a core in wake-ups (a ``nanosleep``, a ``select`` and two
empty-queue exceptions, each time with the GIL), idle or between instances. While the
association is established (state Sta6) and nothing is queued, the subclass instead blocks in
one ``select`` on the connection and a wake-up socket that :meth:`EventDrivenDUL.send_pdu` and
:meth:`EventDrivenDUL.kill_dul` write to: it is woken by the peer's next PDU or by our own
C-STORE response at once (no pause added to either), and at most every :data:`WAIT_S`
otherwise. In every other state (negotiation, release, abort) the loop pauses and polls as
pynetdicom's does.

And each association's DIMSE provider is a :class:`FastDIMSE`: pynetdicom encodes a
C-STORE response by filling a pydicom ``Dataset`` from the primitive and encoding it twice (once
to learn the group length), about 0.25 ms of CPU for seven elements; the subclass packs the same
bytes with ``struct`` (:func:`encode_c_store_rsp`) whenever the response is the plain one the node
sends (no error comment or offending element, no handler bound to ``EVT_DIMSE_SENT``, one
fragment), and leaves everything else to pynetdicom.

It also receives a plain C-STORE request itself (:meth:`FastDIMSE.receive_primitive`): pynetdicom
decodes the command set into a pydicom ``Dataset`` and copies it element by element into the
``C_STORE`` primitive, about 0.1 ms of CPU per instance; the subclass reads the same few
elements with ``struct`` and sets them on the primitive through the same (validating) setters,
in the same order, with the values pydicom would give. Anything but the common form (a command
set in one fragment with exactly the usual elements, a data set, no handler bound to
``EVT_DIMSE_RECV``, no chunked-dataset option) goes to pynetdicom, including a message that turns
unusual half-way: its fragments so far are handed over and decoded from the start.

The association thread's own loop (pynetdicom's ``Association._run_reactor``) sleeps a hard-coded
1 ms and then asks the DIMSE provider for a message without blocking, about five times per
instance and a thousand times a second per idle association. The subclass's ``get_msg`` waits
instead (up to :data:`WAIT_S`) until the reactor hands the association something: a DIMSE
message, or any primitive for the association's own checks (release, abort), both queues
setting one event (:class:`_SignallingQueue`). The loop's checks then run as before, only less
often while nothing happens.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from io import BytesIO
from typing import TYPE_CHECKING, Any, TypeGuard, cast

from pydicom.uid import UID
from pynetdicom import _config, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import RequestHandler

from node.ingest.handshake import receive_association_request
from node.ingest.pdu import PduError, limit_after_association, read_pdu

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger(__name__)


#: Longest block of an idle :class:`EventDrivenDUL` in one ``select``. Nothing in state Sta6
#: needs the reactor sooner: the peer's data, our primitives and kill_dul wake it at once, and
#: the network (idle) timeout is checked by the association thread.
WAIT_S = 0.05
#: Pause of pynetdicom's DUL reactor loop when it has nothing to do, in seconds (pynetdicom's
#: default: 0.001). The loop notices our C-STORE response only after that pause, so it adds up
#: to its length to every instance; 0.2 ms measured +20% instances/s on one association, for
#: about 4% more of a core per open, idle association (3.8% -> 8.0% measured, SCU included).
#: An :class:`EventDrivenDUL` pauses so only outside state Sta6 (its ``_run_loop_delay`` is 0).
DUL_LOOP_DELAY_S = 0.0002


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL reactor, reading PDUs within limits and waiting in ``select`` instead
    of polling while established.

    :meth:`_read_pdu_data` reads with :func:`~node.ingest.pdu.read_pdu` (the module docstring
    says why), starting with the association request already read by the handler.
    :meth:`_is_transport_event` (where the reactor looks at the connection), with nothing queued
    for the state machine or for the peer, waits first, for data from the peer, a wake-up from
    :meth:`send_pdu` / :meth:`kill_dul`, or :data:`WAIT_S`. A primitive that woke it is turned
    into its state-machine event in the same loop, as pynetdicom's next loop would have done.
    Call :meth:`prepare` before the thread starts.
    """

    _wake_r: socket.socket
    _wake_w: socket.socket
    _wake_lock: threading.Lock
    #: The association request read before the reactor started (handshake.py), until decoded.
    _prefetched: bytearray | None = None
    #: The A-ABORT reason for the invalid PDU just read (PS3.8 9.3.8), if any.
    _abort_reason: int | None = None

    def prepare(self, poll_s: float = DUL_LOOP_DELAY_S, request: bytearray | None = None
                ) -> None:
        """Set up the wake-up socket pair (after the class change, before ``start``).

        Args:
            poll_s: the loop's pause outside the established state.
            request: the A-ASSOCIATE-RQ PDU the handler read; decoded first, as if read here.
        """
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_lock = threading.Lock()
        self._poll_s = poll_s
        self._run_loop_delay = 0.0  # our wait in _is_transport_event replaces the loop's pause
        self._prefetched = request
        self._pdu_limit = limit_after_association(self.assoc.ae.maximum_pdu_size)

    def _read_pdu_data(self) -> None:
        """pynetdicom's, reading the PDU with limits (see the module docstring): the events
        it queues and the PDU it hands over are the same."""
        data, self._prefetched = self._prefetched, None
        if data is None:
            try:
                data = self._read_bounded()
            except PduError as exc:
                if exc.abort_reason is None:  # closed, reset or silent: transport closed
                    log.debug("connection ended within a PDU: %s", exc, extra=self._peer())
                    self.event_queue.put("Evt17")
                else:  # an invalid PDU: the state machine answers with A-ABORT (AA-8)
                    log.warning("invalid PDU from the peer: %s", exc, extra=self._peer())
                    self._abort_reason = exc.abort_reason
                    self.event_queue.put("Evt19")
                return
        try:
            pdu, event = self._decode_pdu(data)
        except Exception as exc:
            log.warning("PDU from the peer cannot be decoded: %s", exc, extra=self._peer())
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _send(self, pdu: Any) -> None:
        # pynetdicom's AA-8 sends its A-ABORT with reason 0 (not specified); the peer gets the
        # reason _read_pdu_data found instead.
        if isinstance(pdu, A_ABORT_RQ) and pdu.source == 0x02 and pdu.reason_diagnostic == 0:
            pdu.reason_diagnostic = self._abort_reason or 0
        super()._send(pdu)

    def _read_bounded(self) -> bytearray:
        wrapper = self.socket
        if wrapper is None or wrapper.socket is None:
            raise PduError("no connection")
        if self.state_machine.current_state == "Sta13":
            # Waiting for the peer to close after an abort or reject: the ARTIM timer's time.
            deadline = time.monotonic() + max(0.0, self.artim_timer.remaining)
            return read_pdu(wrapper.socket, self._pdu_limit, deadline=deadline)
        return read_pdu(wrapper.socket, self._pdu_limit, timeout=self.network_timeout)

    def _peer(self) -> dict[str, str]:
        requestor = self.assoc.requestor
        return {"peer": f"{requestor.address}:{requestor.port}"}

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w.fileno() == -1:
                return  # the reactor has ended
            # BlockingIOError: the reactor has wake-ups pending already.
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")

    def send_pdu(self, primitive: object) -> None:  # type: ignore[override]
        super().send_pdu(primitive)  # type: ignore[arg-type]
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def run(self) -> None:
        # Thread.run, not run_reactor: the thread's target was bound before the class changed.
        try:
            super().run()
        finally:
            with self._wake_lock:
                self._wake_w.close()
                self._wake_r.close()

    def _waitable_socket(self) -> socket.socket | None:
        """The connection's socket when the reactor may block on it, else None."""
        if self.state_machine.current_state != "Sta6":
            return None
        wrapper = self.socket
        if wrapper is None or not wrapper._is_connected or wrapper.socket is None:
            return None
        raw = wrapper.socket
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return None  # decrypted data already buffered: select would not see it
        return raw

    def _is_transport_event(self) -> bool:
        if self._prefetched is not None and self.state_machine.current_state == "Sta2":
            self._read_pdu_data()  # the association request the handler read
            return True
        if self._kill_thread or not self.event_queue.empty() or self.to_provider_queue.queue:
            return super()._is_transport_event()
        raw = self._waitable_socket()
        if raw is None:
            time.sleep(self._poll_s)  # pynetdicom's pause, outside the established state
            return super()._is_transport_event()
        try:
            ready, _, _ = select.select([raw, self._wake_r], [], [], WAIT_S)
        except (OSError, ValueError):  # the connection is gone: pynetdicom's check says so
            return super()._is_transport_event()
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                while self._wake_r.recv(4096):
                    pass
        if self.to_provider_queue.queue:
            # Woken by our own primitive (a C-STORE response): queue its event now; the loop
            # then processes it without a pause (pynetdicom's next loop would queue it).
            self._process_recv_primitive()
            return False
        return super()._is_transport_event()


_C_STORE_RSP = 0x8001  # CommandField
_NO_DATA_SET = 0x0101  # CommandDataSetType


def _ui(element: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _us(element: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, element, 2, value)


def encode_c_store_rsp(sop_class_uid: str, sop_instance_uid: str, message_id: int,
                       status: int) -> bytes:
    """The command set of a C-STORE-RSP without a data set, error comment or offending
    element, Implicit VR Little Endian (PS3.7 9.3.1.2, E.1), as pynetdicom encodes it."""
    body = b"".join((
        _ui(0x0002, sop_class_uid),
        _us(0x0100, _C_STORE_RSP),
        _us(0x0120, message_id),
        _us(0x0800, _NO_DATA_SET),
        _us(0x0900, status),
        _ui(0x1000, sop_instance_uid),
    ))
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def _plain_uid(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and bool(value) and value.isascii()


_C_STORE_RQ = 0x0001  # CommandField
#: Elements of the plain C-STORE-RQ command set read by FastDIMSE, with their value length
#: (None: a UID). MoveOriginator* (a C-MOVE sub-operation) and anything else: pynetdicom.
_C_STORE_RQ_ELEMENTS: dict[int, int | None] = {
    0x0000: 4,  # CommandGroupLength
    0x0002: None,  # AffectedSOPClassUID
    0x0100: 2,  # CommandField
    0x0110: 2,  # MessageID
    0x0700: 2,  # Priority
    0x0800: 2,  # CommandDataSetType
    0x1000: None,  # AffectedSOPInstanceUID
}
#: Primitive attributes set from the command set, in tag order (as message_to_primitive does).
_C_STORE_RQ_ATTRIBUTES = (
    (0x0002, "AffectedSOPClassUID"), (0x0110, "MessageID"), (0x0700, "Priority"),
    (0x1000, "AffectedSOPInstanceUID"),
)
_HEADER = struct.Struct("<HHI")
_US = struct.Struct("<H")


def _plain_c_store_rq(command: bytes | memoryview) -> dict[int, Any] | None:
    """The values of a plain C-STORE-RQ command set (Implicit VR Little Endian) as pydicom
    would decode them, or None when it is anything else (then pynetdicom decodes it)."""
    values: dict[int, Any] = {}
    offset, end, last = 0, len(command), -1
    while offset < end:
        if end - offset < 8:
            return None
        group, element, length = _HEADER.unpack_from(command, offset)
        offset += 8
        if group != 0x0000 or element <= last or element not in _C_STORE_RQ_ELEMENTS:
            return None
        last = element
        expected = _C_STORE_RQ_ELEMENTS[element]
        if offset + length > end or (expected is not None and length != expected):
            return None
        raw = bytes(command[offset:offset + length])
        offset += length
        if expected is None:
            if not raw.isascii() or b"\\" in raw:
                return None  # pydicom would make a multi-value or decode it as Latin-1
            text = raw.decode("ascii").rstrip("\0 ")
            if not text:
                return None
            values[element] = UID(text)
        elif expected == 2:
            values[element] = _US.unpack(raw)[0]
    if set(values) != {0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000}:
        return None
    if values[0x0100] != _C_STORE_RQ or values[0x0800] == _NO_DATA_SET:
        return None
    # Values the primitive's setters would refuse (they log and raise): pynetdicom's path, so
    # that its log lines and its handling (Evt19) stay exactly its own.
    if values[0x0700] not in (0, 1, 2):
        return None
    validate = _config.VALIDATORS["UI"]
    if not (validate(values[0x0002])[0] and validate(values[0x1000])[0]):
        return None
    return values


class _SignallingQueue(queue.Queue[Any]):
    """A queue that also sets ``signal`` when something is put on it."""

    def __init__(self, signal: threading.Event) -> None:
        super().__init__()
        self.signal = signal

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.signal.set()


class FastDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, sending plain C-STORE responses without pydicom and
    letting the association thread wait for work. Call :meth:`prepare` before the
    association starts."""

    _activity: threading.Event

    def prepare(self, dul: DULServiceProvider) -> None:
        """Replace the (still empty) message queue and ``dul``'s queue to the association
        with queues that set one event."""
        self._activity = threading.Event()
        self.msg_queue = _SignallingQueue(self._activity)
        dul.to_user_queue = _SignallingQueue(self._activity)

    #: Fragments (context ID, PDV data) of the C-STORE-RQ being received by the fast path,
    #: its command values and context ID; None while pynetdicom decodes (or nothing is due).
    _fast_pdvs: list[tuple[int, bytes]] | None = None
    _fast_values: dict[int, Any]
    _fast_context: int

    def receive_primitive(self, primitive: Any) -> None:
        pdvs = primitive.presentation_data_value_list
        if self._fast_pdvs is None:
            values = None if self.message is not None or not pdvs else self._plain(pdvs[0])
            if values is None:
                super().receive_primitive(primitive)
                return
            self._fast_values = values
            self._fast_context = pdvs[0][0]
            self._fast_pdvs = [pdvs[0]]
            pdvs = pdvs[1:]
        for index, (context_id, data) in enumerate(pdvs):
            if not data or data[0] & 1:  # empty, or a command fragment in the data set
                self._hand_over(pdvs[index:])
                return
            self._fast_pdvs.append((context_id, data))
            if data[0] & 2:  # the last fragment: the rest of this P-DATA is ignored, as in
                self._deliver()  # pynetdicom
                return

    def _plain(self, first: tuple[int, bytes]) -> dict[int, Any] | None:
        """The command values when ``first`` starts a plain C-STORE-RQ the fast path takes."""
        data = first[1]
        if not data or data[0] & 3 != 3 or _config.STORE_RECV_CHUNKED_DATASET:
            return None  # not a whole command set in one fragment
        if self.assoc.get_handlers(evt.EVT_DIMSE_RECV):
            return None
        return _plain_c_store_rq(memoryview(data)[1:])

    def _hand_over(self, rest: list[tuple[int, bytes]]) -> None:
        """Give pynetdicom the message so far (and ``rest``), to decode from the start."""
        pdvs, self._fast_pdvs = self._fast_pdvs or [], None
        replay = P_DATA()
        replay.presentation_data_value_list.extend([*pdvs, *rest])  # as encode_msg fills it
        super().receive_primitive(replay)

    def _deliver(self) -> None:
        """message_to_primitive and the queueing of pynetdicom's receive_primitive."""
        pdvs, self._fast_pdvs = self._fast_pdvs or [], None
        data_set = BytesIO(b"".join(memoryview(data)[1:] for _, data in pdvs[1:]))
        data_set.seek(0, 2)  # where pynetdicom's written BytesIO is left
        try:
            request = C_STORE()
            for element, name in _C_STORE_RQ_ATTRIBUTES:
                setattr(request, name, self._fast_values[element])
        except Exception:  # not expected (values checked): pynetdicom decodes and decides
            self._fast_pdvs = pdvs
            self._hand_over([])
            return
        request.DataSet = data_set
        request._context_id = self._fast_context
        request._dataset_path = None
        request._dataset_file = None
        self.msg_queue.put((self._fast_context, request))

    def get_msg(self, block: bool = False) -> Any:
        if block:
            return super().get_msg(block)
        try:
            return self.msg_queue.get_nowait()
        except queue.Empty:
            pass
        # Nothing yet: wait for the reactor (a message, or a release or abort primitive for the
        # association loop's checks) instead of returning to a 1 ms sleep.
        self._activity.wait(WAIT_S)
        self._activity.clear()
        try:
            return self.msg_queue.get_nowait()
        except queue.Empty:
            return None, None

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if (
            type(primitive) is C_STORE
            and isinstance(primitive.MessageIDBeingRespondedTo, int)
            and isinstance(primitive.Status, int)
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and _plain_uid(primitive.AffectedSOPClassUID)
            and _plain_uid(primitive.AffectedSOPInstanceUID)
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            command = encode_c_store_rsp(
                primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID,
                primitive.MessageIDBeingRespondedTo, primitive.Status)
            max_pdu = self.maximum_pdu_size
            if max_pdu == 0 or len(command) <= max_pdu - 6:
                pdata = P_DATA()
                # Message control header 0x03: command information, last fragment.
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


class NodeRequestHandler(RequestHandler):
    """pynetdicom's request handler: the association request first (read within the ACSE
    timeout, :mod:`node.ingest.handshake`), then the association, with an
    :class:`EventDrivenDUL` and a :class:`FastDIMSE`.

    The server may carry ``waiting`` (a :class:`~node.ingest.handshake.WaitingConnections`)
    and ``connection_ended`` (called when an adopted connection ends; see
    :mod:`node.ingest.dispatch`).
    """

    def handle(self) -> None:
        sock = self.request
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        request = receive_association_request(sock, peer, float(self.ae.acse_timeout or 30.0),
                                              getattr(self.server, "waiting", None))
        if request is None:
            self.server.shutdown_request(sock)
            ended = getattr(self.server, "connection_ended", None)
            if ended is not None:
                ended()
            return
        assoc = self._create_association(request)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()

    def _create_association(self, request: bytearray | None = None) -> Association:
        assoc = super()._create_association()
        dul = assoc.dul
        if type(dul) is DULServiceProvider and not dul.is_alive():
            dul.__class__ = EventDrivenDUL  # its own state is set up by prepare()
            cast(EventDrivenDUL, dul).prepare(request=request)
        dimse = assoc.dimse
        if type(dimse) is DIMSEServiceProvider and dimse.msg_queue.empty():
            dimse.__class__ = FastDIMSE  # its own state is set up by prepare()
            cast(FastDIMSE, dimse).prepare(dul)
        ended = getattr(self.server, "connection_ended", None)
        if ended is not None:  # a dispatched connection (node/ingest/dispatch.py)
            run = assoc.run

            def run_then_report() -> None:
                try:
                    run()
                finally:
                    ended()

            assoc.run = run_then_report  # type: ignore[method-assign]
        return assoc
