"""The node's only SCU: send one stored report file to one destination with C-STORE.

One association per report and destination: reports are few and small, and a fresh association
keeps a failure confined to the report that met it. Every failure (no connection, association
rejected or aborted, presentation context refused, a failure status) becomes a
:class:`~node.errors.DeliveryError` whose message says which, for the outbox row's
``last_error``; retrying and recording attempts is the outbox's job (``report/outbox.py``).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association

from node.config import TlsSettings
from node.errors import DeliveryError

log = logging.getLogger(__name__)

#: C-STORE statuses that mean "stored" (PS3.4 B.2.3): success and the warnings (coercion of
#: data elements 0xB000, elements discarded 0xB006, data set does not match SOP class 0xB007).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


@dataclass(frozen=True)
class Target:
    """Where a report goes: the called AE title, host, port and optional TLS."""

    ae_title: str
    host: str
    port: int
    tls: TlsSettings | None = None

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Timeouts:
    """Network timeouts of the SCU, in seconds."""

    acse_s: float = 30.0
    dimse_s: float = 60.0
    network_s: float = 60.0


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """A client TLS context: verify the peer against ``ca_file`` (or the system store) and
    present ``cert_file``/``key_file`` when configured (PS3.15 Annex B secure transport)."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
    )
    if tls.cert_file:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    return ctx


def _why_not_established(assoc: Association, target: Target, connected: bool) -> str:
    if not connected:
        if target.tls is not None and target.tls.enabled:
            return f"cannot connect to {target} (refused, timed out, or TLS handshake failed)"
        return f"cannot connect to {target} (connection refused or timed out)"
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        if rsp is not None:
            return (
                f"association rejected by {target}: {rsp.result_str}, source {rsp.source_str}, "
                f"reason {rsp.reason_str}"
            )
        return f"association rejected by {target}"
    if assoc.rejected_contexts:
        refused = ", ".join(sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts}))
        return f"{target} refused the presentation context for {refused}; association aborted"
    return f"association with {target} aborted by the peer or timed out"


def send_file(path: Path, target: Target, *, calling_ae_title: str, timeouts: Timeouts) -> int:
    """C-STORE the DICOM file at ``path`` to ``target``.

    Args:
        path: a report file written by ``report/service.py`` (with file meta).
        target: the destination.
        calling_ae_title: our AE title as the caller.
        timeouts: ACSE, DIMSE and network timeouts.

    Returns:
        The C-STORE status (one of :data:`STORED_STATUSES`).

    Raises:
        DeliveryError: the file cannot be read, or the peer did not store it; the message says
            why, fit for a person.
    """
    try:
        ds = dcmread(path)
    except (OSError, ValueError) as exc:
        raise DeliveryError(f"cannot read report file {path}: {exc}") from exc

    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeouts.acse_s
    ae.dimse_timeout = timeouts.dimse_s
    ae.network_timeout = timeouts.network_s
    syntaxes = list(
        dict.fromkeys(
            [ds.file_meta.TransferSyntaxUID, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
    )
    ae.add_requested_context(ds.SOPClassUID, syntaxes)

    tls_args = None
    if target.tls is not None and target.tls.enabled:
        try:
            tls_args = (tls_context(target.tls), target.host)
        except (OSError, ssl.SSLError) as exc:
            raise DeliveryError(f"TLS set-up for {target} failed: {exc}") from exc

    extra = {"sop_instance_uid": ds.SOPInstanceUID, "peer": str(target)}
    opened: list[bool] = []
    assoc = ae.associate(
        target.host,
        target.port,
        ae_title=target.ae_title,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: opened.append(True))],
    )
    if not assoc.is_established:
        raise DeliveryError(_why_not_established(assoc, target, connected=bool(opened)))
    try:
        status = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or "Status" not in status:
        raise DeliveryError(
            f"no C-STORE response from {target} (timeout, or the association was aborted)"
        )
    code = int(status.Status)
    if code not in STORED_STATUSES:
        comment = status.get("ErrorComment", "")
        raise DeliveryError(
            f"{target} answered C-STORE with status 0x{code:04X}"
            + (f": {comment}" if comment else "")
        )
    log.info("report stored at destination", extra={**extra, "status": f"0x{code:04X}"})
    return code
