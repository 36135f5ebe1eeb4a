"""The dashboard application: built from settings and a session factory, nothing global.

``vaenode serve`` builds it once and runs it with uvicorn in a thread beside the SCP and the
scheduler (:func:`start_in_thread`); tests build it the same way against a temporary database.
The access rule is checked here, before anything listens: a dashboard bound beyond loopback
without a token never starts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker

from node.admin import auth
from node.admin.metrics import build_registry
from node.admin.routes import router
from node.config import Settings
from node.errors import ConfigError, NodeError
from node.queue.db import make_read_session_factory

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SHUTDOWN_GRACE_S = 3


def create_app(settings: Settings, session_factory: sessionmaker[Session]) -> FastAPI:
    """Build the dashboard for these settings and this database.

    Args:
        settings: the node's validated settings (``admin`` for access, ``storage`` for images,
            ``model``/``routing`` for the models page).
        session_factory: makes sessions on the queue database.

    Returns:
        The FastAPI application.

    Raises:
        ConfigError: the dashboard would listen beyond loopback without ``admin.token``.
    """
    auth.check_bind(settings.admin)
    app = FastAPI(title="vaenode admin", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.session_factory = session_factory
    # Pages, metrics and health checks only read: snapshots that never wait for ingest.
    read_factory = make_read_session_factory(session_factory.kw["bind"])
    app.state.read_session_factory = read_factory
    app.state.templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.state.registry = build_registry(read_factory, settings.storage.dir)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(router)

    token = settings.admin.token.strip() if settings.admin.token else None
    limiter = auth.FailureLimiter()
    app.state.failure_limiter = limiter
    hosts = auth.allowed_hosts(settings.admin)

    @app.middleware("http")
    async def require_token(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        client = request.client.host if request.client else "?"
        if request.scope["path"] not in auth.ANY_HOST_PATHS and not auth.host_allowed(
                request.headers.get("host"), hosts):
            # A page of another site that resolved its name to this address (DNS rebinding).
            log.warning("admin request refused: Host is not one of admin.allowed_hosts",
                        extra={"peer": client, "host": request.headers.get("host", "")[:100]})
            return Response("unknown host name; see admin.allowed_hosts\n", status_code=400,
                            media_type="text/plain")
        authorization = request.headers.get("authorization")
        cookie = request.cookies.get(auth.COOKIE_NAME)
        presented = auth.presented_credential(authorization, cookie)
        login_attempt = request.method == "POST" and request.url.path == "/login"
        if token is not None and (presented or login_attempt):
            wait = limiter.retry_after(client)
            if wait > 0:
                log.warning("admin credentials refused: too many wrong ones",
                            extra={"peer": client, "retry_after_s": round(wait)})
                return Response("too many wrong credentials; try again later\n",
                                status_code=429, media_type="text/plain",
                                headers={"Retry-After": str(max(1, round(wait)))})
        identity = auth.authenticate(token, authorization, cookie)
        if identity is None and presented is not None and token is not None:
            limiter.record_failure(client, presented)
        if identity is None and not auth.is_public(request.url.path):
            return _unauthorized(request)
        if request.method not in SAFE_METHODS and not auth.same_origin(
            request.headers.get("origin"), request.headers.get("host")
        ):
            # A form on another site posting to this dashboard (cross-site request forgery):
            # on an open loopback dashboard no cookie is needed, so SameSite cannot stop it.
            return Response("cross-origin request refused\n", status_code=403,
                            media_type="text/plain")
        request.state.identity = identity
        return await call_next(request)

    @app.exception_handler(NodeError)
    async def node_error(request: Request, exc: NodeError) -> Response:
        # The HTTP boundary: a refusal of the node becomes 409 with its message, not a 500.
        log.warning("admin request refused: %s", exc, extra={"path": request.url.path})
        return HTMLResponse(
            app.state.templates.get_template("error.html").render(
                request=request, message=str(exc), settings=settings
            ),
            status_code=409,
        )

    return app


def _unauthorized(request: Request) -> Response:
    """401 for a request without valid credentials: a login form for browsers, text otherwise."""
    headers = {"WWW-Authenticate": 'Bearer realm="vaenode"'}
    if "text/html" in request.headers.get("accept", ""):
        templates: Jinja2Templates = request.app.state.templates
        body = templates.get_template("login.html").render(
            request=request, next=request.url.path, error=None, settings=request.app.state.settings
        )
        return HTMLResponse(body, status_code=401, headers=headers)
    return Response("authentication required\n", status_code=401, headers=headers,
                    media_type="text/plain")


@dataclass
class RunningDashboard:
    """A dashboard served by uvicorn in a background thread; ``stop()`` ends it."""

    server: uvicorn.Server
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The port actually bound (useful when the configured port is 0)."""
        servers = getattr(self.server, "servers", [])
        for srv in servers:
            for sock in srv.sockets:
                return int(sock.getsockname()[1])
        raise NodeError("the dashboard is not listening")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask uvicorn to finish open requests and exit, and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout_s)


def start_in_thread(
    settings: Settings, session_factory: sessionmaker[Session], ready_timeout_s: float = 10.0
) -> RunningDashboard:
    """Serve the dashboard on ``admin.bind_address:admin.port`` from a daemon thread.

    uvicorn installs no signal handlers outside the main thread, so the serve command keeps
    SIGTERM and stops the dashboard through :meth:`RunningDashboard.stop`. ``log_config=None``
    keeps uvicorn from replacing the node's logging set-up with its own.

    Raises:
        ConfigError: beyond loopback without a token, or a TLS file missing (before anything
            listens).
        NodeError: the server did not start listening in time (port taken, for example).
    """
    app = create_app(settings, session_factory)
    admin = settings.admin
    for path in (admin.tls_cert_file, admin.tls_key_file):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"admin TLS file not found: {path}")
    if not auth.is_loopback(admin.bind_address) and admin.tls_cert_file is None:
        # Allowed (a TLS-terminating reverse proxy in front is a common set-up), but the token
        # then crosses the network in clear unless that proxy exists: say so once.
        log.warning(
            "admin dashboard beyond loopback without TLS: put it behind an HTTPS reverse proxy "
            "or set admin.tls_cert_file and admin.tls_key_file",
            extra={"address": admin.bind_address},
        )
    config = uvicorn.Config(
        app,
        host=admin.bind_address,
        port=admin.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        log_config=None,
        # A stuck client (e.g. plain HTTP on the TLS port) must not hold up the node's stop.
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        # X-Forwarded-For/-Proto only from the configured reverse proxies (uvicorn's default
        # believes any local process, which then picks the address the login limiter counts).
        proxy_headers=bool(admin.trusted_proxies),
        forwarded_allow_ips=list(admin.trusted_proxies) or None,
        ssl_certfile=str(admin.tls_cert_file) if admin.tls_cert_file else None,
        ssl_keyfile=str(admin.tls_key_file) if admin.tls_key_file else None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="vaenode-admin", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise NodeError(
                f"the admin dashboard could not listen on "
                f"{settings.admin.bind_address}:{settings.admin.port}"
            )
        time.sleep(0.05)
    running = RunningDashboard(server=server, thread=thread)
    log.info(
        "admin dashboard listening",
        extra={"address": settings.admin.bind_address, "port": running.port},
    )
    return running
