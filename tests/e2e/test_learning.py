"""A station teaches the node its own normal, through the real node and DCMTK ``storescu``.

A simulated site: IXI subjects the shipped bundle never trained on (its evaluation and
calibration subjects), changed one way (:func:`site_volume`), written as one scanner's axial
series (Station Name ``MR ROOM 7``). Twenty such series go through ``vaenode serve``, one of
them a whole series with moderate motion (a bad one nobody reviewed). The station goes from
``learning`` (each series judged out of the box, and its SR says so) to ``calibrated``; then a
clean series of the site is normal and the same series with a block of moderate motion is
flagged (the bad learning series did not blind it), the clean series' images were judged
against the station's image edge and the motion series' against its low, the SRs say which
reference judged them, a learning series a reviewer reports as a missed artifact is left out
by a recalibration (``vaenode queue recalibrate``) from the same series, and a restart
(``vaenode queue relearn``) starts learning afresh while keeping the old reference. Nothing
here asserts what the bundle makes of the site out of the box.

Each test runs for the default bundle, ``brain-t1-multiscanner`` 0.3.0, the one a node
learns with unless configured otherwise; ``VAENODE_TEST_BUNDLE=node/models/brain-t1`` runs
them for the opt-in ``brain-t1`` 0.1.0 instead (by hand: each bundle's run costs about three
minutes of the suite's twenty, and ``tests/e2e/test_flow.py`` already sends series through a
node with 0.1.0; its learning run passed every test here on 2026-12-06). The
default does not meet one bound yet (2026-12-06, each slice referred to the station's normal
at its position, a series judged by its 10th percentile, a normal series' images by the image
edge): 13.3% of its motion series' slices outside the block are flagged (a cluster low in
IXI255's head, below the station's low), where 5% is allowed; that test is marked as an
expected failure for it, strictly, so that it shows when it starts to pass (issue 18;
node/models/README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import func, select

from node.model.bundle import default_bundle_path
from node.queue.models import AdminAction, Report, Series, SliceScore, StationReference
from node.worker.learning import LearningSeries, build_reference
from node.worker.station import normal_series_folders
from tests.helpers.dcmtk import storescu
from tests.helpers.node import RunningNode, start_node
from tests.helpers.node import wait_for as wait
from tests.helpers.reports import dciodvfy, measurement_groups
from tests.helpers.series import IXI, WrittenSeries, load_volume, motion_block, write_series

pytestmark = pytest.mark.e2e

#: The bundle the station learns with: the default, or ``VAENODE_TEST_BUNDLE``.
BUNDLES = ([Path(os.environ["VAENODE_TEST_BUNDLE"])] if os.environ.get("VAENODE_TEST_BUNDLE")
           else [default_bundle_path()])
#: Subjects other tests use.
TAKEN = ("IXI080", "IXI096", "IXI102")
STATION = "MR ROOM 7"
PROTOCOL = "T1  Axial SE"  # stored as "t1 axial se"
LEARNING_SERIES = 20
#: Which learning series is the bad one: a whole series with moderate motion.
BAD = 4
#: The site: Gaussian noise of this fraction of the 99.5th percentile, added to the volume.
SITE_NOISE = 0.02
#: Axial slices (inferior to superior) with moderate motion in the test series: mid-brain.
MOTION_BLOCK = (55, 70)


def site_volume(volume: np.ndarray, seed: int, scale_of: np.ndarray | None = None,
                ) -> np.ndarray:
    """The volume as the simulated site's scanner acquires it: noisier than IXI's (the noise
    a fraction of the 99.5th percentile of ``scale_of``, default ``volume``)."""
    scale = float(np.percentile(volume if scale_of is None else scale_of, 99.5)) or 1.0
    noise = np.random.default_rng(seed).normal(0.0, SITE_NOISE * scale, volume.shape)
    return np.clip(volume + noise, 0.0, None).astype(np.float32)


def subjects(bundle: Path) -> list[Path]:
    """One IXI volume per evaluation or calibration subject of the bundle, in its order."""
    meta = json.loads((bundle / "model.json").read_text())["training"]["subjects"]
    out = []
    for subject in meta.get("evaluation", []) + meta.get("calibration", []):
        matches = sorted(IXI.glob(f"{subject}*.nii.gz"))
        if subject not in TAKEN and matches:
            out.append(matches[0])
    if len(out) < LEARNING_SERIES + 1:
        pytest.fail(f"{len(out)} held-out subjects of {bundle} under {IXI}; the test needs "
                    f"{LEARNING_SERIES + 1}")
    return out


def write_site_series(nifti: Path, out: Path, seed: int, *, whole_motion: bool = False,
                      block: tuple[int, int] | None = None) -> WrittenSeries:
    """A series of the site; the motion (whole or a block) is the e2e flow's, seed 0.

    The motion moves the IXI volume and the site's noise is added after it, as a scanner's
    receiver adds it (and as the site sweep renders artifacts): moving a noisy volume averages
    its noise away where the head moved, which no scanner does (node/models/README.md).
    """
    raw, spacing = load_volume(nifti)
    volume = raw
    if whole_motion:
        volume = motion_block(raw, spacing, (0, raw.shape[2]))
    elif block is not None:
        volume = motion_block(raw, spacing, block)
    volume = site_volume(volume, seed, scale_of=raw)
    return write_series(volume, spacing, out, station_name=STATION, series_description=PROTOCOL,
                        patient_id=nifti.name[:6],
                        corrupted=range(*block) if block is not None else ())


def send(node: RunningNode, series: WrittenSeries) -> None:
    proc = storescu(node.port, [series.folder], called_aet=node.ae_title, calling_aet="MR7")
    assert proc.returncode == 0, proc.stderr


def vaenode(node: RunningNode, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).with_name("vaenode")), *args, "--config",
                           str(node.config_path)], capture_output=True, text=True, timeout=120)


def row_of(node: RunningNode, series: WrittenSeries) -> Series | None:
    with node.session() as session:
        return session.scalar(select(Series).where(
            Series.series_instance_uid == series.series_instance_uid))


def done(node: RunningNode, written: list[WrittenSeries]) -> bool:
    rows = [row_of(node, s) for s in written]
    return all(r is not None and str(r.status) == "done" for r in rows)


def sr_of(node: RunningNode, series: WrittenSeries) -> tuple[Dataset, Path]:
    """The current SR the node wrote about the series (from its storage folder)."""
    with node.session() as session:
        path = session.scalar(select(Report.path).join(Series).where(
            Series.series_instance_uid == series.series_instance_uid, Report.kind == "SR",
            Report.superseded.is_(False)))
    assert path is not None
    return pydicom.dcmread(node.storage / path), node.storage / path


def sr_reference(node: RunningNode, series: WrittenSeries) -> str:
    """The "Station reference" TEXT item of the SR's series summary (its last group)."""
    sr, _ = sr_of(node, series)
    measurements = next(i for i in sr.ContentSequence
                        if i.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements")
    summary = measurements.ContentSequence[-1]
    [text] = [i.TextValue for i in summary.ContentSequence if i.ValueType == "TEXT"
              and i.ConceptNameCodeSequence[0].CodeMeaning == "Station reference"]
    return str(text)


def flags(node: RunningNode, series: WrittenSeries) -> dict[str, tuple[bool, bool]]:
    """SOP Instance UID -> (flagged, foreground), as the node stored them."""
    with node.session() as session:
        rows = session.execute(select(SliceScore.sop_instance_uid, SliceScore.abnormal,
                                      SliceScore.foreground).join(Series).where(
            Series.series_instance_uid == series.series_instance_uid)).all()
    return {uid: (bool(a), bool(f)) for uid, a, f in rows}


@dataclass
class Site:
    node: RunningNode
    bundle: Path
    learning: list[WrittenSeries]
    clean: WrittenSeries
    motion: WrittenSeries
    reference: StationReference


@pytest.fixture(scope="module", params=BUNDLES, ids=lambda b: b.name)
def site(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Twenty learning series through the node until the station is calibrated, then a clean
    series of the site and the same with a motion block, for one bundle."""
    bundle: Path = request.param
    workdir = tmp_path_factory.mktemp(f"learning-{bundle.name}")
    pool = subjects(bundle)
    node = start_node(workdir / "node", sections={
        "queue": {"series_idle_s": 2.0, "check_interval_s": 0.3},
        "worker": {"enabled": True, "poll_interval_s": 0.3, "lease_s": 300.0},
        "model": {"device": "cpu", "bundle": str(bundle)},
        "learning": {"series": LEARNING_SERIES},
    })
    try:
        learning = []
        for i, nifti in enumerate(pool[:LEARNING_SERIES]):
            written = write_site_series(nifti, workdir / f"learn-{i:02d}", seed=i,
                                        whole_motion=i == BAD)
            send(node, written)
            learning.append(written)
        wait("the 20 learning series scored", lambda: done(node, learning), 900, node)

        def calibrated() -> StationReference | None:
            with node.session() as session:
                return session.scalar(select(StationReference).where(
                    StationReference.state == "calibrated"))

        reference = wait("the station calibrated", calibrated, 30, node)
        test_subject = pool[LEARNING_SERIES]
        clean = write_site_series(test_subject, workdir / "clean", seed=100)
        motion = write_site_series(test_subject, workdir / "motion", seed=100,
                                   block=MOTION_BLOCK)
        send(node, clean)
        send(node, motion)
        wait("the test series scored", lambda: done(node, [clean, motion]), 300, node)
        yield Site(node, bundle, learning, clean, motion, reference)
    finally:
        node.stop()


def test_learning_series_are_judged_out_of_the_box_and_said_so(site: Site) -> None:
    rows = [row_of(site.node, s) for s in site.learning]
    assert all(r is not None and r.reference_state == "learning" for r in rows)
    assert {r.reference_id for r in rows if r is not None} == {site.reference.id}
    notes = sorted(sr_reference(site.node, s) for s in site.learning)
    # Each says how far the station's learning was when it was judged (series k of 20).
    assert notes == sorted(f"Reference: out of the box (station learning, {k} of 20 series)"
                           for k in range(1, 21))
    # The bundle's own score is the one stored, and the background slices are told apart.
    marks = flags(site.node, site.learning[0])
    assert any(fg for _, fg in marks.values()) and not all(fg for _, fg in marks.values())


def test_the_station_calibrates_from_its_series_leaving_the_bad_one_out(site: Site) -> None:
    ref = site.reference
    assert (ref.station, ref.station_source, ref.protocol) == (STATION, "station_name",
                                                              "t1 axial se")
    assert ref.scanner_model == "tests.helpers.series"
    assert ref.centre is not None and ref.low is not None and ref.low < ref.centre
    assert ref.series_used is not None and ref.series_trimmed is not None
    assert ref.series_used + ref.series_trimmed == LEARNING_SERIES and ref.series_trimmed >= 1
    # The hook for training on the station's images: the kept series, never the bad one.
    with site.node.session() as session:
        folders = normal_series_folders(session, site.node.storage, "mr room 7")
    bad = site.learning[BAD]
    assert len(folders) == ref.series_used
    assert all(f.name != bad.series_instance_uid for f in folders)
    # It learned its normal per slice position, its low and its series edge from the kept
    # series, and counted the kept series a reference built from the others flags: the
    # share of the station's normal series to expect flagged.
    with site.node.session() as session:
        learned = func.coalesce(SliceScore.station_score, SliceScore.bundle_score)
        kept: dict[str, list[float]] = {}
        for uid, value in session.execute(
                select(Series.series_instance_uid, learned).join(Series)
                .where(Series.series_instance_uid.in_([f.name for f in folders]),
                       SliceScore.foreground.is_(True))
                .order_by(Series.id, SliceScore.slice_index)):
            kept.setdefault(uid, []).append(value)
    assert len(kept) == ref.series_used
    again = build_reference([LearningSeries(i, np.array(v)) for i, v in enumerate(kept.values())],
                            0.01)
    assert again.selection.trimmed == ()
    assert ref.position_levels == pytest.approx(list(again.position.levels))
    assert ref.position_spreads == pytest.approx(list(again.position.spreads))
    assert again.low == pytest.approx(ref.low)
    assert again.series_edge is not None and ref.min_flagged is None
    assert ref.series_edge == pytest.approx(again.series_edge)
    assert again.image_edge is not None and again.image_edge <= again.low
    assert ref.image_edge == pytest.approx(again.image_edge)
    assert ref.series_flagged == again.series_flagged <= ref.series_used
    senders = vaenode(site.node, "queue", "senders", "--json")
    assert senders.returncode == 0, senders.stderr
    [line] = [json.loads(x) for x in senders.stdout.splitlines() if x.strip()]
    [shown] = line["references"]
    assert (shown["state"], shown["series_learned"], shown["series_needed"]) == (
        "calibrated", 20, 20)
    assert shown["centre"] == pytest.approx(ref.centre) and shown["protocol"] == "t1 axial se"
    assert shown["series_edge"] == pytest.approx(ref.series_edge)


def test_after_calibration_a_clean_series_is_normal_and_a_motion_block_is_flagged(
    site: Site,
) -> None:
    clean, motion = row_of(site.node, site.clean), row_of(site.node, site.motion)
    assert clean is not None and motion is not None
    assert (clean.reference_state, motion.reference_state) == ("calibrated", "calibrated")
    # Both judged by their 10th-percentile score against the station's series edge.
    edge = site.reference.series_edge
    assert edge is not None
    for row in (clean, motion):
        assert row.series_score is not None and row.series_edge is not None
        assert row.abnormal == (row.series_score < row.series_edge)
    assert clean.series_edge == pytest.approx(motion.series_edge)
    assert clean.abnormal is False, (f"{clean.abnormal_slices} clean slices flagged, "
                                     f"score {clean.series_score} edge {clean.series_edge}")
    # The clean series, judged normal, had its images judged against the station's image
    # edge (mapped as the slices are); the motion series, judged abnormal, against the
    # threshold (below the station's low).
    assert clean.image_edge is not None and clean.threshold is not None
    assert clean.image_edge <= clean.threshold and motion.image_edge is None
    with site.node.session() as session:
        scored = session.execute(select(SliceScore.abnormal, SliceScore.foreground,
                                        SliceScore.log_likelihood).join(Series).where(
            Series.id == clean.id)).all()
    assert all(bool(a) == bool(fg and s < clean.image_edge) for a, fg, s in scored)
    assert clean.abnormal_slices == sum(bool(a) for a, _, _ in scored)
    marks = flags(site.node, site.motion)
    block = [marks[site.motion.sop_instance_uids[i]][0] for i in sorted(site.motion.corrupted)]
    assert motion.abnormal is True
    assert sum(block) >= 0.6 * len(block), f"{sum(block)} of {len(block)} block slices flagged"


def test_the_motion_series_flags_stay_in_its_block(site: Site,
                                                   request: pytest.FixtureRequest) -> None:
    """At most 5% of the motion series' foreground slices outside its block are flagged. The
    default bundle does not meet this yet (the module docstring): an expected failure for it,
    strict, so that a pass shows."""
    if site.bundle.resolve() == default_bundle_path().resolve():
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "issue 18: 13.3% of the motion series' other slices flagged on the default (a "
            "cluster low in IXI255's head)")))
    marks = flags(site.node, site.motion)
    uids = site.motion.sop_instance_uids
    others = [marks[u] for i, u in enumerate(uids) if i not in site.motion.corrupted]
    outside = sum(f for f, fg in others if fg) / sum(fg for _, fg in others)
    assert outside <= 0.05, f"{outside:.1%} of the other slices flagged"


def test_the_sr_says_the_station_reference_judged_it_and_passes_dciodvfy(site: Site) -> None:
    sr, path = sr_of(site.node, site.motion)
    groups = measurement_groups(sr)
    assert groups[-1].texts["Station reference"].startswith(
        f"Reference: calibrated for station {STATION} (tests.helpers.series), protocol "
        f"'t1 axial se', from {site.reference.series_used} of 20 learning series on ")
    assert all("Score before station reference" in g.measurements for g in groups[:-1])
    # The series summary says what judged it: its 10th percentile and the station's edge.
    motion = row_of(site.node, site.motion)
    assert motion is not None and motion.series_edge is not None
    assert groups[-1].measurements["Series 10th-percentile score"] == pytest.approx(
        motion.series_score)
    assert groups[-1].measurements["Station series edge"] == pytest.approx(motion.series_edge)
    assert groups[-1].evaluations["Imaging Series Quality"] == "RID14"
    assert "Station image edge" not in groups[-1].measurements
    clean = row_of(site.node, site.clean)
    assert clean is not None and clean.image_edge is not None
    clean_sr, clean_path = sr_of(site.node, site.clean)
    clean_summary = measurement_groups(clean_sr)[-1]
    assert clean_summary.evaluations["Imaging Series Quality"] == "RID12"
    assert clean_summary.measurements["Station image edge"] == pytest.approx(clean.image_edge)
    clean_errors, _ = dciodvfy(clean_path)
    assert clean_errors == [], clean_errors
    errors, warnings = dciodvfy(path)
    assert errors == [], errors
    assert all("99VAENODE" in w for w in warnings), warnings
    shown = vaenode(site.node, "queue", "show", site.motion.series_instance_uid, "--json")
    assert shown.returncode == 0, shown.stderr
    out = json.loads(shown.stdout)
    assert out["reference_state"] == "calibrated"
    assert out["reference"] == groups[-1].texts["Station reference"]


def test_a_reported_learning_series_is_left_out_by_a_recalibration(site: Site) -> None:
    """A reviewer reports one of the kept learning series as a missed artifact; ``vaenode
    queue recalibrate`` rebuilds the station from the same 20 series without it (no new
    series), the old reference kept; ``queue senders --series`` says what became of each."""
    with site.node.session() as session:
        before = session.get(StationReference, site.reference.id)
        assert before is not None and before.learned_from is not None
        bad_id = session.scalar(select(Series.id).where(
            Series.series_instance_uid == site.learning[BAD].series_instance_uid))
        assert bad_id in before.learned_from["outlier"]
        reported = before.learned_from["used"][0]
        session.add(AdminAction(series_id=reported, actor="dr ada", action="missed",
                                model=f"{before.model_name} {before.model_version}"))
        session.commit()
    done_ = vaenode(site.node, "queue", "recalibrate", "--station", "mr room 7",
                    "--note", "reviewed the learning series")
    assert done_.returncode == 0, done_.stderr
    assert done_.stdout.startswith("recalibrated: MR ROOM 7"), done_.stdout
    with site.node.session() as session:
        old, new = session.scalars(select(StationReference).order_by(StationReference.id)).all()
    assert old.id == site.reference.id and old.superseded_note == "reviewed the learning series"
    assert new.state == "calibrated" and new.superseded_at is None
    assert new.learned_from is not None and new.learned_from["excluded"] == [reported]
    assert reported not in new.learned_from["used"] and new.series_excluded == 1
    assert (new.series_used or 0) + (new.series_trimmed or 0) == LEARNING_SERIES - 1
    listed = vaenode(site.node, "queue", "senders", "--series")
    assert listed.returncode == 0, listed.stderr
    uid = next(s.series_instance_uid for s in site.learning
               if row_of(site.node, s).id == reported)  # type: ignore[union-attr]
    [line] = [x for x in listed.stdout.splitlines() if uid in x]
    assert "missed artifact" in line and "left out" in line


def test_restart_learning_keeps_the_old_reference_and_learns_afresh(
    site: Site, tmp_path: Path,
) -> None:
    restarted = vaenode(site.node, "queue", "relearn", "--station", "mr room 7",
                        "--note", "new head coil")
    assert restarted.returncode == 0, restarted.stderr
    assert "learning restarted: MR ROOM 7" in restarted.stdout
    with site.node.session() as session:
        rows = session.scalars(select(StationReference).order_by(StationReference.id)).all()
    old, new = rows[-2:]  # the reference recalibrated above, and the new one
    assert old.superseded_at is not None
    assert old.state == "calibrated" and old.superseded_note == "new head coil"
    assert old.superseded_by is not None and old.superseded_by.startswith("cli:")
    assert new.state == "learning" and new.superseded_at is None
    again = write_site_series(subjects(site.bundle)[0], tmp_path / "again", seed=200)
    send(site.node, again)
    wait("the series after the restart scored", lambda: done(site.node, [again]), 300,
         site.node)
    row = row_of(site.node, again)
    assert row is not None and (row.reference_id, row.reference_state) == (new.id, "learning")
    assert sr_reference(site.node, again) == (
        "Reference: out of the box (station learning, 1 of 20 series)")
    missing = vaenode(site.node, "queue", "relearn", "--station", "NO SUCH ROOM")
    assert missing.returncode == 1 and "no station reference" in missing.stderr
