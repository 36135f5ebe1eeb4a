"""Report a scored series: build SR (+ KOS), store the files, queue their delivery.

A series scored again supersedes its earlier reports: their deliveries still pending are
withdrawn, the new SR names the earlier SRs as predecessors, and a "Quality Issue" KOS that
already reached a destination is withdrawn there by an IOCM rejection note
(``build.build_rejection_note``), sent to those destinations only.

The worker builds the reports first (:func:`prepare_reports`, seconds of CPU, no lock held),
then calls :func:`report_series` inside its own transaction, together with marking the series
done, so that a series is either done with its reports queued, or not done at all: a crash in
between leaves at most orphan report files on disk (never rows pointing at missing files), and
the series is scored and reported again, once.

Files go to ``<storage.dir>/reports/<StudyUID>/<ReportSeriesUID>/<SOPUID>.dcm`` through a
temporary file, fsync and rename, like received instances.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node import __version__
from node.config import Destination, Settings
from node.errors import ReportError
from node.ingest.store import REPORT_TEMP_PREFIX
from node.queue.models import Instance, Report, Series
from node.report import outbox
from node.report.build import ReportIdentity, build_kos, build_rejection_note, build_sr
from node.report.content import SeriesVerdict

log = logging.getLogger(__name__)

REPORTS_DIR = "reports"


def identity_of(settings: Settings) -> ReportIdentity:
    """The node as the author of its reports."""
    return ReportIdentity(ae_title=settings.dicom.ae_title, software_version=__version__)


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file is either absent or complete, and durable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=REPORT_TEMP_PREFIX, suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def load_sources(session: Session, settings: Settings, series: Series) -> list[Dataset]:
    """The stored headers (no pixel data) of the series' instances, from the storage folder."""
    rows = session.scalars(select(Instance).where(Instance.series_id == series.id)).all()
    out: list[Dataset] = []
    for row in rows:
        try:
            out.append(dcmread(settings.storage.dir / row.path, stop_before_pixels=True))
        except (OSError, ValueError) as exc:
            raise ReportError(f"cannot read stored instance {row.sop_instance_uid}: {exc}") from exc
    return out


def _predecessor(report: Report, study_instance_uid: str) -> Dataset:
    # What the Predecessor Documents Sequence needs, from the row: no need to read the file.
    ds = Dataset()
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = report.series_instance_uid
    ds.SOPClassUID = report.sop_class_uid
    ds.SOPInstanceUID = report.sop_instance_uid
    return ds


@dataclass(frozen=True)
class PreparedReports:
    """Reports built and encoded, not yet stored: the expensive half of reporting.

    Attributes:
        series_instance_uid: the scored series.
        sr: the SR and its encoded bytes.
        kos: the KOS and its bytes, or None when no image is flagged.
        supersedes: ids of the report rows that existed when these were built; the new SR
            names the SRs among them as predecessors.
    """

    series_instance_uid: str
    sr: tuple[Dataset, bytes]
    kos: tuple[Dataset, bytes] | None
    supersedes: tuple[int, ...]


def _find_series(session: Session, series_instance_uid: str) -> Series:
    series = session.scalar(select(Series).where(Series.series_instance_uid == series_instance_uid))
    if series is None:
        raise ReportError(f"series {series_instance_uid} is not in the queue database")
    return series


def _earlier(session: Session, series: Series) -> list[Report]:
    return list(
        session.scalars(select(Report).where(Report.series_id == series.id).order_by(Report.id))
    )


def prepare_reports(
    session_factory: sessionmaker[Session],
    settings: Settings,
    verdict: SeriesVerdict,
    sources: Sequence[Dataset] | None = None,
) -> PreparedReports:
    """Build and encode the SR (and KOS) of a scored series; reads the database, writes nothing.

    Building and encoding the report of a 150-slice series takes about 2 s. This reads what
    it needs in a short transaction of its own and builds after it has ended, so that the
    database's write lock (with SQLite: the whole file, ingest included) is not held meanwhile.
    Call it before the transaction that stores the verdict and pass the result to
    :func:`report_series`.

    Raises:
        ReportError: the series is unknown, or the reports cannot be built from the sources.
    """
    with session_factory() as session:
        series = _find_series(session, verdict.series_instance_uid)
        earlier = _earlier(session, series)
        if sources is None:
            sources = load_sources(session, settings, series)
    return _build(settings, verdict, sources, earlier)


def _build(
    settings: Settings, verdict: SeriesVerdict, sources: Sequence[Dataset], earlier: list[Report]
) -> PreparedReports:
    next_number = {
        kind: max((r.instance_number for r in earlier if r.kind == kind), default=0) + 1
        for kind in ("SR", "KOS")
    }
    identity = identity_of(settings)
    sr = build_sr(
        verdict,
        sources,
        identity=identity,
        instance_number=next_number["SR"],
        previous=[_predecessor(r, verdict.study_instance_uid) for r in earlier if r.kind == "SR"],
    )
    kos = build_kos(verdict, sources, identity=identity, instance_number=next_number["KOS"])
    return PreparedReports(
        series_instance_uid=verdict.series_instance_uid,
        sr=(sr, _encode(sr)),
        kos=(kos, _encode(kos)) if kos is not None else None,
        supersedes=tuple(r.id for r in earlier),
    )


def _store(
    session: Session,
    settings: Settings,
    series: Series,
    kind: str,
    doc: Dataset,
    data: bytes,
    destinations: Sequence[Destination] | None = None,
) -> Report:
    rel = (
        Path(REPORTS_DIR)
        / doc.StudyInstanceUID
        / doc.SeriesInstanceUID
        / (f"{doc.SOPInstanceUID}.dcm")
    )
    write_atomically(settings.storage.dir / rel, data)
    report = Report(
        series_id=series.id,
        kind=kind,
        sop_instance_uid=str(doc.SOPInstanceUID),
        sop_class_uid=str(doc.SOPClassUID),
        series_instance_uid=str(doc.SeriesInstanceUID),
        instance_number=int(doc.InstanceNumber),
        path=str(rel),
        superseded=False,
    )
    session.add(report)
    outbox.enqueue(session, report, list(
        settings.delivery.destinations if destinations is None else destinations))
    return report


#: What a rejection note copies from the new SR into its references to the stale KOS (same
#: study): the patient and study attributes the KOS document header is made from.
_STUDY_KEYWORDS = ("SpecificCharacterSet", "StudyInstanceUID", "PatientName", "PatientID",
                   "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
                   "StudyTime", "ReferringPhysicianName")


def _withdraw_delivered_flags(
    session: Session,
    settings: Settings,
    series: Series,
    verdict: SeriesVerdict,
    sr: Dataset,
    earlier: list[Report],
    delivered: dict[int, set[str]],
) -> Report | None:
    """Store and queue the rejection note of the stale KOS that reached a destination."""
    stale = [r for r in earlier if r.id in delivered]
    names = set().union(*delivered.values()) if delivered else set()
    targets = [d for d in settings.delivery.destinations if d.name in names]
    if not stale or not targets:
        return None
    refs = []
    for r in stale:
        ref = Dataset()
        for keyword in _STUDY_KEYWORDS:
            if keyword in sr:
                setattr(ref, keyword, sr[keyword].value)
        ref.SeriesInstanceUID = r.series_instance_uid
        ref.SOPClassUID = r.sop_class_uid
        ref.SOPInstanceUID = r.sop_instance_uid
        refs.append(ref)
    number = max((r.instance_number for r in earlier if r.kind == "REJECT"), default=0) + 1
    note = build_rejection_note(verdict, refs, identity=identity_of(settings),
                                instance_number=number)
    return _store(session, settings, series, "REJECT", note, _encode(note), targets)


def report_series(
    session: Session,
    settings: Settings,
    verdict: SeriesVerdict,
    sources: Sequence[Dataset] | None = None,
    prepared: PreparedReports | None = None,
) -> list[Report]:
    """Store and queue the reports of one scored series, in the caller's transaction.

    Earlier reports of the series are marked superseded; the new SR names the earlier SRs as
    its predecessors and takes the next instance number in the same report series. When the
    current "Quality Issue" KOS had reached destinations (or was being sent), a rejection note
    withdrawing it is queued for those destinations.

    Args:
        session: the caller's session; nothing is committed here.
        settings: storage folder, destinations and the node's AE title.
        verdict: the scores.
        sources: the scored instances' datasets (headers suffice); read from storage when None.
        prepared: the reports from :func:`prepare_reports`, built outside the transaction.
            Built here when None, or when another report of the series was stored since.

    Returns:
        The new report rows: the SR, then the KOS when any image is flagged, then the
        rejection note when a delivered KOS is withdrawn.

    Raises:
        ReportError: the series is unknown, or the reports cannot be built from the sources.
    """
    series = _find_series(session, verdict.series_instance_uid)
    earlier = _earlier(session, series)
    if (
        prepared is None
        or prepared.series_instance_uid != verdict.series_instance_uid
        or prepared.supersedes != tuple(r.id for r in earlier)
    ):
        if sources is None:
            sources = load_sources(session, settings, series)
        prepared = _build(settings, verdict, sources, earlier)
    delivered = outbox.delivered_destinations(
        session, [r.id for r in earlier if r.kind == "KOS" and not r.superseded])
    for old in earlier:
        old.superseded = True
    withdrawn = outbox.withdraw_superseded(session, [r.id for r in earlier])
    sr, sr_bytes = prepared.sr
    reports = [_store(session, settings, series, "SR", sr, sr_bytes)]
    if prepared.kos is not None:
        kos, kos_bytes = prepared.kos
        reports.append(_store(session, settings, series, "KOS", kos, kos_bytes))
    note = _withdraw_delivered_flags(session, settings, series, verdict, sr, earlier, delivered)
    if note is not None:
        reports.append(note)
    session.flush()
    log.info(
        "series reported: %d/%d images flagged, %d destination(s)",
        verdict.abnormal_slices,
        len(verdict.slices),
        len(settings.delivery.destinations),
        extra={
            "series_instance_uid": verdict.series_instance_uid,
            "sr_sop_instance_uid": sr.SOPInstanceUID,
            "kos": prepared.kos is not None,
            "supersedes": sum(1 for r in earlier if r.kind == "SR"),
            "withdrawn_deliveries": withdrawn,
            "rejection_note": note.sop_instance_uid if note is not None else None,
        },
    )
    return reports
