"""End-to-end latency: last instance acknowledged -> SR stored in PACS (run by hand; a table).

Starts a real Orthanc and ``vaenode serve`` (the shipped model unless ``--model``), then per run
sends a fresh 150-slice axial T1 series (an IXI validation volume resampled to 150 slices)
with a pynetdicom SCU, notes when the last C-STORE response arrived, and polls Orthanc until an
SR referencing the series is stored. The node's own timestamps (queue events, outbox) split the
total into: waiting for the series to be complete (the SCU releases its association after the
series: queued 2 s later by default; ``--no-release``: after the idle time), queue -> worker
pick-up, scoring and reporting, and delivery. Target (issue 4): at most the series idle time
+ 15 s on the 2-core machine.

    .venv/bin/python bench/e2e.py [--runs 3] [--idle 5] [--slices 150] [--model BUNDLE]
        [--no-release] [--poll S]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom import dcmread  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import MRImageStorage  # noqa: E402
from sqlalchemy import select  # noqa: E402

from node.model.bundle import default_bundle_path  # noqa: E402
from node.queue.models import OutboxEntry, Report, Series, SeriesEvent  # noqa: E402
from tests.helpers.node import start_node  # noqa: E402
from tests.helpers.orthanc import Orthanc  # noqa: E402
from tests.helpers.series import IXI, WrittenSeries, load_volume, write_series  # noqa: E402


def validation_volume(bundle: Path) -> Path:
    """A volume of a subject the bundle held out (evaluation, else calibration)."""
    subjects = json.loads((bundle / "model.json").read_text())["training"]["subjects"]
    for subject in subjects.get("evaluation", []) + subjects.get("calibration", []):
        found = sorted(IXI.glob(f"{subject}*.nii.gz"))
        if found:
            return found[0]
    raise SystemExit(f"no validation subject of {bundle} under {IXI}")


def make_series(volume_path: Path, slices: int, out: Path) -> WrittenSeries:
    """The volume resampled along the axial axis to ``slices`` slices, written as DICOM."""
    from scipy.ndimage import zoom

    volume, spacing = load_volume(volume_path)
    factor = slices / volume.shape[2]
    resampled = zoom(volume.astype(np.float32), (1.0, 1.0, factor), order=1)
    assert resampled.shape[2] == slices, resampled.shape
    new_spacing = (spacing[0], spacing[1], spacing[2] / factor)
    return write_series(resampled, new_spacing, out, series_description="T1 axial bench")


def send(series: WrittenSeries, port: int) -> float:
    """C-STORE every file on one association; returns the time the last response arrived."""
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="VAENODE")
    if not assoc.is_established:
        raise SystemExit("the node refused the association")
    last_ack = 0.0
    try:
        for path in series.paths:
            status = assoc.send_c_store(dcmread(path))
            last_ack = time.time()
            if not status or status.Status != 0:
                raise SystemExit(f"C-STORE failed: {status}")
    finally:
        assoc.release()
    return last_ack


def sr_stored(orthanc: Orthanc, series: WrittenSeries) -> bool:
    for ds in orthanc.reports("SR", series.study_instance_uid):
        refs = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        if any(r.SeriesInstanceUID == series.series_instance_uid for r in refs):
            return True
    return False


def node_times(node, series_uid: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Epoch seconds of the node's own milestones for one series."""
    with node.session() as session:
        series = session.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        events = session.scalars(
            select(SeriesEvent).where(SeriesEvent.series_id == series.id)
        ).all()
        sent = session.scalars(
            select(OutboxEntry.sent_at)
            .join(Report, OutboxEntry.report_id == Report.id)
            .where(Report.series_id == series.id, Report.kind == "SR")
        ).all()
    out = {"last_received": series.last_received_at.timestamp()}
    for e in events:
        out.setdefault(e.to_status, e.at.timestamp())  # first time each state was reached
    if sent and sent[0] is not None:
        out["sent"] = sent[0].timestamp()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=float, default=5.0, help="[queue].series_idle_s")
    parser.add_argument("--poll", type=float, default=None,
                        help="the queue check, worker and delivery poll intervals (default: "
                             "the node's, 2 s each)")
    parser.add_argument("--no-release", action="store_true",
                        help="[queue].complete_on_release = false: complete after the idle "
                             "time only (the SCU releases its association after the series)")
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--model", type=Path, default=default_bundle_path())
    args = parser.parse_args()

    volume = validation_volume(args.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vaenode-bench-") as tmp:
        work = Path(tmp)
        orthanc = Orthanc(workdir=work / "orthanc", ae_title="PACS")
        orthanc.start()
        poll = {} if args.poll is None else {"poll_interval_s": args.poll}
        node = start_node(work / "node", sections={
            "queue": {"series_idle_s": args.idle, "complete_on_release": not args.no_release,
                      **({} if args.poll is None else {"check_interval_s": args.poll})},
            "worker": {"enabled": True, **poll},
            "model": {"bundle": str(args.model), "device": "cpu"},
            "delivery": {**poll, "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                 "port": orthanc.dicom_port}]},
            "log": {"level": "WARNING"},
        })
        try:
            for run in range(args.runs):
                series = make_series(volume, args.slices, work / f"series-{run}")
                last_ack = send(series, node.port)
                while not sr_stored(orthanc, series):
                    if time.time() - last_ack > 600:
                        raise SystemExit("no SR after 600 s:\n" + node.log_text()[-3000:])
                    time.sleep(0.1)
                in_pacs = time.time()
                t = node_times(node, series.series_instance_uid)
                while "sent" not in t and time.time() - in_pacs < 30:
                    time.sleep(0.1)  # Orthanc answered; the node records it a moment later
                    t = node_times(node, series.series_instance_uid)
                rows.append({
                    "total": in_pacs - last_ack,
                    "to_queued": t.get("queued", float("nan")) - last_ack,
                    "to_claimed": t.get("processing", float("nan")) - t.get("queued", 0.0),
                    "scoring_report": t.get("done", float("nan")) - t.get("processing", 0.0),
                    "delivery": t.get("sent", float("nan")) - t.get("done", 0.0),
                })
                print(f"run {run + 1}: {rows[-1]['total']:.1f} s", flush=True)
        finally:
            node.stop()
            orthanc.stop(graceful=False)

    cols = ["total", "to_queued", "to_claimed", "scoring_report", "delivery"]
    completion = ("after the idle time only" if args.no_release
                  else "on association release (2 s settle), idle time as fallback")
    polls = "node defaults" if args.poll is None else f"{args.poll:g} s"
    print(f"\n{args.slices}-slice series, idle time {args.idle:.1f} s, complete {completion}, "
          f"poll intervals {polls}, model {args.model.name}, {args.runs} runs (seconds)")
    print(f"{'run':<8}" + "".join(f"{c:>16}" for c in cols))
    for i, r in enumerate(rows, 1):
        print(f"{i:<8}" + "".join(f"{r[c]:>16.2f}" for c in cols))
    print(f"{'median':<8}" + "".join(f"{statistics.median(r[c] for r in rows):>16.2f}"
                                     for c in cols))
    target = args.idle + 15.0
    median = statistics.median(r["total"] for r in rows)
    print(f"\ntarget: idle + 15 s = {target:.1f} s; median {median:.1f} s -> "
          f"{'met' if median <= target else 'NOT met'}")


if __name__ == "__main__":
    main()
