"""The dashboard's HTTP routes: thin, each reads plain values and renders one template.

Reads go through ``queries``/``verdicts``/``deliveries``; writes through ``reviews``, which calls
the queue and outbox transition functions of their owners. This module only parses requests,
picks the template and turns the node's refusals into HTTP answers (in ``app.py``).
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import select, text
from sqlalchemy.exc import NoResultFound
from sqlalchemy.orm import Session

from node.admin import auth, deliveries, models_page, queries, reviews, senders, verdicts
from node.admin.header import read_header_facts
from node.admin.plots import plot_slice_scores
from node.admin.thumbnails import ThumbnailError, render_thumbnail
from node.alerts import outbox as alert_outbox
from node.cluster import nodes as cluster_nodes
from node.cluster.membership import is_shared
from node.cluster.storage_mark import MARKER, read_marker
from node.config import Settings
from node.errors import AdminActionError
from node.ingest.store import free_space_shortfall
from node.queue import references
from node.queue.models import Alert, Instance
from node.worker.station import recalibrate as recalibrate_reference

log = logging.getLogger(__name__)

router = APIRouter()

QUEUE_REFRESH_S = 10
#: ``?refresh=N`` sets the self-refresh period of the list pages (a wall display may want 5 s).
RefreshQuery = Annotated[int, Query(ge=2, le=3600)]
NORMAL_THUMBNAILS = 4
FLAGGED_THUMBNAILS = 12
#: Superseded station references listed on the Scanners page (newest first).
EARLIER_REFERENCES = 50


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, closed when the request is done (for requests that write)."""
    with request.app.state.session_factory() as session:
        yield session


def get_read_session(request: Request) -> Iterator[Session]:
    """A read-only session per request: a snapshot that neither waits for nor blocks ingest."""
    with request.app.state.read_session_factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
ReadSessionDep = Annotated[Session, Depends(get_read_session)]


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _render(request: Request, template: str, page: str, status_code: int = 200,
            **context: Any) -> HTMLResponse:
    templates = request.app.state.templates
    return templates.TemplateResponse(
        request,
        template,
        {"page": page, "identity": getattr(request.state, "identity", None),
         "settings": _settings(request), **context},
        status_code=status_code,
    )


def _end_read(session: Session) -> None:
    """End the read transaction before slow work (drawing, decoding pixels).

    Read sessions do not block ingest (``node/queue/db.py``), but an open SQLite snapshot keeps
    the WAL checkpoint from passing it, and with PostgreSQL an idle open transaction holds back
    vacuum: no reason to keep one while drawing.
    """
    session.rollback()


def _parse_date(value: str | None) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise HTTPException(400, f"not a date (YYYY-MM-DD): {value!r}") from exc


@router.get("/", include_in_schema=False)
def index() -> RedirectResponse:
    """The queue is the landing page."""
    return RedirectResponse("/queue", status_code=303)


@router.get("/queue", response_class=HTMLResponse, name="queue")
def queue(
    request: Request,
    session: ReadSessionDep,
    status: str | None = None,
    modality: str | None = None,
    calling_aet: str | None = None,
    station: str | None = None,
    date_from: str | None = None,
    date_to: str | None = None,
    refresh: RefreshQuery = QUEUE_REFRESH_S,
) -> HTMLResponse:
    """Series by status with filters, newest first; refreshes itself."""
    if status and status not in {str(s) for s in queries.STATES}:
        raise HTTPException(400, f"unknown status {status!r}")
    flt = queries.QueueFilter(
        status=status or None,
        modality=modality or None,
        calling_aet=calling_aet or None,
        station=station or None,
        date_from=_parse_date(date_from),
        date_to=_parse_date(date_to),
    )
    rows = queries.list_series(session, flt)
    modalities, aets, stations = queries.filter_choices(session)
    return _render(
        request,
        "queue.html",
        "queue",
        rows=rows,
        counts=queries.status_counts(session),
        verdicts=verdicts.verdicts_for(session, [r.series_instance_uid for r in rows]),
        flt=flt,
        modalities=modalities,
        aets=aets,
        stations=stations,
        refresh_s=refresh,
        limit=queries.QUEUE_PAGE_LIMIT,
    )


@router.get("/series/{series_uid}", response_class=HTMLResponse, name="series_page")
def series_page(request: Request, session: ReadSessionDep, series_uid: str) -> HTMLResponse:
    """Everything about one series: facts, history, scores, images, deliveries, reviews."""
    series = queries.get_series(session, series_uid)
    if series is None:
        raise HTTPException(404, f"no series {series_uid}")
    settings = _settings(request)
    row = queries.series_row(session, series_uid)
    first = session.scalars(
        select(Instance).where(Instance.series_id == series.id)
        .order_by(Instance.instance_number, Instance.id).limit(1)
    ).first()
    first_path = settings.storage.dir / first.path if first is not None else None
    verdict = verdicts.series_verdict(session, series.id)
    scores = verdicts.slice_scores(session, series.id)
    flagged, normal = verdicts.pick_thumbnails(scores, FLAGGED_THUMBNAILS, NORMAL_THUMBNAILS)
    if first is None:  # no stored image to draw (deleted by the retention policy)
        flagged, normal = [], []
    context: dict[str, Any] = {
        "purged_at": series.purged_at if first is None else None,
        "series": row,
        "events": queries.series_events(session, series.id),
        "verdict": verdict,
        "scores": scores,
        "flagged": flagged,
        "normal": normal,
        "reports": deliveries.for_series(session, series_uid),
        # Plain rows, not ORM objects: the read transaction ends before the page is drawn.
        # The URL as logs show it: a webhook URL carries its secret in the path.
        "alerts": [{**row._asdict(), "url": alert_outbox.shown(row.url)} for row in
                   session.execute(select(Alert.url, Alert.state, Alert.attempts,
                                          Alert.sent_at, Alert.last_error)
                                   .where(Alert.series_id == series.id).order_by(Alert.id))],
        "actions": reviews.actions_for(session, series.id),
        "allowed": reviews.allowed_actions(session, series, verdict),
        "reference": references.judged_note(session, series, settings.learning.series),
        "reference_learning": series.reference_state == references.LEARNING,
        "learning_role": references.learning_role(session, series),
    }
    _end_read(session)
    header = read_header_facts(first_path, settings.admin.show_patient_name)
    return _render(request, "series.html", "queue", header=header, **context)


@router.get("/series/{series_uid}/plot.png", name="series_plot")
def series_plot(session: ReadSessionDep, series_uid: str) -> Response:
    """log p(x) per slice with the line that judged them (the threshold, or a station's
    image edge), as a PNG."""
    series = queries.get_series(session, series_uid)
    if series is None:
        raise HTTPException(404, f"no series {series_uid}")
    verdict = verdicts.series_verdict(session, series.id)
    scores = verdicts.slice_scores(session, series.id)
    if verdict is None or not scores:
        raise HTTPException(404, "the series has no scores")
    _end_read(session)
    png = plot_slice_scores(
        [s.index for s in scores],
        [s.log_likelihood for s in scores],
        [s.abnormal for s in scores],
        verdict.threshold if verdict.image_edge is None else verdict.image_edge,
        title=f"{verdict.model}: {verdict.abnormal_slices} of {len(scores)} slices flagged",
        threshold_label="threshold" if verdict.image_edge is None else "station image edge",
    )
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get("/instances/{sop_uid}/thumbnail.png", name="thumbnail")
def thumbnail(
    request: Request,
    session: ReadSessionDep,
    sop_uid: str,
    frame: Annotated[int | None, Query(ge=1)] = None,
) -> Response:
    """One stored instance (one frame) rendered as a windowed PNG."""
    instance = session.scalars(
        select(Instance).where(Instance.sop_instance_uid == sop_uid)
    ).first()
    if instance is None:
        raise HTTPException(404, f"no instance {sop_uid}")
    path = _settings(request).storage.dir / instance.path
    _end_read(session)
    try:
        png = render_thumbnail(Path(path), frame)
    except ThumbnailError as exc:
        log.warning("thumbnail failed: %s", exc, extra={"sop_instance_uid": sop_uid})
        raise HTTPException(422, str(exc)) from exc
    # Stored instances never change under the same path and UID, so browsers may keep them.
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.post("/series/{series_uid}/actions", name="series_action")
def series_action(
    request: Request,
    session: SessionDep,
    series_uid: str,
    action: Annotated[str, Form()],
    note: Annotated[str, Form()] = "",
    reviewer: Annotated[str, Form()] = "",
) -> RedirectResponse:
    """Retry, re-deliver, confirm, mark a false alarm or report a missed artifact; recorded,
    then back to the page."""
    series = queries.get_series(session, series_uid)
    if series is None:
        raise HTTPException(404, f"no series {series_uid}")
    reviews.perform(session, _settings(request), series, action, _actor(request, reviewer),
                    note.strip() or None)
    url = request.url_for("series_page", series_uid=series_uid)
    return RedirectResponse(str(url) + "#actions", status_code=303)


@router.get("/deliveries", response_class=HTMLResponse, name="deliveries")
def deliveries_page(
    request: Request, session: ReadSessionDep, refresh: RefreshQuery = QUEUE_REFRESH_S
) -> HTMLResponse:
    """The outbox: every report and destination, attempts and the last error."""
    return _render(request, "deliveries.html", "deliveries",
                   rows=deliveries.outbox_rows(session), refresh_s=refresh)


@router.get("/alerts", response_class=HTMLResponse, name="alerts")
def alerts_page(
    request: Request, session: ReadSessionDep, refresh: RefreshQuery = QUEUE_REFRESH_S
) -> HTMLResponse:
    """Every alert sent or to be sent: flagged series ([alerts].urls) and problems of the node
    ([alerts].ops_urls), where each stands."""
    return _render(request, "alerts.html", "alerts",
                   rows=alert_outbox.recent_alerts(session), refresh_s=refresh)


@router.get("/associations", response_class=HTMLResponse, name="associations")
def associations_page(
    request: Request, session: ReadSessionDep, refresh: RefreshQuery = QUEUE_REFRESH_S
) -> HTMLResponse:
    """Recent associations: calling AE, peer, instances, result."""
    return _render(request, "associations.html", "associations",
                   rows=queries.list_associations(session), refresh_s=refresh)


@router.get("/nodes", response_class=HTMLResponse, name="nodes")
def nodes_page(
    request: Request, session: ReadSessionDep, refresh: RefreshQuery = QUEUE_REFRESH_S
) -> HTMLResponse:
    """Every node on this queue database (receivers, workers): up or not, what each holds."""
    return _render(request, "nodes.html", "nodes", rows=cluster_nodes.list_nodes(session),
                   refresh_s=refresh)


@router.get("/senders", response_class=HTMLResponse, name="senders")
def senders_page(
    request: Request, session: ReadSessionDep,
    days: Annotated[int, Query(ge=1, le=3650)] = 30,
) -> HTMLResponse:
    """Per scanner (calling AE): series, verdicts, flag rate against the others', trend; per
    station and protocol, what it has learned of its own normal."""
    rows = senders.sender_stats(session, days)
    current = references.reference_views(session)
    earlier = references.reference_views(session, superseded=True)[:EARLIER_REFERENCES]
    learned = {v.id: references.learned_series(session, v.id, v.learned_from)
               for v in current}
    return _render(request, "senders.html", "senders", rows=rows, days=days,
                   weeks=rows[0].weeks if rows else (), high_p=senders.HIGH_P,
                   min_scored=senders.MIN_SCORED_FOR_TEST, references=current,
                   earlier=earlier, learning=_settings(request).learning, learned=learned,
                   role_words=references.role_words, review_words=references.REVIEW_WORDS)


def _actor(request: Request, reviewer: str) -> str:
    """Who posts the form (:func:`node.admin.reviews.actor_name`)."""
    identity: auth.Identity | None = getattr(request.state, "identity", None)
    return reviews.actor_name(identity, reviewer,
                              request.client.host if request.client else None)


@router.post("/senders/relearn", name="relearn")
def relearn(
    request: Request,
    session: SessionDep,
    reference_id: Annotated[int, Form()],
    note: Annotated[str, Form()] = "",
    reviewer: Annotated[str, Form()] = "",
) -> RedirectResponse:
    """Restart a station's learning (a new coil, a software upgrade); the old reference is
    kept, superseded, with who and when."""
    actor = _actor(request, reviewer)
    created = references.restart_learning(session, actor=f"admin:{actor}",
                                          note=note.strip() or None,
                                          reference_ids=[reference_id])
    if not created:
        raise AdminActionError(f"station reference {reference_id} is not current (restarted "
                               "already?): reload the Scanners page")
    return RedirectResponse(str(request.url_for("senders")) + "#references", status_code=303)


@router.post("/senders/recalibrate", name="recalibrate")
def recalibrate(
    request: Request,
    session: SessionDep,
    reference_id: Annotated[int, Form()],
    note: Annotated[str, Form()] = "",
    reviewer: Annotated[str, Form()] = "",
) -> RedirectResponse:
    """Rebuild a calibrated station's reference from its learning series with the reviews as
    they stand now (a bad series reported missed or confirmed flagged is left out)."""
    actor = _actor(request, reviewer)
    try:
        recalibrate_reference(session, _settings(request).learning, reference_id,
                              actor=f"admin:{actor}", note=note.strip() or None)
    except (ValueError, NoResultFound) as exc:
        raise AdminActionError(f"{exc}: reload the Scanners page") from exc
    return RedirectResponse(str(request.url_for("senders")) + "#references", status_code=303)


@router.get("/models", response_class=HTMLResponse, name="models")
def models(request: Request, session: ReadSessionDep) -> HTMLResponse:
    """Bundles in use, thresholds, validation metrics, and live false-alarm rates."""
    bundles = models_page.bundles(_settings(request))
    slice_targets = {b.label: b.target_fpr for b in bundles if b.target_fpr is not None}
    stats = reviews.model_review_stats(session)
    series_targets = {
        s.model: s.expected_false_alarm_rate(slice_targets[s.model])
        for s in stats if s.model in slice_targets
    }
    return _render(request, "models.html", "models", bundles=bundles, stats=stats,
                   slice_targets=slice_targets, series_targets=series_targets)


@router.get("/metrics", name="metrics")
def metrics(request: Request) -> Response:
    """Prometheus exposition of the queue, scoring, delivery and review counts."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", name="healthz")
def healthz(request: Request) -> PlainTextResponse:
    """200 ``ok`` when the database answers and the storage folder is writable, has its
    minimum free space and (on a shared database) is the deployment's shared folder; 503
    otherwise, ``degraded`` first when only the space is short (the node runs, but refuses
    every C-STORE with 0xA700)."""
    settings = _settings(request)
    problems: list[str] = []
    try:
        with request.app.state.read_session_factory() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # a health probe reports any failure as 503, never raises
        problems.append(f"database: {type(exc).__name__}: {exc}")
    storage = Path(settings.storage.dir)
    if not storage.is_dir():
        problems.append(f"storage: {storage} is not a folder")
    elif not os.access(storage, os.W_OK | os.X_OK):
        problems.append(f"storage: {storage} is not writable")
    elif is_shared(settings.database.url) and read_marker(storage) is None:
        problems.append(f"storage: {storage} has no {MARKER}: the shared folder is not "
                        "mounted here")
    if problems:
        return PlainTextResponse("\n".join(problems) + "\n", status_code=503)
    shortfall = free_space_shortfall(storage, settings.storage.min_free_mb)
    if shortfall is not None:
        return PlainTextResponse(f"degraded: storage: {shortfall} (storage.min_free_mb): "
                                 "C-STORE is refused (0xA700)\n", status_code=503)
    return PlainTextResponse("ok\n")


@router.get("/login", response_class=HTMLResponse, name="login")
def login_form(request: Request, next: str = "/queue") -> HTMLResponse:
    """The login form (a browser's way to present the token)."""
    return _render(request, "login.html", "login", next=_safe_next(next), error=None)


@router.post("/login", name="login_post")
def login(
    request: Request,
    name: Annotated[str, Form()],
    token: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/queue",
) -> Response:
    """Check the token; on success set the signed session cookie and go on."""
    configured = _settings(request).admin.token
    name = name.strip()[:64]
    if not configured or not name or not hmac.compare_digest(token, configured.strip()):
        if configured and name:
            client = request.client.host if request.client else "?"
            request.app.state.failure_limiter.record_failure(client, "login:" + token)
        return _render(request, "login.html", "login", status_code=401,
                       next=_safe_next(next), error="Wrong token (or no name given).")
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        auth.COOKIE_NAME,
        auth.make_session_cookie(configured.strip(), name),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout", name="logout")
def logout() -> RedirectResponse:
    """Drop the session cookie."""
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(auth.COOKIE_NAME)
    return response


def _safe_next(target: str) -> str:
    """Only local paths: a login form must not become an open redirect."""
    if not target.startswith("/") or target.startswith("//") or target.startswith("/login"):
        return "/queue"
    return target
