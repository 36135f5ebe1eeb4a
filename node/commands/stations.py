"""Station references on the command line: how ``vaenode queue senders`` prints them and the
series each learned from, and ``vaenode queue recalibrate``.

Kept apart from the queue command's other listings: a reference has a wide table of its own,
and an admin auditing one after calibration needs its learning series, each with what the
calibration did with it (used, left out as an outlier, excluded), its verdict out of the box
and its review, to decide whether a bad one should be reported and the reference rebuilt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from node.commands.common import iso
from node.errors import NodeError

if TYPE_CHECKING:  # the command line imports the database layer only when it runs
    from sqlalchemy.orm import Session

    from node.config import LearningSettings
    from node.queue.references import LearnedSeries, ReferenceView


def learned_dict(series: LearnedSeries) -> dict[str, Any]:
    """One learning series as ``queue senders --json`` prints it."""
    return {"series_instance_uid": series.series_instance_uid,
            "series_description": series.description, "scored_at": iso(series.scored_at),
            "abnormal": series.abnormal, "review": series.review, "role": series.role,
            "images_deleted": series.purged}


def reference_dict(view: ReferenceView, needed: int,
                   learned: list[LearnedSeries] | None = None) -> dict[str, Any]:
    """A station reference as ``queue senders --json`` prints it (with ``learned``, its
    learning series)."""
    key = view.key
    out = {
        "reference_id": view.id, "station": key.station, "station_source": key.station_source,
        "scanner_model": key.scanner_model, "protocol": key.protocol,
        "model": f"{key.model_name} {key.model_version}", "state": view.state,
        "series_learned": view.learned, "series_needed": needed,
        "created_at": iso(view.created_at), "calibrated_at": iso(view.calibrated_at),
        "centre": view.centre, "low": view.low, "series_used": view.series_used,
        "series_trimmed": view.series_trimmed, "series_flagged": view.series_flagged,
        "min_flagged": view.min_flagged, "series_edge": view.series_edge,
        "image_edge": view.image_edge, "note": view.note,
    }
    if learned is not None:
        out["learning_series"] = [learned_dict(s) for s in learned]
    return out


def reference_lines(views: list[ReferenceView], needed: int,
                    learned: dict[int, list[LearnedSeries]] | None = None) -> list[str]:
    """The references table (with ``learned``, each reference's learning series below it).

    Columns: IMAGE, the image edge, below which an image of a series judged normal is
    flagged (in a series judged abnormal, below LOW; none before revision 0019). FROM, what
    makes one of its series abnormal: a 10th-percentile referred score below this series
    edge, or (references from before revision 0018) this many slices below the low (the
    routing rule's count applies where it is more). FLAGS, of its kept learning series, how
    many a reference built from the others flags (each left out in turn): the station's
    expected false-alarm share once calibrated.
    """
    from node.queue.references import REVIEW_WORDS, role_words

    lines = [f"{'STATION':<16} {'MODEL':<16} {'PROTOCOL':<24} {'STATE':<10} "
             f"{'LEARNED':>7}  {'CALIBRATED (UTC)':<16} {'CENTRE':>10} {'LOW':>10} "
             f"{'IMAGE':>10} {'FROM':>9} {'FLAGS':>7}  BUNDLE"]
    for v in views:
        when = f"{v.calibrated_at:%Y-%m-%d %H:%M}" if v.calibrated_at else "-"
        centre = f"{v.centre:10.4g}" if v.centre is not None else f"{'-':>10}"
        low = f"{v.low:10.4g}" if v.low is not None else f"{'-':>10}"
        least = (f"{v.series_edge:.4g}" if v.series_edge is not None
                 else str(v.min_flagged) if v.min_flagged is not None else "-")
        flags = (f"{v.series_flagged}/{v.series_used}"
                 if v.series_flagged is not None and v.series_used else "-")
        image = f"{v.image_edge:10.4g}" if v.image_edge is not None else f"{'-':>10}"
        lines.append(f"{v.key.station:<16} {(v.key.scanner_model or '-'):<16} "
                     f"{(v.key.protocol or '-'):<24} {v.state:<10} "
                     f"{f'{min(v.learned, needed)}/{needed}':>7}  {when:<16} {centre} {low} "
                     f"{image} {least:>9} {flags:>7}  "
                     f"{v.key.model_name} {v.key.model_version}"
                     + (f"\n    {v.note}" if v.note else ""))
        for s in (learned or {}).get(v.id, []):
            scored = f"{s.scored_at:%Y-%m-%d %H:%M}" if s.scored_at else "-"
            lines.append(f"    {scored}  {s.series_instance_uid}  "
                         f"{'abnormal' if s.abnormal else 'normal'} out of the box"
                         f"{REVIEW_WORDS.get(s.review or '', '')}"
                         f"{', images deleted' if s.purged else ''}: "
                         f"{role_words(s, v.learned_from, v.state)}"
                         + (f"  {s.description}" if s.description else ""))
    return lines


def recalibrate_station(session: Session, learning: LearningSettings, station: str,
                        protocol: str | None, *, actor: str, note: str | None) -> list[str]:
    """``vaenode queue recalibrate``: each current calibrated reference of the station (of
    one protocol, when given) rebuilt from its learning series with today's reviews; what
    became of each, in words.

    Raises:
        NodeError: the station has no calibrated reference (of that protocol).
    """
    from sqlalchemy import select

    from node.queue.models import StationReference
    from node.queue.references import CALIBRATED, key_of, of_station
    from node.worker.station import recalibrate

    ids = list(session.scalars(
        select(StationReference.id).where(*of_station(station, protocol),
                                          StationReference.state == CALIBRATED)
        .order_by(StationReference.id)))
    session.rollback()
    if not ids:
        raise NodeError(f"no calibrated station reference for station {station!r}"
                        + (f", protocol {protocol!r}" if protocol else "")
                        + " (vaenode queue senders lists them)")
    lines = []
    for reference_id in ids:
        row, calibrated = recalibrate(session, learning, reference_id, actor=actor, note=note)
        if calibrated:
            used, trimmed, excluded = (row.series_used or 0, row.series_trimmed or 0,
                                       row.series_excluded or 0)
            lines.append(f"recalibrated: {key_of(row).label}, from {used} of "
                         f"{used + trimmed + excluded} learning series ({excluded} left out "
                         f"by review or empty, {trimmed} as outliers)")
        else:
            lines.append(f"not calibrated: {key_of(row).label}: "
                         f"{row.note or 'fewer learning series than [learning].series'}; it "
                         "learns on from its next series")
    return lines
