"""Several listener processes on one DICOM port (``[dicom].listener_processes`` > 1).

One Python process receives with one GIL: four associations at once use about one core. With
``listener_processes = N`` (N > 1) the main process of ``vaenode serve`` starts N child
processes, each with its own SCP, durable store and group committer on the same database
(SQLite: WAL, busy timeout, ``BEGIN IMMEDIATE``, so the writers of several processes queue for
the write lock). The main process owns the port: it accepts each connection and hands it to
the child with the fewest open connections (:mod:`node.ingest.dispatch`). It also keeps the
scheduled jobs (idle series, worker, outbox, dashboard) and supervises the children:

- ``max_associations`` is split: child ``i`` accepts ``max_associations // N`` associations,
  plus one for the first ``max_associations % N`` children. The node as a whole never serves
  more than ``max_associations``; since each connection goes to the least loaded child, a
  child refuses one only when every child has about its share open.
- A child that exits while the node runs is logged (error) and started again; the
  connections it had are lost (their senders retry), new ones go to the others meanwhile.
  More than :data:`MAX_RESTARTS` deaths within :data:`RESTART_WINDOW_S`, or a restart that
  fails, stop the node with exit status 1 (systemd restarts it).
- SIGTERM/SIGINT on the main process: the port closes, each child gets SIGTERM, lets its
  established associations finish (up to the grace period) and exits 0.
- The children die with the main process (``PR_SET_PDEATHSIG``), so a ``kill -9`` of the main
  process stops the whole node as one crash would, and no orphan keeps a connection.
- Children log to the same stderr in the same format, with a ``listener=<i>`` field.
- The port opens when every child is ready.
- Group commit: the committers of the children take turns on a ``flock`` (see
  :mod:`node.ingest.commit`), not on SQLite's sleeping busy handler.

:meth:`~node.ingest.store.Store.recover` runs once, in the main process, before any child
starts: in a child restarted while the others receive it would delete their temporary files.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url

from node.config import Settings
from node.errors import NodeError
from node.ingest.dispatch import ENDED, Dispatcher, bind_port

if TYPE_CHECKING:
    from node.ingest.scp import Scp

log = logging.getLogger(__name__)

#: A child that died is restarted; more deaths than this within RESTART_WINDOW_S end the node.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
#: Longest wait for a child to report that it listens.
START_TIMEOUT_S = 60.0

_PR_SET_PDEATHSIG = 1


class ListenerFailed(NodeError):
    """A listener process could not start, or keeps dying."""


def association_shares(total: int, processes: int) -> list[int]:
    """``total`` associations split over ``processes`` listeners (the first get the rest)."""
    base, rest = divmod(total, processes)
    return [base + (1 if i < rest else 0) for i in range(processes)]


def commit_lock_path(settings: Settings) -> Path:
    """The file whose ``flock`` the listener processes' group committers share: next to an
    SQLite database, else in the storage folder."""
    url = make_url(settings.database.url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return Path(f"{url.database}.ingest-lock")
    return Path(settings.storage.dir) / ".ingest-lock"


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's stop() still ends us
        log.warning("cannot tie the listener process to the main process")
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)


class _ListenerField(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.listener = self.index
        return True


def _receive_connections(channel: socket.socket, scp: Scp) -> None:
    """Adopt each connection the main process passes over ``channel``, until it closes it."""
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(channel, 1, 1)
        except OSError:
            return
        if not data:
            return  # the main process closed our channel: it is stopping
        for fd in fds:
            try:
                scp.adopt(socket.socket(fileno=fd))
            except Exception:  # the next connection must still be served
                log.exception("cannot take over a DICOM connection")


def _child_main(settings: Settings, index: int, max_associations: int, parent_pid: int,
                conn: Connection, channel: socket.socket, address: tuple[str, int],
                grace_s: float) -> None:
    """Entry point of a listener process (spawned: nothing inherited but these arguments).

    Tells :class:`ListenerPool` over ``conn`` that it is ``("ready", None)`` (or
    ``("error", why)``), then adopts the connections that come over ``channel`` and writes
    :data:`~node.ingest.dispatch.ENDED` on it as each ends.
    """
    _die_with_parent(parent_pid)
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides; it sends SIGTERM
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())

    from node.ingest.scp import Scp
    from node.ingest.store import Store
    from node.log import configure
    from node.queue.db import make_engine, make_session_factory

    configure(settings.log.level, settings.log.format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ListenerField(index))
    engine = make_engine(settings.database)
    session_factory = make_session_factory(engine)
    store = Store(settings.storage, session_factory, commit_lock=commit_lock_path(settings))
    report_lock = threading.Lock()

    def connection_ended() -> None:
        with report_lock, contextlib.suppress(OSError):
            channel.sendall(ENDED)

    scp: Scp | None = None
    try:
        store.start()
        scp = Scp(settings.dicom, store, session_factory, max_associations=max_associations,
                  dispatched=True, connection_ended=connection_ended)
        scp.start(address)
        conn.send(("ready", None))
    except BaseException as exc:
        log.exception("listener process cannot start")
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        store.close()
        raise SystemExit(1) from None
    threading.Thread(target=_receive_connections, args=(channel, scp),
                     name="dicom-adopt", daemon=True).start()
    while not stop.wait(1.0):
        pass
    scp.stop(grace_s=grace_s)
    store.close()
    engine.dispose()


class ListenerPool:
    """The listener processes of one node and the dispatcher in front of them: start, watch,
    stop.

    Args:
        settings: the node's settings (``[dicom].listener_processes`` > 1).
        grace_s: how long each child lets its associations finish at shutdown.
    """

    def __init__(self, settings: Settings, grace_s: float) -> None:
        self.settings = settings
        self.grace_s = grace_s
        n = settings.dicom.listener_processes
        self.shares = association_shares(settings.dicom.max_associations, n)
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: list[BaseProcess | None] = [None] * n
        self._conns: list[Connection | None] = [None] * n
        self._channels: list[socket.socket | None] = [None] * n
        self._dispatcher: Dispatcher | None = None
        self._deaths: list[float] = []
        self._stopping = False

    def _spawn(self, index: int) -> None:
        assert self._dispatcher is not None
        ours, theirs = self._ctx.Pipe(duplex=True)
        channel, their_channel = socket.socketpair()
        proc = self._ctx.Process(
            target=_child_main, name=f"vaenode-listener-{index}", daemon=True,
            args=(self.settings, index, self.shares[index], os.getpid(), theirs, their_channel,
                  self._dispatcher.address, self.grace_s),
        )
        proc.start()
        theirs.close()
        their_channel.close()
        self._procs[index], self._conns[index] = proc, ours
        self._channels[index] = channel

    def _expect_ready(self, index: int) -> None:
        """Wait for child ``index`` to report that it is ready; ListenerFailed otherwise."""
        proc, conn = self._procs[index], self._conns[index]
        assert proc is not None and conn is not None
        try:
            if not conn.poll(START_TIMEOUT_S):
                raise ListenerFailed(f"listener process {index}: not ready within "
                                     f"{START_TIMEOUT_S:.0f} s")
            kind, detail = conn.recv()
        except EOFError:
            proc.join(5)
            raise ListenerFailed(f"listener process {index} exited at start "
                                 f"(status {proc.exitcode})") from None
        if kind != "ready":
            raise ListenerFailed(f"listener process {index} cannot start: {detail}")

    def _open(self, indexes: list[int]) -> None:
        """Start children ``indexes`` (together) and hand them connections once ready."""
        assert self._dispatcher is not None
        for index in indexes:
            self._spawn(index)
        for index in indexes:
            self._expect_ready(index)
        for index in indexes:
            channel = self._channels[index]
            assert channel is not None
            self._dispatcher.attach(index, channel)

    def start(self) -> tuple[str, int]:
        """Start every child, then open the port; returns the address it listens on."""
        d = self.settings.dicom
        if d.tls.enabled:
            from node.ingest.scp import build_ssl_context

            build_ssl_context(d.tls)  # a ConfigError here, not in every child
        try:
            sock = bind_port(d.bind_address, d.port)
        except OSError as exc:
            raise ListenerFailed(f"cannot listen on {d.bind_address}:{d.port}: {exc}") from exc
        self._dispatcher = Dispatcher(sock)
        try:
            self._open(list(range(len(self._procs))))
            self._dispatcher.start()
        except BaseException:
            self.stop()
            raise
        address = self._dispatcher.address
        log.info("listener processes ready",
                 extra={"processes": len(self._procs), "address": f"{address[0]}:{address[1]}",
                        "pids": ",".join(str(p.pid) for p in self._procs if p is not None),
                        "max_associations_each": ",".join(map(str, self.shares))})
        return address

    def check(self) -> None:
        """Restart children that died; raise :class:`ListenerFailed` when they keep dying."""
        if self._stopping:
            return
        for index, proc in enumerate(self._procs):
            if proc is None or proc.is_alive():
                continue
            now = time.monotonic()
            self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW_S] + [now]
            log.error("listener process died; its open associations are lost",
                      extra={"listener": index, "pid": proc.pid, "exitcode": proc.exitcode})
            self._close_conn(index)
            self._procs[index] = None
            if len(self._deaths) > MAX_RESTARTS:
                raise ListenerFailed(f"{len(self._deaths)} listener process deaths within "
                                     f"{RESTART_WINDOW_S:.0f} s; stopping the node")
            self._open([index])
            restarted = self._procs[index]
            log.warning("listener process restarted",
                        extra={"listener": index, "pid": restarted and restarted.pid})

    def _close_conn(self, index: int) -> None:
        conn, self._conns[index] = self._conns[index], None
        if conn is not None:
            conn.close()
        self._channels[index] = None  # the dispatcher closes its end (attach() or stop())

    def stop(self) -> None:
        """Close the port, then SIGTERM every child and wait for it (grace period, then
        SIGKILL)."""
        self._stopping = True
        if self._dispatcher is not None:
            self._dispatcher.stop()  # new connections are refused from here on
        for index in range(len(self._conns)):
            self._close_conn(index)  # a child still starting reads EOF and exits
        for channel in self._channels:
            if channel is not None:  # spawned, never attached (a failed start)
                channel.close()
        alive = [p for p in self._procs if p is not None and p.is_alive()]
        for proc in alive:
            os.kill(proc.pid, signal.SIGTERM)  # type: ignore[arg-type]
        deadline = time.monotonic() + self.grace_s + 15.0
        for proc in alive:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("listener process did not stop in time; killing it",
                            extra={"pid": proc.pid})
                proc.kill()
                proc.join(5)
            elif proc.exitcode != 0:
                log.warning("listener process exited with an error",
                            extra={"pid": proc.pid, "exitcode": proc.exitcode})
        self._procs = [None] * len(self._procs)
