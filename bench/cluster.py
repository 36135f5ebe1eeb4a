"""Several nodes on one PostgreSQL against one node on SQLite (run by hand; prints tables).

Scoring, end to end: ``--series`` 150-slice axial T1 series (an IXI validation volume resampled,
as bench/e2e.py makes them) are sent at once by two ``storescu`` processes; a series' time is
from its last instance stored to its SR stored in a real Orthanc (the outbox's ``sent_at``), and
the run's throughput is the series divided by the time from the first instance sent to the
last SR stored. Configurations, in one run: one ``vaenode serve`` on SQLite (receiver and
worker in one node, as shipped), then one receiver (``vaenode serve``, worker off) and 1, 2
and 4 ``vaenode worker`` processes on one PostgreSQL. Each configuration gets a fresh database
and storage folder, and its workers have loaded the model before the first instance is sent.

Ingest: four ``storescu`` processes send one 150-instance series each (600 instances) to one
node on SQLite, one receiver on PostgreSQL, and two receivers on PostgreSQL (two senders
each), with no worker running; instances per second over the whole transfer.

CPU: the processes' user + system seconds over the run (from /proc, their listener children
and PostgreSQL's backends included), per series: the workers' alone (what scoring costs; on
SQLite the one node's, receiving included), and everything (receivers, workers, PostgreSQL);
for ingest, per 1000 instances (receivers and PostgreSQL). On a machine with fewer cores than
workers the workers share them, so series per minute cannot grow with more workers there; the
CPU seconds per series say what each added machine would add.

    .venv/bin/python bench/cluster.py [--series 8] [--runs 1] [--workers 1,2,4]
        [--skip-ingest] [--skip-scoring]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, select  # noqa: E402

from bench.e2e import make_series, validation_volume  # noqa: E402
from node.model.bundle import default_bundle_path  # noqa: E402
from node.queue.models import OutboxEntry, Report, Series  # noqa: E402
from tests.helpers import dcmtk  # noqa: E402
from tests.helpers.cluster import Deployment, merge  # noqa: E402
from tests.helpers.node import RunningNode, start_node  # noqa: E402
from tests.helpers.orthanc import Orthanc  # noqa: E402
from tests.helpers.postgres import Postgres, start_postgres  # noqa: E402
from tests.helpers.series import WrittenSeries  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, with_children: bool = True) -> float:
    """User + system CPU seconds of a process, its reaped children and its live children."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    # After the command: state is field 3; utime 14, stime 15, cutime 16, cstime 17 (1-based).
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:
            children = []
        return ticks / CLK_TCK + sum(cpu_seconds(int(c)) for c in children)
    return ticks / CLK_TCK


@dataclass
class Counted:
    """Processes whose CPU a run counts: workers apart from the rest."""

    workers: list[int]
    others: list[int]

    def read(self) -> tuple[float, float]:
        w = sum(cpu_seconds(p) for p in self.workers)
        return w, w + sum(cpu_seconds(p) for p in self.others)


def sent_times(url: str, uids: list[str]) -> dict[str, tuple[float, float]]:
    """Per series UID that has its SR stored in PACS: (last instance received, SR sent) in
    epoch seconds."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(Series.series_instance_uid, Series.last_received_at, OutboxEntry.sent_at)
                .join(Report, Report.series_id == Series.id)
                .join(OutboxEntry, OutboxEntry.report_id == Report.id)
                .where(Series.series_instance_uid.in_(uids), Report.kind == "SR",
                       OutboxEntry.state == "sent")).all()
    finally:
        engine.dispose()
    return {uid: (last.timestamp(), sent.timestamp()) for uid, last, sent in rows}


def send_all(port_of: Callable[[int], int], groups: list[list[Path]]) -> float:
    """One storescu per group of files, all at once; returns when the first one started."""
    started = time.time()
    with ThreadPoolExecutor(len(groups)) as pool:
        done = list(pool.map(
            lambda ig: dcmtk.storescu(port_of(ig[0]), ig[1], calling_aet="MR1", timeout_s=900),
            enumerate(groups)))
    bad = [p.stderr[-500:] for p in done if p.returncode != 0]
    if bad:
        raise SystemExit(f"storescu failed: {bad}")
    return started


def wait_until(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


@dataclass
class ScoringResult:
    label: str
    series_per_min: float
    latency_s: float  # median, last instance -> SR in PACS
    worker_cpu_s: float  # per series
    total_cpu_s: float  # per series
    wall_s: float


@contextmanager
def scoring_nodes(kind: str, workers: int, root: Path, postgres: Postgres, common: dict[str, Any]
                  ) -> Iterator[tuple[str, int, Counted]]:
    """Start one configuration: yields (database URL, DICOM port, processes to count)."""
    if kind == "sqlite":
        node = start_node(root / "node", sections=merge(common, {"worker": {"enabled": True}}))
        try:
            wait_until("the model loaded", lambda: "model loaded" in node.log_text(), 300)
            yield node.db_url, node.port, Counted([node.proc.pid], [])
        finally:
            node.stop()
        return
    url = postgres.new_database(root.name)
    deployment = Deployment(root / "nodes", url, root / "shared", common=merge(
        common, {"cluster": {"heartbeat_s": 10.0, "takeover_check_s": 15.0}}))
    try:
        receiver = deployment.receiver("r1")
        with ThreadPoolExecutor(workers) as pool:
            started: list[RunningNode] = list(pool.map(
                lambda i: deployment.worker(f"w{i + 1}"), range(workers)))
        wait_until("the workers' model", lambda: all(
            "model loaded" in w.log_text() for w in started), 300)
        yield url, receiver.port, Counted([w.proc.pid for w in started],
                                          [receiver.proc.pid, postgres.proc.pid])
    finally:
        deployment.stop()


def run_scoring(kind: str, workers: int, root: Path, postgres: Postgres, orthanc: Orthanc,
                series: list[WrittenSeries]) -> ScoringResult:
    common: dict[str, Any] = {
        "queue": {"series_idle_s": 30.0},
        "model": {"device": "cpu", "bundle": str(default_bundle_path())},
        "worker": {"lease_s": 600.0},
        "delivery": {"destinations": [{"name": "pacs", "ae_title": orthanc.ae_title,
                                       "host": "127.0.0.1", "port": orthanc.dicom_port}]},
    }
    label = "1 node, SQLite" if kind == "sqlite" else (
        f"1 receiver + {workers} worker{'s' if workers > 1 else ''}, PostgreSQL")
    with scoring_nodes(kind, workers, root, postgres, common) as (url, port, counted):
        uids = [s.series_instance_uid for s in series]
        cpu0 = counted.read()
        started = send_all(lambda _i: port, [
            [p for s in series[k::2] for p in s.paths] for k in range(2)])
        wait_until("every SR in PACS", lambda: len(sent_times(url, uids)) == len(uids), 1800)
        cpu1 = counted.read()
        times = sent_times(url, uids)
    last_sent = max(sent for _, sent in times.values())
    wall = last_sent - started
    n = len(series)
    return ScoringResult(
        label=label, series_per_min=60.0 * n / wall,
        latency_s=statistics.median(sent - last for last, sent in times.values()),
        worker_cpu_s=(cpu1[0] - cpu0[0]) / n, total_cpu_s=(cpu1[1] - cpu0[1]) / n,
        wall_s=wall)


def run_ingest(kind: str, receivers: int, root: Path, postgres: Postgres,
               series: list[WrittenSeries]) -> tuple[str, float, float]:
    """Four storescu at once, no worker; returns (label, instances per second, CPU seconds
    per 1000 instances of the receivers and, on PostgreSQL, the database server)."""
    common: dict[str, Any] = {"queue": {"series_idle_s": 600.0}, "worker": {"enabled": False}}
    groups = [s.paths for s in series]
    count = sum(len(g) for g in groups)

    def measure(ports: list[int], counted: Counted) -> tuple[float, float]:
        cpu0 = counted.read()[1]
        started = time.time()
        send_all(lambda i: ports[i % len(ports)], groups)
        wall = time.time() - started
        return count / wall, 1000.0 * (counted.read()[1] - cpu0) / count

    if kind == "sqlite":
        node = start_node(root / "node", sections=common)
        try:
            return ("1 node, SQLite",
                    *measure([node.port], Counted([], [node.proc.pid])))
        finally:
            node.stop()
    deployment = Deployment(root / "nodes", postgres.new_database(root.name), root / "shared",
                            common=merge(common, {"dicom": {"listener_processes": 2}}))
    try:
        nodes = [deployment.receiver(f"r{i + 1}") for i in range(receivers)]
        rate, cpu = measure([n.port for n in nodes],
                            Counted([], [n.proc.pid for n in nodes] + [postgres.proc.pid]))
    finally:
        deployment.stop()
    label = f"{receivers} receiver{'s' if receivers > 1 else ''}, PostgreSQL"
    return label, rate, cpu


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=8, help="series per scoring run")
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--runs", type=int, default=1, help="runs per cell (medians)")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--skip-scoring", action="store_true")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="vaenode-bench-cluster-"))
    postgres = start_postgres(tmp / "pg")
    orthanc = Orthanc(workdir=tmp / "orthanc", ae_title="PACS")
    orthanc.start()
    try:
        volume = validation_volume(default_bundle_path())
        count = max(args.series, 4)
        print(f"writing {count} series of {args.slices} slices...", file=sys.stderr)
        series = [make_series(volume, args.slices, tmp / "series" / f"s{i}")
                  for i in range(count)]
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        if not args.skip_scoring:
            cells: list[list[ScoringResult]] = []
            configs = [("sqlite", 1)] + [("pg", w) for w in workers]
            for run in range(args.runs):
                for i, (kind, w) in enumerate(configs):
                    root = tmp / f"score-{run}-{i}"
                    print(f"scoring: {kind} {w} worker(s), run {run + 1}", file=sys.stderr)
                    result = run_scoring(kind, w, root, postgres, orthanc,
                                         series[:args.series])
                    if run == 0:
                        cells.append([])
                    cells[i].append(result)
                    shutil.rmtree(root, ignore_errors=True)
            print(f"\nScoring end to end: {args.series} series of {args.slices} slices sent at "
                  f"once by two storescu, the shipped model; {args.runs} run(s) per row, "
                  f"medians. {stamp}, 2 CPU cores shared, load average {load_average()} at "
                  "the end.\n")
            print("| configuration | series/min | median last instance -> SR in PACS (s) "
                  "| worker CPU s/series | total CPU s/series | wall (s) |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for runs in cells:
                med = {f: statistics.median(getattr(r, f) for r in runs) for f in (
                    "series_per_min", "latency_s", "worker_cpu_s", "total_cpu_s", "wall_s")}
                print(f"| {runs[0].label} | {med['series_per_min']:.1f} | "
                      f"{med['latency_s']:.1f} | {med['worker_cpu_s']:.1f} | "
                      f"{med['total_cpu_s']:.1f} | {med['wall_s']:.0f} |")
        if not args.skip_ingest:
            rates: dict[str, list[float]] = {}
            cpus: dict[str, list[float]] = {}
            for run in range(args.runs):
                for i, (kind, n) in enumerate([("sqlite", 1), ("pg", 1), ("pg", 2)]):
                    root = tmp / f"ingest-{run}-{i}"
                    print(f"ingest: {kind} {n} receiver(s), run {run + 1}", file=sys.stderr)
                    label, rate, cpu = run_ingest(kind, n, root, postgres, series[:4])
                    rates.setdefault(label, []).append(rate)
                    cpus.setdefault(label, []).append(cpu)
                    shutil.rmtree(root, ignore_errors=True)
            print(f"\nIngest: four storescu at once, one {args.slices}-instance MR series each "
                  f"({4 * args.slices} instances), no worker; {args.runs} run(s) per row, "
                  f"medians. {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 2 CPU "
                  f"cores shared, load average {load_average()} at the end.\n")
            print("| configuration | instances/s | CPU s per 1000 instances | runs (instances/s) |")
            print("| --- | ---: | ---: | --- |")
            for label, values in rates.items():
                print(f"| {label} | {statistics.median(values):.0f} | "
                      f"{statistics.median(cpus[label]):.1f} | "
                      f"{', '.join(f'{v:.0f}' for v in values)} |")
    finally:
        orthanc.stop(graceful=False)
        postgres.stop()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    main()
