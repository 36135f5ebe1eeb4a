"""This process as a member of the deployment: its name, and whether it runs the cluster-wide jobs.

Some scheduled jobs must run on one node at a time however many run ``vaenode serve``: series
completion, retention, the check for problems of the node (told once, not once per node) and
the alert and report outboxes. With PostgreSQL each node keeps one dedicated database session
for its life and, on it:

- takes a session advisory lock on its own name: a second process configured with the same
  name (two workers on one machine left with the default name) would requeue the first one's
  series at its start, so it waits for the name and then refuses to start;
- tries, every ``[cluster].takeover_check_s``, to take the advisory lock of the cluster-wide
  jobs; the node that holds it runs them, the others skip them.

PostgreSQL releases a session's advisory locks when the session ends: at once when the process
dies (``kill -9``: the kernel closes its socket), and within about 25 s when its machine
vanishes, because the session asks the server for TCP keepalives (idle 10 s, then 3 probes 5 s
apart). The next node to try then takes the jobs: no person, no election of our own. A node
that loses its session (database restarted, network cut) stops running the jobs at once and
tries again at its next check. While two nodes might overlap (a partitioned holder that has
not noticed yet) the outboxes still claim each row under a lease and the problem check takes a
transaction lock, so nothing is sent twice.

With SQLite the database belongs to one node: the process holds an exclusive ``flock`` on a
lock file beside the database, and a second ``vaenode serve`` on the same file refuses to
start; the one node runs every job, as it always did.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from node.config import Settings
from node.errors import ConfigError

log = logging.getLogger(__name__)

ROLE_ALL, ROLE_RECEIVER, ROLE_WORKER = "all", "receiver", "worker"
#: Advisory lock class of a node's name (second key: ``hashtext(name)``) ...
NAME_LOCK_CLASS = 0x76616500
#: ... and of the cluster-wide jobs (second key 0) and the problem check (second key 1).
JOBS_LOCK_CLASS = NAME_LOCK_CLASS + 1
JOBS_KEY, PROBLEMS_KEY = 0, 1
#: How long a starting node waits for its name: longer than the server takes to notice that
#: the session of a crashed machine is dead (the keepalives below), so a node restarted at
#: once after its machine died is not refused.
NAME_WAIT_S = 45.0
#: Server-side TCP keepalives of the membership session (seconds; see the module docstring).
_SERVER_KEEPALIVES = {"tcp_keepalives_idle": 10, "tcp_keepalives_interval": 5,
                      "tcp_keepalives_count": 3}
#: Client-side keepalives and connect timeout (libpq parameters), so that this node notices a
#: dead database server as well.
_CLIENT_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                      "keepalives_count": 3, "connect_timeout": 10}


def is_shared(database_url: str) -> bool:
    """Whether the queue database can be shared by several nodes (anything but SQLite)."""
    return make_url(database_url).get_backend_name() != "sqlite"


def default_node_name(settings: Settings, role: str) -> str:
    """``<host name>/<AE title>`` for ``vaenode serve``, ``<host name>/worker`` for a worker:
    stable across restarts, so that a restarted worker finds its own unfinished series."""
    suffix = "worker" if role == ROLE_WORKER else settings.dicom.ae_title
    return f"{socket.gethostname()}/{suffix}"[:128]


def with_node_name(settings: Settings, role: str) -> Settings:
    """``settings`` with ``[cluster].node_name`` filled in (the default when unset)."""
    if settings.cluster.node_name is not None:
        return settings
    name = default_node_name(settings, role)
    return settings.model_copy(
        update={"cluster": settings.cluster.model_copy(update={"node_name": name})})


def sessions_engine(database_url: str) -> Engine:
    """An engine of unpooled connections with keepalives, for sessions a node holds for long
    (this one, the wake listener)."""
    url = make_url(database_url)
    args = _CLIENT_KEEPALIVES if url.get_driver_name() in ("psycopg", "psycopg2") else {}
    return create_engine(url, poolclass=NullPool, connect_args=dict(args))


class Membership:
    """The node's name, held for its life, and its hold on the cluster-wide jobs.

    Args:
        settings: the node's settings, ``[cluster].node_name`` filled in
            (:func:`with_node_name`).
        role: ``all``, ``receiver`` or ``worker``.
    """

    def __init__(self, settings: Settings, role: str) -> None:
        assert settings.cluster.node_name is not None
        self.name = settings.cluster.node_name
        self.role = role
        self.shared = is_shared(settings.database.url)
        #: Set while this node runs the cluster-wide jobs (always, alone on SQLite).
        self.cluster_jobs = threading.Event()
        self._url = settings.database.url
        self._engine: Engine | None = None
        self._conn: Connection | None = None
        self._lock_fd: int | None = None
        self._mutex = threading.Lock()

    # --- joining and leaving -----------------------------------------------------------------

    def join(self, wait_s: float = NAME_WAIT_S) -> None:
        """Take this node's place: its name on PostgreSQL, the database's node lock on SQLite.

        Raises:
            ConfigError: another running node holds the name (PostgreSQL), or another node
                uses the SQLite database.
        """
        if not self.shared:
            self._lock_sqlite()
            self.cluster_jobs.set()
            return
        deadline = time.monotonic() + wait_s
        while True:
            with self._mutex:
                if self._connect():
                    return
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"another running node is named {self.name!r} (its database session holds "
                    "the name): give each process its own [cluster].node_name")
            log.warning("node name %r is held by another session; waiting for it", self.name)
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))

    def leave(self) -> None:
        """Give up the jobs and the name (the session ends; SQLite: the lock file is closed)."""
        with self._mutex:
            self.cluster_jobs.clear()
            self._close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def _lock_sqlite(self) -> None:
        database = make_url(self._url).database
        if database in (None, "", ":memory:"):
            return
        path = Path(f"{database}.node-lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"another vaenode node uses the SQLite database {database} (it holds {path}): "
                "an SQLite queue belongs to one node; several nodes share a PostgreSQL "
                "database ([database].url, docs/cluster.md)") from None
        self._lock_fd = fd

    def _connect(self) -> bool:
        """Open the membership session and take the name on it; False when another session
        holds the name. Called with the mutex held."""
        if self._engine is None:
            self._engine = sessions_engine(self._url)
        conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            if conn.dialect.name == "postgresql":
                for key, value in _SERVER_KEEPALIVES.items():
                    conn.execute(text(f"SET {key} = {int(value)}"))
            got = conn.execute(text("SELECT pg_try_advisory_lock(:c, hashtext(:n))"),
                               {"c": NAME_LOCK_CLASS, "n": self.name}).scalar()
        except BaseException:
            conn.close()
            raise
        if not got:
            conn.close()
            return False
        self._conn = conn
        return True

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except DBAPIError as exc:  # the session is gone already: nothing is held
                log.debug("closing the membership session: %s", exc)
            self._conn = None

    # --- the cluster-wide jobs ---------------------------------------------------------------

    def check_cluster_jobs(self, take: bool = True) -> bool:
        """Keep the cluster-wide jobs, or try to take them (``take``; a worker never does, and
        only keeps its session and name); returns whether this node runs them.

        Scheduled every ``[cluster].takeover_check_s``, and once at start.
        """
        if not self.shared:
            return True
        with self._mutex:
            try:
                if self._conn is None and not self._connect():
                    log.error("node name %r is held by another session: not running the "
                              "cluster-wide jobs", self.name)
                    return False
                assert self._conn is not None
                self._conn.execute(text("SELECT 1"))
                if take and not self.cluster_jobs.is_set():
                    got = self._conn.execute(text("SELECT pg_try_advisory_lock(:c, :k)"),
                                             {"c": JOBS_LOCK_CLASS, "k": JOBS_KEY}).scalar()
                    if got:
                        self.cluster_jobs.set()
                        log.info("this node now runs the cluster-wide jobs (completion, "
                                 "retention, node problems, alert and report outboxes)",
                                 extra={"node": self.name})
            except DBAPIError as exc:
                if self.cluster_jobs.is_set():
                    log.error("database session lost: this node no longer runs the "
                              "cluster-wide jobs: %s", exc, extra={"node": self.name})
                else:
                    log.warning("database session lost: %s", exc, extra={"node": self.name})
                self.cluster_jobs.clear()
                self._close()
        return self.cluster_jobs.is_set()
