"""Group commit: one database transaction (one WAL fsync) for instances of many associations.

Each association runs in its own thread and must not answer Success before its instance's row
is durable. With SQLite every commit is an fsync and the write lock serializes them, so four
senders at once would queue behind each other's fsyncs. Instead, association threads hand their
rows to one committer thread, which takes every row waiting at that moment, records them in a
single transaction and then wakes each sender.

A row is handed over *before* its file is written: the committer runs the row's statements
while the sender writes and fsyncs the file, and commits only once every file of the batch is
in place (:meth:`Ticket.file_ready`); a row whose file failed is left out and the rest is
committed again. So the statements cost no time on the sender's path, and a row is still never
committed before its file's name exists.

With several listener processes (``[dicom].listener_processes`` > 1) each has its own committer
and they share the database's write lock. Holding it while this process's senders write their
files would make the other processes wait for those writes, and SQLite's busy handler waits in
sleeps of 1, 2, 5, 10... ms. So such a committer (``lock_path`` given) waits for the batch's
files first, and then takes an exclusive ``flock`` on ``lock_path`` around its transaction: the
committers of the node queue in the kernel and each is woken the moment the previous one has
committed. The lock is released by the kernel if its holder dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.queue import repo

log = logging.getLogger(__name__)

#: Most rows in one transaction; bounds the latency one batch adds to the first row in it.
MAX_BATCH = 64
#: Longest wait for a sender's file while holding the write transaction; a sender stuck longer
#: (a hung disk) gets a failure instead of stalling every other association's commits.
FILE_WAIT_S = 30.0


#: SQLSTATEs of a transaction PostgreSQL aborted because of another one (deadlock detected,
#: serialization failure): tried again once.
_RETRY_SQLSTATES = ("40P01", "40001")


def _race(exc: BaseException) -> bool:
    """Whether ``exc`` is a race with another writer that a second try resolves: the first
    instance of a series (or the same instance) recorded by another receiver a moment before
    (a unique key; the second try updates), or a deadlock between two receivers' batches."""
    return isinstance(exc, IntegrityError) or (
        isinstance(exc, DBAPIError)
        and getattr(exc.orig, "sqlstate", None) in _RETRY_SQLSTATES)


class FileNotWritten(Exception):
    """The sender could not write the file; the row was not committed."""


@dataclass
class Ticket:
    """One row handed to the committer: the sender calls :meth:`file_ready`, then waits on
    ``future``."""

    record: repo.InstanceRecord
    future: Future[repo.RecordResult] = field(default_factory=Future)
    _ready: threading.Event = field(default_factory=threading.Event)
    _ok: bool = False

    def file_ready(self, ok: bool) -> None:
        """The file is written, fsynced and renamed into place (``ok``), or it failed."""
        self._ok = ok
        self._ready.set()


class GroupCommitter:
    """A thread that records instances in batches; :meth:`submit` returns a future."""

    def __init__(self, session_factory: sessionmaker[Session], *,
                 lock_path: Path | None = None) -> None:
        self._session_factory = session_factory
        self._lock_path = lock_path
        self._lock_fd: int | None = None
        self._queue: queue.Queue[Ticket | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        # Guards the thread's life against submits: nothing is queued after the stop marker.
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the committer thread."""
        with self._lock:
            if self._lock_path is not None and self._lock_fd is None:
                self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            self._thread = threading.Thread(target=self._run, name="ingest-commit",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Commit what is queued, then end the thread; later submits return None."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._queue.put(None)
        thread.join()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def submit(self, record: repo.InstanceRecord) -> Ticket | None:
        """Queue one row, or return None when the committer is not running (the caller then
        commits the row itself). The caller must call ``file_ready`` on the ticket (in a
        ``finally``); its future resolves once the row is committed, or with the error."""
        with self._lock:
            if self._thread is None:
                return None
            ticket = Ticket(record)
            self._queue.put(ticket)
        return ticket

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._commit(batch)

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        if self._lock_fd is None:
            yield
            return
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # blocks without the GIL
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _files_first(self, batch: list[Ticket]) -> list[Ticket]:
        """Wait for the batch's files; fail the tickets whose file failed; return the rest."""
        deadline = time.monotonic() + FILE_WAIT_S
        for ticket in batch:
            ticket._ready.wait(max(0.0, deadline - time.monotonic()))
        rest = []
        for ticket in batch:
            if ticket._ready.is_set() and ticket._ok:
                rest.append(ticket)
            else:
                ticket.future.set_exception(FileNotWritten(ticket.record.sop_instance_uid))
        return rest

    def _commit(self, batch: list[Ticket]) -> None:
        if self._lock_fd is not None:
            batch = self._files_first(batch)
            if not batch:
                return
        with self._write_lock():
            self._commit_locked(batch)

    def _commit_locked(self, batch: list[Ticket], retried: bool = False) -> None:
        try:
            with self._session_factory.begin() as session:
                results = [repo.record_instance(session, p.record) for p in batch]
                deadline = time.monotonic() + FILE_WAIT_S
                for ticket in batch:
                    ticket._ready.wait(max(0.0, deadline - time.monotonic()))
                failed = [t for t in batch if not (t._ready.is_set() and t._ok)]
                if failed:
                    raise FileNotWritten
        except FileNotWritten:
            for ticket in failed:
                ticket.future.set_exception(FileNotWritten(ticket.record.sop_instance_uid))
            rest = [t for t in batch if t not in failed]
            if rest:
                self._commit_locked(rest)
            return
        except Exception as exc:
            if len(batch) == 1:
                if not retried and _race(exc):
                    self._commit_locked(batch, retried=True)
                    return
                log.exception("cannot record instance",
                              extra={"sop_uid": batch[0].record.sop_instance_uid})
                batch[0].future.set_exception(exc)
                return
            # One bad row must not fail the others (or a race with another receiver's
            # transaction): one by one.
            for pending in batch:
                self._commit_locked([pending])
            return
        for pending, result in zip(batch, results, strict=True):
            pending.future.set_result(result)
