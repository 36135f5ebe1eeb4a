"""The alert rows: made with the verdict, claimed, sent, retried.

A flagged series' report goes to the PACS, where a radiologist reads it later; the
technologist who could repeat the scan while the patient is still on the table needs to know
now. So, in the same transaction that stores the verdict, each ``[alerts].urls`` entry gets a
row with the message; the alert job posts it, retries with backoff, and gives up after
``max_attempts`` (``failed``, with the last error). The message names the series, never the
patient: alert channels (chat, pagers) are not where patient data belongs.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.config import AlertSettings, mailto_addresses
from node.queue.models import Alert, Series, utcnow
from node.report.content import SeriesVerdict
from node.report.outbox import backoff_s

PENDING, SENT, FAILED = "pending", "sent", "failed"
#: Rows on the dashboard's Alerts page.
ALERTS_PAGE_LIMIT = 500


def shown(url: str) -> str:
    """The URL as logs show it: scheme, host and port only. Webhook URLs carry their secret in
    the path (Slack, Teams), and logs travel further than the configuration. A mailto URL
    shows its recipients' domains."""
    if url.lower().startswith("mailto:"):
        try:
            domains = sorted({a.rsplit("@", 1)[-1] for a in mailto_addresses(url)})
        except ValueError:  # not from the validated configuration (a --url of alert-test)
            return "mailto:..."
        return "mailto:" + ",".join(f"...@{d}" for d in domains)
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}/..."


def _sender(series: Series) -> str:
    """The sender as the alert names it, ' from STATION (AE X)': the technologist knows the
    scanner by its Station Name; the AE title may be a gateway's."""
    station, aet = series.station_name, series.calling_aet
    if station:
        return f" from {station}" + (f" (AE {aet})" if aet and aet != station else "")
    return f" from {aet}" if aet else ""


def message(series: Series, verdict: SeriesVerdict, settings: AlertSettings) -> dict[str, Any]:
    """The JSON message about a flagged series; ``text`` is what a chat webhook shows."""
    where = _sender(series)
    name = f"'{series.series_description}'" if series.series_description else "a series"
    link = (f"{settings.dashboard_url.rstrip('/')}/series/{verdict.series_instance_uid}"
            if settings.dashboard_url else None)
    text = (f"vaenode: {verdict.abnormal_slices} of {len(verdict.slices)} images of {name}"
            f"{where} are below the quality threshold (series flagged); check before the "
            "patient leaves" + (f": {link}" if link else "."))
    return {
        "event": "series_flagged",
        "text": text,
        "study_instance_uid": verdict.study_instance_uid,
        "series_instance_uid": verdict.series_instance_uid,
        "series_description": series.series_description,
        "modality": series.modality,
        "calling_aet": series.calling_aet,
        "station_name": series.station_name,
        "abnormal_slices": verdict.abnormal_slices,
        "scored_slices": len(verdict.slices),
        "min_abnormal_slices": verdict.min_abnormal_slices,
        "series_score": verdict.series_score,
        "series_edge": verdict.series_edge,
        "model": f"{verdict.model_name} {verdict.model_version}",
        "rule": verdict.rule,
        "dashboard_url": link,
        "scored_at": utcnow().isoformat(timespec="seconds"),
    }


def enqueue(session: Session, settings: AlertSettings, series: Series,
            verdict: SeriesVerdict) -> int:
    """One pending row per alert URL when the series is flagged, in the caller's transaction.

    Returns:
        How many rows were added (0 when the series is normal or no URL is configured).
    """
    if not verdict.abnormal or not settings.urls:
        return 0
    payload = json.dumps(message(series, verdict, settings))
    session.add_all([Alert(series_id=series.id, url=url, payload=payload, state=PENDING,
                           attempts=0, next_attempt_at=utcnow()) for url in settings.urls])
    return len(settings.urls)


@dataclass(frozen=True)
class ClaimedAlert:
    """A leased alert row, as plain values for the sender."""

    id: int
    url: str
    payload: str
    attempts: int


def due(session_factory: sessionmaker[Session], lease_s: float, limit: int
        ) -> list[ClaimedAlert]:
    """Lease up to ``limit`` due rows (pending, due, not leased by another run)."""
    now = utcnow()
    lease_until = now + timedelta(seconds=lease_s)
    out: list[ClaimedAlert] = []
    with session_factory.begin() as session:
        rows = session.execute(
            select(Alert.id, Alert.url, Alert.payload, Alert.attempts)
            .where(Alert.state == PENDING, Alert.next_attempt_at <= now,
                   or_(Alert.lease_until.is_(None), Alert.lease_until < now))
            .order_by(Alert.next_attempt_at, Alert.id).limit(limit)).all()
        for row in rows:
            taken = session.execute(
                update(Alert).where(Alert.id == row.id, Alert.state == PENDING,
                                    or_(Alert.lease_until.is_(None), Alert.lease_until < now))
                .values(lease_until=lease_until))
            if taken.rowcount == 1:  # type: ignore[attr-defined]
                out.append(ClaimedAlert(row.id, row.url, row.payload, row.attempts))
    return out


def mark(session_factory: sessionmaker[Session], alert: ClaimedAlert, error: str | None,
         settings: AlertSettings, now: datetime | None = None) -> str:
    """Record an attempt: ``sent`` (no error), retry later, or ``failed``; returns the state."""
    now = now or utcnow()
    attempts = alert.attempts + 1
    values: dict[str, Any] = {"attempts": attempts, "lease_until": None}
    if error is None:
        state = SENT
        values.update(state=SENT, sent_at=now, last_error=None)
    else:
        state = FAILED if attempts >= settings.max_attempts else PENDING
        values.update(state=state, last_error=error[:2000],
                      next_attempt_at=now + timedelta(seconds=backoff_s(attempts, settings)))
    with session_factory.begin() as session:
        session.execute(update(Alert).where(Alert.id == alert.id).values(**values))
    return state


@dataclass(frozen=True)
class AlertRow:
    """One alert row as the dashboard shows it: the URL as logs show it (webhook URLs carry
    their secret in the path), what it was about, where it stands."""

    created_at: datetime
    event: str
    summary: str
    series_instance_uid: str | None
    problem_key: str | None
    target: str
    state: str
    attempts: int
    sent_at: datetime | None
    next_attempt_at: datetime | None
    last_error: str | None


def describe(message: dict[str, Any]) -> str:
    """A message in one line (a mail's subject, the Alerts page): for a flagged series how
    much of which series from which scanner, for a problem of the node its title."""
    event = str(message.get("event", "message"))
    if event != "series_flagged":
        return str(message.get("title") or event)
    if "abnormal_slices" not in message:
        return "series flagged"
    where = message.get("station_name") or message.get("calling_aet")
    what = message.get("series_description")
    return (f"series flagged: {message['abnormal_slices']}/{message.get('scored_slices')} "
            "images" + (f" of '{what}'" if what else "") + (f" from {where}" if where else ""))


def _summary(event: str, payload: str) -> str:
    try:
        message = json.loads(payload)
    except ValueError:
        return event
    return describe({"event": event, **message}) if isinstance(message, dict) else event


def recent_alerts(session: Session, limit: int = ALERTS_PAGE_LIMIT) -> list[AlertRow]:
    """The newest alert rows, flagged series and problems of the node alike, newest first."""
    rows = session.execute(
        select(Alert, Series.series_instance_uid).outerjoin(Series, Alert.series_id == Series.id)
        .order_by(Alert.created_at.desc(), Alert.id.desc()).limit(limit))
    return [AlertRow(a.created_at, a.event, _summary(a.event, a.payload), uid, a.problem_key,
                     shown(a.url), a.state, a.attempts, a.sent_at,
                     a.next_attempt_at if a.state == PENDING else None, a.last_error)
            for a, uid in rows]
