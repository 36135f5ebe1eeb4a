"""Prometheus metrics, read from the queue database at scrape time.

Counting in process memory would be wrong for this node: the SCP, the worker and the dashboard
may run in different processes (or on different nodes sharing one PostgreSQL queue), and a
restart would zero every counter. The database already records every instance, status change,
delivery attempt and review, so a custom collector derives each metric from it when Prometheus
asks. The values are cumulative from the start of the database, which is what a counter means.
So every node of a deployment answers the same figures of the whole queue (scrape one, or
take ``max`` over nodes), and the ``vaenode_node_*`` families say, labelled ``node``, what
each node is doing.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker

from node.admin import reviews
from node.admin.queries import status_counts
from node.cluster.nodes import list_nodes
from node.queue import repo
from node.queue.models import Alert, Series, SeriesEvent, utcnow
from node.queue.states import SeriesState

log = logging.getLogger(__name__)

# Seconds; a 150-slice series on a 2-core CPU takes seconds to a minute.
SCORING_BUCKETS_S = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def scoring_histogram(session: Session) -> tuple[list[tuple[str, float]], float]:
    """Cumulative bucket counts and the sum of the scoring durations (seconds from a worker's
    ``processing`` event to the ``done`` event ending that run, which the queue writes on the
    ``done`` event); one aggregate query, however long the history.

    A run that ended ``failed`` or was taken back is not a scoring duration and has none.
    """
    duration = SeriesEvent.duration_s
    counts = [func.coalesce(func.sum(case((duration <= bound, 1), else_=0)), 0)
              for bound in SCORING_BUCKETS_S]
    row = session.execute(
        select(*counts, func.count(duration), func.coalesce(func.sum(duration), 0.0))
        .where(SeriesEvent.to_status == str(SeriesState.DONE), duration.is_not(None))
    ).one()
    buckets = [(repr(float(bound)), float(n))
               for bound, n in zip(SCORING_BUCKETS_S, row[:-2], strict=True)]
    buckets.append(("+Inf", float(row[-2])))
    return buckets, float(row[-1])


class QueueCollector(Collector):
    """Collects every vaenode metric from the database on each scrape."""

    def __init__(self, session_factory: sessionmaker[Session],
                 storage: Path | None = None) -> None:
        self._session_factory = session_factory
        self._storage = storage

    def _storage_metrics(self, session: Session) -> Iterator[Metric]:
        """Free space where instances are stored (C-STORE is refused below
        ``[storage].min_free_mb``) and the series whose images the retention job deleted."""
        if self._storage is not None:
            free = GaugeMetricFamily("vaenode_storage_free_bytes",
                                     "Free bytes on the file system of the storage folder.")
            try:
                free.add_metric([], float(shutil.disk_usage(self._storage).free))
            except OSError as exc:  # the folder vanished: no sample, the scrape still works
                log.warning("cannot measure free space of %s: %s", self._storage, exc)
            yield free
        purged = CounterMetricFamily(
            "vaenode_series_images_deleted",
            "Series whose stored images the retention job deleted ([storage].retention_days).",
        )
        purged.add_metric([], float(session.scalar(
            select(func.count(Series.id)).where(Series.purged_at.is_not(None))) or 0))
        yield purged

    def _verdicts_by_sender(self, session: Session) -> Metric:
        # A gauge, not a counter: a re-score can change a verdict. A scanner's flag rate
        # is abnormal / (abnormal + normal); the dashboard's Scanners page tests it against
        # the other scanners'.
        gauge = GaugeMetricFamily(
            "vaenode_scored_series",
            "Series with a verdict, by scanner (calling AE and Station Name) and verdict.",
            labels=["calling_aet", "station", "verdict"],
        )
        rows = session.execute(
            select(Series.calling_aet, Series.station_name, Series.abnormal,
                   func.count(Series.id))
            .where(Series.status == SeriesState.DONE, Series.abnormal.is_not(None))
            .group_by(Series.calling_aet, Series.station_name, Series.abnormal)
        ).all()
        for aet, station, abnormal, n in rows:
            gauge.add_metric([aet or "", station or "", "abnormal" if abnormal else "normal"],
                             float(n))
        return gauge

    def _oldest_queued(self, session: Session) -> Metric:
        """How long the longest-waiting queued series has waited for a worker: the one number
        that says a worker is stuck, dead or too slow (alert on it), whatever the queue's
        length."""
        oldest = GaugeMetricFamily(
            "vaenode_oldest_queued_seconds",
            "Seconds the longest-waiting queued series has waited for a worker (0: none waits).",
        )
        since = session.scalar(select(func.min(Series.updated_at))
                               .where(Series.status == SeriesState.QUEUED))
        oldest.add_metric([], max(0.0, (utcnow() - since).total_seconds()) if since else 0.0)
        return oldest

    def _node_metrics(self, session: Session) -> Iterator[Metric]:
        """Per node of the deployment (node/cluster/nodes.py), labelled ``node``: up or not,
        heartbeat age, which one runs the cluster-wide jobs, series it scores now and has
        scored. Every node's ``/metrics`` shows them all (they come from the database)."""
        views = list_nodes(session)
        up = GaugeMetricFamily("vaenode_node_up",
                               "1 while a node's heartbeat is current, 0 stopped or lost.",
                               labels=["node", "role", "version"])
        age = GaugeMetricFamily("vaenode_node_heartbeat_age_seconds",
                                "Seconds since a node's last heartbeat.", labels=["node"])
        jobs = GaugeMetricFamily(
            "vaenode_node_cluster_jobs",
            "1 on the node running the cluster-wide jobs (completion, retention, problems, "
            "outboxes).", labels=["node"])
        scoring = GaugeMetricFamily("vaenode_node_series_processing",
                                    "Series a node is scoring now.", labels=["node"])
        for n in views:
            up.add_metric([n.name, n.role, n.version], 1.0 if n.state == "up" else 0.0)
            age.add_metric([n.name], n.heartbeat_age_s)
            jobs.add_metric([n.name], 1.0 if n.cluster_jobs else 0.0)
            scoring.add_metric([n.name], float(len(n.scoring)))
        yield from (up, age, jobs, scoring)
        scored = CounterMetricFamily("vaenode_node_series_scored",
                                     "Series scored (verdicts stored), by the node that scored "
                                     "them.", labels=["node"])
        for actor, count in session.execute(
                select(SeriesEvent.actor, func.count(SeriesEvent.id))
                .where(SeriesEvent.to_status == str(SeriesState.DONE))
                .group_by(SeriesEvent.actor)):
            scored.add_metric([actor or ""], float(count))
        yield scored

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families (called by prometheus_client on each scrape)."""
        with self._session_factory() as session:
            instances = CounterMetricFamily(
                "vaenode_instances_received",
                "SOP instances received and stored (a re-sent duplicate counts once).",
            )
            instances.add_metric([], float(repo.received_instances(session)))
            yield instances

            series_total = CounterMetricFamily(
                "vaenode_series_received", "Series received (any status)."
            )
            series_total.add_metric([], float(session.scalar(select(func.count(Series.id))) or 0))
            yield series_total

            by_status = GaugeMetricFamily(
                "vaenode_series", "Series in the queue by status.", labels=["status"]
            )
            for label, n in status_counts(session).items():
                by_status.add_metric([label], float(n))
            yield by_status
            yield self._oldest_queued(session)

            buckets, total = scoring_histogram(session)
            yield HistogramMetricFamily(
                "vaenode_scoring_duration_seconds",
                "Seconds from a worker claiming a series to its verdict.",
                buckets=buckets, sum_value=total,
            )

            failures = CounterMetricFamily(
                "vaenode_delivery_failures",
                "Report delivery attempts that failed (each failed C-STORE attempt).",
            )
            failures.add_metric([], float(reviews.delivery_failures(session)))
            yield failures

            stats = reviews.model_review_stats(session)
            false_alarms = CounterMetricFamily(
                "vaenode_false_alarms",
                "Flagged series an admin marked as a false alarm, by model.",
                labels=["model"],
            )
            confirmed = CounterMetricFamily(
                "vaenode_confirmations",
                "Flagged series an admin confirmed, by model.",
                labels=["model"],
            )
            missed = CounterMetricFamily(
                "vaenode_missed",
                "Series judged normal that an admin reported as a missed artifact, by model.",
                labels=["model"],
            )
            for stat in stats:
                false_alarms.add_metric([stat.model], float(stat.false_alarms))
                confirmed.add_metric([stat.model], float(stat.confirmed))
                missed.add_metric([stat.model], float(stat.missed))
            yield false_alarms
            yield confirmed
            yield missed
            yield self._verdicts_by_sender(session)
            yield from self._storage_metrics(session)

            alerts = GaugeMetricFamily(
                "vaenode_alerts",
                "Alert messages (flagged series, problems of the node), by state.",
                labels=["state"])
            by_state = dict(session.execute(
                select(Alert.state, func.count(Alert.id)).group_by(Alert.state)).all())
            for state in ("pending", "sent", "failed"):
                alerts.add_metric([state], float(by_state.get(state, 0)))
            yield alerts
            yield from self._node_metrics(session)


def build_registry(session_factory: sessionmaker[Session],
                   storage: Path | None = None) -> CollectorRegistry:
    """A registry of this dashboard's own (no process-global default registry).

    Args:
        session_factory: sessions on the queue database.
        storage: the storage folder, for its free space (none reported without it).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(session_factory, storage))
    return registry
