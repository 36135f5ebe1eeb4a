"""The scanner of series rows stored before ingest recorded it, read from their stored files.

Revision ``0011_series_scanner`` gave the series row Station Name, Manufacturer and Model
Name. Rows stored before it stay empty, so after an upgrade the Scanners page shows a
gateway's older series as one anonymous scanner, and a ``station_name`` routing rule or
``calibrate --from-queue --station`` cannot see them. The worker fills a row when it scores
that series again; ``vaenode db fill-scanners`` fills every such row at once, from the first
stored instance of each series, read by ingest's own walker so that the values are decoded
and clipped exactly as a newly received instance's are. It only sets columns that are empty
(``repo.fill_series_columns``), so it is safe while the node runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.errors import IngestError
from node.ingest.parse import parse_instance
from node.queue import repo
from node.queue.models import Instance, Series

log = logging.getLogger(__name__)

SCANNER_COLUMNS = ("station_name", "manufacturer", "scanner_model")


@dataclass(frozen=True)
class ScannerFill:
    """What one run found among the rows whose three scanner columns are all empty."""

    lacking: int
    filled: int
    #: Their first stored instance names no scanner either (nothing to fill).
    named_none: int
    #: No stored file to read: the retention job deleted the images, or the file is missing
    #: or unreadable (logged with its path).
    no_file: int


#: (series id, Series Instance UID, images purged, first instance's stored path)
LackingRow = tuple[int, str, bool, str | None]


def series_lacking_scanner(session: Session) -> list[LackingRow]:
    """Every series row whose scanner columns are all empty, oldest first."""
    first = (select(Instance.path).where(Instance.series_id == Series.id)
             .order_by(Instance.id).limit(1).scalar_subquery())
    rows = session.execute(
        select(Series.id, Series.series_instance_uid, Series.purged_at.is_not(None), first)
        .where(*(getattr(Series, c).is_(None) for c in SCANNER_COLUMNS))
        .order_by(Series.id))
    return [(i, uid, bool(purged), path) for i, uid, purged, path in rows]


def fill_scanner_columns(
    factory: sessionmaker[Session],
    storage_dir: Path,
    lacking: Iterable[LackingRow],
    *,
    dry_run: bool = False,
) -> ScannerFill:
    """Fill the scanner columns of the given rows (:func:`series_lacking_scanner`, perhaps
    behind a progress bar) from each one's first stored file; ``dry_run`` reads and counts but
    writes nothing."""
    seen = filled = named_none = no_file = 0
    for series_id, uid, purged, path in lacking:
        seen += 1
        values = None if purged or path is None else _read_scanner(storage_dir / path, uid)
        if values is None:
            no_file += 1
        elif not values:
            named_none += 1
        else:
            filled += 1
            if not dry_run:
                with factory() as session:
                    repo.fill_series_columns(session, series_id, values)
                log.info("scanner filled from the stored instance",
                         extra={"series_uid": uid, **values})
    return ScannerFill(seen, filled, named_none, no_file)


def _read_scanner(path: Path, series_uid: str) -> dict[str, str] | None:
    """The scanner values the stored instance names ({} when none), None when unreadable."""
    try:
        parsed = parse_instance(path.read_bytes())
    except (OSError, IngestError) as exc:
        log.warning("stored instance unreadable, scanner not filled",
                    extra={"series_uid": series_uid, "path": str(path), "error": str(exc)})
        return None
    return {c: v for c in SCANNER_COLUMNS if (v := getattr(parsed, c))}
