"""Two receivers and two workers on one PostgreSQL and one storage folder, each its own process
with its own configuration: series split over both receivers are completed, scored and reported
once; a worker killed in the middle of a series and a receiver killed in the middle of a
transfer lose nothing and report nothing twice.

Real peers only: DCMTK ``storescu`` plays the scanners (four at once), a private PostgreSQL
cluster the database, Orthanc the PACS, the shipped model scores. The series are short (the
mechanics do not need 150 slices) and declare their image count (Images in Acquisition), as
scanners do: a series is complete when all of it is in, across receivers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from node.queue.models import Instance, OutboxEntry, Report, Series
from tests.helpers import dcmtk
from tests.helpers.cluster import Deployment
from tests.helpers.node import VAENODE, RunningNode, free_port
from tests.helpers.orthanc import Orthanc
from tests.helpers.postgres import Postgres, start_postgres
from tests.helpers.reports import measurement_groups
from tests.helpers.series import IXI, WrittenSeries, load_volume, write_series

pytestmark = pytest.mark.e2e

#: Slices per series of the split test; the kill tests use longer ones.
SHORT, LONG = 12, 40


@dataclass
class Cluster:
    deployment: Deployment
    orthanc: Orthanc
    volume: tuple[np.ndarray, tuple[float, float, float]]
    workdir: Path
    admin_port: int

    def series(self, name: str, slices: int, start: int = 50) -> WrittenSeries:
        """A short axial brain series (fresh study and series UIDs) declaring its count."""
        vol, spacing = self.volume
        return write_series(vol[:, :, start:start + slices], spacing, self.workdir / name,
                            series_description=f"T1 axial {name}",
                            images_in_acquisition=slices)

    def node(self, name: str) -> RunningNode:
        return self.deployment.nodes[name]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("cluster")
    postgres: Postgres = start_postgres(workdir / "pg")
    orthanc = Orthanc(workdir=workdir / "orthanc", ae_title="PACS")
    orthanc.start()
    admin_port = free_port()
    deployment = Deployment(workdir / "nodes", postgres.new_database("cluster"),
                            workdir / "shared", common={
        "queue": {"series_idle_s": 30.0, "check_interval_s": 0.3},
        # A short lease: a dead worker's series comes back within 6 s (live ones renew it).
        "worker": {"poll_interval_s": 0.5, "lease_s": 6.0},
        "model": {"device": "cpu"},
        "delivery": {"poll_interval_s": 0.5, "retry_base_s": 0.5, "retry_max_s": 2.0,
                     "destinations": [{"name": "pacs", "ae_title": orthanc.ae_title,
                                       "host": "127.0.0.1", "port": orthanc.dicom_port}]},
    })
    try:
        with ThreadPoolExecutor(4) as pool:
            started = [
                pool.submit(deployment.receiver, "r1",
                            {"admin": {"enabled": True, "port": admin_port}}),
                pool.submit(deployment.receiver, "r2"),
                pool.submit(deployment.worker, "w1"),
                pool.submit(deployment.worker, "w2")]
            for future in started:
                future.result()
        # Both workers have loaded the model: neither is still warming up when series come.
        deployment.wait("both workers' model", lambda: all(
            "model loaded" in deployment.nodes[w].log_text() for w in ("w1", "w2")), 120)
        volume = load_volume(sorted(IXI.glob("*.nii.gz"))[0])
        yield Cluster(deployment, orthanc, volume, workdir, admin_port)
    finally:
        deployment.stop()
        orthanc.stop(graceful=False)
        postgres.stop()


def _done_runs(cluster: Cluster, uid: str) -> list[str]:
    """The workers that marked the series done, one entry per verdict stored."""
    return [actor for status, _, actor in cluster.deployment.events(uid) if status == "done"]


def _reported(cluster: Cluster, series: WrittenSeries) -> bool:
    with cluster.deployment.session() as session:
        return bool(session.scalar(
            select(func.count(OutboxEntry.id)).join(Report).join(Series)
            .where(Series.series_instance_uid == series.series_instance_uid,
                   OutboxEntry.state == "sent")))


def _assert_reported_once(cluster: Cluster, series: WrittenSeries) -> str:
    """One verdict, one SR delivered in one attempt, in Orthanc once, referencing every image;
    returns the worker that scored it."""
    [worker] = _done_runs(cluster, series.series_instance_uid)
    with cluster.deployment.session() as session:
        rows = session.execute(
            select(Report.kind, OutboxEntry.state, OutboxEntry.attempts)
            .join(OutboxEntry, OutboxEntry.report_id == Report.id).join(Series)
            .where(Series.series_instance_uid == series.series_instance_uid)).all()
        count = session.scalar(select(Series.instance_count).where(
            Series.series_instance_uid == series.series_instance_uid))
    assert count == len(series)
    srs = [r for r in rows if r.kind == "SR"]
    assert [(str(r.state), r.attempts) for r in srs] == [("sent", 1)], rows
    [sr] = cluster.orthanc.reports("SR", series.study_instance_uid)
    referenced = {sop for g in measurement_groups(sr) for _, sop, _ in g.references}
    assert referenced == set(series.sop_instance_uids)
    return worker


def test_series_split_over_two_receivers_are_scored_and_reported_once(cluster: Cluster) -> None:
    """Four storescu at once, eight series, each series' first half to r1 and second half to
    r2 (in the opposite order: a series' last part comes long after the first receiver
    released)."""
    d = cluster.deployment
    series = [cluster.series(f"split{i}", SHORT, start=40 + 5 * i) for i in range(8)]
    half = SHORT // 2
    jobs = []
    for group in (series[:4], series[4:]):
        jobs.append((d.nodes["r1"].port, [p for s in group for p in s.paths[:half]]))
        jobs.append((d.nodes["r2"].port, [p for s in reversed(group) for p in s.paths[half:]]))
    with ThreadPoolExecutor(4) as pool:
        sent = list(pool.map(lambda job: dcmtk.storescu(job[0], job[1], calling_aet="MR1"),
                             jobs))
    assert all(p.returncode == 0 for p in sent), [p.stderr for p in sent]
    for s in series:
        d.wait(f"the SR of {s.folder.name}", lambda s=s: _reported(cluster, s), 240)
    scored_by = [_assert_reported_once(cluster, s) for s in series]
    assert set(scored_by) == {"w1", "w2"}  # both workers took series from the one queue
    for s in series:
        # Completed once, when all of it was in: one hand-over to the workers, no re-score.
        statuses = [status for status, _, _ in d.events(s.series_instance_uid)]
        assert statuses == ["receiving", "queued", "processing", "done"]
    with d.session() as session:
        stored = session.scalars(select(Instance.path)).all()
    assert all((d.storage / p).is_file() for p in stored)

    # The nodes view: four nodes up, one of the receivers runs the cluster-wide jobs.
    listed = subprocess.run(
        [str(VAENODE), "queue", "nodes", "--json", "--config", str(d.nodes["w2"].config_path)],
        capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    nodes = {n["name"]: n for n in map(json.loads, listed.stdout.splitlines())}
    assert {n: (v["role"], v["state"]) for n, v in nodes.items()} == {
        "r1": ("receiver", "up"), "r2": ("receiver", "up"),
        "w1": ("worker", "up"), "w2": ("worker", "up")}
    assert [n for n, v in nodes.items() if v["cluster_jobs"]] in (["r1"], ["r2"])
    # ... on the dashboard, and in /metrics labelled by node.
    base = f"http://127.0.0.1:{cluster.admin_port}"
    page = urllib.request.urlopen(f"{base}/nodes", timeout=30).read().decode()
    assert all(f"<td>{name}</td>" in page for name in nodes)
    metrics = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    assert 'vaenode_node_up{node="w1",role="worker",version="0.1.0"} 1.0' in metrics
    scored = {m[0]: float(m[1]) for m in re.findall(
        r'^vaenode_node_series_scored_total\{node="(\w+)"\} (\S+)$', metrics, flags=re.M)}
    assert scored == {w: float(scored_by.count(w)) for w in ("w1", "w2")}


def test_a_worker_killed_mid_series_leaves_it_to_the_other_scored_once(cluster: Cluster) -> None:
    """w2 is paused (SIGSTOP) so that w1 claims the series; w1 is killed while it scores; w2,
    resumed, takes the series back when w1's lease runs out and reports it, once."""
    d = cluster.deployment
    series = cluster.series("worker-kill", LONG)
    w1, w2 = d.nodes["w1"], d.nodes["w2"]
    os.kill(w2.proc.pid, signal.SIGSTOP)
    try:
        sent = dcmtk.storescu(d.nodes["r1"].port, series.paths, calling_aet="MR1")
        assert sent.returncode == 0, sent.stderr
        d.wait("w1 scoring the series", lambda: any(
            status == "processing" and actor == "w1"
            for status, _, actor in d.events(series.series_instance_uid)), 60, every_s=0.02)
        w1.kill()
    finally:
        os.kill(w2.proc.pid, signal.SIGCONT)
    d.wait("the SR", lambda: _reported(cluster, series), 120)
    assert _assert_reported_once(cluster, series) == "w2"
    events = d.events(series.series_instance_uid)
    assert [(status, reason) for status, reason, _ in events[2:]] == [
        ("processing", "claimed by w1"), ("queued", "lease expired"),
        ("processing", "claimed by w2"), ("done", events[-1][1])]
    # Back up under its name, w1 finds nothing of its own left to requeue.
    restarted = d.worker("w1")
    assert "series requeued at start-up" not in restarted.log_text()


def _acknowledged(storescu_output: str) -> list[str]:
    """The files a storescu -v run got Success for."""
    done, current = [], None
    for line in storescu_output.splitlines():
        if m := re.match(r"I: Sending file: (.+)$", line):
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current is not None:
            done.append(current)
            current = None
    return done


def test_a_receiver_killed_mid_transfer_loses_no_acknowledged_instance(
        cluster: Cluster) -> None:
    """r1 is killed while storescu sends it a series; what got Success is stored; the scanner
    sends the series again through r2, and it is reported once, whole."""
    d = cluster.deployment
    series = cluster.series("receiver-kill", LONG)
    r1 = d.nodes["r1"]
    sender = subprocess.Popen(
        dcmtk.storescu_cmd(r1.port, series.paths, calling_aet="MR1", extra=["-v"]),
        env=dcmtk.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert sender.stdout is not None
    lines = []
    for line in sender.stdout:  # storescu -v writes a line per response as it comes
        lines.append(line)
        if sum("Received Store Response (Success)" in x for x in lines) == 10:
            r1.kill()  # in the middle of the transfer
            break
    lines += sender.stdout.readlines()
    assert sender.wait(timeout=60) != 0  # the transfer broke off
    output = "".join(lines)
    acknowledged = _acknowledged(output)
    assert 10 <= len(acknowledged) < LONG, output
    uids = dict(zip(map(str, series.paths), series.sop_instance_uids, strict=True))
    with d.session() as session:
        rows = dict(session.execute(select(Instance.sop_instance_uid, Instance.path)).all())
    for path in acknowledged:
        assert uids[path] in rows, f"{path} got Success but has no row"
        assert (d.storage / rows[uids[path]]).is_file()

    resent = dcmtk.storescu(d.nodes["r2"].port, series.paths, calling_aet="MR1")
    assert resent.returncode == 0, resent.stderr
    d.wait("the SR", lambda: _reported(cluster, series), 120)
    _assert_reported_once(cluster, series)
    # r1 comes back on the same port; its start-up recovery keeps every row.
    d.receiver("r1", {"admin": {"enabled": True, "port": cluster.admin_port}}, port=r1.port)
    with d.session() as session:
        assert session.scalar(select(func.count(Instance.id)).join(Series).where(
            Series.series_instance_uid == series.series_instance_uid)) == LONG
