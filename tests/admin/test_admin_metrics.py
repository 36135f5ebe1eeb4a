"""``/metrics`` parses with the Prometheus client's parser and counts what really happened."""

from __future__ import annotations

import shutil
import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node.admin import reviews
from node.admin.metrics import SCORING_BUCKETS_S
from node.config import DeliverySettings, Destination, Settings
from node.queue import repo, retention
from node.queue.models import Report, Series, utcnow
from node.report import outbox
from tests.admin.web import ScoredNode, http

DICOM = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom"
PACS = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.mark.e2e
def test_metrics_of_a_real_node_count_the_series_sent(scored_node: ScoredNode) -> None:
    reply = http(f"{scored_node.base_url}/metrics",
                 headers={"Authorization": f"Bearer {scored_node.token}"})
    assert reply.status == 200
    samples = _samples(reply.text)
    sent = len(scored_node.sent_series)
    assert samples[("vaenode_series_received_total", ())] == sent
    assert samples[("vaenode_instances_received_total", ())] == scored_node.sent_instances
    assert samples[("vaenode_series", (("status", "done"),))] == sent
    assert samples[("vaenode_series", (("status", "failed"),))] == 0
    assert samples[("vaenode_scoring_duration_seconds_count", ())] == sent
    assert samples[("vaenode_scoring_duration_seconds_sum", ())] > 0
    assert samples[("vaenode_delivery_failures_total", ())] == 0


def _ingest(session_factory: sessionmaker[Session], storage: Path, files: list[Path],
            calling_aet: str) -> str:
    """Store real files and record them through the queue's own ingest function."""
    uid = ""
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        rel = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        (storage / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, storage / rel)
        with session_factory() as session:
            repo.record_instance(session, repo.InstanceRecord(
                study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
                sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), path=rel,
                size_bytes=f.stat().st_size, instance_number=int(ds.InstanceNumber),
                modality=ds.Modality, series_description=ds.get("SeriesDescription"),
                body_part=ds.get("BodyPartExamined"), calling_aet=calling_aet,
                peer_address="127.0.0.1", received_at=utcnow(),
                station_name=ds.get("StationName")))
        uid = ds.SeriesInstanceUID
    return uid


def test_metrics_follow_queue_outbox_and_reviews(make_settings, session_factory_for,  # type: ignore[no-untyped-def]
                                                 run_dashboard, tmp_path) -> None:
    """Each metric moves with the transition functions of its owner (queue, outbox, reviews)."""
    files = sorted((DICOM / "siemens_trio_gre_field_mapping_2").glob("*.dcm"))[:5]
    if not files:
        pytest.skip("no real DICOM series available")
    settings: Settings = make_settings()
    factory = session_factory_for(settings)
    uid = _ingest(factory, settings.storage.dir, files, "SCANNER1")
    dash = run_dashboard(settings, factory)
    url = f"http://127.0.0.1:{dash.port}/metrics"

    samples = _samples(http(url).text)
    assert samples[("vaenode_instances_received_total", ())] == 5
    assert samples[("vaenode_series", (("status", "receiving"),))] == 1

    assert samples[("vaenode_oldest_queued_seconds", ())] == 0
    with factory() as session:
        series_id = session.scalars(select(Series.id)).one()
        repo.mark_queued(session, series_id, idle_before=utcnow() + timedelta(seconds=1))
        session.execute(update(Series).where(Series.id == series_id)  # queued 2 minutes ago
                        .values(updated_at=utcnow() - timedelta(seconds=120)))
        session.commit()
    waited = _samples(http(url).text)[("vaenode_oldest_queued_seconds", ())]
    assert 120 <= waited < 180
    with factory() as session:
        claimed = repo.claim_next_queued(session, "w1", lease_s=60)
        assert claimed is not None
        repo.mark_done(session, series_id, worker_id="w1")
        # The verdict columns as the worker writes them (revision 0002_scoring).
        session.execute(update(Series).where(Series.id == series_id).values(
            abnormal=True, abnormal_slices=3, scored_slices=5, min_abnormal_slices=3,
            model_name="m", model_version="1", threshold=-10.0, scored_at=utcnow()))
        report = Report(series_id=series_id, kind="SR", sop_instance_uid="1.2.3.4",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33", series_instance_uid="1.2.3",
                        instance_number=1, path="sr.dcm")
        session.add(report)
        outbox.enqueue(session, report, [PACS])
        session.commit()
        row_id = outbox.due_ids(session, utcnow(), 10)[0]
    delivery = DeliverySettings(retry_base_s=0.001, retry_max_s=0.001)
    for _ in range(2):
        claim = outbox.claim(factory, row_id, lease_s=30)
        assert claim is not None
        outbox.mark_attempt_failed(factory, claim, "refused", delivery)
        time.sleep(0.01)  # past the (1 ms) backoff, so the row is due again
    claim = outbox.claim(factory, row_id, lease_s=30)
    assert claim is not None
    outbox.mark_sent(factory, claim)
    with factory() as session:
        series = session.get(Series, series_id)
        assert series is not None
        reviews.perform(session, settings, series, reviews.FALSE_ALARM, "alice", None)

    samples = _samples(http(url).text)
    assert samples[("vaenode_series", (("status", "done"),))] == 1
    assert samples[("vaenode_series", (("status", "receiving"),))] == 0
    assert samples[("vaenode_oldest_queued_seconds", ())] == 0
    assert samples[("vaenode_scoring_duration_seconds_count", ())] == 1
    assert samples[("vaenode_scoring_duration_seconds_bucket", (("le", "+Inf"),))] == 1
    first = repr(float(SCORING_BUCKETS_S[0]))
    assert samples[("vaenode_scoring_duration_seconds_bucket", (("le", first),))] == 1
    assert samples[("vaenode_delivery_failures_total", ())] == 2
    assert samples[("vaenode_false_alarms_total", (("model", "m 1"),))] == 1
    assert samples[("vaenode_missed_total", (("model", "m 1"),))] == 0
    scanner = (("calling_aet", "SCANNER1"), ("station", "MRC35389"))
    assert samples[("vaenode_scored_series", (*scanner, ("verdict", "abnormal")))] == 1
    assert ("vaenode_scored_series", (*scanner, ("verdict", "normal"))) not in samples
    assert samples[("vaenode_confirmations_total", (("model", "m 1"),))] == 0
    assert samples[("vaenode_series_received_total", ())] == 1
    assert samples[("vaenode_storage_free_bytes", ())] > 0
    assert samples[("vaenode_series_images_deleted_total", ())] == 0
    assert samples[("vaenode_alerts", (("state", "failed"),))] == 0
    # The retention job deletes the series' images: the counters of what was received stay,
    # the deleted-images counter moves.
    later = utcnow() + timedelta(days=settings.storage.retention_days + 1)
    assert retention.purge_expired(factory, settings.storage.dir,
                                   settings.storage.retention_days, now=later) == 1
    samples = _samples(http(url).text)
    assert samples[("vaenode_series_images_deleted_total", ())] == 1
    assert samples[("vaenode_instances_received_total", ())] == 5
    queue = http(f"http://127.0.0.1:{dash.port}/queue?status=done").text
    assert uid in queue and "flagged" in queue
