"""Per sending scanner: what it sent, what the node made of it, and how often it was flagged.

A department's quality lead watches scanners, not series. A scanner whose flag rate climbs
while the others' stay flat has a problem of its own (a failing coil element throws spikes, a
miscalibrated gradient ghosts), and one whose series are mostly skipped sends what the routing
rules do not score. A scanner is its calling AE title and its Station Name together: most
modalities call with their own AE title, but a department that routes several scanners
through one gateway AE (a DICOM router, a PACS forwarding) would otherwise see them as one
sender, and the Station Name is what the department calls the room's scanner.

"Unusually high" is a one-sided binomial test of a scanner's flagged series against the rate
of every other scanner in the same window: the chance of at least that many flags if it were
like the others. The others' rate is smoothed (half a flag added) so that a handful of flags
against others that had none is not called certain. It is a pointer for a person to look,
not a finding: the scanners' case mixes differ.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.admin.reviews import CONFIRM, FALSE_ALARM, binomial_tail, latest_reviews
from node.queue.models import Series, utcnow
from node.queue.references import FROM_CALLING_AET, ReferenceView
from node.queue.states import SeriesState

#: A scanner is tested once it has this many scored series in the window.
MIN_SCORED_FOR_TEST = 10
#: Below this chance (one-sided) its flag rate is called unusually high.
HIGH_P = 0.01
#: Weeks of the weekly flag-rate trend.
TREND_WEEKS = 8
#: Most common skip reasons listed per scanner.
TOP_SKIP_REASONS = 3

_IN_PROGRESS = (SeriesState.RECEIVING, SeriesState.QUEUED, SeriesState.PROCESSING)

#: What tells scanners apart: (calling AE title, Station Name).
_Key = tuple[str | None, str | None]


@dataclass(frozen=True)
class WeekCount:
    """One week (Monday, UTC) of a scanner's scored series."""

    start: date
    scored: int
    flagged: int


@dataclass(frozen=True)
class SenderStats:
    """One scanner (calling AE title and Station Name) over the window.

    Attributes:
        calling_aet: the sender's AE title; None for series whose sender was not recorded.
        station_name: the Station Name its series carry; None when they carry none (or
            arrived before the node recorded it and was not scored since).
        scanner: its most common "Manufacturer Model" in the window ("" when unknown).
        series: series first received in the window.
        scored: of those, series with a verdict (``done``).
        flagged: scored series whose verdict is abnormal.
        skipped / failed / in_progress: series in those states.
        skip_reasons: the most common reasons its series were skipped, with their counts
            (what a routing rule would have to accept to score them).
        confirmed: flagged series an admin confirmed (latest review).
        false_alarms: series an admin marked a false alarm (latest review).
        last_received: the latest instance of its series in the window.
        weeks: scored and flagged series per week, oldest first (series first received in
            that week, whatever the window).
        p_high: chance of at least ``flagged`` flags in ``scored`` series at the other scanners'
            rate; None when it has fewer than :data:`MIN_SCORED_FOR_TEST` scored series or no
            other scanner scored anything.
    """

    calling_aet: str | None
    station_name: str | None
    series: int
    scored: int
    flagged: int
    skipped: int
    failed: int
    in_progress: int
    confirmed: int
    false_alarms: int
    last_received: datetime | None
    weeks: tuple[WeekCount, ...]
    p_high: float | None
    skip_reasons: tuple[tuple[str, int], ...] = ()
    scanner: str = ""

    @property
    def flag_rate(self) -> float | None:
        """Flagged / scored; None before anything is scored."""
        return self.flagged / self.scored if self.scored else None

    @property
    def unusually_high(self) -> bool:
        """Its flags are unlikely at the other scanners' rate (see the module docstring)."""
        return self.p_high is not None and self.p_high < HIGH_P


@dataclass
class _Tally:
    series: int = 0
    scored: int = 0
    flagged: int = 0
    skipped: int = 0
    failed: int = 0
    in_progress: int = 0
    confirmed: int = 0
    false_alarms: int = 0
    last_received: datetime | None = None
    skip_reasons: Counter[str] = field(default_factory=Counter)
    scanners: Counter[str] = field(default_factory=Counter)


def week_start(moment: datetime) -> date:
    """The Monday (UTC) of the week ``moment`` falls in."""
    day = moment.date()
    return day - timedelta(days=day.weekday())


def sender_stats(session: Session, days: int, now: datetime | None = None,
                 weeks: int = TREND_WEEKS) -> list[SenderStats]:
    """Every scanner that sent a series in the last ``days`` days or ``weeks`` weeks, by AE
    title then Station Name (unrecorded ones last in each).

    Raises:
        ValueError: ``days`` or ``weeks`` below 1.
    """
    if days < 1 or weeks < 1:
        raise ValueError("the window needs at least one day and one week")
    now = now or utcnow()
    since = now - timedelta(days=days)
    first_week = week_start(now) - timedelta(weeks=weeks - 1)
    trend_since = datetime.combine(first_week, datetime.min.time(), tzinfo=now.tzinfo)
    rows = session.execute(
        select(Series.id, Series.calling_aet, Series.station_name, Series.status,
               Series.abnormal, Series.first_received_at, Series.last_received_at,
               Series.status_reason, Series.manufacturer, Series.scanner_model)
        .where(Series.first_received_at >= min(since, trend_since))
    ).all()
    reviews = latest_reviews(session)
    tallies: dict[_Key, _Tally] = defaultdict(_Tally)
    by_week: dict[_Key, dict[date, list[int]]] = defaultdict(dict)
    for (series_id, aet, station, status, abnormal, first, last, reason, make,
         model) in rows:
        key = (aet, station)
        state = SeriesState(status)
        scored = state is SeriesState.DONE and abnormal is not None
        if first >= trend_since:
            week = by_week[key].setdefault(week_start(first), [0, 0])
            week[0] += int(scored)
            week[1] += int(scored and bool(abnormal))
        if first < since:
            continue
        t = tallies[key]
        t.series += 1
        if make or model:
            t.scanners[" ".join(v for v in (make, model) if v)] += 1
        t.scored += int(scored)
        t.flagged += int(scored and bool(abnormal))
        if state is SeriesState.SKIPPED:
            t.skipped += 1
            t.skip_reasons[reason or "(no reason recorded)"] += 1
        t.failed += int(state is SeriesState.FAILED)
        t.in_progress += int(state in _IN_PROGRESS)
        review = reviews.get(series_id, (None, None))[0]
        t.false_alarms += int(review == FALSE_ALARM)
        t.confirmed += int(review == CONFIRM and scored and bool(abnormal))
        t.last_received = last if t.last_received is None else max(t.last_received, last)
    total_scored = sum(t.scored for t in tallies.values())
    total_flagged = sum(t.flagged for t in tallies.values())
    weeks_list = [first_week + timedelta(weeks=i) for i in range(weeks)]
    out = []
    for key in sorted(set(tallies) | set(by_week),
                      key=lambda k: (k[0] is None, k[0] or "", k[1] is None, k[1] or "")):
        aet, station = key
        t = tallies.get(key, _Tally())
        others_scored = total_scored - t.scored
        p_high = None
        if t.scored >= MIN_SCORED_FOR_TEST and others_scored > 0:
            rate = (total_flagged - t.flagged + 0.5) / (others_scored + 1)
            p_high = binomial_tail(t.scored, rate, t.flagged)
        counts = by_week.get(key, {})
        out.append(SenderStats(
            calling_aet=aet, station_name=station, series=t.series, scored=t.scored,
            flagged=t.flagged, skipped=t.skipped, failed=t.failed, in_progress=t.in_progress,
            confirmed=t.confirmed, false_alarms=t.false_alarms, last_received=t.last_received,
            weeks=tuple(WeekCount(w, *counts.get(w, (0, 0))) for w in weeks_list),
            p_high=p_high, skip_reasons=tuple(t.skip_reasons.most_common(TOP_SKIP_REASONS)),
            scanner=t.scanners.most_common(1)[0][0] if t.scanners else "",
        ))
    return out


def references_of(sender: SenderStats, views: list[ReferenceView]) -> list[ReferenceView]:
    """The station references a scanner's series learn into: those of its Station Name, or,
    when its series name none, of its calling AE title."""
    if sender.station_name:
        station = " ".join(sender.station_name.split()).upper()
        return [v for v in views
                if v.key.station_source != FROM_CALLING_AET and v.key.station.upper() == station]
    return [v for v in views
            if v.key.station_source == FROM_CALLING_AET and v.key.station == sender.calling_aet]
