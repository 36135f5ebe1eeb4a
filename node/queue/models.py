"""SQLAlchemy models of the queue database.

The schema is created and changed only by Alembic revisions in ``migrations/``; every change to
a model here comes with a revision. Timestamps are UTC and timezone-aware in Python; SQLite has
no time zones, so :class:`UTCDateTime` stores naive UTC and hands back aware values.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from node.queue.states import DeliveryState, SeriesState

UID_LENGTH = 64  # PS3.5 9.1: a UID is at most 64 characters
AE_LENGTH = 16  # PS3.5 6.2: an AE title is at most 16 characters


def utcnow() -> datetime:
    """The current time, UTC and timezone-aware: the only clock the queue uses."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as naive UTC and returned as an aware UTC ``datetime``.

    Naive values are refused on the way in: a local time silently stored as UTC would shift
    every idle-time and lease computation by the server's offset.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use node.queue.models.utcnow()")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _state_enum() -> Enum:
    # Stored as the lower-case value in a VARCHAR with a CHECK constraint: readable with any
    # SQL client, and no native ENUM type to migrate on PostgreSQL.
    return Enum(
        SeriesState,
        name="series_state",
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda enum: [m.value for m in enum],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    """Declarative base of every table of the node."""


class Series(Base):
    """One DICOM series as received, and where it stands in the queue."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    modality: Mapped[str | None] = mapped_column(String(16))
    series_description: Mapped[str | None] = mapped_column(String(256))
    body_part: Mapped[str | None] = mapped_column(String(64))
    calling_aet: Mapped[str | None] = mapped_column(String(AE_LENGTH))
    peer_address: Mapped[str | None] = mapped_column(String(128))
    #: The scanner as its first instance names it (revision 0011_series_scanner; the worker
    #: fills what a row lacks from the headers it reads): Station
    #: Name (0008,1010), Manufacturer (0008,0070), Manufacturer's Model Name (0008,1090). The
    #: calling AE names the sender, which may be a gateway for several scanners.
    station_name: Mapped[str | None] = mapped_column(String(64))
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    scanner_model: Mapped[str | None] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[SeriesState] = mapped_column(_state_enum(), default=SeriesState.RECEIVING)
    status_reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    worker_id: Mapped[str | None] = mapped_column(String(128))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # The last normal release of an association that stored instances of this series, and how
    # many of them it stored (revision 0006_series_release): a sender that released has sent
    # what it meant to send (``[queue].complete_on_release``).
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    released_instances: Mapped[int | None] = mapped_column(Integer)
    #: The largest Images in Acquisition (0020,1002) the series' instances declared, noted at
    #: each normal release: a released series with fewer instances is not taken as complete.
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    #: When the retention job last deleted the series' images (``[storage].retention_days``),
    #: and how many instance rows it removed in all (so that counts of received instances,
    #: e.g. the Prometheus counter, never go down).
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    purged_instances: Mapped[int | None] = mapped_column(Integer)

    # The current verdict (revision 0002_scoring); all None until the series is first scored,
    # kept when a later re-score fails so the last good verdict stays visible.
    abnormal: Mapped[bool | None] = mapped_column(Boolean)
    abnormal_slices: Mapped[int | None] = mapped_column(Integer)
    scored_slices: Mapped[int | None] = mapped_column(Integer)
    min_abnormal_slices: Mapped[int | None] = mapped_column(Integer)
    #: Where a calibrated station judged the series by one number (revision 0018): its
    #: 10th-percentile slice score and the station's series edge, on the slice scores' scale
    #: (abnormal below the edge); None where the slice count judged.
    series_score: Mapped[float | None] = mapped_column(Float)
    series_edge: Mapped[float | None] = mapped_column(Float)
    #: Where the station judged the series normal and has an image edge (revision 0019): the
    #: score on the slice scores' scale below which its images were flagged, in place of the
    #: threshold; None where every image was judged against the threshold.
    image_edge: Mapped[float | None] = mapped_column(Float)
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    threshold: Mapped[float | None] = mapped_column(Float)
    estimator: Mapped[str | None] = mapped_column(String(32))
    samples: Mapped[int | None] = mapped_column(Integer)
    routing_rule: Mapped[str | None] = mapped_column(String(128))
    scored_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Which station reference judged the current verdict (revision 0013_station_references):
    #: its row in ``station_references`` and its state then, ``learning`` (the bundle's own
    #: verdict, out of the box) or ``calibrated``; both None when learning is off
    #: (``[learning].enabled``), or for verdicts made before that revision.
    reference_id: Mapped[int | None] = mapped_column(Integer, index=True)
    reference_state: Mapped[str | None] = mapped_column(String(16))

    instances: Mapped[list[Instance]] = relationship(
        back_populates="series", order_by="Instance.instance_number"
    )
    events: Mapped[list[SeriesEvent]] = relationship(
        back_populates="series", order_by="SeriesEvent.id"
    )

    __table_args__ = (
        UniqueConstraint("series_instance_uid", name="uq_series_series_instance_uid"),
        Index("ix_series_status_last_received", "status", "last_received_at"),
        Index("ix_series_study", "study_instance_uid"),
    )


class SeriesEvent(Base):
    """One status change of a series: the history the dashboard and ``queue show`` print."""

    __tablename__ = "series_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(
        ForeignKey("series.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(128))
    # On a ``done`` event: seconds since the ``processing`` event that began the run
    # (revision 0010_event_duration); what the scoring-duration histogram counts.
    duration_s: Mapped[float | None] = mapped_column(Float)

    series: Mapped[Series] = relationship(back_populates="events")


class Instance(Base):
    """One stored SOP instance; ``path`` is relative to the storage directory."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(
        ForeignKey("series.id", ondelete="CASCADE"), index=True
    )
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())

    series: Mapped[Series] = relationship(back_populates="instances")

    __table_args__ = (
        UniqueConstraint("sop_instance_uid", name="uq_instances_sop_instance_uid"),
    )


class SliceScore(Base):
    """The scores of one image of the current verdict of a series (one instance, or one frame).

    Rows are replaced as a whole when the series is scored again; ``frame`` is the 1-based
    frame number inside a multi-frame instance and None for a single-frame instance.
    """

    __tablename__ = "slice_scores"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    frame: Mapped[int | None] = mapped_column(Integer)
    #: Which stack of the series (same orientation, size and frame of reference), from 0.
    stack: Mapped[int] = mapped_column(Integer, default=0)
    #: Position in the series: stacks one after the other, each ordered along its normal.
    slice_index: Mapped[int] = mapped_column(Integer)
    log_likelihood: Mapped[float] = mapped_column(Float)
    kl: Mapped[float] = mapped_column(Float)
    elbo: Mapped[float] = mapped_column(Float)
    abnormal: Mapped[bool] = mapped_column(Boolean)
    confidence: Mapped[float] = mapped_column(Float)
    #: False for the leading and trailing background slices of a stack, which are never
    #: flagged and whose scores mean nothing (revision 0013_station_references; None for
    #: slices scored before it).
    foreground: Mapped[bool | None] = mapped_column(Boolean)
    #: The bundle's own score, before a station reference mapped it onto ``log_likelihood``
    #: (equal to it when the series was judged out of the box; None before revision 0013,
    #: when ``log_likelihood`` was always the bundle's own score).
    bundle_score: Mapped[float | None] = mapped_column(Float)
    #: The bundle's station score, which a station's reference learns and maps (revision
    #: 0015_station_score; None where the bundle declares none, the reference then learning
    #: ``bundle_score``, and for slices scored before it).
    station_score: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (Index("ix_slice_scores_series_slice", "series_id", "slice_index"),)


class StationReference(Base):
    """What one station's normal looks like to one bundle, learned from its first series.

    A station is its Station Name (or the calling AE title when its series name none), its
    Manufacturer's Model Name and its protocol (the normalized Series Description), as scored
    by one bundle (name and version: a new version learns afresh). ``learning`` until
    ``[learning].series`` of its series are scored, then ``calibrated`` with ``centre`` and
    ``low`` (:mod:`node.worker.learning`). An admin's restart supersedes the row (kept for
    history) and starts a new one in ``learning``; at most one row per station is current.
    """

    __tablename__ = "station_references"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    station: Mapped[str] = mapped_column(String(64))
    #: ``station_name`` or ``calling_aet`` (the series named no station).
    station_source: Mapped[str] = mapped_column(String(16))
    scanner_model: Mapped[str] = mapped_column(String(64))  # "" when the series name none
    protocol: Mapped[str] = mapped_column(String(256))  # "" when the series have no description
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="learning")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    calibrated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    centre: Mapped[float | None] = mapped_column(Float)
    low: Mapped[float | None] = mapped_column(Float)
    #: The bundle's median normal score M, threshold T and target false-positive rate, as
    #: they were when the reference was built (the mapping's other two points).
    bundle_median: Mapped[float | None] = mapped_column(Float)
    bundle_threshold: Mapped[float | None] = mapped_column(Float)
    target_fpr: Mapped[float | None] = mapped_column(Float)
    series_used: Mapped[int | None] = mapped_column(Integer)
    series_trimmed: Mapped[int | None] = mapped_column(Integer)
    series_excluded: Mapped[int | None] = mapped_column(Integer)
    slices: Mapped[int | None] = mapped_column(Integer)
    #: Kept learning series that a reference built from the other kept ones would have
    #: flagged (leave one out, since revision 0017; before, the kept series its own low
    #: flagged with the rule's count): about the share of the station's normal series it will
    #: flag (revision 0016; node.worker.learning).
    series_flagged: Mapped[int | None] = mapped_column(Integer)
    #: Slices below the low from which the station's series are abnormal, as learned from its
    #: normal series by references calibrated with revision 0017 (the routing rule's count is
    #: the floor); NULL while learning, before revision 0017 (the rule's count alone) and
    #: since revision 0018 (``series_edge`` judges).
    min_flagged: Mapped[int | None] = mapped_column(Integer)
    #: The station's normal score at each bin of relative slice position: per bin, the
    #: median and the median minus the 5th percentile of its kept learning series' scores;
    #: ``centre`` and ``low`` are on the scores referred to them (node.worker.learning).
    #: NULL while learning and for references calibrated before revision 0018 (their centre
    #: and low are on the unreferred scores, as they judge).
    position_levels: Mapped[list[float] | None] = mapped_column(JSON)
    position_spreads: Mapped[list[float] | None] = mapped_column(JSON)
    #: E on the referred scores: a series is abnormal when its 10th-percentile referred score
    #: lies below it (node.worker.learning); NULL while learning, from a single kept series
    #: (the routing rule's count judges) and before revision 0018 (``min_flagged`` judges).
    series_edge: Mapped[float | None] = mapped_column(Float)
    #: L_img on the referred scores, at or below ``low``: an image of a series judged normal
    #: is flagged only below it (node.worker.learning); NULL while learning, from a single
    #: kept series and before revision 0019 (every image below ``low`` is flagged).
    image_edge: Mapped[float | None] = mapped_column(Float)
    #: The learning series it was built from, by role: ``{"used": [series ids], "outlier":
    #: [...], "excluded": [...]}`` (left out as outliers below the others; confirmed flags,
    #: reported misses and series with no foreground slice). NULL while learning and before
    #: revision 0020.
    learned_from: Mapped[dict[str, list[int]] | None] = mapped_column(JSON)
    #: Why a calibration was refused (the row stays ``learning`` and tries again on the next
    #: series), or None.
    note: Mapped[str | None] = mapped_column(Text)
    superseded_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    superseded_by: Mapped[str | None] = mapped_column(String(128))
    superseded_note: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint("state IN ('learning', 'calibrated')",
                        name="ck_station_references_state"),
        Index("uq_station_references_current", "station", "station_source", "scanner_model",
              "protocol", "model_name", "model_version", unique=True,
              sqlite_where=text("superseded_at IS NULL"),
              postgresql_where=text("superseded_at IS NULL")),
    )


class Association(Base):
    """One DICOM association a peer opened (or tried to): who, when, how it ended."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_aet: Mapped[str | None] = mapped_column(String(AE_LENGTH))
    called_aet: Mapped[str | None] = mapped_column(String(AE_LENGTH))
    peer_address: Mapped[str | None] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    failed_count: Mapped[int] = mapped_column(Integer, default=0)
    # "open", "released", "aborted", or "rejected: <reason>"
    result: Mapped[str] = mapped_column(String(128), default="open")


class AdminAction(Base):
    """One action an admin took on a series from the dashboard: who, when, what, and why.

    The audit trail of reviews: confirmations and false alarms are counted per model from
    these rows (``model`` holds the bundle that produced the verdict under review, so the
    count survives a later re-score with another model).
    """

    __tablename__ = "admin_actions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(
        ForeignKey("series.id", ondelete="CASCADE"), index=True
    )
    actor: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    # "retry", "resend", "confirm", "false_alarm" or "missed" (revision 0021)
    action: Mapped[str] = mapped_column(String(16))
    model: Mapped[str | None] = mapped_column(String(128))
    note: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint(
            "action IN ('retry', 'resend', 'confirm', 'false_alarm', 'missed')",
            name="ck_admin_actions_action",
        ),
    )


def _delivery_enum() -> Enum:
    return Enum(
        DeliveryState,
        name="delivery_state",
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda enum: [m.value for m in enum],
        validate_strings=True,
    )


class Report(Base):
    """One report object the node wrote about a series: an SR or a KOS, as a file on disk.

    ``path`` is relative to the storage directory. A newer report of the same kind on the same
    series sets ``superseded`` on the older ones (the DICOM objects say so themselves, through
    the Predecessor Documents Sequence of the SR).
    """

    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(
        ForeignKey("series.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(8))  # "SR", "KOS" or "REJECT" (rejection note)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    instance_number: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)

    deliveries: Mapped[list[OutboxEntry]] = relationship(
        back_populates="report", order_by="OutboxEntry.id"
    )

    __table_args__ = (UniqueConstraint("sop_instance_uid", name="uq_reports_sop_instance_uid"),)


class _Attempts:
    """The retry state of something sent to a peer until it takes it: report deliveries and
    alerts alike."""

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class OutboxEntry(_Attempts, Base):
    """One report to deliver to one destination, with its retry state (survives restarts).

    The destination is copied from the configuration when the row is made, so that a later
    change of the configuration does not redirect reports already queued.
    """

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(
        ForeignKey("reports.id", ondelete="CASCADE"), index=True
    )
    destination: Mapped[str] = mapped_column(String(64))
    ae_title: Mapped[str] = mapped_column(String(AE_LENGTH))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    state: Mapped[DeliveryState] = mapped_column(_delivery_enum(), default=DeliveryState.PENDING)

    report: Mapped[Report] = relationship(back_populates="deliveries")

    __table_args__ = (Index("ix_outbox_state_next_attempt", "state", "next_attempt_at"),)


class Alert(_Attempts, Base):
    """One message to one alert URL (``[alerts]``), with its retry state (survives restarts,
    like the report outbox): about a flagged series, or about a problem of the node itself
    (no series; ``problem_key`` names the destination, folder or queue)."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int | None] = mapped_column(
        ForeignKey("series.id", ondelete="CASCADE"), index=True
    )
    url: Mapped[str] = mapped_column(String(1024))
    payload: Mapped[str] = mapped_column(Text)
    # "pending", "sent" or "failed" (attempts ran out)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    # "series_flagged", or a problem: "delivery_failing", "storage_low", "queue_stalled"
    event: Mapped[str] = mapped_column(String(32), default="series_flagged",
                                       server_default="series_flagged")
    problem_key: Mapped[str | None] = mapped_column(String(255))

    __table_args__ = (Index("ix_alerts_due", "state", "next_attempt_at"),
                      Index("ix_alerts_problem", "event", "problem_key", "created_at"))


class Node(Base):
    """One process of the deployment (``vaenode serve`` or ``vaenode worker``) as it last told
    the database: the nodes view of the dashboard and ``vaenode queue nodes``
    (node/cluster/nodes.py). Each process writes only its own row, every
    ``[cluster].heartbeat_s``; the series it is scoring are those whose ``worker_id`` is its
    name."""

    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    # "all" (serve with the worker), "receiver" (serve, [worker].enabled = false), "worker"
    role: Mapped[str] = mapped_column(String(16))
    version: Mapped[str] = mapped_column(String(32))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime())
    heartbeat_s: Mapped[float] = mapped_column(Float)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Whether it runs the cluster-wide jobs now (node/cluster/membership.py).
    cluster_jobs: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Its clock minus the database server's at the last heartbeat (PostgreSQL only).
    clock_offset_s: Mapped[float | None] = mapped_column(Float)


class ClusterInfo(Base):
    """Facts of the whole deployment, one row: the identity of its shared storage folder, which
    every node checks against the marker file in its ``[storage].dir`` at start
    (node/cluster/storage_mark.py)."""

    __tablename__ = "cluster"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    storage_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (CheckConstraint("id = 1", name="ck_cluster_one_row"),)
