"""The scanners page: per calling AE, series, verdicts, reviews, flag rate against the others,
and the weekly trend; over HTTP on a real dashboard and through the real CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.admin.app import RunningDashboard
from node.admin.reviews import CONFIRM, FALSE_ALARM, binomial_tail
from node.admin.senders import MIN_SCORED_FOR_TEST, sender_stats, week_start
from node.config import LearningSettings, Settings
from node.queue import references as refs
from node.queue.models import AdminAction, Series, StationReference
from node.queue.states import SeriesState
from node.worker.station import BundleScale, settle_reference
from tests.admin.web import TOKEN, http
from tests.helpers.learning import KEY, add_learning_series, site_scores

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)  # a Thursday
PROSTATE = ("no routing rule matches (rule brain-t1: body part PROSTATE is not one of HEAD, "
            "BRAIN, SKULL)")
VAENODE = Path(sys.executable).with_name("vaenode")


def _series(session: Session, aet: str | None, status: SeriesState, *,
            abnormal: bool | None = None, days_ago: float = 1.0, reason: str | None = None,
            station: str | None = None, make: str | None = None, model: str | None = None
            ) -> int:
    at = NOW - timedelta(days=days_ago)
    uid = f"1.2.826.0.{session.query(Series).count() + 1}"
    row = Series(study_instance_uid="1.2.826.0", series_instance_uid=uid, modality="MR",
                 calling_aet=aet, first_received_at=at, last_received_at=at + timedelta(minutes=2),
                 status=status, abnormal=abnormal, updated_at=at, status_reason=reason,
                 station_name=station, manufacturer=make, scanner_model=model)
    session.add(row)
    session.flush()
    return row.id


def _review(session: Session, series_id: int, action: str) -> None:
    session.execute(insert(AdminAction).values(series_id=series_id, actor="qa", action=action,
                                               model="brain-t1 0.1.0", note=None))


def _fill(factory: sessionmaker[Session]) -> dict[str, int]:
    """MR1: 20 scored, 1 flagged; MR2: 20 scored, 9 flagged; CT1: 5 scored, 3 flagged, three
    skipped (two for one reason), a failed and a queued series; one series without a calling
    AE; one MR1 series 40 days ago (outside a 30-day window)."""
    ids: dict[str, int] = {}
    with factory.begin() as s:
        for i in range(20):
            ids[f"MR1-{i}"] = _series(s, "MR1", SeriesState.DONE, abnormal=(i == 0),
                                      days_ago=1 + i)
            ids[f"MR2-{i}"] = _series(s, "MR2", SeriesState.DONE, abnormal=(i < 9),
                                      days_ago=0.5 + i / 2, station="MR ROOM 2",
                                      make="SIEMENS", model="Prisma")
        for i in range(5):
            _series(s, "CT1", SeriesState.DONE, abnormal=(i < 3), days_ago=2)
        _series(s, "CT1", SeriesState.SKIPPED, days_ago=2, reason=PROSTATE)
        _series(s, "CT1", SeriesState.SKIPPED, days_ago=3, reason=PROSTATE)
        _series(s, "CT1", SeriesState.SKIPPED, days_ago=3, reason="no routing rule is configured")
        _series(s, "CT1", SeriesState.FAILED, days_ago=2)
        _series(s, "CT1", SeriesState.QUEUED, days_ago=0.1)
        _series(s, None, SeriesState.DONE, abnormal=False, days_ago=3)
        ids["old"] = _series(s, "MR1", SeriesState.DONE, abnormal=True, days_ago=40)
        _review(s, ids["MR2-0"], FALSE_ALARM)
        _review(s, ids["MR2-1"], FALSE_ALARM)
        _review(s, ids["MR2-1"], CONFIRM)  # changed their mind: the latest review counts
        _review(s, ids["MR2-2"], CONFIRM)
        _review(s, ids["MR1-5"], CONFIRM)  # a normal verdict confirmed: not a true positive
    return ids


@pytest.fixture
def filled(make_settings: Callable[..., Settings],
           session_factory_for: Callable[[Settings], sessionmaker[Session]],
           ) -> tuple[Settings, sessionmaker[Session]]:
    settings = make_settings()
    factory = session_factory_for(settings)
    _fill(factory)
    return settings, factory


def test_counts_per_scanner_in_the_window(filled: tuple[Settings, sessionmaker[Session]]) -> None:
    _, factory = filled
    with factory() as s:
        rows = {r.calling_aet: r for r in sender_stats(s, 30, now=NOW)}
    assert list(rows) == ["CT1", "MR1", "MR2", None]  # by AE title, unrecorded last
    mr1, mr2, ct1 = rows["MR1"], rows["MR2"], rows["CT1"]
    assert (mr1.series, mr1.scored, mr1.flagged) == (20, 20, 1)  # the 40-day-old one is out
    assert (mr2.series, mr2.scored, mr2.flagged, mr2.flag_rate) == (20, 20, 9, 0.45)
    assert (ct1.series, ct1.scored, ct1.flagged) == (10, 5, 3)
    assert (ct1.skipped, ct1.failed, ct1.in_progress) == (3, 1, 1)
    assert ct1.skip_reasons == ((PROSTATE, 2), ("no routing rule is configured", 1))
    assert mr1.skip_reasons == ()
    assert (mr2.confirmed, mr2.false_alarms) == (2, 1)
    assert (mr1.confirmed, mr1.false_alarms) == (0, 0)
    assert mr1.last_received == NOW - timedelta(days=1) + timedelta(minutes=2)
    with factory() as s:
        wide = {r.calling_aet: r for r in sender_stats(s, 90, now=NOW)}
    assert (wide["MR1"].series, wide["MR1"].flagged) == (21, 2)


def test_scanners_behind_one_gateway_ae_are_told_apart_by_station_name(
        make_settings: Callable[..., Settings],
        session_factory_for: Callable[[Settings], sessionmaker[Session]]) -> None:
    """A department routing its MR scanners through one gateway AE sees one line per scanner
    (Station Name), each tested against all the others, with its make and model."""
    factory = session_factory_for(make_settings())
    with factory.begin() as s:
        for i in range(12):
            _series(s, "GATEWAY", SeriesState.DONE, abnormal=(i < 8), station="MR ROOM 3",
                    make="SIEMENS", model="Prisma" if i else "Skyra")
            _series(s, "GATEWAY", SeriesState.DONE, abnormal=(i == 0), station="MR ROOM 1",
                    make="Philips", model="Ingenia")
        _series(s, "GATEWAY", SeriesState.DONE, abnormal=False)  # no Station Name
        _series(s, "MR2", SeriesState.DONE, abnormal=False, station="MR ROOM 1")
    with factory() as s:
        rows = sender_stats(s, 30, now=NOW)
    assert [(r.calling_aet, r.station_name) for r in rows] == [
        ("GATEWAY", "MR ROOM 1"), ("GATEWAY", "MR ROOM 3"), ("GATEWAY", None),
        ("MR2", "MR ROOM 1")]
    room1, room3 = rows[0], rows[1]
    assert (room3.scored, room3.flagged, room3.scanner) == (12, 8, "SIEMENS Prisma")
    assert (room1.scored, room1.flagged, room1.scanner) == (12, 1, "Philips Ingenia")
    assert rows[2].scanner == "" and rows[2].scored == 1
    assert room3.unusually_high and not room1.unusually_high
    # Room 3 against the 14 other series with one flag (half a flag added).
    assert room3.p_high == pytest.approx(binomial_tail(12, (1 + 0.5) / (14 + 1), 8))


def test_a_scanner_flagging_far_more_than_the_others_is_pointed_out(
        filled: tuple[Settings, sessionmaker[Session]]) -> None:
    _, factory = filled
    with factory() as s:
        rows = {r.calling_aet: r for r in sender_stats(s, 30, now=NOW)}
    mr1, mr2, ct1 = rows["MR1"], rows["MR2"], rows["CT1"]
    # MR2 against the 21 + 5 series of the others with 1 + 3 flags (half a flag added).
    assert mr2.p_high == pytest.approx(binomial_tail(20, (4 + 0.5) / (26 + 1), 9))
    assert mr2.unusually_high and mr2.p_high < 0.01
    assert mr1.p_high == pytest.approx(binomial_tail(20, (12 + 0.5) / (26 + 1), 1))
    assert not mr1.unusually_high
    assert ct1.scored < MIN_SCORED_FOR_TEST and ct1.p_high is None and not ct1.unusually_high


def test_weekly_trend_counts_scored_and_flagged_series_by_week(
        filled: tuple[Settings, sessionmaker[Session]]) -> None:
    _, factory = filled
    with factory() as s:
        rows = {r.calling_aet: r for r in sender_stats(s, 7, now=NOW, weeks=8)}
    weeks = rows["MR2"].weeks
    assert len(weeks) == 8 and weeks[-1].start == week_start(NOW) == NOW.date() - timedelta(3)
    assert [w.start.weekday() for w in weeks] == [0] * 8
    # MR2's 20 series arrived 0.5-10 days ago: this week 7 (3 days and 12 h back to Monday),
    # and so on; all 9 flagged ones (0.5-4.5 days ago) in the last two weeks.
    assert sum(w.scored for w in weeks) == 20 and sum(w.flagged for w in weeks) == 9
    assert (weeks[-1].scored, weeks[-1].flagged) == (7, 7)
    # The trend covers 8 weeks whatever the window: the 40-day-old MR1 series is in it.
    assert sum(w.flagged for w in rows["MR1"].weeks) == 2
    with pytest.raises(ValueError):
        sender_stats(factory(), 0, now=NOW)


def test_scanners_page_and_cli(filled: tuple[Settings, sessionmaker[Session]],
                               run_dashboard: Callable[[Settings, sessionmaker[Session]],
                                                       RunningDashboard],
                               tmp_path: Path) -> None:
    settings, factory = filled
    # The page reads the real clock: these rows are relative to NOW, so shift the window to
    # cover them all whatever today is.
    days = max(30, (datetime.now(UTC) - NOW).days + 30)
    base = f"http://127.0.0.1:{run_dashboard(settings, factory).port}"
    page = http(f"{base}/senders?days={days}")
    assert page.status == 200
    html = page.text
    assert 'id="nav-senders"' in html and "Scanners" in html
    row = html.split('data-aet="MR2"', 1)[1].split("</tr>", 1)[0]
    assert "unusually high" in row and ">9<" in row and "45.0 %" in row
    assert 'data-station="MR ROOM 2"' in row and "SIEMENS Prisma" in row
    assert "?calling_aet=MR2&amp;station=MR%20ROOM%202" in row
    listed = http(f"{base}/queue?calling_aet=MR2&station=MR%20ROOM%202").text
    assert listed.count('class="series-row"') == 20 and "· MR ROOM 2" in listed
    assert "<option selected>MR ROOM 2</option>" in listed  # the station drop-down
    assert 'class="series-row"' not in http(f"{base}/queue?station=NOWHERE").text
    typed = http(f"{base}/queue?station=mr%20room%202%20").text  # a console URL typed by hand
    assert typed.count('class="series-row"') == 20
    assert "<option selected>MR ROOM 2</option>" in typed and typed.count("<option selected>") == 1
    other = html.split('data-aet="MR1"', 1)[1].split("</tr>", 1)[0]
    assert "unusually high" not in other
    ct1_row = html.split('data-aet="CT1"', 1)[1].split("</tr>", 1)[0]
    assert "fewer than 10 scored" in ct1_row and "2 &times; no routing rule matches" in ct1_row
    assert http(f"{base}/senders?days=0").status == 422

    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "{settings.database.url}"\n', encoding="utf-8")
    proc = subprocess.run([str(VAENODE), "queue", "senders", "--days", str(days), "--json",
                           "--config", str(config)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {r["calling_aet"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert rows["MR2"]["unusually_high"] is True and rows["MR2"]["flagged"] == 9
    assert (rows["MR2"]["station_name"], rows["MR2"]["scanner"]) == ("MR ROOM 2", "SIEMENS Prisma")
    assert rows["MR1"]["unusually_high"] is False and rows[None]["scored"] == 1
    assert rows["CT1"]["skip_reasons"][0] == {"reason": PROSTATE, "series": 2}
    table = subprocess.run([str(VAENODE), "queue", "senders", "--days", str(days),
                            "--config", str(config)], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert any(line.startswith("MR2") and "MR ROOM 2" in line and "UNUSUALLY HIGH" in line
               for line in table.stdout.splitlines())


def test_scanners_page_shows_what_each_station_learned_and_restarts_it(
    make_settings: Callable[..., Settings],
    session_factory_for: Callable[[Settings], sessionmaker[Session]],
    run_dashboard: Callable[[Settings, sessionmaker[Session]], RunningDashboard],
    tmp_path: Path,
) -> None:
    """Per station and protocol: state, series learned of N, when calibrated, C and L; the
    restart button is a POST behind the token and the Origin check, recorded with who and
    when; ``vaenode queue senders`` shows the same and ``vaenode queue relearn`` restarts."""
    settings = make_settings(token=TOKEN).model_copy(
        update={"learning": LearningSettings(series=5)})
    factory = session_factory_for(settings)
    with factory() as session:
        calibrated = refs.ensure_reference(session, KEY)
        learning = refs.ensure_reference(session, replace(KEY, protocol="t2 axial"))
    for scores in site_scores(5, seed=1):
        add_learning_series(factory, calibrated.id, scores)
    add_learning_series(factory, learning.id, site_scores(1, seed=2)[0])
    scale = BundleScale("brain-t1", "0.1.0", -36000.0, -2400.0, 0.01,
                        tuple(float(q) for q in range(201)))
    with factory.begin() as session:
        assert settle_reference(session, settings.learning, calibrated.id, scale)
    with factory() as session:
        row = session.get(StationReference, calibrated.id)
        assert row is not None and row.centre is not None
    dash = run_dashboard(settings, factory)
    base = f"http://127.0.0.1:{dash.port}"
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    html = http(f"{base}/senders", headers=bearer).text
    shown = html.split(f'data-id="{calibrated.id}"', 1)[1].split("</tr>", 1)[0]
    assert 'data-state="calibrated"' in shown and "5 of 5" in shown
    assert f"{row.centre:.4g}" in shown and "t1 mprage sag" in shown
    # How many of its learning series the reference flags: what to expect once calibrated.
    assert row.series_flagged is not None and row.series_used == 5
    assert f'<td class="num series-flagged">{row.series_flagged} of 5</td>' in shown
    # What makes its series abnormal: a 10th percentile below its series edge.
    assert row.series_edge is not None and row.min_flagged is None
    assert (f'<td class="num min-flagged">10th pct. below {row.series_edge:.4g}</td>'
            in shown)
    # Below which an image of a series it judges normal is flagged.
    assert row.image_edge is not None and row.image_edge <= row.low
    assert f'<td class="num image-edge">{row.image_edge:.4g}</td>' in shown
    # Which series it learned from, each linked to its page, with what calibration did.
    with factory() as session:
        uids = dict(session.execute(select(Series.id, Series.series_instance_uid)
                                    .where(Series.reference_id == calibrated.id)).all())
    assert row.learned_from is not None and sorted(row.learned_from["used"]) == sorted(uids)
    listed_uids = re.findall(r'<li class="learned" data-uid="([^"]+)" data-role="used">', shown)
    assert sorted(listed_uids) == sorted(uids.values())
    assert all(re.search(f'href="[^"]*/series/{re.escape(uid)}"', shown) for uid in uids.values())
    assert shown.count('<span class="role">used</span>') == 5
    shown = html.split(f'data-id="{learning.id}"', 1)[1].split("</tr>", 1)[0]
    assert 'data-state="learning"' in shown and "1 of 5" in shown
    assert '<span class="role">learning</span>' in shown
    assert "earlier-references" not in html
    # A series that station judged by its 10th percentile: its page says so, not a count.
    judged = add_learning_series(factory, calibrated.id, site_scores(1, seed=3)[0],
                                 state=refs.CALIBRATED)
    with factory.begin() as session:
        session.execute(update(Series).where(Series.id == judged).values(
            abnormal=True, series_score=-41000.5, series_edge=-40000.25))
        judged_row = session.get(Series, judged)
        assert judged_row is not None
        uid = judged_row.series_instance_uid
    page = http(f"{base}/series/{uid}", headers=bearer).text
    assert ('series flagged when its 10th-percentile slice score, <span id="series-score">'
            '-41000.5</span>, lies below the station\'s series edge, <span id="series-edge">'
            '-40000.2</span>') in page
    assert "series flagged at" not in page
    assert 'id="image-edge"' not in page and "slices below the threshold" in page
    # One it judged normal: its slices were judged against the station's image edge.
    with factory.begin() as session:
        session.execute(update(Series).where(Series.id == judged).values(
            abnormal=False, series_score=-39000.5, image_edge=-45000.75))
    page = http(f"{base}/series/{uid}", headers=bearer).text
    assert ('slices below the station\'s image edge, <span id="image-edge">-45000.8</span>, '
            'which judges the images of a series it calls normal in place of the threshold'
            ) in page
    plot = http(f"{base}/series/{uid}/plot.png", headers=bearer)
    assert plot.status == 200 and plot.body.startswith(b"\x89PNG")

    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "{settings.database.url}"\n\n[learning]\nseries = 5\n',
                      encoding="utf-8")
    listed = subprocess.run([str(VAENODE), "queue", "senders", "--json", "--config",
                             str(config)], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    [sender] = [json.loads(line) for line in listed.stdout.splitlines()]
    [done_ref] = [r for r in sender["references"] if r["state"] == "calibrated"]
    assert (done_ref["series_used"], done_ref["series_flagged"], done_ref["min_flagged"]) == (
        5, row.series_flagged, None)
    assert done_ref["series_edge"] == pytest.approx(row.series_edge)
    assert done_ref["image_edge"] == pytest.approx(row.image_edge)
    assert "learning_series" not in done_ref
    listed = subprocess.run([str(VAENODE), "queue", "senders", "--json", "--series",
                             "--config", str(config)], capture_output=True, text=True,
                            timeout=120)
    [sender] = [json.loads(line) for line in listed.stdout.splitlines()]
    [done_ref] = [r for r in sender["references"] if r["state"] == "calibrated"]
    assert sorted((s["series_instance_uid"], s["role"], s["abnormal"])
                  for s in done_ref["learning_series"]) == sorted(
        (uid, "used", False) for uid in uids.values())
    table = subprocess.run([str(VAENODE), "queue", "senders", "--series", "--config",
                            str(config)], capture_output=True, text=True, timeout=120)
    assert sum(line.startswith("    ") and line.split()[2] in uids.values()
               and ": used" in line for line in table.stdout.splitlines()) == 5, table.stdout
    table = subprocess.run([str(VAENODE), "queue", "senders", "--config", str(config)],
                           capture_output=True, text=True, timeout=120)
    # The IMAGE, FROM and FLAGS columns right after LOW (LEARNED also reads "5/5").
    assert any("t1 mprage sag" in line
               and f"{row.low:10.4g} {row.image_edge:10.4g} {f'{row.series_edge:.4g}':>9} "
                   f"{f'{row.series_flagged}/5':>7}  " in line
               for line in table.stdout.splitlines()), table.stdout

    form = urllib.parse.urlencode({"reference_id": calibrated.id, "reviewer": "tech anna",
                                   "note": "new head coil"}).encode()
    url = f"{base}/senders/relearn"
    assert http(url, data=form, follow=False).status == 401
    assert http(url, data=form, headers={**bearer, "Origin": "http://evil.example"},
                follow=False).status == 403
    done = http(url, data=form, headers={**bearer, "Origin": base}, follow=False)
    assert done.status == 303 and done.headers["location"].endswith("/senders#references")
    with factory() as session:
        old = session.get(StationReference, calibrated.id)
        new = refs.current_reference(session, KEY)
    assert old is not None and old.superseded_at is not None and old.state == "calibrated"
    assert (old.superseded_by, old.superseded_note) == ("admin:tech anna", "new head coil")
    assert new is not None and new.state == "learning" and new.id != calibrated.id
    html = http(f"{base}/senders", headers=bearer).text
    assert 'data-state="learning"' in html.split(f'data-id="{new.id}"', 1)[1].split("</tr>")[0]
    assert "admin:tech anna" in html.split('id="earlier-references"', 1)[1]
    # The same button again: that reference is no longer current.
    assert http(url, data=form, headers={**bearer, "Origin": base}, follow=False).status == 409

    listed = subprocess.run([str(VAENODE), "queue", "senders", "--json", "--config",
                             str(config)], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    [sender] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sender["station_name"] == "MR ROOM 3"
    assert sorted((r["protocol"], r["state"], r["series_learned"], r["series_needed"])
                  for r in sender["references"]) == [("t1 mprage sag", "learning", 0, 5),
                                                     ("t2 axial", "learning", 1, 5)]
    table = subprocess.run([str(VAENODE), "queue", "senders", "--config", str(config)],
                           capture_output=True, text=True, timeout=120)
    assert any(line.startswith("MR ROOM 3") and "t2 axial" in line and "1/5" in line
               for line in table.stdout.splitlines()), table.stdout
    relearn = subprocess.run([str(VAENODE), "queue", "relearn", "--station", "mr room 3",
                              "--protocol", "T2  AXIAL", "--config", str(config)],
                             capture_output=True, text=True, timeout=120)
    assert relearn.returncode == 0, relearn.stderr
    assert "learning restarted: MR ROOM 3 (Prisma), protocol 't2 axial'" in relearn.stdout
    with factory() as session:
        assert refs.current_reference(session, KEY) is not None
        assert refs.current_reference(session, replace(KEY, protocol="t2 axial")).id != (
            learning.id)


def test_a_missed_learning_series_is_reported_and_the_station_recalibrated(
    make_settings: Callable[..., Settings],
    session_factory_for: Callable[[Settings], sessionmaker[Session]],
    run_dashboard: Callable[[Settings, sessionmaker[Session]], RunningDashboard],
    tmp_path: Path,
) -> None:
    """A bad learning series judged normal was used: its page offers "Missed artifact" (a
    POST behind the token and the Origin check); the Scanners page's Recalibrate rebuilds the
    station from the same series without it, the old reference kept; the command line does
    the same and says what it did."""
    settings = make_settings(token=TOKEN).model_copy(
        update={"learning": LearningSettings(series=5)})
    factory = session_factory_for(settings)
    with factory() as session:
        reference = refs.ensure_reference(session, KEY)
    site = site_scores(5, seed=6)
    bad = site[2].copy()
    bad[20:25] -= 9000.0
    ids = [add_learning_series(factory, reference.id, s) for s in [*site[:2], bad, *site[3:]]]
    scale = BundleScale("brain-t1", "0.1.0", -36000.0, -2400.0, 0.01,
                        tuple(float(q) for q in range(201)))
    with factory.begin() as session:
        assert settle_reference(session, settings.learning, reference.id, scale)
        uid = session.scalars(select(Series.series_instance_uid)
                              .where(Series.id == ids[2])).one()
    dash = run_dashboard(settings, factory)
    base = f"http://127.0.0.1:{dash.port}"
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    page = http(f"{base}/series/{uid}", headers=bearer).text
    assert 'id="action-missed"' in page and 'id="action-false_alarm"' not in page
    # Its page says the station's reference used it, and what to do if it is bad.
    assert '<p id="learning-role" data-role="used">' in page and "<b>Recalibrate</b>" in page
    form = urllib.parse.urlencode({"action": "missed", "reviewer": "dr ada",
                                   "note": "motion"}).encode()
    assert http(f"{base}/series/{uid}/actions", data=form, follow=False).status == 401
    done = http(f"{base}/series/{uid}/actions", data=form,
                headers={**bearer, "Origin": base}, follow=False)
    assert done.status == 303
    html = http(f"{base}/senders", headers=bearer).text
    shown = html.split(f'data-id="{reference.id}"', 1)[1].split("</tr>", 1)[0]
    listed = shown.split(f'data-uid="{uid}"', 1)[1].split("</li>", 1)[0]
    assert 'data-role="used"' in listed and "missed artifact" in listed
    assert f'id="recalibrate-{reference.id}"' in shown
    # The reference was calibrated before that review: the page says it would change it.
    assert '<b class="review-since">reviewed since:</b> used' in listed
    assert '"reviews-since rate-over"' in shown and "1 reviewed since" in shown

    form = urllib.parse.urlencode({"reference_id": reference.id, "reviewer": "dr ada",
                                   "note": "3rd series had motion"}).encode()
    url = f"{base}/senders/recalibrate"
    assert http(url, data=form, follow=False).status == 401
    assert http(url, data=form, headers={**bearer, "Origin": "http://evil.example"},
                follow=False).status == 403
    done = http(url, data=form, headers={**bearer, "Origin": base}, follow=False)
    assert done.status == 303 and done.headers["location"].endswith("/senders#references")
    with factory() as session:
        old = session.get(StationReference, reference.id)
        new = refs.current_reference(session, KEY)
    assert old is not None and (old.superseded_by, old.superseded_note) == (
        "admin:dr ada", "3rd series had motion")
    assert new is not None and new.state == "calibrated" and new.id != reference.id
    assert new.learned_from is not None and new.learned_from["excluded"] == [ids[2]]
    html = http(f"{base}/senders", headers=bearer).text
    shown = html.split(f'data-id="{new.id}"', 1)[1].split("</tr>", 1)[0]
    assert re.search(f'data-uid="{re.escape(uid)}" data-role="excluded"', shown)
    assert "reviewed since" not in shown
    assert "admin:dr ada" in html.split('id="earlier-references"', 1)[1]
    page = http(f"{base}/series/{uid}", headers=bearer).text
    assert '<p id="learning-role" data-role="excluded">' in page
    assert "since restarted" not in page
    # The old reference is no longer current: the same button again is refused, as is one
    # that names no reference at all.
    assert http(url, data=form, headers={**bearer, "Origin": base}, follow=False).status == 409
    nothing = urllib.parse.urlencode({"reference_id": 999999, "reviewer": "dr ada"}).encode()
    assert http(url, data=nothing, headers={**bearer, "Origin": base},
                follow=False).status == 409

    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "{settings.database.url}"\n\n[learning]\nseries = 5\n',
                      encoding="utf-8")
    cli = subprocess.run([str(VAENODE), "queue", "recalibrate", "--station", "mr room 3",
                          "--note", "again", "--config", str(config)],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == (
        "recalibrated: MR ROOM 3 (Prisma), protocol 't1 mprage sag', from 4 of 5 learning "
        "series (1 left out by review or empty, 0 as outliers)")
    with factory() as session:
        latest = refs.current_reference(session, KEY)
        assert latest is not None and latest.id != new.id and latest.state == "calibrated"
        assert refs.learning_series_ids(session, latest.id) == ids
    cli = subprocess.run([str(VAENODE), "queue", "recalibrate", "--station", "MR ROOM 9",
                          "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert cli.returncode != 0 and "no calibrated station reference" in cli.stderr
