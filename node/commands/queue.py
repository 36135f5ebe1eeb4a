"""``vaenode queue``: what the node has received and where each series stands."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from node.commands.common import ConfigOption, iso, setup
from node.commands.stations import recalibrate_station, reference_dict, reference_lines
from node.errors import ConfigError, NodeError

queue_app = typer.Typer(help="Inspect the series queue.", no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]


def series_dict(series: Any) -> dict[str, Any]:
    """The plain values of a series row, as ``queue list --json`` prints them."""
    return {
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": series.study_instance_uid,
        "status": series.status.value,
        "status_reason": series.status_reason,
        "modality": series.modality,
        "series_description": series.series_description,
        "body_part": series.body_part,
        "instance_count": series.instance_count,
        "calling_aet": series.calling_aet,
        "peer_address": series.peer_address,
        "station_name": series.station_name,
        "manufacturer": series.manufacturer,
        "scanner_model": series.scanner_model,
        "first_received_at": iso(series.first_received_at),
        "last_received_at": iso(series.last_received_at),
        "attempts": series.attempts,
        "worker_id": series.worker_id,
        "lease_until": iso(series.lease_until),
        "updated_at": iso(series.updated_at),
        "expected_instances": series.expected_instances,
        "images_deleted_at": iso(series.purged_at),
        "reference_id": series.reference_id,
        "reference_state": series.reference_state,
    }


def _session(config: Any, *, read_only: bool = False, settings: Any = None) -> Any:
    """A session on the configured queue database; ``read_only`` ones never wait for ingest.
    ``settings``: already loaded from ``config``."""
    settings = settings or setup(config)
    from node.queue.db import make_engine, make_read_session_factory, make_session_factory

    make = make_read_session_factory if read_only else make_session_factory
    return make(make_engine(settings.database))()


@queue_app.command("list")
def list_cmd(
    config: ConfigOption = None,
    status: Annotated[
        str | None, typer.Option("--status", "-s", help="Only series in this state.")
    ] = None,
    limit: Annotated[int, typer.Option(help="Most series shown, newest first.")] = 100,
    as_json: JsonOption = False,
) -> None:
    """List series, newest first."""
    from sqlalchemy import select

    from node.queue.models import Series
    from node.queue.states import SeriesState

    query = select(Series).order_by(Series.last_received_at.desc()).limit(limit)
    if status is not None:
        try:
            query = query.where(Series.status == SeriesState(status.lower()))
        except ValueError as exc:
            states = ", ".join(s.value for s in SeriesState)
            raise typer.BadParameter(f"unknown status {status!r}; one of {states}") from exc
    with _session(config, read_only=True) as session:
        rows = session.execute(query).scalars().all()
    if as_json:
        for series in rows:
            typer.echo(json.dumps(series_dict(series)))
        return
    typer.echo(f"{'STATUS':<11} {'MOD':<4} {'N':>5}  {'LAST RECEIVED (UTC)':<19}  "
               f"{'FROM':<16} SERIES UID / DESCRIPTION")
    for s in rows:
        typer.echo(
            f"{s.status.value:<11} {(s.modality or '-'):<4} {s.instance_count:>5}  "
            f"{s.last_received_at:%Y-%m-%d %H:%M:%S}  {(s.calling_aet or '-'):<16} "
            f"{s.series_instance_uid}  {s.series_description or ''}"
        )


@queue_app.command("senders")
def senders_cmd(
    config: ConfigOption = None,
    days: Annotated[int, typer.Option(min=1, help="Series first received in this many days.")]
    = 30,
    as_json: JsonOption = False,
    series: Annotated[bool, typer.Option(
        "--series", help="Also each station reference's learning series: its verdict out of "
        "the box, its review, and whether the calibration used it or left it out.")] = False,
) -> None:
    """Per scanner (calling AE and Station Name): series, verdicts, flag rate against the
    other scanners'; per station and protocol, what it has learned."""
    from node.admin.senders import references_of, sender_stats
    from node.queue.references import learned_series, reference_views

    settings = setup(config)
    needed = settings.learning.series
    with _session(config, read_only=True, settings=settings) as session:
        rows = [s for s in sender_stats(session, days) if s.series]
        views = reference_views(session)
        # Without --series: none, so that the JSON has no "learning_series" key.
        learned = ({v.id: learned_series(session, v.id, v.learned_from) for v in views}
                   if series else {})
    if as_json:
        for s in rows:
            typer.echo(json.dumps({
                "calling_aet": s.calling_aet, "station_name": s.station_name,
                "scanner": s.scanner, "series": s.series, "scored": s.scored,
                "flagged": s.flagged, "flag_rate": s.flag_rate, "p_high": s.p_high,
                "unusually_high": s.unusually_high, "confirmed": s.confirmed,
                "false_alarms": s.false_alarms, "skipped": s.skipped, "failed": s.failed,
                "in_progress": s.in_progress, "last_received": iso(s.last_received),
                "skip_reasons": [{"reason": r, "series": n} for r, n in s.skip_reasons],
                "references": [reference_dict(v, needed, learned.get(v.id))
                               for v in references_of(s, views)],
            }))
        return
    typer.echo(f"{'CALLING AE':<16} {'STATION':<16} {'SERIES':>6} {'SCORED':>6} {'FLAGGED':>7} "
               f"{'RATE':>6}  {'SKIPPED':>7} {'FAILED':>6}  AGAINST THE OTHERS")
    for s in rows:
        rate = f"{100 * s.flag_rate:5.1f}%" if s.flag_rate is not None else "     -"
        against = ("-" if s.p_high is None else
                   f"{'UNUSUALLY HIGH ' if s.unusually_high else ''}p={s.p_high:.2g}")
        typer.echo(f"{(s.calling_aet or '(not recorded)'):<16} {(s.station_name or '-'):<16} "
                   f"{s.series:>6} {s.scored:>6} {s.flagged:>7} {rate:>6}  {s.skipped:>7} "
                   f"{s.failed:>6}  {against}")
    if not rows:
        typer.echo(f"no series in the last {days} day(s)")
    if not settings.learning.enabled:
        typer.echo("\nstation learning is off ([learning].enabled = false)")
    if views:
        typer.echo("")
        for line in reference_lines(views, needed, learned):
            typer.echo(line)


#: The station a ``relearn`` or ``recalibrate`` acts on, and optionally one of its protocols.
StationOption = Annotated[str, typer.Option(
    "--station", help="Station Name (or the calling AE title of a sender that names none), "
    "case-insensitive.")]
ProtocolOption = Annotated[str | None, typer.Option(
    "--protocol", help="Only this protocol (Series Description; case and spaces do not "
    "matter); default: every protocol of the station.")]


@queue_app.command("relearn")
def relearn_cmd(
    station: StationOption,
    config: ConfigOption = None,
    protocol: ProtocolOption = None,
    note: Annotated[str | None, typer.Option(
        "--note", help="Why (a new coil, a software upgrade): kept with the old reference.")]
    = None,
) -> None:
    """Restart a station's learning: its next [learning].series series learn its normal anew
    (the old reference is kept, superseded)."""
    import getpass

    from node.queue.references import restart_learning

    settings = setup(config)
    with _session(config, settings=settings) as session:
        created = restart_learning(session, actor=f"cli:{getpass.getuser()}", note=note,
                                   station=station, protocol=protocol)
    if not created:
        raise NodeError(f"no station reference for station {station!r}"
                        + (f", protocol {protocol!r}" if protocol else "")
                        + " (vaenode queue senders lists them)")
    for new in created:
        typer.echo(f"learning restarted: {new.station}"
                   + (f" ({new.scanner_model})" if new.scanner_model else "")
                   + f", protocol '{new.protocol}', {new.model_name} {new.model_version}")
    typer.echo(f"the next {settings.learning.series} scored series of each learn anew")


@queue_app.command("recalibrate")
def recalibrate_cmd(
    station: StationOption,
    config: ConfigOption = None,
    protocol: ProtocolOption = None,
    note: Annotated[str | None, typer.Option(
        "--note", help="Why (which series were reviewed): kept with the old reference.")]
    = None,
) -> None:
    """Rebuild a calibrated station's reference from the series it learned from, with the
    reviews as they stand now (a series reported as a missed artifact, or whose flag was
    confirmed, is left out); the old reference is kept, superseded."""
    import getpass

    settings = setup(config)
    with _session(config, settings=settings) as session:
        lines = recalibrate_station(session, settings.learning, station, protocol,
                                    actor=f"cli:{getpass.getuser()}", note=note)
    for line in lines:
        typer.echo(line)


@queue_app.command("nodes")
def nodes_cmd(
    config: ConfigOption = None,
    forget: Annotated[str | None, typer.Option(
        "--forget", metavar="NAME",
        help="Remove a stopped or lost node from the view (a node taken out for good).")]
    = None,
    as_json: JsonOption = False,
) -> None:
    """Every node on this queue database: role, version, heartbeat, what it holds now."""
    from node.cluster import nodes

    if forget is not None:
        with _session(config) as session, session.begin():
            try:
                found = nodes.forget(session, forget)
            except ValueError as exc:
                raise NodeError(str(exc)) from exc
        if not found:
            raise NodeError(f"no node named {forget!r}")
        typer.echo(f"node {forget} forgotten")
        return
    with _session(config, read_only=True) as session:
        rows = nodes.list_nodes(session)
    if as_json:
        for n in rows:
            typer.echo(json.dumps({
                "name": n.name, "role": n.role, "state": n.state, "version": n.version,
                "host": n.host, "pid": n.pid, "started_at": iso(n.started_at),
                "heartbeat_at": iso(n.heartbeat_at), "heartbeat_age_s": n.heartbeat_age_s,
                "cluster_jobs": n.cluster_jobs, "clock_offset_s": n.clock_offset_s,
                "scoring": list(n.scoring)}))
        return
    typer.echo(f"{'NODE':<28} {'ROLE':<8} {'STATE':<7} {'VERSION':<8} {'HEARTBEAT':>9}  HOLDS")
    for n in rows:
        holds = (["cluster-wide jobs"] if n.cluster_jobs else []) + [
            f"scoring {uid}" for uid in n.scoring]
        typer.echo(f"{n.name:<28} {n.role:<8} {n.state:<7} {n.version:<8} "
                   f"{n.heartbeat_age_s:>7.0f} s  {', '.join(holds) or '-'}")
    if not rows:
        typer.echo("no node has run on this database yet")


@queue_app.command("show")
def show_cmd(
    series_uid: Annotated[str, typer.Argument(help="Series Instance UID.")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one series: its attributes, status history and instances."""
    from sqlalchemy import select

    from node.queue.models import Alert, Instance, Series, SeriesEvent
    from node.queue.references import judged_note

    settings = setup(config)
    with _session(config, read_only=True, settings=settings) as session:
        series = session.execute(
            select(Series).where(Series.series_instance_uid == series_uid)
        ).scalar_one_or_none()
        if series is None:
            raise NodeError(f"no series {series_uid}")
        events = session.execute(
            select(SeriesEvent).where(SeriesEvent.series_id == series.id).order_by(SeriesEvent.id)
        ).scalars().all()
        instances = session.execute(
            select(Instance)
            .where(Instance.series_id == series.id)
            .order_by(Instance.instance_number, Instance.sop_instance_uid)
        ).scalars().all()
        deliveries = _deliveries(session, series_uid)
        alerts = session.execute(
            select(Alert).where(Alert.series_id == series.id).order_by(Alert.id)
        ).scalars().all()
        reference = judged_note(session, series, settings.learning.series)
    out = series_dict(series)
    out["reference"] = reference
    out["events"] = [
        {"at": iso(e.at), "from": e.from_status, "to": e.to_status, "reason": e.reason,
         "actor": e.actor}
        for e in events
    ]
    out["instances"] = [
        {"sop_instance_uid": i.sop_instance_uid, "instance_number": i.instance_number,
         "sop_class_uid": i.sop_class_uid, "transfer_syntax_uid": i.transfer_syntax_uid,
         "path": i.path, "size_bytes": i.size_bytes, "received_at": iso(i.received_at)}
        for i in instances
    ]
    out["deliveries"] = deliveries
    out["alerts"] = [
        {"url": a.url, "state": a.state, "attempts": a.attempts, "sent_at": iso(a.sent_at),
         "last_error": a.last_error}
        for a in alerts
    ]
    if as_json:
        typer.echo(json.dumps(out))
        return
    for key, value in out.items():
        if key not in ("events", "instances", "deliveries", "alerts"):
            typer.echo(f"{key:<20} {value if value is not None else '-'}")
    typer.echo("history:")
    for e in out["events"]:
        typer.echo(f"  {e['at']}  {e['from'] or '-':>10} -> {e['to']:<10} {e['actor']}: "
                   f"{e['reason'] or ''}")
    typer.echo(f"instances: {len(instances)}")
    for i in instances[:10]:
        typer.echo(f"  #{i.instance_number if i.instance_number is not None else '-':<5} "
                   f"{i.sop_instance_uid}  {i.size_bytes} bytes  {i.path}")
    if len(instances) > 10:
        typer.echo(f"  ... {len(instances) - 10} more (--json for all)")
    typer.echo(f"reports: {len(deliveries)} deliveries")
    for d in deliveries:
        when = d["sent_at"] or d["next_attempt_at"] or "-"
        typer.echo(f"  {d['kind']:<3} #{d['instance_number']:<3} {d['state']:<8} "
                   f"{d['destination'] or '-'} {d['target']} attempts={d['attempts']} {when}"
                   + (" (superseded)" if d["superseded"] else "")
                   + (f"\n      last error: {d['last_error']}" if d["last_error"] else ""))
    for a in out["alerts"]:
        typer.echo(f"alert {a['state']:<8} {a['url']} attempts={a['attempts']}"
                   + (f" last error: {a['last_error']}" if a["last_error"] else ""))


def _deliveries(session: Any, series_uid: str) -> list[dict[str, Any]]:
    """Each report of the series and its delivery state per destination (report/outbox.py)."""
    from node.report.outbox import deliveries

    return [
        {"kind": d.kind, "sop_instance_uid": d.sop_instance_uid,
         "instance_number": d.instance_number, "superseded": d.superseded,
         "destination": d.destination, "target": d.target, "state": d.state,
         "attempts": d.attempts, "next_attempt_at": iso(d.next_attempt_at),
         "sent_at": iso(d.sent_at), "last_error": d.last_error}
        for d in deliveries(session, series_uid)
    ]


@queue_app.command("resend")
def resend_cmd(
    series_uid: Annotated[str, typer.Argument(help="Series Instance UID.")],
    config: ConfigOption = None,
) -> None:
    """Deliver the series' current reports again to every destination (sent or failed)."""
    from node.report.outbox import resend_series

    with _session(config) as session, session.begin():
        count = resend_series(session, series_uid)
    if count == 0:
        raise NodeError(f"no report to resend for series {series_uid}")
    typer.echo(f"{count} deliveries of series {series_uid} queued again")


@queue_app.command("retry")
def retry_cmd(
    series_uid: Annotated[str | None, typer.Argument(help="Series Instance UID.")] = None,
    config: ConfigOption = None,
    skipped_since: Annotated[str | None, typer.Option(
        "--skipped-since", help="Instead of one series: every series skipped since this UTC "
        "date or time (e.g. 2026-11-26 or 2026-11-26T08:00), after the routing rules changed."
    )] = None,
) -> None:
    """Score a finished series again (done, skipped or failed); its new report supersedes."""
    import getpass

    from sqlalchemy import select

    from node.errors import QueueConflict
    from node.queue import repo
    from node.queue.models import Series
    from node.queue.states import FINAL_STATES, SeriesState

    if (series_uid is None) == (skipped_since is None):
        raise ConfigError("give a SERIES_UID or --skipped-since, not both or neither")
    actor = f"cli:{getpass.getuser()}"
    if skipped_since is not None:
        since = _utc_time(skipped_since)
        queued, refused = 0, []
        with _session(config) as session:
            with session.begin():
                rows = session.execute(
                    select(Series.id, Series.series_instance_uid)
                    .where(Series.status == SeriesState.SKIPPED, Series.updated_at >= since)
                    .order_by(Series.id)).all()
            for series_id, uid in rows:
                try:
                    with session.begin():
                        repo.requeue(session, series_id, actor=actor,
                                     reason="re-score requested (vaenode queue retry "
                                            "--skipped-since)")
                except QueueConflict as exc:
                    refused.append(f"{uid}: {exc}")
                    continue
                queued += 1
                typer.echo(f"series {uid} queued to be scored again")
        for line in refused:
            typer.echo(f"not queued: {line}", err=True)
        typer.echo(f"{queued} skipped series since {since:%Y-%m-%d %H:%M} UTC queued again"
                   + (f", {len(refused)} refused" if refused else ""))
        return
    with _session(config) as session, session.begin():
        series = session.execute(
            select(Series).where(Series.series_instance_uid == series_uid)
        ).scalar_one_or_none()
        if series is None:
            raise NodeError(f"no series {series_uid}")
        if series.status not in FINAL_STATES:
            raise NodeError(f"series {series_uid} is {series.status.value}: it will be scored "
                            "anyway; retry applies to done, skipped or failed series")
        repo.requeue(session, series.id, reason="re-score requested (vaenode queue retry)",
                     actor=actor)
    typer.echo(f"series {series_uid} queued to be scored again")


def _utc_time(text: str) -> datetime:
    """An ISO date or date-time; one without a zone is UTC.

    Raises:
        ConfigError: not a date or time.
    """
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"{text!r} is not a date or time (YYYY-MM-DD[THH:MM])") from exc
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


@queue_app.command("purge")
def purge_cmd(
    config: ConfigOption = None,
    older_than_days: Annotated[float | None, typer.Option(
        min=0.0, help="Finished and quiet for more than this many days (default: "
                      "[storage].retention_days).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List the series whose images would be deleted; delete nothing.")
    ] = False,
) -> None:
    """Delete the stored images of finished series now, as the retention job does."""
    from datetime import timedelta

    from sqlalchemy import select

    from node.queue import repo, retention
    from node.queue.db import make_engine, make_session_factory
    from node.queue.models import Series, utcnow

    settings = setup(config)
    days = settings.storage.retention_days if older_than_days is None else older_than_days
    if days <= 0:
        raise NodeError("retention is off ([storage].retention_days = 0): give "
                        "--older-than-days to delete images anyway")
    factory = make_session_factory(make_engine(settings.database))
    if dry_run:
        cutoff = utcnow() - timedelta(days=days)
        with factory() as session:
            ids = repo.expired_series_ids(session, cutoff, limit=100_000)
            rows = session.scalars(select(Series).where(Series.id.in_(ids))
                                   .order_by(Series.last_received_at)).all()
            for s in rows:
                typer.echo(f"{s.series_instance_uid}  {s.status.value:<8} "
                           f"last received {s.last_received_at:%Y-%m-%d %H:%M}  "
                           f"{s.instance_count} instances")
        typer.echo(f"{len(rows)} series would lose their images (older than {days:g} days)")
        return
    purged = retention.purge_expired(factory, settings.storage.dir, days)
    typer.echo(f"images of {purged} series deleted (finished and quiet for {days:g} days)")


def register(app: typer.Typer) -> None:
    """Add the ``queue`` group to the ``vaenode`` command."""
    app.add_typer(queue_app, name="queue")
